r"""The Fourier-space core of ZOGY proper image subtraction on one (padded) tile.

Notation of Zackay, Ofek & Gal-Yam (2016, ApJ 830, 27; "ZOGY"), hats for the discrete
Fourier transform, :math:`a = F_r \hat P_r`, :math:`b = F_n \hat P_n` and the common
denominator :math:`\Delta = \sigma_n^2 |a|^2 + \sigma_r^2 |b|^2`:

.. math::
   \hat D = \frac{a \hat N - b \hat R}{\sqrt{\Delta}}  \quad(13),\qquad
   \hat P_D = \frac{a b}{F_D \sqrt{\Delta}}  \quad(14),\qquad
   F_D = \frac{F_n F_r}{\sqrt{\sigma_n^2 F_r^2 + \sigma_r^2 F_n^2}}  \quad(15)

.. math::
   \hat S = F_D \hat D \overline{\hat P_D} = \hat k_n \hat N - \hat k_r \hat R,\quad
   \hat k_n = \frac{\bar b |a|^2}{\Delta},\quad \hat k_r = \frac{\bar a |b|^2}{\Delta}
   \quad(12, 26\text{-}27)

With background noise only, S has the variance :math:`F_S = \langle |a|^2|b|^2/\Delta
\rangle` (the mean over all frequencies, eq. 41), and a point source of flux
:math:`\alpha` (in the units where ``F = 1``) peaks at :math:`S = \alpha F_S`.  The
corrected score divides by the square root of the full variance of S (eqs. 25-33)

.. math::
   V = F_S + k_n^2 \otimes V_n + k_r^2 \otimes V_r
       + \sigma_x^2 [(\partial_x S_n)^2 + (\partial_x S_r)^2]
       + \sigma_y^2 [(\partial_y S_n)^2 + (\partial_y S_r)^2]

where :math:`V_n, V_r` are the variance images of the sources alone (the background
variance is the :math:`F_S` term) and :math:`S_n = k_n \otimes N`,
:math:`S_r = k_r \otimes R`.

The real-space kernels :math:`k_n, k_r` and :math:`P_D` are computed in float64 on a
small grid (they depend on the PSFs and noise only and are compact); everything sized
like the image is float32 / complex64 and each image is transformed once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft

__all__ = ["ZogyKernels", "zogy_kernels", "stamp_spectrum", "subtract_tile", "TileProducts"]

# Added to the denominator so frequencies where both PSF spectra vanish give 0, not 0/0.
_TINY = np.float32(1e-30)


def _embed_centred(stamp: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Zero-pad ``stamp`` to ``shape`` with its central pixel moved to index (0, 0)."""
    out = np.zeros(shape, dtype=stamp.dtype)
    h, w = stamp.shape
    cy, cx = h // 2, w // 2
    rows = (np.arange(h) - cy) % shape[0]
    cols = (np.arange(w) - cx) % shape[1]
    out[np.ix_(rows, cols)] = stamp
    return out


