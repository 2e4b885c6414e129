"""Rendering one quadrant image of one exposure from the sky model and the true WCS.

Pure: no I/O.  The image is in ADU, bias-subtracted, sky not subtracted; the header follows
the keyword contract of :mod:`pipeline.core.image` with a *first-guess* WCS (the telescope's
linear model at the commanded pointing, so off by the pointing error), never the true one.
Every random number comes from ``SeedSequence([spec.seed, rcid])``, so a quadrant is the
same whether rendered alone or with the rest of its exposure.  The fixed defects of each
readout channel (bad columns, hot pixels) come from a stream seeded by the rcid alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from pipeline.core.config import Config
from pipeline.core.focalplane import QuadrantGeometry
from pipeline.core.image import FILTER_IDS, MASK_BITS
from pipeline.simulate.exposure import ExposureSpec
from pipeline.simulate.optics import first_guess_header
from pipeline.simulate.sky import SkyModel, julian_epoch, propagate_positions

__all__ = ["SimulatedQuadrant", "render_quadrant", "quadrant_header", "image_zeropoint",
           "sky_electrons_per_pixel", "PIXEL_SIZE_CM", "GALAXY_BETA"]

#: Physical pixel size (15 um), for the cosmic-ray rate per cm^2.
PIXEL_SIZE_CM = 15e-4
#: Moffat index of the PSF-convolved galaxy blobs: broader wings than stars, like discs.
GALAXY_BETA = 2.5
# Moffat FWHM of a beta = 2.5 blob per arcsec of its half-light radius.
_GALAXY_FWHM_PER_RHALF = 2 * np.sqrt(2 ** (1 / GALAXY_BETA) - 1) / np.sqrt(2 ** (1 / (GALAXY_BETA - 1)) - 1)
_BASE_STAMP_RADIUS = 12
# Galaxy stamps stop at 5 alpha (0.75 % of a beta = 2.5 blob's light beyond): faint, extended
# objects whose truncated wing is far below the sky noise; the truth keeps the total flux.
_GALAXY_STAMP_ALPHAS = 5.0
_STAMP_RADII = np.array([12, 16, 24, 32, 48, 64, 96, 128, 192, 256])
# Stamps are widened until the truncated wing is below this fraction of the sky noise.
_WING_FRACTION_OF_SKY_NOISE = 0.05
_BATCH_PIXELS = 1_000_000
_SELECTION_MARGIN_PX = 64.0
_BADPIX_SALT = 90210


@dataclass(frozen=True)
class SimulatedQuadrant:
    """A rendered quadrant: the image as the pipeline receives it, and its truth.

    ``truth`` has one row per object whose true centre is on the image (``meta`` holds the
    true image zero point, seeing, sky level and so on); ``truth_header`` is the true TPV
    WCS plus the same metadata as FITS keywords.
    """

    data: np.ndarray
    mask: np.ndarray
    header: fits.Header
    truth: Table
    truth_header: fits.Header
    asteroids: Table | None = None   # simulated minor planets near the image (rendered or not)


def image_zeropoint(spec: ExposureSpec, cfg: Config) -> float:
    """True zero point of an image: the magnitude giving 1 ADU in the exposure."""
    band = cfg.instrument.filters[spec.filter]
    extinction = band.extinction * spec.airmass + spec.transparency_mag
    return band.zeropoint + 2.5 * np.log10(spec.exptime / cfg.instrument.gain) - extinction


def sky_electrons_per_pixel(spec: ExposureSpec, cfg: Config) -> float:
    """Mean sky level in e-/pixel (``sky_mag`` is the brightness seen at the ground)."""
    band = cfg.instrument.filters[spec.filter]
    pixel_area = cfg.instrument.pixel_scale_arcsec ** 2
    return float(10 ** (-0.4 * (spec.sky_mag - band.zeropoint)) * spec.exptime * pixel_area)


def quadrant_header(spec: ExposureSpec, geom: QuadrantGeometry, cfg: Config) -> fits.Header:
    """The contract keywords plus the telescope's first-guess WCS (off by the pointing error)."""
    inst = cfg.instrument
    h = fits.Header()
    values = [
        ("FIELDID", spec.fieldid, "survey field id"), ("CCDID", geom.ccdid, "CCD id"),
        ("QID", geom.qid, "quadrant id within the CCD"), ("RCID", geom.rcid, "readout channel id"),
        ("FILTER", spec.filter, "filter"), ("FILTERID", FILTER_IDS[spec.filter], "filter id"),
        ("OBSMJD", spec.obsmjd, "UTC MJD at exposure start"), ("EXPTIME", spec.exptime, "s"),
        ("EXPID", spec.expid, "exposure id"), ("PROGRMID", spec.progrmid, "program id"),
        ("TELRA", spec.field_ra % 360.0, "commanded boresight RA, deg"),
        ("TELDEC", spec.field_dec, "commanded boresight Dec, deg"),
        ("AIRMASS", max(spec.airmass, 1.0), "telescope airmass"),
        ("GAIN", inst.gain, "e-/ADU"), ("READNOI", inst.read_noise, "e-"),
        ("SATURATE", inst.saturate_adu, "ADU"),
        ("TEMPTURE", spec.temperature_c, "site air temperature, deg C"),
        ("PRESSURE", spec.pressure_hpa, "site air pressure, hPa"),
    ]
    for key, value, comment in values:
        h[key] = (value, comment)
    h.update(first_guess_header(spec, geom, cfg))
    return h


