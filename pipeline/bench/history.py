"""``skydiff bench history``: the PostgreSQL object history under load.

A simulated survey (:func:`pipeline.simulate.history.survey_fill`: ``objects`` sources on
quadrant-sized tiles, each tile imaged ``detections_per_object`` times) is loaded into an empty
database with ``COPY``, as associated rows; then new 200-candidate images (70 % known sources,
30 % new ones) are associated through :class:`alerts.history_postgres.PostgresHistoryStore`,
first by one writer, then by ``writers`` processes at once back to back (every writer always
busy: the worst case, where on a small machine the clients and the server share its cores),
then by ``writers`` processes with images arriving at a survey's rate (ZTF's 64 quadrant images
every 38 s), each timing its own ``record_image`` calls.  The figures are the median and 99th
percentile per image.

Without a URL a private server is started on loopback for the run
(:class:`pipeline.bench.postgres.PostgresServer`) and removed afterwards; the clients and the
server then share this machine's cores, so the figures are those of one machine.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from typing import Iterator

import numpy as np

__all__ = ["bench_history", "fill_store"]

_FLUSH_ROWS = 200_000


def fill_store(url: str, spec, progress=None) -> dict:
    """Load :func:`survey_fill`'s rows into the (empty) database at ``url`` with COPY; counts and seconds."""
    import psycopg

    from alerts.history_postgres import TABLE_COLUMNS, PostgresHistoryStore, fill_footprint_cones
    from pipeline.simulate.history import survey_fill

    store = PostgresHistoryStore(url)           # creates the schema; its HEALPix indexing is the store's own

    counts = {table: 0 for table in TABLE_COLUMNS}
    buffers: dict[str, list] = {table: [] for table in TABLE_COLUMNS}
    t0 = time.perf_counter()
    with psycopg.connect(url) as db:
        def flush():
            for table, rows in buffers.items():
                if rows:
                    with db.cursor().copy(f"COPY {table} ({', '.join(TABLE_COLUMNS[table])}) FROM STDIN") as copy:
                        for row in rows:
                            copy.write_row(row)
                    counts[table] += len(rows)
                    rows.clear()
            db.commit()
            if progress:
                progress(counts)

        for table, rows in survey_fill(spec, store.object_cells, store.footprint_cells):
            buffers[table].extend(rows)
            if len(buffers["detections"]) >= _FLUSH_ROWS:
                flush()
        flush()
        fill_footprint_cones(db)              # COPY wrote the images without theirs, as a migration would
        db.commit()
        fill_s = time.perf_counter() - t0
        db.autocommit = True
        db.execute("VACUUM ANALYZE")
        size = db.execute("SELECT pg_database_size(current_database())").fetchone()[0]
    store.close()
    return {"fill_s": fill_s, "analyze_s": time.perf_counter() - t0 - fill_s, "counts": counts,
            "database_bytes": int(size)}


#: A survey's image rate for the paced pass: ZTF's 64 quadrant images an exposure, one exposure
#: about every 38 s (30 s open, 8 s overheads and slew), all of them associating somewhere.
SURVEY_IMAGES_PER_S = 64 / 38.0