def stamp_spectrum(stamp: np.ndarray, shape: tuple[int, int], workers: int = 1) -> np.ndarray:
    """``rfft2`` of a small centred stamp zero-padded to ``shape`` (centre at (0, 0)).

    Only the stamp's rows are non-zero, so the row transforms are done on those rows
    alone and the column transforms on the result: about half the work of ``rfft2`` on
    the padded array.
    """
    h, w = stamp.shape
    big_h, big_w = shape
    cy, cx = h // 2, w // 2
    rows = np.zeros((h, big_w), dtype=np.float32)
    rows[:, (np.arange(w) - cx) % big_w] = stamp
    row_spec = sfft.rfft(rows, axis=1, workers=workers)
    full = np.zeros((big_h, big_w // 2 + 1), dtype=np.complex64)
    full[: h - cy] = row_spec[cy:]
    full[big_h - cy:] = row_spec[:cy]
    return sfft.fft(full, axis=0, overwrite_x=True, workers=workers)


@dataclass(frozen=True)
class ZogyKernels:
    """What ZOGY needs from the PSFs and noise levels alone (one tile).

    Attributes
    ----------
    f_d : float
        Flux zero point of D (eq. 15): a source of flux alpha appears in D as
        ``alpha * f_d * psf_d``.
    f_s : float
        Flux normalisation of S (eq. 41): S = alpha * f_s at a point source; also the
        background-only variance of S.
    psf_d : ndarray
        PSF of D (eq. 14), normalised to sum 1, same shape as the new image's stamp.
    kn2, kr2 : ndarray
        Squares of the real-space kernels k_n, k_r (eqs. 26-27), centred, on the kernel
        grid; convolving the source variance images with them gives V(S_n), V(S_r).
    """

    f_d: float
    f_s: float
    psf_d: np.ndarray
    kn2: np.ndarray
    kr2: np.ndarray


def zogy_kernels(psf_new: np.ndarray, psf_ref: np.ndarray, sigma_new: float,
                 sigma_ref: float, fz_new: float, fz_ref: float, grid: int) -> ZogyKernels:
    """Kernels, P_D, F_D and F_S on a ``grid`` x ``grid`` float64 grid.

    The grid must hold the kernels' support (a few PSF widths); the discrete sums are
    then exact, whatever the size of the image they are applied to.
    """
    shape = (grid, grid)
    pn = np.fft.rfft2(_embed_centred(psf_new.astype(np.float64), shape))
    pr = np.fft.rfft2(_embed_centred(psf_ref.astype(np.float64), shape))
    a2 = fz_ref**2 * np.abs(pr) ** 2
    b2 = fz_new**2 * np.abs(pn) ** 2
    den = sigma_new**2 * a2 + sigma_ref**2 * b2 + 1e-300
    f_d = fz_new * fz_ref / np.sqrt(sigma_new**2 * fz_ref**2 + sigma_ref**2 * fz_new**2)
    kn = np.fft.irfft2(fz_new * np.conj(pn) * a2 / den, s=shape)
    kr = np.fft.irfft2(fz_ref * np.conj(pr) * b2 / den, s=shape)
    # The mean over the full spectrum from the half spectrum: interior columns count twice.
    weights = np.full(pn.shape[1], 2.0)
    weights[0] = 1.0
    if grid % 2 == 0:
        weights[-1] = 1.0
    f_s = float(np.sum(a2 * b2 / den * weights) / grid**2)
    pd_full = np.fft.fftshift(np.fft.irfft2(fz_new * fz_ref * pn * pr / (f_d * np.sqrt(den)),
                                            s=shape))
    h, w = psf_new.shape
    c = grid // 2
    psf_d = pd_full[c - h // 2: c - h // 2 + h, c - w // 2: c - w // 2 + w]
    return ZogyKernels(f_d=float(f_d), f_s=f_s, psf_d=psf_d / psf_d.sum(),
                       kn2=np.fft.fftshift(kn**2), kr2=np.fft.fftshift(kr**2))


@dataclass
class TileProducts:
    """Images computed on one padded tile (float32, the tile's FFT shape)."""

    diff: np.ndarray
    score: np.ndarray
    variance: np.ndarray
    var_source: np.ndarray
    var_astrometric: np.ndarray | None


def _central_difference_sq_sum(images: tuple[np.ndarray, ...], axis: int) -> np.ndarray:
    """Sum over ``images`` of (2 * derivative along ``axis``)^2 by central differences.

    Central differences instead of spectral derivatives: four more inverse FFTs would
    double the cost of the astrometric term, and S is smooth (it is filtered by both
    PSFs), so the difference underestimates the slope by a few percent at most.
    """
    acc = np.zeros_like(images[0])
    tmp = np.empty_like(images[0])
    inner = [slice(None), slice(None)]
    inner[axis] = slice(1, -1)
    fwd = [slice(None), slice(None)]
    fwd[axis] = slice(2, None)
    bwd = [slice(None), slice(None)]
    bwd[axis] = slice(None, -2)
    tmp_inner = tmp[tuple(inner)]
    for image in images:
        np.subtract(image[tuple(fwd)], image[tuple(bwd)], out=tmp_inner)
        np.multiply(tmp_inner, tmp_inner, out=tmp_inner)
        acc[tuple(inner)] += tmp_inner
    return acc


def subtract_tile(new: np.ndarray, ref: np.ndarray, var_new: np.ndarray, var_ref: np.ndarray,
                  psf_new: np.ndarray, psf_ref: np.ndarray, kernels: ZogyKernels,
                  sigma_new: float, sigma_ref: float, fz_new: float, fz_ref: float,
                  astrometric_sigma: tuple[float, float], workers: int = 1,
                  timings: dict[str, float] | None = None) -> TileProducts:
    """D, S and the variance of S on one tile already padded to a fast FFT shape.

    Parameters
    ----------
    new, ref : ndarray, float32
        Background-subtracted, registered images (bad pixels already 0).
    var_new, var_ref : ndarray, float32
        Variance images of the sources alone (>= 0), same units as ``new``/``ref`` squared.
    psf_new, psf_ref : ndarray
        Normalised, centred PSF stamps.
    kernels : ZogyKernels
        From :func:`zogy_kernels` with the same PSFs and noise.
    sigma_new, sigma_ref, fz_new, fz_ref : float
        Background noise and flux scalings.
    astrometric_sigma : (float, float)
        Registration rms along x (columns) and y (rows), pixels.
    timings : dict, optional
        Stage wall times (s) are added to it.
    """
    clock = time.perf_counter
    t0 = clock()
    shape = new.shape
    pn = stamp_spectrum(psf_new, shape, workers)
    pr = stamp_spectrum(psf_ref, shape, workers)
    kn2_hat = stamp_spectrum(kernels.kn2, shape, workers)
    kr2_hat = stamp_spectrum(kernels.kr2, shape, workers)
    t1 = clock()
    new_hat = sfft.rfft2(new, workers=workers)
    ref_hat = sfft.rfft2(ref, workers=workers)
    vn_hat = sfft.rfft2(var_new, workers=workers)
    vr_hat = sfft.rfft2(var_ref, workers=workers)
    t2 = clock()

    pn2 = pn.real * pn.real
    pn2 += pn.imag * pn.imag
    pr2 = pr.real * pr.real
    pr2 += pr.imag * pr.imag
    inv_den = pr2 * np.float32(sigma_new**2 * fz_ref**2)
    inv_den += pn2 * np.float32(sigma_ref**2 * fz_new**2)
    inv_den += _TINY
    np.reciprocal(inv_den, out=inv_den)
    inv_sqrt = np.sqrt(inv_den)

    diff_hat = pr * new_hat
    diff_hat *= np.float32(fz_ref)
    tmp = pn * ref_hat
    tmp *= np.float32(fz_new)
    diff_hat -= tmp
    diff_hat *= inv_sqrt
    del inv_sqrt

    # S_n and S_r reuse the buffers of the image spectra: each is transformed once.
    np.conjugate(pn, out=pn)
    new_hat *= pn
    pr2 *= inv_den
    pr2 *= np.float32(fz_new * fz_ref**2)
    new_hat *= pr2
    np.conjugate(pr, out=pr)
    ref_hat *= pr
    pn2 *= inv_den
    pn2 *= np.float32(fz_ref * fz_new**2)
    ref_hat *= pn2
    del pn, pr, pn2, pr2, inv_den

    vn_hat *= kn2_hat
    vr_hat *= kr2_hat
    vn_hat += vr_hat
    del vr_hat, kn2_hat, kr2_hat, tmp
    t3 = clock()

    diff = sfft.irfft2(diff_hat, s=shape, workers=workers, overwrite_x=True)
    score_new = sfft.irfft2(new_hat, s=shape, workers=workers, overwrite_x=True)
    score_ref = sfft.irfft2(ref_hat, s=shape, workers=workers, overwrite_x=True)
    var_source = sfft.irfft2(vn_hat, s=shape, workers=workers, overwrite_x=True)
    del diff_hat, new_hat, ref_hat, vn_hat
    t4 = clock()

    # Round-off makes the convolution of non-negative images slightly negative in places.
    np.maximum(var_source, 0, out=var_source)
    variance = var_source + np.float32(kernels.f_s)
    sx, sy = astrometric_sigma
    var_ast = None
    if sx > 0 or sy > 0:
        # The central differences are twice the derivative: hence the factor 1/4.
        var_ast = _central_difference_sq_sum((score_new, score_ref), axis=1)
        var_ast *= np.float32(sx**2 / 4)
        if sy > 0:
            gy = _central_difference_sq_sum((score_new, score_ref), axis=0)
            gy *= np.float32(sy**2 / 4)
            var_ast += gy
            del gy
        variance += var_ast
    score_new -= score_ref
    t5 = clock()
    if timings is not None:
        for stage, dt in (("psf_spectra", t1 - t0), ("forward_fft", t2 - t1),
                          ("spectral_products", t3 - t2), ("inverse_fft", t4 - t3),
                          ("variance_terms", t5 - t4)):
            timings[stage] = timings.get(stage, 0.0) + dt
    return TileProducts(diff=diff, score=score_new, variance=variance,
                        var_source=var_source, var_astrometric=var_ast)
