"""Alert benchmarks: packet building + serialisation, and sustained publishing.

Both return a dict of figures (seconds and rates) for ``skydiff bench`` to print.  Inputs
are synthetic (:mod:`alerts.synthetic`) but follow the real input contract: three 63 x 63
float32 cutouts per alert and, for the packet benchmark, 30 ``prv_candidates`` each.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import replace

from .cutouts import STAMP_KINDS, stamp_header_cards
from .history import CandidateHistory, SQLiteHistoryStore
from .packet import assemble_alert, candidate_records, cutout_fields, make_alerts, upper_limit_record
from .schema import schema_field_names, serialize_alert
from .synthetic import synthetic_candidates, synthetic_context, synthetic_cutouts

__all__ = ["bench_packets", "bench_publish"]

HISTORY_ENTRIES = 30


def _histories(context, records) -> list[CandidateHistory]:
    """30 entries per alert: 20 past detections of the same candidate, 10 upper limits."""
    prv_names = schema_field_names("prv_candidate")
    limit = upper_limit_record(context)
    histories = []
    for record in records:
        detection = {name: record[name] for name in prv_names}
        past = [dict(detection, jd=record["jd"] - 1.0 - i, candid=record["candid"] - 10**12 * (i + 1))
                for i in range(20)]
        past += [dict(limit, jd=record["jd"] - 0.5 - i) for i in range(10)]
        past.sort(key=lambda entry: entry["jd"])
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

    t0 = time.perf_counter()
    records = candidate_records(context, candidates)
    t1 = time.perf_counter()
    wcs = stamp_header_cards(context.wcs_header)
    stamps = [cutout_fields(triplet, record["candid"], context.pid, wcs) for triplet, record in zip(cutouts, records)]
    t2 = time.perf_counter()
    alerts = [assemble_alert(record, history, stamp, "ZTF (skydiff)")
              for record, history, stamp in zip(records, histories, stamps)]
    values = [serialize_alert(alert) for alert in alerts]
    t3 = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="skydiff-bench-history-") as folder:
        store = SQLiteHistoryStore(f"{folder}/history.sqlite")
        per_image, images = 200, max(1, min(n, 1000) // 200)
        t4 = time.perf_counter()
        for i in range(images):
            epoch = replace(context, expid=context.expid + i, jd=context.jd + 0.01 * i)
            make_alerts(epoch, candidates[:per_image], None, store, "ZTF (skydiff)")
        t5 = time.perf_counter()
        store.close()
    return {
        "n_alerts": n, "mean_packet_bytes": sum(map(len, values)) // n,
        "records_s": t1 - t0, "cutouts_s": t2 - t1, "assemble_serialise_s": t3 - t2, "total_s": t3 - t0,
        "alerts_per_s": n / (t3 - t0), "cutout_stamps_per_s": n * len(STAMP_KINDS) / (t2 - t1),
        "history_alerts_per_s": images * per_image / (t5 - t4),
    }


def bench_publish(bootstrap: str, n: int = 5000, fsync: bool = True) -> dict:
    """Publish ``n`` full-size alerts through the spool to ``bootstrap`` with acks=all.

    The rate covers the spool write (with fsync when asked), produce and the final flush,
    i.e. until every alert is acknowledged (target: at least 1000 alerts/s).
    """
    from pipeline.config import KafkaConfig

    from .publish import AlertPublisher
    from .spool import Spool

    context = synthetic_context(night="20260316")
    candidates = synthetic_candidates(1)
    alert = make_alerts(context, candidates, synthetic_cutouts(candidates),
                        SQLiteHistoryStore(":memory:"), "ZTF (skydiff)")[0]
    value = serialize_alert(alert)
    topic = f"{context.topic}_bench{int(time.time())}"
    kafka = KafkaConfig(bootstrap_servers=bootstrap, flush_timeout_s=60.0)
    with tempfile.TemporaryDirectory(prefix="skydiff-bench-spool-") as folder:
        with AlertPublisher(kafka, Spool(folder, fsync=fsync)) as publisher:
            t0 = time.perf_counter()
            for i in range(n):
                publisher.publish(topic, alert["candid"] + i, value)
            unacknowledged = publisher.flush()
            elapsed = time.perf_counter() - t0
            report = publisher.report
    return {"n_alerts": n, "packet_bytes": len(value), "delivered": report.delivered,
            "unacknowledged": unacknowledged, "total_s": elapsed, "alerts_per_s": report.delivered / elapsed,
            "megabytes_per_s": report.delivered * len(value) / elapsed / 1e6, "fsync": fsync}
