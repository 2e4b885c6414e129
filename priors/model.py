"""What a distortion prior holds: per-quadrant TPV terms in the camera frame, plus provenance.

Each quadrant's entry maps its pixels to standard coordinates (degrees, east and north in
the observed frame of date) about the commanded pointing, in the camera frame of
:mod:`priors.frames`:
intermediate coordinates ``CD @ (p - CRPIX)``, then the TPV polynomial ``PV1``/``PV2``.
CRPIX is the boresight (the origin of the focal-plane layout) in the quadrant's pixels, so
every quadrant shares the same projection centre, as SCAMP's TPV mosaics do.
:func:`priors.ahead.prior_wcs_header` turns an entry into an ICRS TPV header for one
exposure.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
from astropy.io import fits
from astropy.table import Table

from pipeline.core.config import SiteConfig
from pipeline.formats.tpv import tpv_header

from priors.frames import CameraFrame
from pipeline.core.exits import BadInputError

__all__ = ["PriorError", "QuadrantPrior", "PriorProvenance", "Prior", "PLACEMENT_FITTED",
           "PLACEMENT_LAYOUT"]

#: The quadrant's position and orientation were measured from its own stars.
PLACEMENT_FITTED = "fitted"
#: Too few stars: the quadrant sits where the nominal layout puts it; the focal-plane
#: distortion still comes from the global fit.
PLACEMENT_LAYOUT = "layout"


class PriorError(BadInputError):
    """Input a prior cannot be built or used from; the message names the source and the problem."""

    def __init__(self, source: str, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


@dataclass(frozen=True)
class QuadrantPrior:
    """The prior WCS of one quadrant, in the camera frame.

    Attributes
    ----------
    rcid : int
        Readout channel 0-63.
    shape : (int, int)
        Image shape (ny, nx).
    crpix : (float, float)
        The boresight in 1-based quadrant pixels.
    cd : ndarray (2, 2)
        Linear part, deg/pixel (the quadrant's own linear fit).
    pv1, pv2 : mapping int -> float
        TPV terms (``PV2`` takes its arguments swapped, as TPV defines).
    n_stars : int
        Stars of this quadrant used in the fit (0 for a layout fallback).
    placement : str
        :data:`PLACEMENT_FITTED` or :data:`PLACEMENT_LAYOUT`.
    rms_arcsec : float
        RMS residual of this quadrant's stars per axis (NaN with no stars).
    """

    rcid: int
    shape: tuple[int, int]
    crpix: tuple[float, float]
    cd: np.ndarray
    pv1: Mapping[int, float]
    pv2: Mapping[int, float]
    n_stars: int
    placement: str
    rms_arcsec: float

    def camera_header(self, lon0: float = 0.0, lat0: float = 0.0) -> fits.Header:
        """TPV header mapping pixels to the camera frame with the pointing at (lon0, lat0)."""
        return tpv_header((lon0, lat0), self.crpix, self.cd, dict(self.pv1), dict(self.pv2), self.shape)


@dataclass(frozen=True)
class PriorProvenance:
    """Where a prior came from.

    The prior is refraction-free (:mod:`priors.frames`); the site and the default weather
    and wavelength are kept so that an exposure's header can put refraction back.
    """

    n_exposures: int
    n_stars: int
    built: str                     # ISO-8601 UTC time of the fit
    airmass_min: float
    airmass_max: float
    airmass_mean: float
    mjd_min: float
    mjd_max: float
    rms_arcsec: float              # per axis, all stars kept
    degree: int                    # of the focal-plane polynomial and the PV terms
    n_rejected: int = 0            # outliers clipped
    frame: str = "HADEC-OBSERVED"
    site_longitude_deg: float = 0.0
    site_latitude_deg: float = 0.0
    site_height_m: float = 0.0
    relative_humidity: float = 0.0
    pressure_hpa: float = 0.0      # run-time defaults when an image gives no weather or filter
    temperature_c: float = 0.0
    wavelength_um: float = 0.0

    def site(self) -> SiteConfig:
        """The observatory the prior was built for."""
        return SiteConfig(longitude_deg=self.site_longitude_deg, latitude_deg=self.site_latitude_deg,
                          height_m=self.site_height_m, pressure_hpa=self.pressure_hpa,
                          temperature_c=self.temperature_c, relative_humidity=self.relative_humidity)


@dataclass(frozen=True)
class Prior:
    """A focal-plane distortion prior: every quadrant's entry, provenance, and per-exposure terms.

    ``exposures`` has one row per exposure used: expid, telra, teldec, obsmjd, airmass,
    n_stars, the fitted pointing error (``offset_east_arcsec``, ``offset_north_arcsec``,
    ICRS tangent plane) and the exposure's linear term relative to the prior
    (``lin``, 2x2, dimensionless: rotation and refraction compression).
    """

    quadrants: Mapping[int, QuadrantPrior]
    provenance: PriorProvenance
    exposures: Table = field(default_factory=Table)
    source: str = "<prior>"

    def camera_frame(self, obsmjd: float, pressure_hpa: float | None = None,
                     temperature_c: float | None = None, wavelength_um: float | None = None) -> CameraFrame:
        """The camera frame of an exposure at this prior's site (defaults: the stored conditions)."""
        p = self.provenance
        return CameraFrame(obsmjd=obsmjd, site=p.site(),
                           pressure_hpa=p.pressure_hpa if pressure_hpa is None else pressure_hpa,
                           temperature_c=p.temperature_c if temperature_c is None else temperature_c,
                           wavelength_um=p.wavelength_um if wavelength_um is None else wavelength_um)

    def quadrant(self, rcid: int) -> QuadrantPrior:
        """The entry of one readout channel."""
        try:
            return self.quadrants[int(rcid)]
        except KeyError:
            raise PriorError(self.source, f"no entry for rcid {rcid}") from None
