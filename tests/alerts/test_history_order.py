"""The history's time-order rule (alerts.history): announced images associate in time order.

On the SQLite store (the rule is the same SQL on PostgreSQL, whose concurrent test is in
test_history_postgres.py): an image waits for an announced earlier image overlapping it and
then sees its detections in ``prv_candidates``; images of one exposure (one jd) and images far
apart never wait; an announcement never recorded is given up after ``order_wait_s`` and
withdrawn; withdrawing and re-announcing are idempotent; a recorded image is not announced again.
"""
from __future__ import annotations

import logging
import threading
import time

from alerts.history import PendingImage, SQLiteHistoryStore
from alerts.packet import make_alerts
from pipeline.simulate.history import survey_images

PUBLISHER = "ZTF (skydiff)"


def _pending(image) -> PendingImage:
    return PendingImage(image.context.pid, image.context.jd, image.context.footprint)


def _record(path, image, order_wait_s=600.0, out=None):
    with SQLiteHistoryStore(path, order_wait_s=order_wait_s) as store:
        alerts = make_alerts(image.context, image.candidates, None, store, PUBLISHER)
    if out is not None:
        out.append((time.monotonic(), alerts))
    return alerts


def _pending_pids(path) -> set[int]:
    with SQLiteHistoryStore(path) as store:
        return {int(r[0]) for r in store._query("SELECT pid FROM pending_images")}


def test_later_image_waits_for_an_earlier_announced_one(tmp_path):
    first, later = survey_images(n_sources=60, pointings=1, epochs=(0.0, 1.0), transients_per_image=0, seed=11)
    path = tmp_path / "history.sqlite"
    with SQLiteHistoryStore(path) as store:
        assert store.announce([_pending(first), _pending(later)]) == 2
    done: list = []
    waiter = threading.Thread(target=_record, args=(path, later), kwargs={"out": done})
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive() and not done            # waiting for the earlier image
    t_first = time.monotonic()
    first_alerts = _record(path, first)
    waiter.join(timeout=30)
    (t_later, alerts), = done
    assert t_later >= t_first
    # ... and its alerts see the earlier image's detections, as a sequential run's do.
    first_candids = {a["candid"] for a in first_alerts}
    assert sum(any(p["candid"] in first_candids for p in a["prv_candidates"]) for a in alerts) > 0.5 * len(alerts)
    assert _pending_pids(path) == set()


def test_same_exposure_and_disjoint_images_never_wait(tmp_path):
    # b is recorded while two images are announced: one of its own jd over its own footprint
    # (another quadrant of its exposure) and an earlier one far away on the sky.
    a, b = survey_images(n_sources=60, pointings=2, epochs=(0.0,), transients_per_image=1, seed=12)
    path = tmp_path / "history.sqlite"
    same_jd = PendingImage(a.context.pid + 1, b.context.jd, b.context.footprint)
    far = PendingImage(a.context.pid + 2, a.context.jd - 1.0, ((10.0, -40.0), (10.5, -40.0), (10.5, -39.5),
                                                                 (10.0, -39.5)))
    with SQLiteHistoryStore(path) as store:
        store.announce([same_jd, far])
    t0 = time.monotonic()
    _record(path, b, order_wait_s=30.0)
    assert time.monotonic() - t0 < 5.0
    assert _pending_pids(path) == {same_jd.pid, far.pid}


def test_an_announcement_never_recorded_is_given_up_and_withdrawn(tmp_path, caplog):
    first, later = survey_images(n_sources=40, pointings=1, epochs=(0.0, 1.0), transients_per_image=0, seed=13)
    path = tmp_path / "history.sqlite"
    with SQLiteHistoryStore(path) as store:
        store.announce([_pending(first), _pending(later)])
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="skydiff.history"):
        _record(path, later, order_wait_s=1.0)
    assert 1.0 <= time.monotonic() - t0 < 10.0
    assert f"{first.context.pid}" in caplog.text and "abandoned" in caplog.text
    assert _pending_pids(path) == set()
    # A third image does not wait again for the abandoned one.
    t0 = time.monotonic()
    _record(path, first, order_wait_s=30.0)
    assert time.monotonic() - t0 < 5.0


def test_withdraw_and_announce_are_idempotent(tmp_path):
    first, later = survey_images(n_sources=40, pointings=1, epochs=(0.0, 1.0), transients_per_image=0, seed=14)
    path = tmp_path / "history.sqlite"
    with SQLiteHistoryStore(path) as store:
        assert store.announce([_pending(first)]) == 1
        assert store.announce([_pending(first)]) == 1          # re-announced: still one row
        assert store.withdraw([first.context.pid, 12345]) == 1
        assert store.withdraw([first.context.pid]) == 0
    _record(path, first)
    with SQLiteHistoryStore(path) as store:
        assert store.announce([_pending(first), _pending(later)]) == 1   # recorded: not announced again
        cells = store._query("SELECT count(*) FROM pending_cells WHERE pid = ?", (later.context.pid,))[0][0]
        assert cells > 0
