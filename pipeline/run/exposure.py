"""Running every quadrant of an exposure on this machine, and the exposure summary.

:func:`run_exposure` is the local executor: a process pool sized to the machine (one
quadrant per core, as on the cluster) runs :func:`pipeline.run.quadrant.run_quadrant` for each
rcid, printing progress as quadrants finish, then folds the matchfiles' pending epoch
shards (the quadrants only commit shards; folding is one process's job, see
:mod:`pipeline.matchfile.store`).  :func:`exposure_summary` reads every
quadrant's status record (whoever ran it: this executor or a Slurm array) and lists the
quadrants to reprocess: failed, never finished, or retryable.

:func:`announce_exposure` and :func:`withdraw_exposure` keep images that run at the same time
on several nodes in time order in the object history (:mod:`alerts.history`): ``skydiff
submit`` announces an exposure's quadrants before queueing them, its summary job withdraws
whatever announcement a task left (an unusable quadrant, a task out of retries).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

from pipeline.core.config import Config
from pipeline.core.runtime import progress_logging, worker_logging
from pipeline.formats.exposure import ExposureInputError, ExposureQuadrant, exposure_quadrants, exposure_rcids
from pipeline.core.image import ImageContractError
from pipeline.run.quadrant import (QuadrantInputError, failure_record, locate_quadrant, quadrant_dir, quadrant_expid,
                       read_status, run_quadrant)
from pipeline.core.exits import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_RETRY, PipelineError, describe, exit_status_of
from pipeline.formats.atomic import write_json_atomic

__all__ = ["run_exposure", "fold_matchfiles", "exposure_summary", "format_exposure_summary", "exposure_expid",
           "announce_exposure", "withdraw_exposure", "pending_images"]

log = logging.getLogger("skydiff.exposure")

_worker_cfg: Config | None = None


def _init_worker(cfg: Config, log_queue=None) -> None:
    global _worker_cfg
    _worker_cfg = cfg
    if log_queue is not None:
        worker_logging(log_queue)


def quadrant_task(exposure: str, rcid: int, cfg: Config, force: bool = False) -> tuple[int, int, str]:
    """Run one quadrant, turning every exception into an exit code and a status record."""
    try:
        code, record = run_quadrant(exposure, rcid, cfg, force=force)
        return rcid, code, record.get("reason", "")
    except (ImageContractError, QuadrantInputError) as exc:
        failure_record(exposure, rcid, cfg, EXIT_BAD_INPUT, f"bad input: {exc}")
        return rcid, EXIT_BAD_INPUT, f"bad input: {exc}"
    except PipelineError as exc:   # unusable image (4), retryable environment fault (75), ...
        code, reason = exit_status_of(exc), describe(exc)
        failure_record(exposure, rcid, cfg, code, reason)
        return rcid, code, reason
    except Exception as exc:  # a worker must report, never take the pool down
        log.exception("rcid %d: unexpected failure", rcid)
        failure_record(exposure, rcid, cfg, EXIT_FAILED, f"{type(exc).__name__}: {exc}")
        return rcid, EXIT_FAILED, f"{type(exc).__name__}: {exc}"


def _task(args: tuple[str, int, bool]) -> tuple[int, int, str]:
    exposure, rcid, force = args
    return quadrant_task(exposure, rcid, _worker_cfg, force)


def exposure_expid(exposure: str | os.PathLike) -> int:
    rcids = exposure_rcids(exposure)
    if not rcids:
        raise QuadrantInputError(f"{exposure}: no quadrant found")
    return quadrant_expid(*locate_quadrant(exposure, rcids[0]))


def run_exposure(exposure: str | os.PathLike, cfg: Config, jobs: int | None = None,
                 quadrants: list[int] | None = None, force: bool = False, progress="stderr") -> dict:
    """Process the quadrants of an exposure with a local process pool; returns the summary.

    ``progress`` is the stream for the progress bar: ``"stderr"`` (the default) is the
    process's standard error as it is when the call is made (not when this module was
    imported: a test harness or a caller may have replaced it since), ``None`` draws no bar.
    """
    exposure = str(exposure)
    if progress == "stderr":
        progress = sys.stderr
    rcids = quadrants or exposure_rcids(exposure)
    if not rcids:
        raise QuadrantInputError(f"{exposure}: no quadrant found")
    jobs = jobs or len(os.sched_getaffinity(0))
    t0 = time.perf_counter()
    done = 0
    with contextlib.ExitStack() as stack:
        bar, log_queue = None, None
        if progress is not None:
            # The workers' log lines come through the parent, which erases the bar around them.
            bar, log_queue = stack.enter_context(progress_logging(progress))
        pool = stack.enter_context(ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker,
                                                       initargs=(cfg, log_queue)))
        futures = [pool.submit(_task, (exposure, rcid, force)) for rcid in rcids]
        for future in as_completed(futures):
            rcid, code, reason = future.result()
            done += 1
            if bar is not None:
                width = 30
                filled = int(width * done / len(rcids))
                bar.update(f"[{'#' * filled}{'.' * (width - filled)}] {done}/{len(rcids)} quadrants, "
                           f"{time.perf_counter() - t0:.0f} s (rcid {rcid}: exit {code})")
    fold_matchfiles(cfg)
    summary = exposure_summary(exposure, cfg, rcids)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    summary["jobs"] = jobs
    return summary


def fold_matchfiles(cfg: Config) -> None:
    """The fold step after an exposure's quadrants: fold every matchfile that needs it.

    One executor folds at a time on this machine; its ``flock`` is an extra guard against a
    second executor or a hand-run ``skydiff matchfile fold``.  A failed fold is logged, not
    fatal: the epochs stay committed as shards, readable, and the next fold retries.
    """
    from pipeline.matchfile.store import fold_root

    root = cfg.paths.resolve("matchfiles")
    if not root.is_dir():
        return
    report = fold_root(root, cfg.matchfile)
    if report.folded:
        log.info("folded %d epoch shard(s) into %d matchfile(s)", sum(report.folded.values()), len(report.folded))
    for path, reason in report.failed.items():
        log.warning("matchfile fold of %s failed (its epochs stay as shards): %s", path, reason)


def exposure_summary(exposure: str | os.PathLike, cfg: Config, rcids: list[int] | None = None) -> dict:
    """Every quadrant's state from its status record; writes ``<outputs>/<expid>/summary.json``."""
    expid = exposure_expid(exposure)
    rcids = rcids or exposure_rcids(exposure)
    quadrants, reprocess = [], []
    for rcid in rcids:
        record = read_status(quadrant_dir(cfg, expid, rcid)) or {"rcid": rcid, "state": "missing",
                                                                  "reason": "no status record", "exit_code": None}
        quadrants.append({k: record.get(k) for k in ("rcid", "state", "stage", "reason", "exit_code", "attempt")}
                         | {"total_s": (record.get("timings_s") or {}).get("total"),
                            "candidates": (record.get("subtraction") or {}).get("n_candidates"),
                            "alerts": (record.get("alerts") or {}).get("built")})
        if record.get("state") in ("missing", "started", "failed") or record.get("exit_code") == EXIT_RETRY:
            reprocess.append(rcid)
    counts: dict[str, int] = {}
    for q in quadrants:
        counts[q["state"]] = counts.get(q["state"], 0) + 1
    summary = {"exposure": str(exposure), "expid": expid, "quadrants": quadrants, "counts": counts,
               "reprocess": reprocess,
               "candidates": sum(q["candidates"] or 0 for q in quadrants),
               "alerts": sum(q["alerts"] or 0 for q in quadrants)}
    write_json_atomic(summary, cfg.paths.resolve("outputs") / str(expid) / "summary.json")
    return summary


