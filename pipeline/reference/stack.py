r"""The per-pixel combination of a reference: registered, background-subtracted frames on
one grid into an outlier-rejecting weighted mean (:func:`stack_frames`).

*Combination.*  A weighted mean with weights ``w = 1 / (scale * sky_rms)**2`` (inverse
background variance in coadd units; not per pixel, which would bias stars' fluxes).  A
frame's pixel is rejected when it departs from the per-pixel median ``M`` of the frames by
more than ``clip_sigma`` times :math:`\sqrt{V_i + V_M}` with

.. math:: V_i = (s_i\sigma_i)^2 + s_i\max(M, 0)/g_i + (f M)^2 + (k_i\,T)^2,\qquad
          k_i = c\,|\sigma_{{\rm PSF},i}^2 - {\rm median}_j\,\sigma_{{\rm PSF},j}^2| / 2,

sky noise, the sources' Poisson noise, a fractional tolerance ``clip_flux_fraction``
``f``, and the PSF mismatch: a profile of variance :math:`\sigma^2 + \delta` is
:math:`P + (\delta/2)\nabla^2 P` to first order, so a frame sharper or broader than the
median departs from it by about :math:`(\delta/2)\nabla^2 M` (``T`` is :math:`|\nabla^2 M|`
maximum-filtered over 3x3 pixels, ``c`` = ``clip_psf_factor`` covers the higher orders).
:math:`V_M = (\pi/2) / \sum_j 1/V_j` is the variance of the median.  Rejected pixels grow
by ``clip_grow`` pixels (a cosmic ray's faint edges, its resampling ringing).  Masked,
saturated and uncovered pixels (registration's ``EDGE``) take no part.

*Noise and gain.*  ``rms`` is the background noise of the coadd implied by the weights,
:math:`1/\sqrt{\sum w_i}` over the frames used at each pixel: the noise of a PSF-sized
sum.  Resampling correlates the noise of the registered frames, so the pixel-to-pixel
scatter is somewhat lower (their ratio is the reference header's ``PIXRMSF``); PSF
photometry and ZOGY, which work at PSF scales, need the former.  The effective gain makes
``coadd / gain`` the sources' Poisson variance: with :math:`W = \sum w_i`,
:math:`{\rm Var} = \sum w_i^2 s_i^2 (C/s_i)/g_i / W^2`, so
:math:`g_{\rm eff} = W^2 / \sum (w_i^2 s_i / g_i)` (``N g`` for N equal frames).  Pixels
saturated in any frame carry ``SATURATED`` in the coadd's mask.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from pipeline.core.config import StackConfig
from pipeline.core.image import MASK_BITS

__all__ = ["StackConfig", "StackResult", "stack_frames"]

_SIGMA_PER_FWHM = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
_SATURATED = MASK_BITS["SATURATED"] | MASK_BITS["BLEED"]


@dataclass(frozen=True)
class StackResult:
    """What :func:`stack_frames` combined (coadd units: the common zero point)."""

    data: np.ndarray        # float32 weighted mean, 0 where no frame contributes
    rms: np.ndarray         # float32 background noise from the weights, NaN where no frame
    coverage: np.ndarray    # int16 frames used per pixel
    mask: np.ndarray        # int16 MASK_BITS: EDGE (no frame covers), BAD (all masked), SATURATED
    n_clipped: np.ndarray   # pixels rejected per frame (grown)
    gain: float             # effective gain, e-/ADU, all frames contributing


def _sorted_median(cube: np.ndarray) -> np.ndarray:
    """Median over axis 0 ignoring NaN (NaN where all are): np.nanmedian took 7 times as long."""
    count = np.count_nonzero(~np.isnan(cube), axis=0)
    ordered = np.sort(cube, axis=0)             # NaN sort last
    last = cube.shape[0] - 1
    lo = np.take_along_axis(ordered, np.clip((count - 1) // 2, 0, last)[None], 0)[0]
    hi = np.take_along_axis(ordered, np.clip(count // 2, 0, last)[None], 0)[0]
    return np.where(count > 0, 0.5 * (lo + hi), np.nan).astype(np.float32)


def stack_frames(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], scales, sky_rms, gains,
                 fwhm_px, config: StackConfig = StackConfig()) -> StackResult:
    """Combine registered frames into a weighted mean with per-pixel outlier rejection.

    Parameters
    ----------
    images : sequence of ndarray
        Registered, background-subtracted frames on one grid, each in its own ADU (NaN: no data).
    masks : sequence of ndarray
        Their bit masks (:data:`pipeline.core.image.MASK_BITS`, 0 = good; ``EDGE``: not covered).
    scales : array_like
        Flux scale of each frame to the common zero point.
    sky_rms, gains : array_like
        Background noise (the frame's ADU, before registration) and gain (e-/ADU) per frame.
    fwhm_px : array_like
        PSF FWHM of each frame in grid pixels (the PSF-mismatch term of the rejection).
    config : StackConfig
        Or a :class:`pipeline.reference.build.ReferenceConfig`, which is one.

    Returns
    -------
    StackResult
    """
    n = len(images)
    scales, sky_rms, gains, fwhm_px = (np.asarray(v, dtype=np.float64) for v in (scales, sky_rms, gains, fwhm_px))
    if n == 0 or len(masks) != n or any(len(v) != n for v in (scales, sky_rms, gains, fwhm_px)):
        raise ValueError("stack_frames needs one mask, scale, sky rms, gain and FWHM per image")
    shape = images[0].shape
    if any(im.shape != shape or m.shape != shape for im, m in zip(images, masks)):
        raise ValueError("images and masks must all have one shape")
    weights = 1.0 / (scales * sky_rms) ** 2

    def good(i, rows=slice(None)):
        return (masks[i][rows] == 0) & np.isfinite(images[i][rows])

    median = np.empty(shape, dtype=np.float32)
    for r0 in range(0, shape[0], config.block_rows):
        rows = slice(r0, r0 + config.block_rows)
        cube = np.stack([np.where(good(i, rows), images[i][rows] * np.float32(scales[i]), np.nan)
                         for i in range(n)])
        median[rows] = _sorted_median(cube)
    model = np.nan_to_num(median, nan=0.0)
    positive = np.maximum(model, 0.0)
    psf_term = ndimage.maximum_filter(np.abs(ndimage.laplace(model)), size=3)
    psf_var = (fwhm_px * _SIGMA_PER_FWHM) ** 2
    mismatch = config.clip_psf_factor * np.abs(psf_var - np.median(psf_var)) / 2.0
    shared = (np.float32(config.clip_flux_fraction) * model) ** 2     # terms common to all frames
    psf_sq = psf_term ** 2

    def variance(i):
        v = positive * np.float32(scales[i] / gains[i])
        v += np.float32((scales[i] * sky_rms[i]) ** 2)
        v += shared
        v += np.float32(mismatch[i] ** 2) * psf_sq
        return v

    inverse_sum = np.zeros(shape, dtype=np.float32)
    for i in range(n):
        np.add(inverse_sum, 1.0 / variance(i), out=inverse_sum, where=good(i))
    with np.errstate(divide="ignore"):
        median_var = np.float32(math.pi / 2) / inverse_sum
    del inverse_sum

    # float32 sums with ufunc ``where=`` (boolean indexing took half the time): 40 terms
    # of similar size lose nothing at float32 precision.
    total = np.zeros(shape, dtype=np.float32)
    weight_sum = np.zeros(shape, dtype=np.float32)
    coverage = np.zeros(shape, dtype=np.int16)
    covered = np.zeros(shape, dtype=bool)
    saturated = np.zeros(shape, dtype=bool)
    n_clipped = np.zeros(n, dtype=np.int64)
    grow = ndimage.generate_binary_structure(2, 2)
    threshold = np.float32(config.clip_sigma ** 2)
    for i in range(n):
        usable = good(i)
        scaled = images[i] * np.float32(scales[i])
        excess = np.subtract(scaled, model)
        excess *= excess
        limit = variance(i)
        limit += median_var
        limit *= threshold
        reject = usable & (excess > limit)
        del excess, limit
        if config.clip_grow and reject.any():
            reject = ndimage.binary_dilation(reject, grow, iterations=config.clip_grow) & usable
        n_clipped[i] = int(np.count_nonzero(reject))
        use = usable & ~reject
        scaled *= np.float32(weights[i])
        np.add(total, scaled, out=total, where=use)
        np.add(weight_sum, np.float32(weights[i]), out=weight_sum, where=use)
        coverage += use
        covered |= (masks[i] & MASK_BITS["EDGE"]) == 0
        saturated |= (masks[i] & _SATURATED) != 0
    empty = weight_sum == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        data = np.where(empty, 0.0, total / weight_sum).astype(np.float32)
        rms = np.where(empty, np.nan, 1.0 / np.sqrt(weight_sum)).astype(np.float32)
    mask = np.zeros(shape, dtype=np.int16)
    mask[empty & ~covered] |= MASK_BITS["EDGE"]
    mask[empty & covered] |= MASK_BITS["BAD"]
    mask[saturated] |= MASK_BITS["SATURATED"]
    gain = float(weights.sum() ** 2 / np.sum(weights ** 2 * scales / gains))
    return StackResult(data, rms, coverage, mask, n_clipped, gain)
