"""Crash and concurrency safety, with real HDF5 files and real processes, against truth.

No correctness may rest on a lock (tasks on several nodes share the file system, where
``flock`` is not dependable): appends and seeding take none, and are run here concurrently
from several processes; the one-at-a-time fold races with re-appends and new appends while a
reader checks every committed epoch is visible exactly once; folds and appenders are killed
with SIGKILL at chosen and at random points and the next fold recovers.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import time

import h5py
import numpy as np
import pytest

from _cli import run_skydiff
from pipeline.matchfile import store
from pipeline.matchfile.index import INDEX_NAME, FootprintIndex
from pipeline.matchfile.layout import CLAIM_MARK, shard_dir
from pipeline.matchfile.lightcurves import MatchfileSnapshot
from pipeline.matchfile.store import (STALE_TEMPORARY_S, MatchfileConfig, append_epoch, combine, create_matchfile,
                                      fold, fold_root, pending_shards)
from pipeline.simulate.matchfile_truth import synthetic_epoch, synthetic_sky
from pipeline.core.refraction import site_location

FORK = multiprocessing.get_context("fork")


def _mjd(expid: int, version: int = 0) -> float:
    """The obsmjd of an expid's ``version``-th append: the exposure row's mjd tells versions apart."""
    return 60010.0 + 0.01 * expid + 1e-5 * version


def _append(path, sky, location, expid: int, version: int = 0) -> None:
    meta, table = synthetic_epoch(sky, expid, _mjd(expid, version))
    append_epoch(path, meta, table, location)


def _version_of(mjd: float, expid: int) -> int:
    return int(round((mjd - _mjd(expid)) / 1e-5))


def _view(path) -> dict[int, int]:
    """What a reader sees, checked whole: {expid: version}.

    Every epoch exactly once: one exposure row per expid, no (object, expid) pair twice, and
    each expid's photometry rows as many as its exposure row's nmatched.
    """
    snap = MatchfileSnapshot(path)
    expids = snap.exposures["expid"].tolist()
    assert len(expids) == len(set(expids)), "an exposure row twice"
    table = snap.lightcurve_table(np.arange(len(snap.ids)))
    pairs = np.stack([np.asarray(table["oid"]), np.asarray(table["expid"])], axis=1)
    assert len(np.unique(pairs, axis=0)) == len(pairs), "a detection twice"
    rows = dict(zip(*[a.tolist() for a in np.unique(np.asarray(table["expid"]), return_counts=True)]))
    for expid, nmatched in zip(expids, snap.exposures["nmatched"].tolist()):
        assert rows.get(expid, 0) == nmatched > 0, f"expid {expid}: {rows.get(expid, 0)} rows, nmatched {nmatched}"
    assert set(rows) <= set(expids)
    snap.h5.close()
    return {e: _version_of(m, e) for e, m in zip(expids, snap.exposures["mjd"].tolist())}


def _wal(path) -> list[str]:
    return sorted(p.name for p in shard_dir(path).iterdir())


def _drain(receiver, into: dict) -> None:
    """Collect (expid, version) reports; a report arrives only once its epoch is committed."""
    while receiver.poll():
        try:
            expid, version = receiver.recv()
        except EOFError:
            return
        into[expid] = max(version, into.get(expid, -1))


@pytest.fixture
def seeded(tmp_path, cfg):
    sky = synthetic_sky(600, 200.0, 50.0, seed=11)
    path, location = create_matchfile(tmp_path, sky.reference, sky.meta), site_location(cfg.site)
    # A first epoch from this process warms astropy's caches, which the forked children inherit.
    _append(path, sky, location, 1)
    return path, sky, location


def _append_loop(path, sky, location, expids, version, fold_every, conn):
    for n, expid in enumerate(expids, 1):
        _append(path, sky, location, expid, version)
        conn.send((expid, version))          # reported only once committed
        if fold_every and n % fold_every == 0:
            fold(path, everything=True)
    conn.close()


def _start(target, *args):
    receiver, sender = FORK.Pipe(duplex=False)
    child = FORK.Process(target=target, args=(*args, sender))
    child.start()
    sender.close()
    return child, receiver


def test_sigkill_of_appends_and_folds_at_random_instants_keeps_committed_epochs(seeded):
    """A child appending and folding every 3 appends, killed at random: nothing committed is lost."""
    path, sky, location = seeded
    rng = np.random.default_rng(7)
    committed: dict[int, int] = {1: 0}
    next_expid = 100
    for _ in range(5):
        child, receiver = _start(_append_loop, path, sky, location, range(next_expid, next_expid + 200), 0, 3)
        assert receiver.poll(60)                 # running: kill it at a random instant from here
        time.sleep(rng.uniform(0.0, 0.8))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        _drain(receiver, committed)
        receiver.close()
        assert set(committed) <= set(_view(path))
        next_expid += 200
    assert len(committed) >= 10
    combine(path)
    # Killed appenders' temporary files stay until they are old (a fold cannot tell them
    # from a live writer's on another node); they are hidden from readers.
    assert set(committed) <= set(_view(path))
    assert all(n.startswith(".") and ".tmp-" in n for n in _wal(path))


def test_concurrent_appends_without_any_lock_keep_every_epoch_once(seeded):
    """Three processes append at once, one of them re-appending the others' exposures: no lock
    file is ever made, and every epoch is there once, at its last version."""
    path, sky, location = seeded
    runs = [_start(_append_loop, path, sky, location, range(first, first + 8), 0, 0) for first in (1000, 2000)]
    runs.append(_start(_append_loop, path, sky, location, list(range(1000, 1008, 2)), 1, 0))
    committed: dict[int, int] = {1: 0}
    for child, receiver in runs:
        child.join(timeout=180)
        assert child.exitcode == 0
        _drain(receiver, committed)
    assert not path.with_name(path.name + ".lock").exists()
    seen = _view(path)
    assert set(seen) == set(committed) == {1} | set(range(1000, 1008)) | set(range(2000, 2008))
    # A re-append and the first append of an expid race: whichever renamed last is seen.
    assert all(seen[e] in (0, 1) for e in range(1000, 1008, 2))
    combine(path)
    assert _view(path) == seen and _wal(path) == []


def _fold_loop(path, stop, conn):
    # A slow fold (a loaded file system): the time between reading the shards and deleting
    # what it folded is when a re-append must not be lost.
    store._FOLD_HOOK = lambda stage: time.sleep(0.05) if stage == "written" else None
    folds = 0
    while not stop.is_set():
        folds += fold(path, everything=True) > 0
    conn.send((folds, 0))
    conn.close()


def test_fold_racing_with_reappends_and_new_appends_loses_and_duplicates_nothing(seeded):
    """A fold loop races with one process appending new exposures and one re-appending old
    ones; a reader checks, all along, that every committed epoch is visible exactly once and
    never at a version older than one already committed."""
    path, sky, location = seeded
    old = [2, 3, 4]
    for expid in old:
        _append(path, sky, location, expid)
    combine(path)

    def reappend_loop(path, sky, location, conn):
        for version in range(1, 11):
            for expid in old:
                _append(path, sky, location, expid, version)
                conn.send((expid, version))
        conn.close()

    stop = FORK.Event()
    folder, fold_pipe = _start(_fold_loop, path, stop)
    appender, append_pipe = _start(_append_loop, path, sky, location, range(300, 325), 0, 0)
    reappender, reappend_pipe = _start(reappend_loop, path, sky, location)
    children = (appender, reappender, folder)
    committed = {1: 0, **{e: 0 for e in old}}
    checks = 0
    try:
        while appender.is_alive() or reappender.is_alive() or checks < 5:
            _drain(append_pipe, committed)
            _drain(reappend_pipe, committed)
            known = dict(committed)
            seen = _view(path)
            missing = set(known) - set(seen)
            assert not missing, f"committed epochs not visible: {sorted(missing)}"
            stale = {e: (seen[e], v) for e, v in known.items() if seen[e] < v}
            assert not stale, f"older versions visible after newer ones were committed: {stale}"
            checks += 1
        stop.set()
        for child in children:
            child.join(timeout=180)
            assert child.exitcode == 0
    finally:
        stop.set()
        for child in children:          # a failed check must not leave the writers running
            if child.is_alive():
                child.kill()
                child.join()
    _drain(append_pipe, committed)
    _drain(reappend_pipe, committed)
    folds = fold_pipe.recv()[0]
    assert folds >= 2 and checks >= 5          # the fold really raced with the writers
    combine(path)
    final = _view(path)
    assert final == committed                   # every epoch once, each at its last version
    assert _wal(path) == []


def test_a_shard_folded_while_the_reader_opens_it_is_read_again(seeded, monkeypatch):
    """HDF5 reports a file that goes between its open and its stat as a bare OSError ("can't
    retrieve stat info for file", seen once in the racing test above): the reader must take it
    for a shard claimed by a fold and read the matchfile again, not fail."""
    path, sky, location = seeded
    for expid in (2, 3):
        _append(path, sky, location, expid)
    assert len(pending_shards(path)) == 3
    original, raced = h5py.File, []

    def racing_open(name, *args, **kwargs):
        if not raced and os.path.dirname(os.fspath(name)) == os.fspath(shard_dir(path)):
            raced.append(name)
            fold(path, everything=True)          # the shard is claimed and folded meanwhile
            raise OSError("Unable to synchronously open file (can't retrieve stat info for file)")
        return original(name, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", racing_open)
    assert _view(path) == {1: 0, 2: 0, 3: 0}
    assert raced and not pending_shards(path)


def _kill_at(stage: str, occurrence: int):
    seen = {"n": 0}

    def hook(name):
        if name == stage:
            seen["n"] += 1
            if seen["n"] == occurrence:
                os.kill(os.getpid(), signal.SIGKILL)
    return hook


def _fold_killed_at(path, stage, occurrence, conn):
    store._FOLD_HOOK = _kill_at(stage, occurrence)
    fold(path, everything=True)
    conn.close()                                 # not reached: killed inside


@pytest.mark.parametrize("stage,occurrence,claims_left", [("claimed", 1, 1), ("claimed", 4, 4), ("written", 1, 6),
                                                         ("deleted", 2, 4)])
def test_a_fold_killed_mid_way_is_recovered_by_the_next(seeded, stage, occurrence, claims_left):
    path, sky, location = seeded
    for expid in range(10, 15):
        _append(path, sky, location, expid)
    before = _view(path)
    child, receiver = _start(_fold_killed_at, path, stage, occurrence)
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL
    claims = [n for n in _wal(path) if CLAIM_MARK in n]
    assert len(claims) == claims_left
    assert _view(path) == before                 # every epoch still seen once, at its version
    # A re-append while claims are pending: the new shard wins over the claimed one...
    claimed_key = int(claims[0].split(".")[0])
    _append(path, sky, location, claimed_key, 1)
    expected = {**before, claimed_key: 1}
    assert _view(path) == expected
    # ...and the next fold adopts the claims (whatever the threshold), drops the superseded
    # one and folds the new shard: one shard per expid still pending.
    pending = {name.split(".")[0] for name in _wal(path)}
    assert fold(path, MatchfileConfig(combine_threshold=100)) == len(pending)
    assert _wal(path) == []
    assert _view(path) == expected


def _seed_racing(root, sky, barrier, conn):
    real_link = os.link

    def link_after_everyone_wrote(source, target):
        barrier.wait(timeout=60)                # every seeder has its whole file written by now
        return real_link(source, target)

    os.link = link_after_everyone_wrote
    made = []
    original = store._seed_exclusively

    def recording(path, fill):
        made.append(original(path, fill))
        return made[-1]

    store._seed_exclusively = recording
    path = create_matchfile(root, sky.reference, sky.meta)
    conn.send((int(made[0]), os.stat(path).st_ino))
    conn.close()


def test_concurrent_seeding_yields_one_valid_file(tmp_path):
    sky = synthetic_sky(400, 30.0, -20.0, seed=4)
    barrier = FORK.Barrier(4)
    runs = [_start(_seed_racing, tmp_path, sky, barrier) for _ in range(4)]
    results = []
    for child, receiver in runs:
        child.join(timeout=120)
        assert child.exitcode == 0
        results.append(receiver.recv())
    assert sorted(made for made, _ in results) == [0, 0, 0, 1]        # exactly one seeder won
    assert len({inode for _, inode in results}) == 1                    # all use the winner's file
    (path,) = store.matchfiles_under(tmp_path)
    with h5py.File(path, "r") as h5:
        assert int(h5.attrs["refid"]) == sky.meta.refid and h5["sources/id"].shape == (400,)
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]   # no temporary left
    assert [p for p, _ in FootprintIndex(tmp_path).entries()] == [path]


def test_fold_step_threshold_claims_temporaries_and_index(seeded, cfg):
    path, sky, location = seeded
    root = path.parent.parent
    config = MatchfileConfig(combine_threshold=3)
    _append(path, sky, location, 2)
    assert fold(path, config) == 0 and len(pending_shards(path)) == 2        # below the threshold
    _append(path, sky, location, 3)
    # A temporary file of a live writer (young) is left alone; a killed writer's (old) is removed.
    young, old = shard_dir(path) / ".9.h5.tmp-young", shard_dir(path) / ".8.h5.tmp-old"
    young.write_bytes(b"partial")
    old.write_bytes(b"partial")
    os.utime(old, (time.time() - STALE_TEMPORARY_S - 60,) * 2)
    assert fold(path, config) == 3
    assert _wal(path) == [young.name] and set(_view(path)) == {1, 2, 3}
    # A claim left by a killed fold is folded whatever the threshold.
    _append(path, sky, location, 4)
    os.rename(shard_dir(path) / "4.h5", shard_dir(path) / f"4.h5{CLAIM_MARK}dead")
    assert fold(path, config) == 1 and set(_view(path)) == {1, 2, 3, 4}
    # The fold step over a root puts back an index entry a seeder on another node lost.
    (root / INDEX_NAME).write_text('{"version": 1, "files": {}}')
    _append(path, sky, location, 5)
    report = fold_root(root, config)
    assert report.folded == {} and report.indexed == 1                      # 1 shard < 3
    assert [p for p, _ in FootprintIndex(root).entries()] == [path]
    assert run_skydiff(["matchfile", "fold", "--root", str(root), "--all"], cfg) == 0
    assert pending_shards(path) == [] and set(_view(path)) == {1, 2, 3, 4, 5}
