"""Slurm job queries and control without ``sacct``: ``squeue``, ``scontrol`` and the jobcomp file.

A one-machine Slurm (and many small sites) runs without slurmdbd, so ``sacct`` has
nothing to say.  Live jobs come from ``squeue -t all`` (which keeps finished jobs for
``MinJobAge`` seconds); every finished attempt of every task is a line of the
``jobcomp/filetxt`` file, whose location ``scontrol show config`` gives.  ``sbatch --wait``
polls at 2, 8 and then every 32 s, so :func:`wait_for_jobs` polls ``squeue`` itself.

Every command runs through :func:`run_slurm` (an argument list, never a shell) and a
failure raises :class:`SlurmError` carrying the command and Slurm's message.
"""
from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence
from pipeline.core.exits import PipelineError

__all__ = ["SlurmError", "QueuedJob", "CompletedTask", "run_slurm", "slurm_config_value", "queued_jobs",
           "completed_tasks", "wait_for_jobs", "release_jobs", "cancel_jobs", "TERMINAL_STATES"]

COMMAND_TIMEOUT_S = 30.0
TERMINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                             "BOOT_FAIL", "DEADLINE", "PREEMPTED"})
_SQUEUE_FORMAT = "%F|%K|%i|%j|%T|%r"
# jobcomp/filetxt writes "Key=value" pairs separated by single spaces; a value may itself
# hold spaces (WorkDir), so a pair ends where the next "Key=" begins.
_JOBCOMP_PAIR = re.compile(r"(\w+)=(.*?)(?= \w+=|\s*$)")


class SlurmError(PipelineError, RuntimeError):
    """A Slurm command failed or is missing; the message names the command and Slurm's words."""


@dataclass(frozen=True)
class QueuedJob:
    """One line of ``squeue``: a job, an array task, or a still-unsplit pending array."""

    job_id: int               # the array's job id for array tasks (%F)
    array_task: str           # task id, a pending range such as "[0-63]", or "" for a plain job
    job_id_text: str          # as squeue prints it: "12", "12_3" or "12_[0-63]"
    name: str
    state: str
    reason: str

    @property
    def held(self) -> bool:
        return self.state == "PENDING" and self.reason in {"JobHeldUser", "JobHeldAdmin"}


@dataclass(frozen=True)
class CompletedTask:
    """One finished attempt from the jobcomp file."""

    job_id: int               # the array's job id for array tasks
    array_task: int | None
    name: str
    state: str
    exit_code: int
    signal: int
    start: str
    end: str
    node: str = ""            # the node it ran on (NodeList)


def run_slurm(argv: Sequence[str], timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    """Run one Slurm client command; its standard output, or :class:`SlurmError`."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout_s, check=False)
    except FileNotFoundError as exc:
        raise SlurmError(f"{argv[0]} not found: is the Slurm client installed (slurm/local-slurm.sh start)?") from exc
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"{' '.join(argv)} did not answer within {timeout_s:.0f} s") from exc
    if proc.returncode != 0:
        raise SlurmError(f"{' '.join(argv)} failed with status {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


def slurm_config_value(key: str) -> str:
    """A value of the running controller's configuration (``scontrol show config``)."""
    for line in run_slurm(["scontrol", "show", "config"]).splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() == key:
            return value.strip()
    raise SlurmError(f"scontrol show config has no {key}")


def queued_jobs(names: Iterable[str] = (), job_ids: Iterable[int | str] = ()) -> list[QueuedJob]:
    """Jobs Slurm still knows (pending, running and recently finished) by name or id."""
    argv = ["squeue", "--noheader", "--states=all", f"--format={_SQUEUE_FORMAT}"]
    names, job_ids = list(names), [str(j) for j in job_ids]
    if names:
        argv.append("--name=" + ",".join(names))
    if job_ids:
        argv.append("--jobs=" + ",".join(job_ids))
    try:
        out = run_slurm(argv)
    except SlurmError as exc:
        # Ids purged after MinJobAge make squeue fail instead of printing nothing.
        if job_ids and "Invalid job id" in str(exc):
            return []
        raise
    jobs = []
    for line in out.splitlines():
        fields = line.split("|")
        if len(fields) != 6:
            continue
        array_job, task, text, name, state, reason = fields
        jobs.append(QueuedJob(int(array_job), "" if task == "N/A" else task, text, name, state, reason))
    return jobs


def completed_tasks(jobcomp: str | Path | None = None, names: Iterable[str] = (),
                    job_ids: Iterable[int] = ()) -> list[CompletedTask]:
    """Every finished attempt in the jobcomp file, in completion order, optionally filtered.

    A task requeued on exit 75 has one line per attempt; its last line is its outcome.
    """
    path = Path(jobcomp or slurm_config_value("JobCompLoc"))
    names, job_ids = set(names), set(job_ids)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    tasks = []
    for line in text.splitlines():
        record = dict(_JOBCOMP_PAIR.findall(line))
        if "JobState" not in record:
            continue
        array_job = record.get("ArrayJobId")
        job_id = int(array_job) if array_job else int(record["JobId"])
        if (names and record.get("Name") not in names) or (job_ids and job_id not in job_ids):
            continue
        code, _, signal = record.get("ExitCode", "0:0").partition(":")
        task = record.get("ArrayTaskId")
        tasks.append(CompletedTask(job_id, int(task) if task else None, record.get("Name", ""),
                                   record["JobState"], int(code or 0), int(signal or 0),
                                   record.get("StartTime", ""), record.get("EndTime", ""),
                                   record.get("NodeList", "")))
    return tasks


def wait_for_jobs(job_ids: Iterable[int], timeout_s: float, poll_s: float = 0.5) -> None:
    """Block until no job in ``job_ids`` is pending or running; :class:`SlurmError` on timeout."""
    job_ids = list(job_ids)
    deadline = time.monotonic() + timeout_s
    while True:
        live = [j for j in queued_jobs(job_ids=job_ids) if j.state not in TERMINAL_STATES]
        if not live:
            return
        if time.monotonic() > deadline:
            states = ", ".join(f"{j.job_id_text} {j.state} ({j.reason})" for j in live[:8])
            raise SlurmError(f"jobs {job_ids} not finished after {timeout_s:.0f} s: {states}")
        time.sleep(poll_s)


def release_jobs(job_ids: Iterable[int]) -> None:
    """Release held jobs (releasing a job already released or running changes nothing)."""
    run_slurm(["scontrol", "release", ",".join(str(j) for j in job_ids)])


def cancel_jobs(job_ids: Iterable[int]) -> None:
    """Cancel jobs (every task of an array)."""
    job_ids = [str(j) for j in job_ids]
    if job_ids:
        run_slurm(["scancel", *job_ids])
