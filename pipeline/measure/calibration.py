r"""Photometric calibration: the zero point of an image from Gaia-matched stars.

The band magnitude of a star is predicted from Gaia as ``G + c0 + clrcoeff * (BP - RP)``
(:class:`pipeline.core.config.FilterConfig`: ``color_offset`` c0, ``color_slope`` the expected
colour coefficient), and the calibrated magnitude of a source is ``m_inst + magzpsci``
with ``m_inst = -2.5 log10(flux / ADU)`` from PSF-fit photometry.  For each matched star

.. math:: y = G + c_0 - m_{\rm inst} = {\rm ZP} - {\rm clrcoeff}\,(BP - RP),

fitted by weighted least squares with iterative sigma clipping (variables, blends and
mismatches are the outliers).  ``magzpsciunc`` is the uncertainty of the fitted ZP
(scaled by the reduced chi^2 when above 1), ``magzpscirms`` the scatter of the kept
stars.  The colour coefficient is fitted when the stars' colours spread enough
(``min_colour_spread``), else fixed to the filter's ``color_slope``.  When the image
header carries ``MAGZP`` that zero point is used as given and only the colour term and
the scatter are fitted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

from pipeline.core.config import FilterConfig, PhotCalConfig

__all__ = ["PhotCalConfig", "PhotCalResult", "PhotCalError", "calibrate_zeropoint"]


class PhotCalError(ValueError):
    """Too few usable calibration stars, or inputs missing columns."""


@dataclass(frozen=True)
class PhotCalResult:
    """Zero point of one image (ZTF's names).

    Attributes
    ----------
    magzpsci, magzpsciunc, magzpscirms : float
        Zero point (mag giving 1 ADU at BP - RP = 0), its uncertainty and the rms of the
        calibration stars about the fit; ``magzpsciunc`` is NaN when taken from MAGZP.
    clrcoeff, clrcounc : float
        Colour coefficient on BP - RP and its uncertainty (NaN when fixed).
    n_matched, n_used : int
        Stars matched to Gaia and usable, and kept after clipping.
    zp_source : str
        ``"fit"`` or ``"header"``.
    colour_fitted : bool
    zpmed : float
        Median over the calibration stars kept of (catalogue magnitude - instrumental
        magnitude), no colour term (ZTF's ``zpmed``); NaN when taken from MAGZP.
    clrmed, clrrms : float
        Median and rms (about the mean) of the kept calibration stars' Gaia BP - RP (ZTF:
        PS1 g - r or r - i; here the colour the colour term is fitted on).
    zpclrcov : float
        Covariance of the fitted zero point and colour coefficient, mag^2 (NaN unless both
        are fitted).
    """

    magzpsci: float
    magzpsciunc: float
    magzpscirms: float
    clrcoeff: float
    clrcounc: float
    n_matched: int
    n_used: int
    zp_source: str
    colour_fitted: bool
    zpmed: float = math.nan
    clrmed: float = math.nan
    clrrms: float = math.nan
    zpclrcov: float = math.nan


def calibrate_zeropoint(photometry: Table, wcs, gaia: Table, band: FilterConfig,
                        header=None, config: PhotCalConfig = PhotCalConfig()) -> PhotCalResult:
    """Zero point and colour term of an image from its PSF photometry and Gaia.

    Parameters
    ----------
    photometry : Table
        :func:`pipeline.measure.photometry.psf_photometry` output (x, y 1-based, flux, fluxerr,
        flags) of the image's sources.
    wcs : astropy.wcs.WCS
        The image's solved WCS.
    gaia : Table
        Gaia columns ra, dec (at the image epoch, see :func:`catalogs.propagate_to_epoch`),
        phot_g_mean_mag, phot_bp_mean_mag, phot_rp_mean_mag.
    band : FilterConfig
        The image's filter (``color_offset``, ``color_slope``).
    header : mapping, optional
        Image header; a ``MAGZP`` keyword fixes the zero point.
    config : PhotCalConfig

    Returns
    -------
    PhotCalResult

    Raises
    ------
    PhotCalError
        Missing columns or fewer than ``config.min_stars`` usable stars.
    """
    for name in ("x", "y", "flux", "fluxerr", "flags"):
        if name not in photometry.colnames:
            raise PhotCalError(f"photometry table lacks column {name}")
    for name in ("ra", "dec", "phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag"):
        if name not in gaia.colnames:
            raise PhotCalError(f"Gaia table lacks column {name}")
    flux = np.asarray(photometry["flux"], dtype=np.float64)
    fluxerr = np.asarray(photometry["fluxerr"], dtype=np.float64)
    good = (np.asarray(photometry["flags"]) == 0) & (flux > 0) & np.isfinite(fluxerr)
    good &= flux >= config.min_snr * fluxerr
    mag_err = 2.5 / math.log(10) * fluxerr / np.where(flux > 0, flux, 1.0)
    good &= mag_err <= config.max_mag_error
    rows = np.flatnonzero(good)
    if rows.size == 0:
        raise PhotCalError("no unflagged source with enough S/N for the zero point")
    ra, dec = wcs.all_pix2world(np.asarray(photometry["x"])[rows], np.asarray(photometry["y"])[rows], 1)
    sources = SkyCoord(ra * u.deg, dec * u.deg)
    g_ra, g_dec = (np.asarray(gaia[c], dtype=np.float64) for c in ("ra", "dec"))
    # Only the Gaia stars near the sources: a field's catalogue is 100 times larger.
    centre = SkyCoord(np.median(ra) * u.deg, np.median(dec) * u.deg)
    radius = centre.separation(sources).max() + 2 * config.isolation_arcsec * u.arcsec
    near = np.flatnonzero(centre.separation(SkyCoord(g_ra * u.deg, g_dec * u.deg)) <= radius)
    if near.size == 0:
        raise PhotCalError("no Gaia star within the image's footprint")
    gaia = gaia[near]
    stars = SkyCoord(g_ra[near] * u.deg, g_dec[near] * u.deg)
    index, sep, _ = sources.match_to_catalog_sky(stars)
    matched = sep.arcsec <= config.match_radius_arcsec
    # Gaia stars with a close Gaia neighbour are blends in a ZTF-like PSF.
    _, neighbour_sep, _ = stars.match_to_catalog_sky(stars, nthneighbor=2)
    g = np.asarray(gaia["phot_g_mean_mag"], dtype=np.float64)[index]
    colour = (np.asarray(gaia["phot_bp_mean_mag"], dtype=np.float64)
              - np.asarray(gaia["phot_rp_mean_mag"], dtype=np.float64))[index]
    usable = (matched & (neighbour_sep.arcsec[index] > config.isolation_arcsec) & np.isfinite(g)
              & np.isfinite(colour) & (colour >= config.colour_range[0]) & (colour <= config.colour_range[1]))
    # One source per Gaia star (the closer one).
    order = np.argsort(sep.arcsec)
    first = np.zeros(rows.size, bool)
    _, unique_at = np.unique(index[order], return_index=True)
    first[order[unique_at]] = True
    usable &= first
    n_matched = int(np.count_nonzero(matched & first))
    if usable.sum() < config.min_stars:
        raise PhotCalError(f"only {int(usable.sum())} isolated Gaia-matched stars with S/N >= "
                           f"{config.min_snr}; the zero point needs {config.min_stars}")
    m_inst = -2.5 * np.log10(flux[rows][usable])
    target = g[usable] + band.color_offset - m_inst
    colour = colour[usable]
    sigma = np.hypot(mag_err[rows][usable], config.error_floor_mag)
    header_zp = None if header is None or "MAGZP" not in header else float(header["MAGZP"])
    fit_colour = (usable.sum() >= config.min_stars_colour and np.std(colour) >= config.min_colour_spread)
    return _fit(target, colour, sigma, band, header_zp, fit_colour, n_matched, config)


def _fit(target, colour, sigma, band: FilterConfig, header_zp, fit_colour: bool, n_matched: int,
         config: PhotCalConfig) -> PhotCalResult:
    """Iteratively clipped weighted least squares of ``target = ZP - clrcoeff * colour``."""
    keep = np.ones(target.size, bool)
    for _ in range(config.max_iterations):
        columns = ([] if header_zp is not None else [np.ones(target.size)]) + ([-colour] if fit_colour else [])
        fixed = (header_zp if header_zp is not None else 0.0) - (0.0 if fit_colour else band.color_slope * colour)
        y = target - fixed
        if columns:
            design = np.column_stack(columns)
            w = 1.0 / sigma[keep] ** 2
            normal = design[keep].T @ (design[keep] * w[:, None])
            params = np.linalg.solve(normal, design[keep].T @ (y[keep] * w))
            model = design @ params
        else:
            params, normal, model = np.zeros(0), np.zeros((0, 0)), np.zeros(target.size)
        resid = y - model
        scale = 1.4826 * np.median(np.abs(resid[keep] - np.median(resid[keep])))
        new_keep = np.abs(resid) <= config.clip_sigma * np.hypot(scale, sigma)
        if new_keep.sum() < config.min_stars:
            raise PhotCalError(f"sigma clipping left {int(new_keep.sum())} stars; "
                               f"the zero point needs {config.min_stars}")
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    n_used = int(keep.sum())
    dof = max(n_used - len(params), 1)
    chi2 = float(np.sum(resid[keep] ** 2 / sigma[keep] ** 2) / dof)
    cov = np.linalg.inv(normal) * max(chi2, 1.0) if len(params) else np.zeros((0, 0))
    rms = float(np.sqrt(np.sum(resid[keep] ** 2) / dof))
    if header_zp is None:
        zp, zp_unc = float(params[0]), float(math.sqrt(cov[0, 0]))
    else:
        zp, zp_unc = header_zp, math.nan
    if fit_colour:
        clrcoeff, clrcounc = float(params[-1]), float(math.sqrt(cov[-1, -1]))
    else:
        clrcoeff, clrcounc = float(band.color_slope), math.nan
    kept_colour = colour[keep]
    both = header_zp is None and fit_colour
    return PhotCalResult(zp, zp_unc, rms, clrcoeff, clrcounc, n_matched, n_used,
                         "fit" if header_zp is None else "header", bool(fit_colour),
                         zpmed=float(np.median(target[keep])) if header_zp is None else math.nan,
                         clrmed=float(np.median(kept_colour)), clrrms=float(np.std(kept_colour)),
                         zpclrcov=float(cov[0, -1]) if both else math.nan)
