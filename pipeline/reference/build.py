r"""Reference images: an outlier-rejecting weighted coadd of the good exposures of one
field, CCD, quadrant and filter, with the coadd's PSF and PSF-fit catalogue.

:func:`build_reference` is pure (frames and Gaia in, :class:`ReferenceImage` out).  The
per-pixel combination is :mod:`pipeline.reference.stack`'s (:func:`stack_frames`), the
in-memory model :mod:`pipeline.reference.model`'s, the file format (:func:`write_reference`,
:func:`read_reference`, :func:`reference_filename`) :mod:`pipeline.reference.files`'s.

Method
------
*Characterisation and cuts.*  Every frame is characterised
(:func:`pipeline.measure.characterize.characterize_image`: PSF, Gaia zero point, 5-sigma limit).
A frame is dropped, with its reason recorded in the frame table, when its astrometry is
not usable (``ASTRUSE`` false or absent, no WCS), it cannot be characterised, its PSF
FWHM exceeds ``max_fwhm_arcsec`` or ``max_seeing_ratio`` times the best frame's, or its
limiting magnitude is more than ``max_depth_loss_mag`` above the median of the frames
left; of the rest the ``max_frames`` deepest are kept.

*Grid.*  The coadd is built on the pixel grid of the best-seeing frame kept, grown by
``grid_margin_px`` on every side: its WCS with ``CRPIX`` shifted by the margin, its shape
grown by twice the margin.  The frame is a real solved exposure of this very quadrant, so
the grid matches the science quadrants' geometry, and the sharpest frame, whose fine
detail resampling would smear the most, lands on whole pixels and is not resampled.
Science exposures of the quadrant are pointed some 20-60 px away from that frame; the
margin lets the other frames, pointed as variously, cover the science images' edges
instead of leaving them outside the reference.  Pixels no frame covers are ``EDGE`` with
coverage 0.

*Scaling.*  Frames are background-subtracted (the characterisation's sky map), registered
(:func:`pipeline.measure.registration.register_image`) and scaled to the common zero point
``zeropoint``: ``scale = 10**(0.4 * (zeropoint - zp_frame))``.  The default 27.0 puts every
reference of the survey in the same flux unit (1 ADU = mag 27), whatever frames a build
used, so catalogue fluxes (and matchfiles seeded from them) stay comparable across fields
and rebuilds; it is of the order of the frames' own zero points (ZTF's 30 s exposures
26.0-26.4, the simulator's about 27.7), so scales stay near 1 and float32 loses nothing.
The saturation level is the lowest scaled, background-subtracted level at which a frame
saturates.

*Identifier.*  ``refid = fieldid * 2**40 + rcid * 2**34 + filterid * 2**32 + h`` with
``h`` the first 32 bits of BLAKE2b over the sorted exposure ids used: deterministic (a
rebuild from the same frames has the same id, from other frames another one), decodable,
and below 2**63 for field ids under 2**23.
"""
from __future__ import annotations

import hashlib
import math
import re
import time
from collections import Counter
from dataclasses import replace
from typing import Sequence

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS

from catalogs import propagate_to_epoch
from pipeline.measure.characterize import characterize_image
from pipeline.core.config import FilterConfig, ReferenceConfig
from pipeline.measure.extract import ExtractionError, extract_sources
from pipeline.core.image import FILTER_IDS, MASK_BITS, QuadrantImage, header_wcs, rcid_of
from pipeline.measure.calibration import PhotCalError, calibrate_zeropoint
from pipeline.measure.photometry import flux_to_mag
from pipeline.reference.files import primary_header
from pipeline.reference.model import ReferenceError, ReferenceImage
from pipeline.reference.stack import StackResult, stack_frames
from pipeline.measure.registration import RegistrationError, register_image
from pipeline.formats.scamp_head import is_wcs_keyword

__all__ = ["ReferenceConfig", "select_frames", "build_reference", "make_refid", "reference_grid",
           "characterize_reference", "noise_correlation_factor"]

_CRPIX = re.compile(r"CRPIX([12])[A-Z]?")


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


