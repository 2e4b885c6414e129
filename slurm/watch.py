"""Watch a folder and submit every complete exposure to Slurm exactly once, across restarts.

Exactly once
------------
A SQLite ledger records each exposure's progress, and Slurm's own hold flag closes the
window between ``sbatch`` and the ledger write:

1. ``intent`` is committed for the exposure's key;
2. both jobs are submitted **held** (``sbatch --hold``), with job names carrying the key;
3. ``submitted`` is committed with the two job ids;
4. the jobs are released (``scontrol release``), then ``released`` is committed.

Nothing runs before step 4, and step 4 only ever releases ids the ledger holds.  (The
exposure's matchfile fold job, :mod:`slurm.submit`, is not held: it waits on the held array,
and if that array is cancelled below it runs once and folds what is pending, which is
harmless; it carries one fixed name for all exposures, so it is not looked up by key.)  A watcher
killed anywhere is repaired by :meth:`ExposureWatcher.recover` at the next start: an
exposure left in ``intent`` may have held jobs in Slurm (killed between 2 and 3); held jobs
never leave the queue, so a look-up by job name finds them all, they are cancelled (they
never ran) and the exposure is submitted afresh.  One left in ``submitted`` is released
(releasing twice changes nothing).  A file lock keeps a second watcher off the ledger.

Complete exposures
------------------
An exposure is a ``*.fits``/``*.fits.fz``/``*.fits.gz`` file or a folder of them (IPAC's
``sciimg``/``mskimg`` pairs among them); hidden and ``.tmp``
names (atomic writers' temporary files) are ignored.  With ``marker_suffix`` (e.g.
``.done``) an exposure counts only once ``<exposure><suffix>`` exists.  Otherwise it must
look the same (every file's size and modification time) over ``settle_s`` and across two
scans, and every FITS file's size must be whole 2880-byte blocks (a gzipped one has none:
the settle time alone decides).
"""
from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from pipeline.core.config import Config

from slurm.jobs import SlurmError, cancel_jobs, queued_jobs, release_jobs
from slurm.submit import SubmitResult, exposure_key, job_names, submit_exposure

__all__ = ["WatchSettings", "SubmissionLedger", "ExposureWatcher", "WatcherBusyError", "exposure_signature"]

log = logging.getLogger("skydiff.watch")

FITS_BLOCK = 2880
FITS_SUFFIXES = (".fits", ".fits.fz", ".fits.gz")   # .gz: IPAC's products as IRSA may serve them


class WatcherBusyError(RuntimeError):
    """Another watcher holds the ledger."""


@dataclass(frozen=True)
class WatchSettings:
    """How the watcher decides an exposure is complete, and what it submits."""

    settle_s: float = 2.0          # unchanged this long (and over two scans) counts as complete
    marker_suffix: str = ""        # when set, only exposures with this marker file count
    quadrants: tuple[int, ...] | None = None   # rcids to submit (default: all the exposure holds)


def _utc() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class SubmissionLedger:
    """The durable record of submissions (SQLite, one row per exposure key)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_handle = open(self.path.with_name(self.path.name + ".lock"), "a")
        try:
            fcntl.flock(self._lock_handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_handle.close()
            raise WatcherBusyError(f"{self.path}: another watcher is using this ledger") from None
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("""CREATE TABLE IF NOT EXISTS submissions (
            key TEXT PRIMARY KEY, exposure TEXT NOT NULL, state TEXT NOT NULL,
            array_job_id INTEGER, summary_job_id INTEGER,
            intent_utc TEXT, submitted_utc TEXT, released_utc TEXT, reason TEXT)""")

    def close(self) -> None:
        self._db.close()
        self._lock_handle.close()

    def __enter__(self) -> "SubmissionLedger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def state(self, key: str) -> str | None:
        row = self._db.execute("SELECT state FROM submissions WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def rows(self, state: str | None = None) -> list[dict]:
        query = "SELECT * FROM submissions" + (" WHERE state = ?" if state else "") + " ORDER BY intent_utc"
        cursor = self._db.execute(query, (state,) if state else ())
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def record_intent(self, key: str, exposure: Path) -> None:
        self._db.execute("INSERT OR REPLACE INTO submissions (key, exposure, state, intent_utc) "
                         "VALUES (?, ?, 'intent', ?)", (key, str(exposure), _utc()))

    def record_submitted(self, key: str, array_job_id: int, summary_job_id: int) -> None:
        self._db.execute("UPDATE submissions SET state = 'submitted', array_job_id = ?, summary_job_id = ?, "
                         "submitted_utc = ? WHERE key = ?", (array_job_id, summary_job_id, _utc(), key))

    def record_rejected(self, key: str, reason: str) -> None:
        self._db.execute("UPDATE submissions SET state = 'rejected', reason = ? WHERE key = ?", (reason, key))

    def record_released(self, key: str) -> None:
        self._db.execute("UPDATE submissions SET state = 'released', released_utc = ? WHERE key = ?",
                         (_utc(), key))


def _is_candidate(path: Path) -> bool:
    name = path.name
    if name.startswith(".") or name.endswith(".tmp"):
        return False
    return path.is_dir() or name.endswith(FITS_SUFFIXES)


def exposure_signature(path: Path) -> tuple | None:
    """Sizes and modification times of an exposure's files; None while visibly incomplete."""
    files = sorted(p for p in path.iterdir() if _is_candidate(p) and p.is_file()) if path.is_dir() else [path]
    if not files:
        return None
    signature = []
    for file in files:
        try:
            st = file.stat()
        except FileNotFoundError:
            return None
        # A gzipped file has no block structure: only the settle time tells it is complete.
        if st.st_size == 0 or (st.st_size % FITS_BLOCK and not file.name.endswith(".gz")):
            return None
        signature.append((file.name, st.st_size, st.st_mtime_ns))
    return tuple(signature)


