"""Publishing alert packets to Kafka through the durable spool.

Every packet is written to the spool first (:mod:`alerts.spool`), then produced with
confluent-kafka.  Packets are spooled in groups (``sync_batch`` packets or ``sync_bytes``,
whichever comes first, and at every flush): each packet is written as it comes, the group
is made durable with one :meth:`Spool.sync <alerts.spool.Spool.sync>`, and only then is any
of it produced.  So a packet is always on disk before the broker can see it, and a crash
(or power cut) can only lose packets that were never produced -- a rerun of the quadrant
makes them again with the same candids; nothing that was produced is ever missing from the
spool.  While the producer's threads send one group the next one is being written, and the
disk cache is flushed once per group, not once per packet (which capped publishing at
~900 alerts/s here).  The producer: ``acks=all``, idempotence on, lz4 compression, a bounded local queue
(``queue.buffering.max.messages``/``kbytes``; a full queue is drained by polling), a delivery
callback per message (one bound method: the candid is the message key), and
``message.timeout.ms`` equal to the flush timeout so that a flush
ends with every message either acknowledged or failed.  Only an acknowledgement moves a
packet to ``delivered``; anything else (broker down, broker died mid-stream, timeout, fatal
producer error, purge at close) leaves it ``pending`` for :func:`replay`.  So nothing is
lost, and nothing acknowledged is sent again.  A message that was written by a broker whose
acknowledgement never arrived is sent again by replay: Kafka's at-least-once, as for any
producer; consumers can drop such repeats by ``candid`` (also the message key).

Oversize packets: the producer's ``message.max.bytes`` is set explicitly from
``kafka.message_max_bytes`` (Kafka's broker default is 1 MB).  A packet whose value plus key
plus record overhead exceeds it is not produced: it moves whole to the spool's ``oversize``
folder and an error is logged (replay retries it under the then-current limit).

Logging when the broker is unreachable: librdkafka reports each failed connection twice, as
its own ``FAIL`` log line and as an error event (``error_cb``); the event is logged (WARNING)
and the ``FAIL`` line demoted to DEBUG (:class:`_DuplicateFailFilter`), so each connection
failure appears once; a failure repeating with the same text (every reconnection attempt to a
broker that is down) is logged the first time and counted, the count logged at close.  A delivery failure is logged once per distinct reason, the rest counted
in the :class:`PublishReport` (``failed``), so a broker that is down does not log every packet.

Security: ``security_protocol``, ``sasl_*`` and ``ssl_ca_location`` pass straight to
librdkafka.  No credential is ever logged or put in an exception message: log lines go
through :class:`SecretFilter`, and Kafka error texts are scrubbed before use.
"""
from __future__ import annotations

import logging
import re
import time
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from confluent_kafka import KafkaError, KafkaException, Producer

from alerts.schema import container_is_complete, serialize_alert
from alerts.spool import DAMAGED, DELIVERED, OVERSIZE, PENDING, Spool
from pipeline.core.exits import PipelineError

__all__ = ["producer_config", "redacted", "SecretFilter", "PublishReport", "AlertPublisher",
           "replay", "PublishError", "RECORD_OVERHEAD_BYTES"]

_ATTEMPT_TIMING = re.compile(r" \(after \d+ms in state [A-Z_]+\)")

log = logging.getLogger("skydiff.alerts")

#: Bytes a Kafka record needs besides key and value (record + batch headers, generous).
RECORD_OVERHEAD_BYTES = 256
_SECRET_KEYS = ("sasl.password", "sasl.username", "ssl.key.password", "sasl.oauthbearer.client.secret")


class PublishError(PipelineError, RuntimeError):
    """The producer cannot be configured or used (message already free of credentials)."""


def producer_config(kafka, client_id: str = "skydiff-alerts") -> dict[str, Any]:
    """librdkafka settings for a :class:`pipeline.core.config.KafkaConfig` (holds secrets: never log)."""
    timeout_ms = max(1000, int(kafka.flush_timeout_s * 1000))
    conf: dict[str, Any] = {
        "bootstrap.servers": kafka.bootstrap_servers,
        "client.id": client_id,
        "acks": "all",
        "enable.idempotence": True,
        "compression.type": "lz4",
        "linger.ms": 5,
        "message.max.bytes": int(kafka.message_max_bytes),
        "batch.size": min(1_000_000, int(kafka.message_max_bytes)),
        "queue.buffering.max.messages": 20_000,
        "queue.buffering.max.kbytes": 256 * 1024,
        "message.timeout.ms": timeout_ms,
        "socket.connection.setup.timeout.ms": min(timeout_ms, 30_000),
        "security.protocol": kafka.security_protocol,
    }
    optional = {"sasl.mechanism": kafka.sasl_mechanism, "sasl.username": kafka.sasl_username,
                "sasl.password": kafka.sasl_password, "ssl.ca.location": kafka.ssl_ca_location}
    conf.update({key: value for key, value in optional.items() if value})
    return conf