class _PsfField:
    """The exposure's elliptical Moffat PSF, varying smoothly across the quadrant."""

    def __init__(self, spec: ExposureSpec, geom: QuadrantGeometry, cfg: Config, rng):
        sim = cfg.simulation
        self.beta = sim.moffat_beta
        self.fwhm0 = spec.seeing_fwhm_arcsec / cfg.instrument.pixel_scale_arcsec
        self.nx, self.ny = geom.nx, geom.ny
        angle = rng.uniform(0, 2 * np.pi)
        # A linear ramp whose corner-to-corner range is exactly psf_variation.
        span = abs(np.cos(angle)) + abs(np.sin(angle))
        self.fwhm_grad = sim.psf_variation * np.array([np.cos(angle), np.sin(angle)]) / span
        self.e0, self.e_grad = rng.uniform(0.02, 0.06), rng.uniform(-0.02, 0.02, 2)
        self.theta0, self.theta_grad = rng.uniform(0, np.pi), rng.uniform(-0.3, 0.3, 2)

    def _normalised(self, x, y):
        return (np.asarray(x) - 0.5) / self.nx - 0.5, (np.asarray(y) - 0.5) / self.ny - 0.5

    def fwhm_px(self, x, y):
        u, v = self._normalised(x, y)
        return self.fwhm0 * (1 + self.fwhm_grad[0] * u + self.fwhm_grad[1] * v)

    def fwhm2_matrix(self, x, y):
        """FWHM^2 shape matrix (a00, a01, a11) in pixels^2 at positions (x, y)."""
        u, v = self._normalised(x, y)
        e = np.clip(self.e0 + self.e_grad[0] * u + self.e_grad[1] * v, 0.0, 0.2)
        theta = self.theta0 + self.theta_grad[0] * u + self.theta_grad[1] * v
        return _shape_matrix(self.fwhm_px(x, y) ** 2, 1 - e, theta)


def _shape_matrix(major2, axis_ratio, theta):
    """Matrix of an ellipse with area-preserving axes major2/q and major2*q, rotated by theta."""
    a2, b2 = major2 / axis_ratio, major2 * axis_ratio
    c, s = np.cos(theta), np.sin(theta)
    return a2 * c * c + b2 * s * s, (a2 - b2) * c * s, a2 * s * s + b2 * c * c


def _moffat_alpha2(fwhm2, beta: float):
    """Convert an FWHM^2 matrix to the Moffat alpha^2 matrix."""
    return tuple(np.asarray(m) / (4 * (2 ** (1 / beta) - 1)) for m in fwhm2)