def _server_cpu_s(pid: int) -> float | None:
    """CPU seconds (user and system) the server process ``pid`` has used, when it runs on this
    machine and /proc shows it; else None."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _writer(url: str, images: list, start, queue, arrivals: list[float] | None = None) -> None:
    from alerts.history_postgres import PostgresHistoryStore

    try:
        with PostgresHistoryStore(url) as store:
            backend = store._db.info.backend_pid
            start.wait()
            origin = time.perf_counter()
            times = []
            client_cpu, server_start = 0.0, _server_cpu_s(backend)
            for k, (image, detections) in enumerate(images):
                if arrivals is not None:           # wait for the image's arrival time
                    time.sleep(max(0.0, origin + arrivals[k] - time.perf_counter()))
                t0, c0 = time.perf_counter(), time.process_time()
                store.record_image(image, detections)
                times.append(time.perf_counter() - t0)
                client_cpu += time.process_time() - c0
            server_end = _server_cpu_s(backend)
        server_cpu = None if server_start is None or server_end is None else server_end - server_start
        queue.put((times, client_cpu, server_cpu))
    except BaseException as exc:          # reported to the parent
        queue.put(repr(exc))


def _associate(url: str, images: list, writers: int, rate_per_s: float | None = None, seed: int = 3
               ) -> tuple[list[float], float, float | None]:
    """Seconds per ``record_image`` call, ``writers`` processes each taking every ``writers``-th image:
    back to back, or with ``rate_per_s`` as images arriving at that total rate (Poisson,
    each writer a ``1/writers`` share of it); and the CPU seconds per image of the writers
    and of their server processes (None when the server's are not visible here)."""
    context = multiprocessing.get_context("fork")
    start, queue = context.Event(), context.Queue()
    rng = np.random.default_rng(seed)
    shares = [images[k::writers] for k in range(writers)]
    arrivals = [None if rate_per_s is None else
                np.cumsum(rng.exponential(writers / rate_per_s, len(share))).tolist() for share in shares]
    procs = [context.Process(target=_writer, args=(url, share, start, queue, arrival))
             for share, arrival in zip(shares, arrivals)]
    for p in procs:
        p.start()
    time.sleep(1.0)                        # every writer connected
    start.set()
    results = [queue.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    failed = [r for r in results if not isinstance(r, tuple)]
    if failed:
        raise RuntimeError(f"a writer failed: {failed[0]}")
    times = [t for r in results for t in r[0]]
    server = [r[2] for r in results]
    return (times, sum(r[1] for r in results) / len(times),
            None if None in server else sum(server) / len(times))


@contextlib.contextmanager
def _database(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    from pipeline.bench.postgres import PostgresServer

    server = PostgresServer().start()
    try:
        yield server.new_database("bench")
    finally:
        server.stop()


def bench_history(url: str | None = None, objects: int = 1_000_000, detections_per_object: int = 10,
                  writers: int = 16, images_per_writer: int = 20, paced_images_per_writer: int = 8,
                  progress=None) -> dict:
    """Fill a history store with a simulated survey, then time the association of 200-candidate images.

    Parameters
    ----------
    url : str, optional
        An empty PostgreSQL database; None starts a private server on loopback for the run.
    objects, detections_per_object : int
        The survey's size: ``objects * detections_per_object`` detections stored.
    writers : int
        Processes associating images at once in the concurrent pass.
    images_per_writer : int
        Images each writer associates back to back (the single-writer pass takes as many).
    paced_images_per_writer : int
        Images each writer associates in the paced pass, where images arrive at a survey's
        rate (:data:`SURVEY_IMAGES_PER_S`, Poisson) rather than back to back.
    progress : callable, optional
        Called with the row counts after each COPY batch.

    Returns
    -------
    dict
        Fill counts and times, and per-image association times (seconds): median and p99 with
        one writer, with ``writers`` back to back, and with ``writers`` at the survey's rate;
        for each pass the CPU seconds per image of the writers (``*client_cpu_s``) and of the
        server processes serving them (``*server_cpu_s``, None unless the server runs here).
    """
    from pipeline.simulate.history import FillSpec, bench_images

    spec = FillSpec(objects=objects, detections_per_object=detections_per_object)
    n_paced = max(writers * paced_images_per_writer, 1)
    images = list(bench_images(spec, images_per_writer * (writers + 1) + n_paced))
    with _database(url) as target:
        fill = fill_store(target, spec, progress)
        single, single_client, single_server = _associate(target, images[:images_per_writer], 1)
        concurrent, concurrent_client, concurrent_server = _associate(
            target, images[images_per_writer:images_per_writer * (writers + 1)], writers)
        paced, paced_client, paced_server = _associate(target, images[images_per_writer * (writers + 1):], writers,
                                                       SURVEY_IMAGES_PER_S)
    return {"n_objects": fill["counts"]["objects"], "n_detections": fill["counts"]["detections"],
            "n_images_stored": fill["counts"]["images"], "database_megabytes": fill["database_bytes"] / 1e6,
            "fill_s": fill["fill_s"], "analyze_s": fill["analyze_s"],
            "n_candidates_per_image": spec.per_image, "n_writers": writers, "n_images_timed": len(concurrent),
            "one_writer_median_s": float(np.median(single)), "one_writer_p99_s": float(np.percentile(single, 99)),
            "one_writer_client_cpu_s": single_client, "one_writer_server_cpu_s": single_server,
            "median_s": float(np.median(concurrent)), "p99_s": float(np.percentile(concurrent, 99)),
            "max_s": float(np.max(concurrent)), "client_cpu_s": concurrent_client, "server_cpu_s": concurrent_server,
            "n_images_paced": len(paced),
            "paced_images_per_s": SURVEY_IMAGES_PER_S, "paced_median_s": float(np.median(paced)),
            "paced_p99_s": float(np.percentile(paced, 99)), "paced_client_cpu_s": paced_client,
            "paced_server_cpu_s": paced_server}
