"""Run two brokers' own code from PyPI on ZTF-format alert packets and report what each made of them.

Executed with the broker venv's Python (``.venv-brokers/bin/python``, made by bootstrap.sh from
``tests/brokers/requirements*.txt``), never with skydiff's: AMPEL needs newer numpy/astropy than
skydiff pins, and nothing of skydiff is importable here -- this script only reads ``.avro`` files.
``tests/_brokers.py`` calls it and parses its output.

    run_brokers.py PATH [PATH ...]     .avro files, or folders searched recursively for them

Prints one JSON document to stdout::

    {"versions": {package: version},
     "decent_filter": {"standard": {...config}, "sso_only": {...config}, "keys_checked": [...]},
     "alerts": [{"file", "schemavsn", "objectId", "candid", "jd", "ra", "dec", "ssdistnr", "ssnamenr",
                 "ampel": {"ingest_error", "detections", "upper_limits",
                           "missing_fields", "null_fields",
                           "standard": {"accepted", "reason", "kind"},
                           "sso_only": {"accepted", "reason", "kind"}},
                 "fink": {module: {"value", "error", "nan_inputs"}}}]}

AMPEL, as its ZTF alert processor ingests a Kafka message: ``ampel.ztf.alert.ZiAlertSupplier``
(deserialize="avro", the first record of the container) over ``ampel.alert.load.FileAlertLoader``,
then ``ampel.ztf.t0.DecentFilter.process``.  DecentFilter says why it rejects an alert only in the
``extra`` of a debug log record (``{"isNone": field}``, ``{"missing": field}``, ``{"rb": value}``,
...); a log handler here keeps the last one.  ``kind`` is "null_field" for its "a field it needs is
null or missing" step and "cut" for every other rejection.  Because its history cuts come before
that step, ``missing_fields``/``null_fields`` also list, for every alert, which of the filter's own
``keys_to_check`` are absent/None in the latest photopoint, whatever rejected the alert first.
Two configurations run (both with ``gaia_rs=0``: its Gaia veto is a catalogue web service):
"standard", the cuts of AMPEL's follow-up scanners, and "sso_only", every cut opened except the
solar-system distance (``0 <= ssdistnr < min_sso_dist``), so its rejections are exactly
"null field" or "known solar-system object".

Fink: its science modules and filters are Spark pandas UDFs; their Python function ``.func`` is
called on pandas columns built as Spark's Arrow transfer hands them over -- a null number becomes
NaN (whole column float64), a null string None, and ``c<name>`` (fink_utils ``concat_col``) is the
``prv_candidates`` values followed by the candidate's own, as a float array with NaN for nulls.
Each module runs on the whole batch, as Spark would; if that raises, it runs alert by alert to
say which alerts break it.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import socket
import sys
import traceback
import warnings
from importlib import metadata
from pathlib import Path


def _forbid_network() -> None:
    """Brokers' code must not reach out (the test suite runs offline): fail loudly if it tries."""
    def refuse(self, address, *args, **kwargs):
        if isinstance(address, tuple) and str(address[0]) in ("127.0.0.1", "localhost", "::1"):
            return _connect(self, address, *args, **kwargs)
        raise OSError(f"run_brokers: network access attempted to {address!r}")
    _connect = socket.socket.connect
    socket.socket.connect = refuse


_forbid_network()
warnings.filterwarnings("ignore")          # PySpark's pandas-UDF deprecation chatter on import
logging.getLogger("py4j").setLevel(logging.ERROR)

import fastavro                                                   # noqa: E402
import numpy as np                                                # noqa: E402
import pandas as pd                                               # noqa: E402
from ampel.alert.load.FileAlertLoader import FileAlertLoader      # noqa: E402
from ampel.base.AuxUnitRegister import AuxUnitRegister            # noqa: E402
from ampel.log.AmpelLogger import AmpelLogger                     # noqa: E402
from ampel.ztf.alert.ZiAlertSupplier import ZiAlertSupplier       # noqa: E402
from ampel.ztf.t0.DecentFilter import DecentFilter                # noqa: E402
from fink_filters.ztf.filter_quality_cuts.filter import ztf_quality_cuts                          # noqa: E402
from fink_filters.ztf.livestream.filter_fast_riser_candidates.filter import fast_riser_candidates  # noqa: E402
from fink_filters.ztf.livestream.filter_sso_ztf_candidates.filter import sso_ztf_candidates        # noqa: E402
from fink_science.ztf.asteroids.processor import roid_catcher                                      # noqa: E402
from fink_science.ztf.nalerthist.processor import nalerthist                                      # noqa: E402