def format_exposure_summary(summary: dict) -> str:
    lines = [f"exposure {summary['expid']} ({summary['exposure']}): "
             + ", ".join(f"{n} {state}" for state, n in sorted(summary["counts"].items()))
             + f"; {summary['candidates']} candidates, {summary['alerts']} alerts"
             + (f"; {summary['wall_s']} s with {summary['jobs']} worker(s)" if "wall_s" in summary else "")]
    lines.append("  rcid  state      stage         exit  attempt  seconds  candidates  alerts  reason")
    for q in summary["quadrants"]:
        cells = {k: "-" if q.get(k) is None else q[k] for k in ("exit_code", "attempt", "total_s", "candidates",
                                                                 "alerts")}
        lines.append(f"  {q['rcid']:>4}  {q['state'] or '':<9}  {q['stage'] or '':<12}  {cells['exit_code']:>4}"
                     f"  {cells['attempt']:>7}  {cells['total_s']:>7}  {cells['candidates']:>10}"
                     f"  {cells['alerts']:>6}  {q['reason'] or ''}")
    if summary["reprocess"]:
        lines.append(f"  to reprocess: {', '.join(map(str, summary['reprocess']))}")
    return "\n".join(lines)


def pending_images(exposure: str | os.PathLike, rcids: list[int] | None = None) -> list:
    """Each quadrant's :class:`alerts.history.PendingImage` (pid, jd, nominal footprint from the
    raw header's WCS), from the headers alone.  A quadrant whose header gives no footprint is
    left out with a warning: its task will fail on it with the reason."""
    from alerts.history import PendingImage
    from alerts.ids import make_pid
    from pipeline.core.image import footprint_corners, header_wcs, read_quadrant_header, validate_header

    # One pass over the exposure's files (an MEF opened once) gives every quadrant's file and
    # header; a quadrant it did not find (or an MEF extension it could not take) is looked up
    # as before, so that its error reads as locate_quadrant words it.
    try:
        quadrants = exposure_quadrants(exposure, warn=not rcids)
    except ExposureInputError:
        if not rcids:
            raise
        quadrants = {}
    images = []
    for rcid in rcids or sorted(quadrants):
        try:
            entry = quadrants.get(rcid)
            if entry is None or (entry.header is None and entry.hdu is not None):
                entry = ExposureQuadrant(*locate_quadrant(exposure, rcid))
            path = entry.path
            header = entry.header if entry.header is not None else read_quadrant_header(path, entry.hdu)
            meta = validate_header(header, path)
            wcs = header_wcs(header)
            if wcs is None:
                raise ImageContractError(path, "no WCS in the header")
            corners = footprint_corners(wcs, (int(header["NAXIS2"]), int(header["NAXIS1"])))
        except (PipelineError, KeyError, ValueError) as exc:
            log.warning("%s rcid %d: not announced to the object history (%s)", exposure, rcid, exc)
            continue
        images.append(PendingImage(make_pid(meta.expid, meta.rcid), float(meta.obsmjd) + 2400000.5,
                                   tuple((float(ra), float(dec)) for ra, dec in corners)))
    return images


