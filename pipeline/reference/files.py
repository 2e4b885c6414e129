"""The reference image's file format (:func:`write_reference`, :func:`read_reference`), and
references built from solved image files (the file edge of the reference stage).

One FITS file, written atomically by :func:`write_reference` and validated by
:func:`read_reference`:

- primary HDU: the coadd, float32, background-subtracted, in ADU at the common zero point
  ``MAGZP``.  Its header (:func:`primary_header`) carries the input-contract keywords (so
  :func:`pipeline.core.image.read_quadrant` reads a reference like any quadrant image), the
  grid's WCS (the best-seeing frame's, with ``CRPIX`` shifted by the grid margin) and the
  reference's own keywords: ``REFID``, ``NFRAMES``, ``JDSTART`` / ``JDEND``, ``SEEING``
  (arcsec) and ``FWHM`` (px) of the coadd's PSF, ``LIMMAG``, ``MAGZPFIT`` (the zero point
  fitted to Gaia on the coadd, a check of ``MAGZP``), ``GAIN`` (effective: ``coadd / GAIN``
  is the sources' Poisson variance), ``READNOI``, ``SATURATE`` (the lowest scaled,
  background-subtracted level at which a frame saturates), ``GRIDMARG`` (the grid margin,
  px) and ``PIXRMSF`` (pixel-to-pixel sky scatter over the ``RMS`` map: resampling
  correlates the noise);
- image HDUs ``MASK`` (int16 :data:`pipeline.core.image.MASK_BITS`), ``RMS`` (float32
  background noise at PSF scales), ``COVERAGE`` (int16 frames per pixel) and ``PSF``
  (:meth:`pipeline.measure.psf.PSFModel.to_fits`'s cube and header);
- binary tables ``CATALOG`` (:data:`CATALOG_COLUMNS`) and ``FRAMES`` (one row per input
  frame, used or not, with the reason).

Every part but the primary image is optional: a plain image with a WCS and ``MAGZP`` reads
as a reference without noise map, PSF or catalogue.  Such a reference made elsewhere is
characterised when it is used (:func:`characterized_reference`: PSF, PSF-fit catalogue,
zero point from Gaia or ``MAGZP``, by the build's own coadd characterisation), and
:func:`import_reference` (``skydiff reference import``) writes it in this layout once, with
``IMAGETYP = REFERENCE`` and ``REFSRC = 'imported'``.

A reference of field F, CCD C, quadrant Q and filter B is named :func:`reference_filename`
``ref_f<F>_c<C>_q<Q>_<B>.fits``: the quadrant runner looks for it under that name in
``paths.references``.  :func:`build_references` builds and writes one per group of solved
images (:func:`read_groups`); ``skydiff reference build`` and the simulated surveys of the
demo and the tests use it.
"""
from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np
from astropy.io import fits
from astropy.stats import sigma_clipped_stats
from astropy.table import Table

from pipeline.core.exits import EXIT_OK, EXIT_UNUSABLE
from pipeline.core.image import (FILTER_IDS, MASK_BITS, ImageContractError, QuadrantImage, footprint_corners,
                                 header_wcs, read_quadrant)
from pipeline.formats.atomic import write_fits_atomic
from pipeline.measure.psf import PSFError, PSFModel
from pipeline.formats.scamp_head import is_wcs_keyword
from pipeline.reference.model import CATALOG_COLUMNS, ReferenceError, ReferenceImage

__all__ = ["primary_header", "write_reference", "read_reference", "reference_filename", "write_reference_into",
           "collect_images", "read_groups", "build_references", "reference_epoch", "characterized_reference",
           "import_reference"]

log = logging.getLogger("skydiff.reference")

_IMAGE_SUFFIXES = (".fits", ".fits.fz", ".fit")

def primary_header(ref: ReferenceImage, used: Sequence[QuadrantImage], grid_header: fits.Header,
                   read_noise_adu: float, zp_check: float, clrcoeff: float,
                   grid_margin_px: int = 0) -> fits.Header:
    """The primary header of a built reference (keywords in the module docstring).

    ``used`` are the frames coadded; the WCS cards of ``grid_header`` (the grid's: the
    best-seeing frame's, shifted by the margin) are copied verbatim.
    """
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
        ("GRIDMARG", int(grid_margin_px), "px the grid extends beyond the grid frame"),
        ("BUNIT", "adu", "background-subtracted, scaled to MAGZP"),
    ]
    for key, value, comment in cards:
        header[key] = (value.item() if isinstance(value, np.generic) else value, comment)
    for card in grid_header.cards:
        if is_wcs_keyword(card.keyword):
            header[card.keyword] = (card.value, card.comment)
    return header