def reference_grid(frame: QuadrantImage, margin_px: int) -> tuple[fits.Header, WCS, tuple[int, int]]:
    """The coadd's grid: ``frame``'s WCS cards with every ``CRPIX`` shifted by ``margin_px``,
    their WCS, and ``frame``'s shape grown by twice the margin.

    Raises
    ------
    ReferenceError
        A WCS the shift does not carry over exactly (distortion tables in detector pixels).
    """
    # New cards: a Header built from the frame's Card objects would share (and shift) them.
    header = fits.Header([(card.keyword, card.value, card.comment) for card in frame.header.cards
                          if is_wcs_keyword(card.keyword)])
    for axis in ("1", "2"):
        header.setdefault(f"CRPIX{axis}", 0.0)      # FITS's default reference pixel
    for key in [k for k in header if _CRPIX.fullmatch(k)]:
        header[key] = float(header[key]) + margin_px
    wcs = header_wcs(header)
    ny, nx = frame.shape
    shape = (ny + 2 * margin_px, nx + 2 * margin_px)
    wcs.pixel_shape = (shape[1], shape[0])
    # SIP and TPV are polynomials in pixel - CRPIX and follow the shift; Paper IV lookup
    # tables are in detector pixels and would not: check on a few pixels.
    x, y = np.meshgrid(np.linspace(0, nx - 1, 3), np.linspace(0, ny - 1, 3))
    ra0, dec0 = frame.wcs.all_pix2world(x.ravel(), y.ravel(), 0)
    ra1, dec1 = wcs.all_pix2world(x.ravel() + margin_px, y.ravel() + margin_px, 0)
    offset = np.hypot((ra1 - ra0) * np.cos(np.deg2rad(dec0)), dec1 - dec0) * 3600.0
    if np.max(offset) > 1e-4:
        raise ReferenceError(frame.path or "<memory>", f"the grid WCS does not follow a {margin_px} px "
                             f"margin (off by {np.max(offset):.2g}\"): a distortion table?")
    return header, wcs, shape


