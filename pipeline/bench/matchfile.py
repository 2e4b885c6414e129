"""Benchmarks of the matchfile path: appending an epoch, a warm cone query, the HTTP service.

Each returns a dict of figures (seconds unless the name says otherwise) for ``skydiff bench``;
targets: append of 50,000 sources <= 1 s, cone on 20,000 objects x 500 epochs <= 20 ms warm,
service p95 <= 50 ms at 50 requests/s for 30 s on loopback.
"""
from __future__ import annotations

import http.client
import multiprocessing
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import numpy as np

from pipeline.core.config import SiteConfig
from pipeline.matchfile.hjd import exact_light_travel_time
from pipeline.matchfile.lightcurves import LightcurveReader
from pipeline.matchfile.service import LIGHTCURVE_PATH, make_server
from pipeline.matchfile.store import MatchfileConfig, append_epoch, combine, create_matchfile
from pipeline.matchfile.layout import (LAYOUT_VERSION, coerce_columns, empty_columns, filefracday, shard_dir,
                                       write_h5_atomic, write_table)
from pipeline.simulate.matchfile_truth import synthetic_epoch, synthetic_sky
from pipeline.core.refraction import site_location

__all__ = ["bench_append", "bench_cone", "bench_service", "build_bulk_matchfile"]