def _stamp_radii(alpha2, flux_e, beta, sky_sigma_e, alphas: float):
    """Stamp radius per object: at least ``alphas`` alpha, and wide enough that the cut wing is negligible."""
    a00, a01, a11 = alpha2
    major = np.sqrt(0.5 * (a00 + a11) + np.sqrt(0.25 * (a00 - a11) ** 2 + a01 ** 2))
    det = np.maximum(a00 * a11 - a01 ** 2, 1e-12)
    peak = flux_e * (beta - 1) / (np.pi * np.sqrt(det))
    ratio = np.maximum(peak / (_WING_FRACTION_OF_SKY_NOISE * sky_sigma_e), 1.0)
    wing = major * np.sqrt(np.maximum(ratio ** (1 / beta) - 1, 0.0))
    need = np.maximum(np.maximum(_BASE_STAMP_RADIUS, alphas * major), wing)
    index = np.minimum(np.searchsorted(_STAMP_RADII, need), _STAMP_RADII.size - 1)
    return _STAMP_RADII[index]


def _moffat_core(t, beta: float):
    """``t ** -beta`` for t >= 1; integer and half-integer beta avoid the slow general power."""
    twice = 2 * beta
    if twice == int(twice) and 0 < beta <= 8:
        result = np.reciprocal(t)
        out = np.ones_like(t)
        for _ in range(int(beta)):
            out *= result
        if twice % 2:
            out /= np.sqrt(t)
        return out
    return np.power(t, -beta)


#: Gauss-Legendre nodes and weights on a pixel (3 x 3 points integrate the core exactly
#: enough): a detector integrates the PSF over each pixel, and sampling an undersampled
#: profile at pixel centres instead biases centroids with the pixel phase.
_GL_NODES = (np.array([-np.sqrt(0.6), 0.0, np.sqrt(0.6)]) / 2).astype(np.float32)
_GL_WEIGHTS = np.array([5.0, 8.0, 5.0]) / 18.0
#: Half-size of the block around the centre integrated over the pixel; further out the
#: profile is smooth on the pixel scale and its value at the centre suffices.
_CORE_HALF = 2


def _moffat_values(dx, dy, cxx, cxy, cyy, beta: float):
    t = (cxy * dx) * dy
    t += cxx * dx * dx
    t += cyy * dy * dy
    t += np.float32(1.0)
    return _moffat_core(t, beta)


def _moffat_pixel_means(dx, dy, cxx, cxy, cyy, beta: float):
    """Pixel averages of the Moffat to second order: ``f + (f_xx + f_yy) / 24``.

    With f = u^-beta, u = 1 + r^T C r:  lap f = beta u^(-beta-2) (4 (beta+1) |C r|^2 - 2 u tr C).
    Good where the profile is smooth on the pixel scale (the wings); the core is integrated.
    """
    gx = cxx * dx + np.float32(0.5) * cxy * dy
    gy = np.float32(0.5) * cxy * dx + cyy * dy
    u = np.float32(1.0) + cxx * dx * dx + cxy * dx * dy + cyy * dy * dy
    f = _moffat_core(u, beta)
    lap = (np.float32(4 * (beta + 1)) * (gx * gx + gy * gy) - np.float32(2.0) * u * (cxx + cyy)) / (u * u)
    return f * (np.float32(1.0) + np.float32(beta / 24.0) * lap)