def build_reference(frames: Sequence[QuadrantImage], gaia: Table | None, band: FilterConfig,
                    config: ReferenceConfig = ReferenceConfig()) -> ReferenceImage:
    """Coadd the good frames of one field/CCD/quadrant/filter into a reference image.

    Parameters
    ----------
    frames : sequence of QuadrantImage
        Solved quadrant images (:func:`pipeline.core.image.read_quadrant`; header WCS and
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
    margin = config.grid_margin_px
    grid_header, grid_wcs, shape = reference_grid(frames[grid], margin)
    grid_scale = _pixel_scale_arcsec(grid_wcs)
    images, masks = [], []
    for i in used:
        frame = frames[i]
        subtracted = np.where(frame.mask == 0, frame.data - backgrounds[i], 0.0)
        backgrounds[i] = None
        if i == grid:
            images.append(np.pad(subtracted.astype(np.float32), margin))
            masks.append(np.pad(frame.mask.astype(np.int16), margin, constant_values=MASK_BITS["EDGE"]))
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
    zp = np.asarray(table["zp"])[used]
    scales = 10.0 ** (0.4 * (config.zeropoint - zp))
    gains = np.array([frames[i].meta.gain for i in used])
    # Each frame's background noise is its sky level's photon noise plus its read noise, not
    # sep's rms (bkg_rms): in a crowded field that also holds the confusion of faint
    # unresolved stars, static (it does not average down in the coadd, nor appear in a
    # difference) and whose photon noise is the sources' variance coadd / gain.  At the
    # plane preset (60,000 stars per deg2) bkg_rms is 7-15 % above the photon noise; at
    # 5,000 they agree.
    sky = np.sqrt(np.maximum(np.asarray(table["bkg_level"])[used], 0.0) / gains
                  + (np.array([frames[i].meta.readnoi for i in used]) / gains) ** 2)
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
    result, zp_check = _characterize_coadd(stack.data, stack.mask, grid_wcs, stack.gain, saturate, stack.rms, band,
                                           coadd_gaia, config, source, magzp=config.zeropoint)
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
    ref.header = primary_header(ref, [frames[i] for i in used], grid_header, read_noise_adu, zp_check,
                                result.photcal.clrcoeff, margin)
    timings["total"] = clock() - t0
    return ref


def _characterize_coadd(data, mask, wcs, gain, saturate, rms, band, gaia, config, source, magzp=None):
    """A coadd's characterisation: PSF, PSF-fit photometry, zero point and depth.

    Parameters
    ----------
    data, mask, wcs, gain, saturate
        The coadd (background-subtracted or not: sep's background is taken out).
    rms : ndarray or None
        The noise map at PSF scales (a built coadd's weights' map); None: sep's.
    magzp : float or None
        The zero point, set (a built coadd's common one, checked against Gaia); None: fitted
        to ``gaia``.

    Returns
    -------
    result : Characterization
    zp_check : float
        The zero point fitted to Gaia when ``magzp`` is set (NaN without Gaia or a fit).
    """
    try:
        extraction = extract_sources(data, mask, gain, saturate, config.characterize.extraction)
    except ExtractionError as exc:
        raise ReferenceError(source, f"coadd extraction failed: {exc}") from None
    if rms is not None:
        covered = np.isfinite(rms)
        typical = float(np.median(rms[covered]))
        # PSF fits and the depth need the noise at PSF scales: the weights' map, not sep's
        # pixel-to-pixel estimate, which resampling lowers (see :mod:`pipeline.reference.stack`).
        extraction = replace(extraction, rms_map=np.where(covered, rms, typical).astype(np.float32),
                             background_rms=typical)
    header = fits.Header({"MAGZP": magzp}) if magzp is not None else None
    try:
        result = characterize_image(data, mask, wcs, gain, saturate, band, gaia,
                                    header=header, config=config.characterize, extraction=extraction)
    except ValueError as exc:   # CharacterizeError, or a stage's own ValueError
        raise ReferenceError(source, f"coadd characterization failed: {exc}") from None
    if result.photcal is None:
        raise ReferenceError(source, "no zero point: no Gaia catalogue and no MAGZP")
    zp_check = math.nan
    if gaia is not None and magzp is not None:
        try:
            zp_check = calibrate_zeropoint(result.photometry, wcs, gaia, band,
                                           config=config.characterize.photcal).magzpsci
        except PhotCalError:
            pass  # the check is reported as NaN; the coadd's zero point is set, not fitted
    return result, zp_check


def noise_correlation_factor(data: np.ndarray, usable: np.ndarray, rms_map: np.ndarray, size: int) -> float:
    """How much the noise at PSF scales exceeds the pixel-to-pixel noise (1 for white noise).

    A coadd made by resampling has correlated noise: sep's RMS map (pixel-to-pixel)
    underestimates the noise of a PSF-sized sum, which ZOGY and PSF fits need.  The sky's
    ``size`` x ``size`` box sums, in units of the RMS map, scatter by ``size`` times this
    factor (robust scatter over the usable pixels, sources clipped).
    """
    from scipy.ndimage import uniform_filter
    from astropy.stats import sigma_clipped_stats

    size = max(int(size), 2)
    z = np.where(usable, data / np.where(rms_map > 0, rms_map, np.inf), 0.0)
    box = uniform_filter(z, size, mode="constant") * size          # box sum / size
    inside = uniform_filter(usable.astype(np.float32), size, mode="constant") > 0.999
    inside[:size, :] = inside[-size:, :] = False
    inside[:, :size] = inside[:, -size:] = False
    step = max(1, size)
    sample_box, sample_pix = box[inside][::step], z[inside][::step]
    if sample_box.size < 1000:
        return 1.0
    _, _, std_box = sigma_clipped_stats(sample_box, sigma=3.0, stdfunc="mad_std")
    _, _, std_pix = sigma_clipped_stats(sample_pix, sigma=3.0, stdfunc="mad_std")
    return float(max(std_box / std_pix, 1.0)) if std_pix > 0 else 1.0


def characterize_reference(ref: ReferenceImage, band: FilterConfig, gaia: Table | None,
                           config: ReferenceConfig = ReferenceConfig()) -> ReferenceImage:
    """A reference made elsewhere (a plain coadd), characterised as a built coadd is.

    A reference that already has skydiff's PSF and catalogue is returned as is.  Otherwise
    the coadd is characterised with the function the build uses on its own coadds: sep
    extraction (its background taken out of the pixels), the empirical PSF, PSF-fit
    catalogue, zero point and 5-sigma depth.  The zero point is fitted to ``gaia`` when
    given, else the header's ``MAGZP`` is kept.  The noise map is the file's ``RMS`` when
    it has one, else sep's pixel-to-pixel map scaled by :func:`noise_correlation_factor`
    (a resampled coadd's noise is correlated).

    Parameters
    ----------
    ref : ReferenceImage
        As :func:`pipeline.reference.files.read_reference` reads a plain image (WCS,
        ``MAGZP``, the contract's ``GAIN`` and ``SATURATE``).
    band : FilterConfig
        The reference's filter.
    gaia : Table or None
        Gaia rows over the reference at its epoch, or None (zero point from ``MAGZP``).
    config : ReferenceConfig
        Its ``characterize`` section is the build's.

    Returns
    -------
    ReferenceImage
        With ``psf``, ``catalog``, ``rms``, the background-subtracted pixels, ``zeropoint``,
        ``fwhm_arcsec``, ``limiting_mag``, a ``refid`` (from the header, else from the
        field, rcid, filter and a checksum of the pixels), the dates the alerts need
        (``JDSTART``/``JDEND`` from the header, else ``OBSMJD`` and ``OBSMJD + EXPTIME``;
        ``NFRAMES`` from the header, else 1) and a header carrying them
        (``IMAGETYP = REFERENCE``, ``REFSRC``), ready for :func:`write_reference`.

    Raises
    ------
    ReferenceError
        No usable ``GAIN`` or ``SATURATE``, or the coadd cannot be characterised (the
        message names the file and the stage).
    """
    if ref.psf is not None and ref.catalog is not None:
        return ref
    source = ref.path or "<reference>"
    clock = time.perf_counter
    t0 = clock()
    for key, value in (("GAIN", ref.gain), ("SATURATE", ref.saturate)):
        if not (math.isfinite(value) and value > 0):
            raise ReferenceError(source, f"a reference without skydiff's PSF and catalogue needs a positive {key} "
                                         "to be characterised")
    magzp = None if gaia is not None else ref.zeropoint
    result, _ = _characterize_coadd(ref.data, ref.mask, ref.wcs, ref.gain, ref.saturate, ref.rms, band, gaia,
                                    config, source, magzp=magzp)
    extraction = result.extraction
    zeropoint = float(result.photcal.magzpsci)
    data = (ref.data - extraction.background_map).astype(np.float32)
    rms, factor = ref.rms, 1.0
    if rms is None:
        usable = (ref.mask == 0) & np.isfinite(ref.data)
        factor = noise_correlation_factor(data, usable, extraction.rms_map, int(round(result.psf.fwhm)) or 2)
        rms = (extraction.rms_map * factor).astype(np.float32)
        if factor > 1.0:
            # the depth and the catalogue's errors were computed with the pixel-to-pixel noise
            result, _ = _characterize_coadd(ref.data, ref.mask, ref.wcs, ref.gain, ref.saturate, rms, band, gaia,
                                            config, source, magzp=zeropoint)
    scale = _pixel_scale_arcsec(ref.wcs)
    refid = ref.refid
    if refid is None and None not in (ref.fieldid, ref.ccdid, ref.qid) and ref.filter in FILTER_IDS:
        checksum = int.from_bytes(hashlib.blake2b(np.ascontiguousarray(ref.data).tobytes(), digest_size=4).digest(),
                                  "big")
        refid = make_refid(ref.fieldid, rcid_of(ref.ccdid, ref.qid), FILTER_IDS[ref.filter], [checksum])
    # the alert fields jdstartref, jdendref and nframesref: the header's, else the contract's dates
    jdstart, jdend, nframes = ref.jdstart, ref.jdend, ref.nframes
    obsmjd, exptime = ref.header.get("OBSMJD"), ref.header.get("EXPTIME")
    dated = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (obsmjd, exptime))
    if not (math.isfinite(jdstart) and math.isfinite(jdend)) and dated:
        jdstart, jdend = obsmjd + 2400000.5, obsmjd + 2400000.5 + exptime / 86400.0
    header = ref.header.copy()
    if nframes < 1:
        nframes = 1
        header["NFRAMES"] = (1, "not given: the coadd counts as one frame")
    cards = [("IMAGETYP", "REFERENCE", "reference image"),
             ("REFSRC", "imported", "made elsewhere, characterised by skydiff"),
             ("MAGZP", zeropoint, "zero point, mag for 1 ADU" + (" (fitted to Gaia)" if gaia is not None else "")),
             ("CLRCOEFF", float(result.photcal.clrcoeff), "colour coefficient on Gaia BP-RP"),
             ("SEEING", result.psf.fwhm * scale, "PSF FWHM, arcsec"), ("FWHM", result.psf.fwhm, "PSF FWHM, px"),
             ("LIMMAG", result.limiting_mag, "5-sigma point-source limit, mag"),
             ("NOISECOR", factor, "PSF-scale / pixel noise (RMS map scaled by it)"),
             ("BUNIT", "adu", "background-subtracted")]
    if math.isfinite(jdstart) and math.isfinite(jdend) and "JDSTART" not in ref.header:
        cards += [("JDSTART", jdstart, "JD of OBSMJD (not given)"), ("JDEND", jdend, "JD of OBSMJD + EXPTIME (not given)")]
    if refid is not None:
        cards.insert(1, ("REFID", refid, "reference id"))
    for key, value, comment in cards:
        header[key] = (value.item() if isinstance(value, np.generic) else value, comment)
    for key in ("BZERO", "BSCALE", "BLANK"):
        header.remove(key, ignore_missing=True)
    timings = dict(ref.timings, characterize=clock() - t0)
    return replace(ref, data=data, rms=rms, psf=result.psf, catalog=_catalog(result.photometry, zeropoint),
                   zeropoint=zeropoint, refid=refid, fwhm_arcsec=result.psf.fwhm * scale,
                   limiting_mag=result.limiting_mag, header=header, timings=timings, jdstart=jdstart, jdend=jdend,
                   nframes=nframes)


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