def announce_exposure(exposure: str | os.PathLike, cfg: Config, rcids: list[int] | None = None) -> int:
    """Announce the exposure's quadrants to the object history (before they are queued); the
    number announced.

    Raises
    ------
    alerts.history.HistoryError
        The history cannot be opened (``HistoryUnavailableError``, exit 75, when its server
        cannot be reached).
    """
    from alerts.history import open_history_store

    images = pending_images(exposure, rcids)
    if not images:
        return 0
    with open_history_store(cfg.history, cfg.paths.resolve("history"), cfg.kafka.survey) as store:
        return store.announce(images)


def withdraw_exposure(exposure: str | os.PathLike, cfg: Config, rcids: list[int] | None = None) -> int:
    """Withdraw the announcements the exposure's quadrants left (those recorded left none);
    the number withdrawn.  A SQLite history that does not exist holds none and is not made."""
    from alerts.history import open_history_store
    from alerts.ids import make_pid

    if not cfg.history.url and not cfg.paths.resolve("history").exists():
        return 0
    expid = exposure_expid(exposure)
    pids = [make_pid(expid, rcid) for rcid in rcids or exposure_rcids(exposure)]
    with open_history_store(cfg.history, cfg.paths.resolve("history"), cfg.kafka.survey) as store:
        withdrawn = store.withdraw(pids)
    if withdrawn:
        log.info("exposure %d: %d quadrant(s) never recorded in the object history; their announcements "
                 "withdrawn", expid, withdrawn)
    return withdrawn
