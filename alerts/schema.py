"""The ZTF alert schema v4.02 shipped with the package, and Avro (de)serialisation.

The five ``.avsc`` files in ``alerts/schema/`` are verbatim copies of ZTF's v4.02 schema.
They are loaded in dependency order (cutout, candidate, prv_candidate, fp_hist, alert) with
:func:`fastavro.schema.load_schema_ordered`, which inlines each named type at its first use.
The container written with that schema therefore embeds a self-contained schema that any
Avro reader parses.  (Parsing ``alert.avsc`` with ``named_schemas`` instead wrote container
headers that referenced ``ztf.alert.candidate`` without defining it: unreadable elsewhere.)

Each Kafka message is one complete Avro container file holding one alert, as ZTF publishes,
so a broker reads it with ``next(fastavro.reader(io.BytesIO(value)))``.

Speed (the packet builder's target is 3000 alerts/s on one core, each alert with 30
``prv_candidates``, i.e. 330 us an alert for everything): fastavro 1.13's compiled writer
(its C extension, in use here) validates the datum against each branch of every union to
choose one, which costs ~58 us for one ``candidate`` record (103 fields, 79 of them
``["null", X]``) and ~40 us per ``prv_candidate`` entry on a quiet core (twice that under
load): ~1.3 ms an alert.  Tuple notation (branch named) still took ~50 us a ``candidate``
before the conversion.  So :func:`serialize_alert` uses a writer compiled once from the
parsed schema (:func:`_compile`; one generated function per record of flat fields, see
:func:`_flat_record_encoder`) for exactly the types v4.02 uses (primitives, ``["null", X]``,
records, arrays): ~15 us a ``candidate``, ~10 us a ``prv_candidate``.  Its checks are on
exact types: any value outside that subset (a numpy scalar, a bool in a float field, an
out-of-range int, tuple notation, ...) sends the whole alert through fastavro instead, so
the bytes are always those fastavro writes (tests compare them).
History entries already encoded when they were recorded (:class:`EncodedRecord`, from the
history store) are spliced in as they are: an object's past entries never change, and an
Avro array is its item count followed by the concatenated items.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import struct
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import fastavro
import fastavro.schema
import fastavro.validation
from pipeline.core.exits import BadInputError

__all__ = [
    "SCHEMA_VERSION", "SYNC_MARKER", "SCHEMA_FILES", "AlertFormatError", "alert_schema", "schema_field_names",
    "serialize_alert", "serialize_alert_fastavro", "encode_prv_candidate", "EncodedRecord", "container_is_complete",
    "deserialize_alert", "read_alert_file", "validate_alert",
]

SCHEMA_VERSION = "4.02"

#: Schema files in the order their named types are defined (each uses only earlier ones).
SCHEMA_FILES = ("cutout", "candidate", "prv_candidate", "fp_hist", "alert")


class AlertFormatError(BadInputError):
    """Bytes or a file that are not a readable Avro alert; the message names the source."""


def _schema_dir() -> Path:
    return Path(str(resources.files("alerts") / "schema"))


def _sorted_keys(node):
    if isinstance(node, dict):
        return {key: _sorted_keys(node[key]) for key in sorted(node)}
    if isinstance(node, list):
        return [_sorted_keys(item) for item in node]
    return node


@functools.lru_cache(maxsize=1)
def alert_schema() -> dict:
    """The parsed v4.02 ``ztf.alert`` schema (self-contained: nested records inlined).

    Every mapping's keys are sorted: fastavro orders a parsed field's properties by
    iterating a set, i.e. by the interpreter's string-hash seed, and a container embeds
    the schema as JSON, so without this two processes wrote different bytes for one alert.
    """
    directory = _schema_dir()
    parsed = fastavro.schema.load_schema_ordered([str(directory / f"{name}.avsc") for name in SCHEMA_FILES])
    # fastavro's bookkeeping entries ("__fastavro_parsed", "__named_schemas") stay as they are.
    return {key: value if key.startswith("__") else _sorted_keys(value) for key, value in parsed.items()}


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


# -- the compiled writer (see the module docstring for why it exists) -----------------------

class _Unencodable(Exception):
    """A value (or schema construct) outside the compiled writer's subset: fastavro decides."""


