r"""Empirical point-spread-function models built from the stars of an image.

:func:`build_psf` stacks bright, isolated, unsaturated, round stars of the extraction
catalogue into a pixel-sampled PSF on the image's own pixel grid whose every pixel is a
low-order polynomial in the position on the image; :class:`PSFModel` evaluates it anywhere
(:meth:`PSFModel.stamp`, and :meth:`PSFModel.render` for thousands of positions at once),
measures its FWHM, and stores itself as FITS.

Why this design
---------------
*Native grid with Fourier sub-pixel shifts.*  Each star's stamp is shifted by minus its
sub-pixel offset in Fourier space (a phase ramp), so every star is centred on its central
pixel; the model is evaluated at any offset by the opposite phase ramp.  Shifting in
Fourier space is exact for a band-limited profile and the same operator is used both ways,
so the model reproduces the stars at their own offsets.  A ZTF-like PSF (FWHM 2-4 px) is
close to Nyquist-sampled: a beta = 3 Moffat of FWHM 2.6 px keeps 2 % of its Fourier
amplitude at the Nyquist frequency, and the measured cost of the aliasing is given in
the tests (PSF-fit fluxes unbiased to 0.1-0.2 %).  A supersampled grid (PSFEx,
photutils' ``EPSFBuilder``) avoids the aliasing but needs many more stars per model
pixel, an iterative solution and interpolation at evaluation time; ``EPSFBuilder`` took
tens of seconds for a few hundred stars here, against a budget of well under a second.

*A pixel-integrated analytic part.*  The model is an elliptical Moffat plus an empirical
residual table; the Moffat is integrated over each pixel (:func:`moffat_stamps`), as the
detector integrates the light, so at every sub-pixel phase it is the profile the pixels
record and the residual left to the (Fourier-shifted) table is small and smooth.  A Moffat
sampled at pixel centres instead is too peaked at some phases and too flat at others for a
FWHM of 2 px: its fit compromised (beta 3.3 for a true 3.0) and PSF-fit fluxes depended on
the sub-pixel phase (0.18 % low at the pixel centre, 0.07 % on average; zero points
0.0008 mag low).

*Spatial variation by per-pixel polynomials.*  Every star contributes to every pixel of
the centred stack, so the polynomial coefficients of all pixels come from one weighted
linear least-squares solve with a design matrix shared by all pixels (stars x terms), as
PSFEx does with its ``PSFVAR_DEGREES``.  Degree 2 (6 terms) follows a smooth seeing and
ellipticity variation across a quadrant; fewer stars give a lower degree.  The model is
normalised to unit sum at every position (the shape varies, the flux does not).

*Robustness.*  Before a stamp is shifted, its masked pixels and outliers (cosmic rays,
faint neighbours, > 5 sigma from the current model) are replaced by the model, because a
Fourier shift spreads a bad pixel over the whole stamp; two passes follow the first
(median) stack.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import scipy.fft
from astropy.io import fits
from astropy.table import Table
from scipy import ndimage, optimize
from scipy.spatial import cKDTree

from pipeline.core.config import PSFConfig

__all__ = ["PSFConfig", "PSFModel", "PSFError", "build_psf", "select_psf_stars", "fwhm_of_stamp", "pixel_values",
           "fourier_shift", "phase_centres", "nearest_phase"]

_SHIFT_MARGIN = 6


class PSFError(ValueError):
    """No PSF can be built (too few usable stars, bad input shapes) or read."""


def _n_terms(degree: int) -> int:
    return (degree + 1) * (degree + 2) // 2


@dataclass(frozen=True)
class PSFModel:
    """A pixel-sampled PSF whose pixels vary as polynomials over the image.

    Attributes
    ----------
    coefficients : ndarray, shape (n_terms, 2H+1, 2H+1)
        Polynomial coefficients of every pixel of the centred PSF stamp; term order
        1, u, v, u^2, u v, v^2, ... with ``u = (x - x_origin) / x_scale`` (1-based x).
    degree : int
    x_origin, x_scale, y_origin, y_scale : float
        Normalisation of image coordinates for the polynomial.
    n_stars : int
        Stars stacked.
    fwhm : float
        FWHM at the image centre, px (geometric mean of the major and minor axes).
    moffat : tuple of float
        (cxx, cxy, cyy, beta) of the analytic part
        ``(beta - 1) sqrt(cxx cyy - cxy^2 / 4) / pi * (1 + cxx dx^2 + cxy dx dy + cyy dy^2) ** -beta``
        (unit integral); ``coefficients`` hold the empirical residual from it.
    pixel_integrated : bool
        Whether the analytic part is integrated over each pixel (as a detector sees a
        profile; models built here) or sampled at pixel centres (models stored before
        the ``PSFMPXIN`` keyword, read as they were built).
    """

    coefficients: np.ndarray
    degree: int
    x_origin: float
    x_scale: float
    y_origin: float
    y_scale: float
    n_stars: int
    fwhm: float
    moffat: tuple[float, float, float, float]
    pixel_integrated: bool = True

    @property
    def halfsize(self) -> int:
        return self.coefficients.shape[-1] // 2

    def basis(self, x, y) -> np.ndarray:
        """Polynomial terms, shape (N, n_terms), at 1-based image positions."""
        u = (np.atleast_1d(np.asarray(x, dtype=np.float64)) - self.x_origin) / self.x_scale
        v = (np.atleast_1d(np.asarray(y, dtype=np.float64)) - self.y_origin) / self.y_scale
        return _poly_terms(u, v, self.degree)

    def residual(self, x, y, halfsize: int | None = None) -> np.ndarray:
        """The empirical residual table at positions (x, y), centred: (N, 2h+1, 2h+1)."""
        big = self.halfsize
        h = big if halfsize is None else halfsize
        cube = self.coefficients[:, big - h:big + h + 1, big - h:big + h + 1]
        size = 2 * h + 1
        return (self.basis(x, y) @ cube.reshape(len(cube), -1)).reshape(-1, size, size)

    def evaluate(self, x, y, dx, dy, halfsize: int | None = None, derivatives: bool = False):
        """The PSF of image positions (x, y) centred at offsets (dx, dy) from the central
        pixel of (2h+1)^2 stamps: the analytic part exactly, the residual table shifted in
        Fourier space (optionally with derivatives with respect to dx and dy)."""
        big = self.halfsize
        h = big if halfsize is None else int(halfsize)
        dx = np.atleast_1d(np.asarray(dx, dtype=np.float64))
        dy = np.atleast_1d(np.asarray(dy, dtype=np.float64))
        # Shifting a table cropped to h + _SHIFT_MARGIN is several times faster than the
        # full one; the cut edge rings back by < 5e-4 of the peak inside the margin.
        keep = min(big, h + _SHIFT_MARGIN)
        crop = (slice(None), slice(keep - h, keep + h + 1), slice(keep - h, keep + h + 1))
        shifted = fourier_shift(self.residual(x, y, keep), dx, dy, derivatives)
        analytic = moffat_stamps(self.moffat, dx, dy, h, derivatives, self.pixel_integrated)
        if derivatives:
            return tuple(a + r[crop] for a, r in zip(analytic, shifted))
        return analytic + shifted[crop]

    def centred(self, x, y) -> np.ndarray:
        """The PSF at positions (x, y), centred on the central pixel: shape (N, 2H+1, 2H+1)."""
        n = np.atleast_1d(np.asarray(x)).size
        return self.evaluate(x, y, np.zeros(n), np.zeros(n))

    def render(self, x, y, halfsize: int | None = None, derivatives: bool = False):
        """The PSF at many 1-based positions, on the image's pixel grid.

        Parameters
        ----------
        x, y : array_like
            1-based positions (FITS convention).
        halfsize : int, optional
            Half-size h of the returned (2h+1)^2 stamps (at most the model's); the values
            are not renormalised, so a cropped stamp sums to the PSF light it covers.
        derivatives : bool
            Also return the derivatives of the stamps with respect to the source's x and y.

        Returns
        -------
        stamps : ndarray, shape (N, 2h+1, 2h+1)
            ``stamps[n, j, i]`` is the PSF value of image pixel (column ``col0[n] + i``,
            row ``row0[n] + j``), 0-based.
        col0, row0 : ndarray of int
            0-based image column and row of each stamp's first pixel.
        dx, dy : ndarray, shape (N, 2h+1, 2h+1)
            Only with ``derivatives``.
        """
        x = np.atleast_1d(np.asarray(x, dtype=np.float64))
        y = np.atleast_1d(np.asarray(y, dtype=np.float64))
        big = self.halfsize
        h = big if halfsize is None else int(halfsize)
        if not 0 <= h <= big:
            raise ValueError(f"halfsize must be 0-{big}, got {halfsize}")
        col_c, row_c = np.rint(x - 1.0), np.rint(y - 1.0)
        stamps = self.evaluate(x, y, x - 1.0 - col_c, y - 1.0 - row_c, h, derivatives)
        col0, row0 = col_c.astype(np.int64) - h, row_c.astype(np.int64) - h
        if derivatives:
            return stamps[0], col0, row0, stamps[1], stamps[2]
        return stamps, col0, row0

    def stamp(self, x: float, y: float, size: int | None = None,
              offset: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
        """The PSF of image position (x, y) on a (size x size) stamp (odd size).

        Centred on the stamp's central pixel unless ``offset`` (dx, dy, pixels) moves it;
        the full-size stamp sums to 1.
        """
        size = self.coefficients.shape[-1] if size is None else int(size)
        if size % 2 == 0 or size < 1 or size > self.coefficients.shape[-1]:
            raise ValueError(f"size must be odd and at most {self.coefficients.shape[-1]}, got {size}")
        return self.evaluate(x, y, offset[0], offset[1], size // 2)[0]

    def fwhm_at(self, x, y) -> np.ndarray:
        """FWHM (px, geometric mean of the axes) of the PSF at 1-based positions."""
        x, y = np.atleast_1d(x), np.atleast_1d(y)
        return np.array([fwhm_of_stamp(r, self.moffat, pixel_integrated=self.pixel_integrated)
                         for r in self.residual(x, y)])

    def to_fits(self) -> fits.HDUList:
        """Primary HDU: the coefficient cube; its header carries the polynomial set-up."""
        header = fits.Header()
        header["PSFDEG"] = (self.degree, "polynomial degree of the spatial variation")
        header["PSFX0"], header["PSFXS"] = (self.x_origin, "x origin (1-based)"), (self.x_scale, "x scale")
        header["PSFY0"], header["PSFYS"] = (self.y_origin, "y origin (1-based)"), (self.y_scale, "y scale")
        header["PSFNSTAR"] = (self.n_stars, "stars stacked")
        header["PSFFWHM"] = (self.fwhm, "FWHM at the image centre, px")
        header["PSFTERMS"] = ("1 u v u2 uv v2 u3 u2v uv2 v3", "term order (first n)")
        for key, value in zip(("PSFMCXX", "PSFMCXY", "PSFMCYY", "PSFBETA"), self.moffat):
            header[key] = (value, "analytic Moffat part")
        header["PSFMPXIN"] = (bool(self.pixel_integrated), "Moffat part integrated over pixels")
        return fits.HDUList([fits.PrimaryHDU(self.coefficients.astype(np.float64), header=header)])

    @classmethod
    def from_fits(cls, hdul: fits.HDUList, source: str = "PSF HDU list") -> "PSFModel":
        """Inverse of :meth:`to_fits`; ``source`` names the file in errors."""
        hdu = hdul[0]
        try:
            degree = int(hdu.header["PSFDEG"])
            values = {k: float(hdu.header[k]) for k in ("PSFX0", "PSFXS", "PSFY0", "PSFYS", "PSFFWHM",
                                                        "PSFMCXX", "PSFMCXY", "PSFMCYY", "PSFBETA")}
            n_stars = int(hdu.header["PSFNSTAR"])
        except KeyError as exc:
            raise PSFError(f"{source}: missing PSF keyword {exc}") from None
        data = hdu.data
        if (data is None or data.ndim != 3 or data.shape[0] != _n_terms(degree)
                or data.shape[1] != data.shape[2] or data.shape[1] % 2 == 0):
            raise PSFError(f"{source}: PSF cube has shape {None if data is None else data.shape}, "
                           f"expected ({_n_terms(degree)}, odd, odd)")
        return cls(np.array(data, dtype=np.float64), degree, values["PSFX0"], values["PSFXS"],
                   values["PSFY0"], values["PSFYS"], n_stars, values["PSFFWHM"],
                   tuple(values[k] for k in ("PSFMCXX", "PSFMCXY", "PSFMCYY", "PSFBETA")),
                   bool(hdu.header.get("PSFMPXIN", False)))


def _poly_terms(u: np.ndarray, v: np.ndarray, degree: int) -> np.ndarray:
    terms = [u ** (d - k) * v ** k for d in range(degree + 1) for k in range(d + 1)]
    return np.stack(terms, axis=-1)


def fourier_shift(stamps: np.ndarray, dx, dy, derivatives: bool = False):
    """Shift stamps (N, S, S) by (dx, dy) pixels each (content moves toward +x, +y).

    With ``derivatives`` also return d(stamp)/d(dx) and d(stamp)/d(dy).  Odd S only (no
    Nyquist bin whose phase would be ambiguous).
    """
    size = stamps.shape[-1]
    ky = scipy.fft.fftfreq(size)[None, :, None]
    kx = scipy.fft.rfftfreq(size)[None, None, :]
    spectrum = scipy.fft.rfft2(stamps, workers=1)
    dx = np.asarray(dx, dtype=np.float64)[:, None, None]
    dy = np.asarray(dy, dtype=np.float64)[:, None, None]
    # The phase ramp is separable: two small exponentials instead of one per frequency.
    spectrum *= np.exp(-2j * np.pi * ky * dy).astype(spectrum.dtype)
    spectrum *= np.exp(-2j * np.pi * kx * dx).astype(spectrum.dtype)
    shifted = scipy.fft.irfft2(spectrum, s=(size, size), workers=1)
    if not derivatives:
        return shifted
    d_dx = scipy.fft.irfft2(spectrum * (-2j * np.pi * kx), s=(size, size), workers=1)
    d_dy = scipy.fft.irfft2(spectrum * (-2j * np.pi * ky), s=(size, size), workers=1)
    return shifted, d_dx, d_dy


def phase_centres(n: int) -> np.ndarray:
    """The ``n`` sub-pixel phases (px) at which a phase-sampled PSF is tabulated: the
    centres of ``n`` equal bins of [-0.5, 0.5] (0 alone for ``n = 1``)."""
    return (np.arange(n) + 0.5) / n - 0.5


def nearest_phase(d, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Index of the tabulated phase (:func:`phase_centres`) nearest to each offset ``d``
    (px, within [-0.5, 0.5]) and the remainder ``d - phase`` (at most ``0.5 / n``).

    A pixel-sampled PSF near Nyquist sampling is not band-limited: a Fourier shift of the
    centred stamp by a large fraction of a pixel aliases (a FWHM of 2 px loses 0.2-0.4 %
    of the fitted flux at half a pixel, 1.6 px over 1 %), whereas the shift by the
    remainder from the nearest tabulated phase loses little.
    """
    d = np.asarray(d, dtype=np.float64)
    index = np.clip(np.floor((d + 0.5) * n), 0, n - 1).astype(np.int64)
    return index, d - phase_centres(n)[index]


def _moffat_values(moffat, dx, dy):
    cxx, cxy, cyy, beta = moffat
    norm = (beta - 1.0) * math.sqrt(max(cxx * cyy - 0.25 * cxy * cxy, 1e-30)) / math.pi
    return norm * (1.0 + cxx * dx * dx + cxy * dx * dy + cyy * dy * dy) ** -beta


#: Gauss-Legendre nodes (px) and weights of a pixel's integral, 3 per axis.
_GL_NODES = np.array([-math.sqrt(0.6), 0.0, math.sqrt(0.6)]) / 2.0
_GL_WEIGHTS = np.array([5.0, 8.0, 5.0]) / 18.0
#: Half-size of the block around the centre integrated over the pixels: further out the
#: profile is smooth on the pixel scale and its pixel mean is its value at the centre to
#: 1e-3 of the peak.
_CORE_HALF = 3


def _moffat_sampled(moffat, ddx, ddy, derivatives: bool):
    values = _moffat_values(moffat, ddx, ddy)
    if not derivatives:
        return values
    cxx, cxy, cyy, beta = moffat
    # d/d(dx) of t^-beta with t = 1 + q(ddx, ddy) and ddx = offset - dx.
    factor = beta * values / (1.0 + cxx * ddx * ddx + cxy * ddx * ddy + cyy * ddy * ddy)
    return values, factor * (2 * cxx * ddx + cxy * ddy), factor * (2 * cyy * ddy + cxy * ddx)


def moffat_stamps(moffat, dx, dy, halfsize: int, derivatives: bool = False, pixel_integrated: bool = True):
    """Analytic elliptical Moffat (unit integral) on (2h+1)^2 stamps, centred at offsets
    (dx, dy) from the central pixel; with ``derivatives`` also its derivatives with
    respect to dx and dy.

    ``pixel_integrated``: each pixel holds the profile's mean over the pixel (Gauss-Legendre,
    3 x 3 points, over the central ``2 * _CORE_HALF + 1`` pixels; the value at the pixel
    centre further out), as a detector records it.  Sampling a near-Nyquist profile at
    pixel centres instead makes it too peaked at some sub-pixel phases and too flat at
    others (the fitted Moffat then compromises, and a PSF fit depends on the phase by
    0.1-0.2 % of the flux at a FWHM of 2 px).  False: values at pixel centres.
    """
    offsets = np.arange(-halfsize, halfsize + 1, dtype=np.float64)
    ddx = offsets[None, None, :] - np.asarray(dx, dtype=np.float64)[:, None, None]
    ddy = offsets[None, :, None] - np.asarray(dy, dtype=np.float64)[:, None, None]
    sampled = _moffat_sampled(moffat, ddx, ddy, derivatives)
    if not pixel_integrated:
        return sampled
    k = min(halfsize, _CORE_HALF)
    cols = slice(halfsize - k, halfsize + k + 1)
    cx, cy = ddx[:, :, cols], ddy[:, cols, :]
    integrated = None
    for ox, wx in zip(_GL_NODES, _GL_WEIGHTS):
        for oy, wy in zip(_GL_NODES, _GL_WEIGHTS):
            part = _moffat_sampled(moffat, cx + ox, cy + oy, derivatives)
            part = part if derivatives else (part,)
            if integrated is None:
                integrated = [wx * wy * p for p in part]
            else:
                for acc, p in zip(integrated, part):
                    acc += wx * wy * p
    out = sampled if derivatives else (sampled,)
    for full, core in zip(out, integrated):
        full[:, cols, cols] = core
    return out if derivatives else out[0]


def fit_moffat(stamps: np.ndarray, dx, dy, weights: np.ndarray, fwhm_guess: float):
    """Least-squares elliptical Moffat (cxx, cxy, cyy, beta) of flux-normalised stamps
    centred at offsets (dx, dy); ``weights`` are 1/sigma per pixel (0 = ignore)."""
    h = stamps.shape[-1] // 2
    use = weights > 0

    def residuals(p):
        return ((moffat_stamps(tuple(p), dx, dy, h) - stamps) * weights)[use]

    beta0 = 3.0
    inv_alpha2 = 4.0 * (2.0 ** (1.0 / beta0) - 1.0) / fwhm_guess ** 2
    try:
        solution = optimize.least_squares(
            residuals, [inv_alpha2, 0.0, inv_alpha2, beta0], method="trf", x_scale="jac",
            bounds=([1e-3, -10.0, 1e-3, 1.2], [10.0, 10.0, 10.0, 20.0]), max_nfev=60)
    except ValueError as exc:
        raise PSFError(f"Moffat fit to the PSF stars failed: {exc}") from None
    return tuple(float(v) for v in solution.x)


def fwhm_of_stamp(stamp: np.ndarray, moffat=None, n_angles: int = 36, upsample: int = 4,
                  pixel_integrated: bool = False) -> float:
    """FWHM (px) of a centred PSF stamp: the diameter of the circle of the same area as
    the half-maximum contour, i.e. the geometric mean of the major and minor FWHMs.

    The stamp is upsampled by zero-padding its spectrum (band-limited interpolation), the
    analytic part ``moffat`` (if given) is added exactly on the fine grid (averaged over a
    pixel around each fine point when ``pixel_integrated``, so that the FWHM is that of the
    profile the pixels record, as for a model's stamp), and the half-maximum radius is
    found along ``n_angles`` rays with a cubic spline.
    """
    size = stamp.shape[-1]
    fine = size * upsample
    spectrum = scipy.fft.fftshift(scipy.fft.fft2(stamp))
    padded = np.zeros((fine, fine), dtype=complex)
    start = fine // 2 - size // 2       # zero frequency lands on ifftshift's origin
    padded[start:start + size, start:start + size] = spectrum
    image = scipy.fft.ifft2(scipy.fft.ifftshift(padded)).real * upsample ** 2
    # Fine pixel k sits at coarse coordinate (k - centre) / upsample from the centre.
    centre = (size // 2) * upsample
    if moffat is not None:
        fine_offsets = (np.arange(fine) - centre) / upsample
        fx, fy = fine_offsets[None, None, :], fine_offsets[None, :, None]
        if pixel_integrated:
            image += sum(wx * wy * _moffat_values(moffat, fx + ox, fy + oy)[0]
                         for ox, wx in zip(_GL_NODES, _GL_WEIGHTS) for oy, wy in zip(_GL_NODES, _GL_WEIGHTS))
        else:
            image += _moffat_values(moffat, fx, fy)[0]
    half = 0.5 * image[centre, centre]
    radii = np.arange(1, (size // 2 - 1) * 16) / 16.0   # coarse px, to the stamp's edge
    angles = np.linspace(0, 2 * np.pi, n_angles, endpoint=False)
    rows = centre + upsample * radii[None, :] * np.sin(angles)[:, None]
    cols = centre + upsample * radii[None, :] * np.cos(angles)[:, None]
    profile = ndimage.map_coordinates(image, [rows.ravel(), cols.ravel()], order=3).reshape(rows.shape)
    crossing = np.argmax(profile < half, axis=1)
    if np.any(crossing == 0):
        return math.nan
    idx = np.arange(n_angles)
    p0, p1 = profile[idx, crossing - 1], profile[idx, crossing]
    r0, r1 = radii[crossing - 1], radii[crossing]
    r_half = r0 + (p0 - half) / (p0 - p1) * (r1 - r0)
    return float(2.0 * np.sqrt(np.mean(r_half ** 2)))


def select_psf_stars(catalog: Table, shape: tuple[int, int], halfsize_fwhm: float = 6.0,
                     config: PSFConfig = PSFConfig()) -> tuple[np.ndarray, float, int]:
    """Rows of an extraction catalogue usable as PSF stars.

    Returns
    -------
    rows : ndarray of int
        Usable rows, brightest first, at most ``config.max_stars``.
    fwhm : float
        Median ``FWHM_IMAGE`` of the bright round unflagged sources, px.
    halfsize : int
        Model half-size in pixels.
    """
    for name in ("XWIN_IMAGE", "YWIN_IMAGE", "FLUX_AUTO", "FLAGS", "SNR_WIN", "ELONGATION", "FWHM_IMAGE"):
        if name not in catalog.colnames:
            raise PSFError(f"extraction catalogue lacks column {name}")
    x = np.asarray(catalog["XWIN_IMAGE"], dtype=np.float64)
    y = np.asarray(catalog["YWIN_IMAGE"], dtype=np.float64)
    flux = np.asarray(catalog["FLUX_AUTO"], dtype=np.float64)
    fwhm_src = np.asarray(catalog["FWHM_IMAGE"], dtype=np.float64)
    good = ((np.asarray(catalog["FLAGS"]) == 0) & (np.asarray(catalog["SNR_WIN"]) >= config.min_snr)
            & (np.asarray(catalog["ELONGATION"]) <= config.max_elongation) & (flux > 0)
            & np.isfinite(fwhm_src) & np.isfinite(x) & np.isfinite(y))
    if good.sum() < config.min_stars:
        raise PSFError(f"only {int(good.sum())} unflagged round sources with SNR_WIN >= "
                       f"{config.min_snr}; a PSF needs at least {config.min_stars}")
    fwhm = float(np.median(fwhm_src[good]))
    good &= np.abs(fwhm_src / fwhm - 1.0) <= config.fwhm_tolerance
    halfsize = int(np.clip(math.ceil(halfsize_fwhm * fwhm), config.min_halfsize, config.max_halfsize))
    ny, nx = shape
    good &= (x - 1 >= halfsize) & (x - 1 <= nx - 1 - halfsize) & (y - 1 >= halfsize) & (y - 1 <= ny - 1 - halfsize)
    # Isolation: nothing within the core; nothing brighter than a small fraction within the stamp.
    tree = cKDTree(np.column_stack([x, y]))
    core = config.core_radius_fwhm * fwhm
    for i in np.flatnonzero(good):
        near = [j for j in tree.query_ball_point((x[i], y[i]), halfsize * math.sqrt(2)) if j != i]
        if not near:
            continue
        near = np.asarray(near)
        dist = np.hypot(x[near] - x[i], y[near] - y[i])
        if np.any(dist < core) or np.any(flux[near] > config.neighbour_flux_ratio * flux[i]):
            good[i] = False
    rows = np.flatnonzero(good)
    rows = rows[np.argsort(-flux[rows], kind="stable")][:config.max_stars]
    if rows.size < config.min_stars:
        raise PSFError(f"only {rows.size} bright, isolated, unsaturated, round stars; "
                       f"a PSF needs at least {config.min_stars}")
    return rows, fwhm, halfsize


def build_psf(data: np.ndarray, catalog: Table, background, background_rms, gain: float,
              mask: np.ndarray | None = None, config: PSFConfig = PSFConfig()) -> PSFModel:
    """Build a spatially varying empirical PSF from the stars of an image.

    Parameters
    ----------
    data : ndarray
        Image, ADU (sky not subtracted).
    catalog : Table
        Extraction catalogue of this image (:func:`pipeline.measure.extract.extract_sources`):
        XWIN_IMAGE, YWIN_IMAGE (1-based), FLUX_AUTO, FLAGS, SNR_WIN, ELONGATION, FWHM_IMAGE.
    background, background_rms : float or ndarray
        Sky level and sky noise (ADU), scalars or maps of the image's shape.
    gain : float
        e-/ADU, for the stars' Poisson noise in the outlier test and weights.
    mask : ndarray, optional
        Bit mask (0 = good).
    config : PSFConfig

    Returns
    -------
    PSFModel

    Raises
    ------
    PSFError
        Too few usable stars, or inconsistent shapes.
    """
    data = np.asarray(data)
    if data.ndim != 2:
        raise PSFError(f"image must be 2-D, got shape {data.shape}")
    if mask is not None and np.shape(mask) != data.shape:
        raise PSFError(f"mask shape {np.shape(mask)} differs from image shape {data.shape}")
    if not gain > 0:
        raise PSFError(f"gain must be positive, got {gain}")
    rows, fwhm0, h = select_psf_stars(catalog, data.shape, config.radius_fwhm, config)
    x = np.asarray(catalog["XWIN_IMAGE"], dtype=np.float64)[rows]
    y = np.asarray(catalog["YWIN_IMAGE"], dtype=np.float64)[rows]
    offsets = np.arange(-h, h + 1)
    col_c, row_c = np.rint(x - 1).astype(np.int64), np.rint(y - 1).astype(np.int64)
    rr = row_c[:, None, None] + offsets[None, :, None]
    cc = col_c[:, None, None] + offsets[None, None, :]
    stamps = data[rr, cc].astype(np.float64) - pixel_values(background, rr, cc)
    sky_var = pixel_values(background_rms, rr, cc) ** 2
    bad = ~np.isfinite(stamps)
    if mask is not None:
        bad |= mask[rr, cc] != 0
    core = np.hypot(*np.meshgrid(offsets, offsets)) <= config.core_radius_fwhm * fwhm0 / 2
    usable = ~np.any(bad & core, axis=(1, 2))
    if usable.sum() < config.min_stars:
        raise PSFError(f"only {int(usable.sum())} PSF stars without masked pixels in the core; "
                       f"a PSF needs at least {config.min_stars}")
    x, y, stamps, sky_var, bad = x[usable], y[usable], stamps[usable], sky_var[usable], bad[usable]
    stamps[bad] = 0.0
    dx, dy = x - 1 - np.rint(x - 1), y - 1 - np.rint(y - 1)

    degree = config.degree
    while degree > 0 and len(x) < config.stars_per_term * _n_terms(degree):
        degree -= 1
    ny, nx = data.shape

    # Each star gets its own sky level: the background map's bias under the wings of the
    # stars (tenths of an ADU, from faint unresolved sources) over a stamp of ~1000 pixels
    # otherwise takes percents of light out of the model's wings.
    radius = np.hypot(*np.meshgrid(offsets, offsets))
    ring = np.where(bad | (radius < h - 2)[None], np.nan, stamps)
    local_sky = np.nan_to_num(np.nanmedian(ring.reshape(len(x), -1), axis=1))
    flux = np.maximum((stamps - local_sky[:, None, None]).sum(axis=(1, 2)), 1e-30)
    core = int(min(h, math.ceil(2.0 * fwhm0)))
    inner = (slice(None), slice(h - core, h + core + 1), slice(h - core, h + core + 1))
    normalised = (stamps - local_sky[:, None, None]) / flux[:, None, None]
    sigma = np.sqrt(sky_var + np.maximum(stamps - local_sky[:, None, None], 0) / gain) / flux[:, None, None]
    moffat = fit_moffat(normalised[inner], dx, dy, np.where(bad, 0.0, 1.0 / sigma)[inner], fwhm0)
    model = PSFModel(np.zeros((_n_terms(degree), 2 * h + 1, 2 * h + 1)), degree,
                     (nx + 1) / 2, nx / 2, (ny + 1) / 2, ny / 2, len(x), math.nan, moffat)
    analytic = moffat_stamps(moffat, dx, dy, h)
    # The residual table is confined to the core and tapered to 0 outside: a free table out
    # to the stamp's edge is degenerate with each star's sky and picked up a pedestal that
    # varied across the image (+-1 % of the light in the wings, measured).
    r_in, r_out = config.residual_radius_fwhm * fwhm0, (config.residual_radius_fwhm + 1.5) * fwhm0
    taper = np.clip((r_out - radius) / (r_out - r_in), 0.0, 1.0)
    taper = np.sin(0.5 * np.pi * taper) ** 2
    outlier = bad
    for _ in range(3):
        predicted = model.evaluate(x, y, dx, dy)
        # Flux and sky by a PSF-weighted fit (less noisy than the stamp sum).
        expected = flux[:, None, None] * predicted
        weight = np.where(outlier, 0.0, 1.0 / (sky_var + np.maximum(expected, 0) / gain))
        flux, local_sky = _fit_flux_and_sky(stamps, predicted, weight)
        expected = flux[:, None, None] * predicted + local_sky[:, None, None]
        sigma = np.sqrt(sky_var + np.maximum(expected, 0) / gain
                        + (config.model_tolerance * flux[:, None, None] * predicted) ** 2)
        outlier = bad | (np.abs(stamps - expected) > config.clip_sigma * sigma)
        patched = np.where(outlier, expected, stamps) - local_sky[:, None, None]
        # Normalised by the stamp's sum, not the fitted flux: a model error would otherwise
        # feed back into the normalisation with a position-dependent scale.  A star whose
        # stamp sum is far from its fitted flux (a neighbour's wing, a bad sky) would be
        # blown up by that normalisation: it gets no weight.
        total = patched.sum(axis=(1, 2))
        consistent = (total > 0.5 * flux) & (total < 2.0 * flux) & (flux > 0)
        patched /= np.where(consistent, total, 1.0)[:, None, None]
        # Only the residual from the analytic part goes through the Fourier shift: it is
        # small and smooth, so the aliasing of a near-critically sampled PSF (4 % of the
        # peak for a FWHM of 2 px when whole stars are shifted) stays negligible.
        centred = fourier_shift(patched - analytic, -dx, -dy)
        # Flux S/N of a PSF-weighted fit against the sky noise.
        snr = flux * np.sqrt(np.sum(predicted ** 2 / sky_var, axis=(1, 2)))
        star_weight = np.where(consistent, 1.0 / (1.0 / snr ** 2 + 1.0 / config.max_star_snr ** 2), 0.0)
        coefficients = _fit_coefficients(model, x, y, centred, star_weight, taper)
        model = replace(model, coefficients=coefficients)
    centre_fwhm = float(model.fwhm_at((nx + 1) / 2, (ny + 1) / 2)[0])
    return replace(model, fwhm=centre_fwhm)


def pixel_values(values, rows, cols) -> np.ndarray:
    """``values`` (a scalar, or an image such as a background map) at pixels ``(rows, cols)``, as float64."""
    if np.ndim(values) == 0:
        return np.full(rows.shape, float(values))
    return np.asarray(values)[rows, cols].astype(np.float64)


def _fit_flux_and_sky(stamps, predicted, weight):
    """Per-stamp weighted least squares of ``flux * predicted + sky`` (closed form, 2 x 2)."""
    sw, sp, spp = (np.sum(weight * v, axis=(1, 2)) for v in (1.0, predicted, predicted ** 2))
    sd, spd = np.sum(weight * stamps, axis=(1, 2)), np.sum(weight * predicted * stamps, axis=(1, 2))
    det = np.maximum(sw * spp - sp ** 2, 1e-300)
    flux = (sw * spd - sp * sd) / det
    sky = (spp * sd - sp * spd) / det
    return np.maximum(flux, 1e-30), sky


def _fit_coefficients(model: PSFModel, x, y, centred: np.ndarray, weight: np.ndarray,
                      taper: np.ndarray) -> np.ndarray:
    """Weighted least squares of every residual pixel's polynomial (one design matrix for
    all pixels), then unit sum at every position: the analytic part's sum over the stamp
    plus the constant term's is 1, the other terms sum to 0 (taken off along the Moffat)."""
    terms = model.basis(x, y)
    root = np.sqrt(weight)[:, None]
    solution, *_ = np.linalg.lstsq(terms * root, centred.reshape(len(x), -1) * root, rcond=None)
    coefficients = solution.reshape(model.coefficients.shape) * taper[None]
    analytic = moffat_stamps(model.moffat, [0.0], [0.0], model.halfsize)[0]
    excess = coefficients.sum(axis=(1, 2))
    excess[0] += analytic.sum() - 1.0
    coefficients -= excess[:, None, None] * (analytic / analytic.sum())[None]
    return coefficients
