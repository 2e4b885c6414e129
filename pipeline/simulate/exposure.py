"""What one simulated exposure is: pointing, timing, conditions (the observing plan's unit)."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ExposureSpec"]


@dataclass(frozen=True)
class ExposureSpec:
    """One exposure of the simulated survey, before any quadrant is rendered.

    ``field_ra``/``field_dec`` are the commanded pointing (the field centre, written as
    TELRA/TELDEC); the true boresight is off by ``pointing_offset_arcsec`` (east, north).
    ``airmass`` is the telescope's airmass at the boresight.  ``seed`` makes every
    quadrant of the exposure reproducible on its own.
    """

    expid: int
    fieldid: int
    field_ra: float
    field_dec: float
    filter: str
    obsmjd: float
    exptime: float
    progrmid: int
    airmass: float
    pointing_offset_arcsec: tuple[float, float]
    position_angle_deg: float
    seeing_fwhm_arcsec: float
    sky_mag: float
    transparency_mag: float
    temperature_c: float
    pressure_hpa: float
    seed: int

    @property
    def night(self) -> str:
        """UT date of the night as YYYYMMDD (the Kafka topic date)."""
        from astropy.time import Time
        return Time(self.obsmjd, format="mjd", scale="utc").strftime("%Y%m%d")
