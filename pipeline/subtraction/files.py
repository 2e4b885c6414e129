"""The subtraction stage at the file edge: a solved science image and a reference in, the
products folder (:mod:`pipeline.subtraction.products`) out.

:func:`subtract_quadrant` takes the science image in memory (the quadrant runner hands over
the astrometry stage's solved image and extraction); :func:`run_subtraction` and
:func:`subtract_files` read it from a file first (``skydiff subtract``).

Exit status: 0 done, 3 bad input (the log names the file and problem), 4 the image is not
usable (astrometry flagged it, or the subtraction failed on its content).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.image import ImageContractError, QuadrantImage, read_quadrant
from pipeline.core.exits import EXIT_OK, BadInputError, UnusableImageError, describe, exit_status_of
from pipeline.context.catalogs import add_catalog_context
from pipeline.subtraction.difference import SubtractionResult, subtract_images
from pipeline.subtraction.drb import load_drb_model
from pipeline.subtraction.realbogus import load_model
from pipeline.subtraction.products import write_subtraction
from pipeline.context.solar_system import associate_solar_system
from solarsystem.night import KnownObjectsLookup

__all__ = ["run_subtraction", "subtract_files", "subtract_quadrant", "SubtractionRun"]

log = logging.getLogger("skydiff.subtraction")


@dataclass(frozen=True)
class SubtractionRun:
    """What :func:`subtract_quadrant` did: exit status, QA record (None unless done) and,
    when done, the in-memory result, the science image and the reference (for the later
    stages of the same quadrant: alerts, matchfile epoch)."""

    status: int
    record: dict | None
    result: SubtractionResult | None = None
    science: QuadrantImage | None = None
    reference: object | None = None          # pipeline.reference.files.ReferenceImage


def _subtraction_inputs(science: QuadrantImage, reference_path: str | os.PathLike, cfg: Config,
                        refcat: str | os.PathLike | None):
    """The reference, the Gaia calibrators (or None) and the filter of a science image.

    A reference without skydiff's PSF and catalogue (made elsewhere) is characterised
    (:func:`pipeline.reference.files.characterized_reference`).

    Raises
    ------
    BadInputError
        No WCS, an unreadable reference or catalogue, a filter not configured, a reference
        that cannot be characterised.
    UnusableImageError
        Astrometry marked the image unusable (``ASTRUSE = F``).
    """
    from catalogs import catalog_for_image
    from pipeline.reference.files import characterized_reference, read_reference

    if science.wcs is None:
        raise ImageContractError(science.path, "no WCS (run `skydiff astrometry` first)")
    if "ASTRUSE" in science.header and not bool(science.header["ASTRUSE"]):
        raise UnusableImageError(f"{science.path}: astrometry marked the image unusable (ASTRUSE = F); "
                                 "not subtracted")
    reference = read_reference(reference_path)
    gaia = None if refcat is None else catalog_for_image(refcat, science, cfg.astrometry.catalog_margin_deg)
    try:
        band = cfg.instrument.filters[science.meta.filter]
    except KeyError:
        raise ImageContractError(science.path, f"filter {science.meta.filter} is not configured") from None
    # a reference made elsewhere (no skydiff PSF and catalogue) is characterised here
    reference = characterized_reference(reference, band, cfg, refcat)
    return reference, gaia, band


def _context_catalogue(science: QuadrantImage, ps1cat, gaia, cfg: Config):
    """The PS1-like rows over the science footprint for the catalogue context, read before
    the subtraction so that a missing store fails at once.

    Raises
    ------
    BadInputError
        No Gaia catalogue (refcat), a Gaia margin narrower than the Gaia search radius, or
        the PS1 store missing, of another kind, or not covering the footprint (the message
        names the store).
    """
    from catalogs import PS1, catalog_for_image

    if gaia is None:
        raise BadInputError(f"{science.path}: the catalogue context (PS1 store {ps1cat}) also needs the "
                            "Gaia store (refcat)")
    if cfg.context.gaia_radius_arcsec > 3600.0 * cfg.astrometry.catalog_margin_deg:
        raise BadInputError(f"context.gaia_radius_arcsec ({cfg.context.gaia_radius_arcsec}) exceeds the Gaia "
                            f"lookup margin astrometry.catalog_margin_deg ({cfg.astrometry.catalog_margin_deg})")
    # The PS1 catalogue has no proper motions: its rows are used at their own epoch.
    return catalog_for_image(ps1cat, science, cfg.context.ps1_radius_arcsec / 3600.0, kind=PS1)


def run_subtraction(science_path: str | os.PathLike, reference_path: str | os.PathLike,
                    out: str | os.PathLike, cfg: Config,
                    refcat: str | os.PathLike | None = None,
                    ps1cat: str | os.PathLike | None = None) -> tuple[int, dict | None]:
    """Subtract ``reference_path`` from ``science_path`` and write the products under ``out``
    (with the catalogue context when ``ps1cat`` names the PS1-like store).

    Returns
    -------
    status : int
        0 done, 3 bad input (the log names the file and problem), 4 the science image is
        not usable (astrometry flagged it, or the subtraction failed on its content).
    record : dict or None
        The QA record written to ``qa.json``.
    """
    run = subtract_files(science_path, reference_path, out, cfg, refcat, ps1cat)
    return run.status, run.record


def subtract_files(science_path: str | os.PathLike, reference_path: str | os.PathLike,
                   out: str | os.PathLike, cfg: Config,
                   refcat: str | os.PathLike | None = None,
                   ps1cat: str | os.PathLike | None = None,
                   solar_system: str | os.PathLike | None = None) -> SubtractionRun:
    """:func:`run_subtraction`, also handing over what it computed (:class:`SubtractionRun`)."""
    return subtract_quadrant(read_quadrant(science_path), reference_path, out, cfg, refcat, ps1cat=ps1cat,
                             solar_system=solar_system)


def subtract_quadrant(science: QuadrantImage, reference_path: str | os.PathLike, out: str | os.PathLike,
                      cfg: Config, refcat: str | os.PathLike | None = None, extraction=None,
                      ps1cat: str | os.PathLike | None = None,
                      solar_system: str | os.PathLike | None = None) -> SubtractionRun:
    """Subtract the reference from a solved science image held in memory; write the products.

    Parameters
    ----------
    science : QuadrantImage
        The solved science image (``science.path`` is recorded in ``qa.json`` as the
        image the products belong to).
    reference_path : path-like
        The reference image file.
    out : path-like
        The products folder.
    cfg : Config
        Its ``[subtraction]`` (with the shared ``[characterize]`` and ``[registration]``)
        and ``[realbogus]`` sections are the stage's.
    refcat : path-like, optional
        The Gaia store or table for the photometric calibration (and the catalogue
        context's Gaia neighbours).
    ps1cat : path-like, optional
        The PS1-like store (or table) of the catalogue context
        (:func:`pipeline.context.catalogs.catalog_context`); with it, ``refcat`` is
        required and the candidates get the context columns.  Without it they get none.
    extraction : ExtractionResult, optional
        The astrometry stage's extraction of these very pixels
        (:attr:`pipeline.astrometry.solve.AstrometryResult.extraction`), reused instead of
        extracting again.
    solar_system : path-like, optional
        The solar-system folder (``paths.solar_system``: orbit store and night files); given,
        the candidates get ``ssdistnr``, ``ssmagnr`` and ``ssnamenr`` (a missing store is bad
        input, exit 3); None leaves those columns out.
    """
    t0 = time.perf_counter()
    science_path = science.path
    try:
        reference, gaia, band = _subtraction_inputs(science, reference_path, cfg, refcat)
        t_ps1 = time.perf_counter()
        ps1 = None if ps1cat is None else _context_catalogue(science, ps1cat, gaia, cfg)
        ps1_read_s = time.perf_counter() - t_ps1
        read_s = time.perf_counter() - t0
        meta = science.meta
        result = subtract_images(science.data, science.mask, science.header, science.wcs, reference, band,
                                 gain=meta.gain, saturate=meta.saturate,
                                 pixel_scale_arcsec=cfg.instrument.pixel_scale_arcsec, gaia=gaia,
                                 extraction=extraction, read_noise=meta.readnoi,
                                 rb_model=load_model(cfg.realbogus), config=cfg.subtraction,
                                 drb_model=load_drb_model(cfg.realbogus))
        if ps1 is not None:
            t_context = time.perf_counter()
            add_catalog_context(result.candidates, ps1, gaia, cfg.context)
            result.timings["context"] = ps1_read_s + time.perf_counter() - t_context
        if solar_system is not None:
            t_known = time.perf_counter()
            known = KnownObjectsLookup(solar_system, cfg.site, cfg.solar_system)(
                science.wcs, science.data.shape, meta.obsmjd + 0.5 * meta.exptime / 86400.0)
            associate_solar_system(result.candidates, known, cfg.solar_system)
            result.timings["solar_system"] = time.perf_counter() - t_known
    except (BadInputError, UnusableImageError) as exc:
        # SubtractionError is an UnusableImageError: the image's content defeated the method.
        log.error("%s", describe(exc))
        return SubtractionRun(exit_status_of(exc), None)
    t_write = time.perf_counter()
    # Absolute paths: the QA record is read later from any working directory
    # (``skydiff alerts publish OUTDIR`` finds the science image and reference through it).
    extra = {"science": str(Path(science_path).resolve()), "reference": str(Path(reference_path).resolve()),
             "expid": meta.expid, "rcid": meta.rcid, "refid": reference.refid}
    record = write_subtraction(result, science.header, out, refid=reference.refid, extra_qa=extra)
    log.info("%s: %d candidates (%d with rb >= 0.5), diffmaglim %.2f, %.2f s (read %.2f, write %.2f)",
             Path(science_path).name, record["n_candidates"], record["n_rb_above_half"], record["diffmaglim"],
             time.perf_counter() - t0, read_s, time.perf_counter() - t_write)
    return SubtractionRun(EXIT_OK, record, result, science, reference)
