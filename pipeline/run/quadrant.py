"""One quadrant of one exposure through every stage: the unit a Slurm task or a worker runs.

:func:`run_quadrant` takes an exposure (a multi-extension FITS with one HDU per quadrant,
``EXTNAME`` ``Q00``..``Q63`` by rcid, or a directory of quadrant files) and an rcid, and
runs astrometry, subtraction against the quadrant's reference (its difference image archived
for forced photometry, :mod:`pipeline.forcedphot.archive`), alerts and the matchfile
epoch, each stage writing the same products its own command writes.  Products go under
``<paths.outputs>/<expid>/<rcid:02d>/``.  The quadrant's pixels are read once, and what a
stage computed is handed to the next in memory, never read back from the files it wrote:
the subtraction gets the solved image (as its file reads back, bit for bit) and the
astrometry stage's extraction, the alerts and the matchfile epoch get the subtraction's
result (the matchfile command run on the subtraction folder measures it again).

Status record
-------------
``status.json`` in that folder, rewritten atomically at every stage: ``expid``, ``rcid``,
``state`` (``started``, ``finished``, ``failed``, ``unusable``), ``stage`` reached,
``reason``, ``exit_code``, ``attempt``, ``started_utc``, ``finished_utc``, ``timings_s``
and the stage summaries (astrometry verdict, candidates, alerts, matchfile rows).

Idempotence: a quadrant whose record says ``finished`` is not run again unless forced; a
forced rerun republishes nothing already acknowledged (the spool keeps every candid it
delivered, and candids are deterministic) and replaces its matchfile epoch rather than
adding one.

Exit codes (:mod:`pipeline.core.exits`): 0 finished, 3 bad input (the exposure or the
quadrant breaks the contract), 4 unusable (astrometry or subtraction judged the image
unusable, or no reference exists: the reason is in the record), 75 retry may help (SCAMP
timed out or crashed, the broker could not take the alerts), 1 a failure inside.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

from astropy.io import fits

from pipeline.core.config import Config
from pipeline.core.image import ImageContractError, read_quadrant
from pipeline.core.exits import EXIT_OK, EXIT_RETRY, EXIT_UNUSABLE
from pipeline.core.exits import BadInputError
from pipeline.formats.atomic import write_json_atomic

__all__ = ["quadrant_dir", "read_status", "locate_quadrant", "quadrant_expid", "run_quadrant", "failure_record",
           "QuadrantInputError"]

log = logging.getLogger("skydiff.quadrant")

_STATES = {EXIT_OK: "finished", EXIT_UNUSABLE: "unusable"}


class QuadrantInputError(BadInputError):
    """The exposure holds no such quadrant, or cannot be read; names the file."""


def _utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def quadrant_dir(cfg: Config, expid: int, rcid: int) -> Path:
    """Where one quadrant's products and status record go."""
    return cfg.paths.resolve("outputs") / str(expid) / f"{rcid:02d}"


def read_status(folder: Path) -> dict | None:
    """The status record in ``folder`` (None when absent or unreadable)."""
    try:
        return json.loads((folder / "status.json").read_text())
    except (OSError, ValueError):
        return None


def _write_status(folder: Path, record: dict) -> None:
    write_json_atomic(record, folder / "status.json")


def locate_quadrant(exposure: str | os.PathLike, rcid: int) -> tuple[Path, int | str | None]:
    """(file, HDU) of quadrant ``rcid`` in an exposure (MEF file or directory)."""
    exposure = Path(exposure)
    if exposure.is_dir():
        from pipeline.core.ipac import sciimg_files, sciimg_rcid
        # IPAC's layout: the rcid is in the science image's name; its mskimg is no quadrant.
        for path in sciimg_files(exposure):
            if sciimg_rcid(path) == rcid:
                return path, None
        unreadable = []
        for path in sorted(exposure.glob("*.fits")):
            if path.name.endswith(("_sciimg.fits", "_mskimg.fits")):
                continue
            try:
                header = fits.getheader(path, 0)
                if "RCID" not in header:
                    header = fits.getheader(path, 1)
            except (OSError, IndexError):
                unreadable.append(path.name)
                continue
            if int(header.get("RCID", -1)) == rcid:
                return path, None
        skipped = f" (unreadable, skipped: {', '.join(unreadable)})" if unreadable else ""
        raise QuadrantInputError(f"{exposure}: no quadrant file with RCID = {rcid}{skipped}")
    if not exposure.is_file():
        raise QuadrantInputError(f"{exposure}: no such exposure file or directory")
    name = f"Q{rcid:02d}"
    try:
        with fits.open(exposure, memmap=True) as hdul:
            if name not in hdul:
                raise QuadrantInputError(f"{exposure}: no extension {name} (quadrant rcid {rcid})")
    except OSError as exc:
        raise QuadrantInputError(f"{exposure}: not a readable FITS file ({exc})") from None
    return exposure, name


