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
    psf_d_phased : ndarray, shape (n, n, S, S)
        P_D of a point source at the sub-pixel phases ``(phase_centres(n)[j],
        phase_centres(n)[i])`` (dy, dx) from the central pixel, from the new image's PSF
        evaluated at those phases (on ``psf_d``'s scale); ``psf_d[None, None]`` when no
        phase-sampled PSF was given.
    kn2, kr2 : ndarray
        Squares of the real-space kernels k_n, k_r (eqs. 26-27), centred, odd-sided,
        cropped to their support; convolving the source variance images with them gives
        V(S_n), V(S_r).
    """

    f_d: float
    f_s: float
    psf_d: np.ndarray
    kn2: np.ndarray
    kr2: np.ndarray
    psf_d_phased: np.ndarray


def zogy_kernels(psf_new: np.ndarray, psf_ref: np.ndarray, sigma_new: float,
                 sigma_ref: float, fz_new: float, fz_ref: float, grid: int,
                 psf_new_phased: np.ndarray | None = None) -> ZogyKernels:
    """Kernels, P_D, F_D and F_S on a ``grid`` x ``grid`` float64 grid.

    The grid must hold the kernels' support (a few PSF widths); the discrete sums are
    then exact, whatever the size of the image they are applied to.

    ``psf_new_phased`` (n, n, S, S), optional: the new image's PSF centred at the sub-pixel
    phases of :func:`pipeline.measure.psf.phase_centres` (on ``psf_new``'s scale).  A
    source at phase p appears in D as ``K * P_n(p)`` (K the kernel applied to N), so
    P_D at that phase comes from P_n(p) itself rather than from shifting the centred
    P_D, which aliases for a near-Nyquist-sampled PSF.
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
    norm = psf_d.sum()
    if psf_new_phased is None:
        phased = (psf_d / norm)[None, None]
    else:
        n = psf_new_phased.shape[0]
        stack = psf_new_phased.reshape(n * n, h, w).astype(np.float64)
        embedded = np.zeros((n * n, *shape))
        embedded[:, ((np.arange(h) - h // 2) % grid)[:, None], ((np.arange(w) - w // 2) % grid)[None, :]] = stack
        transfer = fz_new * fz_ref * pr / (f_d * np.sqrt(den))
        full = np.fft.fftshift(np.fft.irfft2(np.fft.rfft2(embedded) * transfer, s=shape), axes=(-2, -1))
        phased = (full[:, c - h // 2: c - h // 2 + h, c - w // 2: c - w // 2 + w] / norm).reshape(n, n, h, w)
    return ZogyKernels(f_d=float(f_d), f_s=f_s, psf_d=psf_d / norm,
                       kn2=_crop_compact(np.fft.fftshift(kn**2)),
                       kr2=_crop_compact(np.fft.fftshift(kr**2)), psf_d_phased=phased)


def _crop_compact(image: np.ndarray, lost: float = 1e-5) -> np.ndarray:
    """Smallest centred odd square of ``image`` (>= 0, centred at size // 2) holding all
    but ``lost`` of its sum: the squared kernels are compact, and the cost of their
    spectra grows with their size."""
    c = image.shape[0] // 2
    total = image.sum()
    for half in range(1, c):
        box = image[c - half: c + half + 1, c - half: c + half + 1]
        if total - box.sum() <= lost * total:
            return box
    return image[c - (c - 1): c + c, c - (c - 1): c + c]


@dataclass
class TileProducts:
    """Images computed on one tile, cropped to its inner part (float32)."""

    diff: np.ndarray
    score: np.ndarray
    variance: np.ndarray


def _stamp_row_spectra(stamps: list[np.ndarray], height: int, width: int) -> np.ndarray:
    """Row transforms of stamps centred at (0, 0) of a ``width``-wide grid, each padded to
    ``height`` (odd) rows, side by side: shape (height, len(stamps) * (width // 2 + 1))."""
    rows = np.zeros((len(stamps), height, width), dtype=np.float32)
    for k, stamp in enumerate(stamps):
        h, w = stamp.shape
        top = (height - h) // 2
        rows[k, top: top + h][:, (np.arange(w) - w // 2) % width] = stamp
    spectra = sfft.rfft(rows, axis=2, workers=1)
    return np.concatenate(list(spectra), axis=1)


def stamp_spectrum(stamp: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``rfft2`` of a small centred stamp zero-padded to ``shape``, centre at (0, 0)."""
    height = stamp.shape[0]
    return _column_dft(shape[0], height) @ _stamp_row_spectra([stamp], height, shape[1])


def _column_dft(size: int, height: int) -> np.ndarray:
    """DFT matrix (size x height) along the columns for rows -height//2 .. height//2.

    The stamps have few non-zero rows, so their column transforms are a matrix product
    (BLAS) done block by block with the products that use them: several times cheaper
    than an FFT of the padded stamp, and the full-size PSF spectra never exist.
    """
    offsets = np.arange(height) - height // 2
    phase = np.outer(np.arange(size), offsets) * (-2 * np.pi / size)
    return np.exp(1j * phase).astype(np.complex64)


def _central_difference_sq(image: np.ndarray, inner: tuple[slice, slice],
                           axis: int) -> np.ndarray:
    """Squared central difference along ``axis`` of the periodic ``image`` over
    ``inner``, i.e. (2 * derivative)^2; what lies beyond the array's ends wraps around.

    Central differences instead of spectral derivatives: four more inverse FFTs would
    double the cost of the astrometric term, and S is smooth (it is filtered by both
    PSFs), so the difference underestimates the slope by a few percent at most.
    """
    part = inner[axis]
    n = image.shape[axis]
    out = np.empty((inner[0].stop - inner[0].start, inner[1].stop - inner[1].start),
                   dtype=image.dtype)

    def source(index: slice) -> tuple[slice, slice]:
        return (index, inner[1]) if axis == 0 else (inner[0], index)

    def target(index: slice) -> tuple[slice, slice]:
        return (index, slice(None)) if axis == 0 else (slice(None), index)

    lo, hi = max(part.start, 1), min(part.stop, n - 1)
    np.subtract(image[source(slice(lo + 1, hi + 1))], image[source(slice(lo - 1, hi - 1))],
                out=out[target(slice(lo - part.start, hi - part.start))])
    if part.start == 0:
        np.subtract(image[source(slice(1, 2))], image[source(slice(n - 1, n))],
                    out=out[target(slice(0, 1))])
    if part.stop == n:
        np.subtract(image[source(slice(0, 1))], image[source(slice(n - 2, n - 1))],
                    out=out[target(slice(-1, None))])
    return np.multiply(out, out, out=out)


def subtract_tile(new: np.ndarray, ref: np.ndarray, var_new: np.ndarray, var_ref: np.ndarray,
                  fft_shape: tuple[int, int], inner: tuple[slice, slice],
                  psf_new: np.ndarray, psf_ref: np.ndarray, kernels: ZogyKernels,
                  sigma_new: float, sigma_ref: float, fz_new: float, fz_ref: float,
                  astrometric_sigma: tuple[float, float], workers: int = 1,
                  timings: dict[str, float] | None = None, block_rows: int = 16,
                  psf_error: float = 0.0) -> TileProducts:
    """D, S and the variance of S on one tile.

    Parameters
    ----------
    new, ref : ndarray, float32
        Background-subtracted, registered image windows (bad pixels already 0).  They are
        zero-padded (background) to ``fft_shape`` at their far ends, so ``fft_shape``
        must exceed the window by twice the kernels' reach to avoid wrap-around.
    var_new, var_ref : ndarray, float32
        Variance images of the sources alone, same windows, image units squared.
    fft_shape : (int, int)
        Transform shape (fast lengths).
    inner : (slice, slice)
        The part of the window returned.
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
    block_rows : int
        Spectrum rows processed together (all intermediates stay in cache).
    psf_error : float
        Fractional PSF-model error: ``(psf_error * S_r)**2`` joins the variance
        (see :class:`pipeline.subtraction.zogy.ZogyConfig`).
    """
    clock = time.perf_counter
    t0 = clock()
    height, width = fft_shape
    half_width = width // 2 + 1
    new_hat = sfft.rfft2(new, s=fft_shape, workers=workers)
    ref_hat = sfft.rfft2(ref, s=fft_shape, workers=workers)
    vn_hat = sfft.rfft2(var_new, s=fft_shape, workers=workers)
    vr_hat = sfft.rfft2(var_ref, s=fft_shape, workers=workers)
    t1 = clock()

    # a = F_r P_r, b = F_n P_n: the flux scalings go into the stamps.
    stamps = [fz_new * psf_new, fz_ref * psf_ref, kernels.kn2, kernels.kr2]
    stamp_rows = max(stamp.shape[0] for stamp in stamps)
    row_spectra = _stamp_row_spectra(stamps, stamp_rows, width)
    column_dft = _column_dft(height, stamp_rows)
    var_n2, var_r2 = np.float32(sigma_new**2), np.float32(sigma_ref**2)
    diff_hat = np.empty_like(new_hat)
    for r0 in range(0, height, block_rows):
        rows = slice(r0, min(r0 + block_rows, height))
        spectra = column_dft[rows] @ row_spectra
        b, a, kn2, kr2 = (spectra[:, k * half_width: (k + 1) * half_width]
                          for k in range(4))
        n_hat, r_hat = new_hat[rows], ref_hat[rows]
        a2 = a.real * a.real
        a2 += a.imag * a.imag
        b2 = b.real * b.real
        b2 += b.imag * b.imag
        inv_den = a2 * var_n2
        inv_den += b2 * var_r2
        inv_den += _TINY
        np.reciprocal(inv_den, out=inv_den)
        d_hat = np.multiply(a, n_hat, out=diff_hat[rows])
        d_hat -= b * r_hat
        d_hat *= np.sqrt(inv_den)
        # S_n = conj(b)|a|^2 N / den and S_r = conj(a)|b|^2 R / den, in place.
        a2 *= inv_den
        b2 *= inv_den
        n_hat *= b.conj()
        n_hat *= a2
        r_hat *= a.conj()
        r_hat *= b2
        vn = vn_hat[rows]
        vn *= kn2
        vn += vr_hat[rows] * kr2
    del vr_hat, row_spectra, column_dft
    t2 = clock()

    diff = sfft.irfft2(diff_hat, s=fft_shape, workers=workers, overwrite_x=True)[inner]
    score_new = sfft.irfft2(new_hat, s=fft_shape, workers=workers, overwrite_x=True)
    score_ref = sfft.irfft2(ref_hat, s=fft_shape, workers=workers, overwrite_x=True)
    variance = sfft.irfft2(vn_hat, s=fft_shape, workers=workers, overwrite_x=True)[inner]
    del diff_hat, new_hat, ref_hat, vn_hat
    t3 = clock()

    # Round-off makes the convolution of the source variance slightly negative in places.
    np.maximum(variance, 0, out=variance)
    variance += np.float32(kernels.f_s)
    sx, sy = astrometric_sigma
    # The central differences are twice the derivatives: hence sigma^2 / 4.
    for axis, sigma in ((1, sx), (0, sy)):
        if sigma > 0:
            for score_part in (score_new, score_ref):
                delta2 = _central_difference_sq(score_part, inner, axis)
                delta2 *= np.float32(sigma**2 / 4)
                variance += delta2
    if psf_error > 0:
        model_term = np.square(score_ref[inner])
        model_term *= np.float32(psf_error ** 2)
        variance += model_term
    score = np.subtract(score_new[inner], score_ref[inner])
    t4 = clock()
    if timings is not None:
        for stage, dt in (("forward_fft", t1 - t0), ("spectral_products", t2 - t1),
                          ("inverse_fft", t3 - t2), ("variance_terms", t4 - t3)):
            timings[stage] = timings.get(stage, 0.0) + dt
    return TileProducts(diff=diff, score=score, variance=variance)
