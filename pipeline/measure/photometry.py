r"""PSF-fit photometry at given positions, vectorised over thousands of sources.

:func:`psf_photometry` fits the amplitude of a :class:`pipeline.measure.psf.PSFModel` (optionally
with a local constant background, optionally refining the positions) to every source at
once: the stamps of all sources are gathered into one (N, S, S) array and every fit is a
closed-form weighted linear least-squares solution over it, so there is no Python loop
over sources.  :func:`forced_photometry` does the same at sky positions through a WCS
(difference images, upper limits at non-detections).

The fit
-------
For a source with PSF stamp :math:`P_i` (the model at the source position, sampled on the
image pixels, unit total sum, so the amplitude is the total flux) and background-subtracted
pixels :math:`d_i` with variance :math:`V_i`, the flux is

.. math:: \hat f = \frac{\sum_i w_i P_i d_i}{\sum_i w_i P_i^2},\qquad
          \sigma_f^2 = \frac{\sum_i w_i^2 P_i^2 V_i}{(\sum_i w_i P_i^2)^2}.

A first pass weights by the sky variance alone; the second by :math:`1/V_i` with
:math:`V_i = \sigma_{\rm sky,i}^2 + \max(\hat f P_i, 0)/g` from the first pass's *model*
(weights from the data themselves would correlate with the noise and bias bright fluxes).
Masked pixels get zero weight (and raise a flag); the fit uses the pixels within
``fit_radius_fwhm`` FWHMs of the source (the box where nearly all the information is, and
few neighbours).

Goodness of fit (the matchfiles' and IRSA's ``chi`` and ``sharp``)
-----------------------------------------------------------------
``chi2`` is the reduced chi-square of the final fit,
:math:`\sum_i (d_i - \hat f P_i)^2 / V_i \,/\, (n_{\rm pix} - n_{\rm par})` over the fitted
pixels, with the variance :math:`V_i` of the weights above: about 1 for an isolated point
source, above for blends, galaxies, cosmic rays and bright stars whose PSF model errors
exceed the noise.  (DAOPHOT's CHI is the ratio of the observed to the expected scatter,
about the square root of this.)

``sharpness`` comes from a second linear fit of :math:`a P + b\,\nabla^2 P` to the same
pixels with the same weights: a Gaussian of variance :math:`\sigma^2 + \delta` is
:math:`P + (\delta/2)\nabla^2 P` to first order, so ``sharpness``
:math:`= 2b / (a\sigma^2) = \delta / \sigma^2` (:math:`\sigma` from the PSF's FWHM / 2.3548)
is the fractional excess of the source's squared width over the PSF's.  It has DAOPHOT's
SHARP's meaning and signs: about 0 for point sources (its scatter falls as 1/(S/N)),
positive for resolved objects (galaxies: +0.5 to +1.2 on the simulator's at a 2" seeing),
negative for cosmic rays and hot pixels (a one-pixel spike: below -1).

Position refinement (``fit_positions``) fits :math:`a P + b_x \partial_x P + b_y \partial_y P`
(the model's own derivatives, exact through the Fourier shift) and moves each source by
:math:`(b_x, b_y)/a`, a few Gauss-Newton iterations.
"""
from __future__ import annotations

import math

import numpy as np
import sep
from astropy.table import Table

from pipeline.core.config import PhotometryConfig
from pipeline.core.image import MASK_BITS
from pipeline.measure.psf import PSFModel, pixel_values

__all__ = ["PHOT_FLAGS", "PhotometryConfig", "PhotometryError", "psf_photometry",
           "forced_photometry", "estimate_background", "flux_to_mag"]

#: Bits of the ``flags`` column of :func:`psf_photometry`.
PHOT_FLAGS = {
    "MASKED": 1,          # masked (bad, bleed, NaN) pixels in the fit box were left out
    "SATURATED": 2,       # a saturated pixel in the fit box (left out of the fit)
    "EDGE": 4,            # the fit box runs off the image
    "OFF_IMAGE": 8,       # the centre is off the image: no measurement
    "NO_FIT": 16,         # too few usable pixels: flux is NaN
    "POSITION_RESET": 32,  # the position fit diverged; the input position was kept
}

_FIT_FAILED = PHOT_FLAGS["OFF_IMAGE"] | PHOT_FLAGS["NO_FIT"]
_CHUNK = 2048  # sources per batch: bounds the memory of the (N, S, S) stamp arrays


class PhotometryError(ValueError):
    """Inputs photometry cannot work on (shapes, units, missing noise)."""


