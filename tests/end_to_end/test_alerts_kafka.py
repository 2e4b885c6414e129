"""Alerts end to end against a real Kafka-protocol broker (Tansu) on loopback.

The broker keeps data in memory: a killed broker comes back empty, so the fault test counts
what consumers saw over both lifetimes and what the spool's delivery log recorded.
"""
from __future__ import annotations

import io
import threading
import time
from collections import Counter

import fastavro
import fastavro.validation

import pytest
from confluent_kafka import Consumer

from pipeline.bench.alerts import bench_publish
from alerts.history import SQLiteHistoryStore
from alerts.packet import make_alerts
from alerts.publish import AlertPublisher, replay
from alerts.schema import alert_schema, serialize_alert
from alerts.spool import DELIVERED, PENDING, Spool
from pipeline.simulate.alerts import synthetic_candidates, synthetic_context, synthetic_cutouts
from pipeline.core.config import KafkaConfig

from kafka_broker import KafkaBroker, free_port, tansu_binary

pytestmark = pytest.mark.timeout(120)


class Collector(threading.Thread):
    """A consumer-group member reading a topic in the background, decoding like a broker."""

    def __init__(self, bootstrap: str, topic: str, group: str):
        super().__init__(daemon=True)
        self.conf = {"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                     "session.timeout.ms": 6000, "receive.message.max.bytes": 64 * 1024 * 1024,
                     "reconnect.backoff.max.ms": 500}
        self.topic = topic
        self.candids: list[int] = []
        self.alerts: list[dict] = []
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        consumer = Consumer(self.conf)
        consumer.subscribe([self.topic])
        try:
            while not self.stop.is_set():
                msg = consumer.poll(0.2)
                if msg is None or msg.error():
                    continue
                alert = next(fastavro.reader(io.BytesIO(msg.value())))
                self.alerts.append(alert)
                self.candids.append(alert["candid"])
        finally:
            consumer.close()

    def wait_for(self, count: int, timeout_s: float = 40.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while len(self.candids) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        return len(self.candids) >= count

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=20)


@pytest.fixture
def broker(tmp_path):
    kafka = KafkaBroker(tmp_path).start()
    yield kafka
    kafka.kill()


def _quadrant(tmp_path, n: int, seed: int = 1):
    context = synthetic_context()
    candidates = synthetic_candidates(n, seed=seed)
    store = SQLiteHistoryStore(tmp_path / "history.sqlite")
    alerts = make_alerts(context, candidates, synthetic_cutouts(candidates), store, "ZTF (skydiff)")
    return context, candidates, store, alerts


def test_publish_consume_validate_and_rerun(tmp_path, broker):
    context, candidates, store, alerts = _quadrant(tmp_path, 30)
    kafka = KafkaConfig(bootstrap_servers=broker.bootstrap, flush_timeout_s=10.0)
    spool = Spool(tmp_path / "spool")
    with AlertPublisher(kafka, spool) as publisher:
        report = publisher.publish_alerts(context.topic, alerts)
    assert report.delivered == 30 and spool.count(PENDING) == 0 and spool.count(DELIVERED) == 30

    collector = Collector(broker.bootstrap, context.topic, "brokers")
    assert collector.wait_for(30)
    collector.finish()
    expected = {int(i) + context.pid * 10**6 for i in candidates["cand_index"]}
    assert sorted(collector.candids) == sorted(expected)
    for alert in collector.alerts:
        fastavro.validation.validate(alert, alert_schema(), raise_errors=True)
        assert alert["schemavsn"] == "4.02" and alert["publisher"].startswith("ZTF")

    # Rerun of the same quadrant: same candids, nothing new produced or logged.
    rerun = make_alerts(context, candidates, synthetic_cutouts(candidates), store, "ZTF (skydiff)")
    store.close()
    assert [a["candid"] for a in rerun] == [a["candid"] for a in alerts]
    assert [a["objectId"] for a in rerun] == [a["objectId"] for a in alerts]
    with AlertPublisher(kafka, spool) as publisher:
        again = publisher.publish_alerts(context.topic, rerun)
    assert again.already_delivered == 30 and again.produced == 0
    assert len(spool.delivery_log()) == 30


