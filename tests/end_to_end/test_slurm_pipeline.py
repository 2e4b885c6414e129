"""The real pipeline on the real test Slurm cluster (slurm/local-slurm.sh: two compute nodes, each in
its own network namespace), checked on its products.

The simulated survey of tests/_survey.py (one field, quadrant 21: a reference season solved through
``skydiff quadrant`` and coadded, three science exposures) is shared by the tests; each test
has its own outputs, spool, alert history and matchfiles (catalogs and references shared), so
the same exposure can be processed afresh in each.  The Slurm tasks keep the object history in
a real PostgreSQL server listening on the cluster's bridge (``[history] url``, a database per
test), which the nodes reach over TCP as a cluster's nodes reach a database server, and publish
to a real broker there; the local executor they are compared with keeps it in SQLite.

- ``skydiff submit`` runs real ``skydiff quadrant`` array tasks and the real
  ``skydiff exposure-summary`` follow-up; every product is checked and equals the local
  executor's (``skydiff exposure``) in another outputs root.
- ``skydiff watch`` SIGKILLed mid-stream and restarted, alerts going to a real broker on
  loopback: every exposure runs once, no candid twice on the broker or in the spool, no
  (object, exposure) row twice in the matchfile.
- A task that asks for a retry (exit 75) on its first attempt is requeued by Slurm and the
  real command's products are complete, its status counting one run.
- The three science exposures of one field, submitted at once in time order, run at the same
  time on both nodes: the same objects, packets (``prv_candidates``, ``ndethist``, ``fp_hists``)
  and matchfile rows as the local executor running them one after another.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import fastavro
import numpy as np
import psycopg
import pytest
from astropy.io import fits
from astropy.table import Table
from confluent_kafka import Consumer

from alerts.spool import DELIVERED, PENDING, Spool
from pipeline.bench.postgres import PostgresServer
from pipeline.core.config import config_to_toml
from pipeline.formats.exposure import write_exposure_mef
from pipeline.bench.compare import compare_exposure_outputs
from pipeline.core.image import read_quadrant
from pipeline.matchfile.lightcurves import lightcurve
from pipeline.matchfile.store import pending_shards
from slurm.jobs import completed_tasks, wait_for_jobs
from slurm.submit import exposure_key, job_names, skydiff_executable, submit_exposure
from _sky import close_pairs
from _survey import RCID
from kafka_broker import KafkaBroker
from slurm_cluster import start_local_slurm

pytestmark = pytest.mark.timeout(900)

JOB_TIMEOUT_S = 400
PRODUCTS = ("qa.json", "candidates.ecsv", "cutouts.fits", "diff.fits")

# The array task of the retry test: asks for a retry (exit 75) on its first attempt only,
# then runs the real command it is given.
RETRY_ONCE_TASK = """#!/bin/bash
echo "${SLURM_RESTART_COUNT:-0}" >> "$1"
shift
[ "${SLURM_RESTART_COUNT:-0}" = 0 ] && exit 75
exec "$@"
"""


@pytest.fixture(scope="module")
def local_slurm():
    cluster = start_local_slurm()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def cluster_postgres(local_slurm):
    """A PostgreSQL server on the cluster's bridge address, where the nodes' tasks reach it."""
    server = PostgresServer(host=local_slurm.host_address).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def survey(survey21):
    """Base configuration (catalogs and reference in place) and the science exposure folders."""
    return survey21.cfg, [survey21.exposures[e] for e in survey21.science]


def _run_config(cfg, run: Path, history_url: str = "", **kafka):
    """The survey's configuration with this run's own outputs, spool, history (in PostgreSQL at
    ``history_url``, else SQLite) and matchfiles."""
    run.mkdir(parents=True, exist_ok=True)
    return cfg.replace(paths__outputs=str(run / "outputs"), paths__spool=str(run / "spool"),
                       paths__history=str(run / "history" / "objects.sqlite"), history__url=history_url,
                       paths__matchfiles=str(run / "matchfiles"),
                       **{f"kafka__{k}": v for k, v in kafka.items()})


def _write_config(cfg, path: Path) -> Path:
    path.write_text(config_to_toml(cfg, hide_secrets=False))     # the tasks need the database password
    return path


def _history_detections(cfg) -> list[int]:
    """Candids the run's PostgreSQL history holds (and no SQLite file was made beside it)."""
    assert not cfg.paths.resolve("history").exists()
    with psycopg.connect(cfg.history.url) as db:
        return [row[0] for row in db.execute("SELECT candid FROM detections")]