#: Errors after which the whole alert is written by fastavro instead (which then either
#: writes it, or raises its own error for a value the schema does not admit).
_FALLBACK_ERRORS = (_Unencodable, TypeError, ValueError, AttributeError, OverflowError, struct.error)
_NO_DEFAULT = object()
_INT_MIN, _INT_MAX, _LONG_MIN, _LONG_MAX = -2**31, 2**31 - 1, -2**63, 2**63 - 1
_ONE_BYTE = [_zigzag_varint(v) for v in range(-64, 64)]    # values -64..63 encode in one byte
_REAL_TYPES = frozenset((float, int))                    # fastavro writes both as float/double
_pack_float, _pack_double = struct.Struct("<f").pack, struct.Struct("<d").pack
_pack_branch_float, _pack_branch_double = struct.Struct("<Bf").pack, struct.Struct("<Bd").pack
_NULL, _BRANCH1 = b"\x00", b"\x02"     # union branch 0 (null) and 1, zigzag-encoded


def _varint(value: int) -> bytes:
    return _ONE_BYTE[value + 64] if -64 <= value < 64 else _zigzag_varint(value)


def _integer(low: int, high: int) -> Callable[[Any], bytes]:
    def encode(value) -> bytes:
        if type(value) is not int or not low <= value <= high:
            raise _Unencodable
        return _varint(value)
    return encode


def _real(pack) -> Callable[[Any], bytes]:
    def encode(value) -> bytes:
        if type(value) not in _REAL_TYPES:
            raise _Unencodable
        return pack(value)
    return encode


def _optional_real(pack_with_branch) -> Callable[[Any], bytes]:
    def encode(value) -> bytes:
        if value is None:
            return _NULL
        if type(value) not in _REAL_TYPES:
            raise _Unencodable
        return pack_with_branch(2, value)
    return encode


def _string(value) -> bytes:
    if type(value) is not str:
        raise _Unencodable
    data = value.encode()
    return _varint(len(data)) + data


def _bytes(value) -> bytes:
    if type(value) is not bytes:
        raise _Unencodable
    return _varint(len(value)) + value


_PRIMITIVES = {"int": _integer(_INT_MIN, _INT_MAX), "long": _integer(_LONG_MIN, _LONG_MAX),
               "float": _real(_pack_float), "double": _real(_pack_double), "string": _string, "bytes": _bytes}
_OPTIONAL_REALS = {"float": _optional_real(_pack_branch_float), "double": _optional_real(_pack_branch_double)}


