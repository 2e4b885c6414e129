"""Measurements of transient candidates on ZOGY's products (the features of
:func:`pipeline.subtraction.candidates.find_candidates`; the definitions are in that module's docstring).

Every function works on all candidates at once (stamps gathered into (N, S, S) arrays),
grouped by ZOGY tile where the tile's P_D and F_D matter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import sep
from astropy.table import Table
from scipy import ndimage
from scipy.spatial import cKDTree

from pipeline.measure.psf import fwhm_of_stamp
from pipeline.subtraction.zogy import ZogyResult, phased_psf_d

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_REFERENCE_COLUMNS = ("ra", "dec", "mag", "magerr", "sharp", "chi")
# SExtractor's variance of a detection narrower than a pixel along an axis (1/12 px^2: a
# uniformly lit pixel), its rule for "infinitely thin" detections.
_THIN_VARIANCE_PX2 = 1.0 / 12.0
#: ZTF's "nothing within the search radius" value (real packets: distnr, magnr, ... -999).
NO_COUNTERPART = -999.0
#: SExtractor's magnitude (and error) of a non-positive flux; ZTF's magap is SExtractor's MAG_APER.
MAG_NONPOSITIVE = 99.0


class CandidateError(ValueError):
    """Inputs candidate detection cannot work with; the message names the problem."""


def _gather_stamps(image: np.ndarray, row, col, half: int, fill) -> tuple[np.ndarray, np.ndarray]:
    """``(2 half + 1)^2`` stamps of ``image`` centred on integer (row, col), and whether
    each stamp pixel is on the image; off-image pixels hold ``fill``."""
    ny, nx = image.shape
    size = 2 * half + 1
    row = np.asarray(row, dtype=np.int64)
    col = np.asarray(col, dtype=np.int64)
    stamps = np.empty((len(row), size, size), dtype=image.dtype)
    inside = np.ones(stamps.shape, dtype=bool)
    whole = (row >= half) & (row < ny - half) & (col >= half) & (col < nx - half)
    if whole.any():
        # Indexing a strided window view copies whole stamp rows: ~20x faster than
        # gathering pixel by pixel.
        windows = np.lib.stride_tricks.sliding_window_view(image, (size, size))
        stamps[whole] = windows[row[whole] - half, col[whole] - half]
    if not whole.all():
        offsets = np.arange(-half, half + 1)
        rows = row[~whole, None, None] + offsets[None, :, None]
        cols = col[~whole, None, None] + offsets[None, None, :]
        on_image = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
        values = image[np.clip(rows, 0, ny - 1), np.clip(cols, 0, nx - 1)]
        stamps[~whole] = np.where(on_image, values, np.asarray(fill, dtype=image.dtype))
        inside[~whole] = on_image
    return stamps, inside


@dataclass(frozen=True)
class _TileOptics:
    """What the measurements need of one tile's P_D."""

    psf_d: np.ndarray
    f_d: float
    f_s: float
    sigma: float              # Gaussian-equivalent sigma of P_D (FWHM / 2.3548)
    encircled: float          # P_D's light within the aperture radius
    phased: np.ndarray        # P_D at the tabulated sub-pixel phases (n, n, S, S)


def _tile_optics(zogy: ZogyResult, radius: float, used) -> list[_TileOptics | None]:
    """Optics of the tiles whose indices are in ``used`` (None for the others)."""
    optics: list[_TileOptics | None] = [None] * len(zogy.tiles)
    for k in np.unique(used):
        tile = zogy.tiles[k]
        psf = np.ascontiguousarray(tile.psf_d, dtype=np.float64)
        c = psf.shape[0] // 2
        fwhm = fwhm_of_stamp(psf)
        if not math.isfinite(fwhm):
            raise CandidateError(f"P_D of tile [{tile.y0}:{tile.y1}, {tile.x0}:{tile.x1}] has no "
                                 "measurable FWHM (stamp too small?)")
        encircled, _, _ = sep.sum_circle(psf, [float(c)], [float(c)], radius, subpix=0)
        optics[k] = _TileOptics(psf, tile.f_d, tile.f_s, fwhm / _FWHM_PER_SIGMA,
                                float(encircled[0]) / float(psf.sum()), np.asarray(tile.phased, dtype=np.float64))
    return optics


