"""``skydiff bench history`` at a small scale on the session's real PostgreSQL server."""
from __future__ import annotations

import math

import psycopg

from pipeline.bench.history import bench_history


def test_history_benchmark_fills_and_times_every_pass(postgres):
    url = postgres.new_database()
    figures = bench_history(url, objects=2_000, detections_per_object=3, writers=2, images_per_writer=2,
                            paced_images_per_writer=1)
    assert figures["n_objects"] == 2_000 and figures["n_detections"] == 6_000
    assert figures["n_images_stored"] == 30 and figures["n_images_timed"] == 4 and figures["n_images_paced"] == 2
    for name in ("one_writer_median_s", "median_s", "p99_s", "paced_median_s", "paced_p99_s"):
        assert math.isfinite(figures[name]) and figures[name] > 0, name
    with psycopg.connect(url) as db:
        # Every timed image was recorded, with 200 candidates each.
        assert db.execute("SELECT count(*) FROM images").fetchone()[0] == 30 + 4 + 2 + 2
        assert db.execute("SELECT count(*) FROM detections").fetchone()[0] == 6_000 + 8 * 200
