"""Crash and concurrency safety: SIGKILL mid-append keeps every committed epoch; concurrent writers lose nothing."""
from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

from pipeline.matchfile.lightcurves import MatchfileSnapshot
from pipeline.matchfile.store import MatchfileConfig, append_epoch, create_matchfile
from pipeline.simulate.matchfile_truth import synthetic_epoch, synthetic_sky
from pipeline.core.refraction import site_location

FORK = multiprocessing.get_context("fork")
# Fold every 3 shards so that kills also land inside folds.
EAGER_FOLD = MatchfileConfig(combine_threshold=3, lock_timeout_s=60.0)


def _append_loop(path, sky, location, expids, conn):
    for expid in expids:
        meta, table = synthetic_epoch(sky, expid, 60000.0 + 0.01 * expid)
        append_epoch(path, meta, table, location, EAGER_FOLD)
        conn.send(expid)          # reported only once committed
    conn.close()


def _check_consistent(path, sky) -> set[int]:
    """Every epoch in the file is whole: its exposure row's nmatched equals its photometry rows."""
    snap = MatchfileSnapshot(path)
    table = snap.lightcurve_table(np.arange(len(snap.ids)))
    expids, rows = np.unique(np.asarray(table["expid"]), return_counts=True)
    per_epoch = dict(zip(expids.tolist(), rows.tolist()))
    for expid, nmatched in zip(snap.exposures["expid"].tolist(), snap.exposures["nmatched"].tolist()):
        assert per_epoch.get(expid, 0) == nmatched, expid
        meta, epoch = synthetic_epoch(sky, expid, 60000.0 + 0.01 * expid)
        assert nmatched > 0.9 * len(epoch)
    return set(snap.exposures["expid"].tolist())


@pytest.fixture
def seeded(tmp_path, cfg):
    sky = synthetic_sky(3000, 200.0, 50.0, seed=11)
    path, location = create_matchfile(tmp_path, sky.reference, sky.meta), site_location(cfg.site)
    # A first epoch from this process warms astropy's caches, which the forked writers inherit.
    append_epoch(path, *synthetic_epoch(sky, 1, 60000.01), location)
    return path, sky, location


def test_sigkill_mid_append_keeps_committed_epochs(seeded):
    path, sky, location = seeded
    rng = np.random.default_rng(7)
    committed: set[int] = set()
    next_expid = 100
    for trial in range(5):
        receiver, sender = FORK.Pipe(duplex=False)
        child = FORK.Process(target=_append_loop, args=(path, sky, location, range(next_expid, next_expid + 200),
                                                        sender))
        child.start()
        sender.close()
        assert receiver.poll(60)                 # running: kill it at a random instant from here
        time.sleep(rng.uniform(0.0, 0.8))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL
        while receiver.poll():
            try:
                committed.add(receiver.recv())
            except EOFError:
                break
        receiver.close()
        in_file = _check_consistent(path, sky)
        assert committed <= in_file
        next_expid += 200
    assert len(committed) >= 10       # the loops got far enough to fold several times


def test_two_writers_lose_nothing(seeded):
    path, sky, location = seeded
    pipes, children = [], []
    for first in (1000, 2000):
        receiver, sender = FORK.Pipe(duplex=False)
        child = FORK.Process(target=_append_loop, args=(path, sky, location, range(first, first + 7), sender))
        child.start()
        sender.close()
        pipes.append(receiver)
        children.append(child)
    reported = set()
    for receiver, child in zip(pipes, children):
        child.join(timeout=120)
        assert child.exitcode == 0
        while receiver.poll():
            try:
                reported.add(receiver.recv())
            except EOFError:
                break
    expected = set(range(1000, 1007)) | set(range(2000, 2007)) | {1}
    assert reported == expected - {1}
    assert _check_consistent(path, sky) == expected