@contextmanager
def _scratch():
    directory = Path(tempfile.mkdtemp(prefix="skydiff-matchbench-"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def bench_append(n_sources: int = 50000, n_epochs: int = 4, site: SiteConfig = SiteConfig()) -> dict:
    """Time ``append_epoch`` of ``n_sources`` detections (match, HJD grid fit, shard commit) and one fold."""
    location = site_location(site)
    with _scratch() as root:
        sky = synthetic_sky(n_sources, 150.0, 30.0, seed=21, variable_fraction=0.05)
        path = create_matchfile(root, sky.reference, sky.meta)
        config = MatchfileConfig(combine_threshold=10**6)
        epochs = [synthetic_epoch(sky, 1 + k, 60000.0 + 0.02 * k) for k in range(n_epochs + 1)]
        append_epoch(path, *epochs[0], location, config)          # warm-up (astropy caches)
        times = []
        for meta, table in epochs[1:]:
            start = time.perf_counter()
            append_epoch(path, meta, table, location, config)
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        combine(path, config)
        fold = time.perf_counter() - start
    return {"append": float(np.median(times)), "append_max": float(np.max(times)),
            f"fold_{n_epochs + 1}_epochs": fold, "detections": int(len(epochs[1][1]))}


def build_bulk_matchfile(root: Path, n_objects: int, n_epochs: int, site: SiteConfig = SiteConfig(),
                         seed: int = 5):
    """A matchfile of ``n_objects`` x ``n_epochs`` written as one bulk shard folded by :func:`combine`.

    Photometry is drawn in bulk with numpy (every object detected at every epoch) and each
    row's HJD is its epoch's field-centre HJD: plausible values for read benchmarks, without
    the cost of ``n_epochs`` real appends.  Returns (path, sky).
    """
    rng = np.random.default_rng(seed)
    sky = synthetic_sky(n_objects, 210.0, 40.0, seed=seed, variable_fraction=0.05)
    path = create_matchfile(root, sky.reference, sky.meta)
    mjd = 60000.0 + np.sort(rng.uniform(0, 300, n_epochs))
    location = site_location(site)
    from astropy.time import Time
    middle = Time(mjd + 15.0 / 86400, format="mjd", scale="utc")
    hjd = middle.jd + exact_light_travel_time(np.full(n_epochs, 210.0), np.full(n_epochs, 40.0), middle,
                                              location) / 86400.0
    expids = np.arange(1, n_epochs + 1, dtype=np.int64) * 100
    exposures = {"expid": expids, "mjd": mjd, "hjd": hjd, "exptime": np.full(n_epochs, 30.0),
                 "airmass": rng.uniform(1.0, 2.0, n_epochs), "magzp": np.full(n_epochs, 26.0),
                 "magzpunc": np.full(n_epochs, 0.01), "seeing": rng.uniform(1.5, 3.0, n_epochs),
                 "limmag": np.full(n_epochs, 20.5), "field_ra": np.full(n_epochs, 210.0),
                 "field_dec": np.full(n_epochs, 40.0), "astrometry_qa": np.zeros(n_epochs),
                 "photometry_qa": np.zeros(n_epochs), "programid": np.ones(n_epochs),
                 "nmatched": np.full(n_epochs, n_objects), "nunmatched": np.zeros(n_epochs),
                 "filefracday": filefracday(mjd), "clrcoeff": rng.normal(-0.05, 0.01, n_epochs),
                 "clrcounc": rng.uniform(0.002, 0.006, n_epochs)}
    ids = np.asarray(sky.reference["id"])
    magerr = np.float32(0.02) + np.zeros(n_objects * n_epochs, np.float32)
    mag = (np.repeat(sky.true_mag, n_epochs) + rng.normal(0, 0.02, n_objects * n_epochs)).astype(np.float32)
    flux = (10 ** (-0.4 * (mag - 26.0))).astype(np.float32)
    photometry = {"objid": np.repeat(ids, n_epochs), "expid": np.tile(expids, n_objects), "mag": mag,
                  "magerr": magerr, "flux": flux, "fluxerr": flux * magerr / 1.0857,
                  "flags": np.zeros(len(mag), np.int32), "hjd": np.tile(hjd, n_objects),
                  "chi": (rng.chisquare(120, len(mag)) / 120).astype(np.float32),
                  "sharp": rng.normal(0.0, 0.05, len(mag)).astype(np.float32)}
    tables = {"exposures": coerce_columns("exposures", exposures, "bulk"),
              "photometry": coerce_columns("photometry", photometry, "bulk"),
              "unmatched": empty_columns("unmatched")}

    def fill(h5):
        h5.attrs.update({"layout_version": LAYOUT_VERSION, "kind": "epoch-shard"})
        for name, columns in tables.items():
            write_table(h5, name, columns)

    write_h5_atomic(shard_dir(path) / "bulk.h5", fill)
    combine(path)
    return path, sky


def bench_cone(n_objects: int = 20000, n_epochs: int = 500, n_queries: int = 300,
               radius_arcsec: float = 2.0) -> dict:
    """Cone queries on one matchfile of ``n_objects`` x ``n_epochs``: cold first query, warm median/p95."""
    with _scratch() as root:
        start = time.perf_counter()
        _, sky = build_bulk_matchfile(root, n_objects, n_epochs)
        build = time.perf_counter() - start
        reader = LightcurveReader(root)
        rng = np.random.default_rng(3)
        picks = rng.integers(0, n_objects, n_queries + 1)
        ra, dec = np.asarray(sky.reference["ra"]), np.asarray(sky.reference["dec"])
        start = time.perf_counter()
        first = reader.cone(ra[picks[0]], dec[picks[0]], radius_arcsec / 3600)
        cold = time.perf_counter() - start
        times, points = [], 0
        for i in picks[1:]:
            start = time.perf_counter()
            table = reader.cone(ra[i], dec[i], radius_arcsec / 3600)
            times.append(time.perf_counter() - start)
            points += len(table)
    return {"cone_warm_median": float(np.median(times)), "cone_warm_p95": float(np.percentile(times, 95)),
            "cone_cold": cold, "build": build, "points_per_query": round(points / n_queries, 1),
            "rows_in_file": n_objects * n_epochs, "first_points": len(first)}


def _serve_in_child(root: str, port_out) -> None:
    server = make_server(root, "127.0.0.1", 0)
    port_out.send(server.server_address[1])
    port_out.close()
    server.serve_forever()


def bench_service(rate: float = 50.0, duration: float = 30.0, n_objects: int = 20000, n_epochs: int = 500,
                  fmt: str = "VOTABLE", radius_arcsec: float = 2.0) -> dict:
    """p50/p95/max latency of the HTTP service under an open-loop load on loopback.

    The server runs in its own (forked) process; requests are sent at ``rate`` per second for
    ``duration`` seconds (bounded: ``rate * duration`` requests, 10 s timeout each, the whole
    run stops at ``duration + 30`` s), each on a fresh connection as a script would.
    """
    n_requests = int(rate * duration)
    context = multiprocessing.get_context("fork")
    with _scratch() as root:
        _, sky = build_bulk_matchfile(root, n_objects, n_epochs)
        receiver, sender = context.Pipe(duplex=False)
        server = context.Process(target=_serve_in_child, args=(str(root), sender), daemon=True)
        server.start()
        try:
            if not receiver.poll(60):
                raise RuntimeError("light-curve server did not start")
            port = receiver.recv()
            rng = np.random.default_rng(9)
            picks = rng.integers(0, n_objects, n_requests)
            ra, dec = np.asarray(sky.reference["ra"]), np.asarray(sky.reference["dec"])
            queries = [f"{LIGHTCURVE_PATH}?POS=" + quote(f"CIRCLE {ra[i]:.6f} {dec[i]:.6f} {radius_arcsec / 3600:.6f}")
                       + f"&FORMAT={fmt}" for i in picks]
            latencies = np.full(n_requests, np.nan)
            failures = []
            hard_stop = time.monotonic() + duration + 30.0

            def one(i: int) -> None:
                if time.monotonic() > hard_stop:
                    failures.append("skipped after the hard stop")
                    return
                start = time.perf_counter()
                try:
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    connection.request("GET", queries[i])
                    response = connection.getresponse()
                    response.read()
                    connection.close()
                    if response.status != 200:
                        failures.append(f"HTTP {response.status}")
                        return
                except OSError as exc:
                    failures.append(str(exc))
                    return
                latencies[i] = time.perf_counter() - start

            one(0)                 # warm the server's snapshot before the clock starts
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=32) as pool:
                for i in range(n_requests):
                    delay = t0 + i / rate - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    pool.submit(one, i)
            elapsed = time.perf_counter() - t0
        finally:
            server.kill()
            server.join()
    done = latencies[np.isfinite(latencies)]
    return {"p50": float(np.percentile(done, 50)), "p95": float(np.percentile(done, 95)),
            "max": float(done.max()), "requests": int(len(done)), "errors": len(failures),
            "achieved_rate_per_s": round(n_requests / elapsed, 1)}
