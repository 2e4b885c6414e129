"""Pixel-scale check of an astrometric solution against its prior and the airmass model.

A solution whose pixel scale differs from the prior's by more than 1 % anywhere on the
detector grid (x = 1..3074 step 128, y = 1..3082 step 140) is unusable: SCAMP produced a
distortion that the optics cannot have (typically one running away in a corner).  The
expected difference is not zero: refraction compresses the sky with airmass, so a prior
built at low airmass and an image taken at airmass 2 differ by a predictable amount, given
by :class:`pipeline.core.refraction.RefractionModel` at the airmass recomputed at the quadrant's
own centre (the field of view is 7 degrees, so corner quadrants differ from the boresight).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.time import Time
from astropy.wcs import WCS

from pipeline.core.config import SiteConfig
from pipeline.core.focalplane import scale_check_grid
from pipeline.core.refraction import RefractionModel, airmass_at

__all__ = ["ScaleCheck", "local_pixel_scale", "scale_check"]


def local_pixel_scale(wcs: WCS, x: np.ndarray, y: np.ndarray, step: float = 1.0) -> np.ndarray:
    """Linear pixel scale (arcsec/pixel, the square root of the pixel's sky area) at (x, y).

    Finite differences of the full WCS (distortion included) over ``step`` pixels; at one
    pixel the flat-sky approximation errs by far less than 1e-8 relative.
    """
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    ra, dec = wcs.all_pix2world(np.concatenate([x, x + step, x]), np.concatenate([y, y, y + step]), 1)
    ra, dec = ra.reshape(3, -1), dec.reshape(3, -1)
    cosd = np.cos(np.deg2rad(dec[0]))
    dra = ((ra[1:] - ra[0] + 180.0) % 360.0 - 180.0) * cosd
    ddec = dec[1:] - dec[0]
    area = np.abs(dra[0] * ddec[1] - dra[1] * ddec[0]) / step ** 2
    return np.sqrt(area) * 3600.0


@dataclass(frozen=True)
class ScaleCheck:
    """Result of :func:`scale_check`.

    ``diff_pct`` holds the percent difference of the linear pixel scale, solution vs prior,
    on the check grid; ``expected_pct`` the refraction model's change from the prior's
    airmass to the quadrant's.
    """

    diff_pct: np.ndarray
    mean_pct: float
    max_abs_pct: float
    airmass_quadrant: float
    altitude_deg: float
    prior_airmass: float
    expected_pct: float
    centre_scale_arcsec: float        # the solution's linear pixel scale at the quadrant centre
    usable: bool
    reason: str | None

    def summary(self) -> dict:
        return {"scale_diff_pct_mean": self.mean_pct, "scale_diff_pct_max": self.max_abs_pct,
                "airmass_quadrant": self.airmass_quadrant, "altitude_deg": self.altitude_deg,
                "prior_airmass": self.prior_airmass, "scale_change_expected_pct": self.expected_pct,
                "pixel_scale_arcsec": self.centre_scale_arcsec}


def scale_check(solution: WCS, prior: WCS, obstime: Time, site: SiteConfig, wavelength_um: float,
                prior_airmass: float, pressure_hpa: float | None = None,
                temperature_c: float | None = None, max_diff_pct: float = 1.0,
                shape: tuple[int, int] = (3080, 3072)) -> ScaleCheck:
    """Compare the pixel scale of a solution with its prior over the detector grid.

    Parameters
    ----------
    solution, prior : WCS
        The solved WCS and the prior it started from.
    obstime : Time
        Mid-exposure time, for the quadrant's own airmass.
    site : SiteConfig
        Location and default conditions.
    wavelength_um : float
        The filter's effective wavelength.
    prior_airmass : float
        The airmass the prior describes (its build's mean airmass; the image's own airmass
        when the prior is the image header's WCS).
    pressure_hpa, temperature_c : float, optional
        Conditions of the exposure (the header's), else the site's defaults.
    max_diff_pct : float
        The usability limit on ``|diff|`` anywhere on the grid (1 % by design).
    shape : (ny, nx)
        Image shape; the grid is the designed one clipped to the image.
    """
    gx, gy = scale_check_grid()
    inside = (gx <= shape[1]) & (gy <= shape[0])
    x, y = gx[inside], gy[inside]
    diff = 100.0 * (local_pixel_scale(solution, x, y) / local_pixel_scale(prior, x, y) - 1.0)
    cx, cy = 0.5 * (shape[1] + 1), 0.5 * (shape[0] + 1)
    centre_scale = float(local_pixel_scale(solution, np.array([cx]), np.array([cy]))[0])
    centre = solution.all_pix2world(cx, cy, 1)
    airmass, altitude, _ = airmass_at(centre[0], centre[1], obstime, site)
    model = RefractionModel(site.pressure_hpa if pressure_hpa is None else pressure_hpa,
                            site.temperature_c if temperature_c is None else temperature_c,
                            site.relative_humidity, wavelength_um)
    expected = float(model.scale_change_pct(float(airmass), prior_airmass))
    finite = np.isfinite(diff)
    max_abs = float(np.max(np.abs(diff[finite]))) if finite.any() else float("inf")
    reason = None
    if not finite.all():
        reason = "pixel scale undefined on part of the detector grid"
    elif max_abs > max_diff_pct:
        where = np.argmax(np.abs(diff))
        reason = (f"pixel scale differs from the prior by {diff[where]:+.2f} % at "
                  f"(x={x[where]:.0f}, y={y[where]:.0f}); limit {max_diff_pct} %")
    return ScaleCheck(diff_pct=diff, mean_pct=float(np.mean(diff[finite])) if finite.any() else float("nan"),
                      max_abs_pct=max_abs, airmass_quadrant=float(airmass), altitude_deg=float(altitude),
                      prior_airmass=float(prior_airmass), expected_pct=expected,
                      centre_scale_arcsec=centre_scale, usable=reason is None, reason=reason)
