"""Reading alerts back from Kafka (``skydiff alerts tail``), as a broker's consumer would.

Each message value is decoded with a plain ``next(fastavro.reader(io.BytesIO(value)))``
(:func:`alerts.schema.deserialize_alert`), exactly as AMPEL does.
"""
from __future__ import annotations

import time
from typing import Any, Iterator

from confluent_kafka import Consumer, KafkaError, KafkaException

from alerts.schema import deserialize_alert
from pipeline.core.exits import RetryableError

__all__ = ["consumer_config", "consume_alerts", "BrokerUnreachableError"]


class BrokerUnreachableError(RetryableError):
    """No broker answered within the time allowed (exit 75: try again later)."""


def consumer_config(bootstrap: str, group: str, kafka=None, session_timeout_ms: int = 6000) -> dict[str, Any]:
    """Consumer settings: from the earliest offset, large messages allowed, auto-commit.

    ``kafka`` (a KafkaConfig) contributes its security settings; credentials are never logged.
    """
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
        "enable.auto.commit": True, "session.timeout.ms": session_timeout_ms,
        "receive.message.max.bytes": 64 * 1024 * 1024, "fetch.max.bytes": 52 * 1024 * 1024,
    }
    if kafka is not None:
        conf["security.protocol"] = kafka.security_protocol
        optional = {"sasl.mechanism": kafka.sasl_mechanism, "sasl.username": kafka.sasl_username,
                    "sasl.password": kafka.sasl_password, "ssl.ca.location": kafka.ssl_ca_location}
        conf.update({key: value for key, value in optional.items() if value})
    return conf


def consume_alerts(conf: dict[str, Any], topics: list[str], max_messages: int | None = None,
                   timeout_s: float = 30.0, idle_s: float | None = None) -> Iterator[tuple[Any, dict]]:
    """Yield ``(message, alert)`` pairs until ``max_messages``, ``timeout_s`` or ``idle_s`` of silence.

    Parameters
    ----------
    conf : dict
        Consumer settings (:func:`consumer_config`).
    topics : list of str
        Topics to subscribe to.
    max_messages : int, optional
        Stop after this many alerts.
    timeout_s : float
        Stop after this long in total.
    idle_s : float, optional
        Stop after this long without a message, once at least one has arrived.
    """
    consumer = Consumer(conf)
    try:
        # A consumer polls a dead broker silently forever; without this check "no broker"
        # and "no alerts yet" would both end as an empty, successful read.
        try:
            consumer.list_topics(timeout=min(10.0, max(timeout_s, 1.0)))
        except KafkaException as exc:
            raise BrokerUnreachableError(f"broker {conf.get('bootstrap.servers')} did not answer: "
                                         f"{exc.args[0].str() if exc.args else exc}") from None
        consumer.subscribe(topics)
        deadline = time.monotonic() + timeout_s
        last = None
        count = 0
        while time.monotonic() < deadline and (max_messages is None or count < max_messages):
            if idle_s is not None and last is not None and time.monotonic() - last > idle_s:
                break
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                    continue
                raise KafkaException(msg.error())
            last = time.monotonic()
            count += 1
            yield msg, deserialize_alert(msg.value(), f"{msg.topic()}[{msg.partition()}]@{msg.offset()}")
    finally:
        consumer.close()