class ExposureWatcher:
    """Submits the complete exposures of ``incoming`` not yet in the ledger.

    ``submit`` defaults to :func:`slurm.submit.submit_exposure`; it must accept
    ``(exposure, cfg, quadrants, hold=True)`` and submit held jobs named after
    :func:`slurm.submit.job_names`.
    """

    def __init__(self, incoming: str | os.PathLike, cfg: Config, ledger: SubmissionLedger,
                 settings: WatchSettings = WatchSettings(),
                 submit: Callable[..., SubmitResult] = submit_exposure):
        self.incoming = Path(incoming).resolve()
        if not self.incoming.is_dir():
            raise NotADirectoryError(f"{self.incoming}: the incoming folder does not exist")
        self.cfg = cfg
        self.ledger = ledger
        self.settings = settings
        self._submit = submit
        self._seen: dict[Path, tuple[tuple, float]] = {}

    def recover(self) -> int:
        """Finish what a killed watcher (or a failed sbatch) left half done; exposures repaired."""
        repaired = 0
        for row in self.ledger.rows("intent"):
            names = job_names(row["key"])
            held = [j for j in queued_jobs(names=names) if j.state == "PENDING"]
            if held:
                # Never released, so never ran: cancel (follow-up first, so it cannot
                # become eligible) and submit again.
                summary = sorted({j.job_id for j in held if j.name == names[1]})
                array = sorted({j.job_id for j in held if j.name == names[0]})
                cancel_jobs(summary)
                cancel_jobs(array)
                log.warning("%s: cancelled held jobs %s of an unfinished submission", row["exposure"],
                            summary + array)
            self._submit_held(Path(row["exposure"]), row["key"])
            repaired += 1
        for row in self.ledger.rows("submitted"):
            self._release(row["key"], row["array_job_id"], row["summary_job_id"])
            repaired += 1
        return repaired

    def complete_exposures(self) -> list[Path]:
        """Exposures in the folder now complete and never submitted, oldest first."""
        now = time.monotonic()
        ready = []
        present = set()
        for path in sorted(self.incoming.iterdir()):
            if not _is_candidate(path):
                continue
            present.add(path)
            if self.ledger.state(exposure_key(path)) is not None:
                continue
            if self.settings.marker_suffix:
                if Path(str(path) + self.settings.marker_suffix).exists() and exposure_signature(path):
                    ready.append(path)
                continue
            signature = exposure_signature(path)
            previous = self._seen.get(path)
            if signature is None or previous is None or previous[0] != signature:
                self._seen[path] = (signature, now)
                continue
            if now - previous[1] >= self.settings.settle_s:
                ready.append(path)
        for gone in set(self._seen) - present:
            del self._seen[gone]
        return sorted(ready, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def poll_once(self) -> list[SubmitResult]:
        """Repair unfinished submissions, then submit every exposure complete now."""
        self.recover()
        results = []
        for path in self.complete_exposures():
            result = self._submit_held(path, exposure_key(path))
            if result is not None:
                results.append(result)
        return results

    def run(self, interval_s: float = 2.0, once: bool = False) -> int:
        """Poll every ``interval_s`` forever; with ``once``, look twice settle_s apart and return.

        Returns the number of exposures submitted (``once`` only).
        """
        if once:
            self.recover()
            self.complete_exposures()
            time.sleep(self.settings.settle_s)
            return len(self.poll_once())
        while True:
            self.poll_once()
            time.sleep(interval_s)

    def _submit_held(self, exposure: Path, key: str) -> SubmitResult | None:
        """Steps 1-4 of the protocol; None when the exposure was rejected or Slurm failed."""
        self.ledger.record_intent(key, exposure)
        try:
            result = self._submit(exposure, self.cfg, self.settings.quadrants, hold=True)
        except SlurmError as exc:
            # Left in 'intent': the next poll's recover() tries again.
            log.error("%s: submission failed, will retry: %s", exposure, exc)
            return None
        except (ValueError, OSError) as exc:
            log.error("%s: not submitted: %s", exposure, exc)
            self.ledger.record_rejected(key, str(exc))
            return None
        self.ledger.record_submitted(key, result.array_job_id, result.summary_job_id)
        self._release(key, result.array_job_id, result.summary_job_id)
        log.info("%s: submitted array %d (%d quadrants), summary %d", exposure.name, result.array_job_id,
                 len(result.quadrants), result.summary_job_id)
        return result

    def _release(self, key: str, array_job_id: int, summary_job_id: int) -> None:
        try:
            release_jobs([array_job_id, summary_job_id])
        except SlurmError as exc:
            if "Invalid job id" not in str(exc) and "no longer pending" not in str(exc).lower():
                raise
            # Gone from Slurm: it was released and has run (and aged out) before the kill.
            log.warning("release of %d/%d: %s", array_job_id, summary_job_id, exc)
        self.ledger.record_released(key)