def redacted(conf: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a client configuration safe to log (credentials replaced by ``***``)."""
    return {key: ("***" if key in _SECRET_KEYS and value else value) for key, value in conf.items()}


class SecretFilter(logging.Filter):
    """Replaces any of the given secrets in a log record's final message by ``***``."""

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            record.msg, record.args = self.scrub(record.getMessage()), None
        return True


class _DuplicateFailFilter(logging.Filter):
    """Demotes librdkafka's ``FAIL`` log lines (a broker connection failed) to DEBUG: the same
    failure also arrives as an error event, which :meth:`AlertPublisher._on_error` logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        # confluent-kafka logs "%s [%s] %s" % (facility, client, text); another filter may have
        # rendered the message already, so the rendered text is tested.
        if record.getMessage().startswith("FAIL ["):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


@dataclass
class PublishReport:
    """Counts of one publishing session."""

    spooled: int = 0              # written to the spool's pending folder
    already_delivered: int = 0    # candid acknowledged before (rerun): nothing written or sent
    produced: int = 0             # handed to the producer
    delivered: int = 0            # acknowledged by the broker
    failed: int = 0               # delivery failed (stays pending)
    oversize: int = 0             # over message.max.bytes (set aside in the spool)
    held: int = 0                 # no broker configured, or producer unusable: stays pending
    damaged: int = 0              # replay found the spooled file cut short (set aside, not sent)

    @property
    def not_acknowledged(self) -> int:
        """Packets of this session still waiting in the spool's pending folder for the broker:
        deliveries that failed, those still in flight, and those never produced (held)."""
        return self.produced + self.held - self.delivered

    @property
    def in_flight(self) -> int:
        """Produced, neither acknowledged nor failed yet (e.g. at a flush timeout)."""
        return self.produced - self.delivered - self.failed

    def __str__(self) -> str:
        return ", ".join(f"{name} {value}" for name, value in vars(self).items())

    def shortfall(self) -> str:
        """Why packets are not acknowledged, in words: "81 deliveries failed, 17 in flight, ..."."""
        parts = [f"{self.failed} deliveries failed" if self.failed else "",
                 f"{self.in_flight} still in flight at the flush timeout" if self.in_flight else "",
                 f"{self.held} not produced (producer unusable or its queue full)" if self.held else ""]
        return ", ".join(part for part in parts if part) or "none"


def _weak_callback(method):
    """``method`` (bound) as a callback that does not keep its object alive.

    A producer holding a bound method of the publisher that holds the producer is a reference
    cycle: an unclosed publisher is then freed by Python's cycle collector, which may destroy
    the librdkafka handle while its threads still call back into half-collected objects (a
    segmentation fault; confluent-kafka-python issue 1761).  Without the cycle the producer is
    freed by reference counting, at a known point, and a callback arriving after the publisher
    is gone does nothing.
    """
    ref = weakref.WeakMethod(method)

    def callback(*args):
        target = ref()
        if target is not None:
            target(*args)
    return callback


class AlertPublisher:
    """Spool-then-produce publisher; one per process.

    Parameters
    ----------
    kafka : KafkaConfig
        Broker address, security settings, size limit and flush timeout.  An empty
        ``bootstrap_servers`` keeps every packet in the spool.
    spool : Spool
        Where packets wait for their acknowledgement.
    sync_batch, sync_bytes : int
        Largest group of packets (count, bytes) made durable with one spool sync before it
        is produced.
    """

    def __init__(self, kafka, spool: Spool, sync_batch: int = 64, sync_bytes: int = 8 * 1024 * 1024):
        self.kafka = kafka
        self.spool = spool
        self.sync_batch = max(1, int(sync_batch))
        self.sync_bytes = int(sync_bytes)
        self._group: list[tuple[str, int, bytes, str]] = []
        self._group_bytes = 0
        self.report = PublishReport()
        self._secrets = SecretFilter([kafka.sasl_password, kafka.sasl_username])
        self._kafka_log = logging.getLogger("skydiff.alerts.kafka")
        self._kafka_log.addFilter(self._secrets)
        self._duplicate_fail = _DuplicateFailFilter()
        self._kafka_log.addFilter(self._duplicate_fail)
        log.addFilter(self._secrets)
        self._delivery_errors: dict[str, int] = {}
        self._producer_errors: dict[str, int] = {}
        self._fatal = False
        self._producer: Producer | None = None
        self._delivery_callback = _weak_callback(self._on_delivery)
        if kafka.bootstrap_servers:
            conf = producer_config(kafka)
            conf.update(error_cb=_weak_callback(self._on_error), logger=self._kafka_log)
            try:
                self._producer = Producer(conf)
            except KafkaException as exc:
                self._kafka_log.removeFilter(self._duplicate_fail)
                self._kafka_log.removeFilter(self._secrets)
                log.removeFilter(self._secrets)
                raise PublishError(f"cannot configure the Kafka producer: {self._secrets.scrub(str(exc))}") from None
            log.debug("producer configured: %s", redacted(producer_config(kafka)))

    @property
    def connected(self) -> bool:
        return self._producer is not None and not self._fatal

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = True
            log.error("Kafka producer fatal error (packets stay in the spool): %s", err.str())
            return
        # A broker that is down refuses every reconnection attempt (several a second at first):
        # each distinct error is logged once, its repeats counted and summarised at close.
        # The error's timing ("after 1ms in state CONNECT", "after 0ms ...") varies between
        # attempts and is not part of what went wrong.
        text = _ATTEMPT_TIMING.sub("", err.str())
        seen = self._producer_errors[text] = self._producer_errors.get(text, 0) + 1
        if seen == 1:
            log.warning("Kafka: %s", text)
        else:
            log.debug("Kafka (again): %s", text)

    def _on_delivery(self, err: KafkaError | None, msg) -> None:
        candid = int(msg.key())
        if err is None:
            self.spool.mark_delivered(msg.topic(), candid, msg.partition(), msg.offset())
            self.report.delivered += 1
        else:
            self.report.failed += 1
            reason = err.str()
            seen = self._delivery_errors[reason] = self._delivery_errors.get(reason, 0) + 1
            if seen == 1:
                log.warning("alert %d to %s not delivered (kept in the spool): %s (further deliveries failing "
                            "so are counted, not logged)", candid, msg.topic(), reason)
            else:
                log.debug("alert %d to %s not delivered (kept in the spool): %s", candid, msg.topic(), reason)

    def _oversize(self, candid: int, value: bytes) -> bool:
        return len(value) + len(str(candid)) + RECORD_OVERHEAD_BYTES > self.kafka.message_max_bytes

    def publish(self, topic: str, candid: int, value: bytes) -> str:
        """Spool one packet and queue it for producing; returns its state.

        ``"pending"`` (spooled; produced once its group is on disk, at the latest at the
        next :meth:`flush`), ``"delivered"`` (acknowledged before: nothing written or sent)
        or ``"oversize"`` (set aside in the spool, never produced).
        """
        if self._oversize(candid, value):
            if not self.spool.put(topic, candid, value):
                self.report.already_delivered += 1
                return DELIVERED
            self.report.spooled += 1
            return self._set_aside(topic, candid, len(value))
        path = self.spool.write(topic, candid, value)
        if path is None:
            self.report.already_delivered += 1
            return DELIVERED
        self.report.spooled += 1
        self._group.append((topic, candid, value, path))
        self._group_bytes += len(value)
        if len(self._group) >= self.sync_batch or self._group_bytes >= self.sync_bytes:
            self._produce_group()
        return PENDING

    def _produce_group(self) -> None:
        """Make the spooled group durable, then produce it."""
        group, self._group, self._group_bytes = self._group, [], 0
        if not group:
            return
        self.spool.sync([path for *_, path in group])
        for topic, candid, value, _ in group:
            self.produce_spooled(topic, candid, value)

    def produce_spooled(self, topic: str, candid: int, value: bytes) -> str:
        """Produce a packet that is on disk in the spool's pending folder."""
        if self._oversize(candid, value):
            return self._set_aside(topic, candid, len(value))
        key = str(candid).encode()
        if not self.connected:
            self.report.held += 1
            return PENDING
        deadline = time.monotonic() + max(1.0, self.kafka.flush_timeout_s) * 2
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=self._delivery_callback)
                self.report.produced += 1
                self._producer.poll(0)
                return PENDING
            except BufferError:
                # The bounded local queue is full: serve delivery callbacks until it drains.
                if time.monotonic() > deadline:
                    self.report.held += 1
                    return PENDING
                self._producer.poll(0.05)
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                if isinstance(error, KafkaError) and error.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    return self._set_aside(topic, candid, len(value))
                if isinstance(error, KafkaError) and error.fatal():
                    self._fatal = True
                log.error("cannot produce alert %d (kept in the spool): %s", candid,
                          self._secrets.scrub(str(exc)))
                self.report.held += 1
                return PENDING

    def _set_aside(self, topic: str, candid: int, size: int) -> str:
        self.spool.mark_oversize(topic, candid)
        self.report.oversize += 1
        log.error("alert %d is %d bytes, over message.max.bytes %d: not sent, kept in %s",
                  candid, size, self.kafka.message_max_bytes, self.spool.path(topic, candid, OVERSIZE))
        return OVERSIZE

    def publish_alerts(self, topic: str, alerts: Iterable[Mapping[str, Any]]) -> PublishReport:
        """Serialise and publish alerts to ``topic``, then flush."""
        for alert in alerts:
            self.publish(topic, alert["candid"], serialize_alert(alert))
        self.flush()
        return self.report

    def flush(self, timeout_s: float | None = None) -> int:
        """Produce the group being spooled, then wait for acknowledgements.

        Returns how many messages are still unacknowledged.
        """
        self._produce_group()
        if self._producer is None:
            return 0
        return self._producer.flush(self.kafka.flush_timeout_s if timeout_s is None else timeout_s)

    def close(self) -> None:
        """Flush, then drop what is still queued (it stays pending in the spool)."""
        self._produce_group()
        if self._producer is not None:
            if self.flush():
                self._producer.purge()
                self._producer.poll(0)
            # Destroy the librdkafka handle here, deterministically: were it left to the
            # Producer's deallocation, a reference held elsewhere (an exception's traceback
            # frame) could defer that to the cycle collector, which then destroys a live
            # handle from whatever thread happens to collect (a crash librdkafka cannot survive).
            self._producer.close()
            self._producer = None
        for reason, count in self._delivery_errors.items():
            if count > 1:
                log.warning("%d alert deliveries failed: %s (kept in the spool)", count, reason)
        for text, count in self._producer_errors.items():
            if count > 1:
                log.warning("Kafka: %s (%d times in all)", text, count)
        self._delivery_errors.clear()
        self._producer_errors.clear()
        self.spool.close()
        self._kafka_log.removeFilter(self._duplicate_fail)
        self._kafka_log.removeFilter(self._secrets)
        log.removeFilter(self._secrets)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def replay(spool: Spool, publisher: AlertPublisher, retry_oversize: bool = True) -> PublishReport:
    """Republish every pending packet of ``spool`` (and oversize ones, under the current limit).

    Delivered packets are never touched, so nothing acknowledged is sent twice.  Packets are
    synced group by group before they are produced, like new ones: a process that died
    before its group sync may have left them in the page cache only.  A file cut short (a
    power cut before its group sync; such a packet was never produced) is moved to the
    spool's ``damaged`` folder and logged, never sent.
    """
    if retry_oversize:
        for entry in list(spool.entries(OVERSIZE)):
            spool.restore_oversize(entry.topic, entry.candid)
    entries = list(spool.entries(PENDING))
    for start in range(0, len(entries), publisher.sync_batch):
        group = []
        for entry in entries[start:start + publisher.sync_batch]:
            try:
                value = entry.path.read_bytes()
            except FileNotFoundError:
                continue    # acknowledged meanwhile by another replaying process
            if container_is_complete(value):
                group.append((entry, value))
            elif spool.mark_damaged(entry.topic, entry.candid):
                publisher.report.damaged += 1
                log.error("%s is cut short (%d bytes; written but not on disk when the machine went down, "
                          "never sent): moved to %s; rerun its quadrant to rebuild it", entry.path, len(value),
                          spool.path(entry.topic, entry.candid, DAMAGED))
        spool.sync([entry.path for entry, _ in group])
        for entry, value in group:
            publisher.produce_spooled(entry.topic, entry.candid, value)
    publisher.flush()
    return publisher.report