def _per_candidate(optics: list[_TileOptics | None], tile: np.ndarray, name: str) -> np.ndarray:
    return np.array([math.nan if o is None else getattr(o, name) for o in optics])[tile]


def _tile_index(zogy: ZogyResult, row, col) -> np.ndarray:
    index = np.full(len(row), -1, dtype=np.int64)
    for k, tile in enumerate(zogy.tiles):
        index[(row >= tile.y0) & (row < tile.y1) & (col >= tile.x0) & (col < tile.x1)] = k
    if np.any(index < 0):
        raise CandidateError("ZogyResult.tiles do not cover every peak position")
    return index


def _encircled(optics: list[_TileOptics | None], radius: float) -> np.ndarray:
    """Each tile's P_D light within ``radius`` (NaN for tiles without optics)."""
    out = np.full(len(optics), np.nan)
    for k, o in enumerate(optics):
        if o is not None:
            c = o.psf_d.shape[0] // 2
            inside, _, _ = sep.sum_circle(o.psf_d, [float(c)], [float(c)], radius, subpix=0)
            out[k] = float(inside[0]) / float(o.psf_d.sum())
    return out


def _aperture(zogy, x, y, sign, optics, tile, inflation, radius, encircled=None):
    """Aperture flux on D in the common system, its error, and whether it was truncated;
    ``encircled`` (per tile) defaults to the optics' (their aperture radius)."""
    total, area_err, flags = sep.sum_circle(zogy.diff, x, y, radius, err=1.0, subpix=0)
    encircled = _per_candidate(optics, tile, "encircled") if encircled is None else encircled[tile]
    scale = 1.0 / (_per_candidate(optics, tile, "f_d") * encircled)
    flux = sign * total * scale
    err = area_err * np.sqrt(inflation) * scale
    return flux, err, (flags & sep.APER_TRUNC) != 0


def _shape(d_stamps, usable, x, y, row, col, sigma_w):
    """Window-corrected second moments: aimage, bimage, fwhm, elong, whether the window
    resolved the profile, and whether SExtractor's thin-detection floor was applied.

    Where the window did not resolve the profile (no positive windowed flux, or moments
    as broad as the window) the shape is the local P_D's: ``aimage = bimage = sigma_w``,
    ``fwhm`` = P_D's FWHM, ``elong = 1`` (``resolved`` False).  Where the profile has no
    extent along its minor axis (``bimage = 0``: narrower than a pixel, a hot pixel or a
    cosmic-ray track) SExtractor's rule for "infinitely thin" detections adds 1/12 px^2
    (a uniformly lit pixel's variance) to both axes' variances (``thin`` True).
    """
    half = d_stamps.shape[-1] // 2
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    dx = offsets[None, None, :] + (col - x)[:, None, None]
    dy = offsets[None, :, None] + (row - y)[:, None, None]
    window2 = sigma_w**2
    weight = np.exp(-0.5 * (dx**2 + dy**2) / window2[:, None, None]) * usable * d_stamps
    total = weight.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = (weight * dx).sum(axis=(1, 2)) / total
        my = (weight * dy).sum(axis=(1, 2)) / total
        mxx = (weight * dx**2).sum(axis=(1, 2)) / total - mx**2
        myy = (weight * dy**2).sum(axis=(1, 2)) / total - my**2
        mxy = (weight * dx * dy).sum(axis=(1, 2)) / total - mx * my
        mean, half_range = 0.5 * (mxx + myy), np.sqrt(0.25 * (mxx - myy) ** 2 + mxy**2)
        major, minor = mean + half_range, mean - half_range
        # C = (M^-1 - W^-1)^-1 = M (1 - M / sigma_w^2)^-1 axis by axis (M and C share
        # axes); written without M^-1 so a profile of one pixel (M = 0) gives C = 0.
        resolved = (total > 0) & (major < window2)
        a2 = np.where(resolved, major / (1.0 - major / window2), np.nan)
        b2 = np.where(resolved, minor / (1.0 - minor / window2), np.nan)
        a, b = np.sqrt(np.maximum(a2, 0.0)), np.sqrt(np.maximum(b2, 0.0))
    thin = resolved & (b == 0)
    a = np.where(thin, np.sqrt(a**2 + _THIN_VARIANCE_PX2), a)
    b = np.where(thin, math.sqrt(_THIN_VARIANCE_PX2), b)
    a = np.where(resolved, a, sigma_w)
    b = np.where(resolved, b, sigma_w)
    return a, b, _FWHM_PER_SIGMA * np.sqrt(a * b), a / b, resolved, thin


