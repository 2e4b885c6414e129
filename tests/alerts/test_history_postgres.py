"""The object history on a real PostgreSQL server (the ``postgres`` fixture) against the SQLite store.

The simulated survey of :func:`pipeline.simulate.history.survey_images` (persistent sources on
overlapping pointings, several epochs, one-off transients) is associated through both stores:
the same objects, names, ``prv_candidates``, ``ndethist``, ``ncovhist``.  Processes writing
overlapping images at once leave no two objects within 1.5", no candid twice and names without
gaps or duplicates, grouped as the sequential run groups them; announced first (as ``skydiff
submit`` announces), they associate in time order and every alert's history equals the
sequential run's.  ``skydiff history migrate``
copies a SQLite history idempotently, and names continue its counters.  A server that is down
is a clear error naming the URL without its password (exit 75), never a traceback.
"""
from __future__ import annotations

import multiprocessing
import sqlite3
import subprocess
import sys

import numpy as np
import psycopg
import pytest

from alerts.history import HistoryError, PendingImage, SQLiteHistoryStore, open_history_store
from alerts.history_postgres import (SCHEMA_VERSION, HistoryUnavailableError, PostgresHistoryStore,
                                     migrate_sqlite)
from alerts.ids import object_id
from alerts.packet import make_alerts
from pipeline.core.config import HistoryConfig, load_config
from pipeline.core.exits import EXIT_RETRY, UsageError
from pipeline.simulate.history import survey_images
from _cli import run_skydiff
from _sky import close_pairs

PUBLISHER = "ZTF (skydiff)"
TABLES = {"objects": "object_id", "detections": "candid", "images": "pid", "image_cells": "hpix, pid",
          "id_counters": "year"}


def _summary(alerts: list[dict]) -> list[tuple]:
    """What the history gives each alert, comparable across stores."""
    return [(a["candid"], a["objectId"], a["candidate"]["ndethist"], a["candidate"]["ncovhist"],
             a["candidate"]["jdstarthist"], a["candidate"]["jdendhist"],
             [(p["candid"], p["pid"], p["jd"], p.get("magpsf"), p["diffmaglim"]) for p in a["prv_candidates"]],
             [p.avro for p in a["prv_candidates"]])
            for a in alerts]


def _associate(store, images) -> list[list[tuple]]:
    return [_summary(make_alerts(image.context, image.candidates, None, store, PUBLISHER)) for image in images]


def _groups(summaries) -> set[frozenset]:
    """The partition of candids into objects (names left out: they may be minted in another order)."""
    members: dict[str, set] = {}
    for image in summaries:
        for candid, name, *_ in image:
            members.setdefault(name, set()).add(candid)
    return {frozenset(m) for m in members.values()}


def _rows(url: str, table: str) -> set[tuple]:
    with psycopg.connect(url) as db:
        return {tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                for row in db.execute(f"SELECT * FROM {table}").fetchall()}


def _sqlite_rows(path, table: str) -> set[tuple]:
    with sqlite3.connect(path) as db:
        return set(db.execute(f"SELECT * FROM {table}").fetchall())


@pytest.fixture(scope="module")
def survey():
    return survey_images()


def test_postgres_associates_as_sqlite_does(postgres, survey, tmp_path):
    with SQLiteHistoryStore(tmp_path / "history.sqlite") as lite:
        expected = _associate(lite, survey)
    url = postgres.new_database()
    with open_history_store(HistoryConfig(url=url), tmp_path / "unused.sqlite", "ztf") as store:
        assert isinstance(store, PostgresHistoryStore)
        got = _associate(store, survey)
        # A rerun of an image adds nothing and gives the same answer.
        assert _associate(store, survey[3:4]) == [got[3]]
    assert not (tmp_path / "unused.sqlite").exists()
    assert got == expected
    # The association is right, not only alike: one object per true source, none shared.
    truth: dict[int, set] = {}
    for image, summary in zip(survey, got):
        for source, (_, name, *_) in zip(image.source, summary):
            truth.setdefault(int(source) if source >= 0 else name, set()).add(name)
    assert all(len(names) == 1 for names in truth.values())
    assert len({n for names in truth.values() for n in names}) == len(truth)
    # Histories hold earlier epochs; the late epoch (45 days on) only its own other pointing's.
    assert any(entry[6] for entry in got[4])
    assert all(p[2] > survey[-1].context.jd - 1 for entry in got[-1] for p in entry[6])
    with psycopg.connect(url) as db:
        assert db.execute("SELECT max(version) FROM skydiff_schema").fetchone()[0] == SCHEMA_VERSION


def _canonical(summaries) -> list[list[tuple]]:
    """Summaries with each object named by its first candid (minting order aside)."""
    first: dict[str, int] = {}
    for image in summaries:
        for candid, name, *_ in image:
            first[name] = min(first.get(name, candid), candid)
    return [[(candid, first[name], *rest) for candid, name, *rest in image] for image in summaries]


def _pending(image) -> PendingImage:
    return PendingImage(image.context.pid, image.context.jd, image.context.footprint)


