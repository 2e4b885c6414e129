"""The astrometry stage at the file edge: read a quadrant, look up Gaia, solve, write products.

Writes, under ``--out``:

- ``<image name>``: the image with its solved WCS (every old WCS keyword removed) and the
  QA keywords ASTRUSE, ASTRNMAT, ASTRRMSA, ASTRRMSD, ASTRSCMX (written when SCAMP solved);
- ``qa.json``: the QA record (always): ``usable``, ``reasons``, ``rms_ra_mas``,
  ``rms_dec_mas``, ``n_matched``, ``scale_diff_pct_max``, ``airmass_quadrant``, ``seconds``
  and more;
- ``<stem>_matches.fits``: detections matched to Gaia (the input of ``skydiff priors build``);
- with ``--plots``: ``<stem>_residuals.png``.

Exit status: 0 solved and usable, 3 bad input, 4 unusable (reasons in qa.json), 75 SCAMP
timed out or crashed (a retry may help), 1 anything else.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.astrometry.solve import (AstrometricPrior, AstrometryResult, astrometric_matches,
                                       prior_from_image_header, solve_astrometry)
from pipeline.core.config import Config
from pipeline.core.image import QuadrantImage, footprint_corners, read_quadrant, write_quadrant_image
from pipeline.core.refraction import require_pointing_above_horizon
from pipeline.core.exits import EXIT_BAD_INPUT, EXIT_OK, EXIT_RETRY, EXIT_UNUSABLE, BadInputError, exit_status_of
from pipeline.formats.atomic import write_json_atomic
from pipeline.formats.scamp_head import apply_wcs_header

__all__ = ["run_astrometry", "solve_quadrant_file", "solve_quadrant", "AstrometryRun", "load_prior"]

log = logging.getLogger("skydiff.astrometry")


#: Words in SCAMP failure reasons that mean the run itself broke, not the data.
_TRANSIENT_FAILURES = ("timed out", "timeout", "crashed", "signal", "exit status")


def load_prior(prior_path: str | None, image, cfg: Config) -> AstrometricPrior:
    """The prior for an image: the distortion prior's WCS for its exposure, or its header WCS."""
    if prior_path is None:
        return prior_from_image_header(image)
    from priors.ahead import prior_wcs_header
    from priors.store import read_prior
    meta = image.meta
    header = prior_wcs_header(read_prior(prior_path), meta.rcid, meta.telra, meta.teldec, meta.obsmjd,
                              image.shape, pressure_hpa=meta.pressure, temperature_c=meta.temperature,
                              wavelength_um=cfg.instrument.filters[meta.filter].wavelength_um)
    # The prior's WCS is refitted for this exposure, refraction included: its airmass is the image's.
    return AstrometricPrior(header, meta.airmass, f"distortion prior {prior_path}")


@dataclass(frozen=True)
class AstrometryRun:
    """What :func:`solve_quadrant_file` did.

    ``status`` is the exit status, ``record`` the QA record written to ``qa.json`` (None
    when the input was rejected), ``result`` the in-memory result (its extraction can be
    reused by the later stages of the same quadrant), ``solved`` the written image with its
    solved WCS as a reader would see it (None when SCAMP gave no WCS; ``solved.path`` is
    the file), ``error`` the message of a rejected input.
    """

    status: int
    record: dict | None
    result: AstrometryResult | None = None
    solved: QuadrantImage | None = None
    error: str | None = None


def run_astrometry(image_path: str | os.PathLike, refcat: str | os.PathLike, prior_path: str | None,
                   out: str | os.PathLike, cfg: Config, plots: bool = False,
                   keep_workdir: bool = False) -> tuple[int, dict | None]:
    """Solve one quadrant file and write its products under ``out`` (see the module docstring).

    Returns
    -------
    status : int
        The exit status (0 usable, 3 bad input, 4 unusable, 75 retry may help, 1 failure).
    record : dict or None
        The QA record written to ``qa.json`` (None when the input was rejected).

    Raises
    ------
    ImageContractError
        The image breaks the input contract.
    """
    run = solve_quadrant_file(image_path, refcat, prior_path, out, cfg, plots, keep_workdir)
    return run.status, run.record


def solve_quadrant_file(image_path: str | os.PathLike, refcat: str | os.PathLike, prior_path: str | None,
                        out: str | os.PathLike, cfg: Config, plots: bool = False,
                        keep_workdir: bool = False) -> AstrometryRun:
    """:func:`run_astrometry`, also handing over the in-memory result (:class:`AstrometryRun`)."""
    t0 = time.perf_counter()
    image = read_quadrant(image_path)
    name = Path(image_path).name.removesuffix(".fz").removesuffix(".gz")    # written uncompressed
    return solve_quadrant(image, name, refcat, prior_path, out, cfg, plots, keep_workdir,
                          read_s=time.perf_counter() - t0)


