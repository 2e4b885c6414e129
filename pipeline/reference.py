r"""Reference images: an outlier-rejecting weighted coadd of the good exposures of one
field, CCD, quadrant and filter, with the coadd's PSF and PSF-fit catalogue.

:func:`build_reference` is pure (frames and Gaia in, :class:`ReferenceImage` out);
:func:`write_reference` / :func:`read_reference` are the file edge (layout in
:func:`write_reference`).

Method
------
*Characterisation and cuts.*  Every frame is characterised
(:func:`pipeline.characterize.characterize_image`: PSF, Gaia zero point, 5-sigma limit).
A frame is dropped, with its reason recorded in the frame table, when its astrometry is
not usable (``ASTRUSE`` false or absent, no WCS), it cannot be characterised, its PSF
FWHM exceeds ``max_fwhm_arcsec`` or ``max_seeing_ratio`` times the best frame's, or its
limiting magnitude is more than ``max_depth_loss_mag`` above the median of the frames
left; of the rest the ``max_frames`` deepest are kept.

*Grid.*  The coadd is built on the pixel grid (WCS and shape) of the best-seeing frame
kept: it is a real solved exposure of this very quadrant, so the grid matches the
science quadrants' geometry to the pointing scatter, and the sharpest frame, whose fine
detail resampling would smear the most, is the one not resampled.

*Scaling.*  Frames are background-subtracted (the characterisation's sky map), registered
(:func:`pipeline.registration.register_image`) and scaled to the common zero point
``zeropoint``: ``scale = 10**(0.4 * (zeropoint - zp_frame))``.  The default 27.0 puts every
reference of the survey in the same flux unit (1 ADU = mag 27), whatever frames a build
used, so catalogue fluxes (and matchfiles seeded from them) stay comparable across fields
and rebuilds; it is of the order of the frames' own zero points (ZTF's 30 s exposures
26.0-26.4, the simulator's about 27.7), so scales stay near 1 and float32 loses nothing.

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

*Noise, gain, saturation.*  ``rms`` is the background noise of the coadd implied by the
weights, :math:`1/\sqrt{\sum w_i}` over the frames used at each pixel: the noise of a
PSF-sized sum.  Resampling correlates the noise of the registered frames, so the
pixel-to-pixel scatter is somewhat lower (their ratio is the header's ``PIXRMSF``); PSF
photometry and ZOGY, which work at PSF scales, need the former.  The effective gain makes
``coadd / gain`` the sources' Poisson variance: with :math:`W = \sum w_i`,
:math:`{\rm Var} = \sum w_i^2 s_i^2 (C/s_i)/g_i / W^2`, so
:math:`g_{\rm eff} = W^2 / \sum (w_i^2 s_i / g_i)` (``N g`` for N equal frames).  The
saturation level is the lowest scaled, background-subtracted level at which a frame
saturates; pixels saturated in any frame carry ``SATURATED`` in the coadd's mask.

*Identifier.*  ``refid = fieldid * 2**40 + rcid * 2**34 + filterid * 2**32 + h`` with
``h`` the first 32 bits of BLAKE2b over the sorted exposure ids used: deterministic (a
rebuild from the same frames has the same id, from other frames another one), decodable,
and below 2**63 for field ids under 2**23.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
from astropy.io import fits
from astropy.stats import sigma_clipped_stats
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS
from scipy import ndimage

from catalogs import propagate_to_epoch
from .characterize import CharacterizeConfig, characterize_image
from .config import FilterConfig
from .extract import ExtractionError, extract_sources
from .image import FILTER_IDS, MASK_BITS, QuadrantImage, header_wcs, rcid_of, write_fits_atomic
from .photcal import PhotCalError, calibrate_zeropoint
from .photometry import flux_to_mag
from .psf import PSFError, PSFModel
from .registration import RegistrationConfig, RegistrationError, register_image
from .wcs_head import is_wcs_keyword

__all__ = ["ReferenceError", "ReferenceConfig", "StackResult", "ReferenceImage", "stack_frames",
           "select_frames", "build_reference", "make_refid", "write_reference", "read_reference",
           "reference_filename", "CATALOG_COLUMNS"]

_SIGMA_PER_FWHM = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
_SATURATED = MASK_BITS["SATURATED"] | MASK_BITS["BLEED"]
#: Columns of the reference's PSF-fit catalogue (x, y 1-based; mag calibrated to MAGZP).
CATALOG_COLUMNS = ("id", "ra", "dec", "x", "y", "flux", "fluxerr", "mag", "magerr", "snr",
                   "sharp", "chi", "flags")


class ReferenceError(ValueError):
    """A reference that cannot be built or read; the message names the source and problem."""

    def __init__(self, source: str | os.PathLike, problem: str):
        self.source, self.problem = str(source), problem
        super().__init__(f"{self.source}: {problem}")


@dataclass(frozen=True)
class ReferenceConfig:
    """Settings of :func:`build_reference` (see the module docstring for their meaning)."""

    max_frames: int = 40
    min_frames: int = 3
    max_seeing_ratio: float = 1.6       # FWHM / best frame's FWHM
    max_fwhm_arcsec: float = 4.0
    max_depth_loss_mag: float = 0.5     # limiting mag below the median: dropped
    zeropoint: float = 27.0             # common zero point of the coadd, mag for 1 ADU
    clip_sigma: float = 5.0
    clip_flux_fraction: float = 0.05
    clip_psf_factor: float = 1.5
    clip_grow: int = 1
    block_rows: int = 512               # rows per block of the median (bounds memory)
    gaia_margin_deg: float = 0.05       # Gaia looked up this far around the footprint
    characterize: CharacterizeConfig = field(default_factory=CharacterizeConfig)
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)

    def __post_init__(self):
        if not 1 <= self.min_frames <= self.max_frames:
            raise ValueError("1 <= min_frames <= max_frames required")
        if self.max_seeing_ratio < 1 or self.max_fwhm_arcsec <= 0 or self.max_depth_loss_mag < 0:
            raise ValueError("max_seeing_ratio >= 1, max_fwhm_arcsec > 0, max_depth_loss_mag >= 0 required")
        if self.clip_sigma <= 0 or self.clip_grow < 0 or self.block_rows < 1:
            raise ValueError("clip_sigma > 0, clip_grow >= 0 and block_rows >= 1 required")


@dataclass(frozen=True)
class StackResult:
    """What :func:`stack_frames` combined (coadd units: the common zero point)."""

    data: np.ndarray        # float32 weighted mean, 0 where no frame contributes
    rms: np.ndarray         # float32 background noise from the weights, NaN where no frame
    coverage: np.ndarray    # int16 frames used per pixel
    mask: np.ndarray        # int16 MASK_BITS: EDGE (no frame covers), BAD (all masked), SATURATED
    n_clipped: np.ndarray   # pixels rejected per frame (grown)
    gain: float             # effective gain, e-/ADU, all frames contributing


@dataclass
class ReferenceImage:
    """A reference image in memory (what :func:`read_reference` returns, too).

    ``data`` is background-subtracted, in ADU at ``zeropoint``; ``rms`` the background noise
    map (None for a plain image), ``coverage`` frames per pixel (None for a plain image);
    ``psf``, ``catalog`` (:data:`CATALOG_COLUMNS`) and ``frames`` (one row per input frame:
    expid, path, obsmjd, airmass, fwhm_arcsec, zp, zp_unc, limmag, bkg_level, bkg_rms, scale, weight,
    n_clipped, used, reason) are None when absent.  Identifiers are None and numbers NaN
    when a plain image's header lacks them.  ``header`` is the primary header.
    """

    data: np.ndarray
    mask: np.ndarray
    wcs: WCS
    header: fits.Header
    zeropoint: float
    rms: np.ndarray | None = None
    coverage: np.ndarray | None = None
    psf: PSFModel | None = None
    catalog: Table | None = None
    frames: Table | None = None
    refid: int | None = None
    fieldid: int | None = None
    ccdid: int | None = None
    qid: int | None = None
    filter: str | None = None
    gain: float = math.nan
    saturate: float = math.nan
    nframes: int = 0
    jdstart: float = math.nan
    jdend: float = math.nan
    fwhm_arcsec: float = math.nan
    limiting_mag: float = math.nan
    path: str | None = None
    timings: dict = field(default_factory=dict)

    @property
    def rcid(self) -> int | None:
        return None if self.ccdid is None or self.qid is None else rcid_of(self.ccdid, self.qid)

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape


def _sorted_median(cube: np.ndarray) -> np.ndarray:
    """Median over axis 0 ignoring NaN (NaN where all are): np.nanmedian took 7 times as long."""
    count = np.count_nonzero(~np.isnan(cube), axis=0)
    ordered = np.sort(cube, axis=0)             # NaN sort last
    last = cube.shape[0] - 1
    lo = np.take_along_axis(ordered, np.clip((count - 1) // 2, 0, last)[None], 0)[0]
    hi = np.take_along_axis(ordered, np.clip(count // 2, 0, last)[None], 0)[0]
    return np.where(count > 0, 0.5 * (lo + hi), np.nan).astype(np.float32)


def stack_frames(images: Sequence[np.ndarray], masks: Sequence[np.ndarray], scales, sky_rms, gains,
                 fwhm_px, config: ReferenceConfig = ReferenceConfig()) -> StackResult:
    """Combine registered frames into a weighted mean with per-pixel outlier rejection.

    Parameters
    ----------
    images : sequence of ndarray
        Registered, background-subtracted frames on one grid, each in its own ADU (NaN: no data).
    masks : sequence of ndarray
        Their bit masks (:data:`pipeline.image.MASK_BITS`, 0 = good; ``EDGE``: not covered).
    scales : array_like
        Flux scale of each frame to the common zero point.
    sky_rms, gains : array_like
        Background noise (the frame's ADU, before registration) and gain (e-/ADU) per frame.
    fwhm_px : array_like
        PSF FWHM of each frame in grid pixels (the PSF-mismatch term of the rejection).
    config : ReferenceConfig

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


def select_frames(frames: Table, config: ReferenceConfig = ReferenceConfig()) -> Table:
    """Apply the seeing, depth and number cuts to a frame table, in that order.

    ``frames`` needs ``reason`` (non-empty: already rejected), ``fwhm_arcsec`` and
    ``limmag``; a copy is returned with ``used`` set and ``reason`` filled for every frame
    dropped here.
    """
    table = frames.copy()
    reason = [str(r) for r in table["reason"]]
    fwhm = np.asarray(table["fwhm_arcsec"], dtype=np.float64)
    limmag = np.asarray(table["limmag"], dtype=np.float64)
    ok = np.array([r == "" for r in reason])

    def drop(rows, why) -> None:
        for i in np.flatnonzero(rows):
            reason[i] = why(i)
        ok[rows] = False

    drop(ok & ~(fwhm <= config.max_fwhm_arcsec),
         lambda i: f"seeing {fwhm[i]:.2f}\" > {config.max_fwhm_arcsec:.2f}\" (max_fwhm_arcsec)")
    if ok.any():
        best = float(fwhm[ok].min())
        drop(ok & (fwhm > config.max_seeing_ratio * best),
             lambda i: f"seeing {fwhm[i]:.2f}\" > {config.max_seeing_ratio:g} x best {best:.2f}\"")
    if ok.any():
        median = float(np.median(limmag[ok]))
        drop(ok & ~(limmag >= median - config.max_depth_loss_mag),
             lambda i: f"limiting mag {limmag[i]:.2f} < median {median:.2f} - {config.max_depth_loss_mag:g}")
    rows = np.flatnonzero(ok)
    if rows.size > config.max_frames:
        deepest = rows[np.argsort(-limmag[rows], kind="stable")]
        drop(np.isin(np.arange(len(table)), deepest[config.max_frames:]),
             lambda i: f"not among the {config.max_frames} deepest frames (max_frames)")
    table["used"] = ok
    table["reason"] = reason
    return table


def make_refid(fieldid: int, rcid: int, filterid: int, expids) -> int:
    """The reference id (see the module docstring): field, rcid, filter and the exposures used."""
    if not 0 <= fieldid < 2 ** 23 or not 0 <= rcid < 64 or not 0 <= filterid < 4:
        raise ValueError(f"refid needs 0 <= fieldid < 2**23, rcid 0-63, filterid 0-3; got "
                         f"{fieldid}, {rcid}, {filterid}")
    text = ",".join(str(int(e)) for e in sorted(int(e) for e in expids)).encode()
    digest = int.from_bytes(hashlib.blake2b(text, digest_size=4).digest(), "big")
    return (fieldid << 40) | (rcid << 34) | (filterid << 32) | digest


def reference_filename(fieldid: int, ccdid: int, qid: int, filt: str) -> str:
    """``ref_f<field>_c<ccd>_q<qid>_<filter>.fits`` (field 6 digits, CCD 2)."""
    return f"ref_f{fieldid:06d}_c{ccdid:02d}_q{qid}_{filt}.fits"


def _pixel_scale_arcsec(wcs: WCS) -> float:
    return 3600.0 * math.sqrt(abs(float(np.linalg.det(wcs.pixel_scale_matrix))))


def _astrometry_problem(frame: QuadrantImage) -> str:
    if frame.wcs is None:
        return "no WCS in the header"
    if "ASTRUSE" not in frame.header:
        return "no ASTRUSE keyword (astrometry not run)"
    if frame.header["ASTRUSE"] is not True:
        return f"astrometry not usable (ASTRUSE = {frame.header['ASTRUSE']!r})"
    return ""


def _characterize_frames(frames, gaia, band, config):
    """The frame table and each frame's background map (None when rejected); only the
    maps are kept of the characterisations, to bound the memory of a 40-frame build."""
    rows, backgrounds = [], []
    for frame in frames:
        meta = frame.meta
        row = dict(expid=meta.expid, path=frame.path or "<memory>", obsmjd=meta.obsmjd,
                   airmass=meta.airmass, fwhm_arcsec=math.nan, zp=math.nan, zp_unc=math.nan,
                   limmag=math.nan, bkg_level=math.nan, bkg_rms=math.nan, scale=math.nan, weight=0.0,
                   n_clipped=0, used=False, reason=_astrometry_problem(frame))
        result = None
        if not row["reason"]:
            epoch_gaia = None if gaia is None else propagate_to_epoch(gaia, meta.obstime)
            try:
                result = characterize_image(frame.data, frame.mask, frame.wcs, meta.gain, meta.saturate,
                                            band, epoch_gaia, header=frame.header, config=config.characterize,
                                            read_noise=meta.readnoi)
            except ValueError as exc:   # CharacterizeError, or a stage's own ValueError
                row["reason"] = f"characterization failed: {exc}"
        if result is not None and not math.isfinite(result.psf.fwhm):
            row["reason"], result = "characterization failed: PSF FWHM not finite", None
        if result is not None and result.photcal is None:
            row["reason"], result = "no zero point (no Gaia catalogue and no MAGZP)", None
        if result is not None:
            row.update(fwhm_arcsec=result.psf.fwhm * _pixel_scale_arcsec(frame.wcs),
                       zp=result.photcal.magzpsci, zp_unc=result.photcal.magzpsciunc,
                       limmag=result.limiting_mag, bkg_level=result.extraction.background_level,
                       bkg_rms=result.extraction.background_rms)
        rows.append(row)
        backgrounds.append(None if result is None else result.extraction.background_map)
    return Table(rows=rows), backgrounds


def _reject(table: Table, row: int, why: str) -> None:
    """Mark a frame unused; the reason column is rebuilt (a fixed-width column would truncate)."""
    reasons = [str(r) for r in table["reason"]]
    reasons[row] = why
    table["reason"] = reasons
    table["used"][row] = False


def _group(frames: Sequence[QuadrantImage]) -> tuple[int, int, int, str]:
    keys = Counter((f.meta.fieldid, f.meta.ccdid, f.meta.qid, f.meta.filter) for f in frames)
    if len(keys) != 1:
        raise ReferenceError("<frames>", "frames of several field/CCD/quadrant/filter groups: "
                             + ", ".join(f"{k} x{n}" for k, n in keys.items()))
    return next(iter(keys))


def build_reference(frames: Sequence[QuadrantImage], gaia: Table | None, band: FilterConfig,
                    config: ReferenceConfig = ReferenceConfig()) -> ReferenceImage:
    """Coadd the good frames of one field/CCD/quadrant/filter into a reference image.

    Parameters
    ----------
    frames : sequence of QuadrantImage
        Solved quadrant images (:func:`pipeline.image.read_quadrant`; header WCS and
        ``ASTRUSE``) of one field, CCD, quadrant and filter.
    gaia : Table or None
        Gaia catalogue covering the quadrant at its own epoch (propagated to each frame's);
        None: zero points from the frames' ``MAGZP`` only.
    band : FilterConfig
        The frames' filter.
    config : ReferenceConfig

    Returns
    -------
    ReferenceImage
        With ``timings`` (s): characterize, register, stack, coadd, total.

    Raises
    ------
    ReferenceError
        No frames, mixed groups, fewer than ``min_frames`` usable frames (every reason
        listed), or a coadd that cannot be characterised.
    """
    clock = time.perf_counter
    t0 = clock()
    if not frames:
        raise ReferenceError("<frames>", "no frames given")
    fieldid, ccdid, qid, filt = _group(frames)
    source = f"reference f{fieldid} c{ccdid} q{qid} {filt}"
    table, backgrounds = _characterize_frames(frames, gaia, band, config)
    table = select_frames(table, config)
    timings = {"characterize": clock() - t0}
    used = np.flatnonzero(table["used"])
    if used.size < config.min_frames:
        why = "; ".join(f"{table['path'][i]}: {table['reason'][i]}" for i in range(len(table)) if not table["used"][i])
        raise ReferenceError(source, f"{used.size} usable frame(s), at least {config.min_frames} needed"
                             + (f" ({why})" if why else ""))

    t1 = clock()
    grid = int(used[np.argmin(np.asarray(table["fwhm_arcsec"])[used])])
    grid_wcs, shape = frames[grid].wcs, frames[grid].shape
    grid_scale = _pixel_scale_arcsec(grid_wcs)
    images, masks = [], []
    for i in used:
        frame = frames[i]
        subtracted = np.where(frame.mask == 0, frame.data - backgrounds[i], 0.0)
        backgrounds[i] = None
        if i == grid:
            images.append(subtracted.astype(np.float32))
            masks.append(frame.mask.astype(np.int16))
            continue
        try:
            registered = register_image(subtracted.astype(np.float32), frame.wcs, grid_wcs, shape,
                                        mask=frame.mask, config=config.registration)
        except RegistrationError as exc:
            _reject(table, i, f"registration failed: {exc}")
            continue
        images.append(registered.data)
        masks.append(registered.mask)
    used = np.flatnonzero(table["used"])
    if used.size < config.min_frames:
        raise ReferenceError(source, f"{used.size} frame(s) left after registration, at least "
                             f"{config.min_frames} needed")
    timings["register"] = clock() - t1

    t2 = clock()
    zp, sky = np.asarray(table["zp"])[used], np.asarray(table["bkg_rms"])[used]
    scales = 10.0 ** (0.4 * (config.zeropoint - zp))
    gains = np.array([frames[i].meta.gain for i in used])
    stack = stack_frames(images, masks, scales, sky, gains,
                         np.asarray(table["fwhm_arcsec"])[used] / grid_scale, config)
    del images, masks
    for column, values in (("scale", scales), ("weight", 1.0 / (scales * sky) ** 2), ("n_clipped", stack.n_clipped)):
        table[column][used] = values
    levels = np.asarray(table["bkg_level"])[used]
    saturate = float(np.min(scales * (np.array([frames[i].meta.saturate for i in used]) - levels)))
    weights = np.asarray(table["weight"])[used]
    read_noise_adu = math.sqrt(np.sum(weights ** 2 * scales ** 2 * (np.array(
        [frames[i].meta.readnoi / frames[i].meta.gain for i in used])) ** 2)) / weights.sum()
    timings["stack"] = clock() - t2

    t3 = clock()
    mjd = np.asarray(table["obsmjd"])[used]
    coadd_gaia = None if gaia is None else propagate_to_epoch(gaia, Time(float(np.mean(mjd)), format="mjd"))
    result, zp_check = _characterize_coadd(stack, grid_wcs, saturate, band, coadd_gaia, config, source)
    timings["coadd"] = clock() - t3

    expids = [int(e) for e in np.asarray(table["expid"])[used]]
    filterid = FILTER_IDS[filt]
    ref = ReferenceImage(
        data=stack.data, mask=stack.mask, wcs=grid_wcs, header=fits.Header(), zeropoint=config.zeropoint,
        rms=stack.rms, coverage=stack.coverage, psf=result.psf,
        catalog=_catalog(result.photometry, config.zeropoint), frames=table,
        refid=make_refid(fieldid, rcid_of(ccdid, qid), filterid, expids), fieldid=fieldid, ccdid=ccdid,
        qid=qid, filter=filt, gain=stack.gain, saturate=saturate, nframes=int(used.size),
        jdstart=float(mjd.min() + 2400000.5), jdend=float(mjd.max() + 2400000.5),
        fwhm_arcsec=result.psf.fwhm * grid_scale, limiting_mag=result.limiting_mag, timings=timings)
    grid_header = frames[grid].header
    ref.header = _primary_header(ref, [frames[i] for i in used], grid_header, read_noise_adu, zp_check,
                                 result.photcal.clrcoeff)
    timings["total"] = clock() - t0
    return ref


def _characterize_coadd(stack: StackResult, wcs, saturate, band, gaia, config, source):
    """The coadd's characterisation with the weights' noise map, and a free Gaia zero point."""
    try:
        extraction = extract_sources(stack.data, stack.mask, stack.gain, saturate, config.characterize.extraction)
    except ExtractionError as exc:
        raise ReferenceError(source, f"coadd extraction failed: {exc}") from None
    covered = np.isfinite(stack.rms)
    typical = float(np.median(stack.rms[covered]))
    # PSF fits and the depth need the noise at PSF scales: the weights' map, not sep's
    # pixel-to-pixel estimate, which resampling lowers (see the module docstring).
    extraction = replace(extraction, rms_map=np.where(covered, stack.rms, typical).astype(np.float32),
                         background_rms=typical)
    header = fits.Header({"MAGZP": config.zeropoint})
    try:
        result = characterize_image(stack.data, stack.mask, wcs, stack.gain, saturate, band, gaia,
                                    header=header, config=config.characterize, extraction=extraction)
    except ValueError as exc:   # CharacterizeError, or a stage's own ValueError
        raise ReferenceError(source, f"coadd characterization failed: {exc}") from None
    zp_check = math.nan
    if gaia is not None:
        try:
            zp_check = calibrate_zeropoint(result.photometry, wcs, gaia, band,
                                           config=config.characterize.photcal).magzpsci
        except PhotCalError:
            pass  # the check is reported as NaN; the coadd's zero point is set, not fitted
    return result, zp_check


def _catalog(photometry: Table, zeropoint: float) -> Table:
    mag, magerr = flux_to_mag(photometry["flux"], photometry["fluxerr"], zeropoint)
    columns = {"id": np.arange(1, len(photometry) + 1, dtype=np.int32),
               "ra": photometry["ra"], "dec": photometry["dec"], "x": photometry["x"], "y": photometry["y"],
               "flux": photometry["flux"], "fluxerr": photometry["fluxerr"], "mag": mag, "magerr": magerr,
               "snr": photometry["snr"], "sharp": photometry["sharpness"], "chi": photometry["chi2"],
               "flags": photometry["flags"]}
    table = Table({k: np.asarray(v) for k, v in columns.items()})
    for name, unit in (("ra", "deg"), ("dec", "deg"), ("x", "pix"), ("y", "pix"), ("flux", "adu"),
                       ("fluxerr", "adu"), ("mag", "mag"), ("magerr", "mag")):
        table[name].unit = unit
    return table


def _primary_header(ref: ReferenceImage, used: Sequence[QuadrantImage], grid_header: fits.Header,
                    read_noise_adu: float, zp_check: float, clrcoeff: float) -> fits.Header:
    """The input-contract keywords (so :func:`pipeline.image.read_quadrant` reads a
    reference), the grid frame's WCS cards verbatim, and the reference's own keywords."""
    metas = [f.meta for f in used]
    header = fits.Header()
    cards = [
        ("IMAGETYP", "REFERENCE", "coadd of NFRAMES exposures"),
        ("REFID", ref.refid, "reference id"),
        ("FIELDID", ref.fieldid, "survey field id"), ("CCDID", ref.ccdid, "CCD id"),
        ("QID", ref.qid, "quadrant id within the CCD"), ("RCID", ref.rcid, "readout channel id"),
        ("FILTER", ref.filter, "filter"), ("FILTERID", FILTER_IDS[ref.filter], "filter id"),
        ("OBSMJD", ref.jdstart - 2400000.5, "UTC MJD at the start of the first exposure"),
        ("EXPTIME", float(sum(m.exptime for m in metas)), "s, total of the exposures used"),
        ("EXPID", 0, "no single exposure: a reference"),
        ("PROGRMID", Counter(m.progrmid for m in metas).most_common(1)[0][0], "program id (most frames)"),
        ("TELRA", float(np.median([m.telra for m in metas])), "median boresight RA of the frames, deg"),
        ("TELDEC", float(np.median([m.teldec for m in metas])), "median boresight Dec of the frames, deg"),
        ("AIRMASS", float(np.median([m.airmass for m in metas])), "median airmass of the frames"),
        ("GAIN", ref.gain, "effective e-/ADU: source variance = coadd/GAIN"),
        ("READNOI", read_noise_adu * ref.gain, "effective read noise, e- (in the RMS map)"),
        ("SATURATE", ref.saturate, "ADU, lowest scaled frame saturation"),
        ("MAGZP", ref.zeropoint, "common zero point, mag for 1 ADU at BP-RP=0"),
        ("MAGZPFIT", zp_check, "zero point fitted to Gaia on the coadd (check)"),
        ("CLRCOEFF", clrcoeff, "colour coefficient on Gaia BP-RP"),
        ("NFRAMES", ref.nframes, "exposures coadded"),
        ("JDSTART", ref.jdstart, "JD at the start of the first exposure used"),
        ("JDEND", ref.jdend, "JD at the start of the last exposure used"),
        ("SEEING", ref.fwhm_arcsec, "PSF FWHM of the coadd, arcsec"),
        ("FWHM", ref.psf.fwhm if ref.psf is not None else math.nan, "PSF FWHM of the coadd, px"),
        ("LIMMAG", ref.limiting_mag, "5-sigma point-source limit, mag"),
        ("PIXRMSF", _pixel_noise_factor(ref), "pixel-to-pixel sky std / RMS map (resampling)"),
        ("BUNIT", "adu", "background-subtracted, scaled to MAGZP"),
    ]
    for key, value, comment in cards:
        header[key] = (value.item() if isinstance(value, np.generic) else value, comment)
    for card in grid_header.cards:
        if is_wcs_keyword(card.keyword):
            header[card.keyword] = (card.value, card.comment)
    return header


def _pixel_noise_factor(ref: ReferenceImage) -> float:
    sky = (ref.mask == 0) & np.isfinite(ref.rms)
    if ref.catalog is not None and sky.sum() > 1000:
        _, _, std = sigma_clipped_stats(ref.data[sky][::7], sigma=3.0, stdfunc="mad_std")
        return float(std / np.median(ref.rms[sky]))
    return math.nan


def write_reference(path: str | os.PathLike, ref: ReferenceImage) -> os.PathLike:
    """Write a reference as one FITS file, atomically.

    Layout: primary HDU the coadd (float32, header :func:`build_reference`'s: WCS, the
    input-contract keywords, REFID, MAGZP, GAIN, SATURATE, NFRAMES, JDSTART, JDEND, SEEING,
    FWHM, LIMMAG...), then image HDUs ``MASK`` (int16), ``RMS`` (float32), ``COVERAGE``
    (int16), ``PSF`` (:meth:`pipeline.psf.PSFModel.to_fits`'s cube and header), and
    binary tables ``CATALOG`` and ``FRAMES``; the optional parts are written when present.
    """
    header = ref.header.copy()
    if header_wcs(header) is None:
        header.update(ref.wcs.to_header(relax=True))
    hdus = [fits.PrimaryHDU(np.asarray(ref.data, dtype=np.float32), header=header),
            fits.ImageHDU(np.asarray(ref.mask, dtype=np.int16), name="MASK")]
    if ref.rms is not None:
        hdus.append(fits.ImageHDU(np.asarray(ref.rms, dtype=np.float32), name="RMS"))
    if ref.coverage is not None:
        hdus.append(fits.ImageHDU(np.asarray(ref.coverage, dtype=np.int16), name="COVERAGE"))
    if ref.psf is not None:
        psf_hdu = ref.psf.to_fits()[0]
        hdus.append(fits.ImageHDU(psf_hdu.data, header=psf_hdu.header, name="PSF"))
    for name, table in (("CATALOG", ref.catalog), ("FRAMES", ref.frames)):
        if table is not None:
            hdus.append(fits.table_to_hdu(table, name=name))
    return write_fits_atomic(fits.HDUList(hdus), path)


def read_reference(path: str | os.PathLike) -> ReferenceImage:
    """Read and validate a reference file (or a plain image with a WCS and MAGZP).

    Raises
    ------
    ReferenceError
        Missing or unreadable file, no 2-D primary image, no WCS, no finite MAGZP, or an
        extension of the wrong shape or content.
    """
    source = str(path)
    try:
        with fits.open(path, memmap=False) as hdul:
            hdul.verify("silentfix")
            primary = hdul[0]
            if primary.data is None or primary.data.ndim != 2:
                raise ReferenceError(source, "primary HDU holds no 2-D image")
            data = np.asarray(primary.data, dtype=np.float32)
            header = primary.header.copy()
            parts = {name: _read_part(hdul, name, data.shape, source)
                     for name in ("MASK", "RMS", "COVERAGE")}
            psf = PSFModel.from_fits(fits.HDUList([fits.PrimaryHDU(hdul["PSF"].data, hdul["PSF"].header)]),
                                     f"{source}[PSF]") if "PSF" in hdul else None
            tables = {name: Table.read(hdul[name], mask_invalid=False) if name in hdul else None
                      for name in ("CATALOG", "FRAMES")}
    except ReferenceError:
        raise
    except FileNotFoundError:
        raise ReferenceError(source, "file not found") from None
    except PSFError as exc:
        raise ReferenceError(source, f"bad PSF extension ({exc})") from None
    except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise ReferenceError(source, f"not a readable FITS reference ({exc})") from None
    wcs = header_wcs(header)
    if wcs is None:
        raise ReferenceError(source, "no celestial WCS in the primary header")
    zeropoint = _header_number(header, "MAGZP", source, required=True)
    catalog = tables["CATALOG"]
    if catalog is not None and not set(CATALOG_COLUMNS) <= set(catalog.colnames):
        raise ReferenceError(source, "CATALOG lacks columns "
                             + ", ".join(sorted(set(CATALOG_COLUMNS) - set(catalog.colnames))))
    mask = parts["MASK"] if parts["MASK"] is not None else np.zeros(data.shape, dtype=np.int16)
    mask = np.where(np.isfinite(data), mask, mask | MASK_BITS["NAN"]).astype(np.int16)

    def ident(key):
        value = header.get(key)
        return None if value is None else (str(value).strip() if key == "FILTER" else int(value))

    return ReferenceImage(
        data=data, mask=mask, wcs=wcs, header=header, zeropoint=zeropoint, rms=parts["RMS"],
        coverage=parts["COVERAGE"], psf=psf, catalog=catalog, frames=tables["FRAMES"],
        refid=ident("REFID"), fieldid=ident("FIELDID"), ccdid=ident("CCDID"), qid=ident("QID"),
        filter=ident("FILTER"), gain=_header_number(header, "GAIN", source),
        saturate=_header_number(header, "SATURATE", source), nframes=int(header.get("NFRAMES", 0)),
        jdstart=_header_number(header, "JDSTART", source), jdend=_header_number(header, "JDEND", source),
        fwhm_arcsec=_header_number(header, "SEEING", source),
        limiting_mag=_header_number(header, "LIMMAG", source), path=source)


def _read_part(hdul: fits.HDUList, name: str, shape, source: str) -> np.ndarray | None:
    if name not in hdul:
        return None
    values = hdul[name].data
    if values is None or values.shape != shape:
        raise ReferenceError(source, f"{name} extension does not match the image shape {shape}")
    if name != "RMS" and not np.issubdtype(values.dtype, np.integer):
        raise ReferenceError(source, f"{name} extension must hold integers")
    return np.asarray(values, dtype=np.float32 if name == "RMS" else np.int16)


def _header_number(header: fits.Header, key: str, source: str, required: bool = False) -> float:
    if key not in header:
        if required:
            raise ReferenceError(source, f"missing keyword {key}")
        return math.nan
    value = header[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (required and not math.isfinite(value)):
        raise ReferenceError(source, f"keyword {key} must be a finite number, got {value!r}")
    return float(value)
