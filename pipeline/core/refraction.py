"""Atmospheric refraction: the airmass model of the pixel scale, and airmass at a position.

Refraction lifts every star toward the zenith by ``dz = A tan z + B tan^3 z`` (``z`` the
observed zenith distance; ``A``, ``B`` from ERFA's ``refco`` for the site's pressure,
temperature, humidity and the filter's wavelength).  Because ``dz`` grows with ``z``, the
sky is compressed on the detector: along the vertical by ``d z_true / d z_obs =
1 + A sec^2 z + 3 B tan^2 z sec^2 z`` and across it by ``sin z_true / sin z_obs ~
1 + A + B tan^2 z``.  One pixel therefore covers more true sky at high airmass; the pixel
*area* grows by the product of the two factors.  This is the model the astrometric scale
check compares a solution against (the expected scale change from the prior's airmass to
the image's), and the simulator's optics reproduce it through astropy's refracting frames.

Airmass here is ``sec z`` of the unrefracted zenith distance, which is what
:func:`airmass_at` recomputes at a quadrant's own centre (the field of view is 7 degrees
across, so a corner quadrant's airmass differs from the boresight's).
"""
from __future__ import annotations

from dataclasses import dataclass

import erfa
import numpy as np
import astropy.units as u
from astropy.coordinates import AltAz, EarthLocation, SkyCoord
from astropy.time import Time

from pipeline.core.config import SiteConfig
from pipeline.core.exits import BadInputError

__all__ = ["RefractionModel", "BelowHorizonError", "site_location", "airmass_at", "zenith_distance_of_airmass",
           "require_pointing_above_horizon"]


class BelowHorizonError(BadInputError):
    """A position below the site's horizon at the time given: no image can have been taken."""


def site_location(site: SiteConfig) -> EarthLocation:
    """The observatory as a fixed geodetic location (never looked up by name)."""
    return EarthLocation.from_geodetic(lon=site.longitude_deg * u.deg, lat=site.latitude_deg * u.deg,
                                       height=site.height_m * u.m)


def zenith_distance_of_airmass(airmass) -> np.ndarray:
    """Zenith distance (radians) of an airmass taken as sec z."""
    airmass = np.asarray(airmass, dtype=float)
    if np.any(airmass < 1):
        raise ValueError("airmass must be >= 1")
    return np.arccos(1.0 / airmass)


@dataclass(frozen=True)
class RefractionModel:
    """Refraction constants for one set of conditions.

    Parameters
    ----------
    pressure_hpa, temperature_c, relative_humidity : float
        Site conditions (humidity as a fraction 0-1).
    wavelength_um : float
        Effective wavelength of the filter, micrometres.
    """

    pressure_hpa: float
    temperature_c: float
    relative_humidity: float
    wavelength_um: float

    @property
    def coefficients(self) -> tuple[float, float]:
        """ERFA's (A, B) in radians."""
        a, b = erfa.refco(self.pressure_hpa, self.temperature_c, self.relative_humidity,
                          self.wavelength_um)
        return float(a), float(b)

    def compression(self, airmass) -> tuple[np.ndarray, np.ndarray]:
        """True-sky angle per observed angle, (vertical, horizontal), at an airmass."""
        a, b = self.coefficients
        z = zenith_distance_of_airmass(airmass)
        t2 = np.tan(z) ** 2
        s2 = 1.0 + t2
        return 1.0 + a * s2 + 3.0 * b * t2 * s2, 1.0 + a + b * t2

    def pixel_area_factor(self, airmass) -> np.ndarray:
        """True-sky area of a pixel relative to no refraction."""
        vertical, horizontal = self.compression(airmass)
        return vertical * horizontal

    def scale_change_pct(self, airmass, reference_airmass=1.0) -> np.ndarray:
        """Expected percent change of the linear pixel scale (sqrt of the area) between airmasses."""
        ratio = self.pixel_area_factor(airmass) / self.pixel_area_factor(reference_airmass)
        return 100.0 * (np.sqrt(ratio) - 1.0)


def airmass_at(ra_deg, dec_deg, time: Time, site: SiteConfig):
    """Airmass (sec z, unrefracted), altitude and azimuth (deg) of positions at a time.

    Raises
    ------
    BelowHorizonError
        When a position is below the horizon (the image cannot have been taken); a
        ``ValueError`` and a bad-input error (exit status 3).
    """
    frame = AltAz(obstime=time, location=site_location(site))
    altaz = SkyCoord(ra=np.asarray(ra_deg) * u.deg, dec=np.asarray(dec_deg) * u.deg).transform_to(frame)
    alt = altaz.alt.to_value(u.deg)
    if np.any(alt <= 0):
        raise BelowHorizonError(f"position below the horizon at {time.isot} (altitude {np.min(alt):.1f} deg)")
    return 1.0 / np.sin(np.deg2rad(alt)), alt, altaz.az.to_value(u.deg)


def require_pointing_above_horizon(meta, site: SiteConfig, source) -> float:
    """The altitude (deg) of an image's pointing at mid-exposure, which must be above the horizon.

    Parameters
    ----------
    meta : ImageMeta
        The image's contract keywords (``TELRA``, ``TELDEC``, ``OBSMJD``, ``EXPTIME``).
    site : SiteConfig
        The observatory.
    source : str or path
        The file, named in the error.

    Raises
    ------
    BelowHorizonError
        The header puts the field below the horizon: it is inconsistent with the sky (bad
        input, exit status 3), named with the file and the keywords.
    """
    time = meta.obstime
    frame = AltAz(obstime=time, location=site_location(site))
    alt = float(SkyCoord(ra=meta.telra * u.deg, dec=meta.teldec * u.deg).transform_to(frame).alt.to_value(u.deg))
    if not alt > 0.0:
        raise BelowHorizonError(
            f"{source}: the header is inconsistent with the sky: TELRA = {meta.telra:g}, TELDEC = {meta.teldec:g} "
            f"is {-alt:.1f} deg below the horizon at OBSMJD = {meta.obsmjd:g} ({time.isot} UTC at mid-exposure) "
            f"for the site at longitude {site.longitude_deg:g}, latitude {site.latitude_deg:g} deg ([site])")
    return alt