def test_broker_killed_mid_stream_then_replay(tmp_path, broker):
    context, _, store, alerts = _quadrant(tmp_path, 60, seed=3)
    store.close()
    everything = {a["candid"] for a in alerts}
    values = [(a["candid"], serialize_alert(a)) for a in alerts]
    kafka = KafkaConfig(bootstrap_servers=broker.bootstrap, flush_timeout_s=3.0)
    spool = Spool(tmp_path / "spool")

    first = Collector(broker.bootstrap, context.topic, "life1")
    publisher = AlertPublisher(kafka, spool)
    for candid, value in values[:20]:
        publisher.publish(context.topic, candid, value)
    assert publisher.flush() == 0
    first.wait_for(20)
    for candid, value in values[20:30]:          # in flight when the broker dies
        publisher.publish(context.topic, candid, value)
    broker.kill()
    for candid, value in values[30:]:            # the stream goes on with the broker gone
        publisher.publish(context.topic, candid, value)
    publisher.close()
    first.finish()
    acked_first = {r.candid for r in spool.delivery_log()}
    assert 20 <= len(acked_first) < 60
    assert spool.count(PENDING) == 60 - len(acked_first)

    broker.restart()
    second = Collector(broker.bootstrap, context.topic, "life2")
    with AlertPublisher(kafka, spool) as again:
        report = replay(spool, again)
    assert report.delivered == 60 - len(acked_first)
    second.wait_for(60 - len(acked_first))
    time.sleep(1.0)                               # would catch a stray duplicate
    second.finish()

    log = Counter(r.candid for r in spool.delivery_log())
    assert set(log) == everything and set(log.values()) == {1}   # each acknowledged exactly once
    assert spool.count(PENDING) == 0
    seen_second = Counter(second.candids)
    assert set(seen_second.values()) == {1}
    assert not set(seen_second) & acked_first                    # nothing acknowledged is re-sent
    assert set(seen_second) == everything - acked_first
    # Acknowledged in the first lifetime but never consumed: lost with the test broker's memory
    # (a real Kafka keeps them on disk), never by the publisher.
    lost_by_memory_broker = acked_first - set(first.candids)
    assert set(first.candids) | set(seen_second) | lost_by_memory_broker == everything
    assert len(lost_by_memory_broker) <= 10


def test_broker_absent_from_start_then_replay(tmp_path):
    context, _, store, alerts = _quadrant(tmp_path, 20, seed=5)
    store.close()
    port = free_port()
    kafka = KafkaConfig(bootstrap_servers=f"127.0.0.1:{port}", flush_timeout_s=2.0)
    spool = Spool(tmp_path / "spool")
    with AlertPublisher(kafka, spool) as publisher:
        report = publisher.publish_alerts(context.topic, alerts)
    assert report.delivered == 0 and spool.count(PENDING) == 20 and not spool.delivery_log()

    broker = KafkaBroker(tmp_path, port=port).start()
    try:
        collector = Collector(broker.bootstrap, context.topic, "late")
        with AlertPublisher(kafka, spool) as publisher:
            assert replay(spool, publisher).delivered == 20
        collector.wait_for(20)
        time.sleep(1.0)
        collector.finish()
    finally:
        broker.kill()
    assert sorted(collector.candids) == sorted(a["candid"] for a in alerts)
    assert Counter(r.candid for r in spool.delivery_log()) == Counter(a["candid"] for a in alerts)


def test_publish_benchmark_delivers_everything(tmp_path, broker):
    # Figures are printed by ``skydiff bench alert-publish``; here only that every alert is
    # acknowledged and moved to ``delivered``, against a given broker and a self-started one.
    tansu_binary()
    given = bench_publish(broker.bootstrap, n=120, distinct=7)
    own = bench_publish(None, n=40, distinct=5, fsync=False)
    for figures, n in ((given, 120), (own, 40)):
        assert figures["delivered"] == figures["delivered_in_spool"] == n and figures["unacknowledged"] == 0


def test_an_unclosed_publisher_is_freed_by_reference_counting(tmp_path):
    """No reference cycle through the producer's callbacks: a publisher left unclosed (an
    error path) is freed at once, never by the cycle collector destroying a live librdkafka
    handle whose threads still call back (a segmentation fault)."""
    import gc
    import weakref

    gc.disable()
    try:
        kafka = KafkaConfig(bootstrap_servers=f"127.0.0.1:{free_port()}", flush_timeout_s=1.0)
        publisher = AlertPublisher(kafka, Spool(tmp_path / "spool"))
        gone = weakref.ref(publisher)
        publisher.spool.close()
        del publisher
        assert gone() is None
    finally:
        gc.enable()