def _psf_fit(d_stamps, usable, x, y, row, col, optics, tile):
    """PSF-fit flux (common system), chipsf and sharpnessdiff from fits of P_D at the
    sub-pixel position (the nearest tabulated phase, shifted by the remainder) and its
    Laplacian to D, and the share of the model's sum of squares on the usable pixels (the
    fit's variance is that of the whole profile's divided by it)."""
    n, size = len(x), d_stamps.shape[-1]
    half = size // 2
    chi2, sharp, flux = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    used = np.full(n, np.nan)
    laplace = np.array([[[0, 1, 0], [1, -4, 1], [0, 1, 0]]], dtype=np.float64)
    for k in np.unique(tile):
        sel = np.flatnonzero(tile == k)
        phased = optics[k].phased
        c = phased.shape[-1] // 2
        models = phased_psf_d(np.broadcast_to(phased, (len(sel), *phased.shape)), x[sel] - col[sel],
                              y[sel] - row[sel])
        h = min(half, c)
        model = models[:, c - h: c + h + 1, c - h: c + h + 1]
        lap = ndimage.correlate(model, laplace, mode="constant")
        d = d_stamps[sel, half - h: half + h + 1, half - h: half + h + 1]
        w = usable[sel, half - h: half + h + 1, half - h: half + h + 1].astype(np.float64)
        spp, spl, sll = ((w * p * q).sum(axis=(1, 2)) for p, q in ((model, model), (model, lap), (lap, lap)))
        spd, sld = (w * model * d).sum(axis=(1, 2)), (w * lap * d).sum(axis=(1, 2))
        npix = w.sum(axis=(1, 2))
        used[sel] = spp / (model * model).sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            amplitude = spd / spp
            flux[sel] = amplitude / optics[k].f_d
            chi2[sel] = (w * (d - amplitude[:, None, None] * model) ** 2).sum(axis=(1, 2)) / (npix - 1)
            b = (spp * sld - spl * spd) / (spp * sll - spl**2)
            # Normalised by the one-component amplitude: for a profile much narrower
            # than P_D (a hot pixel) the two-component fit's own amplitude changes sign.
            sharp[sel] = 2.0 * b / (amplitude * optics[k].sigma ** 2)
    return flux, chi2, sharp, used


