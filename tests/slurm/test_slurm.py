"""Slurm plumbing on the real one-machine Slurm (slurm/local-slurm.sh): arrays, retries on
exit 75, the follow-up job's per-task dependencies, and the watcher's exactly-once protocol.

The tasks run the real ``skydiff`` command.  Where a test needs a task that fails or asks
for a retry, a small bash wrapper (written below, named for what it does) decides the exit
status from the rcid and attempt and otherwise execs ``skydiff config``.
"""
from __future__ import annotations

import functools
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path

import pytest
from astropy.io import fits

from pipeline.core.config import config_to_toml, load_config
from slurm.jobs import completed_tasks, queued_jobs, wait_for_jobs
from slurm.submit import exposure_key, job_names, skydiff_executable, submit_exposure
from slurm.watch import ExposureWatcher, SubmissionLedger, WatchSettings
from slurm_cluster import SCRIPT, start_local_slurm

JOB_TIMEOUT_S = 120

# Runs the skydiff CLI with the Slurm commands registered even before cli.py lists them.
CLI_SHIM = ("import sys, pipeline.cli as cli\n"
            "for m in ('pipeline.commands.submit', 'pipeline.commands.watch'):\n"
            "    m in cli.COMMAND_MODULES or cli.COMMAND_MODULES.append(m)\n"
            "sys.exit(cli.main(sys.argv[1:]))\n")

FAIL_OR_RETRY_TASK = """#!/bin/bash
# rcid 1 fails (bad input), rcid 2 asks for a retry on its first attempt only,
# rcid 3 asks for a retry every time; every other attempt runs the real skydiff.
rcid=$1 records=$2 attempt=${SLURM_RESTART_COUNT:-0}
echo "$attempt" > "$records/attempt-$rcid-$attempt"
echo "$XDG_CACHE_HOME" > "$records/xdg-$rcid-$attempt"
hostname > "$records/host-$rcid"
case $rcid in
  1) exit 3 ;;
  2) [ "$attempt" = 0 ] && exit 75 ;;
  3) exit 75 ;;
esac
exec "$3" config > "$records/config-$rcid.toml"
"""

SUMMARY_TASK = """#!/bin/bash
ls "$1" > "$1/summary-saw.txt"
exec "$2" config > "$1/summary.toml"
"""


@pytest.fixture(scope="session")
def local_slurm():
    cluster = start_local_slurm()
    yield cluster
    cluster.stop()


def _cfg(root: Path, **slurm):
    return load_config().replace(paths__root=str(root), **{f"slurm__{k}": v for k, v in slurm.items()})


def _tiny_exposure(path: Path) -> Path:
    fits.PrimaryHDU().writeto(path)
    return path


def _runs(names, jobcomp) -> Counter:
    """Attempts that actually ran, per (job name, array task)."""
    return Counter((t.name, t.array_task) for t in completed_tasks(jobcomp, names=names) if t.state != "CANCELLED")


