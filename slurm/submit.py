"""Submit one exposure to Slurm: a job array (one task per quadrant), its follow-up job and the matchfile fold job.

The array runs ``slurm/quadrant.sbatch`` with the task command ``skydiff quadrant
EXPOSURE --quadrant {rcid} --config FILE``; the follow-up runs ``slurm/summary.sbatch``
with ``skydiff exposure-summary EXPOSURE --config FILE`` once every task has ended
(``afterany`` on each task by id: ``afterok`` on a whole array never recovers from one
failed task).  The time limit, partition, CPUs per task and the retry cap on exit 75 come
from the configuration's ``[slurm]`` section.

Before queueing, the exposure's quadrants are announced to the object history
(:func:`pipeline.run.exposure.announce_exposure`): tasks of later exposures overlapping them
wait for them, so concurrent tasks associate as a sequential run would; the summary job
withdraws what an unrecorded quadrant left.

The fold job runs ``slurm/fold.sbatch`` with ``skydiff matchfile fold --config FILE`` after
every task of the array has ended (``afterany``, as the summary) and with Slurm's
``singleton`` dependency under the one fixed job name :data:`FOLD_JOB_NAME`: a singleton
starts only once no other job of that name and user is running, so at most one fold runs
cluster-wide, whichever exposure submitted it.  The quadrant tasks only commit epoch shards
by rename, lock-free; folding them into the main files must be one process at a time
(:mod:`pipeline.matchfile.store`), and this is what makes it so across nodes, where a
``flock`` is not dependable.  The fold job is never held: it waits on the array, which a
``hold`` keeps from running, and should a held submission be cancelled (the watcher's
recovery), the fold job runs once the cancelled tasks end and folds whatever is pending,
which is harmless.

Each submission has a folder ``<paths.outputs>/slurm/<key>/`` with the effective
configuration the tasks read (``config.toml``, paths made absolute so a task's working
directory does not matter) and the jobs' logs.  Job names carry the exposure's key
(``skydiff-quadrants-<key>``, ``skydiff-summary-<key>``) so Slurm itself can say whether
an exposure was submitted; :mod:`slurm.watch` relies on that with ``hold=True``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from pipeline.core.config import Config, config_to_toml
from pipeline.formats.atomic import write_text_atomic

from slurm.jobs import SlurmError, run_slurm

__all__ = ["SubmitResult", "submit_exposure", "exposure_key", "job_names", "skydiff_executable",
           "quadrant_command", "summary_command", "fold_command", "TEMPLATE_DIR", "FOLD_JOB_NAME"]

TEMPLATE_DIR = Path(__file__).resolve().parent
RCID_TOKEN = "{rcid}"
#: The fold jobs' one name: Slurm's ``singleton`` lets one job of a name and user run at a time.
FOLD_JOB_NAME = "skydiff-matchfile-fold"


@dataclass(frozen=True)
class SubmitResult:
    """What :func:`submit_exposure` submitted."""

    exposure: Path
    key: str
    array_job_id: int
    summary_job_id: int
    quadrants: tuple[int, ...]
    workdir: Path
    fold_job_id: int | None = None


def exposure_key(exposure: str | os.PathLike) -> str:
    """A job-name-safe key for an exposure: its name and a hash of its absolute path.

    The hash keeps two exposures with the same file name in different folders apart.
    """
    path = Path(exposure).resolve()
    stem = path.name
    for suffix in (".fz", ".fits"):
        stem = stem.removesuffix(suffix)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80]
    return f"{safe}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def job_names(key: str) -> tuple[str, str]:
    """(array job name, summary job name) of the exposure with this key."""
    return f"skydiff-quadrants-{key}", f"skydiff-summary-{key}"


def skydiff_executable() -> str:
    """The ``skydiff`` script of this environment (jobs may not inherit a venv's PATH)."""
    beside = Path(sys.executable).parent / "skydiff"
    found = str(beside) if beside.exists() else shutil.which("skydiff")
    if not found:
        raise SlurmError("the skydiff command is not installed in this environment (pip install -e .)")
    return found


def quadrant_command(exposure: Path, config_file: Path) -> list[str]:
    """The array task's command; ``{rcid}`` is replaced by each task's rcid."""
    return [skydiff_executable(), "quadrant", str(exposure), "--quadrant", RCID_TOKEN,
            "--config", str(config_file)]


def summary_command(exposure: Path, config_file: Path) -> list[str]:
    """The follow-up job's command."""
    return [skydiff_executable(), "exposure-summary", str(exposure), "--config", str(config_file)]


def fold_command(config_file: Path) -> list[str]:
    """The fold job's command: every matchfile under ``paths.matchfiles`` that needs a fold."""
    return [skydiff_executable(), "matchfile", "fold", "--config", str(config_file)]


def _array_spec(quadrants: Sequence[int]) -> str:
    return ",".join(str(q) for q in quadrants)


def _default_quadrants(exposure: Path, cfg: Config) -> list[int]:
    from pipeline.formats.exposure import exposure_rcids
    rcids = exposure_rcids(exposure)
    if not rcids:
        raise ValueError(f"{exposure}: no quadrant found (expected extensions Q00..Q{cfg.instrument.n_quadrants - 1:02d}"
                         " or a folder of quadrant files)")
    return rcids


def _write_task_config(cfg: Config, workdir: Path) -> Path:
    """The effective configuration for the tasks, with absolute paths, written atomically."""
    root = Path(cfg.paths.root).resolve()
    text = config_to_toml(cfg.replace(paths__root=str(root)), hide_secrets=False)
    # Private from its creation on: the file may hold the Kafka password.
    return write_text_atomic(text, workdir / "config.toml", mode=0o600)


def _sbatch(options: list[str], template: str, command: Sequence[str]) -> int:
    out = run_slurm(["sbatch", "--parsable", *options, str(TEMPLATE_DIR / template), *command])
    # --parsable prints "jobid" or "jobid;cluster".
    return int(out.strip().split(";")[0])


def submit_exposure(exposure: str | os.PathLike, cfg: Config, quadrants: Iterable[int] | None = None, *,
                    hold: bool = False, task_command: Sequence[str] | None = None,
                    follow_up_command: Sequence[str] | None = None,
                    fold: Sequence[str] | bool = True, announce: bool = True) -> SubmitResult:
    """Submit the quadrants' job array, the follow-up summary job and the fold job of one exposure.

    Parameters
    ----------
    exposure : path
        A multi-extension FITS exposure or a folder of quadrant files.
    cfg : Config
        Effective configuration; written to the submission folder for the tasks.
    quadrants : iterable of int, optional
        rcids to run (default: every quadrant the exposure holds).
    hold : bool
        Submit the array and the summary job held (``scontrol release`` starts them); the
        watcher's exactly-once protocol uses this.  The fold job is not held (it waits on
        the array; see the module docstring).
    task_command, follow_up_command : sequence of str, optional
        Replace the default ``skydiff quadrant`` / ``skydiff exposure-summary`` commands
        (``{rcid}`` in the task command becomes the task's rcid).
    fold : sequence of str or bool
        The fold job's command (default :func:`fold_command`); False submits no fold job.
    announce : bool
        Announce the quadrants to the object history before queueing them, so that images
        running at once on several nodes associate in time order (:mod:`alerts.history`).
        Exposures must then be submitted in time order.

    Returns
    -------
    SubmitResult
        Job ids of the array, the follow-up job and the fold job.
    """
    exposure = Path(exposure).resolve()
    if not exposure.exists():
        raise FileNotFoundError(f"{exposure}: no such exposure (file or folder)")
    rcids = sorted(set(quadrants)) if quadrants is not None else _default_quadrants(exposure, cfg)
    n_quadrants = cfg.instrument.n_quadrants
    bad = [q for q in rcids if not 0 <= q < n_quadrants]
    if bad or not rcids:
        raise ValueError(f"quadrants must be rcids 0..{n_quadrants - 1}, got {list(quadrants or [])}")
    key = exposure_key(exposure)
    array_name, summary_name = job_names(key)
    workdir = (cfg.paths.resolve("outputs") / "slurm" / key).resolve()
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    config_file = _write_task_config(cfg, workdir)
    if announce:
        # Before any task can start: later overlapping images wait for these in the history.
        from pipeline.run.exposure import announce_exposure
        announce_exposure(exposure, cfg, rcids)

    slurm = cfg.slurm
    common = [f"--time={slurm.time_limit}", f"--cpus-per-task={slurm.cpus_per_task}",
              f"--chdir={workdir}"]
    if slurm.partition:
        common.append(f"--partition={slurm.partition}")
    if hold:
        common.append("--hold")
    array_id = _sbatch(
        [*common, f"--job-name={array_name}", f"--array={_array_spec(rcids)}",
         f"--export=ALL,SKYDIFF_MAX_RETRIES={slurm.max_retries}",
         f"--output={workdir / 'logs' / 'quadrant-%A_%a.log'}"],
        "quadrant.sbatch", task_command or quadrant_command(exposure, config_file))
    dependency = "afterany:" + ":".join(f"{array_id}_{rcid}" for rcid in rcids)
    try:
        summary_id = _sbatch(
            [*common, f"--job-name={summary_name}", f"--dependency={dependency}", "--export=ALL",
             f"--output={workdir / 'logs' / 'summary-%j.log'}"],
            "summary.sbatch", follow_up_command or summary_command(exposure, config_file))
    except SlurmError:
        # An array without its follow-up would leave the exposure half-submitted.
        run_slurm(["scancel", str(array_id)])
        raise
    fold_id = None
    if fold is not False:
        fold_options = [f"--time={slurm.time_limit}", "--cpus-per-task=1", f"--chdir={workdir}",
                        *([f"--partition={slurm.partition}"] if slurm.partition else []),
                        f"--job-name={FOLD_JOB_NAME}", f"--dependency={dependency},singleton", "--export=ALL",
                        f"--output={workdir / 'logs' / 'fold-%j.log'}"]
        try:
            fold_id = _sbatch(fold_options, "fold.sbatch",
                              fold_command(config_file) if fold is True else list(fold))
        except SlurmError:
            # Without its fold job the exposure's epochs would wait for another exposure's.
            run_slurm(["scancel", str(summary_id), str(array_id)])
            raise
    return SubmitResult(exposure, key, array_id, summary_id, tuple(rcids), workdir, fold_id)