def estimate_background(data: np.ndarray, mask: np.ndarray | None = None, mesh: int = 128,
                        filter_size: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Sky level and sky RMS maps (ADU, float32) with sep, as :mod:`pipeline.measure.extract` does."""
    image = np.ascontiguousarray(data, dtype=np.float32)
    bad = ~np.isfinite(image)
    if mask is not None:
        bad |= np.asarray(mask) != 0
    image = np.where(bad, 0.0, image).astype(np.float32)
    try:
        background = sep.Background(image, mask=bad, bw=mesh, bh=mesh, fw=filter_size, fh=filter_size)
    except Exception as exc:  # sep raises bare Exception subclasses
        raise PhotometryError(f"background estimation failed: {exc}") from None
    return background.back(), background.rms()


def flux_to_mag(flux, fluxerr, zeropoint: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Magnitudes ``zeropoint - 2.5 log10(flux)`` and errors; NaN where flux <= 0."""
    flux = np.asarray(flux, dtype=np.float64)
    positive = flux > 0
    safe = np.where(positive, flux, 1.0)
    mag = np.where(positive, zeropoint - 2.5 * np.log10(safe), np.nan)
    magerr = np.where(positive, 2.5 / math.log(10) * np.asarray(fluxerr) / safe, np.nan)
    return mag, magerr


def psf_photometry(data: np.ndarray, psf: PSFModel, x, y, *, variance, background=0.0,
                   gain: float | None = None, mask: np.ndarray | None = None,
                   saturate: float | None = None, fit_positions: bool = False,
                   config: PhotometryConfig = PhotometryConfig()) -> Table:
    """PSF-fit fluxes of sources at given positions.

    Parameters
    ----------
    data : ndarray
        Image, ADU.
    psf : PSFModel
    x, y : array_like
        1-based positions (FITS convention, as XWIN_IMAGE/YWIN_IMAGE).
    variance : float or ndarray
        Variance of the pixels without the sources' own light (sky + read noise; for a
        difference image its variance map), ADU^2, scalar or map.
    background : float or ndarray
        Sky level subtracted before the fit (0 for a difference image).
    gain : float, optional
        e-/ADU: adds the sources' Poisson variance ``flux * P / gain``.  None leaves it out.
    mask : ndarray, optional
        Bit mask (0 = good, :data:`pipeline.core.image.MASK_BITS`).
    saturate : float, optional
        Pixels at or above (in ``data``) are left out and flagged SATURATED.
    fit_positions : bool
        Refine positions (a few linearised iterations) before the final flux fit.
    config : PhotometryConfig

    Returns
    -------
    Table
        One row per input position: ``x``, ``y`` (fitted or input, 1-based), ``xerr``,
        ``yerr`` (NaN without ``fit_positions``), ``flux``, ``fluxerr`` (ADU), ``snr``,
        ``mag``, ``magerr`` (instrumental, NaN for flux <= 0), ``chi2`` (reduced),
        ``sharpness``, ``sky`` (fitted local sky offset, 0 unless ``fit_background``),
        ``npix`` (pixels fitted), ``flags`` (:data:`PHOT_FLAGS`).
    """
    data = np.asarray(data)
    if data.ndim != 2:
        raise PhotometryError(f"image must be 2-D, got shape {data.shape}")
    for name, value in (("variance", variance), ("background", background), ("mask", mask)):
        if value is not None and np.ndim(value) != 0 and np.shape(value) != data.shape:
            raise PhotometryError(f"{name} shape {np.shape(value)} differs from image shape {data.shape}")
    if gain is not None and not gain > 0:
        raise PhotometryError(f"gain must be positive, got {gain}")
    x = np.atleast_1d(np.asarray(x, dtype=np.float64)).copy()
    y = np.atleast_1d(np.asarray(y, dtype=np.float64)).copy()
    if x.shape != y.shape or x.ndim != 1:
        raise PhotometryError(f"x and y must be 1-D of equal length, got {x.shape} and {y.shape}")
    h = int(min(psf.halfsize, max(config.min_fit_halfsize, math.ceil(config.fit_radius_fwhm * psf.fwhm))))
    image = _ImageView(data, variance, background, mask, saturate)
    parts = [_measure_chunk(image, psf, x[s], y[s], h, gain, fit_positions, config)
             for s in (slice(i, i + _CHUNK) for i in range(0, max(len(x), 1), _CHUNK))]
    columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    columns["mag"], columns["magerr"] = flux_to_mag(columns["flux"], columns["fluxerr"])
    order = ["x", "y", "xerr", "yerr", "flux", "fluxerr", "snr", "mag", "magerr", "chi2",
             "sharpness", "sky", "npix", "flags"]
    table = Table({k: columns[k] for k in order})
    for name in ("x", "y", "xerr", "yerr"):
        table[name].unit = "pix"
    for name in ("flux", "fluxerr", "sky"):
        table[name].unit = "adu"
    table.meta["FITHALF"] = h
    return table


def forced_photometry(data: np.ndarray, psf: PSFModel, wcs, ra, dec, **kwargs) -> Table:
    """:func:`psf_photometry` at fixed sky positions (deg) through the image's WCS.

    Keyword arguments are those of :func:`psf_photometry` (``fit_positions`` is refused:
    forced photometry keeps the given positions).  The table gains ``ra`` and ``dec``.
    """
    if kwargs.pop("fit_positions", False):
        raise PhotometryError("forced photometry keeps the given positions (fit_positions=False)")
    ra = np.atleast_1d(np.asarray(ra, dtype=np.float64))
    dec = np.atleast_1d(np.asarray(dec, dtype=np.float64))
    x, y = wcs.all_world2pix(ra, dec, 1)
    table = psf_photometry(data, psf, x, y, fit_positions=False, **kwargs)
    table.add_column(ra, name="ra", index=0)
    table.add_column(dec, name="dec", index=1)
    table["ra"].unit = table["dec"].unit = "deg"
    return table


class _ImageView:
    """The image and its noise/mask arrays, gathered per stamp."""

    def __init__(self, data, variance, background, mask, saturate):
        self.data, self.variance, self.background = data, variance, background
        self.mask, self.saturate = mask, saturate
        self.ny, self.nx = data.shape

    def gather(self, col0, row0, size):
        """Stamps of data - background, variance, and the per-pixel flag bits (0 = usable)."""
        offsets = np.arange(size)
        rows = row0[:, None, None] + offsets[None, :, None]
        cols = col0[:, None, None] + offsets[None, None, :]
        inside = (rows >= 0) & (rows < self.ny) & (cols >= 0) & (cols < self.nx)
        rows_c, cols_c = np.clip(rows, 0, self.ny - 1), np.clip(cols, 0, self.nx - 1)
        values = self.data[rows_c, cols_c].astype(np.float64)
        bits = np.where(inside, 0, PHOT_FLAGS["EDGE"]).astype(np.int32)
        bits |= np.where(np.isfinite(values), 0, PHOT_FLAGS["MASKED"])
        if self.saturate is not None:
            bits |= np.where(values >= self.saturate, PHOT_FLAGS["SATURATED"], 0)
        if self.mask is not None:
            m = self.mask[rows_c, cols_c]
            bits |= np.where((m & MASK_BITS["SATURATED"]) != 0, PHOT_FLAGS["SATURATED"], 0)
            bits |= np.where((m & ~MASK_BITS["SATURATED"]) != 0, PHOT_FLAGS["MASKED"], 0)
        values -= pixel_values(self.background, rows_c, cols_c)
        variance = pixel_values(self.variance, rows_c, cols_c)
        bits |= np.where(np.isfinite(variance) & (variance > 0), 0, PHOT_FLAGS["MASKED"])
        values[bits != 0] = 0.0
        variance[bits != 0] = 1.0
        return values, variance, bits


def _solve(basis: list[np.ndarray], d: np.ndarray, w: np.ndarray):
    """Weighted linear least squares per source: basis (K arrays of (N, S, S)) -> (N, K)
    coefficients and (N, K, K) inverse normal matrices; singular systems give NaN."""
    k = len(basis)
    normal = np.empty((len(d), k, k))
    rhs = np.empty((len(d), k))
    for a in range(k):
        wa = w * basis[a]
        rhs[:, a] = np.sum(wa * d, axis=(1, 2))
        for b in range(a, k):
            normal[:, a, b] = normal[:, b, a] = np.sum(wa * basis[b], axis=(1, 2))
    det_ok = np.abs(np.linalg.det(normal)) > 1e-300
    normal[~det_ok] = np.eye(k)
    inverse = np.linalg.inv(normal)
    coef = np.einsum("nab,nb->na", inverse, rhs)
    coef[~det_ok] = np.nan
    return coef, inverse


def _laplacian(stamps: np.ndarray) -> np.ndarray:
    lap = -4.0 * stamps
    lap[:, 1:, :] += stamps[:, :-1, :]
    lap[:, :-1, :] += stamps[:, 1:, :]
    lap[:, :, 1:] += stamps[:, :, :-1]
    lap[:, :, :-1] += stamps[:, :, 1:]
    return lap


def _measure_chunk(image: _ImageView, psf: PSFModel, x, y, h: int, gain, fit_positions: bool,
                   config: PhotometryConfig) -> dict:
    n = len(x)
    flags = np.zeros(n, dtype=np.int32)
    x_in, y_in = x.copy(), y.copy()
    finite = np.isfinite(x) & np.isfinite(y)
    on_image = finite & (x >= 0.5) & (x < image.nx + 0.5) & (y >= 0.5) & (y < image.ny + 0.5)
    flags[~on_image] |= PHOT_FLAGS["OFF_IMAGE"]
    x = np.where(finite, x, 1.0)
    y = np.where(finite, y, 1.0)
    xerr = yerr = np.full(n, np.nan)

    if fit_positions:
        for _ in range(config.position_iterations):
            model, col0, row0, d_x, d_y = psf.render(x, y, h, derivatives=True)
            d, var, bits = image.gather(col0, row0, 2 * h + 1)
            w = np.where(bits == 0, 1.0 / var, 0.0)
            coef, inverse = _solve([model, d_x, d_y], d, w)
            amplitude = coef[:, 0]
            ok = np.isfinite(amplitude) & (amplitude > 0)
            step_x = np.where(ok, np.clip(coef[:, 1] / np.where(ok, amplitude, 1.0), -0.5, 0.5), 0.0)
            step_y = np.where(ok, np.clip(coef[:, 2] / np.where(ok, amplitude, 1.0), -0.5, 0.5), 0.0)
            x, y = x + step_x, y + step_y
        with np.errstate(invalid="ignore", divide="ignore"):
            xerr = np.sqrt(inverse[:, 1, 1]) / amplitude
            yerr = np.sqrt(inverse[:, 2, 2]) / amplitude
        reset = ~ok | (np.hypot(x - x_in, y - y_in) > config.max_position_shift)
        reset &= on_image
        flags[reset] |= PHOT_FLAGS["POSITION_RESET"]
        x, y = np.where(reset, x_in, x), np.where(reset, y_in, y)
        xerr, yerr = np.where(reset, np.nan, xerr), np.where(reset, np.nan, yerr)
        x, y = np.where(finite, x, 1.0), np.where(finite, y, 1.0)

    model, col0, row0 = psf.render(x, y, h)
    d, sky_var, bits = image.gather(col0, row0, 2 * h + 1)
    usable = bits == 0
    for name in ("MASKED", "SATURATED", "EDGE"):
        flags |= np.where(np.any(bits & PHOT_FLAGS[name], axis=(1, 2)), PHOT_FLAGS[name], 0)
    basis = [model] + ([np.ones_like(model)] if config.fit_background else [])
    w = np.where(usable, 1.0 / sky_var, 0.0)
    coef, inverse = _solve(basis, d, w)
    if gain is not None:
        # Second pass: weights with the source's Poisson variance from the first pass's model.
        source_var = np.maximum(coef[:, :1, None] * model, 0.0) / gain
        source_var[~np.isfinite(source_var)] = 0.0
        w = np.where(usable, 1.0 / (sky_var + source_var), 0.0)
        coef, inverse = _solve(basis, d, w)
        total_var = sky_var + np.maximum(np.nan_to_num(coef[:, :1, None]) * model, 0.0) / gain
    else:
        total_var = sky_var
    # Error of the weighted estimator with the final model's variance.
    sandwich = [[np.sum(w * w * total_var * a * b, axis=(1, 2)) for b in basis] for a in basis]
    cov_flux = sum(inverse[:, 0, a] * inverse[:, 0, b] * sandwich[a][b]
                   for a in range(len(basis)) for b in range(len(basis)))
    flux = coef[:, 0]
    fluxerr = np.sqrt(np.maximum(cov_flux, 0.0))
    fitted = sum(coef[:, k, None, None] * basis[k] for k in range(len(basis)))
    npix = usable.sum(axis=(1, 2))
    chi2 = (np.sum(np.where(usable, (d - fitted) ** 2 / total_var, 0.0), axis=(1, 2))
            / np.maximum(npix - len(basis), 1))
    sharp_coef, _ = _solve([model, _laplacian(model)] + basis[1:], d, w)
    sigma2 = (psf.fwhm / 2.3548200450309493) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        sharpness = 2.0 * sharp_coef[:, 1] / (sharp_coef[:, 0] * sigma2)

    covered = np.sum(np.where(usable, model, 0.0), axis=(1, 2)) / np.maximum(model.sum(axis=(1, 2)), 1e-30)
    flags |= np.where((covered < config.min_good_fraction) | ~np.isfinite(flux), PHOT_FLAGS["NO_FIT"], 0)
    failed = (flags & _FIT_FAILED) != 0
    nan = np.where(failed, np.nan, 1.0)
    sky = coef[:, 1] if config.fit_background else np.zeros(n)
    return {"x": np.where(finite, x, x_in), "y": np.where(finite, y, y_in), "xerr": xerr, "yerr": yerr,
            "flux": flux * nan, "fluxerr": fluxerr * nan, "snr": flux / fluxerr * nan,
            "chi2": chi2 * nan, "sharpness": sharpness * nan, "sky": sky * nan,
            "npix": np.where(failed, 0, npix), "flags": flags}