def _add_moffats(image_flat, shape, x, y, flux, alpha2, beta: float, radius: int) -> None:
    """Add analytically normalised elliptical Moffat profiles integrated over the pixels.

    The central (2 _CORE_HALF + 1)^2 pixels are integrated with 3 x 3 Gauss-Legendre points;
    the wings take the second-order pixel average (:func:`_moffat_pixel_means`).

    All stamps of a batch are evaluated at once on an (N, S, S) float32 grid and scattered
    with ``np.bincount`` on flat pixel indices; pixels falling off the image are dropped.
    Objects are batched in order of row, so each batch touches a narrow band of the image
    and the bincount covers only that band.
    """
    ny, nx = shape
    offsets = np.arange(-radius, radius + 1)
    per_batch = max(1, _BATCH_PIXELS // offsets.size ** 2)
    order = np.argsort(y, kind="stable")
    for start in range(0, x.size, per_batch):
        sel = order[start:start + per_batch]
        a00, a01, a11 = (a[sel] for a in alpha2)
        det = a00 * a11 - a01 ** 2
        norm = (flux[sel] * (beta - 1) / (np.pi * np.sqrt(det))).astype(np.float32)
        # 0-based column/row nearest each centre; the centre of column c is at x = c + 1.
        col0 = np.rint(x[sel] - 1).astype(np.int64)
        row0 = np.rint(y[sel] - 1).astype(np.int64)
        dx = (col0[:, None] + offsets + 1 - x[sel, None]).astype(np.float32)[:, None, :]
        dy = (row0[:, None] + offsets + 1 - y[sel, None]).astype(np.float32)[:, :, None]
        # The quadratic form (r^T A^-1 r) split into terms that broadcast from 1-D stamps.
        cxx = (a11 / det).astype(np.float32)[:, None, None]
        cxy = (-2 * a01 / det).astype(np.float32)[:, None, None]
        cyy = (a00 / det).astype(np.float32)[:, None, None]
        values = _moffat_pixel_means(dx, dy, cxx, cxy, cyy, beta)
        core = slice(radius - _CORE_HALF, radius + _CORE_HALF + 1)
        integrated = np.zeros_like(values[:, core, core])
        for ox, wx in zip(_GL_NODES, _GL_WEIGHTS):
            for oy, wy in zip(_GL_NODES, _GL_WEIGHTS):
                integrated += np.float32(wx * wy) * _moffat_values(dx[:, :, core] + ox, dy[:, core, :] + oy,
                                                                   cxx, cxy, cyy, beta)
        values[:, core, core] = integrated
        values *= norm[:, None, None]
        flat = (row0 * nx + col0)[:, None, None] + (offsets[:, None] * nx + offsets[None, :])
        edge = (col0 < radius) | (col0 >= nx - radius) | (row0 < radius) | (row0 >= ny - radius)
        if edge.any():
            cols = col0[:, None, None] + offsets[None, None, :]
            rows = row0[:, None, None] + offsets[None, :, None]
            on = (cols >= 0) & (cols < nx) & (rows >= 0) & (rows < ny)
            flat, values = flat[on], values[on]
        else:
            flat, values = flat.ravel(), values.ravel()
        if flat.size == 0:
            continue
        low = int(flat.min())
        # bincount is several times faster with float64 weights than with float32 ones.
        band = np.bincount(flat - low, weights=values.astype(np.float64))
        image_flat[low:low + band.size] += band


def true_psf_stamp(psf: "_PsfField", x: float, y: float, halfsize: int,
                   dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """The PSF exactly as the renderer puts it on the detector (pixel-integrated, unit sum).

    Centred on the stamp's central pixel plus (dx, dy) pixels; for PSF-model tests.
    """
    size = 2 * halfsize + 1
    flat = np.zeros(size * size)
    alpha2 = tuple(np.atleast_1d(np.asarray(a, dtype=float))
                   for a in _moffat_alpha2(psf.fwhm2_matrix(x, y), psf.beta))
    _add_moffats(flat, (size, size), np.array([halfsize + 1.0 + dx]), np.array([halfsize + 1.0 + dy]),
                 np.array([1.0]), alpha2, psf.beta, halfsize)
    return flat.reshape(size, size)


def _render_profiles(image_flat, shape, x, y, flux, alpha2, beta, sky_sigma_e, alphas: float = 6.0) -> None:
    radii = _stamp_radii(alpha2, flux, beta, sky_sigma_e, alphas)
    for radius in np.unique(radii):
        pick = radii == radius
        _add_moffats(image_flat, shape, x[pick], y[pick], flux[pick],
                     tuple(a[pick] for a in alpha2), beta, int(radius))


def _electrons(mag, zp_image: float, gain: float):
    return 10 ** (-0.4 * (np.asarray(mag) - zp_image)) * gain


def _objects_on_image(sky: SkyModel, spec: ExposureSpec, wcs: WCS, shape, cfg: Config, zp: float):
    """Positions (true, at mid-exposure), pixels and fluxes of every object near the image."""
    mjd_mid = spec.obsmjd + 0.5 * spec.exptime / 86400.0
    gain = cfg.instrument.gain
    parts = []
    rows = sky.in_footprint("stars", wcs, shape, _SELECTION_MARGIN_PX)
    s = sky.stars
    ra, dec = propagate_positions(s["ra"].data[rows], s["dec"].data[rows], s["pmra"].data[rows],
                                  s["pmdec"].data[rows], julian_epoch(mjd_mid) - 2016.0)
    mag = sky.star_mag(spec.filter, mjd_mid, rows)
    parts.append(dict(id=s["source_id"].data[rows], kind="star", ra=ra, dec=dec, mag=mag,
                      variable=s["var_kind"].data[rows] > 0, transient=np.zeros(rows.size, bool)))
    rows = sky.in_footprint("galaxies", wcs, shape, _SELECTION_MARGIN_PX)
    g = sky.galaxies
    parts.append(dict(id=g["galaxy_id"].data[rows], kind="galaxy", ra=g["ra"].data[rows],
                      dec=g["dec"].data[rows], mag=sky.galaxy_mag(spec.filter, rows),
                      variable=np.zeros(rows.size, bool), transient=np.zeros(rows.size, bool),
                      r_half=g["r_half_arcsec"].data[rows], axis_ratio=g["axis_ratio"].data[rows],
                      pa=g["pa_deg"].data[rows]))
    rows = sky.in_footprint("transients", wcs, shape, _SELECTION_MARGIN_PX)
    t = sky.transients
    parts.append(dict(id=t["transient_id"].data[rows], kind="transient", ra=t["ra"].data[rows],
                      dec=t["dec"].data[rows], mag=sky.transient_mag(spec.filter, mjd_mid, rows),
                      variable=np.zeros(rows.size, bool), transient=np.ones(rows.size, bool)))
    if len(sky.asteroids):
        parts.append(_asteroids_near_image(sky, spec, wcs, shape, cfg))
    for part in parts:
        part["x"], part["y"] = wcs.all_world2pix(part["ra"], part["dec"], 1)
        part["flux_e"] = _electrons(part["mag"], zp, gain)
    return parts


def _asteroids_near_image(sky: SkyModel, spec: ExposureSpec, wcs: WCS, shape, cfg: Config) -> dict:
    """The minor planets within the selection margin of the image, at their true positions at
    mid-exposure (a 30 s exposure trails a main-belt asteroid by under 0.5": point sources)."""
    from pipeline.simulate.asteroids import ASTEROID_G_R, ASTEROID_R_I, V_MINUS_R, asteroid_positions
    from pipeline.simulate.sky import _band_offset_from_colours
    mjd_mid = spec.obsmjd + 0.5 * spec.exptime / 86400.0
    a = sky.asteroids
    pos = asteroid_positions(a, mjd_mid, cfg.site)
    x, y = wcs.all_world2pix(pos["ra"], pos["dec"], 1)
    ny, nx = shape
    near = ((x > 0.5 - _SELECTION_MARGIN_PX) & (x < nx + 0.5 + _SELECTION_MARGIN_PX)
            & (y > 0.5 - _SELECTION_MARGIN_PX) & (y < ny + 0.5 + _SELECTION_MARGIN_PX))
    rmag = pos["vmag"][near] - V_MINUS_R
    offset = _band_offset_from_colours(sky.filters[spec.filter].wavelength_um, ASTEROID_G_R, ASTEROID_R_I)
    return dict(id=a["asteroid_id"].data[near], kind="asteroid", ra=pos["ra"][near], dec=pos["dec"][near],
                mag=rmag + offset, variable=np.zeros(int(near.sum()), bool), transient=np.ones(int(near.sum()), bool),
                designation=np.asarray(a["designation"])[near], vmag=pos["vmag"][near], rmag=rmag,
                delta=pos["delta"][near])


def _asteroid_truth(part: dict, geom: QuadrantGeometry) -> Table:
    """Truth of the minor planets near the image: name as in ``ssnamenr``, true position, V,
    band and r magnitudes, pixel position and whether it is on the image (rendered)."""
    on = (part["x"] >= 0.5) & (part["x"] < geom.nx + 0.5) & (part["y"] >= 0.5) & (part["y"] < geom.ny + 0.5)
    table = Table({"asteroid_id": part["id"], "designation": part["designation"].astype(str),
                   "ssnamenr": np.array([str(d).replace(" ", "") for d in part["designation"]], dtype=str),
                   "ra": part["ra"], "dec": part["dec"], "vmag": part["vmag"], "mag": part["mag"],
                   "rmag": part["rmag"], "delta_au": part["delta"], "x": part["x"], "y": part["y"],
                   "on_image": on})
    return table


def _galaxy_alpha2(part, psf: _PsfField, pixel_scale: float):
    """PSF-convolved galaxy shape: FWHM^2 matrices of PSF and galaxy add (as for Gaussians)."""
    psf2 = psf.fwhm2_matrix(part["x"], part["y"])
    fwhm_gal = part["r_half"] / pixel_scale * _GALAXY_FWHM_PER_RHALF
    # Image x grows west, y north: the sky PA (east of north) is measured from +y toward -x.
    theta = np.deg2rad(90.0 + part["pa"])
    gal2 = _shape_matrix(fwhm_gal ** 2, part["axis_ratio"], theta)
    return _moffat_alpha2(tuple(p + g for p, g in zip(psf2, gal2)), GALAXY_BETA)


def _bleed(image_adu: np.ndarray, saturate: float, mask: np.ndarray) -> None:
    """Clip saturated pixels and spread their excess charge up and down their column."""
    over = image_adu > saturate
    if not over.any():
        return
    mask[over] |= MASK_BITS["SATURATED"]
    ny = image_adu.shape[0]
    for col in np.unique(np.nonzero(over)[1]):
        column = image_adu[:, col]
        sat = column > saturate
        edges = np.diff(np.concatenate([[0], sat.view(np.int8), [0]]))
        for top, bottom in zip(np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]):
            excess = float(np.sum(column[top:bottom] - saturate))
            column[top:bottom] = saturate
            for direction in (-1, 1):
                # Half the excess fills pixels up to saturation going away from the run.
                idx = np.arange(top - 1, -1, -1) if direction < 0 else np.arange(bottom, ny)
                capacity = np.maximum(saturate - column[idx], 0.0)
                filled = np.cumsum(capacity)
                n_full = int(np.searchsorted(filled, 0.5 * excess))
                column[idx[:n_full]] = saturate
                if n_full < idx.size:
                    column[idx[n_full]] += 0.5 * excess - (filled[n_full - 1] if n_full else 0.0)
                touched = idx[:min(n_full + 1, idx.size)]
                mask[touched, col] |= MASK_BITS["BLEED"] | MASK_BITS["SATURATED"]
        # A partly filled end pixel is only BLEED, not SATURATED.
        partial = (mask[:, col] & MASK_BITS["BLEED"]).astype(bool) & (column < saturate)
        mask[partial, col] &= ~np.int16(MASK_BITS["SATURATED"])


def _add_cosmic_rays(image_e, spec, cfg: Config, rng) -> int:
    """Short, sharp cosmic-ray tracks (1-10 pixels), not flagged in the mask."""
    ny, nx = image_e.shape
    area_cm2 = nx * ny * PIXEL_SIZE_CM ** 2
    n = rng.poisson(cfg.simulation.cosmic_ray_rate * area_cm2 * spec.exptime / 60.0)
    for _ in range(n):
        length = rng.integers(1, 11)
        angle = rng.uniform(0, np.pi)
        x0, y0 = rng.uniform(0, nx), rng.uniform(0, ny)
        steps = np.arange(length)
        cols = np.clip(np.floor(x0 + steps * np.cos(angle)).astype(int), 0, nx - 1)
        rows = np.clip(np.floor(y0 + steps * np.sin(angle)).astype(int), 0, ny - 1)
        image_e[rows, cols] += rng.uniform(2000, 30000, length).astype(np.float32)
    return int(n)


def _apply_defects(image_adu, mask, rcid: int, cfg: Config) -> None:
    """The channel's fixed bad columns and hot pixels (the same in every exposure), flagged BAD."""
    rng = np.random.default_rng(np.random.SeedSequence([_BADPIX_SALT, rcid]))
    ny, nx = image_adu.shape
    sim = cfg.simulation
    for _ in range(sim.bad_columns_per_quadrant):
        col, first_row = rng.integers(0, nx), rng.integers(0, ny // 2) * rng.integers(0, 2)
        if rng.random() < 0.5:
            image_adu[first_row:, col] *= 0.1        # dead column
        else:
            image_adu[first_row:, col] += rng.uniform(300, 3000)   # hot column
        mask[first_row:, col] |= MASK_BITS["BAD"]
    rows, cols = rng.integers(0, ny, sim.hot_pixels_per_quadrant), rng.integers(0, nx, sim.hot_pixels_per_quadrant)
    image_adu[rows, cols] += 10 ** rng.uniform(2.3, 4.8, rows.size)
    mask[rows, cols] |= MASK_BITS["BAD"]


def render_quadrant(spec: ExposureSpec, geom: QuadrantGeometry, wcs: WCS, sky: SkyModel, cfg: Config,
                    noiseless: bool = False, wcs_header: fits.Header | None = None) -> SimulatedQuadrant:
    """Render one quadrant of one exposure.

    Parameters
    ----------
    spec : ExposureSpec
    geom : QuadrantGeometry
    wcs : WCS
        The quadrant's true WCS (e.g. :func:`pipeline.simulate.optics.true_quadrant_wcs`).
    sky : SkyModel
    cfg : Config
    noiseless : bool
        Skip photon and read noise, cosmic rays and detector defects (centroid truth tests).
    wcs_header : Header, optional
        The true WCS as a header for the truth (TPV headers are not reproduced by
        ``WCS.to_header``); default ``wcs.to_header(relax=True)``.

    Returns
    -------
    SimulatedQuadrant
    """
    inst = cfg.instrument
    shape = (geom.ny, geom.nx)
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, geom.rcid]))
    psf = _PsfField(spec, geom, cfg, rng)
    zp = image_zeropoint(spec, cfg)
    sky_e = sky_electrons_per_pixel(spec, cfg)
    sky_sigma_e = np.sqrt(sky_e + inst.read_noise ** 2)

    flat = np.zeros(geom.nx * geom.ny, dtype=np.float32)
    parts = _objects_on_image(sky, spec, wcs, shape, cfg, zp)
    stars, galaxies, transients, *asteroids = parts
    for part in (stars, transients, *asteroids):
        alpha2 = _moffat_alpha2(psf.fwhm2_matrix(part["x"], part["y"]), psf.beta)
        _render_profiles(flat, shape, part["x"], part["y"], part["flux_e"], alpha2, psf.beta, sky_sigma_e)
    _render_profiles(flat, shape, galaxies["x"], galaxies["y"], galaxies["flux_e"],
                     _galaxy_alpha2(galaxies, psf, inst.pixel_scale_arcsec), GALAXY_BETA, sky_sigma_e,
                     alphas=_GALAXY_STAMP_ALPHAS)

    # The sky: a few-percent linear gradient in a random direction, mean sky_e over the image.
    gradient_size, gradient_angle = rng.uniform(0.01, 0.04), rng.uniform(0, 2 * np.pi)
    gradient = gradient_size * np.array([np.cos(gradient_angle), np.sin(gradient_angle)])
    u = (np.arange(geom.nx, dtype=np.float32) + 0.5) / geom.nx - 0.5
    v = (np.arange(geom.ny, dtype=np.float32) + 0.5) / geom.ny - 0.5
    image = flat.reshape(shape)
    image += np.float32(sky_e) * (1 + np.float32(gradient[1]) * v[:, None] + np.float32(gradient[0]) * u[None, :])
    mask = np.zeros(shape, dtype=np.int16)
    n_cosmic = 0
    if not noiseless:
        # Poisson noise as a Gaussian of variance (expected e- + read noise^2): the sky alone
        # gives thousands of e- per pixel, where the Poisson and normal laws agree.
        sigma = np.sqrt(image + np.float32(inst.read_noise ** 2))
        image += sigma * rng.standard_normal(shape, dtype=np.float32)
        n_cosmic = _add_cosmic_rays(image, spec, cfg, rng)
    image /= np.float32(inst.gain)
    if not noiseless:
        _apply_defects(image, mask, geom.rcid, cfg)
    _bleed(image, inst.saturate_adu, mask)

    truth = _truth_table(parts, geom, inst.gain, mask)
    metadata = {
        "TRUEZP": (zp, "true zero point, mag for 1 ADU"), "SEEING": (spec.seeing_fwhm_arcsec, "arcsec"),
        "FWHMPX": (psf.fwhm0, "PSF FWHM at the quadrant centre, px"), "BETA": (psf.beta, "Moffat beta"),
        "AIRMASS": (spec.airmass, "boresight airmass"), "TRANSP": (spec.transparency_mag, "mag lost to clouds"),
        "SKYE": (sky_e, "mean sky, e-/px"), "SKYADU": (sky_e / inst.gain, "mean sky, ADU/px"),
        "SKYGRADX": (gradient[0], "sky fraction change across x"),
        "SKYGRADY": (gradient[1], "sky fraction change across y"),
        "NCOSMIC": (n_cosmic, "cosmic rays added"), "NOISELES": (noiseless, "rendered without noise"),
        "EPOCH": (float(julian_epoch(spec.obsmjd + 0.5 * spec.exptime / 86400.0)), "Julian epoch, mid-exposure"),
    }
    truth.meta.update({k: v[0] for k, v in metadata.items()})
    truth_header = fits.Header()
    truth_header.update(wcs_header if wcs_header is not None else wcs.to_header(relax=True))
    for key, value in metadata.items():
        truth_header[key] = value
    header = quadrant_header(spec, geom, cfg)
    return SimulatedQuadrant(data=image, mask=mask, header=header, truth=truth, truth_header=truth_header,
                             asteroids=_asteroid_truth(asteroids[0], geom) if asteroids else None)


