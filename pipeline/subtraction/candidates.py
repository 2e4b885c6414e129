r"""Transient candidates on the ZOGY corrected score, with the features ZTF publishes.

:func:`find_candidates` finds the peaks of ``|Scorr|`` above a threshold in a
:class:`~pipeline.subtraction.zogy.ZogyResult` and measures each of them on D, S and alpha; the
result is one astropy Table row per candidate with the ZTF alert schema's names and
meanings (``candidate`` record of v4.02), ready for :mod:`alerts.packet`.
:func:`cutout_stamps` cuts the 63 x 63 stamps the alerts carry, :func:`diffmaglim` the
image's limiting magnitude.

Conventions
-----------
- ``xpos``/``ypos`` are 1-based FITS pixel coordinates (as ZTF's); internally and in
  :class:`~pipeline.subtraction.zogy.ZogyResult`, (x, y) are 0-based column/row indices.  The image
  edge is at 0-based -0.5 and n - 0.5 (``mindtoedge`` measures to it).
- Negative candidates (a source fading: ``isdiffpos`` False) are measured on the
  sign-flipped images, so ``flux``, ``magpsf``, ``magap``, ``nneg``, ``sumrat`` and the
  shape mean for them what they mean for a positive candidate.
- Fluxes are in the common photometric system of ``zp_common``
  (:func:`pipeline.subtraction.zogy.flux_scale_from_zeropoint`): ``mag = zp_common - 2.5 log10 flux``.

The features
------------
- Peaks: local maxima of ``sign * Scorr`` over the 3 x 3 neighbourhood with
  ``|Scorr| >= threshold``, not on ``zogy.flagged`` pixels; of two same-sign peaks closer
  than ``min_separation_px`` the lower is dropped (a peak is kept when it is the highest
  of its sign within that radius).  ``scorr`` is the maximum of a quadratic surface
  least-squares fitted to the 3 x 3 values of Scorr (smooth: filtered by both PSFs).
  The position is where sign * S peaks (S, the matched filter of D with P_D, is maximal
  at the source's most likely position), climbed to from the Scorr peak pixel within
  ``position_max_shift_px`` and refined by the same quadratic fit on S; Scorr's own peak
  is pushed off the source where the variance changes across it (away from a bright
  neighbour's source noise, or to the edge of a flagged region, where Scorr is 0).  A
  climb that stops at the limit keeps Scorr's peak; two peaks climbing to one S peak are
  one candidate.  Every feature below is measured at that position.
- ``flux``/``magpsf``: the amplitude of P_D (Fourier-shifted to the sub-pixel position)
  fitted to D, divided by the tile's F_D: ZOGY's optimal PSF flux (eqs. 41-42) at the
  position itself (interpolating alpha = S / F_S between pixels loses a sharp source's
  peak); ``fluxerr``/``sigmapsf`` from alpha_std there (background, source and
  registration noise), divided by the square root of the share of P_D's sum of squares
  on the pixels the fit used (it leaves out ``zogy.flagged`` pixels).
- ``magap``: sum of D within ``aperture_radius_px`` (sep, exact overlap) divided by the
  tile's F_D and by the encircled energy of its P_D in that radius.  Its error is D's
  unit background variance times the aperture area, scaled by ``V / F_S`` at the
  position (the share of source and registration noise in the PSF flux's variance,
  taken to be the same in the aperture).  A non-positive aperture flux (a dipole's
  lobes, a noise peak) gives ``magap = sigmagap = 99``, SExtractor's convention (ZTF's
  magap is SExtractor's MAG_APER), and the ``APERTURE_NONPOSITIVE`` flag; ``magdiff`` is
  then ``99 - magpsf``.  ``magapbig``/``sigmagapbig`` are the same in
  ``aperture_big_radius_px`` (ZTF: 18 px diameter), 99 likewise.
- Shape (``aimage``, ``bimage``, ``fwhm``, ``elong``): Gaussian-windowed second moments
  of sign * D about their windowed centroid, window sigma = P_D's (FWHM / 2.3548),
  with the window divided out (for a Gaussian profile of covariance C the windowed
  moments are ``(C^-1 + W^-1)^-1``, so ``C = (M^-1 - W^-1)^-1`` is exact, not a
  SExtractor-like fixed factor).  ``aimage``/``bimage`` are the rms along the major and
  minor axes, ``fwhm = 2.3548 sqrt(aimage bimage)`` (Gaussian core), ``elong = a / b``.
  A profile with no extent along its minor axis (a single hot pixel, a cosmic-ray
  track: b = 0) gets SExtractor's rule for "infinitely thin" detections, 1/12 px^2
  added to both axes' variances, and the ``THIN`` flag.  No positive windowed flux, or
  moments as broad as the window (noise), give the local P_D's shape (``aimage =
  bimage`` = its sigma, ``fwhm`` its FWHM, ``elong = 1``) and the ``NO_SHAPE`` flag.
  ``seeratio`` is P_D's FWHM over ``fwhm`` (ZTF: the difference image's FWHM over the
  candidate's).
- ``chipsf``: reduced chi^2 of a one-amplitude fit of P_D (shifted to the position in
  Fourier space) to D within ``2 FWHM`` of P_D, with D's unit background variance:
  a bright source's own photon noise raises it above 1.  ``sharpnessdiff`` is
  photometry.py's sharpness on D: ``2 b / (a sigma^2)`` with b from the fit
  ``a' P_D + b lap(P_D)`` and a the one-component amplitude (a' changes sign for a
  profile far narrower than P_D), the fractional change of the profile's sigma^2
  against P_D's: about 0 for a point source, negative for cosmic rays and hot pixels.
- Box (``box`` x ``box`` pixels around the brightest pixel of sign * D within 1 px of
  the Scorr peak pixel): ``nneg`` counts sign * D < 0,
  ``nbad`` pixels with a nonzero ``mask``; ``sumrat`` is sum / sum|.| of sign * D after a
  3 x 3 median filter (as ZTF, against single outliers).
- ``distnr`` (pixels, as the schema says), ``magnr``, ``sigmagnr``, ``sharpnr``,
  ``chinr``, ``ranr``, ``decnr``: the nearest reference-catalogue source within
  ``nearest_radius_arcsec`` on the sky; -999 in all of them when there is none (ZTF's
  convention, as in real packets), NaN when no catalogue was given.  A nearest source
  without a PSF fit (saturated) gets a magnitude bound in
  :func:`bound_saturated_neighbours`.
- ``sky``: median of sign * D in the annulus ``sky_annulus_px`` divided by F_D: the local
  background level of the difference image per pixel, in ADU of the common system
  (0 where the subtraction is clean).
- ``dsnrms``/``ssnrms``: sign * D and sign * S at the peak pixel over their robust
  (1.4826 MAD) standard deviation over the image; ``dsdiff = dsnrms - ssnrms``.
- ``tblid``: the candidate's index in the table (ZTF: its row in the extraction table).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Mapping

import numpy as np
from astropy import units as u
from astropy.table import Table
from scipy.spatial import cKDTree

from pipeline.subtraction.features import (_FWHM_PER_SIGMA, _REFERENCE_COLUMNS, MAG_NONPOSITIVE, NO_COUNTERPART,
                                 CandidateError, _aperture, _box_features, _encircled, _gather_stamps, _local_sky,
                                 _nearest_reference, _per_candidate, _psf_fit, _robust_std, _shape,
                                 _tile_index, _tile_optics)
from pipeline.core.config import CandidateConfig
from pipeline.core.image import MASK_BITS
from pipeline.measure.photometry import flux_to_mag
from pipeline.subtraction.zogy import ZogyResult, measure_flux

__all__ = ["CANDIDATE_FLAGS", "CandidateConfig", "CandidateError", "find_candidates",
           "bound_saturated_neighbours", "cutout_stamps", "diffmaglim"]

log = logging.getLogger("skydiff.candidates")

#: Bits of the ``flagged`` column.
CANDIDATE_FLAGS = {
    "MASKED": 1,        # a pixel of the box has a mask bit other than SATURATED/BLEED
    "SATURATED": 2,     # a pixel of the box is SATURATED or BLEED in the mask
    "NEAR_FLAGGED": 4,  # a zogy.flagged pixel within the aperture (D, S unreliable there)
    "EDGE": 8,          # the aperture runs off the image
    "NO_SHAPE": 16,     # no positive profile, or one as broad as the window: shape is the local P_D's
    "THIN": 32,         # no extent along the minor axis (narrower than a pixel): SExtractor's 1/12 px^2 added
    "APERTURE_NONPOSITIVE": 64,  # aperture flux <= 0 on sign * D: magap, sigmagap = 99 (SExtractor's)
    "NR_UNFIT": 128,    # the nearest reference source has no PSF fit (saturated): magnr is its saturation bound
}

_SATURATION_BITS = MASK_BITS["SATURATED"] | MASK_BITS["BLEED"]
# Design matrix of a quadratic surface on the 3 x 3 grid: 1, x, y, x^2, x y, y^2.
_GRID_Y, _GRID_X = (g.ravel() for g in np.mgrid[-1:2, -1:2])
_QUADRATIC_PINV = np.linalg.pinv(np.stack([np.ones(9), _GRID_X, _GRID_Y, _GRID_X**2,
                                           _GRID_X * _GRID_Y, _GRID_Y**2], axis=1))


_COLUMNS = {
    "cand_index": (np.int64, None), "xpos": (np.float64, u.pix), "ypos": (np.float64, u.pix),
    "ra": (np.float64, u.deg), "dec": (np.float64, u.deg), "isdiffpos": (bool, None),
    "scorr": (np.float64, None), "magpsf": (np.float64, u.mag), "sigmapsf": (np.float64, u.mag),
    "flux": (np.float64, None), "fluxerr": (np.float64, None), "magap": (np.float64, u.mag),
    "sigmagap": (np.float64, u.mag), "magapbig": (np.float64, u.mag), "sigmagapbig": (np.float64, u.mag),
    "magdiff": (np.float64, u.mag), "sky": (np.float64, None), "dsnrms": (np.float64, None),
    "ssnrms": (np.float64, None), "dsdiff": (np.float64, None), "seeratio": (np.float64, None),
    "tblid": (np.int64, None),
    "fwhm": (np.float64, u.pix), "elong": (np.float64, None), "aimage": (np.float64, u.pix),
    "bimage": (np.float64, u.pix), "nneg": (np.int32, None), "nbad": (np.int32, None),
    "sumrat": (np.float64, None), "mindtoedge": (np.float64, u.pix),
    "chipsf": (np.float64, None), "sharpnessdiff": (np.float64, None),
    "distnr": (np.float64, u.pix), "magnr": (np.float64, u.mag),
    "sigmagnr": (np.float64, u.mag), "sharpnr": (np.float64, None),
    "chinr": (np.float64, None), "ranr": (np.float64, u.deg), "decnr": (np.float64, u.deg),
    "flagged": (np.int32, None),
}


def _check_inputs(zogy: ZogyResult, zp_common: float, mask) -> np.ndarray | None:
    shape = np.shape(zogy.scorr)
    if len(shape) != 2 or 0 in shape:
        raise CandidateError(f"ZogyResult.scorr must be a non-empty 2-D image, got shape {shape}")
    for name in ("diff", "alpha", "alpha_std", "flagged"):
        if np.shape(getattr(zogy, name)) != shape:
            raise CandidateError(f"ZogyResult.{name} shape {np.shape(getattr(zogy, name))} "
                                 f"!= scorr shape {shape}")
    if not zogy.tiles:
        raise CandidateError("ZogyResult has no tiles (no P_D, F_D)")
    if not math.isfinite(zp_common):
        raise CandidateError(f"zp_common must be finite, got {zp_common}")
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise CandidateError(f"mask shape {mask.shape} != image shape {shape}")
    if mask.dtype.kind not in "iub":
        raise CandidateError(f"mask must be an integer bit mask, got dtype {mask.dtype}")
    return mask


def _local_peaks(scorr: np.ndarray, flagged: np.ndarray, threshold: float, margin: int):
    """Pixels (row, col) that are 3 x 3 maxima of sign * Scorr with |Scorr| >= threshold."""
    ny, nx = scorr.shape
    if ny <= 2 * margin or nx <= 2 * margin:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    inner = scorr[margin:ny - margin, margin:nx - margin]
    # Scanning the image once for the (few) hot pixels and testing only those is ~20x
    # cheaper than a maximum filter over the whole quadrant.
    hot = np.flatnonzero((inner >= threshold) | (inner <= -threshold))
    row, col = np.divmod(hot, inner.shape[1])
    row += margin
    col += margin
    value = scorr[row, col]
    sign = np.where(value > 0, 1.0, -1.0).astype(scorr.dtype)
    strength = value * sign
    is_peak = ~flagged[row, col]
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                is_peak &= strength >= sign * scorr[row + dy, col + dx]
    return row[is_peak], col[is_peak]


def _separate(row, col, strength, positive, min_separation: float) -> np.ndarray:
    """Indices of the peaks that are the highest of their sign within ``min_separation``,
    strongest first (ties: lower pixel index first)."""
    order = np.lexsort((row * (col.max(initial=0) + 1) + col, -strength))
    if min_separation <= 0 or len(row) < 2:
        return order
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    points = np.column_stack([col, row]).astype(np.float64)
    pairs = cKDTree(points).query_pairs(min_separation, output_type="ndarray")
    if len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        close = (np.hypot(*(points[i] - points[j]).T) < min_separation) & (positive[i] == positive[j])
        loser = np.where(rank[i] > rank[j], i, j)[close]
        keep = np.ones(len(row), dtype=bool)
        keep[loser] = False
        order = order[keep[order]]
    return order


def _subpixel_peak(scorr: np.ndarray, row, col, sign):
    """Maximum of the quadratic surface fitted to sign * Scorr over the 3 x 3 around each
    peak pixel: (x, y) 0-based and the signed Scorr value there."""
    values, _ = _gather_stamps(scorr, row, col, 1, 0.0)
    coef = (values.reshape(len(row), 9).astype(np.float64) * sign[:, None]) @ _QUADRATIC_PINV.T
    a, bx, by, cxx, cxy, cyy = coef.T
    det = 4 * cxx * cyy - cxy**2
    ok = (det > 0) & (cxx < 0)
    safe = np.where(ok, det, 1.0)
    dx = np.where(ok, (cxy * by - 2 * cyy * bx) / safe, 0.0)
    dy = np.where(ok, (cxy * bx - 2 * cxx * by) / safe, 0.0)
    # A peak pixel is the 3 x 3 maximum, so the true maximum lies within about half a pixel.
    dx, dy = np.clip(dx, -0.75, 0.75), np.clip(dy, -0.75, 0.75)
    peak = a + bx * dx + by * dy + cxx * dx**2 + cxy * dx * dy + cyy * dy**2
    return col + dx, row + dy, sign * np.maximum(peak, values[:, 1, 1] * sign)


def _score_peak(score: np.ndarray, row, col, sign, max_shift: int, margin: int):
    """The pixel where sign * S peaks, climbed to from each Scorr peak pixel (one step to the
    highest of the 3 x 3 neighbours at a time, at most ``max_shift`` pixels per axis, not
    closer than ``margin`` to the image edge).

    S is the matched filter of D with P_D: its maximum is the source's most likely
    position whatever the variance around it, which moves Scorr's peak (a bright
    neighbour's source noise pushes it away; a flagged region, where Scorr is 0, holds
    it at its edge).  Returns (row, col) and whether the climb ended on a local maximum
    of S (where it did not, the position stays at Scorr's peak).
    """
    ny, nx = score.shape
    r0 = np.asarray(row, dtype=np.int64)
    c0 = np.asarray(col, dtype=np.int64)
    r, c = r0.copy(), c0.copy()
    moving = np.ones(len(r), dtype=bool)
    for _ in range(2 * max_shift + 1):
        if not moving.any():
            break
        idx = np.flatnonzero(moving)
        values, _ = _gather_stamps(score, r[idx], c[idx], 1, np.nan)
        values = values.reshape(len(idx), 9).astype(np.float64) * sign[idx, None]
        best = np.argmax(np.nan_to_num(values, nan=-np.inf), axis=1)
        nr, nc = r[idx] + best // 3 - 1, c[idx] + best % 3 - 1
        allowed = ((np.abs(nr - r0[idx]) <= max_shift) & (np.abs(nc - c0[idx]) <= max_shift)
                   & (nr >= margin) & (nr < ny - margin) & (nc >= margin) & (nc < nx - margin))
        stop = (best == 4) | ~allowed
        moving[idx[stop]] = False
        go = idx[~stop]
        r[go], c[go] = nr[~stop], nc[~stop]
    converged = ~moving
    # A climb stopped by the shift limit or the edge did not reach S's maximum: Scorr's peak.
    values, _ = _gather_stamps(score, r, c, 1, np.nan)
    values = values.reshape(len(r), 9) * sign[:, None]
    converged &= np.nan_to_num(values, nan=-np.inf).argmax(axis=1) == 4
    return np.where(converged, r, r0), np.where(converged, c, c0), converged


def _empty_table() -> Table:
    table = Table({name: np.empty(0, dtype=dtype) for name, (dtype, _) in _COLUMNS.items()})
    for name, (_, unit) in _COLUMNS.items():
        table[name].unit = unit
    return table


def find_candidates(zogy: ZogyResult, wcs, zp_common: float, mask: np.ndarray | None = None,
                    reference_catalog: Table | None = None,
                    config: CandidateConfig = CandidateConfig()) -> Table:
    """Transient candidates of a ZOGY subtraction and their ZTF features.

    Parameters
    ----------
    zogy : ZogyResult
        The subtraction (D, Scorr, alpha, alpha_std, flagged, tiles with P_D and F_D).
    wcs : astropy.wcs.WCS
        Celestial WCS of the science image (FITS convention inside; positions are
        converted with ``all_pix2world``, so SIP/TPV distortions apply).
    zp_common : float
        Zero point of the common photometric system of alpha.
    mask : ndarray of int, optional
        Combined bit mask (science OR registered reference, :data:`MASK_BITS`), image shape.
    reference_catalog : Table, optional
        Reference image's PSF-fit catalogue: ra, dec (deg), mag, magerr, sharp, chi.
    config : CandidateConfig

    Returns
    -------
    Table
        One row per candidate, strongest ``|scorr|`` first; columns are described in the
        module docstring and ``flagged`` holds :data:`CANDIDATE_FLAGS`.  ``meta``:
        ``n_peaks_total`` (peaks before truncation), ``truncated``, ``diffmaglim``,
        ``threshold``, ``timings`` (s per step).
    """
    clock = time.perf_counter
    t_start = clock()
    mask = _check_inputs(zogy, zp_common, mask)
    if not getattr(wcs, "has_celestial", False):
        raise CandidateError(f"wcs must be an astropy WCS with celestial axes, got {type(wcs).__name__}")
    scorr = zogy.scorr
    ny, nx = scorr.shape
    row, col = _local_peaks(scorr, zogy.flagged, config.threshold, config.edge_margin_px)
    value = scorr[row, col]
    order = _separate(row, col, np.abs(value), value > 0, config.min_separation_px)
    row, col = row[order], col[order]
    sign = np.where(value[order] > 0, 1.0, -1.0)
    x, y, scorr_peak = _subpixel_peak(scorr, row, col, sign)
    order = np.argsort(-np.abs(scorr_peak), kind="stable")
    n_total = len(order)
    truncated = n_total > config.max_candidates
    if truncated:
        log.warning("%d peaks above |Scorr| = %g: keeping the %d highest", n_total,
                    config.threshold, config.max_candidates)
        order = order[:config.max_candidates]
    row, col, sign, x, y, scorr_peak = (a[order] for a in (row, col, sign, x, y, scorr_peak))
    if config.position_max_shift_px > 0 and len(row):
        # Measured where S peaks (the source's position), detected and ranked by Scorr.
        row, col, moved = _score_peak(zogy.score, row, col, sign, config.position_max_shift_px,
                                      max(config.edge_margin_px, 1))
        if moved.any():
            xs, ys, _ = _subpixel_peak(zogy.score, row[moved], col[moved], sign[moved])
            x[moved], y[moved] = xs, ys
        # Two Scorr peaks (beyond min_separation) that climb to the same S peak are one
        # source: the stronger is kept.
        key = (row * nx + col) * 2 + (sign > 0)
        _, first = np.unique(key, return_index=True)
        keep = np.sort(first)
        if len(keep) < len(row):
            row, col, sign, x, y, scorr_peak = (a[keep] for a in (row, col, sign, x, y, scorr_peak))
    timings = {"peaks": clock() - t_start}
    t0 = clock()
    meta = {"n_peaks_total": n_total, "truncated": truncated,
            "diffmaglim": diffmaglim(zogy, zp_common), "threshold": config.threshold}
    timings["diffmaglim"] = clock() - t0
    if not len(row):
        table = _empty_table()
        table.meta.update(meta, timings=timings)
        return table

    t0 = clock()
    tile = _tile_index(zogy, row, col)
    optics = _tile_optics(zogy, config.aperture_radius_px, tile)
    sigma_w = _per_candidate(optics, tile, "sigma")
    half = max(3, math.ceil(2 * _FWHM_PER_SIGMA * sigma_w.max()))
    d_stamps, inside = _gather_stamps(zogy.diff, row, col, half, 0.0)
    d_stamps = d_stamps.astype(np.float64) * sign[:, None, None]
    flagged_stamps, _ = _gather_stamps(zogy.flagged, row, col, half, True)
    usable = inside & ~flagged_stamps
    alpha, alpha_err = measure_flux(zogy, x, y)
    inflation = alpha_err**2 * _per_candidate(optics, tile, "f_s")
    ap_flux, ap_err, ap_truncated = _aperture(zogy, x, y, sign, optics, tile, inflation,
                                              config.aperture_radius_px)
    magap, sigmagap = flux_to_mag(ap_flux, ap_err, zp_common)
    # SExtractor (whose MAG_APER is ZTF's magap) writes 99 for a non-positive flux.
    nonpositive_aperture = ~(ap_flux > 0)
    magap, sigmagap = (np.where(nonpositive_aperture, MAG_NONPOSITIVE, m) for m in (magap, sigmagap))
    big_flux, big_err, _ = _aperture(zogy, x, y, sign, optics, tile, inflation, config.aperture_big_radius_px,
                                     _encircled(optics, config.aperture_big_radius_px))
    magapbig, sigmagapbig = flux_to_mag(big_flux, big_err, zp_common)
    magapbig, sigmagapbig = (np.where(big_flux > 0, m, MAG_NONPOSITIVE) for m in (magapbig, sigmagapbig))
    fit_flux, chipsf, sharpness, used = _psf_fit(d_stamps, usable, x, y, row, col, optics, tile)
    # The flux is the PSF fit of P_D at the sub-pixel position: interpolating alpha = S / F_S
    # between pixels loses the peak of a sharp source (8 % at half a pixel when the PSF's
    # FWHM is 1.5 px).  Its error is alpha_std there (background, source and registration
    # noise; smooth, so interpolating it is fine); alpha where the fit is impossible.
    # A weak peak can fit a flux of the wrong sign on D; alpha there has Scorr's sign.
    fitted = np.isfinite(fit_flux) & (fit_flux > 0)
    flux = np.where(fitted, fit_flux, sign * alpha)
    # The fit leaves out the pixels flagged around bad ones: its variance is alpha_std^2
    # over the share of P_D's sum of squares it used (without this, sources next to a
    # masked star or column had pulls of 5-25 at the plane preset).
    alpha_err = np.where(fitted & (used > 0), alpha_err / np.sqrt(np.where(used > 0, used, 1.0)), alpha_err)
    magpsf, sigmapsf = flux_to_mag(flux, alpha_err, zp_common)
    timings["photometry"] = clock() - t0

    t0 = clock()
    aimage, bimage, fwhm, elong, resolved, thin = _shape(d_stamps, usable, x, y, row, col, sigma_w)
    nneg, nbad, sumrat, bits = _box_features(zogy.diff, mask, row, col, sign, config.box)
    timings["shape"] = clock() - t0

    t0 = clock()
    offsets = np.arange(-half, half + 1)
    r2 = ((offsets[None, None, :] + (col - x)[:, None, None]) ** 2
          + (offsets[None, :, None] + (row - y)[:, None, None]) ** 2)
    near_flagged = np.any(flagged_stamps & (r2 <= config.aperture_radius_px**2), axis=(1, 2))
    flags = np.zeros(len(row), dtype=np.int32)
    flags |= np.where(bits & ~_SATURATION_BITS, CANDIDATE_FLAGS["MASKED"], 0).astype(np.int32)
    flags |= np.where(bits & _SATURATION_BITS, CANDIDATE_FLAGS["SATURATED"], 0).astype(np.int32)
    flags |= np.where(near_flagged, CANDIDATE_FLAGS["NEAR_FLAGGED"], 0).astype(np.int32)
    flags |= np.where(ap_truncated, CANDIDATE_FLAGS["EDGE"], 0).astype(np.int32)
    flags |= np.where(resolved, 0, CANDIDATE_FLAGS["NO_SHAPE"]).astype(np.int32)
    flags |= np.where(thin, CANDIDATE_FLAGS["THIN"], 0).astype(np.int32)
    flags |= np.where(nonpositive_aperture, CANDIDATE_FLAGS["APERTURE_NONPOSITIVE"], 0).astype(np.int32)
    timings["flags"] = clock() - t0

    t0 = clock()
    sky = sign * _local_sky(zogy.diff, usable_image=~zogy.flagged, row=row, col=col,
                            inner=config.sky_annulus_px[0], outer=config.sky_annulus_px[1])
    sky /= _per_candidate(optics, tile, "f_d")
    dsnrms = sign * zogy.diff[row, col] / _robust_std(zogy.diff, zogy.flagged)
    ssnrms = sign * zogy.score[row, col] / _robust_std(zogy.score, zogy.flagged)
    timings["sky_and_snr"] = clock() - t0
    t0 = clock()

    ra, dec = wcs.all_pix2world(x, y, 0)
    # Without a reference catalogue nothing was searched: NaN (null), not ZTF's -999.
    nearest = {name: np.full(len(row), np.nan) for name in _REFERENCE_COLUMNS}
    distnr = np.full(len(row), np.nan)
    if reference_catalog is not None:
        nearest = _nearest_reference(ra, dec, reference_catalog, config.nearest_radius_arcsec)
        found = nearest["ra"] != NO_COUNTERPART
        if found.any():
            xr, yr = wcs.all_world2pix(nearest["ra"][found], nearest["dec"][found], 0)
            distnr[found] = np.hypot(xr - x[found], yr - y[found])
        distnr[~found] = NO_COUNTERPART
    timings["catalogue"] = clock() - t0

    columns = {
        "cand_index": np.arange(len(row)), "xpos": x + 1.0, "ypos": y + 1.0, "ra": ra, "dec": dec,
        "isdiffpos": sign > 0, "scorr": scorr_peak, "magpsf": magpsf, "sigmapsf": sigmapsf,
        "flux": flux, "fluxerr": alpha_err, "magap": magap, "sigmagap": sigmagap,
        "magapbig": magapbig, "sigmagapbig": sigmagapbig, "magdiff": magap - magpsf, "sky": sky,
        "dsnrms": dsnrms, "ssnrms": ssnrms, "dsdiff": dsnrms - ssnrms,
        "seeratio": _FWHM_PER_SIGMA * sigma_w / fwhm, "tblid": np.arange(len(row)), "fwhm": fwhm, "elong": elong, "aimage": aimage,
        "bimage": bimage, "nneg": nneg, "nbad": nbad, "sumrat": sumrat,
        "mindtoedge": np.minimum.reduce([x + 0.5, nx - 0.5 - x, y + 0.5, ny - 0.5 - y]),
        "chipsf": chipsf, "sharpnessdiff": sharpness, "distnr": distnr,
        "magnr": nearest["mag"], "sigmagnr": nearest["magerr"], "sharpnr": nearest["sharp"],
        "chinr": nearest["chi"], "ranr": nearest["ra"], "decnr": nearest["dec"], "flagged": flags,
    }
    table = Table({name: np.asarray(columns[name], dtype=dtype)
                   for name, (dtype, _) in _COLUMNS.items()})
    for name, (_, unit) in _COLUMNS.items():
        table[name].unit = unit
    timings["total"] = clock() - t_start
    table.meta.update(meta, timings=timings)
    return table


def bound_saturated_neighbours(candidates: Table, psf, wcs, saturate: float, zeropoint: float) -> int:
    """Give a magnitude to nearest reference sources that have no PSF fit, in place.

    A reference source whose PSF fit failed (its core saturated or masked) has no
    ``magnr``; it is at least as bright as a point source whose brightest pixel reaches
    the reference's saturation level there, ``zeropoint - 2.5 log10(saturate / peak)``
    with ``peak`` the brightest pixel's share of the reference PSF at the source.  That
    bound is ``magnr`` and ``sigmagnr`` is 99 (SExtractor's "undefined" error: a bound,
    not a measurement); ``chinr``/``sharpnr`` stay NaN (no fit); ``flagged`` gets
    ``NR_UNFIT``.

    Parameters
    ----------
    candidates : Table
        :func:`find_candidates` output (``ranr``, ``decnr``, ``magnr``, ``sigmagnr``, ``flagged``).
    psf : PSFModel
        The reference's PSF model (1-based reference pixel positions).
    wcs : astropy.wcs.WCS
        The reference's WCS.
    saturate, zeropoint : float
        The reference's (background-subtracted) saturation level, ADU, and zero point.

    Returns
    -------
    int
        How many rows were bounded.
    """
    ranr = np.asarray(candidates["ranr"], dtype=float)
    magnr = np.asarray(candidates["magnr"], dtype=float)
    unfit = np.flatnonzero((ranr != NO_COUNTERPART) & np.isfinite(ranr) & ~np.isfinite(magnr))
    if not len(unfit) or not (saturate > 0):
        return 0
    x, y = wcs.all_world2pix(ranr[unfit], np.asarray(candidates["decnr"], dtype=float)[unfit], 1)
    peak = np.array([float(np.max(psf.stamp(float(xi), float(yi)))) for xi, yi in zip(x, y)])
    candidates["magnr"][unfit] = zeropoint - 2.5 * np.log10(saturate / peak)
    candidates["sigmagnr"][unfit] = MAG_NONPOSITIVE
    candidates["flagged"][unfit] |= CANDIDATE_FLAGS["NR_UNFIT"]
    return len(unfit)


def cutout_stamps(images: Mapping[str, np.ndarray], x, y, size: int = 63) -> dict[str, np.ndarray]:
    """Stamps of several images centred on the candidates, NaN off the image.

    Parameters
    ----------
    images : mapping of str to ndarray
        Images of one shape (e.g. science, reference, difference).
    x, y : array_like
        1-based FITS positions, as the candidates table's ``xpos``/``ypos``.
    size : int
        Odd side of the stamps.

    Returns
    -------
    dict of str to ndarray
        Per image a float32 array (N, size, size) whose central pixel ``[size // 2,
        size // 2]`` is image pixel (0-based) ``col = floor(x - 0.5)``,
        ``row = floor(y - 0.5)`` (x rounded half up); the stamp's first pixel is then
        0-based ``(col - size // 2, row - size // 2)``, the ``origin`` of
        :class:`alerts.cutouts.CutoutTriplet`.
    """
    if not images:
        raise CandidateError("cutout_stamps: no images given")
    shapes = {name: np.shape(image) for name, image in images.items()}
    shape = next(iter(shapes.values()))
    if len(shape) != 2 or 0 in shape or any(s != shape for s in shapes.values()):
        raise CandidateError(f"cutout_stamps: images must be non-empty 2-D of one shape, got {shapes}")
    if size < 1 or size % 2 == 0:
        raise CandidateError(f"cutout_stamps: size must be odd and >= 1, got {size}")
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    if x.shape != y.shape or x.ndim != 1 or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise CandidateError(f"cutout_stamps: x and y must be finite 1-D arrays of one length, "
                             f"got shapes {x.shape} and {y.shape}")
    col = np.floor(x - 0.5).astype(np.int64)
    row = np.floor(y - 0.5).astype(np.int64)
    return {name: _gather_stamps(np.asarray(image, dtype=np.float32), row, col, size // 2,
                                 np.nan)[0]
            for name, image in images.items()}


def diffmaglim(zogy: ZogyResult, zp_common: float, nsigma: float = 5.0) -> float:
    """``nsigma`` limiting magnitude of the difference image (ZTF's ``diffmaglim``).

    The global noise is the median of alpha_std (the PSF flux error of a point source,
    background plus source and registration noise) over unflagged pixels, on every
    fourth pixel of each axis (the median of a full quadrant would cost 0.2 s; the
    subsample's is as precise as needed).
    """
    step = (slice(None, None, 4), slice(None, None, 4))
    std = np.asarray(zogy.alpha_std)[step]
    good = ~np.asarray(zogy.flagged)[step] & np.isfinite(std) & (std > 0)
    if not np.any(good):
        raise CandidateError("diffmaglim: no unflagged pixel with a positive alpha_std")
    return float(zp_common - 2.5 * math.log10(nsigma * float(np.median(std[good]))))
