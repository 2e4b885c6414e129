"""ZOGY proper image subtraction (Zackay, Ofek & Gal-Yam 2016) on registered images.

:func:`zogy_subtract` subtracts a registered reference R from a new image N with one PSF
each; :func:`zogy_subtract_tiled` follows a spatially varying PSF by cutting the images
into overlapping tiles, each subtracted with the PSFs evaluated at its centre, and
stitching the tiles' inner parts.  The mathematics is in :mod:`pipeline.subtraction.zogy_tile`.

Conventions
-----------
- Images are background-subtracted, on the same pixel grid; ``sigma_*`` is the rms of
  their background noise (a scalar, or a background-rms map of the image's shape whose
  median over each tile is used).
- ``fz_*`` are the flux scalings F of eq. (8): counts per unit of flux in the common
  photometric system, ``F = 10**(0.4 * (zp - zp_common))``
  (:func:`flux_scale_from_zeropoint`).  The flux image ``alpha = S / F_S`` is then in
  units of that system: ``mag = zp_common - 2.5 log10(alpha)``.
- Source noise: ``var_*`` are variance images of the *sources alone*, in image units
  squared; by default ``image / gain`` floored at ``-sigma**2`` (the Poisson variance of
  the background-subtracted signal, for images in ADU with ``gain`` e-/ADU, such that
  the pixel's total variance is never negative; see :func:`_source_variance`).  A
  reference coadd scaled to a common zero point has an effective gain of
  gain * nframes / scale.
  The background's own variance is carried by ``sigma_*`` (it is F_S in S's variance),
  so Scorr = S / sqrt(F_S + V_Sn + V_Sr + V_ast).
- Positions are 0-based pixel indices, x along columns and y along rows.
- Bad pixels (``mask`` True, or NaN in either image or variance) are set to the
  background (0) in both images before the transforms, so a star masked in one image
  does not leave a residual; every output pixel within ``mask_grow`` pixels of one (a
  square) is flagged in ``ZogyResult.flagged`` and has Scorr set to 0 so it cannot
  produce a candidate.  D, S and alpha are left as computed there.
- The image edges are padded with the background, so there is no wrap-around; near
  the edges S sees fewer noisy pixels and Scorr is slightly conservative.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import scipy.fft as sfft
from scipy import ndimage

from pipeline.core.config import ZogyConfig
from pipeline.subtraction.zogy_tile import ZogyKernels, subtract_tile, zogy_kernels

__all__ = [
    "ZogyConfig", "ZogyTile", "ZogyResult", "zogy_subtract", "zogy_subtract_tiled",
    "flux_scale_from_zeropoint", "measure_flux", "ZogyInputError", "phased_psf_d",
]

PsfAt = Callable[[float, float], np.ndarray]
#: ``psf(x, y, dx, dy) -> (m, S, S)``: the PSF of pixel (x, y) centred at sub-pixel offsets
#: (dx[k], dy[k]) from the stamp's central pixel, on the scale of the centred stamp.
PsfPhasedAt = Callable[[float, float, np.ndarray, np.ndarray], np.ndarray]


def phased_psf_d(phased: np.ndarray, dx, dy) -> np.ndarray:
    """P_D of point sources at sub-pixel offsets (dx, dy) (each within [-0.5, 0.5]) from
    the central pixel: the nearest tabulated phase's P_D, Fourier-shifted by the remainder.

    Parameters
    ----------
    phased : ndarray, shape (N, n, n, S, S)
        Each source's tile's ``psf_d_phased`` (a memory map is read only where used).
    dx, dy : array_like, shape (N,)

    Returns
    -------
    ndarray, shape (N, S, S), float64
    """
    from pipeline.measure.psf import fourier_shift, nearest_phase

    n = phased.shape[1]
    ix, rx = nearest_phase(dx, n)
    iy, ry = nearest_phase(dy, n)
    rows = np.arange(phased.shape[0])
    base = np.asarray(phased[rows, iy, ix], dtype=np.float64)
    return fourier_shift(base, rx, ry)


class ZogyInputError(ValueError):
    """Inputs ZOGY cannot work with; the message names the argument and the problem."""


@dataclass(frozen=True)
class ZogyTile:
    """One tile: its inner region ``[y0:y1, x0:x1]`` and its ZOGY normalisations.

    ``psf_d_phased`` (n, n, S, S): P_D at the sub-pixel phases of
    :func:`pipeline.measure.psf.phase_centres` (``psf_d[None, None]`` without a
    phase-sampled new-image PSF); a PSF fit at a position takes the nearest phase's and
    Fourier-shifts it by the remainder (:func:`phased_psf_d`).
    """

    y0: int
    y1: int
    x0: int
    x1: int
    psf_d: np.ndarray
    f_d: float
    f_s: float
    sigma_new: float
    sigma_ref: float
    psf_d_phased: np.ndarray | None = None

    @property
    def phased(self) -> np.ndarray:
        """``psf_d_phased``, or the centred P_D as the only phase."""
        return self.psf_d[None, None] if self.psf_d_phased is None else self.psf_d_phased


@dataclass(frozen=True)
class ZogyResult:
    """Products of a ZOGY subtraction (float32 images of the input shape).

    Attributes
    ----------
    diff : ndarray
        Proper difference image D (eq. 13), unit background variance.
    score : ndarray
        Matched-filter score S (eq. 12).
    scorr : ndarray
        Corrected score S / sqrt(V) with background, source and astrometric noise
        (eq. 25); 0 where flagged.
    alpha, alpha_std : ndarray
        PSF flux of a point source centred on each pixel, S / F_S, and its standard
        deviation sqrt(V) / F_S (eqs. 41-42), in the common photometric system.
    flagged : ndarray of bool
        Pixels near bad input pixels.
    tiles : tuple of ZogyTile
        The tiles and their P_D, F_D, F_S (one tile for :func:`zogy_subtract`).
    timings : dict
        Wall time per stage, seconds, summed over tiles.
    """

    diff: np.ndarray
    score: np.ndarray
    scorr: np.ndarray
    alpha: np.ndarray
    alpha_std: np.ndarray
    flagged: np.ndarray
    tiles: tuple[ZogyTile, ...]
    timings: dict[str, float] = field(default_factory=dict)

    def tile_at(self, x: float, y: float) -> ZogyTile:
        """The tile whose inner part holds pixel (x, y)."""
        ix, iy = int(round(x)), int(round(y))
        for tile in self.tiles:
            if tile.y0 <= iy < tile.y1 and tile.x0 <= ix < tile.x1:
                return tile
        raise ZogyInputError(f"position ({x}, {y}) is outside the image")

    @property
    def psf_d(self) -> np.ndarray:
        """P_D of the tile at the image centre."""
        return self._central_tile().psf_d

    @property
    def f_d(self) -> float:
        """F_D of the tile at the image centre."""
        return self._central_tile().f_d

    @property
    def f_s(self) -> float:
        """F_S of the tile at the image centre."""
        return self._central_tile().f_s

    def _central_tile(self) -> ZogyTile:
        ny, nx = self.diff.shape
        return self.tile_at((nx - 1) / 2, (ny - 1) / 2)


def flux_scale_from_zeropoint(zp: float, zp_common: float) -> float:
    """Flux scaling F of an image with magnitude zero point ``zp`` (mag = zp - 2.5 log10
    counts): counts per unit flux of the system whose zero point is ``zp_common``.

    A higher zero point means more counts for the same star, hence F > 1.
    """
    return float(10.0 ** (0.4 * (zp - zp_common)))


def _check_psf(name: str, psf: np.ndarray, overlap: int) -> np.ndarray:
    psf = np.asarray(psf, dtype=np.float64)
    if psf.ndim != 2 or psf.shape[0] % 2 == 0 or psf.shape[1] % 2 == 0:
        raise ZogyInputError(f"{name}: PSF stamp must be 2-D with odd sides, got shape "
                             f"{psf.shape}")
    if max(psf.shape) > overlap + 1:
        raise ZogyInputError(f"{name}: PSF stamp {psf.shape} wider than overlap + 1 "
                             f"= {overlap + 1}; raise ZogyConfig.overlap")
    total = psf.sum()
    if not np.all(np.isfinite(psf)) or not total > 0:
        raise ZogyInputError(f"{name}: PSF stamp must be finite with a positive sum")
    return psf / total


def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ZogyInputError(f"{name} must be finite and > 0, got {value}")
    return value


def _check_sigma(name: str, sigma, shape: tuple[int, int]):
    if np.ndim(sigma) == 0:
        return _check_positive(name, sigma)
    sigma = np.asarray(sigma, dtype=np.float32)
    if sigma.shape != shape:
        raise ZogyInputError(f"{name}: rms map shape {sigma.shape} != image shape {shape}")
    return sigma


def _tile_sigma(name: str, sigma, y0: int, y1: int, x0: int, x1: int) -> float:
    if np.ndim(sigma) == 0:
        return float(sigma)
    return _check_positive(f"{name} (median over tile [{y0}:{y1}, {x0}:{x1}])",
                           float(np.nanmedian(sigma[y0:y1, x0:x1])))


def _splits(size: int, tile: int) -> list[tuple[int, int]]:
    count = max(1, round(size / tile))
    edges = np.linspace(0, size, count + 1).round().astype(int)
    return list(zip(edges[:-1], edges[1:]))


def _source_variance(image: np.ndarray, gain: float, sigma) -> np.ndarray:
    """Variance of the background-subtracted signal, ``image / gain``, floored at
    ``-sigma**2`` so that the pixel's total variance ``sigma**2 + image / gain`` is never
    negative.

    Not floored at 0: in the background, ``max(image, 0)`` would add ``sigma / sqrt(2 pi)``
    of spurious variance (Scorr's std falls to ~0.985 for a 500 e- sky, and with it the
    completeness at threshold), whereas ``image / gain`` averages to 0 over the kernel.
    """
    floor = -np.square(np.asarray(sigma, dtype=np.float32))
    var = image * np.float32(1.0 / gain)
    return np.maximum(var, floor, out=var)


def _prepare_inputs(new, ref, var_new, var_ref, mask, gain_new, gain_ref, sigma_new,
                    sigma_ref):
    """float32 images with bad pixels at 0, the source variance images, the bad mask."""
    new = np.asarray(new)
    ref = np.asarray(ref)
    if new.ndim != 2 or new.shape != ref.shape:
        raise ZogyInputError(f"new {new.shape} and ref {ref.shape} must be 2-D images of "
                             f"the same shape (register the reference first)")
    bad = np.isfinite(new)
    bad &= np.isfinite(ref)
    np.logical_not(bad, out=bad)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != new.shape:
            raise ZogyInputError(f"mask shape {mask.shape} != image shape {new.shape}")
        bad |= mask if mask.dtype == bool else mask != 0
    variances = []
    for name, var, image, gain, sigma in (("var_new", var_new, new, gain_new, sigma_new),
                                          ("var_ref", var_ref, ref, gain_ref, sigma_ref)):
        if var is None:
            gain = _check_positive(name.replace("var", "gain"), gain)
            var = _source_variance(np.asarray(image, dtype=np.float32), gain, sigma)
        else:
            var = np.asarray(var, dtype=np.float32)
            if var.shape != new.shape:
                raise ZogyInputError(f"{name} shape {var.shape} != image shape {new.shape}")
            bad |= ~np.isfinite(var)
        variances.append(var)
    any_bad = bool(bad.any())
    arrays = []
    for array, own in ((new, False), (ref, False), (variances[0], var_new is None),
                       (variances[1], var_ref is None)):
        # Copies only of the caller's arrays; copyto with a mask is several times faster
        # than boolean-index assignment on a quadrant.
        array = np.asarray(array, dtype=np.float32) if own else np.array(array, dtype=np.float32)
        if any_bad:
            np.copyto(array, np.float32(0.0), where=bad)
        arrays.append(array)
    return (*arrays, bad if any_bad else None)


def zogy_subtract_tiled(new: np.ndarray, ref: np.ndarray, psf_new_at: PsfAt,
                        psf_ref_at: PsfAt, sigma_new, sigma_ref, fz_new: float,
                        fz_ref: float, var_new: np.ndarray | None = None,
                        var_ref: np.ndarray | None = None,
                        astrometric_sigma: tuple[float, float] = (0.0, 0.0),
                        mask: np.ndarray | None = None, gain_new: float = 1.0,
                        gain_ref: float = 1.0,
                        config: ZogyConfig = ZogyConfig(),
                        psf_new_phased_at: PsfPhasedAt | None = None) -> ZogyResult:
    """ZOGY subtraction in overlapping tiles, each with the PSFs at its centre.

    Parameters
    ----------
    new, ref : ndarray
        Background-subtracted new image and registered reference, same shape.
    psf_new_at, psf_ref_at : callable
        ``psf(x, y) -> stamp``: normalised, centred, odd-sided PSF stamp at pixel (x, y).
    sigma_new, sigma_ref : float or ndarray
        Background noise rms (scalar or rms map of the image's shape).
    fz_new, fz_ref : float
        Flux scalings (:func:`flux_scale_from_zeropoint`).
    var_new, var_ref : ndarray, optional
        Source-only variance images; default ``max(image, 0) / gain``.
    astrometric_sigma : (float, float)
        Registration rms (x, y) in pixels.
    mask : ndarray of bool, optional
        True for bad pixels (either image).
    gain_new, gain_ref : float
        Gains (e-/ADU) for the default source variance.
    config : ZogyConfig
    psf_new_phased_at : callable, optional
        ``psf(x, y, dx, dy) -> (m, S, S)``: the new image's PSF at pixel (x, y) centred at
        sub-pixel offsets, unnormalised (on the scale of ``psf_new_at``'s stamp); each
        tile's P_D is then tabulated at ``config.psf_d_phases`` phases per axis
        (``ZogyTile.psf_d_phased``).  Without it only the centred P_D exists.

    Returns
    -------
    ZogyResult
    """
    from pipeline.measure.psf import phase_centres

    clock = time.perf_counter
    t_start = clock()
    shape = np.shape(new)
    fz_new = _check_positive("fz_new", fz_new)
    fz_ref = _check_positive("fz_ref", fz_ref)
    sigma_new = _check_sigma("sigma_new", sigma_new, shape)
    sigma_ref = _check_sigma("sigma_ref", sigma_ref, shape)
    sx, sy = (float(v) for v in astrometric_sigma)
    if not (sx >= 0 and sy >= 0):
        raise ZogyInputError(f"astrometric_sigma must be >= 0, got {astrometric_sigma}")
    new32, ref32, vnew32, vref32, bad = _prepare_inputs(new, ref, var_new, var_ref, mask,
                                                        gain_new, gain_ref, sigma_new,
                                                        sigma_ref)
    timings: dict[str, float] = {"prepare": clock() - t_start}

    out = {name: np.empty(shape, dtype=np.float32)
           for name in ("diff", "score", "scorr", "alpha", "alpha_std")}
    tiles = []
    grid = 2 * config.overlap
    widest_stamp = 1
    margin = config.overlap
    for y0, y1 in _splits(shape[0], config.tile):
        # The window is the tile plus ``margin`` of image on each side; the transform
        # pads it with zeros at its far end up to a fast length >= tile + 2 * margin, so
        # whatever wraps around only meets background.
        wy0, wy1 = max(y0 - margin, 0), min(y1 + margin, shape[0])
        fft_h = sfft.next_fast_len(y1 - y0 + 2 * margin, real=True)
        for x0, x1 in _splits(shape[1], config.tile):
            t0 = clock()
            wx0, wx1 = max(x0 - margin, 0), min(x1 + margin, shape[1])
            fft_w = sfft.next_fast_len(x1 - x0 + 2 * margin, real=True)
            xc, yc = (x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2
            raw_n = np.asarray(psf_new_at(xc, yc), dtype=np.float64)
            psf_n = _check_psf(f"psf_new_at({xc}, {yc})", raw_n, config.overlap)
            phased_n = None
            if psf_new_phased_at is not None and config.psf_d_phases > 1:
                n_ph = config.psf_d_phases
                gy, gx = np.meshgrid(phase_centres(n_ph), phase_centres(n_ph), indexing="ij")
                phased_n = np.asarray(psf_new_phased_at(xc, yc, gx.ravel(), gy.ravel()), dtype=np.float64)
                if phased_n.shape != (n_ph * n_ph, *psf_n.shape) or not np.all(np.isfinite(phased_n)):
                    raise ZogyInputError(f"psf_new_phased_at({xc}, {yc}): expected finite stamps of shape "
                                         f"{(n_ph * n_ph, *psf_n.shape)}, got {phased_n.shape}")
                phased_n = (phased_n / raw_n.sum()).reshape(n_ph, n_ph, *psf_n.shape)
            psf_r = _check_psf(f"psf_ref_at({xc}, {yc})", psf_ref_at(xc, yc), config.overlap)
            widest_stamp = max(widest_stamp, *psf_n.shape, *psf_r.shape)
            s_n = _tile_sigma("sigma_new", sigma_new, y0, y1, x0, x1)
            s_r = _tile_sigma("sigma_ref", sigma_ref, y0, y1, x0, x1)
            kernels: ZogyKernels = zogy_kernels(psf_n, psf_r, s_n, s_r, fz_new, fz_ref, grid,
                                                psf_new_phased=phased_n)
            window = (slice(wy0, wy1), slice(wx0, wx1))
            inner = (slice(y0 - wy0, y1 - wy0), slice(x0 - wx0, x1 - wx0))
            timings["kernels"] = timings.get("kernels", 0.0) + (clock() - t0)
            products = subtract_tile(new32[window], ref32[window], vnew32[window],
                                     vref32[window], (fft_h, fft_w), inner, psf_n, psf_r,
                                     kernels, s_n, s_r, fz_new, fz_ref, (sx, sy),
                                     config.workers, timings, psf_error=config.psf_error)
            t1 = clock()
            target = (slice(y0, y1), slice(x0, x1))
            std = np.sqrt(products.variance, out=products.variance)
            out["diff"][target] = products.diff
            out["score"][target] = products.score
            np.divide(products.score, std, out=out["scorr"][target])
            np.multiply(products.score, np.float32(1 / kernels.f_s), out=out["alpha"][target])
            np.multiply(std, np.float32(1 / kernels.f_s), out=out["alpha_std"][target])
            tiles.append(ZogyTile(y0, y1, x0, x1, kernels.psf_d, kernels.f_d, kernels.f_s,
                                  s_n, s_r, kernels.psf_d_phased))
            timings["stitch"] = timings.get("stitch", 0.0) + (clock() - t1)

    t2 = clock()
    if bad is not None:
        grow = config.mask_grow if config.mask_grow is not None else widest_stamp // 2
        flagged = ndimage.maximum_filter(bad.view(np.uint8), size=2 * grow + 1).astype(bool)
        out["scorr"][flagged] = 0.0
    else:
        flagged = np.zeros(shape, dtype=bool)
    timings["mask"] = clock() - t2
    timings["total"] = clock() - t_start
    return ZogyResult(diff=out["diff"], score=out["score"], scorr=out["scorr"],
                      alpha=out["alpha"], alpha_std=out["alpha_std"], flagged=flagged,
                      tiles=tuple(tiles), timings=timings)


def zogy_subtract(new: np.ndarray, ref: np.ndarray, psf_new: np.ndarray,
                  psf_ref: np.ndarray, sigma_new, sigma_ref, fz_new: float,
                  fz_ref: float, var_new: np.ndarray | None = None,
                  var_ref: np.ndarray | None = None,
                  astrometric_sigma: tuple[float, float] = (0.0, 0.0),
                  mask: np.ndarray | None = None, gain_new: float = 1.0,
                  gain_ref: float = 1.0, config: ZogyConfig = ZogyConfig()) -> ZogyResult:
    """ZOGY subtraction of the whole image with one PSF per image.

    Same parameters as :func:`zogy_subtract_tiled`, with PSF stamps instead of
    functions; the image is one tile (padded by ``config.overlap``), and a background
    rms map is reduced to its median.
    """
    whole = dict(config.__dict__, tile=max(np.shape(new)) * 4)
    return zogy_subtract_tiled(new, ref, lambda x, y: psf_new, lambda x, y: psf_ref,
                               sigma_new, sigma_ref, fz_new, fz_ref, var_new, var_ref,
                               astrometric_sigma, mask, gain_new, gain_ref,
                               ZogyConfig(**whole))


def measure_flux(result: ZogyResult, x, y, radius: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """PSF flux and its error of point sources at sub-pixel positions (forced photometry).

    S is smooth (filtered by both PSFs), so ``alpha`` and ``alpha_std`` are
    interpolated at (x, y) with a cubic spline on a ``2 * radius + 1`` patch (a spline
    over the whole image would cost more than the subtraction).

    Returns
    -------
    flux, flux_err : ndarray
        In the common photometric system (see :func:`flux_scale_from_zeropoint`).
    """
    xs = np.atleast_1d(np.asarray(x, dtype=float))
    ys = np.atleast_1d(np.asarray(y, dtype=float))
    ny, nx = result.alpha.shape
    flux = np.full(xs.shape, np.nan)
    err = np.full(xs.shape, np.nan)
    for i, (xi, yi) in enumerate(zip(xs, ys)):
        ix, iy = int(round(xi)), int(round(yi))
        if not (0 <= ix < nx and 0 <= iy < ny):
            raise ZogyInputError(f"measure_flux: position ({xi}, {yi}) outside the image")
        ya, yb = max(iy - radius, 0), min(iy + radius + 1, ny)
        xa, xb = max(ix - radius, 0), min(ix + radius + 1, nx)
        at = [[yi - ya], [xi - xa]]
        flux[i] = ndimage.map_coordinates(result.alpha[ya:yb, xa:xb].astype(np.float64), at,
                                          order=3, mode="mirror")[0]
        err[i] = ndimage.map_coordinates(result.alpha_std[ya:yb, xa:xb].astype(np.float64),
                                         at, order=3, mode="mirror")[0]
    return flux, err