def quadrant_expid(path: Path, hdu: int | str | None) -> int:
    """EXPID of a located quadrant (QuadrantInputError when unreadable or absent)."""
    try:
        with fits.open(path, memmap=True) as hdul:
            header = hdul[hdu if hdu is not None else 0].header
            if "EXPID" not in header and hdu is None and len(hdul) > 1:
                header = hdul[1].header
            return int(header["EXPID"])
    except (OSError, KeyError, ValueError, IndexError) as exc:
        raise QuadrantInputError(f"{path}: no readable EXPID ({exc})") from None


def _prior_path(cfg: Config) -> str | None:
    from priors.store import PRIOR_FILENAME
    candidate = cfg.paths.resolve("priors") / PRIOR_FILENAME
    return str(candidate) if candidate.exists() else None


def _with_full_catalog(subtraction, astrometry, cfg: Config):
    """The subtraction run with every detection of the science image (and its PSF
    photometry) in place of the calibration sources its characterisation measured."""
    from pipeline.measure.characterize import with_full_catalog

    science, result = subtraction.science, subtraction.result
    characterization = with_full_catalog(result.science, science.data, science.mask, science.wcs,
                                         science.meta.gain, science.meta.saturate,
                                         astrometry.full_extraction(), cfg.subtraction.characterize)
    return replace(subtraction, result=replace(result, science=characterization))


def _matchfile_epoch(cfg: Config, subtraction) -> dict:
    """The science image's PSF photometry, as the subtraction measured and calibrated it, into its matchfile."""
    from pipeline.matchfile.epochs import append_science_epoch, seed_matchfile_from_reference

    root = cfg.paths.resolve("matchfiles")
    seed_matchfile_from_reference(root, subtraction.reference, cfg)
    result = append_science_epoch(root, subtraction.science.header, subtraction.result, cfg,
                                  reference=subtraction.reference)
    # The epoch is committed as a shard; folding it into the main file is the fold step's job
    # (skydiff matchfile fold: the Slurm fold job, or the local executor after its pool),
    # never a task's, so tasks on several nodes need no lock (pipeline.matchfile.store).
    return {"matched": result.nmatched, "unmatched": result.nunmatched}