PACKAGES = ("ampel-ztf", "ampel-alerts", "ampel-core", "ampel-interface", "fink-science", "fink-filters",
            "fink-utils", "pandas", "pyarrow", "pyspark", "numpy")

# DecentFilter as AMPEL's neutrino and gravitational-wave follow-up scanners configure it
# (min_ndet 1, min_tspan -1 "default 0 rejects everything", max_fwhm 5.5, max_elong 1.4, ...),
# with two changes for offline, single-exposure use: gaia_rs=0 (the Gaia veto is a catalogue
# web service) and min_archive_tspan=-1 (with its default 0 a first detection, jdendhist ==
# jdstarthist, is rejected by the archive-length cut before the solar-system one).
STANDARD = dict(min_ndet=1, min_tspan=-1.0, max_tspan=365.0, min_archive_tspan=-1.0, max_archive_tspan=1e5,
                min_rb=0.3, min_drb=0.0, max_fwhm=5.5, max_elong=1.4, max_magdiff=1.0, max_nbad=2,
                min_sso_dist=20.0, min_gal_lat=-1.0,
                ps1_sgveto_rad=1.0, ps1_sgveto_th=0.8, ps1_confusion_rad=3.0, ps1_confusion_sg_tol=0.1,
                gaia_rs=0.0, gaia_pm_signif=3.0, gaia_plx_signif=3.0, gaia_veto_gmag_min=9.0,
                gaia_veto_gmag_max=20.0, gaia_excessnoise_sig_max=999.0)
# Every cut opened but the solar-system distance: a rejection is a null field or ssdistnr.
# (ps1_sgveto_th=2 and ps1_confusion_rad=-1e9 make the PS1 vetoes impossible, since
# distpsnr1 = -999 "nothing there" is below any positive radius.)
SSO_ONLY = dict(STANDARD, min_ndet=0, min_tspan=-1e9, max_tspan=1e9, min_archive_tspan=-1e9,
                max_archive_tspan=1e9, min_rb=-1e9, max_fwhm=1e9, max_elong=1e9, max_magdiff=1e9,
                ps1_sgveto_rad=-1e9, ps1_sgveto_th=2.0, ps1_confusion_rad=-1e9, ps1_confusion_sg_tol=-1.0)


class _LastRecord(logging.Handler):
    """Keeps the last log record an AMPEL unit emits (DecentFilter's rejection reason is its extra)."""

    def __init__(self):
        super().__init__(level=0)
        self.last = None

    def handle(self, record):
        self.last = record
        return True

    def flush(self):
        pass


def _logger() -> tuple[AmpelLogger, _LastRecord]:
    logger = AmpelLogger.get_logger()
    capture = _LastRecord()
    logger.handlers = [capture]
    logger.level = 0
    logger.verbose = 2
    return logger, capture


def _decent(config: dict, logger: AmpelLogger) -> DecentFilter:
    unit = DecentFilter(logger=logger, **config)
    unit.post_init()                    # an AMPEL context would call it; we run the unit bare
    return unit


def _json_value(value):
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return _json_value(float(value))
    if isinstance(value, np.bool_):
        return bool(value)
    return str(value)


def _run_filter(unit: DecentFilter, capture: _LastRecord, alert) -> dict:
    capture.last = None
    result = unit.process(alert)
    if result is not None and result is not False:
        return {"accepted": True, "reason": None, "kind": None}
    extra = getattr(capture.last, "extra", None) or {}
    reason = {k: _json_value(v) for k, v in extra.items()}
    kind = "null_field" if {"isNone", "missing"} & set(reason) else "cut"
    return {"accepted": False, "reason": reason, "kind": kind}


