"""Solved pixel scale against airmass over many images, with annual aberration taken out.

A solved WCS maps pixels to catalogue (Gaia, barycentric) directions, but the telescope sees
the apparent sky, displaced by aberration towards the observer's direction of motion.
To first order in beta = v/c, aberration shrinks every small angle around a direction n by
the factor (1 - beta . n) (Lorentz: d(theta')/d(theta) = sqrt(1 - beta^2) / (1 + beta cos
theta)), so the same optics give a catalogue-frame pixel scale larger by (1 + beta . n).  The
Earth's barycentric velocity (about 30 km/s, beta ~ 1e-4) points to different parts of the
sky through the year, so images of one field taken months apart differ in solved scale by up
to about 2e-4 (0.02 %) at equal airmass: that is what set the demo's earlier season above
the refraction model.  :func:`aberration_beta_n` computes beta . n from astropy's Earth
ephemeris (``get_body_barycentric_posvel``, the builtin ERFA one: no download) plus the
site's diurnal velocity (``EarthLocation.get_gcrs_posvel``, ~1e-6), and
:func:`scale_airmass_table` divides it out before comparing scales.

Each image's scale change is taken against the lowest-airmass image of the same quadrant
and filter and then referred to airmass 1 with the refraction model
(:class:`pipeline.core.refraction.RefractionModel`), so every image sits on one model curve
per filter.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
from astropy.table import Table

from pipeline.core.exits import BadInputError

__all__ = ["ScaleMeasurement", "aberration_beta_n", "measure_solved_image", "refraction_models",
           "scale_airmass_study", "scale_airmass_table"]

_SPEED_OF_LIGHT_KM_S = 299792.458


def aberration_beta_n(ra_deg: float, dec_deg: float, time, location) -> float:
    """beta . n: the observer's barycentric velocity over c, projected on the direction (ra, dec).

    The Earth's barycentric velocity (astropy's builtin ephemeris) plus the site's velocity
    about the geocentre (GCRS). The catalogue-frame pixel scale is the optical one times
    (1 + beta . n).
    """
    import astropy.units as u
    from astropy.coordinates import get_body_barycentric_posvel

    _, earth = get_body_barycentric_posvel("earth", time)
    _, site = location.get_gcrs_posvel(time)
    velocity = earth.xyz.to_value(u.km / u.s) + site.xyz.to_value(u.km / u.s)
    ra, dec = np.deg2rad(ra_deg), np.deg2rad(dec_deg)
    direction = np.array([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])
    return float(velocity @ direction / _SPEED_OF_LIGHT_KM_S)


@dataclass(frozen=True)
class ScaleMeasurement:
    """One solved image's pixel scale at its centre and the circumstances that change it."""

    path: str
    expid: int
    rcid: int
    filter: str
    mjd: float                 # mid-exposure, UTC
    airmass: float             # recomputed at the image centre
    scale_arcsec: float        # solved (catalogue-frame) linear pixel scale at the centre
    beta_n: float              # aberration: the scale is the optical one times (1 + beta_n)
    usable: bool               # the astrometry verdict (ASTRUSE; True when absent)


def measure_solved_image(path: str | os.PathLike, site) -> ScaleMeasurement:
    """Measure one solved quadrant image (any image with the input contract's keywords and a WCS).

    Raises
    ------
    BadInputError
        The file is missing or unreadable, breaks the keyword contract, has no celestial WCS
        or was taken with its centre below the horizon (named).
    """
    from astropy.io import fits

    from pipeline.astrometry.scale_check import local_pixel_scale
    from pipeline.core.image import ImageContractError, _pick_image_hdu, header_wcs, validate_header
    from pipeline.core.refraction import airmass_at, site_location

    try:
        with fits.open(path, memmap=False) as hdul:
            hdu = _pick_image_hdu(hdul, None, str(path))
            header = hdu.header.copy()
            if "EXPID" not in header and "EXPID" in hdul[0].header:
                header.update({k: v for k, v in hdul[0].header.items() if k not in header})
            shape = hdu.data.shape
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except ImageContractError as exc:
        raise BadInputError(str(exc)) from None
    except (OSError, ValueError, IndexError) as exc:
        raise BadInputError(f"{path}: not a readable FITS image ({exc})") from None
    try:
        meta = validate_header(header, path)
    except ImageContractError as exc:
        raise BadInputError(str(exc)) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wcs = header_wcs(header)
    if wcs is None:
        raise BadInputError(f"{path}: no celestial WCS (solve it first: skydiff astrometry)")
    cx, cy = 0.5 * (shape[1] + 1), 0.5 * (shape[0] + 1)
    scale = float(local_pixel_scale(wcs, np.array([cx]), np.array([cy]))[0])
    ra, dec = (float(v) for v in wcs.all_pix2world(cx, cy, 1))
    time = meta.obstime
    try:
        airmass, _, _ = airmass_at(ra, dec, time, site)
    except ValueError as exc:
        raise BadInputError(f"{path}: {exc}") from None
    if not np.isfinite(scale) or scale <= 0:
        raise BadInputError(f"{path}: the WCS gives no pixel scale at the image centre")
    return ScaleMeasurement(str(path), meta.expid, meta.rcid, meta.filter, float(time.mjd), float(airmass),
                            scale, aberration_beta_n(ra, dec, time, site_location(site)),
                            bool(header.get("ASTRUSE", True)))


