"""Astrometric QA: how well a solved WCS puts the detections on Gaia.

Detections (windowed centroids with their SExtractor-style errors) are projected with the
solved WCS and matched one-to-one to the epoch-propagated Gaia catalogue.  The figures are
the ones ZTF's QA reports: matched count, RMS per axis (mas), chi2 of the residuals given
both error budgets, and the same for the high-S/N stars, whose residual should sit at the
centroid-noise floor.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import astropy.units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table
from astropy.wcs import WCS

__all__ = ["AstrometricQA", "match_to_reference", "astrometric_qa", "astrometric_outliers", "wcs_difference_mas"]


@dataclass(frozen=True)
class AstrometricQA:
    """Gaia-match statistics of one solution (angles in mas)."""

    n_detections: int
    n_matched: int
    n_used: int                       # matches in the RMS: S/N >= min_snr, outliers clipped
    rms_ra_mas: float
    rms_dec_mas: float
    chi2: float
    n_matched_highsn: int
    rms_ra_highsn_mas: float
    rms_dec_highsn_mas: float
    floor_highsn_mas: float           # expected per-axis scatter of the high-S/N matches
    median_offset_ra_mas: float
    median_offset_dec_mas: float
    max_cell_offset_mas: float        # largest mean residual over a 4 x 4 grid of cells
    max_cell_significance: float      # that cell's offset over its standard error

    def as_dict(self) -> dict:
        return asdict(self)


def match_to_reference(ra, dec, ref_ra, ref_dec, radius_arcsec: float):
    """One-to-one nearest matches within a radius.

    Returns
    -------
    det_index, ref_index : ndarray
        Matched pairs; when two detections claim one reference star, the nearer keeps it.
    """
    if len(ra) == 0 or len(ref_ra) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    det = SkyCoord(ra=np.asarray(ra) * u.deg, dec=np.asarray(dec) * u.deg)
    ref = SkyCoord(ra=np.asarray(ref_ra) * u.deg, dec=np.asarray(ref_dec) * u.deg)
    idx, sep, _ = det.match_to_catalog_sky(ref)
    ok = sep.to_value(u.arcsec) < radius_arcsec
    det_index, ref_index, sep_arcsec = np.nonzero(ok)[0], idx[ok], sep.to_value(u.arcsec)[ok]
    order = np.argsort(sep_arcsec)
    _, first = np.unique(ref_index[order], return_index=True)
    keep = order[first]
    return det_index[keep], ref_index[keep]


def astrometric_outliers(detections: Table, wcs: WCS, reference: Table, radius_arcsec: float = 1.5,
                         clip_sigma: float = 5.0) -> np.ndarray:
    """Indices of detections whose Gaia residual their errors cannot explain.

    The normalised residual of each match is compared with the bulk's (Rayleigh-distributed
    when the errors are right); beyond ``clip_sigma`` times that scale a detection is an
    outlier: an unresolved blend, a cosmic ray on a faint star, a wrong match.  Such a point
    with a small formal error can drag a polynomial solution by a hundred mas in a corner.
    """
    x = np.asarray(detections["XWIN_IMAGE"], float)
    if len(x) == 0 or len(reference) == 0:
        return np.zeros(0, int)
    ra, dec = wcs.all_pix2world(x, np.asarray(detections["YWIN_IMAGE"], float), 1)
    ref_ra, ref_dec = np.asarray(reference["X_WORLD"], float), np.asarray(reference["Y_WORLD"], float)
    di, ri = match_to_reference(ra, dec, ref_ra, ref_dec, radius_arcsec)
    if len(di) == 0:
        return di
    cosd = np.cos(np.deg2rad(ref_dec[ri]))
    offset = np.hypot(((ra[di] - ref_ra[ri] + 180.0) % 360.0 - 180.0) * cosd, dec[di] - ref_dec[ri]) * 3.6e6
    scale_mas = np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3.6e6
    sigma = np.hypot(np.asarray(detections["ERRAWIN_IMAGE"], float)[di] * scale_mas,
                     np.asarray(reference["ERRA_WORLD"], float)[ri] * 3.6e6)
    z = offset / np.maximum(sigma, 1e-3)
    bulk = max(np.median(z) / 1.1774, 1.0)
    return di[z > clip_sigma * bulk]


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(values ** 2))) if len(values) else float("nan")


def astrometric_qa(detections: Table, wcs: WCS, reference: Table, radius_arcsec: float = 1.5,
                   min_snr: float = 10.0, highsn: float = 100.0, clip_sigma: float = 5.0,
                   bad_flags: int = 0xFF) -> tuple[AstrometricQA, Table]:
    """Match detections to the reference with a solved WCS and summarise the residuals.

    Parameters
    ----------
    detections : Table
        XWIN_IMAGE, YWIN_IMAGE (1-based), ERRAWIN_IMAGE (px), FLUX_AUTO, FLUXERR_AUTO.
    wcs : WCS
        The solution.
    reference : Table
        X_WORLD, Y_WORLD, ERRA_WORLD (deg), as given to SCAMP (epoch-propagated Gaia).
    radius_arcsec : float
        Match radius.
    min_snr : float
        S/N (FLUX_AUTO / FLUXERR_AUTO) from which matches enter the RMS and chi2 (ZTF quotes
        its astrometric RMS for S/N >= 10); every match is counted in ``n_matched``.
    highsn : float
        S/N above which a match counts as high S/N.
    clip_sigma : float
        Matches beyond this many times the bulk's normalised scatter (blends, mismatches)
        are left out of the RMS and chi2 but counted as matched.
    bad_flags : int
        Detections with any of these FLAGS bits (saturated, blended, near a masked pixel,
        truncated, ...) are matched and counted but left out of the statistics: their
        centroids are not expected to reach the noise floor.

    Returns
    -------
    qa : AstrometricQA
    matches : Table
        One row per match: detection and reference index, offsets (mas), errors, S/N.
    """
    x = np.asarray(detections["XWIN_IMAGE"], float)
    y = np.asarray(detections["YWIN_IMAGE"], float)
    ra, dec = wcs.all_pix2world(x, y, 1) if len(x) else (np.zeros(0), np.zeros(0))
    ref_ra = np.asarray(reference["X_WORLD"], float)
    ref_dec = np.asarray(reference["Y_WORLD"], float)
    di, ri = match_to_reference(ra, dec, ref_ra, ref_dec, radius_arcsec)
    cosd = np.cos(np.deg2rad(ref_dec[ri]))
    dra = ((ra[di] - ref_ra[ri] + 180.0) % 360.0 - 180.0) * cosd * 3.6e6
    ddec = (dec[di] - ref_dec[ri]) * 3.6e6
    scale_mas = np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix))) * 3.6e6
    err_det = np.asarray(detections["ERRAWIN_IMAGE"], float)[di] * scale_mas
    err_ref = np.asarray(reference["ERRA_WORLD"], float)[ri] * 3.6e6
    sigma = np.hypot(err_det, err_ref)
    snr = (np.asarray(detections["FLUX_AUTO"], float) / np.asarray(detections["FLUXERR_AUTO"], float))[di]
    matches = Table({"det_index": di, "ref_index": ri, "dra_mas": dra, "ddec_mas": ddec,
                     "sigma_mas": sigma, "snr": snr, "x": x[di], "y": y[di]})

    # Clip outliers relative to the bulk of the normalised residuals (Rayleigh-distributed,
    # median 1.1774 when the errors are right), so that a solution that is bad everywhere
    # widens the clip instead of hiding behind it.
    z = np.hypot(dra, ddec) / np.maximum(sigma, 1e-3)
    bulk = np.median(z) / 1.1774 if len(z) else 1.0
    clean = (np.asarray(detections["FLAGS"], int)[di] & bad_flags) == 0 if "FLAGS" in detections.colnames \
        else np.ones(len(di), bool)
    good = (z < clip_sigma * max(bulk, 1.0)) & (snr >= min_snr) & clean
    high = good & (snr > highsn)
    qa = AstrometricQA(
        n_detections=len(x), n_matched=len(di), n_used=int(good.sum()),
        rms_ra_mas=_rms(dra[good]), rms_dec_mas=_rms(ddec[good]),
        chi2=float(np.mean((dra[good] ** 2 + ddec[good] ** 2) / (2 * sigma[good] ** 2))) if good.any() else float("nan"),
        n_matched_highsn=int(high.sum()),
        rms_ra_highsn_mas=_rms(dra[high]), rms_dec_highsn_mas=_rms(ddec[high]),
        floor_highsn_mas=_rms(sigma[high]) if high.any() else float("nan"),
        median_offset_ra_mas=float(np.median(dra)) if len(dra) else float("nan"),
        median_offset_dec_mas=float(np.median(ddec)) if len(ddec) else float("nan"),
        **_worst_cell(x[di][good], y[di][good], dra[good], ddec[good], wcs),
    )
    return qa, matches


def _worst_cell(x, y, dra, ddec, wcs: WCS, cells: int = 4, min_stars: int = 8) -> dict:
    """The cell (of a cells x cells grid) whose mean residual is most significant.

    A solution bent toward an outlier or running away in a corner keeps a small global RMS
    but leaves a coherent offset in one region; this is where it shows.
    """
    worst = {"max_cell_offset_mas": 0.0, "max_cell_significance": 0.0}
    if len(x) < min_stars:
        return worst
    nx, ny = wcs.pixel_shape if wcs.pixel_shape is not None else (np.max(x), np.max(y))
    ix = np.clip((np.asarray(x) - 0.5) * cells // nx, 0, cells - 1).astype(int)
    iy = np.clip((np.asarray(y) - 0.5) * cells // ny, 0, cells - 1).astype(int)
    for cell in np.unique(ix * cells + iy):
        sel = (ix * cells + iy) == cell
        if sel.sum() < min_stars:
            continue
        mean = np.hypot(np.mean(dra[sel]), np.mean(ddec[sel]))
        error = np.sqrt((np.var(dra[sel]) + np.var(ddec[sel])) / (2 * sel.sum()))
        significance = mean / max(error, 1e-6)
        if significance > worst["max_cell_significance"]:
            worst = {"max_cell_offset_mas": float(mean), "max_cell_significance": float(significance)}
    return worst


def wcs_difference_mas(wcs_a: WCS, wcs_b: WCS, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """On-sky distance (mas) between where two WCSs put the same pixels (1-based x, y)."""
    ra_a, dec_a = wcs_a.all_pix2world(x, y, 1)
    ra_b, dec_b = wcs_b.all_pix2world(x, y, 1)
    a = SkyCoord(ra=ra_a * u.deg, dec=dec_a * u.deg)
    b = SkyCoord(ra=ra_b * u.deg, dec=dec_b * u.deg)
    return a.separation(b).to_value(u.mas)
