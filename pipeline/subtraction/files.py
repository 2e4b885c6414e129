"""The subtraction stage at the file edge: read a solved science image and a reference,
subtract, write the products.

Products in OUTDIR (each written atomically; ``qa.json`` last, so its presence means the
rest is complete):

``diff.fits``
    ZOGY's proper difference D (unit background variance) on the science grid with the
    science WCS; ``FD`` (flux scaling of D: a point source of flux f in the reference's
    ADU has total f * FD in D), ``MAGZPREF`` (the common zero point), ``REFID``; extension
    ``PSFD`` (D's PSF at the image centre) and ``FLAGGED`` (pixels near bad ones).
``scorr.fits``
    The corrected score image (S/N of a point source at every pixel), same WCS.
``candidates.ecsv``
    One row per candidate (:func:`pipeline.subtraction.candidates.find_candidates` columns, ``rb``,
    ``rbversion``).
``cutouts.fits``
    ``SCIENCE``, ``REFERENCE``, ``DIFFERENCE``: (N, 63, 63) cubes, row i = candidate i.
``qa.json``
    Zero points, limits, counts, timings (:meth:`SubtractionResult.qa`).
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from pipeline.core.config import Config
from pipeline.core.image import QuadrantImage, read_quadrant
from pipeline.formats.atomic import write_fits_atomic, write_json_atomic, write_table_atomic
from pipeline.core.exits import EXIT_BAD_INPUT, EXIT_OK, EXIT_UNUSABLE
from pipeline.subtraction.difference import SubtractionConfig, SubtractionError, SubtractionResult, subtract_images
from pipeline.core.exits import BadInputError

__all__ = ["run_subtraction", "subtract_files", "SubtractionRun", "write_subtraction", "load_gaia_for_image",
           "read_qa_record", "SubtractionOutputError"]

log = logging.getLogger(__name__)


class SubtractionOutputError(BadInputError):
    """A subtraction output folder without a readable ``qa.json``; names the file."""


def read_qa_record(outdir: str | os.PathLike) -> dict:
    """The ``qa.json`` of a subtraction output folder (written last: its presence means the
    folder is complete)."""
    qa = Path(outdir) / "qa.json"
    if not qa.is_file():
        raise SubtractionOutputError(f"{outdir}: no qa.json (not a complete `skydiff subtract` output folder)")
    try:
        return json.loads(qa.read_text())
    except (OSError, ValueError) as exc:
        raise SubtractionOutputError(f"{qa}: unreadable QA record ({exc})") from None


def load_gaia_for_image(refcat: str | os.PathLike, image, margin_deg: float):
    """Gaia stars over an image's footprint, propagated to its mid-exposure epoch."""
    from catalogs import catalog_for_footprint, propagate_to_epoch
    from pipeline.astrometry.solve import footprint_corners

    gaia = catalog_for_footprint(refcat, footprint_corners(image.wcs, image.shape), margin_deg)
    return propagate_to_epoch(gaia, image.meta.obstime)


def _image_hdu(data: np.ndarray, header: fits.Header, cards: list[tuple]) -> fits.PrimaryHDU:
    hdu = fits.PrimaryHDU(np.asarray(data, dtype=np.float32), header=header.copy())
    for key, value, comment in cards:
        hdu.header[key] = (value, comment)
    return hdu