def scale_airmass_table(measurements, models) -> Table:
    """Every usable image's scale change referred to airmass 1, as solved and with aberration out.

    Parameters
    ----------
    measurements : iterable of ScaleMeasurement
    models : mapping of filter name to RefractionModel

    Returns
    -------
    Table
        One row per usable image: ``expid``, ``rcid``, ``filter``, ``mjd``, ``airmass``,
        ``base_airmass`` (the lowest airmass of its quadrant and filter), ``beta_n``,
        ``scale_pct`` (as solved) and ``scale_pct_corrected`` (aberration divided out), both
        the percent change from airmass 1, ``model_pct`` (the refraction model there) and
        ``residual_pct`` (corrected minus model).
    """
    rows = [m for m in measurements if m.usable]
    columns = {name: [] for name in ("expid", "rcid", "filter", "mjd", "airmass", "base_airmass", "beta_n",
                                     "scale_pct", "scale_pct_corrected", "model_pct", "residual_pct")}
    for key in sorted({(m.rcid, m.filter) for m in rows}):
        group = [m for m in rows if (m.rcid, m.filter) == key]
        base = min(group, key=lambda m: m.airmass)
        model = models[key[1]]
        # The base's own scale change from airmass 1, by the model: refers the group to airmass 1.
        base_factor = 1.0 + float(model.scale_change_pct(base.airmass, 1.0)) / 100.0
        for m in sorted(group, key=lambda m: m.mjd):
            raw = m.scale_arcsec / base.scale_arcsec
            corrected = raw * (1.0 + base.beta_n) / (1.0 + m.beta_n)
            values = {"expid": m.expid, "rcid": m.rcid, "filter": m.filter, "mjd": m.mjd, "airmass": m.airmass,
                      "base_airmass": base.airmass, "beta_n": m.beta_n,
                      "scale_pct": 100.0 * (raw * base_factor - 1.0),
                      "scale_pct_corrected": 100.0 * (corrected * base_factor - 1.0),
                      "model_pct": float(model.scale_change_pct(m.airmass, 1.0))}
            values["residual_pct"] = values["scale_pct_corrected"] - values["model_pct"]
            for name, value in values.items():
                columns[name].append(value)
    table = Table({name: np.asarray(values) if values else np.zeros(0) for name, values in columns.items()})
    return table


def refraction_models(cfg, filters) -> dict:
    """The refraction model of each filter, at the site's typical conditions."""
    from pipeline.core.refraction import RefractionModel
    return {name: RefractionModel(cfg.site.pressure_hpa, cfg.site.temperature_c, cfg.site.relative_humidity,
                                  cfg.instrument.filters[name].wavelength_um) for name in sorted(set(filters))}


def scale_airmass_study(paths, cfg) -> tuple[Table, dict, list[ScaleMeasurement]]:
    """Measure solved images and compare their scales with the refraction model.

    Returns the :func:`scale_airmass_table`, the models per filter and the measurements.

    Raises
    ------
    BadInputError
        An image that cannot be measured (named), or no usable image at all.
    """
    measurements = [measure_solved_image(path, cfg.site) for path in paths]
    if not measurements:
        raise BadInputError("no solved image given")
    if not any(m.usable for m in measurements):
        raise BadInputError(f"no usable solved image among {len(measurements)} (ASTRUSE = F on every one)")
    unknown = sorted({m.filter for m in measurements} - set(cfg.instrument.filters))
    if unknown:
        raise BadInputError(f"filter {unknown[0]} of {next(m.path for m in measurements if m.filter == unknown[0])} "
                            "is not in instrument.filters")
    models = refraction_models(cfg, [m.filter for m in measurements if m.usable])
    return scale_airmass_table(measurements, models), models, measurements
