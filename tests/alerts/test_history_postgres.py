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

The PostgreSQL store reads and writes in its own way (statements pipelined, rows inserted over
arrays, cells read as ranges, images left out in the server by their footprint cones, schema
version 3): on the benchmark's simulated survey it gives every candidate the SQLite store's
history, and a version-2 database is migrated to cones and goes on as if it had always had them.
"""
from __future__ import annotations

import json
import multiprocessing
import sqlite3
import subprocess
import sys

import astropy.units as u
import numpy as np
import psycopg
import pytest

from alerts.history import HistoryError, ImageRecord, PendingImage, SQLHistoryStore, SQLiteHistoryStore, \
    open_history_store
from alerts.history_postgres import (SCHEMA_VERSION, TABLE_COLUMNS, HistoryUnavailableError, PostgresHistoryStore,
                                     footprint_cones, migrate_sqlite)
from alerts.ids import make_candid, make_pid, object_id, split_candid
from pipeline.bench.history import fill_store
from alerts.packet import make_alerts
from pipeline.core.config import HistoryConfig, load_config
from pipeline.core.exits import EXIT_RETRY, UsageError
from pipeline.simulate.alerts import square_footprint
from pipeline.simulate.history import FillSpec, bench_images, survey_fill, survey_images
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
    """The rows of ``table`` in the columns both stores have (PostgreSQL's images also hold cones)."""
    with psycopg.connect(url) as db:
        return {tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
                for row in db.execute(f"SELECT {', '.join(TABLE_COLUMNS[table])} FROM {table}").fetchall()}


def _sqlite_rows(path, table: str) -> set[tuple]:
    with sqlite3.connect(path) as db:
        return set(db.execute(f"SELECT {', '.join(TABLE_COLUMNS[table])} FROM {table}").fetchall())


def _cones_hold_corners(url: str) -> int:
    """Checks every image's stored cone against its corners; the number of images."""
    with psycopg.connect(url) as db:
        rows = db.execute("SELECT corners, cone_x, cone_y, cone_z, cone_radius FROM images").fetchall()
    for corners, *cone in rows:
        assert tuple(cone) == footprint_cones([corners])[0]
        ra, dec = np.radians(np.array(json.loads(corners), float)).T
        vectors = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1)
        assert np.all(np.arccos(np.clip(vectors @ np.array(cone[:3]), -1, 1)) <= cone[3] + 1e-7)
    return len(rows)


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
    # The copied images got their footprint cones.
    assert _cones_hold_corners(url) == len(_sqlite_rows(sqlite_path, "images")) > 0
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


def _histories(histories) -> list[tuple]:
    """Everything a candidate's history holds, its entries with their Avro encodings."""
    return [(h.object_id, h.ndethist, h.ncovhist, h.jdstarthist, h.jdendhist, h.new_object,
             [(dict(p), p.avro) for p in h.prv_candidates]) for h in histories]


def _renumbered(images, first_expid: int) -> list[tuple]:
    """The benchmark's images as new exposures (pids and candids from ``first_expid`` on)."""
    out = []
    for k, (image, detections) in enumerate(images):
        expid, rcid = first_expid + k, image.rcid
        pid = make_pid(expid, rcid)
        dets = [dict(d, pid=pid, candid=make_candid(expid, rcid, split_candid(d["candid"])[2]), jd=d["jd"] + 0.5)
                for d in detections]
        out.append((ImageRecord(pid=pid, jd=image.jd + 0.5, field=image.field, rcid=rcid, footprint=image.footprint,
                                upper_limit=dict(image.upper_limit, pid=pid, jd=image.jd + 0.5)), dets))
    return out


