"""The simulated telescope's true mapping from quadrant pixels to the sky.

The chain, followed physically for every quadrant of an exposure:

1. quadrant pixel -> global focal-plane pixel (:mod:`pipeline.core.focalplane`);
2. focal plane -> ideal angles about the optical axis (pixel scale, position angle);
3. the instrument's fixed optical distortion (radial ``k1 r^3 + k2 r^5`` plus a small
   decentering term), giving observed standard coordinates;
4. gnomonic deprojection about the observed boresight in the *observed* hour-angle /
   declination frame: the Oschin-like telescope is equatorially mounted, so the camera stays
   aligned with the apparent celestial pole;
5. astropy's refracting ``HADec`` frame (site pressure, temperature, humidity, the filter's
   wavelength) back to ICRS: this applies refraction, aberration and precession exactly.

The result is sampled on a grid and fitted with a TPV polynomial (degree 5; the fit error is
far below a milliarcsecond, checked by the tests), which is the exposure's *true WCS*: the
renderer places every star with it, so truth and images agree by construction.
"""
from __future__ import annotations

import numpy as np
import astropy.units as u
from astropy.coordinates import HADec, SkyCoord
from astropy.time import Time
from astropy.wcs import WCS

from pipeline.core.config import Config
from pipeline.core.focalplane import QuadrantGeometry, nominal_cd
from pipeline.core.refraction import site_location
from pipeline.formats.tpv import fit_tpv_wcs, sky_to_tangent, tangent_to_sky
from dataclasses import replace

from astropy.io import fits

from pipeline.simulate.exposure import ExposureSpec

__all__ = ["true_boresight", "optical_distortion", "pixels_to_sky", "true_quadrant_wcs",
           "true_quadrant_solution", "first_guess_header", "TRUE_WCS_DEGREE"]

TRUE_WCS_DEGREE = 5
_GRID = 13


def true_boresight(spec: ExposureSpec) -> tuple[float, float]:
    """ICRS (ra, dec) of the true optical axis: the commanded field centre plus the pointing error."""
    east, north = spec.pointing_offset_arcsec
    ra, dec = tangent_to_sky(east / 3600.0, north / 3600.0, spec.field_ra, spec.field_dec)
    return float(ra) % 360.0, float(dec)


def optical_distortion(u_deg: np.ndarray, v_deg: np.ndarray, cfg: Config):
    """Observed standard coordinates (deg) of ideal focal-plane angles (deg)."""
    sim = cfg.simulation
    r2 = u_deg ** 2 + v_deg ** 2
    radial = 1.0 + sim.distortion_k1 * r2 + sim.distortion_k2 * r2 ** 2
    # Decentering: a small tilt of the field flattener, quadratic and not symmetric.
    return (u_deg * radial + sim.distortion_tilt * u_deg * v_deg,
            v_deg * radial + sim.distortion_tilt * (u_deg ** 2 + 2 * v_deg ** 2))


def _observed_frame(spec: ExposureSpec, cfg: Config) -> HADec:
    band = cfg.instrument.filters[spec.filter]
    return HADec(obstime=Time(spec.obsmjd + 0.5 * spec.exptime / 86400.0, format="mjd", scale="utc"),
                 location=site_location(cfg.site), pressure=spec.pressure_hpa * u.hPa,
                 temperature=spec.temperature_c * u.deg_C,
                 relative_humidity=cfg.site.relative_humidity,
                 obswl=band.wavelength_um * u.micron)