def _write_in_process(url: str, images, queue) -> None:
    try:
        with PostgresHistoryStore(url) as store:
            queue.put(_associate(store, images))
    except BaseException as exc:         # reported to the parent, which fails the test
        queue.put(repr(exc))


def test_concurrent_writers_on_overlapping_footprints(postgres, tmp_path):
    # Four pointings, each overlapping the next by half a quadrant; one process per pointing.
    images = survey_images(n_sources=400, pointings=4, epochs=(0.0, 1.0, 2.0, 3.0), transients_per_image=5,
                           scatter_arcsec=0.1, seed=3)
    with SQLiteHistoryStore(tmp_path / "sequential.sqlite") as lite:
        sequential = _associate(lite, images)
    url = postgres.new_database()
    with PostgresHistoryStore(url) as store:   # the schema, once, before the writers race
        # Announced in time order, as skydiff submit announces exposures.
        assert store.announce([_pending(image) for image in images]) == len(images)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = [context.Process(target=_write_in_process, args=(url, images[k::4], queue)) for k in range(4)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=300) for _ in workers]
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    assert all(isinstance(r, list) for r in results), results
    concurrent = [image for result in results for image in result]
    with psycopg.connect(url) as db:
        names = [r[0] for r in db.execute("SELECT object_id FROM objects")]
        ra, dec = np.array(db.execute("SELECT ra, dec FROM objects ORDER BY object_id").fetchall()).T
        n_det, n_candid = db.execute("SELECT count(*), count(DISTINCT candid) FROM detections").fetchone()
        counter = db.execute("SELECT next_serial FROM id_counters WHERE year = 2026").fetchone()[0]
    submitted = [entry[0] for image in concurrent for entry in image]
    assert n_det == n_candid == len(submitted) == len(set(submitted))
    # Names: exactly the first N of the year's sequence, each once.
    assert sorted(names) == sorted(object_id("ztf", 2026, k) for k in range(counter)) and len(names) == counter
    # No two objects within the match radius.
    assert not close_pairs(ra, dec)
    # Announced images wait for the earlier overlapping ones: the same grouping and every
    # alert's history (prv_candidates, ndethist, ncovhist, jdstarthist) as the sequential run.
    assert _groups(concurrent) == _groups(sequential)
    by_pid = dict(zip((image.context.pid for k in range(4) for image in images[k::4]), concurrent))
    assert _canonical([by_pid[image.context.pid] for image in images]) == _canonical(sequential)
    with psycopg.connect(url) as db:
        assert db.execute("SELECT count(*) FROM pending_images").fetchone()[0] == 0
        assert db.execute("SELECT count(*) FROM pending_cells").fetchone()[0] == 0


def test_migrate_copies_sqlite_idempotently_and_names_continue(postgres, survey, tmp_path):
    sqlite_path = tmp_path / "history.sqlite"
    with SQLiteHistoryStore(sqlite_path) as lite:
        _associate(lite, survey[:8])
    url = postgres.new_database()
    cfg = load_config()
    assert run_skydiff(["history", "migrate", str(sqlite_path), "--to", url], cfg) == 0
    for table in TABLES:
        assert _rows(url, table) == _sqlite_rows(sqlite_path, table), table
    again = migrate_sqlite(sqlite_path, url)
    assert all(added == 0 for _, added in again.values()) and again["detections"][0] > 0
    # Both go on with the same images: same names (the counters came over), same histories.
    with SQLiteHistoryStore(sqlite_path) as lite:
        expected = _associate(lite, survey[8:])
    with PostgresHistoryStore(url) as store:
        assert _associate(store, survey[8:]) == expected
    # Into a database holding another history: refused (names would collide).
    other = postgres.new_database()
    with PostgresHistoryStore(other) as store:
        _associate(store, survey[-1:])
    with pytest.raises(UsageError, match="another history"):
        migrate_sqlite(sqlite_path, other)


def test_server_down_or_refusing_is_a_clear_error(postgres, tmp_path):
    dead = postgres.url(port=1)
    with pytest.raises(HistoryUnavailableError) as down:
        PostgresHistoryStore(dead, connect_timeout_s=2)
    assert down.value.exit_status == EXIT_RETRY
    assert "postgresql://skydiff:***@127.0.0.1:1/skydiff" in str(down.value)
    assert postgres.password not in str(down.value)
    with pytest.raises(HistoryError) as refused:
        PostgresHistoryStore(postgres.url(password="not-the-password"))
    assert refused.value.exit_status == 1 and "not-the-password" not in str(refused.value)
    # The command line: the README's status, one line naming the URL, no traceback, no password.
    sqlite_path = tmp_path / "history.sqlite"
    SQLiteHistoryStore(sqlite_path).close()
    config = tmp_path / "skydiff.toml"
    config.write_text(f'[history]\nurl = "{dead}"\nconnect_timeout_s = 2.0\n')
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "history", "migrate", str(sqlite_path),
                           "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == EXIT_RETRY, proc.stderr
    assert "postgresql://skydiff:***@127.0.0.1:1/skydiff" in proc.stderr
    assert "Traceback" not in proc.stderr and postgres.password not in proc.stderr + proc.stdout