def _expid(exposure: Path) -> int:
    return read_quadrant(next(exposure.glob("*.fits"))).meta.expid


def _quadrant_folder(cfg, expid: int) -> Path:
    return cfg.paths.resolve("outputs") / str(expid) / f"{RCID:02d}"


def _status(cfg, expid: int) -> dict:
    return json.loads((_quadrant_folder(cfg, expid) / "status.json").read_text())


def _candidates(cfg, expid: int) -> Table:
    return Table.read(_quadrant_folder(cfg, expid) / "subtraction" / "candidates.ecsv")


def _spooled(cfg, state: str) -> list[int]:
    return [entry.candid for entry in Spool(cfg.paths.resolve("spool"), fsync=False).entries(state)]


def _matchfile_rows(cfg, exposure: Path) -> Table:
    """Every light-curve row of the quadrant (a cone covering it from its nominal centre)."""
    raw = read_quadrant(next(exposure.glob("*.fits")))
    ra, dec = raw.wcs.all_pix2world([1536.0], [1540.0], 1)
    return lightcurve(float(ra[0]), float(dec[0]), 3600.0, cfg.paths.resolve("matchfiles"))


def _check_products(cfg, expid: int) -> dict:
    """A finished quadrant with every product on disk, its alerts spooled and its matchfile epoch; its status."""
    status = _status(cfg, expid)
    assert status["state"] == "finished" and status["exit_code"] == 0, status
    folder = _quadrant_folder(cfg, expid)
    for name in PRODUCTS:
        assert (folder / "subtraction" / name).is_file(), name
    assert status["subtraction"]["n_candidates"] == len(_candidates(cfg, expid)) > 0
    assert status["alerts"]["built"] > 0 and status["alerts"]["unacknowledged"] == 0
    assert status["matchfile"]["matched"] > 1000
    return status