def test_bench_survey_associates_as_sqlite_does_with_fewer_images_read(postgres, tmp_path):
    # The benchmark's survey, small: 20 tiles imaged 4 times, loaded in bulk into both stores.
    spec = FillSpec(objects=4_000, detections_per_object=4)
    url = postgres.new_database()
    fill_store(url, spec)
    with SQLiteHistoryStore(tmp_path / "history.sqlite") as lite:
        lite._begin()
        for table, rows in survey_fill(spec, lite.object_cells, lite.footprint_cells):
            columns = TABLE_COLUMNS[table]
            lite._execute_many(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                               rows)
        lite._commit()
    first = list(bench_images(spec, 8))
    # Then the same tiles again as later exposures: their new sources (named by the first
    # round) are known now, and each candidate's history holds the first round's detection.
    images = first + _renumbered(first, 250_000_000) + first[:1]     # the last: a rerun, adding nothing
    with SQLiteHistoryStore(tmp_path / "history.sqlite") as lite:
        expected = [_histories(lite.record_image(image, dets)) for image, dets in images]
    with PostgresHistoryStore(url) as store:
        got = [_histories(store.record_image(image, dets)) for image, dets in images]
        # The images query leaves out in the server most images listed in the candidates'
        # cells, those whose footprints cannot hold them.
        image, dets = images[-1]
        ra, dec = np.array([d["ra"] for d in dets]), np.array([d["dec"] for d in dets])
        cells = np.atleast_1d(store._images_hp.lonlat_to_healpix(ra * u.deg, dec * u.deg)).astype(np.int64)
        points = _unit(ra, dec)
        listed = store._query(*SQLHistoryStore._images_select(store, cells, points, image.jd))
        pruned = store._query(*store._images_select(cells, points, image.jd))
        store._rollback()
    assert got == expected
    assert sum(h[5] for image in got[:8] for h in image) == 8 * 60              # every new source minted once
    assert not any(h[5] for image in got[8:] for h in image)
    assert all(any(p[0].get("candid") for p in h[6]) for h in got[9])           # the first round in the history
    assert set(pruned) <= set(listed) and len(pruned) < len(listed) / 2
    assert _cones_hold_corners(url) == 20 * 4 + len(images) - 1


def _unit(ra, dec) -> np.ndarray:
    ra, dec = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=1)


def test_version_2_database_is_migrated_to_footprint_cones(postgres, survey, tmp_path):
    with SQLiteHistoryStore(tmp_path / "history.sqlite") as lite:
        expected = _associate(lite, survey)
    url = postgres.new_database()
    with PostgresHistoryStore(url) as store:
        first = _associate(store, survey[:6])
    # Made what a version-2 skydiff leaves: the images without cones, version 3 not applied.
    with psycopg.connect(url) as db:
        db.execute("ALTER TABLE images DROP COLUMN cone_x, DROP COLUMN cone_y, DROP COLUMN cone_z, "
                   "DROP COLUMN cone_radius")
        db.execute("DELETE FROM skydiff_schema WHERE version = 3")
    with PostgresHistoryStore(url) as store:
        rest = _associate(store, survey[6:])
    assert first + rest == expected
    with psycopg.connect(url) as db:
        assert db.execute("SELECT max(version) FROM skydiff_schema").fetchone()[0] == SCHEMA_VERSION == 3
    assert _cones_hold_corners(url) == len(survey)


def test_footprint_cones_hold_convex_footprints_only():
    square = [list(c) for c in square_footprint(150.0, 60.0)]
    (x, y, z, radius), = footprint_cones([json.dumps(square)])
    # Centred on the footprint, the radius reaching its farthest corner (about half the
    # diagonal of a 0.86 degree square).
    assert np.degrees(np.arctan2(y, x)) == pytest.approx(150.0) and np.degrees(np.arcsin(z)) == pytest.approx(60.0, abs=1e-2)
    corners = _unit(*np.array(square).T)
    assert radius == pytest.approx(np.max(np.arccos(corners @ np.array([x, y, z]))), abs=1e-7)
    assert np.degrees(radius) == pytest.approx(0.43 * np.sqrt(2), rel=1e-2)
    # Corners out of order (a bow tie) or repeated: no cone, so such an image is never left out.
    assert footprint_cones([json.dumps([square[0], square[2], square[1], square[3]]),
                            json.dumps([square[0], square[0], square[1], square[2]])]) == [None, None]
