"""The durable alert spool: every packet is on local disk before Kafka sees it.

Layout under the spool root::

    <topic>/pending/<candid>.avro     written (atomically), not yet acknowledged
    <topic>/delivered/<candid>.avro   acknowledged by the broker (acks=all)
    <topic>/oversize/<candid>.avro    larger than message.max.bytes: never produced
    delivered.log                     one line per acknowledgement:
                                      "<UTC time> <topic> <candid> <partition> <offset>"

Each file is one complete Avro container holding one alert (the Kafka message value), so
``fastavro.reader`` opens any of them.  A packet moves from ``pending`` to ``delivered`` only
in the producer's delivery callback for a successful acknowledgement; the move is a rename,
and the log line follows it (lines shorter than PIPE_BUF, written with O_APPEND, never
interleave between processes).  :meth:`Spool.put` refuses a candid already delivered, which
makes reruns publish nothing new; a pending one is rewritten in place.  Pruning old
``delivered`` folders is safe for disk space but removes the rerun guard for those candids.

Without a broker (empty ``bootstrap_servers``) packets simply stay in ``pending``, and
``skydiff alerts replay`` publishes them later.  Oversize packets stay whole in
``oversize``; replay retries them, so raising the limit (``kafka.message_max_bytes``,
matching the brokers' ``message.max.bytes``) and replaying publishes them.
"""
from __future__ import annotations

import datetime
import os
import threading
from pathlib import Path
from typing import Iterator, NamedTuple

__all__ = ["Spool", "SpoolEntry", "DeliveryRecord", "PENDING", "DELIVERED", "OVERSIZE"]

PENDING, DELIVERED, OVERSIZE = "pending", "delivered", "oversize"
_LOG = "delivered.log"


class SpoolEntry(NamedTuple):
    topic: str
    candid: int
    path: Path


class DeliveryRecord(NamedTuple):
    time: str
    topic: str
    candid: int
    partition: int
    offset: int


class Spool:
    """A spool directory shared by every process publishing from this machine.

    Parameters
    ----------
    root : str or Path
        The spool folder (created if missing).
    fsync : bool
        Flush each packet file to disk before it is produced, so a power cut after the
        send cannot lose it (a process crash never can: the page cache survives it).
    """

    def __init__(self, root: str | os.PathLike, fsync: bool = True):
        self.root = Path(root)
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        self._made: set[Path] = set()
        self._log_lock = threading.Lock()
        self._log_fd: int | None = None

    def path(self, topic: str, candid: int, state: str = PENDING) -> Path:
        return self.root / topic / state / f"{int(candid)}.avro"

    def _folder(self, topic: str, state: str) -> Path:
        folder = self.root / topic / state
        if folder not in self._made:
            folder.mkdir(parents=True, exist_ok=True)
            self._made.add(folder)
        return folder

    def state(self, topic: str, candid: int) -> str | None:
        """``"delivered"``, ``"pending"``, ``"oversize"`` or None (never spooled)."""
        for state in (DELIVERED, PENDING, OVERSIZE):
            if self.path(topic, candid, state).exists():
                return state
        return None

    def put(self, topic: str, candid: int, value: bytes) -> bool:
        """Write a packet atomically to ``pending``; False (nothing written) if already delivered."""
        if self.path(topic, candid, DELIVERED).exists():
            return False
        folder = self._folder(topic, PENDING)
        final = folder / f"{int(candid)}.avro"
        temporary = folder / f".{int(candid)}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(temporary, "wb") as handle:
            handle.write(value)
            if self.fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temporary, final)
        return True

    def _move(self, topic: str, candid: int, source: str, target: str) -> bool:
        try:
            os.replace(self.path(topic, candid, source), self._folder(topic, target) / f"{int(candid)}.avro")
            return True
        except FileNotFoundError:
            return False

    def mark_delivered(self, topic: str, candid: int, partition: int, offset: int) -> bool:
        """Record the broker's acknowledgement (rename, then one log line)."""
        if not self._move(topic, candid, PENDING, DELIVERED):
            return False
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        line = f"{stamp} {topic} {int(candid)} {int(partition)} {int(offset)}\n".encode()
        with self._log_lock:
            if self._log_fd is None:
                self._log_fd = os.open(self.root / _LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            os.write(self._log_fd, line)
        return True

    def mark_oversize(self, topic: str, candid: int) -> bool:
        """Set a packet aside that exceeds the message size limit."""
        return self._move(topic, candid, PENDING, OVERSIZE)

    def restore_oversize(self, topic: str, candid: int) -> bool:
        """Put a set-aside packet back into ``pending`` (for a replay under a larger limit)."""
        return self._move(topic, candid, OVERSIZE, PENDING)

    def entries(self, state: str = PENDING) -> Iterator[SpoolEntry]:
        """Packets in one state, topic by topic, in candid order."""
        if not self.root.exists():
            return
        for topic_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            folder = topic_dir / state
            if not folder.is_dir():
                continue
            candids = sorted(int(p.stem) for p in folder.glob("*.avro") if p.stem.isdigit())
            for candid in candids:
                yield SpoolEntry(topic_dir.name, candid, folder / f"{candid}.avro")

    def count(self, state: str = PENDING) -> int:
        return sum(1 for _ in self.entries(state))

    def delivery_log(self) -> list[DeliveryRecord]:
        """Every acknowledgement recorded, in order."""
        path = self.root / _LOG
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            stamp, topic, candid, partition, offset = line.split()
            records.append(DeliveryRecord(stamp, topic, int(candid), int(partition), int(offset)))
        return records

    def close(self) -> None:
        with self._log_lock:
            if self._log_fd is not None:
                os.close(self._log_fd)
                self._log_fd = None