def _ampel(path: Path, filters: dict, capture: _LastRecord) -> dict:
    supplier = ZiAlertSupplier(loader={"unit": "FileAlertLoader", "config": {"files": [str(path)]}},
                               deserialize="avro")
    try:
        alert = next(supplier)
    except Exception as error:          # what AMPEL's alert processor would log and skip
        return {"ingest_error": f"{type(error).__name__}: {error}"}
    latest = alert.datapoints[0]
    keys = next(iter(filters.values())).keys_to_check
    out = {"ingest_error": None,
           "detections": sum(1 for dp in alert.datapoints if dp.get("candid") is not None),
           "upper_limits": sum(1 for dp in alert.datapoints if dp.get("candid") is None),
           "missing_fields": [k for k in keys if k not in latest],
           "null_fields": [k for k in keys if k in latest and latest[k] is None]}
    for name, unit in filters.items():
        out[name] = _run_filter(unit, capture, alert)
    return out


NUMERIC_AVRO = {"int", "long", "float", "double"}


def _numeric_fields(writer_schema: dict) -> set[str]:
    """The candidate fields the packet's writer schema types as numbers (nullable or not)."""
    def named(schema, name):
        if isinstance(schema, dict):
            if schema.get("name", "").split(".")[-1] == name:
                return schema
            for value in schema.get("fields", []) + ([schema["items"]] if "items" in schema else []):
                found = named(value.get("type", value) if isinstance(value, dict) else value, name)
                if found:
                    return found
        elif isinstance(schema, list):
            for value in schema:
                found = named(value, name)
                if found:
                    return found
        return None

    candidate = named(writer_schema, "candidate") or {}
    out = set()
    for field in candidate.get("fields", []):
        types = field["type"] if isinstance(field["type"], list) else [field["type"]]
        if any(t in NUMERIC_AVRO for t in types if isinstance(t, str)):
            out.add(field["name"])
    return out


def _scalar_column(values: list, numeric: bool) -> pd.Series:
    """One candidate field as Spark's Arrow transfer hands it to pandas: a number column is int64
    without nulls, else float64 with NaN for null (also when every value is null: Arrow knows
    the type from the schema); a string column is objects with None."""
    if not numeric:
        return pd.Series(values, dtype="object")
    if all(isinstance(v, int) for v in values):
        return pd.Series(values, dtype="int64")
    return pd.Series([np.nan if v is None else float(v) for v in values], dtype="float64")


def _concat_column(records: list[dict], name: str) -> pd.Series:
    """fink_utils.spark.utils.concat_col: prv_candidates.<name> then candidate.<name>."""
    arrays = []
    for r in records:
        values = [p.get(name) for p in (r.get("prv_candidates") or [])] + [r["candidate"].get(name)]
        arrays.append(np.array([np.nan if v is None else float(v) for v in values], dtype=float))
    return pd.Series(arrays, dtype="object")


def _fink_frame(records: list[dict], numeric: set[str]) -> pd.DataFrame:
    fields = sorted({k for r in records for k in r["candidate"]})
    frame = pd.DataFrame({k: _scalar_column([r["candidate"].get(k) for r in records], k in numeric) for k in fields})
    for name in ("jd", "magpsf", "fid"):
        frame["c" + name] = _concat_column(records, name)
    return frame


def _nan_inputs(frame: pd.DataFrame, columns: list[str]) -> list[list[str]]:
    """Per alert, the scalar input columns that are NaN/None (a null field as Fink sees it)."""
    nan = pd.DataFrame({c: frame[c].isna() for c in columns}, index=frame.index)
    return [[c for c in columns if nan[c].iloc[i]] for i in range(len(frame))]


def _call(func, frame: pd.DataFrame, args: list[str], scalar_inputs: list[str]) -> list[dict]:
    """Run one Fink UDF body on the batch; per alert where the batch raises."""
    nan = _nan_inputs(frame, scalar_inputs)

    def run(rows: pd.DataFrame):
        series = [rows[a].reset_index(drop=True) for a in args]
        return list(func(*series))

    try:
        values = run(frame)
        return [{"value": _json_value(v), "error": None, "nan_inputs": n} for v, n in zip(values, nan)]
    except Exception:
        out = []
        for i in range(len(frame)):
            try:
                (value,) = run(frame.iloc[[i]])
                out.append({"value": _json_value(value), "error": None, "nan_inputs": nan[i]})
            except Exception as error:
                out.append({"value": None, "error": f"{type(error).__name__}: {error}", "nan_inputs": nan[i]})
        return out


