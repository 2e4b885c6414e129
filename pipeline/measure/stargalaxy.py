r"""A star/galaxy probability of sources on an image from their light concentration
against the local PSF's (the alert field ``classtar``, SExtractor's CLASS_STAR in ZTF).

sep has no CLASS_STAR (SExtractor's neural network), and no library of the field scores
a source against a spatially varying PSF model, so the score is a two-hypothesis
likelihood ratio on one measured quantity, written here:

- The concentration ``c = F(r_in) / F(r_out)``: the ratio of the background-subtracted
  flux in two circular apertures (sep, exact overlap) centred on the position, radii
  ``inner_fwhm`` and ``outer_fwhm`` times the PSF model's FWHM.  The PSF's own
  concentration ``c_psf`` is measured the same way on the PSF model rendered at the same
  position and sub-pixel phase.  A galaxy, broader than the PSF, is less concentrated:
  the deficit ``delta = c_psf - c`` is about 0 for a star and positive for a galaxy.
- Its noise ``sigma`` from the apertures' errors (the image's RMS map and, with a gain,
  the sources' Poisson noise), the inner flux being part of the outer:
  ``var(c) = (e_in^2 (1 - 2 c) + c^2 e_out^2) / F_out^2``, plus a PSF-model error
  ``psf_error * c_psf`` in quadrature.
- Star: ``delta ~ N(0, sigma^2)``; galaxy: ``delta ~ N(delta_g, sigma^2)``, with
  ``delta_g`` the deficit of a Gaussian ``galaxy_broadening`` times wider than a Gaussian
  of the PSF's FWHM (the smallest galaxy the score is meant to call a galaxy).  With
  equal priors, ``P(star) = 1 / (1 + exp((delta delta_g - delta_g^2 / 2) / sigma^2))``.

A bright star scores near 1, a resolved galaxy near 0, and a source the noise does not
resolve, or no source at all (no positive flux in the outer aperture), 0.5: the score
says as much as the pixels do.
"""
from __future__ import annotations

import math

import numpy as np
import sep

from pipeline.measure.psf import PSFModel

__all__ = ["star_probability"]

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def _gaussian_concentration(fwhm, r_in, r_out):
    """Concentration of a circular Gaussian of this FWHM in the two apertures."""
    s2 = 2.0 * (fwhm / _FWHM_PER_SIGMA) ** 2
    return (1.0 - np.exp(-r_in**2 / s2)) / (1.0 - np.exp(-r_out**2 / s2))


def star_probability(image: np.ndarray, rms: np.ndarray, psf: PSFModel, x, y, *, mask=None,
                     gain: float | None = None, inner_fwhm: float = 0.6, outer_fwhm: float = 2.0,
                     galaxy_broadening: float = 1.3, psf_error: float = 0.01) -> np.ndarray:
    """Probability (0..1) that the source at each position is a point source.

    Parameters
    ----------
    image : ndarray
        The image, background subtracted (ADU).
    rms : ndarray
        Its background RMS map (ADU), same shape.
    psf : PSFModel
        The image's PSF model.
    x, y : array_like
        1-based (FITS) positions.
    mask : ndarray, optional
        Nonzero pixels are left out of the apertures.
    gain : float, optional
        e-/ADU, adds the sources' Poisson noise to the aperture errors.
    inner_fwhm, outer_fwhm : float
        Aperture radii in units of the local PSF FWHM.
    galaxy_broadening : float
        Width of the galaxy hypothesis relative to the PSF (> 1).
    psf_error : float
        Fractional error of the PSF model's concentration.

    Returns
    -------
    ndarray
        One probability per position (0.5 where nothing can be said).
    """
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    n = len(x)
    if not n:
        return np.zeros(0)
    image = np.ascontiguousarray(image, dtype=np.float32)
    rms = np.ascontiguousarray(rms, dtype=np.float32)
    bad = None if mask is None else np.ascontiguousarray(np.asarray(mask) != 0)
    # The radii scale with the model's FWHM; the PSF's concentration itself is measured
    # locally (measuring the FWHM at every position costs ~1 ms each).
    fwhm = float(psf.fwhm)
    r_in, r_out = inner_fwhm * fwhm, outer_fwhm * fwhm
    x0, y0 = x - 1.0, y - 1.0
    f_in, e_in, _ = sep.sum_circle(image, x0, y0, r_in, err=rms, gain=gain, mask=bad, subpix=0)
    f_out, e_out, _ = sep.sum_circle(image, x0, y0, r_out, err=rms, gain=gain, mask=bad, subpix=0)
    # The PSF at each position and sub-pixel phase, measured with the same apertures: the
    # stamps side by side in one mosaic, so sep measures them all in one call.
    stamps, col0, row0 = psf.render(x, y)
    # Zero columns between the stamps keep an aperture wider than a stamp off its neighbour.
    gap = int(math.ceil(r_out)) + 1
    padded = np.pad(stamps.astype(np.float64), ((0, 0), (0, 0), (0, gap)))
    mosaic = np.ascontiguousarray(np.concatenate(list(padded), axis=1))
    px = x0 - col0 + padded.shape[-1] * np.arange(n)
    py = y0 - row0
    p_in, _, _ = sep.sum_circle(mosaic, px, py, r_in, subpix=0)
    p_out, _, _ = sep.sum_circle(mosaic, px, py, r_out, subpix=0)
    c_psf = p_in / p_out
    with np.errstate(invalid="ignore", divide="ignore"):
        c = f_in / f_out
        var = (e_in**2 * (1.0 - 2.0 * c) + c**2 * e_out**2) / f_out**2 + (psf_error * c_psf) ** 2
        delta = c_psf - c
        delta_g = c_psf * (1.0 - _gaussian_concentration(galaxy_broadening * fwhm, r_in, r_out)
                           / _gaussian_concentration(fwhm, r_in, r_out))
        exponent = (delta * delta_g - 0.5 * delta_g**2) / var
    informative = (f_out > 0) & np.isfinite(exponent) & (var > 0)
    exponent = np.clip(np.where(informative, exponent, 0.0), -50.0, 50.0)
    return 1.0 / (1.0 + np.exp(exponent))