def _skydiff(*args, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([skydiff_executable(), *args, "--config", str(config)], capture_output=True, text=True,
                          timeout=JOB_TIMEOUT_S)


def test_submit_runs_every_stage_and_equals_the_local_executor(local_slurm, cluster_postgres, survey, tmp_path):
    base, science = survey
    exposure = science[0]
    expid = _expid(exposure)
    on_slurm = _run_config(base, tmp_path / "slurm", history_url=cluster_postgres.new_database())
    local = _run_config(base, tmp_path / "local")
    # The local executor runs beside the Slurm task (one core each).
    local_run = subprocess.Popen([skydiff_executable(), "exposure", str(exposure), "--jobs", "1", "--config",
                                  str(_write_config(local, tmp_path / "local.toml"))],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    submitted = _skydiff("submit", str(exposure), config=_write_config(on_slurm, tmp_path / "slurm.toml"))
    assert submitted.returncode == 0, submitted.stderr
    # "array job A (1 quadrants), summary job S, fold job F; logs in ..."
    words = submitted.stdout.replace(",", " ").replace(";", " ").split()
    array_id, summary_id, fold_id = (int(words[words.index(kind) + 2]) for kind in ("array", "summary", "fold"))
    wait_for_jobs([array_id, summary_id, fold_id], JOB_TIMEOUT_S)
    out, err = local_run.communicate(timeout=JOB_TIMEOUT_S)
    assert local_run.returncode == 0, err
    assert f"exposure {expid}" in out and "1 finished" in out

    tasks = completed_tasks(local_slurm.jobcomp, job_ids=[array_id, summary_id])
    assert [(t.array_task, t.state) for t in tasks] == [(RCID, "COMPLETED"), (None, "COMPLETED")]
    status = _check_products(on_slurm, expid)
    assert status["attempt"] == 1
    # The task read the configuration written for it: its products went to this run's roots.
    assert (on_slurm.paths.resolve("outputs") / "slurm" / exposure_key(exposure) / "config.toml").is_file()
    candids = _spooled(on_slurm, PENDING)
    assert len(candids) == len(set(candids)) == status["alerts"]["built"]
    assert sorted(_history_detections(on_slurm)) == sorted(candids)
    rows = _matchfile_rows(on_slurm, exposure)
    assert np.count_nonzero(rows["expid"] == expid) == status["matchfile"]["matched"]
    summary = json.loads((on_slurm.paths.resolve("outputs") / str(expid) / "summary.json").read_text())
    assert summary["counts"] == {"finished": 1} and summary["reprocess"] == []
    assert summary["alerts"] == status["alerts"]["built"]

    # The same products as the local executor's: status, candidates, images pixel for pixel,
    # alert packets byte for byte (object names up to a consistent renaming), matchfile rows.
    _check_products(local, expid)
    comparison = compare_exposure_outputs(local, on_slurm, expid, [RCID])
    assert comparison["identical"], comparison["differences"]
    assert comparison["alerts"] == len(candids) and comparison["matchfile_rows"] >= status["matchfile"]["matched"]
    # ... and the comparison does see a difference: one candidate's magnitude and one pixel.
    table_path = _quadrant_folder(local, expid) / "subtraction" / "candidates.ecsv"
    table = Table.read(table_path)
    table["magpsf"][0] += 1e-6
    table.write(table_path, overwrite=True)
    with fits.open(_quadrant_folder(local, expid) / "subtraction" / "diff.fits", mode="update") as hdul:
        hdul[0].data[100, 100] += 1.0
    differences = compare_exposure_outputs(local, on_slurm, expid, [RCID])["differences"]
    assert differences == ["rcid 21: candidates.ecsv column magpsf differs",
                           "rcid 21: diff.fits HDU 0 (PRIMARY) pixels differ"]


def _drop_folder(source: Path, incoming: Path, staging: Path) -> Path:
    """A folder exposure appearing at once (copied aside, then renamed in)."""
    shutil.copytree(source, staging / source.name)
    return Path(shutil.move(staging / source.name, incoming / source.name))


def _drop_mef(source: Path, incoming: Path, staging: Path) -> Path:
    mef = write_exposure_mef(sorted(source.glob("*.fits")), staging / f"{source.name}.fits")
    target = incoming / mef.name
    os.replace(mef, target)
    return target


def _start_watcher(incoming: Path, config: Path, log: Path) -> subprocess.Popen:
    argv = [skydiff_executable(), "watch", str(incoming), "--interval", "0.2", "--settle", "0.5",
            "--config", str(config)]
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _ledger_count(ledger: Path, where: str, args=()) -> int:
    if not ledger.exists():
        return 0
    try:
        with sqlite3.connect(ledger) as db:
            return db.execute(f"SELECT count(*) FROM submissions WHERE {where}", args).fetchone()[0]
    except sqlite3.OperationalError:      # the watcher has created the file but not yet its table
        return 0


def _wait_ledger(ledger: Path, where: str, args, count: int, watcher: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while _ledger_count(ledger, where, args) < count:
        assert watcher.poll() is None, f"watcher exited: {log.read_text()}"
        assert time.monotonic() < deadline, f"ledger never reached {count} rows {where}: {log.read_text()}"
        time.sleep(0.005)


def _consume(bootstrap: str, topics: list[str], expected: int, timeout_s: float = 60.0,
             linger_s: float = 3.0) -> list[int]:
    """Candids a fresh consumer group reads from the topics (lingering to catch any duplicate)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "slurm-pipeline-check",
                         "auto.offset.reset": "earliest", "session.timeout.ms": 6000,
                         "receive.message.max.bytes": 64 * 1024 * 1024})
    consumer.subscribe(topics)
    candids, deadline, done_at = [], time.monotonic() + timeout_s, None
    try:
        while time.monotonic() < deadline:
            if done_at is not None and time.monotonic() - done_at > linger_s:
                break
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            candids.append(int(next(fastavro.reader(io.BytesIO(msg.value())))["candid"]))
            if len(candids) >= expected and done_at is None:
                done_at = time.monotonic()
    finally:
        consumer.close()
    return candids


def test_watcher_killed_and_restarted_processes_each_exposure_once(local_slurm, cluster_postgres, survey, tmp_path):
    base, science = survey
    broker = KafkaBroker(tmp_path, host=local_slurm.host_address).start()
    try:
        cfg = _run_config(base, tmp_path / "run", history_url=cluster_postgres.new_database(),
                          bootstrap_servers=broker.bootstrap)
        config = _write_config(cfg, tmp_path / "skydiff.toml")
        incoming, staging = tmp_path / "incoming", tmp_path / "staging"
        incoming.mkdir()
        staging.mkdir()
        ledger = cfg.paths.resolve("outputs") / "slurm" / "watch-ledger.sqlite"
        log = tmp_path / "watch.log"

        watcher = _start_watcher(incoming, config, log)
        first = _drop_folder(science[1], incoming, staging)
        _wait_ledger(ledger, "state = 'released'", (), 1, watcher, log)
        second = _drop_mef(science[2], incoming, staging)
        _wait_ledger(ledger, "exposure = ?", (str(second),), 1, watcher, log)   # taken: kill it now
        os.killpg(watcher.pid, signal.SIGKILL)
        watcher.wait()
        third = _drop_mef(science[0], incoming, staging)                         # arrives while down
        watcher = _start_watcher(incoming, config, log)
        _wait_ledger(ledger, "state = 'released'", (), 3, watcher, log)
        time.sleep(1.0)                                                          # more scans: nothing new
        os.killpg(watcher.pid, signal.SIGTERM)
        watcher.wait()

        with sqlite3.connect(ledger) as db:
            rows = db.execute("SELECT exposure, state, array_job_id, summary_job_id FROM submissions").fetchall()
        assert sorted(Path(r[0]) for r in rows) == sorted([first, second, third])
        assert {r[1] for r in rows} == {"released"}
        wait_for_jobs([i for r in rows for i in r[2:]], JOB_TIMEOUT_S)

        # Slurm ran each exposure's quadrant and summary once.
        names = [n for e in (first, second, third) for n in job_names(exposure_key(e))]
        runs = Counter((t.name, t.array_task, t.state) for t in completed_tasks(local_slurm.jobcomp, names=names)
                       if t.state != "CANCELLED")
        assert runs == Counter({(n, RCID if "quadrants" in n else None, "COMPLETED"): 1 for n in names})

        built, topics = 0, set()
        for source in (science[1], science[2], science[0]):
            expid = _expid(source)
            status = _check_products(cfg, expid)
            assert status["attempt"] == 1
            assert status["alerts"]["already_delivered"] == 0
            built += status["alerts"]["built"]
            topics.add(status["alerts"]["topic"])
            summary = json.loads((cfg.paths.resolve("outputs") / str(expid) / "summary.json").read_text())
            assert summary["counts"] == {"finished": 1}

        # Every alert acknowledged once, read once from the broker.
        assert _spooled(cfg, PENDING) == []
        delivered = _spooled(cfg, DELIVERED)
        assert len(delivered) == len(set(delivered)) == built
        logged = [r.candid for r in Spool(cfg.paths.resolve("spool"), fsync=False).delivery_log()]
        assert sorted(logged) == sorted(delivered)
        assert sorted(_history_detections(cfg)) == sorted(delivered)
        on_broker = _consume(broker.bootstrap, sorted(topics), built)
        assert len(on_broker) == built and set(on_broker) == set(delivered)

        # One matchfile row per object and exposure, each exposure's epoch present.
        table = _matchfile_rows(cfg, science[0])
        pairs = Counter(zip(table["oid"].tolist(), table["expid"].tolist()))
        assert pairs and max(pairs.values()) == 1
        epochs = Counter(table["expid"].tolist())
        for source in (science[1], science[2], science[0]):
            expid = _expid(source)
            assert epochs[expid] == _status(cfg, expid)["matchfile"]["matched"]
    finally:
        broker.kill()


def test_task_asking_for_a_retry_is_requeued_and_completes(local_slurm, cluster_postgres, survey, tmp_path):
    base, science = survey
    exposure = science[0]
    expid = _expid(exposure)
    cfg = _run_config(base, tmp_path / "run", history_url=cluster_postgres.new_database()).replace(
        slurm__max_retries=1)
    attempts = tmp_path / "attempts.txt"
    task = tmp_path / "retry_once_task.sh"
    task.write_text(RETRY_ONCE_TASK)
    # The real task command, reading the configuration submit_exposure writes for the tasks.
    config_file = cfg.paths.resolve("outputs") / "slurm" / exposure_key(exposure) / "config.toml"
    result = submit_exposure(exposure, cfg, task_command=["bash", str(task), str(attempts), skydiff_executable(),
                                                          "quadrant", str(exposure), "--quadrant", "{rcid}",
                                                          "--config", str(config_file)])
    assert result.quadrants == (RCID,)
    wait_for_jobs([result.array_job_id, result.summary_job_id], JOB_TIMEOUT_S)

    tasks = completed_tasks(local_slurm.jobcomp, job_ids=[result.array_job_id])
    assert [(t.array_task, t.state, t.exit_code) for t in tasks] == [(RCID, "FAILED", 75), (RCID, "COMPLETED", 0)]
    assert attempts.read_text().split() == ["0", "1"]
    status = _check_products(cfg, expid)
    assert status["attempt"] == 1             # the real command ran once, on the retry
    candids = _spooled(cfg, PENDING)
    assert len(candids) == len(set(candids)) == status["alerts"]["built"]
    rows = _matchfile_rows(cfg, exposure)
    assert np.count_nonzero(rows["expid"] == expid) == status["matchfile"]["matched"]
    (summary_run,) = completed_tasks(local_slurm.jobcomp, job_ids=[result.summary_job_id])
    assert summary_run.state == "COMPLETED" and summary_run.start >= tasks[-1].end
    summary = json.loads((cfg.paths.resolve("outputs") / str(expid) / "summary.json").read_text())
    assert summary["counts"] == {"finished": 1} and summary["reprocess"] == []
    assert summary["quadrants"][0]["attempt"] == 1


def test_overlapping_exposures_on_two_nodes_associate_as_a_sequential_run(local_slurm, cluster_postgres, survey,
                                                                          tmp_path):
    base, science = survey
    expids = [_expid(e) for e in science]
    # Fold every pending epoch, so that each fold job has work and none is left.
    on_slurm = _run_config(base, tmp_path / "slurm", history_url=cluster_postgres.new_database()).replace(
        matchfile__combine_threshold=1)
    local = _run_config(base, tmp_path / "local")
    local_config = _write_config(local, tmp_path / "local.toml")
    # The sequential run: the local executor, one exposure after another, beside the cluster.
    sequential = subprocess.Popen(
        ["bash", "-c", " && ".join(f"'{skydiff_executable()}' exposure '{e}' --jobs 1 --config '{local_config}'"
                                   for e in science)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # All three submitted at once, in time order (as the watcher submits them).
    submitted = [submit_exposure(e, on_slurm) for e in science]
    jobs = [i for r in submitted for i in (r.array_job_id, r.summary_job_id, r.fold_job_id)]
    wait_for_jobs(jobs, JOB_TIMEOUT_S)
    out, err = sequential.communicate(timeout=3 * JOB_TIMEOUT_S)
    assert sequential.returncode == 0, err

    tasks = completed_tasks(local_slurm.jobcomp, job_ids=[r.array_job_id for r in submitted])
    assert [(t.array_task, t.state) for t in tasks] == [(RCID, "COMPLETED")] * 3
    # They ran on both nodes, and at the same time (each task's interval overlaps another's).
    assert {t.node for t in tasks} == set(local_slurm.nodes)
    assert all(any(o is not t and o.start <= t.end and t.start <= o.end for o in tasks) for t in tasks)
    statuses = [_check_products(on_slurm, expid) for expid in expids]
    with psycopg.connect(on_slurm.history.url) as db:
        assert db.execute("SELECT count(*) FROM pending_images").fetchone()[0] == 0
        n_det, n_candid = db.execute("SELECT count(*), count(DISTINCT candid) FROM detections").fetchone()
        ra, dec = np.array(db.execute("SELECT ra, dec FROM objects").fetchall()).T
        repeated = db.execute("SELECT count(DISTINCT object_id) FROM detections GROUP BY object_id "
                              "HAVING count(DISTINCT pid) > 1").fetchall()
    assert n_det == n_candid == sum(s["alerts"]["built"] for s in statuses)
    assert not close_pairs(ra, dec)
    assert len(repeated) > 10                   # objects seen on more than one exposure: a real test

    # The sequential run's products: every packet byte for byte (history included: the
    # objects up to a consistent renaming, prv_candidates, ndethist, ncovhist, fp_hists),
    # candidates, images and matchfile rows.
    for expid in expids:
        _check_products(local, expid)
        comparison = compare_exposure_outputs(local, on_slurm, expid, [RCID])
        assert comparison["identical"], comparison["differences"]
    table = _matchfile_rows(on_slurm, science[0])
    pairs = Counter(zip(table["oid"].tolist(), table["expid"].tolist()))
    assert pairs and max(pairs.values()) == 1
    assert {e: n for e, n in Counter(table["expid"].tolist()).items()} == \
        {expid: s["matchfile"]["matched"] for expid, s in zip(expids, statuses)}
    # The fold jobs (one at a time, whichever node) left every epoch in the main file: the
    # rows above were read from it.
    folds = completed_tasks(local_slurm.jobcomp, job_ids=[r.fold_job_id for r in submitted])
    assert [t.state for t in folds] == ["COMPLETED"] * 3
    matchfiles = list(on_slurm.paths.resolve("matchfiles").rglob("*.h5"))
    assert matchfiles and not [m for m in matchfiles if pending_shards(m)]
