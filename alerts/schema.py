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
import io
import os
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import fastavro
import fastavro.schema
import fastavro.validation

__all__ = [
    "SCHEMA_VERSION", "SCHEMA_FILES", "AlertFormatError", "alert_schema", "schema_field_names",
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


def serialize_alert(alert: Mapping[str, Any]) -> bytes:
    """One alert as a complete Avro container (schema embedded, no codec), as ZTF publishes.

    The block codec is ``null``: Kafka compresses whole batches at the transport level
    (lz4), and cutouts are already gzipped FITS.
    """
    buffer = io.BytesIO()
    fastavro.writer(buffer, alert_schema(), [alert], validator=False)
    return buffer.getvalue()


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
