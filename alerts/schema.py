"""The ZTF alert schema v4.02 shipped with the package, and Avro (de)serialisation.

The five ``.avsc`` files in ``alerts/schema/`` are verbatim copies of ZTF's v4.02 schema.
They are loaded in dependency order (cutout, candidate, prv_candidate, fp_hist, alert) with
:func:`fastavro.schema.load_schema_ordered`, which inlines each named type at its first use.
The container written with that schema therefore embeds a self-contained schema that any
Avro reader parses.  (Parsing ``alert.avsc`` with ``named_schemas`` instead wrote container
headers that referenced ``ztf.alert.candidate`` without defining it: unreadable elsewhere.)

Each Kafka message is one complete Avro container file holding one alert, as ZTF publishes,
so a broker reads it with ``next(fastavro.reader(io.BytesIO(value)))``.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import fastavro
import fastavro.schema
import fastavro.validation

__all__ = [
    "SCHEMA_VERSION", "SYNC_MARKER", "SCHEMA_FILES", "AlertFormatError", "alert_schema", "schema_field_names",
    "serialize_alert", "deserialize_alert", "read_alert_file", "validate_alert",
]

SCHEMA_VERSION = "4.02"

#: Schema files in the order their named types are defined (each uses only earlier ones).
SCHEMA_FILES = ("cutout", "candidate", "prv_candidate", "fp_hist", "alert")


class AlertFormatError(ValueError):
    """Bytes or a file that are not a readable Avro alert; the message names the source."""


def _schema_dir() -> Path:
    return Path(str(resources.files("alerts") / "schema"))


@functools.lru_cache(maxsize=1)
def alert_schema() -> dict:
    """The parsed v4.02 ``ztf.alert`` schema (self-contained: nested records inlined)."""
    directory = _schema_dir()
    return fastavro.schema.load_schema_ordered([str(directory / f"{name}.avsc") for name in SCHEMA_FILES])


@functools.lru_cache(maxsize=None)
def schema_field_names(record: str) -> tuple[str, ...]:
    """Field names of one of the schema's records (``"candidate"``, ``"prv_candidate"``, ...)."""
    import json
    data = json.loads((_schema_dir() / f"{record}.avsc").read_text())
    return tuple(f["name"] for f in data["fields"])


#: The container's sync marker: fixed, so a rerun writes byte-identical packets.
SYNC_MARKER = hashlib.sha256(b"skydiff alert container v4.02").digest()[:16]


@functools.lru_cache(maxsize=1)
def _container_header() -> bytes:
    buffer = io.BytesIO()
    fastavro.writer(buffer, alert_schema(), [], codec="null", sync_marker=SYNC_MARKER)
    return buffer.getvalue()


def _zigzag_varint(value: int) -> bytes:
    value = (value << 1) ^ (value >> 63)
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def serialize_alert(alert: Mapping[str, Any]) -> bytes:
    """One alert as a complete Avro container (schema embedded, no codec), as ZTF publishes.

    The result is byte for byte what ``fastavro.writer(buf, alert_schema(), [alert],
    sync_marker=SYNC_MARKER)`` writes (a test checks it), only faster: fastavro re-serialises
    the schema JSON for every container (~1 ms), so the header is built once and each alert
    appended as one block (record count, byte size, record, sync marker).  The
    ``prv_candidates`` union branch is named (fastavro's tuple notation), which spares
    fastavro validating every history entry to choose the branch.  The block codec is
    ``null``: Kafka compresses batches in transport (lz4), and cutouts are gzipped already.
    """
    prv = alert.get("prv_candidates")
    if prv is not None and not isinstance(prv, tuple):
        alert = {**alert, "prv_candidates": ("array", prv)}
    body = io.BytesIO()
    fastavro.schemaless_writer(body, alert_schema(), alert)
    record = body.getvalue()
    return _container_header() + _zigzag_varint(1) + _zigzag_varint(len(record)) + record + SYNC_MARKER


def deserialize_alert(value: bytes, source: str = "<message>") -> dict:
    """The first (only) alert of an Avro container, with any writer schema (ZTF v1-v4)."""
    try:
        return next(fastavro.reader(io.BytesIO(value)))
    except StopIteration:
        raise AlertFormatError(f"{source}: Avro container holds no alert") from None
    except (ValueError, EOFError, IndexError, KeyError, TypeError) as exc:
        raise AlertFormatError(f"{source}: not a readable Avro alert container ({exc})") from None


def read_alert_file(path: str | os.PathLike | BinaryIO) -> dict:
    """Read the alert in an ``.avro`` file (ours or a ZTF packet of any schema version)."""
    name = getattr(path, "name", str(path))
    try:
        data = Path(path).read_bytes() if not hasattr(path, "read") else path.read()
    except OSError as exc:
        raise AlertFormatError(f"{name}: cannot read alert file: {exc.strerror}") from None
    return deserialize_alert(data, name)


def validate_alert(alert: Mapping[str, Any]) -> None:
    """Raise :class:`fastavro.validation.ValidationError` unless ``alert`` fits v4.02."""
    fastavro.validation.validate(alert, alert_schema(), raise_errors=True, strict=True)