def _box_features(diff, mask, row, col, sign, box):
    """nneg, nbad, sumrat (median-filtered) and the OR of the mask bits in the box, centred
    on the brightest pixel of sign * D within 1 px of the Scorr peak pixel."""
    half = box // 2
    # Scorr's peak is pushed off D's where the source noise of a residual is large (a
    # dipole's lobes): ZTF centres the box on the difference image's own detection.
    near, _ = _gather_stamps(diff, row, col, 1, -np.inf)
    brightest = np.argmax(near.reshape(len(row), 9) * sign[:, None], axis=1)
    row, col = row + brightest // 3 - 1, col + brightest % 3 - 1
    wide, inside = _gather_stamps(diff, row, col, half + 1, 0.0)
    wide = wide.astype(np.float64) * sign[:, None, None]
    core = (slice(None), slice(1, -1), slice(1, -1))
    nneg = np.count_nonzero((wide[core] < 0) & inside[core], axis=(1, 2))
    # 3 x 3 median of every box pixel from the 9 shifted views of the wider stamp.
    views = [wide[:, 1 + dy: wide.shape[1] - 1 + dy, 1 + dx: wide.shape[2] - 1 + dx]
             for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    smooth = np.median(np.stack(views), axis=0) * inside[core]
    with np.errstate(invalid="ignore", divide="ignore"):
        sumrat = smooth.sum(axis=(1, 2)) / np.abs(smooth).sum(axis=(1, 2))
    if mask is None:
        none = np.zeros(len(row), dtype=np.int64)
        return nneg, none, sumrat, none
    bits, _ = _gather_stamps(mask, row, col, half, 0)
    nbad = np.count_nonzero(bits, axis=(1, 2))
    any_bits = np.bitwise_or.reduce(bits.reshape(len(row), -1), axis=1).astype(np.int64)
    return nneg, nbad, sumrat, any_bits


def _nearest_reference(ra, dec, catalog: Table, radius_arcsec: float) -> dict[str, np.ndarray]:
    """The nearest catalogue row within the radius for every (ra, dec); :data:`NO_COUNTERPART`
    (ZTF's -999) in every column when none."""
    missing = [name for name in _REFERENCE_COLUMNS if name not in catalog.colnames]
    if missing:
        raise CandidateError(f"reference_catalog lacks column(s) {', '.join(missing)}")
    cat = {name: np.asarray(catalog[name], dtype=np.float64) for name in _REFERENCE_COLUMNS}
    good = np.isfinite(cat["ra"]) & np.isfinite(cat["dec"])
    cat = {name: values[good] for name, values in cat.items()}
    out = {name: np.full(len(ra), NO_COUNTERPART) for name in _REFERENCE_COLUMNS}
    if not len(cat["ra"]) or not len(ra):
        return out

    def unit(lon, lat):
        lon, lat = np.radians(lon), np.radians(lat)
        return np.column_stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)])

    chord = 2.0 * math.sin(math.radians(radius_arcsec / 3600.0) / 2.0)
    distance, index = cKDTree(unit(cat["ra"], cat["dec"])).query(
        unit(ra, dec), distance_upper_bound=chord)
    found = np.isfinite(distance)
    for name in _REFERENCE_COLUMNS:
        out[name][found] = cat[name][index[found]]
    return out


def _local_sky(diff, usable_image, row, col, inner: float, outer: float) -> np.ndarray:
    """Median of D's usable pixels in the annulus ``inner <= r <= outer`` (px) around each
    (row, col): the local background level of D (NaN when the annulus has no usable pixel)."""
    half = int(math.ceil(outer))
    stamps, inside = _gather_stamps(diff, row, col, half, 0.0)
    good, _ = _gather_stamps(usable_image, row, col, half, False)
    offsets = np.arange(-half, half + 1)
    r2 = offsets[None, :] ** 2 + offsets[:, None] ** 2
    ring = (r2 >= inner**2) & (r2 <= outer**2)
    values = np.where(good & inside & ring[None], stamps.astype(np.float64), np.nan).reshape(len(row), -1)
    # The median of each row's finite values from one sort (NaN sorts last): nanmedian
    # loops over the rows in Python.
    ordered = np.sort(values, axis=1)
    count = np.count_nonzero(np.isfinite(values), axis=1)
    rows = np.arange(len(row))
    low, high = np.maximum(count - 1, 0) // 2, np.maximum(count, 1) // 2
    return np.where(count > 0, 0.5 * (ordered[rows, low] + ordered[rows, high]), np.nan)


def _robust_std(image, flagged) -> float:
    """Standard deviation of an image's unflagged pixels from their median absolute
    deviation (1.4826 MAD), on every eighth pixel of each axis (~150,000 pixels of a
    quadrant: 0.3 % precise, at a sixty-fourth of the cost)."""
    step = (slice(None, None, 8), slice(None, None, 8))
    values = np.asarray(image)[step][~np.asarray(flagged)[step]]
    values = values[np.isfinite(values)]
    if not values.size:
        return math.nan
    return float(1.4826 * np.median(np.abs(values - np.median(values))))