def _optional(encode_value: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    def encode(value) -> bytes:
        return _NULL if value is None else _BRANCH1 + encode_value(value)
    return encode


def _optional_array(encode_item: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    def encode(value) -> bytes:
        if value is None:
            return _NULL
        if not isinstance(value, list):      # e.g. fastavro's tuple notation
            raise _Unencodable
        if not value:
            return b"\x02\x00"
        # Items recorded with their encoding (EncodedRecord) are spliced as they are.
        items = [getattr(item, "avro", None) or encode_item(item) for item in value]
        return b"".join([_BRANCH1, _varint(len(items)), *items, _NULL])
    return encode


_FLAT_TYPES = ("int", "long", "float", "double", "string", "bytes")


def _flat_field_type(field_type) -> tuple[str, bool] | None:
    """(primitive, optional) of a field typed X or ["null", X] with X in _FLAT_TYPES, else None."""
    if isinstance(field_type, str) and field_type in _FLAT_TYPES:
        return field_type, False
    if (isinstance(field_type, list) and len(field_type) == 2 and field_type[0] == "null"
            and isinstance(field_type[1], str) and field_type[1] in _FLAT_TYPES):
        return field_type[1], True
    return None


# Statements encoding ``v`` (the field's value) for each flat type; ``put`` appends bytes.
_FLAT_STATEMENTS = {
    "int": ["if type(v) is not int or not IMIN <= v <= IMAX: raise U",
            "put(ONE[v + 64] if -64 <= v < 64 else zigzag(v))"],
    "long": ["if type(v) is not int or not LMIN <= v <= LMAX: raise U",
             "put(ONE[v + 64] if -64 <= v < 64 else zigzag(v))"],
    "float": ["if type(v) not in REAL: raise U", "put(pack_float(v))"],
    "double": ["if type(v) not in REAL: raise U", "put(pack_double(v))"],
    "string": ["if type(v) is not str: raise U", "v = v.encode()", "put(varint(len(v)))", "put(v)"],
    "bytes": ["if type(v) is not bytes: raise U", "put(varint(len(v)))", "put(v)"],
}
_FLAT_OPTIONAL_REAL = {"float": "pack_branch_float", "double": "pack_branch_double"}


def _flat_record_encoder(schema: dict) -> Callable[[Any], bytes]:
    """One generated function encoding a record of flat fields, field by field, inline.

    Generated (once per record type) rather than a loop over per-field closures because
    the call per field was half of the cost (a ``candidate`` record took 42 us that way).
    """
    lines = ["def encode(datum):", "    get = datum.get", "    out = []", "    put = out.append"]
    defaults = []
    for field in schema["fields"]:
        primitive, optional = _flat_field_type(field["type"])
        default = field.get("default", _NO_DEFAULT)
        if default is None or default is _NO_DEFAULT:
            # A missing field reads as None: null for an optional field, and for any other
            # the type check fails, so fastavro reports the missing value.
            lines.append(f"    v = get({field['name']!r})")
        else:
            defaults.append(default)
            lines.append(f"    v = get({field['name']!r}, DEFAULTS[{len(defaults) - 1}])")
        statements = _FLAT_STATEMENTS[primitive]
        if optional and primitive in _FLAT_OPTIONAL_REAL:
            lines += ["    if v is None: put(NULL)", "    elif type(v) in REAL: "
                      f"put({_FLAT_OPTIONAL_REAL[primitive]}(2, v))", "    else: raise U"]
        elif optional:
            lines += ["    if v is None: put(NULL)", "    else:", "        put(BRANCH1)"]
            lines += [f"        {statement}" for statement in statements]
        else:
            lines += [f"    {statement}" for statement in statements]
    lines.append('    return b"".join(out)')
    namespace = {"U": _Unencodable, "IMIN": _INT_MIN, "IMAX": _INT_MAX, "LMIN": _LONG_MIN, "LMAX": _LONG_MAX,
                 "ONE": _ONE_BYTE, "zigzag": _zigzag_varint, "varint": _varint, "REAL": _REAL_TYPES,
                 "pack_float": _pack_float, "pack_double": _pack_double, "pack_branch_float": _pack_branch_float,
                 "pack_branch_double": _pack_branch_double, "NULL": _NULL, "BRANCH1": _BRANCH1,
                 "DEFAULTS": tuple(defaults)}
    exec(compile("\n".join(lines), f"<avro encoder {schema['name']}>", "exec"), namespace)
    return namespace["encode"]


def _record_fields(schema: dict, named: dict) -> list[tuple[str, Any, Callable[[Any], bytes]]]:
    return [(f["name"], f.get("default", _NO_DEFAULT), _compile(f["type"], named)) for f in schema["fields"]]


def _compile(schema, named: dict) -> Callable[[Any], bytes]:
    """An encoder for ``schema`` (parsed form); raises _Unencodable outside the v4.02 subset."""
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return _PRIMITIVES[schema]
        if schema in named:
            return named[schema]
        raise _Unencodable(schema)
    if isinstance(schema, list):
        if len(schema) != 2 or schema[0] != "null":
            raise _Unencodable(schema)
        branch = schema[1]
        if isinstance(branch, str) and branch in _OPTIONAL_REALS:
            return _OPTIONAL_REALS[branch]
        if isinstance(branch, dict) and branch.get("type") == "array":
            return _optional_array(_compile(branch["items"], named))
        return _optional(_compile(branch, named))
    kind = schema.get("type")
    if kind == "record" and all(_flat_field_type(f["type"]) for f in schema["fields"]):
        named[schema["name"]] = _flat_record_encoder(schema)
        return named[schema["name"]]
    if kind == "record":
        fields = _record_fields(schema, named)

        def encode_record(datum) -> bytes:
            get = datum.get
            return b"".join([encode(get(name, default)) for name, default, encode in fields])
        named[schema["name"]] = encode_record
        return encode_record
    if kind in _PRIMITIVES and "logicalType" not in schema:
        return _PRIMITIVES[kind]
    raise _Unencodable(schema)


@functools.lru_cache(maxsize=1)
def _compiled_alert_fields() -> tuple[list, dict]:
    """(the alert's fields as (name, default, encoder), encoders of the named records)."""
    named: dict = {}
    return _record_fields(alert_schema(), named), named


@functools.lru_cache(maxsize=1)
def _prv_candidate_schema() -> dict:
    prv_union = next(f["type"] for f in alert_schema()["fields"] if f["name"] == "prv_candidates")
    return fastavro.parse_schema(prv_union[1]["items"])


def encode_prv_candidate(entry: Mapping[str, Any]) -> bytes:
    """The Avro binary of one ``prv_candidate`` record (as fastavro writes it)."""
    try:
        return _compiled_alert_fields()[1]["ztf.alert.prv_candidate"](entry)
    except _FALLBACK_ERRORS:
        body = io.BytesIO()
        fastavro.schemaless_writer(body, _prv_candidate_schema(), entry)
        return body.getvalue()


class EncodedRecord(dict):
    """A ``prv_candidate`` entry that carries its Avro binary (``avro``), spliced unchanged.

    The history store returns past entries as these (their encoding is stored with them), so
    an alert's 30 history entries cost no encoding.  Any mutation through the dict methods
    drops ``avro`` (the entry is then encoded afresh); ``dict(entry)`` gives a plain dict.
    """

    __slots__ = ("avro",)

    def __init__(self, entry: Mapping[str, Any], avro: bytes | None = None):
        super().__init__(entry)
        self.avro = avro

    @classmethod
    def encode(cls, entry: Mapping[str, Any]) -> "EncodedRecord":
        return cls(entry, encode_prv_candidate(entry))

    def _changed(method):
        def changed(self, *args, **kwargs):
            self.avro = None
            return method(self, *args, **kwargs)
        changed.__name__ = method.__name__
        return changed

    __setitem__ = _changed(dict.__setitem__)
    __delitem__ = _changed(dict.__delitem__)
    __ior__ = _changed(dict.__ior__)
    update = _changed(dict.update)
    pop = _changed(dict.pop)
    popitem = _changed(dict.popitem)
    setdefault = _changed(dict.setdefault)
    clear = _changed(dict.clear)
    del _changed

    def __reduce__(self):
        return (EncodedRecord, (dict(self), self.avro))


def _container(record_parts: list[bytes]) -> bytes:
    size = sum(map(len, record_parts))
    return b"".join([_container_header(), _varint(1), _varint(size), *record_parts, SYNC_MARKER])


def serialize_alert_fastavro(alert: Mapping[str, Any]) -> bytes:
    """:func:`serialize_alert` with fastavro writing the record (the reference path)."""
    prv = alert.get("prv_candidates")
    if prv is not None and not isinstance(prv, tuple):
        # The branch named (fastavro's tuple notation) spares validating every entry.
        alert = {**alert, "prv_candidates": ("array", prv)}
    body = io.BytesIO()
    fastavro.schemaless_writer(body, alert_schema(), alert)
    return _container([body.getvalue()])


def serialize_alert(alert: Mapping[str, Any]) -> bytes:
    """One alert as a complete Avro container (schema embedded, no codec), as ZTF publishes.

    The result is byte for byte what ``fastavro.writer(buf, alert_schema(), [alert],
    sync_marker=SYNC_MARKER)`` writes (tests check it).  The header is built once (fastavro
    re-serialises the schema JSON for every container, ~1 ms) and each alert appended as one
    block (record count, byte size, record, sync marker); the record comes from the compiled
    writer, or from fastavro for values outside its subset.  The block codec is ``null``:
    Kafka compresses batches in transport (lz4), and cutouts are gzipped already.
    """
    fields = _compiled_alert_fields()[0]
    try:
        get = alert.get
        parts = [encode(get(name, default)) for name, default, encode in fields]
    except _FALLBACK_ERRORS:
        return serialize_alert_fastavro(alert)
    return _container(parts)


def _read_varint(value: bytes, position: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        byte = value[position]
        result |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), position
        shift += 7


def container_is_complete(value: bytes) -> bool:
    """Whether ``value`` is a whole one-alert container (not cut short, e.g. by a power cut).

    Our packets are checked by their framing (fixed header, one block whose declared size
    fits the length, the sync marker at the end); any other container by decoding it.
    """
    header = _container_header()
    if value.startswith(header):
        try:
            count, position = _read_varint(value, len(header))
            size, position = _read_varint(value, position)
        except IndexError:
            return False
        return count == 1 and len(value) == position + size + len(SYNC_MARKER) and value.endswith(SYNC_MARKER)
    try:
        deserialize_alert(value)
        return True
    except AlertFormatError:
        return False


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
