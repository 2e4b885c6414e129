"""Are two runs of one exposure's products the same? (local executor vs Slurm, rerun vs first run)

:func:`compare_exposure_outputs` takes two configurations whose ``[paths]`` hold the two
runs' outputs, spools and matchfiles (catalogues and references may be shared) and lists
every difference in what a survey's users receive: each quadrant's status (state, stage,
exit code, reason, figures), its candidates table (every column), its difference and
Scorr images (every pixel), the alert packets spooled (same candids, same bytes, object
names allowed a consistent one-to-one renaming: see :func:`_compare_alerts`) and the
matchfile rows of the exposure (light-curve and unmatched rows, every column).  Timings,
host names and attempt times legitimately differ and are not compared.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from pipeline.core.config import Config
from pipeline.matchfile.lightcurves import MatchfileSnapshot
from pipeline.run.quadrant import quadrant_dir, read_status

__all__ = ["compare_exposure_outputs", "STATUS_FIELDS", "IMAGE_PRODUCTS"]

#: Status-record entries that must agree (timings, times and hosts may not).
STATUS_FIELDS = ("state", "stage", "exit_code", "reason", "attempt")
#: Figures of the stages' status sections that must agree.
STATUS_SECTIONS = {"subtraction": ("n_candidates",), "alerts": ("built", "unacknowledged"),
                   "matchfile": None}          # None: the whole section
#: Images of a subtraction folder compared pixel by pixel.
IMAGE_PRODUCTS = ("diff.fits", "scorr.fits")


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind == "f":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def _compare_status(a: dict | None, b: dict | None, where: str) -> list[str]:
    if a is None or b is None:
        return [] if a is b else [f"{where}: status record only in run {'A' if b is None else 'B'}"]
    problems = [f"{where}: status {k} {a.get(k)!r} != {b.get(k)!r}" for k in STATUS_FIELDS if a.get(k) != b.get(k)]
    for section, keys in STATUS_SECTIONS.items():
        sa, sb = a.get(section) or {}, b.get(section) or {}
        for key in keys or sorted(set(sa) | set(sb)):
            if sa.get(key) != sb.get(key):
                problems.append(f"{where}: status {section}.{key} {sa.get(key)!r} != {sb.get(key)!r}")
    return problems


def _compare_table(a: Path, b: Path, where: str) -> list[str]:
    ta, tb = Table.read(a), Table.read(b)
    if ta.colnames != tb.colnames or len(ta) != len(tb):
        return [f"{where}: {a.name} has {len(ta)} rows x {ta.colnames} vs {len(tb)} rows x {tb.colnames}"]
    return [f"{where}: {a.name} column {name} differs" for name in ta.colnames
            if not _same_array(np.asarray(ta[name]), np.asarray(tb[name]))]


def _compare_images(a: Path, b: Path, where: str) -> list[str]:
    with fits.open(a, memmap=False) as ha, fits.open(b, memmap=False) as hb:
        if len(ha) != len(hb):
            return [f"{where}: {a.name} has {len(ha)} vs {len(hb)} HDUs"]
        return [f"{where}: {a.name} HDU {k} ({x.name}) pixels differ" for k, (x, y) in enumerate(zip(ha, hb))
                if (x.data is None) != (y.data is None)
                or (x.data is not None and not _same_array(np.asarray(x.data), np.asarray(y.data)))]


def _compare_quadrant(cfg_a: Config, cfg_b: Config, expid: int, rcid: int) -> list[str]:
    where = f"rcid {rcid:02d}"
    folder_a, folder_b = quadrant_dir(cfg_a, expid, rcid), quadrant_dir(cfg_b, expid, rcid)
    problems = _compare_status(read_status(folder_a), read_status(folder_b), where)
    for name in ("candidates.ecsv", *IMAGE_PRODUCTS):
        pa, pb = folder_a / "subtraction" / name, folder_b / "subtraction" / name
        if pa.is_file() != pb.is_file():
            problems.append(f"{where}: {name} only in run {'A' if pa.is_file() else 'B'}")
        elif pa.is_file():
            compare = _compare_table if name.endswith(".ecsv") else _compare_images
            problems.extend(compare(pa, pb, where))
    return problems


def _spooled_packets(cfg: Config) -> dict[tuple[str, int], Path]:
    """Every packet in the spool (pending or delivered), by (topic, candid)."""
    from alerts.spool import DELIVERED, PENDING, Spool
    spool = Spool(cfg.paths.resolve("spool"), fsync=False)
    return {(e.topic, e.candid): e.path for state in (PENDING, DELIVERED) for e in spool.entries(state)}


def _object_id(packet: bytes) -> str:
    from alerts.schema import deserialize_alert
    return deserialize_alert(packet)["objectId"]


def _compare_alerts(cfg_a: Config, cfg_b: Config) -> tuple[list[str], int]:
    """Same candids, and packets byte-identical once run A's object names are put into run B's.

    Object names come from a per-year counter in the order quadrants first detect objects
    (as ZTF's), and quadrants run concurrently, so two runs may name the same object
    differently; the renaming must be one-to-one and consistent over every packet.
    """
    a, b = _spooled_packets(cfg_a), _spooled_packets(cfg_b)
    problems = []
    if set(a) != set(b):
        problems.append(f"alerts: {len(set(a) - set(b))} candid(s) only in run A, {len(set(b) - set(a))} only in "
                        f"run B")
    renaming: dict[str, str] = {}
    differing = []
    for key in sorted(set(a) & set(b)):
        packet_a, packet_b = a[key].read_bytes(), b[key].read_bytes()
        name_a, name_b = _object_id(packet_a), _object_id(packet_b)
        if renaming.setdefault(name_a, name_b) != name_b:
            problems.append(f"alerts: candid {key[1]}: object {name_a} is {renaming[name_a]} in run B for an "
                            f"earlier candid but {name_b} here")
        if packet_a.replace(name_a.encode(), name_b.encode(), 1) != packet_b:
            differing.append(key)
    if len(set(renaming.values())) != len(renaming):
        problems.append("alerts: two objects of run A are one object in run B")
    if differing:
        problems.append(f"alerts: {len(differing)} packet(s) differ, e.g. candid {differing[0][1]}")
    return problems, len(a)


def _exposure_rows(path: Path, expid: int) -> dict[str, Table]:
    snapshot = MatchfileSnapshot(path)
    try:
        rows = snapshot.lightcurve_table(np.arange(len(snapshot.ids)))
        unmatched = snapshot.unmatched(0.0, 90.0, 180.0)   # a cone holding the whole sky
    finally:
        snapshot.h5.close()
    return {"photometry": rows[rows["expid"] == expid], "unmatched": unmatched[unmatched["expid"] == expid]}


def _matchfiles(root: Path) -> set[Path]:
    """Main matchfiles under ``root`` (relative): not the epoch shards, not a writer's temporaries."""
    return {p.relative_to(root) for p in root.rglob("*.h5")
            if not p.name.startswith(".") and not p.parent.name.endswith(".wal")}


def _compare_matchfiles(cfg_a: Config, cfg_b: Config, expid: int) -> tuple[list[str], int]:
    root_a, root_b = cfg_a.paths.resolve("matchfiles"), cfg_b.paths.resolve("matchfiles")
    files_a, files_b = _matchfiles(root_a), _matchfiles(root_b)
    problems = [f"matchfiles: {name} only in run {'A' if name in files_a else 'B'}"
                for name in sorted(files_a ^ files_b)]
    n_rows = 0
    for name in sorted(files_a & files_b):
        rows_a, rows_b = _exposure_rows(root_a / name, expid), _exposure_rows(root_b / name, expid)
        for table in ("photometry", "unmatched"):
            ta, tb = rows_a[table], rows_b[table]
            n_rows += len(ta)
            if len(ta) != len(tb):
                problems.append(f"matchfile {name} {table}: {len(ta)} vs {len(tb)} rows of expid {expid}")
                continue
            problems.extend(f"matchfile {name} {table}: column {c} differs" for c in ta.colnames
                            if not _same_array(np.asarray(ta[c]), np.asarray(tb[c])))
    return problems, n_rows


def compare_exposure_outputs(cfg_a: Config, cfg_b: Config, expid: int, rcids) -> dict:
    """Every difference between two runs' products of one exposure.

    Parameters
    ----------
    cfg_a, cfg_b : Config
        Configurations of the two runs (outputs, spool and matchfile roots).
    expid : int
    rcids : iterable of int
        Quadrants to compare.

    Returns
    -------
    dict
        ``identical`` (bool), ``differences`` (list of str, each naming the product),
        and what was compared: ``quadrants``, ``alerts`` (packets in run A),
        ``matchfile_rows`` (rows of the exposure in run A).
    """
    rcids = list(rcids)
    differences = [p for rcid in rcids for p in _compare_quadrant(cfg_a, cfg_b, expid, rcid)]
    alert_problems, n_alerts = _compare_alerts(cfg_a, cfg_b)
    matchfile_problems, n_rows = _compare_matchfiles(cfg_a, cfg_b, expid)
    differences += alert_problems + matchfile_problems
    return {"identical": not differences, "differences": differences, "quadrants": len(rcids),
            "alerts": n_alerts, "matchfile_rows": n_rows}