def write_subtraction(result: SubtractionResult, header: fits.Header, out: str | os.PathLike,
                      refid: int | None = None, extra_qa: dict | None = None) -> dict:
    """Write every product of :func:`pipeline.subtraction.difference.subtract_images` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    zogy = result.zogy
    centre = zogy.tile_at((zogy.diff.shape[1] - 1) / 2, (zogy.diff.shape[0] - 1) / 2)
    cards = [("MAGZPREF", result.zp_ref, "common zero point (reference), mag for 1 ADU"),
             ("MAGZPSCI", result.zp_science, "science zero point"),
             ("FD", float(centre.f_d), "flux scaling of D at the image centre"),
             ("DIFMGLIM", result.diffmaglim, "5-sigma limiting mag of the difference")]
    if refid is not None:
        cards.append(("REFID", int(refid), "reference image id"))
    diff = fits.HDUList([_image_hdu(zogy.diff, header, cards + [("BUNIT", "sigma", "D, unit noise")]),
                         fits.ImageHDU(np.asarray(zogy.psf_d, dtype=np.float32), name="PSFD"),
                         fits.ImageHDU(zogy.flagged.astype(np.uint8), name="FLAGGED")])
    write_fits_atomic(diff, out / "diff.fits")
    write_fits_atomic(fits.HDUList([_image_hdu(zogy.scorr, header, cards + [("BUNIT", "sigma", "Scorr")])]),
                      out / "scorr.fits")
    write_table_atomic(result.candidates.copy(), out / "candidates.ecsv")
    cubes = [fits.PrimaryHDU()] + [fits.ImageHDU(np.asarray(result.cutouts[k], dtype=np.float32), name=k.upper())
                                   for k in ("science", "reference", "difference")]
    write_fits_atomic(fits.HDUList(cubes), out / "cutouts.fits")
    record = {**result.qa(), **(extra_qa or {})}
    write_json_atomic(record, out / "qa.json")
    return record


@dataclass(frozen=True)
class SubtractionRun:
    """What :func:`subtract_files` did: exit status, QA record (None unless done) and, when
    done, the in-memory result, the science image read and the reference (for the later
    stages of the same quadrant: alerts, matchfile epoch)."""

    status: int
    record: dict | None
    result: SubtractionResult | None = None
    science: QuadrantImage | None = None
    reference: object | None = None          # pipeline.reference.files.ReferenceImage


def run_subtraction(science_path: str | os.PathLike, reference_path: str | os.PathLike,
                    out: str | os.PathLike, cfg: Config, refcat: str | os.PathLike | None = None,
                    config: SubtractionConfig = SubtractionConfig()) -> tuple[int, dict | None]:
    """Subtract ``reference_path`` from ``science_path`` and write the products under ``out``.

    Returns
    -------
    status : int
        0 done, 3 bad input (the log names the file and problem), 4 the science image is
        not usable (astrometry flagged it, or the subtraction failed on its content).
    record : dict or None
        The QA record written to ``qa.json``.
    """
    run = subtract_files(science_path, reference_path, out, cfg, refcat, config)
    return run.status, run.record


def subtract_files(science_path: str | os.PathLike, reference_path: str | os.PathLike,
                   out: str | os.PathLike, cfg: Config, refcat: str | os.PathLike | None = None,
                   config: SubtractionConfig = SubtractionConfig(), extraction=None) -> SubtractionRun:
    """:func:`run_subtraction`, also handing over what it computed (:class:`SubtractionRun`).

    ``extraction``: the astrometry stage's extraction of these very pixels
    (:attr:`pipeline.astrometry.solve.AstrometryResult.extraction`), reused instead of extracting again.
    """
    from catalogs import CatalogError
    from pipeline.reference.build import ReferenceError, read_reference

    t0 = time.perf_counter()
    science = read_quadrant(science_path)
    if science.wcs is None:
        log.error("bad input: %s has no WCS (run `skydiff astrometry` first)", science_path)
        return SubtractionRun(EXIT_BAD_INPUT, None)
    if "ASTRUSE" in science.header and not bool(science.header["ASTRUSE"]):
        log.error("%s: astrometry marked the image unusable (ASTRUSE = F); not subtracted", science_path)
        return SubtractionRun(EXIT_UNUSABLE, None)
    try:
        reference = read_reference(reference_path)
    except ReferenceError as exc:
        log.error("bad input: %s", exc)
        return SubtractionRun(EXIT_BAD_INPUT, None)
    gaia = None
    if refcat is not None:
        try:
            gaia = load_gaia_for_image(refcat, science, cfg.astrometry.catalog_margin_deg)
        except (CatalogError, ValueError) as exc:
            log.error("bad input: %s", exc)
            return SubtractionRun(EXIT_BAD_INPUT, None)
    read_s = time.perf_counter() - t0
    inst = cfg.instrument
    meta = science.meta
    try:
        band = inst.filters[meta.filter]
    except KeyError:
        log.error("bad input: %s: filter %s is not configured", science_path, meta.filter)
        return SubtractionRun(EXIT_BAD_INPUT, None)
    try:
        result = subtract_images(science.data, science.mask, science.header, science.wcs, reference, band,
                                 gain=meta.gain, saturate=meta.saturate,
                                 pixel_scale_arcsec=inst.pixel_scale_arcsec, gaia=gaia, extraction=extraction,
                                 read_noise=meta.readnoi, config=config)
    except SubtractionError as exc:
        log.error("%s: subtraction failed: %s", science_path, exc)
        return SubtractionRun(EXIT_UNUSABLE, None)
    t_write = time.perf_counter()
    extra = {"science": str(science_path), "reference": str(reference_path),
             "expid": meta.expid, "rcid": meta.rcid, "refid": reference.refid}
    record = write_subtraction(result, science.header, out, refid=reference.refid, extra_qa=extra)
    log.info("%s: %d candidates (%d with rb >= 0.5), diffmaglim %.2f, %.2f s (read %.2f, write %.2f)",
             Path(science_path).name, record["n_candidates"], record["n_rb_above_half"], record["diffmaglim"],
             time.perf_counter() - t0, read_s, time.perf_counter() - t_write)
    return SubtractionRun(EXIT_OK, record, result, science, reference)