def pixels_to_sky(spec: ExposureSpec, geom: QuadrantGeometry, x, y, cfg: Config):
    """Exact ICRS (ra, dec) in degrees of quadrant pixels (1-based) through the physical chain."""
    X, Y = geom.to_global(np.asarray(x, float), np.asarray(y, float))
    cd = nominal_cd(cfg.instrument, spec.position_angle_deg)
    u_ideal = cd[0, 0] * X + cd[0, 1] * Y
    v_ideal = cd[1, 0] * X + cd[1, 1] * Y
    xi, eta = optical_distortion(u_ideal, v_ideal, cfg)

    frame = _observed_frame(spec, cfg)
    ra_b, dec_b = true_boresight(spec)
    axis = SkyCoord(ra=ra_b * u.deg, dec=dec_b * u.deg, frame="icrs").transform_to(frame)
    # Longitude -HA grows east like RA, so the usual east-left tangent plane applies.
    lon, lat = tangent_to_sky(xi, eta, -axis.ha.to_value(u.deg), axis.dec.to_value(u.deg))
    observed = SkyCoord(ha=-lon * u.deg, dec=lat * u.deg, frame=frame)
    icrs = observed.transform_to("icrs")
    return icrs.ra.to_value(u.deg), icrs.dec.to_value(u.deg)


def true_quadrant_solution(spec: ExposureSpec, geom: QuadrantGeometry, cfg: Config):
    """The true TPV WCS of one quadrant of one exposure, with its header and fit residual.

    CRVAL is the true boresight, CRPIX the boresight's position in quadrant pixels and CD the
    nominal matrix; the PV terms (degree 5) carry distortion, refraction and the rotation
    between the apparent and ICRS frames.

    Returns
    -------
    wcs : WCS
        With ``pixel_shape`` set.
    header : Header
        The TPV header (astropy's own ``to_header`` would not write the PV terms back as TPV).
    residual_mas : ndarray
        Fit residual against the physical chain at the sampling grid.
    """
    # Sample slightly beyond the edges so the fit holds over every pixel.
    gx = np.linspace(-8.0, geom.nx + 9.0, _GRID)
    gy = np.linspace(-8.0, geom.ny + 9.0, _GRID)
    x, y = (a.ravel() for a in np.meshgrid(gx, gy))
    ra, dec = pixels_to_sky(spec, geom, x, y, cfg)
    return fit_tpv_wcs(x, y, ra, dec, true_boresight(spec), geom.boresight_pixel,
                       nominal_cd(cfg.instrument, spec.position_angle_deg),
                       degree=TRUE_WCS_DEGREE, shape=(geom.ny, geom.nx))


def true_quadrant_wcs(spec: ExposureSpec, geom: QuadrantGeometry, cfg: Config) -> WCS:
    """The true TPV WCS of one quadrant (see :func:`true_quadrant_solution`)."""
    return true_quadrant_solution(spec, geom, cfg)[0]


def first_guess_header(spec: ExposureSpec, geom: QuadrantGeometry, cfg: Config) -> fits.Header:
    """The header WCS a telescope model would write: linear TAN, off by the pointing error.

    It is the camera model at the *commanded* pointing (no pointing error), linearised at
    the quadrant centre: good to about an arcsecond inside the quadrant apart from the
    pointing error of ~20 arcsec, as the input contract allows.
    """
    commanded = replace(spec, pointing_offset_arcsec=(0.0, 0.0))
    gx, gy = np.meshgrid(np.linspace(1, geom.nx, 5), np.linspace(1, geom.ny, 5))
    x, y = gx.ravel(), gy.ravel()
    ra, dec = pixels_to_sky(commanded, geom, x, y, cfg)
    crpix = (0.5 * (geom.nx + 1), 0.5 * (geom.ny + 1))
    crval = pixels_to_sky(commanded, geom, np.array([crpix[0]]), np.array([crpix[1]]), cfg)
    crval = (float(crval[0][0]), float(crval[1][0]))
    xi, eta = sky_to_tangent(ra, dec, *crval)
    offsets = np.column_stack([x - crpix[0], y - crpix[1]])
    cd = np.linalg.lstsq(offsets, np.column_stack([xi, eta]), rcond=None)[0].T
    h = fits.Header()
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CUNIT1"], h["CUNIT2"] = "deg", "deg"
    h["RADESYS"] = "ICRS"
    h["CRVAL1"], h["CRVAL2"] = crval
    h["CRPIX1"], h["CRPIX2"] = crpix
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = cd[0, 0], cd[0, 1], cd[1, 0], cd[1, 1]
    return h