def run_quadrant(exposure: str | os.PathLike, rcid: int, cfg: Config, force: bool = False,
                 publish: bool = True) -> tuple[int, dict]:
    """Process quadrant ``rcid`` of ``exposure``; returns (exit code, status record).

    The pixels are read once; each stage hands the next what it computed (the solved image
    as written, the extraction, the subtraction's result) and writes its products, which
    this process never reads back.
    """
    from alerts.from_subtraction import publish_subtraction
    from alerts.history import open_history_store
    from alerts.publish import AlertPublisher
    from alerts.spool import Spool
    from pipeline.astrometry.files import solve_quadrant
    from pipeline.core.earth_orientation import install_earth_orientation_table
    from pipeline.reference.files import reference_filename
    from pipeline.subtraction.files import subtract_quadrant

    clock = time.perf_counter
    t_start = clock()
    timings: dict[str, float] = {}
    path, hdu = locate_quadrant(exposure, rcid)
    # The status is checked from the header alone, before the pixels: a finished quadrant is
    # not redone (nor its record overwritten) because another copy of it is unreadable.
    expid = quadrant_expid(path, hdu)
    folder = quadrant_dir(cfg, expid, rcid)
    previous = read_status(folder)
    if previous and previous.get("state") == "finished" and not force:
        log.info("expid %d rcid %d: already finished (%s); nothing to do", expid, rcid,
                 previous.get("finished_utc"))
        return EXIT_OK, previous
    image = read_quadrant(path, hdu=hdu)
    meta = image.meta
    if meta.rcid != rcid:
        raise ImageContractError(path, f"header RCID {meta.rcid} where quadrant {rcid} was asked for")
    record = {"expid": meta.expid, "rcid": rcid, "exposure": str(exposure), "state": "started",
              "stage": "read", "reason": "", "exit_code": None,
              "attempt": int((previous or {}).get("attempt", 0)) + 1, "started_utc": _utc(),
              "finished_utc": None, "timings_s": timings}
    timings["read"] = round(clock() - t_start, 3)
    _write_status(folder, record)

    def finish(code: int, stage: str, reason: str = "") -> tuple[int, dict]:
        timings["total"] = round(clock() - t_start, 3)
        record.update(state=_STATES.get(code, "failed"), stage=stage, reason=reason, exit_code=code,
                      finished_utc=_utc())
        _write_status(folder, record)
        level = logging.INFO if code == EXIT_OK else logging.WARNING
        log.log(level, "expid %d rcid %d: %s at %s%s (%.1f s)", meta.expid, rcid, record["state"], stage,
                f": {reason}" if reason else "", timings["total"])
        return code, record

    # The publisher (and its Kafka producer) starts now: the producer connects and obtains
    # its idempotent-producer id in its own threads while the image is processed, instead
    # of holding up the alerts by that handshake (0.5-1 s on a fresh connection).
    publisher = AlertPublisher(cfg.kafka, Spool(cfg.paths.resolve("spool"))) if publish else None
    try:
        record["stage"] = "astrometry"
        _write_status(folder, record)
        t0 = clock()
        # The horizon check's AltAz is the process's first use of the Earth-orientation table.
        install_earth_orientation_table()
        # A quadrant of a multi-extension exposure is named as a single-quadrant file would be.
        # The solved image is written uncompressed, so a compressed input's name loses .fz/.gz.
        name = path.name.removesuffix(".fz").removesuffix(".gz") if hdu is None \
            else f"ztf_{meta.expid}_c{meta.ccdid:02d}_q{meta.qid}.fits"
        astrometry = solve_quadrant(image, name, cfg.paths.resolve("catalogs"), _prior_path(cfg),
                                    folder / "astrometry", cfg)
        timings["astrometry"] = round(clock() - t0, 3)
        qa = astrometry.record
        record["astrometry"] = None if qa is None else {
            k: qa.get(k) for k in ("usable", "reasons", "rms_ra_mas", "rms_dec_mas", "n_matched")}
        if astrometry.status != EXIT_OK:
            reasons = ("; ".join((qa or {}).get("reasons", [])) or astrometry.error
                       or f"exit status {astrometry.status}")
            return finish(astrometry.status, "astrometry", reasons)

        record["stage"] = "subtraction"
        _write_status(folder, record)
        reference = cfg.paths.resolve("references") / reference_filename(meta.fieldid, meta.ccdid, meta.qid,
                                                                          meta.filter)
        if not reference.exists():
            return finish(EXIT_UNUSABLE, "subtraction", f"no reference {reference.name} in {reference.parent}")
        t0 = clock()
        subtraction_out = folder / "subtraction"
        # Same pixels, same extraction settings: the astrometry stage's extraction is reused.
        subtraction = subtract_quadrant(astrometry.solved, reference, subtraction_out, cfg,
                                        refcat=cfg.paths.resolve("catalogs"), extraction=astrometry.result.extraction,
                                        ps1cat=cfg.paths.resolve("ps1_catalogs"),
                                        solar_system=cfg.paths.resolve("solar_system"))
        timings["subtraction"] = round(clock() - t0, 3)
        if subtraction.status != EXIT_OK:
            return finish(subtraction.status, "subtraction", f"exit status {subtraction.status} (see the log)")
        record["subtraction"] = {k: subtraction.record.get(k) for k in ("n_candidates", "n_rb_above_half",
                                                                        "diffmaglim", "zp_science", "zp_source")}
        if cfg.forcedphot.archive:
            # Archived before the alerts, which measure the earlier archived epochs (fp_hists).
            from pipeline.forcedphot.archive import archive_subtraction

            t0 = clock()
            archived = archive_subtraction(cfg.paths.resolve("fparchive"), subtraction.science.header,
                                           subtraction.science.wcs, subtraction.result, subtraction.reference,
                                           cfg.forcedphot)
            timings["archive"] = round(clock() - t0, 3)
            record["archive"] = {k: archived[k] for k in ("replaced", "pruned")}

        if publish:
            record["stage"] = "alerts"
            _write_status(folder, record)
            t0 = clock()
            result = subtraction.result
            with open_history_store(cfg.history, cfg.paths.resolve("history"), cfg.kafka.survey) as store:
                images = publish_subtraction(subtraction_out, subtraction.record, result.candidates, result.cutouts,
                                             subtraction.science.header, subtraction.reference, cfg, store, publisher)
                if cfg.kafka.bootstrap_servers:
                    publisher.flush()
            report = publisher.report
            # Counted after the flush: every failed delivery, not only what was still queued then.
            unacknowledged = report.not_acknowledged if cfg.kafka.bootstrap_servers else 0
            shortfall = report.shortfall()
            publisher.close()
            timings["alerts"] = round(clock() - t0, 3)
            timings["to_alerts"] = round(clock() - t_start, 3)    # the alerts' latency within the task
            record["alerts"] = {"built": images.alerts, "spooled": images.spooled,
                                "already_delivered": images.already_delivered, "topic": images.topic,
                                "delivered": report.delivered, "failed": report.failed,
                                "unacknowledged": unacknowledged}
            if unacknowledged:
                return finish(EXIT_RETRY, "alerts", f"{unacknowledged} alert(s) not acknowledged by the broker "
                                                     f"({shortfall}); they wait in the spool (skydiff alerts replay)")

        if not astrometry.result.measured_all:
            # The alerts were made from the calibration sources alone; the science
            # catalogue of the matchfile holds every detection, detected and measured now.
            record["stage"] = "catalog"
            _write_status(folder, record)
            t0 = clock()
            subtraction = _with_full_catalog(subtraction, astrometry.result, cfg)
            timings["catalog"] = round(clock() - t0, 3)
            full = subtraction.result.science.extraction
            record["catalog"] = {"n_detected": full.n_detected, "n_sources": len(full.catalog)}

        record["stage"] = "matchfile"
        _write_status(folder, record)
        t0 = clock()
        record["matchfile"] = _matchfile_epoch(cfg, subtraction)
        timings["matchfile"] = round(clock() - t0, 3)
        return finish(EXIT_OK, "done")
    finally:
        if publisher is not None:
            publisher.close()


def failure_record(exposure, rcid: int, cfg: Config, code: int, reason: str) -> None:
    """Record a quadrant whose run ended in an exception (best effort: nothing is recorded
    when even its expid cannot be read)."""
    try:
        expid = quadrant_expid(*locate_quadrant(exposure, rcid))
    except QuadrantInputError:
        return
    folder = quadrant_dir(cfg, expid, rcid)
    previous = read_status(folder) or {}
    # A run that got as far as writing its record ("started") failed in that record's stage;
    # otherwise it failed reading its input.  A finished record being replaced (a forced
    # rerun whose input is bad) is kept under "previous", so nothing written is lost.
    running = previous.get("state") == "started"
    record = {"expid": expid, "rcid": rcid, "exposure": str(exposure), "state": _STATES.get(code, "failed"),
              "stage": previous.get("stage", "read") if running else "read", "reason": reason,
              "exit_code": code, "attempt": int(previous.get("attempt", 0)) + (0 if running else 1),
              "started_utc": previous.get("started_utc") if running else _utc(), "finished_utc": _utc(),
              "timings_s": previous.get("timings_s", {}) if running else {}}
    if previous.get("state") == "finished":
        record["previous"] = previous
    _write_status(folder, record)

