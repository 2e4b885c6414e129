r"""Forced PSF photometry on a ZOGY proper difference image (pure).

ZOGY's D has white noise of unit variance and the PSF P_D (one per subtraction tile, unit
sum); a point source of flux f in the common photometric system adds ``f F_D P_D`` to it.
The optimal flux at a fixed position is therefore the amplitude of P_D at the sub-pixel
position, fitted to D and divided by F_D (ZOGY eqs. 41-42, the same estimator as the
candidates' ``flux``).  P_D at the position is the tile's P_D tabulated at the nearest
sub-pixel phase (made from the science PSF evaluated at that phase), Fourier-shifted by
the remainder (at most 0.1 px): shifting the centred P_D by up to half a pixel instead
aliases a near-Nyquist-sampled PSF and fitted bright fluxes 0.2-0.5 % low.

.. math:: \hat f = \frac{\sum_i P_i D_i}{F_D \sum_i P_i^2},\qquad
          \sigma_{\rm bkg}^2 = \frac{s_D^2}{F_D^2 \sum_i P_i^2}

with ``s_D`` the measured robust rms of D (1 in theory; measured so that an imperfect
noise model still gives honest errors).  The source and registration noise (the part of
ZOGY's ``alpha_std`` above its background-only level ``1/sqrt(F_S)``) is added in
quadrature from the archived uncertainty map at the position, so bright transients and
variable stars on top of bright stars get their Poisson share.

Pixels that are NaN in the stamp (flagged near bad pixels when archived, or off the image)
get zero weight; the fit box is ``2 h + 1`` pixels with ``h = max(5, ceil(r FWHM(P_D)))``.
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.measure.psf import fourier_shift, nearest_phase

__all__ = ["FIT_STATUS", "fit_half_size", "forced_psf_fit"]

#: Bits returned per position by :func:`forced_psf_fit`.
FIT_STATUS = {
    "BAD_PIXELS": 1,     # NaN (flagged or masked) pixels inside the fit box were left out
    "EDGE": 2,           # the fit box runs off the image
    "NO_FIT": 4,         # less than half of P_D's weight on usable pixels: no measurement
}
_MIN_HALF = 5
_SHIFT_MARGIN = 4


def fit_half_size(fwhm_px: float, fit_radius_fwhm: float, psf_half: int) -> int:
    """Half-size of the fit box: ``fit_radius_fwhm`` FWHMs, at least 5 px, at most P_D's."""
    return int(min(psf_half, max(_MIN_HALF, math.ceil(fit_radius_fwhm * fwhm_px))))


def forced_psf_fit(stamps: np.ndarray, inside: np.ndarray, psf_d: np.ndarray, f_d, f_s, dx, dy,
                   diff_rms: float, alpha_std) -> dict[str, np.ndarray]:
    """PSF-fit fluxes at fixed sub-pixel positions on difference-image stamps.

    Parameters
    ----------
    stamps : (N, S, S) ndarray
        D around each position, centred on the pixel nearest to it (NaN: unusable pixel).
    inside : (N, S, S) bool ndarray
        Whether each stamp pixel lies on the image.
    psf_d : (N, n, n, P, P) or (N, P, P) ndarray
        P_D of each position's tile tabulated at the sub-pixel phases of
        :func:`pipeline.measure.psf.phase_centres` (``ZogyTile.psf_d_phased``), or centred
        only (P >= S, odd); a memory map is read only at the phases used.
    f_d, f_s : (N,) array_like
        The tiles' flux scalings of D and of S.
    dx, dy : (N,) array_like
        Position minus the stamp's central pixel, px (|d| <= 0.5).
    diff_rms : float
        Robust rms of D over the image (unit variance in theory).
    alpha_std : (N,) array_like
        ZOGY's flux uncertainty at the position's pixel (common system).

    Returns
    -------
    dict
        ``flux``, ``fluxerr`` (common system; NaN without a fit), ``chi2`` (reduced, on
        D's measured rms), ``npix`` and ``status`` (:data:`FIT_STATUS` bits).
    """
    n, size = stamps.shape[0], stamps.shape[-1]
    status = np.zeros(n, dtype=np.int32)
    if n == 0:
        empty = np.zeros(0)
        return {"flux": empty, "fluxerr": empty, "chi2": empty, "npix": np.zeros(0, int), "status": status}
    c, h = psf_d.shape[-1] // 2, size // 2
    dx = np.asarray(dx, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    if psf_d.ndim == 5:
        ix, dx = nearest_phase(dx, psf_d.shape[2])
        iy, dy = nearest_phase(dy, psf_d.shape[1])
        psf_d = psf_d[np.arange(n), iy, ix]
    # The shift is done on P_D cropped to the fit box plus a margin (the transform's cost
    # goes with the stamp's area: 3x less for the usual box); the margin keeps the crop's
    # wrap-around, where P_D is ~1e-3 of its peak, away from the fitted pixels.
    k = min(c, h + _SHIFT_MARGIN)
    crop = np.asarray(psf_d[:, c - k:c + k + 1, c - k:c + k + 1], dtype=np.float64)
    model = fourier_shift(crop, dx, dy)[:, k - h:k + h + 1, k - h:k + h + 1]
    d = np.asarray(stamps, dtype=np.float64)
    usable = np.isfinite(d) & inside
    status |= np.where(np.any(~inside, axis=(1, 2)), FIT_STATUS["EDGE"], 0)
    status |= np.where(np.any(inside & ~np.isfinite(d), axis=(1, 2)), FIT_STATUS["BAD_PIXELS"], 0)
    w = usable.astype(np.float64)
    d = np.where(usable, d, 0.0)
    spp = np.sum(w * model * model, axis=(1, 2))
    spd = np.sum(w * model * d, axis=(1, 2))
    full = np.sum(model * model, axis=(1, 2))
    npix = usable.sum(axis=(1, 2))
    f_d = np.asarray(f_d, dtype=np.float64)
    f_s = np.asarray(f_s, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        amplitude = spd / spp
        flux = amplitude / f_d
        background_err = diff_rms / (f_d * np.sqrt(spp))
        # Source and registration noise: ZOGY's total flux variance above its background part.
        excess = np.maximum(np.asarray(alpha_std, dtype=np.float64) ** 2 - 1.0 / f_s, 0.0)
        fluxerr = np.sqrt(background_err ** 2 + np.nan_to_num(excess))
        chi2 = np.sum(w * (d - amplitude[:, None, None] * model) ** 2, axis=(1, 2)) / (
            diff_rms ** 2 * np.maximum(npix - 1, 1))
    no_fit = ~(spp >= 0.5 * full) | ~np.isfinite(flux)
    status |= np.where(no_fit, FIT_STATUS["NO_FIT"], 0)
    nan = np.where(no_fit, np.nan, 1.0)
    return {"flux": flux * nan, "fluxerr": fluxerr * nan, "chi2": chi2 * nan, "npix": npix, "status": status}