def solve_quadrant(image: QuadrantImage, name: str, refcat: str | os.PathLike, prior_path: str | None,
                   out: str | os.PathLike, cfg: Config, plots: bool = False, keep_workdir: bool = False,
                   read_s: float = 0.0) -> AstrometryRun:
    """Solve a quadrant image held in memory and write its products under ``out``.

    Parameters
    ----------
    image : QuadrantImage
        The quadrant as read (``image.path`` is recorded as the image solved).
    name : str
        The file name of the solved image written under ``out`` (``<stem>_matches.fits``
        and the plots take its stem).
    read_s : float
        Seconds the caller spent reading the image (recorded in the timings).

    Returns
    -------
    AstrometryRun
        Its ``solved`` is the written solved image exactly as a reader would see it,
        for the later stages of the same quadrant.
    """
    from catalogs import catalog_for_footprint
    from pipeline.astrometry.scamp import ScampError

    t0 = time.perf_counter() - read_s
    out = Path(out)
    try:
        require_pointing_above_horizon(image.meta, cfg.site, image.path)
        prior = load_prior(prior_path, image, cfg)
        corners = footprint_corners(prior.wcs(image.shape), image.shape)
        gaia = catalog_for_footprint(refcat, corners, cfg.astrometry.catalog_margin_deg)
    except (BadInputError, ValueError) as exc:     # a bad prior or catalogue (named in the message)
        log.error("bad input: %s", exc)
        return AstrometryRun(EXIT_BAD_INPUT, None, error=str(exc))
    lookup_s = time.perf_counter() - t0 - read_s

    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=".work-", dir=out))
    try:
        result = solve_astrometry(image, gaia, prior, workdir, cfg.astrometry, cfg.extraction, cfg.site,
                                  cfg.instrument.filters[image.meta.filter])
    except ScampError as exc:   # not started (1), or no readable output after exit 0 (75)
        log.error("SCAMP could not be run: %s", exc)
        return AstrometryRun(exit_status_of(exc), None)
    finally:
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    stem = name.removesuffix(".fz").removesuffix(".fits")
    t_write = time.perf_counter()
    solved = None
    if result.wcs_header is not None:
        header = apply_wcs_header(image.header, result.wcs_header)
        header["ASTRUSE"] = (result.usable, "astrometry usable")
        if result.qa is not None:
            header["ASTRNMAT"] = (result.qa.n_matched, "stars matched to Gaia")
            header["ASTRRMSA"] = (round(result.qa.rms_ra_mas, 2), "[mas] Gaia-match RMS, RA")
            header["ASTRRMSD"] = (round(result.qa.rms_dec_mas, 2), "[mas] Gaia-match RMS, Dec")
        if result.scale is not None:
            header["ASTRSCMX"] = (round(result.scale.max_abs_pct, 4), "[%] max pixel-scale change vs prior")
        solved = write_quadrant_image(out / name, image.data, header, image.mask)
        matches = astrometric_matches(result, image)
        matches.write(out / f"{stem}_matches.fits", overwrite=True)
        if plots and result.matches is not None:
            from pipeline.astrometry.plots import plot_residual_map
            plot_residual_map(result.matches, out / f"{stem}_residuals.png", shape=image.shape,
                              title=f"{stem}: astrometric residuals")
    record = result.summary()
    record["image"] = str(image.path)
    record["expid"], record["rcid"] = image.meta.expid, image.meta.rcid
    record["timings_s"].update(read=round(read_s, 4), catalog_lookup=round(lookup_s, 4),
                               write=round(time.perf_counter() - t_write, 4))
    record["seconds"] = round(time.perf_counter() - t0, 4)
    write_json_atomic(record, out / "qa.json")

    if result.usable:
        log.info("%s: usable; RMS %.1f/%.1f mas, %d matched, max scale change %.3f %%, %.2f s", name,
                 result.qa.rms_ra_mas, result.qa.rms_dec_mas, result.qa.n_matched,
                 result.scale.max_abs_pct, record["seconds"])
        return AstrometryRun(EXIT_OK, record, result, solved)
    log.warning("%s: unusable: %s", name, "; ".join(result.reasons))
    if any(word in reason for reason in result.reasons for word in _TRANSIENT_FAILURES):
        return AstrometryRun(EXIT_RETRY, record, result, solved)
    return AstrometryRun(EXIT_UNUSABLE, record, result, solved)