def _truth_table(parts, geom: QuadrantGeometry, gain: float, mask: np.ndarray) -> Table:
    columns: dict[str, list] = {k: [] for k in ("id", "kind", "ra", "dec", "x", "y", "flux_e", "flux_adu",
                                                "mag", "variable", "transient", "saturated")}
    for part in parts:
        on = ((part["x"] >= 0.5) & (part["x"] < geom.nx + 0.5)
              & (part["y"] >= 0.5) & (part["y"] < geom.ny + 0.5))
        col = np.clip(np.rint(part["x"] - 1).astype(int), 0, geom.nx - 1)
        row = np.clip(np.rint(part["y"] - 1).astype(int), 0, geom.ny - 1)
        values = dict(id=part["id"], kind=np.full(part["x"].size, part["kind"]), ra=part["ra"], dec=part["dec"],
                      x=part["x"], y=part["y"], flux_e=part["flux_e"], flux_adu=part["flux_e"] / gain,
                      mag=part["mag"], variable=part["variable"], transient=part["transient"],
                      saturated=(mask[row, col] & MASK_BITS["SATURATED"]) > 0)
        for key, value in values.items():
            columns[key].append(np.asarray(value)[on])
    table = Table({k: np.concatenate(v) for k, v in columns.items()})
    for name, unit in (("ra", "deg"), ("dec", "deg"), ("x", "pix"), ("y", "pix"), ("flux_adu", "adu"), ("mag", "mag")):
        table[name].unit = unit
    # FITS has no electron unit; the column name carries it.
    table["flux_e"].description = "expected total flux, e-"
    return table