def _pixel_noise_factor(ref: ReferenceImage) -> float:
    """Pixel-to-pixel sky scatter over the RMS map (NaN for a coadd without catalogue or sky).

    Each pixel is divided by its own RMS: the grid's margin and edges, covered by fewer
    frames, are noisier than the rest.
    """
    sky = (ref.mask == 0) & np.isfinite(ref.rms) & (ref.rms > 0)
    if ref.catalog is not None and sky.sum() > 1000:
        _, _, std = sigma_clipped_stats((ref.data[sky] / ref.rms[sky])[::7], sigma=3.0, stdfunc="mad_std")
        return float(std)
    return math.nan


def write_reference(path: str | os.PathLike, ref: ReferenceImage) -> os.PathLike:
    """Write a reference as one FITS file, atomically (layout in the module docstring);
    the optional parts are written when present.  Returns the path written."""
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
        Missing or unreadable file, no 2-D primary image or not one finite pixel in it, no WCS,
        no finite MAGZP, or an
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
    # An image without one finite pixel is no reference: caught here, before a subtraction
    # spends its ZOGY run on it and fails on a limit it cannot compute.
    if not np.isfinite(data).any():
        raise ReferenceError(source, "primary image has no finite pixel (all NaN or infinite)")
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


def reference_filename(fieldid: int, ccdid: int, qid: int, filt: str) -> str:
    """``ref_f<field>_c<ccd>_q<qid>_<filter>.fits`` (field 6 digits, CCD 2)."""
    return f"ref_f{fieldid:06d}_c{ccdid:02d}_q{qid}_{filt}.fits"


def write_reference_into(folder: str | os.PathLike, ref: ReferenceImage) -> Path:
    """Write ``ref`` into ``folder`` under its :func:`reference_filename` (the name the
    quadrant runner looks for in ``paths.references``); returns the path written."""
    return Path(write_reference(Path(folder) / reference_filename(ref.fieldid, ref.ccdid, ref.qid, ref.filter),
                                ref))


def collect_images(paths) -> list[Path]:
    """The image files named by ``paths`` (files as given, directories' FITS files sorted).

    Raises
    ------
    ImageContractError
        A path that does not exist.
    """
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            # IPAC's masks (``*_mskimg.fits``) are read with their science images, not as images.
            files.extend(sorted(p for p in path.iterdir()
                                if p.is_file() and p.name.endswith(_IMAGE_SUFFIXES) and "_mskimg.fits" not in p.name))
        elif path.exists():
            files.append(path)
        else:
            raise ImageContractError(path, "file not found")
    return files


def read_groups(files, explicit=()) -> dict[tuple, list[QuadrantImage]]:
    """Read quadrant images and group them by (fieldid, ccdid, qid, filter).

    Files found in directories that hold no image (tables) or are references are skipped;
    any other unreadable file raises :class:`ImageContractError`.
    """
    explicit = {Path(p) for p in explicit}
    groups: dict[tuple, list[QuadrantImage]] = defaultdict(list)
    for path in files:
        try:
            image = read_quadrant(path)
        except ImageContractError as exc:
            if path not in explicit and "no image data" in exc.problem:
                log.info("skipping %s: %s", path, exc.problem)
                continue
            raise
        if str(image.header.get("IMAGETYP", "")).strip().upper() == "REFERENCE":
            log.info("skipping %s: a reference image", path)
            continue
        m = image.meta
        groups[(m.fieldid, m.ccdid, m.qid, m.filter)].append(image)
    return dict(groups)


def build_references(groups: dict, refcat, out, cfg, config=None) -> tuple[int, list[dict]]:
    """Build and write one reference per group; returns (exit status, one summary per group).

    Parameters
    ----------
    groups : dict
        (fieldid, ccdid, qid, filter) -> solved frames (:func:`read_groups`).
    refcat : path-like
        Gaia tile store directory, or a FITS table in the Gaia archive's column names.
    out : path-like
        Folder of the references (written under :func:`reference_filename`).
    cfg : Config
        Its ``instrument.filters`` give each group's band.
    config : ReferenceConfig, optional
        Build settings (default: ``cfg.reference``).

    Returns
    -------
    status : int
        0 every group built, 4 some group could not be built (its ``error`` says why).
    summaries : list of dict
        ``group``, ``path`` (None when not built), ``error`` and ``reference`` (the
        :class:`ReferenceImage`, when built).

    Raises
    ------
    catalogs.CatalogError
        The Gaia catalogue cannot be read or does not cover a group.
    """
    from catalogs import catalog_for_footprint
    from pipeline.reference.build import build_reference   # build.py imports this module

    config = cfg.reference if config is None else config
    status, summaries = EXIT_OK, []
    for key, frames in sorted(groups.items()):
        fieldid, ccdid, qid, filt = key
        summary = {"group": key, "path": None, "error": None}
        with_wcs = [f for f in frames if f.wcs is not None]
        try:
            if not with_wcs:
                raise ReferenceError(f"f{fieldid} c{ccdid} q{qid} {filt}", "no frame has a WCS")
            gaia = catalog_for_footprint(refcat, footprint_corners(with_wcs[0].wcs, with_wcs[0].shape),
                                         config.gaia_margin_deg)
            ref = build_reference(frames, gaia, cfg.instrument.filters[filt], config)
        except ReferenceError as exc:
            log.error("%s", exc)
            summary["error"] = str(exc)
            status = EXIT_UNUSABLE
            summaries.append(summary)
            continue
        t0 = time.perf_counter()
        path = write_reference(Path(out) / reference_filename(fieldid, ccdid, qid, filt), ref)
        ref.timings["write"] = time.perf_counter() - t0
        summary.update(path=str(path), reference=ref)
        summaries.append(summary)
    return status, summaries