def test_array_retry_cap_and_summary_after_every_task(local_slurm, tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    task = tmp_path / "fail_or_retry_task.sh"
    task.write_text(FAIL_OR_RETRY_TASK)
    summary = tmp_path / "summary_task.sh"
    summary.write_text(SUMMARY_TASK)
    cfg = _cfg(tmp_path, max_retries=1, time_limit="00:05:00")
    exposure = _tiny_exposure(tmp_path / "exp1.fits")
    skydiff = skydiff_executable()

    result = submit_exposure(exposure, cfg, quadrants=[0, 1, 2, 3],
                             task_command=["bash", str(task), "{rcid}", str(records), skydiff],
                             follow_up_command=["bash", str(summary), str(records), skydiff])
    wait_for_jobs([result.array_job_id, result.summary_job_id], JOB_TIMEOUT_S)

    tasks = completed_tasks(local_slurm.jobcomp, job_ids=[result.array_job_id])
    attempts = {rcid: [(t.state, t.exit_code) for t in tasks if t.array_task == rcid] for rcid in range(4)}
    assert attempts[0] == [("COMPLETED", 0)]
    assert attempts[1] == [("FAILED", 3)]                          # bad input: never retried
    assert attempts[2] == [("FAILED", 75), ("COMPLETED", 0)]       # retried once, then done
    assert attempts[3] == [("FAILED", 75), ("FAILED", 1)]          # cap of 1 retry reached
    # The array ran across the cluster's nodes (each its own network namespace and host name).
    assert {t.node for t in tasks} == set(local_slurm.nodes)
    assert {(records / f"host-{rcid}").read_text().strip() for rcid in range(4)} == set(local_slurm.nodes)
    assert (records / "attempt-2-1").read_text().strip() == "1"    # the retry saw SLURM_RESTART_COUNT=1
    assert not (records / "attempt-3-2").exists()
    log3 = (result.workdir / "logs" / f"quadrant-{result.array_job_id}_3.log").read_text()
    assert "cap of 1 reached" in log3

    # Real skydiff output from the tasks that ran it, with the embedded defaults.
    for rcid in (0, 2):
        toml = tomllib.loads((records / f"config-{rcid}.toml").read_text())
        assert toml["slurm"]["max_retries"] == load_config().slurm.max_retries
    # Each attempt had its own astropy directories, removed when it ended.
    xdg = {p.read_text().strip() for p in records.glob("xdg-*")}
    assert len(xdg) == len(list(records.glob("xdg-*"))) == 6
    assert not any(Path(d).exists() for d in xdg)

    # The follow-up ran once, after every task's last attempt, the failed ones included.
    (summary_run,) = completed_tasks(local_slurm.jobcomp, job_ids=[result.summary_job_id])
    assert summary_run.state == "COMPLETED"
    assert summary_run.start >= max(t.end for t in tasks)
    saw = (records / "summary-saw.txt").read_text().split()
    assert {"config-0.toml", "config-2.toml", "attempt-2-1", "attempt-3-1"} <= set(saw)
    assert "[slurm]" in (records / "summary.toml").read_text()
    # The tasks read the effective configuration written for them, paths made absolute.
    task_cfg = tomllib.loads((result.workdir / "config.toml").read_text())
    assert task_cfg["paths"]["root"] == str(tmp_path.resolve())
    assert task_cfg["slurm"]["max_retries"] == 1


def test_watcher_killed_between_sbatch_and_ledger_submits_once(local_slurm, tmp_path):
    """The two dangerous kill points, reproduced exactly: after sbatch but before the ledger
    knows the job ids, and after the ledger knows them but before the release."""
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    cfg = _cfg(tmp_path)
    skydiff = skydiff_executable()
    submit = functools.partial(submit_exposure, task_command=[skydiff, "config"], follow_up_command=[skydiff, "config"])
    lost_ids, unreleased = _tiny_exposure(incoming / "lost_ids.fits"), _tiny_exposure(incoming / "unreleased.fits")
    ledger_path = tmp_path / "ledger.sqlite"

    with SubmissionLedger(ledger_path) as ledger:      # the first watcher, "killed" at each point
        ledger.record_intent(exposure_key(lost_ids), lost_ids)
        orphan = submit(lost_ids, cfg, (0,), hold=True)
        ledger.record_intent(exposure_key(unreleased), unreleased)
        kept = submit(unreleased, cfg, (0,), hold=True)
        ledger.record_submitted(exposure_key(unreleased), kept.array_job_id, kept.summary_job_id)
    held = queued_jobs(job_ids=[orphan.array_job_id, orphan.summary_job_id, kept.array_job_id])
    assert held and all(j.held for j in held)                     # nothing ran while held

    with SubmissionLedger(ledger_path) as ledger:       # the restarted watcher
        watcher = ExposureWatcher(incoming, cfg, ledger, WatchSettings(settle_s=0.0, quadrants=(0,)), submit)
        assert watcher.recover() == 2
        assert watcher.poll_once() == [] and watcher.poll_once() == []    # both already handled
        rows = {r["key"]: r for r in ledger.rows()}
    assert {r["state"] for r in rows.values()} == {"released"}
    fresh = rows[exposure_key(lost_ids)]
    assert fresh["array_job_id"] not in (orphan.array_job_id, kept.array_job_id)
    assert rows[exposure_key(unreleased)]["array_job_id"] == kept.array_job_id

    ids = [fresh["array_job_id"], fresh["summary_job_id"], kept.array_job_id, kept.summary_job_id]
    wait_for_jobs(ids + [orphan.array_job_id, orphan.summary_job_id], JOB_TIMEOUT_S)
    names = [n for e in (lost_ids, unreleased) for n in job_names(exposure_key(e))]
    runs = _runs(names, local_slurm.jobcomp)
    assert sorted(runs.values()) == [1, 1, 1, 1]
    assert set(runs) == {(names[0], 0), (names[1], None), (names[2], 0), (names[3], None)}
    orphan_runs = [t for t in completed_tasks(local_slurm.jobcomp, job_ids=[orphan.array_job_id, orphan.summary_job_id])
                   if t.state != "CANCELLED"]
    assert orphan_runs == []


def _start_watcher(incoming: Path, config_file: Path, log: Path) -> subprocess.Popen:
    argv = [sys.executable, "-c", CLI_SHIM, "watch", str(incoming), "--interval", "0.2", "--settle", "0.3",
            "--quadrants", "0", "--config", str(config_file)]
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _ledger_row(ledger: Path, sql: str, args: tuple = ()):
    """One row of a query on the watcher's ledger; None while the watcher has not created its table yet."""
    if not ledger.exists():
        return None
    try:
        with sqlite3.connect(ledger) as db:
            return db.execute(sql, args).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise


def _released(ledger: Path) -> int:
    row = _ledger_row(ledger, "SELECT count(*) FROM submissions WHERE state = 'released'")
    return 0 if row is None else row[0]


def _wait_intent(ledger: Path, name: str, watcher: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        if _ledger_row(ledger, "SELECT 1 FROM submissions WHERE exposure LIKE ?", (f"%/{name}",)):
            return
        assert watcher.poll() is None, f"watcher exited: {log.read_text()}"
        assert time.monotonic() < deadline, f"{name} never taken: {log.read_text()}"
        time.sleep(0.005)


def _wait_released(ledger: Path, count: int, watcher: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while _released(ledger) < count:
        assert watcher.poll() is None, f"watcher exited: {log.read_text()}"
        assert time.monotonic() < deadline, f"{_released(ledger)} of {count} submitted: {log.read_text()}"
        time.sleep(0.1)


def test_watch_killed_and_restarted_mid_stream_submits_each_exposure_once(local_slurm, tmp_path):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    config_file = tmp_path / "skydiff.toml"
    config_file.write_text(config_to_toml(_cfg(tmp_path)))
    ledger = tmp_path / "outputs" / "slurm" / "watch-ledger.sqlite"
    log = tmp_path / "watch.log"
    names = [f"exp{i}.fits" for i in range(6)]

    # A file still being written (not whole FITS blocks) is not taken.
    partial = incoming / names[0]
    partial.write_bytes(b"SIMPLE  =" + b" " * 100)
    watcher = _start_watcher(incoming, config_file, log)
    _tiny_exposure(incoming / names[1])
    _wait_released(ledger, 1, watcher, log)
    fits.PrimaryHDU().writeto(partial, overwrite=True)            # now complete
    _tiny_exposure(incoming / names[2])
    _wait_released(ledger, 3, watcher, log)
    _tiny_exposure(incoming / names[3])
    _wait_intent(ledger, names[3], watcher, log)                   # then kill it mid-submission
    os.killpg(watcher.pid, signal.SIGKILL)
    watcher.wait()
    _tiny_exposure(incoming / names[4])

    watcher = _start_watcher(incoming, config_file, log)
    _tiny_exposure(incoming / names[5])
    _wait_released(ledger, 6, watcher, log)
    time.sleep(1.0)                                                # a few more scans: nothing new
    os.killpg(watcher.pid, signal.SIGTERM)
    watcher.wait()

    with sqlite3.connect(ledger) as db:
        rows = db.execute("SELECT exposure, state, array_job_id, summary_job_id FROM submissions").fetchall()
    assert sorted(Path(r[0]).name for r in rows) == names
    assert {r[1] for r in rows} == {"released"}
    wait_for_jobs([i for r in rows for i in r[2:]], JOB_TIMEOUT_S)
    job_name_list = [n for name in names for n in job_names(exposure_key(incoming / name))]
    runs = _runs(job_name_list, local_slurm.jobcomp)
    assert set(runs) == {(n, 0 if "quadrants" in n else None) for n in job_name_list}
    assert set(runs.values()) == {1}                               # every exposure ran exactly once


def test_local_slurm_refuses_a_config_it_did_not_write(tmp_path):
    foreign = tmp_path / "slurm.conf"
    foreign.write_text("ClusterName=production\nSlurmctldHost=head01\n")
    env = {**os.environ, "SKYDIFF_SLURM_CONF": str(foreign), "SKYDIFF_SLURM_STATE": str(tmp_path / "state")}
    for action in ("start", "stop"):
        proc = subprocess.run(["bash", str(SCRIPT), action], capture_output=True, text=True, env=env, timeout=30)
        assert proc.returncode == 1
        assert "not written by this script" in proc.stderr
    assert foreign.read_text() == "ClusterName=production\nSlurmctldHost=head01\n"
    assert not (tmp_path / "state").exists()