def _fink(records: list[dict], numeric: set[str]) -> list[dict]:
    frame = _fink_frame(records, numeric)
    for column in ("ndethist", "sgscore1", "ssdistnr", "distpsnr1", "rb", "nbad", "drb", "jd", "jdstarthist"):
        if column not in frame:                 # a field the packet's schema lacks: Spark gives null
            frame[column] = np.nan
    results = {}
    roid = _call(roid_catcher.func, frame, ["cjd", "cmagpsf", "ndethist", "sgscore1", "ssdistnr", "distpsnr1"],
                 ["ndethist", "sgscore1", "ssdistnr", "distpsnr1"])
    results["roid_catcher"] = roid
    results["nalerthist"] = _call(nalerthist.func, frame, ["cmagpsf"], [])
    results["ztf_quality_cuts"] = _call(ztf_quality_cuts.func, frame, ["rb", "nbad"], ["rb", "nbad"])
    # The filters that read roid take it as Fink's pipeline hands it on: the label column (0 where
    # roid_catcher raised, so they still run on the other alerts; that error is reported above).
    frame["roid"] = pd.Series([r["value"] if r["value"] is not None else 0 for r in roid], dtype="int64")
    results["sso_ztf_candidates"] = _call(sso_ztf_candidates.func, frame, ["roid"], [])
    # cdsxmatch is Fink's CDS cross-match (a web service); "Unknown" is what Fink writes for no match.
    frame["cdsxmatch"] = pd.Series(["Unknown"] * len(frame), dtype="object")
    frame["cjdc"], frame["cmagpsfc"], frame["cfidc"] = frame["cjd"], frame["cmagpsf"], frame["cfid"]
    results["fast_riser_candidates"] = _call(
        fast_riser_candidates.func, frame, ["cdsxmatch", "roid", "drb", "jd", "jdstarthist", "cjdc", "cmagpsfc",
                                            "cfidc"], ["drb", "jd", "jdstarthist"])
    return [{name: results[name][i] for name in results} for i in range(len(records))]


def _avro_files(paths: list[str]) -> list[Path]:
    files = []
    if any(not str(p).strip() for p in paths):
        raise SystemExit("run_brokers: an empty path (it would mean the current folder)")
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.rglob("*.avro")))
        elif p.is_file():
            files.append(p)
        else:
            raise SystemExit(f"run_brokers: no such file or folder: {p}")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help=".avro files or folders holding them")
    args = parser.parse_args(argv)
    files = _avro_files(args.paths)
    out, sys.stdout = sys.stdout, sys.stderr     # AMPEL's loggers print to stdout: keep it for the JSON

    AuxUnitRegister._dyn["FileAlertLoader"] = FileAlertLoader    # an AMPEL context registers it from its config
    logger, capture = _logger()
    filters = {"standard": _decent(STANDARD, logger), "sso_only": _decent(SSO_ONLY, logger)}

    alerts, records, schemas = [], [], []
    for path in files:
        with open(path, "rb") as f:
            reader = fastavro.reader(io.BytesIO(f.read()))
            record = next(reader)
        schemas.append(json.dumps(reader.writer_schema, sort_keys=True))
        candidate = record.get("candidate") or {}
        entry = {"file": str(path), "schemavsn": record.get("schemavsn"), "objectId": record.get("objectId"),
                 "candid": record.get("candid"),
                 **{k: _json_value(candidate.get(k)) for k in ("jd", "ra", "dec", "ssdistnr", "ssnamenr")},
                 "ampel": _ampel(path, filters, capture)}
        alerts.append(entry)
        records.append(record)
    # Spark reads one schema per DataFrame, so Fink's modules run on the packets of each writer
    # schema as one batch (real samples span several schemas; ours are all v4.02).
    by_schema: dict[str, list[int]] = {}
    for i, schema in enumerate(schemas):
        by_schema.setdefault(schema, []).append(i)
    for schema, rows in by_schema.items():
        numeric = _numeric_fields(json.loads(schema))
        for i, result in zip(rows, _fink([records[i] for i in rows], numeric)):
            alerts[i]["fink"] = result

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    json.dump({"versions": versions,
               "decent_filter": {"standard": STANDARD, "sso_only": SSO_ONLY,
                                 "keys_checked": list(filters["standard"].keys_to_check)},
               "alerts": alerts}, out)
    out.write("\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except Exception:
        traceback.print_exc()
        sys.exit(1)