def reference_epoch(ref: ReferenceImage):
    """The epoch of a reference's stars: the middle of ``JDSTART``-``JDEND``, else ``OBSMJD``
    (None when the header has neither)."""
    from astropy.time import Time
    if math.isfinite(ref.jdstart) and math.isfinite(ref.jdend):
        return Time(0.5 * (ref.jdstart + ref.jdend), format="jd", scale="utc")
    obsmjd = ref.header.get("OBSMJD")
    if isinstance(obsmjd, (int, float)) and not isinstance(obsmjd, bool) and math.isfinite(obsmjd):
        return Time(float(obsmjd), format="mjd", scale="utc")
    return None


def characterized_reference(ref: ReferenceImage, band, cfg, refcat=None) -> ReferenceImage:
    """``ref`` itself when it has skydiff's PSF and catalogue, else ``ref`` characterised
    (:func:`pipeline.reference.build.characterize_reference`) with its zero point fitted to
    the Gaia rows of ``refcat`` over its footprint (propagated to :func:`reference_epoch`),
    or, without ``refcat``, its ``MAGZP``.

    Raises
    ------
    ReferenceError, catalogs.CatalogError
        The reference cannot be characterised, or the catalogue does not cover it.
    """
    if ref.psf is not None and ref.catalog is not None:
        return ref
    from catalogs import catalog_for_footprint, propagate_to_epoch
    from pipeline.reference.build import characterize_reference
    gaia = None
    if refcat is not None:
        gaia = catalog_for_footprint(refcat, footprint_corners(ref.wcs, ref.shape), cfg.reference.gaia_margin_deg)
        epoch = reference_epoch(ref)
        if epoch is not None:
            gaia = propagate_to_epoch(gaia, epoch)
    log.info("%s: no skydiff PSF and catalogue; characterising it (zero point from %s)", ref.path,
             "Gaia" if gaia is not None else "MAGZP")
    return characterize_reference(ref, band, gaia, cfg.reference)


def import_reference(path: str | os.PathLike, cfg, out=None, refcat=None) -> tuple[Path, ReferenceImage]:
    """Store a reference made elsewhere in skydiff's format, for reuse.

    Parameters
    ----------
    path : path-like
        A coadd with a WCS, the contract's ``FIELDID``, ``CCDID``, ``QID``, ``FILTER``,
        ``GAIN``, ``SATURATE`` and ``MAGZP`` (no skydiff extensions needed).
    cfg : Config
    out : path-like, optional
        The folder (default ``paths.references``); the file is named
        :func:`reference_filename`, as the quadrant runner looks it up.
    refcat : path-like, optional
        Gaia store or table: the zero point is fitted to it (else ``MAGZP`` is kept).

    Returns
    -------
    (path written, the characterised reference)

    Raises
    ------
    ReferenceError
        Unreadable, missing identifiers or a filter not configured, or not characterisable.
    """
    ref = read_reference(path)
    missing = [key for key, value in (("FIELDID", ref.fieldid), ("CCDID", ref.ccdid), ("QID", ref.qid),
                                      ("FILTER", ref.filter)) if value is None]
    if missing:
        raise ReferenceError(path, f"missing keyword(s) {', '.join(missing)}: a stored reference is named by them")
    if ref.filter not in cfg.instrument.filters or ref.filter not in FILTER_IDS:
        raise ReferenceError(path, f"FILTER {ref.filter!r} is not a configured filter")
    ref = characterized_reference(ref, cfg.instrument.filters[ref.filter], cfg, refcat)
    folder = Path(cfg.paths.resolve("references") if out is None else out)
    folder.mkdir(parents=True, exist_ok=True)
    return write_reference_into(folder, ref), ref
