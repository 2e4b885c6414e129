"""Light curves from the matchfiles under a root: cone and object-id queries, selection, output.

:func:`lightcurve` (and :class:`LightcurveReader`, which the HTTP service shares) answers a
cone query across every matchfile under a root.  The footprint index
(:mod:`pipeline.matchfile.index`) names the files that can hold the position, so only those
are opened.  Each file is read through a :class:`MatchfileSnapshot`: the main file plus
its pending epoch shards at one instant (the consistency rule is in :mod:`pipeline.matchfile.store`),
with a KD-tree over the unit vectors of its reference objects for the cone search and the
object-sorted ``/photometry`` rows read as one slice per object.  Snapshots are cached
per file and rebuilt only when the main file or its shards change, so warm queries touch
no more than the rows they return.

The output columns are IRSA's ZTF light-curve service's 24, in its order: ``oid`` (object
id), ``filtercode`` (the filter), ``catflags`` (the photometry flags), ``chi`` and
``sharp`` (the PSF fit's), ``filefracday``, ``magzprms`` (the zero point's uncertainty),
``clrcoeff``, ``limitmag``...  see :data:`LIGHTCURVE_COLUMNS`.  Output formats
(:func:`serialise`, one writer function each, shared by the HTTP service): CSV, TSV, HTML,
VOTable, IPAC table, ECSV and JSON.
"""
from __future__ import annotations

import errno
import io
import json
import os
import threading
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import h5py
import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

from pipeline.matchfile.index import FootprintIndex
from pipeline.matchfile.layout import (LayoutError, check_layout_version, committed_shards, make_oid,
                                       matchfile_path, read_table, shard_dir, split_oid)

__all__ = ["LIGHTCURVE_COLUMNS", "MatchfileSnapshot", "LightcurveReader", "lightcurve", "select",
           "serialise", "plot_lightcurve", "lightcurve_figure", "lightcurve_plot_context", "check_position",
           "FORMATS"]

#: name, dtype, unit, meaning
LIGHTCURVE_COLUMNS = [
    ("oid", "i8", "", "object id"),
    ("expid", "i8", "", "exposure id"),
    ("hjd", "f8", "d", "heliocentric JD (UTC-based) at mid-exposure"),
    ("mjd", "f8", "d", "MJD (UTC) at the start of the exposure"),
    ("mag", "f4", "mag", "PSF magnitude"),
    ("magerr", "f4", "mag", "its uncertainty"),
    ("catflags", "i4", "", "photometry flags"),
    ("filtercode", "U2", "", "filter (zg, zr, zi)"),
    ("ra", "f8", "deg", "reference position of the object"),
    ("dec", "f8", "deg", "reference position of the object"),
    ("chi", "f4", "", "reduced chi-square of the epoch's PSF fit"),
    ("sharp", "f4", "", "sharpness of the PSF fit: 0 point source, < 0 sharper (cosmic ray), > 0 extended"),
    ("filefracday", "i8", "", "UT date and day fraction at the exposure start, YYYYMMDDdddddd"),
    ("field", "i4", "", "field"),
    ("ccdid", "i4", "", "CCD"),
    ("qid", "i4", "", "quadrant"),
    ("limitmag", "f4", "mag", "limiting magnitude of the exposure"),
    ("magzp", "f4", "mag", "zero point of the exposure"),
    ("magzprms", "f4", "mag", "uncertainty of the zero point"),
    ("clrcoeff", "f4", "", "colour coefficient of the exposure's photometric calibration"),
    ("clrcounc", "f4", "", "its uncertainty"),
    ("exptime", "f4", "s", "exposure time"),
    ("airmass", "f4", "", "airmass"),
    ("programid", "i4", "", "survey programme"),
]
FORMATS = {"csv": "text/csv", "tsv": "text/tab-separated-values", "html": "text/html; charset=utf-8",
           "ecsv": "text/plain", "votable": "application/x-votable+xml", "ipac_table": "text/plain",
           "json": "application/json"}
_PHOT_COLUMNS = ("expid", "mag", "magerr", "flags", "hjd", "chi", "sharp")
_EXPOSURE_JOIN = {"mjd": "mjd", "filefracday": "filefracday", "limitmag": "limmag", "magzp": "magzp",
                  "magzprms": "magzpunc", "clrcoeff": "clrcoeff", "clrcounc": "clrcounc", "exptime": "exptime",
                  "airmass": "airmass", "programid": "programid"}


def check_position(ra: float, dec: float, radius_deg: float) -> None:
    """ValueError unless 0 <= ra < 360, |dec| <= 90 and radius > 0 (all finite)."""
    if not all(np.isfinite([ra, dec, radius_deg])):
        raise ValueError("ra, dec and radius must be finite numbers")
    if not 0 <= ra < 360:
        raise ValueError(f"ra {ra} is outside 0 <= ra < 360")
    if not -90 <= dec <= 90:
        raise ValueError(f"dec {dec} is outside -90 <= dec <= 90")
    if radius_deg <= 0:
        raise ValueError(f"radius {radius_deg} must be positive")


def _unit(ra_deg, dec_deg) -> np.ndarray:
    ra, dec = np.deg2rad(np.asarray(ra_deg, float)), np.deg2rad(np.asarray(dec_deg, float))
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def _stamp(path: Path) -> tuple:
    """What identifies a consistent state: the main file's inode/mtime/size and the committed
    shards (:func:`~pipeline.matchfile.layout.committed_shards`: plain over claimed, one per
    expid) with their names, inodes and mtimes (a fold's claim renames a shard: a new stamp)."""
    st = os.stat(path)
    shards = tuple((s.path.name, s.inode, s.mtime_ns) for s in committed_shards(path))
    return (st.st_ino, st.st_mtime_ns, st.st_size), shards


def _open_readonly(path: Path) -> h5py.File:
    """``path`` opened read-only; a file renamed or removed while HDF5 opens it raises
    FileNotFoundError.  (HDF5 reports the file going between its open and its stat as a bare
    OSError, "can't retrieve stat info for file": seen with a fold claiming a shard.)"""
    try:
        return h5py.File(path, "r", locking=False)
    except OSError:
        if not path.exists():
            raise FileNotFoundError(path) from None
        raise


def _vanished(exc: OSError) -> bool:
    """A file renamed or removed under the reader: gone, or (NFS) a stale handle to its old inode."""
    return isinstance(exc, FileNotFoundError) or exc.errno == errno.ESTALE


class MatchfileSnapshot:
    """A consistent read-only view of one matchfile: main file plus pending shards.

    The shards' tables are read when the snapshot is made (they are small, and a fold may
    claim, that is rename, or delete them at any time afterwards); the main file stays open
    and is read as queries ask.
    """

    def __init__(self, path: str | Path, attempts: int = 50):
        self.path = Path(path)
        for attempt in range(attempts):
            try:
                if self._open():
                    return
            except OSError as exc:
                if not _vanished(exc):
                    raise
                # A shard claimed or folded between listing and opening, or the main file
                # replaced by a fold (NFS: a stale handle): try again.
            # Backing off lets a client whose directory cache lags (NFS) catch up.
            time.sleep(min(0.005 * attempt, 0.5))
        raise LayoutError(f"{self.path}: the file kept changing while being opened")

    def _open(self) -> bool:
        before = _stamp(self.path)
        try:
            h5 = _open_readonly(self.path)
        except OSError as exc:
            if _vanished(exc):
                raise
            raise LayoutError(f"{self.path}: not a readable HDF5 matchfile ({exc})") from None
        try:
            check_layout_version(h5, self.path)
            shards = []
            for name, _, _ in before[1]:
                shard_path = shard_dir(self.path) / name
                with _open_readonly(shard_path) as sh:
                    check_layout_version(sh, shard_path)
                    shards.append({t: read_table(sh, t) for t in ("exposures", "photometry", "unmatched")})
            # The main file and the whole shard listing unchanged while read: one consistent
            # state (every state a writer or fold leaves has each epoch exactly once).
            if _stamp(self.path) != before:
                h5.close()
                return False
        except BaseException:
            h5.close()
            raise
        self.stamp = before
        self.h5 = h5
        self.attrs = dict(h5.attrs)
        src = read_table(h5, "sources", ["id", "ra", "dec", "phot_start", "phot_count"])
        self.ids, self.ra, self.dec = src["id"], src["ra"], src["dec"]
        self.phot_start, self.phot_count = src["phot_start"], src["phot_count"]
        self.tree = cKDTree(_unit(self.ra, self.dec))
        self.shard_expids = np.array([e for s in shards for e in s["exposures"]["expid"]], dtype=np.int64)
        self.shard_photometry = [s["photometry"] for s in shards]
        self.shard_unmatched = [s["unmatched"] for s in shards]
        main_exposures = read_table(h5, "exposures")
        keep = ~np.isin(main_exposures["expid"], self.shard_expids)
        exposures = {k: np.concatenate([v[keep]] + [s["exposures"][k] for s in shards])
                     for k, v in main_exposures.items()}
        order = np.argsort(exposures["expid"])
        self.exposures = {k: v[order] for k, v in exposures.items()}
        self._datasets = {name: h5["photometry"][name] for name in _PHOT_COLUMNS}
        return True

    def is_current(self) -> bool:
        try:
            return _stamp(self.path) == self.stamp
        except FileNotFoundError:
            return False

    def cone(self, ra: float, dec: float, radius_deg: float) -> np.ndarray:
        """Rows of ``/sources`` within ``radius_deg`` of (ra, dec), sorted."""
        chord = 2.0 * np.sin(np.deg2rad(radius_deg) / 2.0)
        return np.sort(np.asarray(self.tree.query_ball_point(_unit(ra, dec), chord), dtype=np.int64))

    def rows_of_ids(self, ids) -> np.ndarray:
        """Rows of ``/sources`` holding the given reference ids (missing ones dropped)."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = np.searchsorted(self.ids, ids)
        found = rows < len(self.ids)
        rows, ids = rows[found], ids[found]
        return np.unique(rows[self.ids[rows] == ids])

    def photometry(self, source_rows: np.ndarray) -> dict[str, np.ndarray]:
        """Photometry rows (``source_row`` and the ``_PHOT_COLUMNS``) of some objects."""
        parts: dict[str, list] = {name: [] for name in ("source_row",) + _PHOT_COLUMNS}
        for row in source_rows:
            start, count = int(self.phot_start[row]), int(self.phot_count[row])
            if count:
                block = {name: ds[start:start + count] for name, ds in self._datasets.items()}
                keep = ~np.isin(block["expid"], self.shard_expids) if len(self.shard_expids) else slice(None)
                for name in _PHOT_COLUMNS:
                    parts[name].append(block[name][keep])
                parts["source_row"].append(np.full(len(block["expid"][keep]), row))
        wanted = self.ids[source_rows]
        for shard in self.shard_photometry:
            lo = np.searchsorted(shard["objid"], wanted, side="left")
            hi = np.searchsorted(shard["objid"], wanted, side="right")
            for row, a, b in zip(source_rows, lo, hi):
                if b > a:
                    for name in _PHOT_COLUMNS:
                        parts[name].append(shard[name][a:b])
                    parts["source_row"].append(np.full(b - a, row))
        return {name: np.concatenate(chunks) if chunks else np.zeros(0) for name, chunks in parts.items()}

    def lightcurve_table(self, source_rows: np.ndarray) -> Table:
        """The light-curve rows of some objects (:data:`LIGHTCURVE_COLUMNS`), by oid then hjd."""
        phot = self.photometry(np.asarray(source_rows, dtype=np.int64))
        n = len(phot["expid"])
        if n == 0:
            return _empty_table()
        a = self.attrs
        oid = make_oid(a["field"], a["rcid"], a["fid"], self.ids[phot["source_row"].astype(np.int64)])
        # Sorted on the arrays: astropy's Table.sort took a third of a warm query.
        order = np.lexsort((phot["hjd"], oid))
        phot = {name: column[order] for name, column in phot.items()}
        rows = phot["source_row"].astype(np.int64)
        exposure = np.searchsorted(self.exposures["expid"], phot["expid"].astype(np.int64))
        values = {
            "oid": oid[order], "expid": phot["expid"], "hjd": phot["hjd"], "mag": phot["mag"],
            "magerr": phot["magerr"], "catflags": phot["flags"], "filtercode": np.full(n, a["filtercode"]),
            "ra": self.ra[rows], "dec": self.dec[rows], "chi": phot["chi"], "sharp": phot["sharp"],
            "field": np.full(n, a["field"]), "ccdid": np.full(n, a["ccdid"]), "qid": np.full(n, a["qid"]),
            **{out: self.exposures[col][exposure] for out, col in _EXPOSURE_JOIN.items()},
        }
        return _table(values)

    def plot_context(self, source_rows: np.ndarray) -> tuple[Table, Table]:
        """What a light-curve plot shows besides the detections, for some objects.

        Returns
        -------
        references : Table
            ``oid``, ``filtercode``, ``refmag``, ``refmagerr``: the reference image's PSF
            magnitude of each object.
        upper_limits : Table
            ``oid``, ``filtercode``, ``mjd``, ``limitmag``: every exposure of this matchfile
            without a detection of the object, at the exposure's 5-sigma limiting magnitude.
        """
        rows = np.unique(np.asarray(source_rows, dtype=np.int64))
        a = self.attrs
        oids = make_oid(a["field"], a["rcid"], a["fid"], self.ids[rows]) if len(rows) else np.zeros(0, np.int64)
        sources = self.h5["sources"]
        references = Table({"oid": np.asarray(oids, dtype=np.int64),
                            "filtercode": np.full(len(rows), a["filtercode"], dtype="U2"),
                            "refmag": sources["refmag"][rows] if len(rows) else np.zeros(0, np.float32),
                            "refmagerr": sources["refmagerr"][rows] if len(rows) else np.zeros(0, np.float32)})
        phot = self.photometry(rows)
        detected = phot["source_row"].astype(np.int64)
        limit_oid, limit_mjd, limit_mag = [], [], []
        for row, oid in zip(rows, oids):
            missing = ~np.isin(self.exposures["expid"], phot["expid"][detected == row].astype(np.int64))
            limit_oid.append(np.full(int(missing.sum()), oid, dtype=np.int64))
            limit_mjd.append(self.exposures["mjd"][missing])
            limit_mag.append(self.exposures["limmag"][missing])
        upper_limits = Table({"oid": np.concatenate(limit_oid) if limit_oid else np.zeros(0, np.int64),
                              "filtercode": np.full(sum(map(len, limit_oid)), a["filtercode"], dtype="U2"),
                              "mjd": np.concatenate(limit_mjd) if limit_mjd else np.zeros(0),
                              "limitmag": np.concatenate(limit_mag) if limit_mag else np.zeros(0, np.float32)})
        return references, upper_limits

    def unmatched(self, ra: float, dec: float, radius_deg: float) -> Table:
        """Unmatched detections (main file and shards) within a cone, sorted by hjd."""
        columns = read_table(self.h5, "unmatched")
        keep = ~np.isin(columns["expid"], self.shard_expids)
        parts = [{k: v[keep] for k, v in columns.items()}] + self.shard_unmatched
        merged = {k: np.concatenate([p[k] for p in parts]) for k in columns}
        chord = 2.0 * np.sin(np.deg2rad(radius_deg) / 2.0)
        near = np.linalg.norm(_unit(merged["ra"], merged["dec"]) - _unit(ra, dec), axis=-1) <= chord
        table = Table({k: v[near] for k, v in merged.items()})
        table.sort("hjd")
        return table


def _empty_table() -> Table:
    return Table({name: np.zeros(0, dtype=dtype) for name, dtype, _, _ in LIGHTCURVE_COLUMNS})


def _table(values: dict) -> Table:
    table = Table({name: np.asarray(values[name]).astype(dtype) for name, dtype, _, _ in LIGHTCURVE_COLUMNS})
    for name, _, unit, meaning in LIGHTCURVE_COLUMNS:
        table[name].unit = unit or None
        table[name].description = meaning
    return table


class LightcurveReader:
    """Cone and object-id queries over the matchfiles under ``root`` (thread safe).

    ``opened`` lists the matchfiles this reader has opened, in order (for tests and logs).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        # A root that does not exist is a mistyped path, not a sky without objects: an empty
        # answer would look like a valid "nothing there".
        if not self.root.is_dir():
            raise LayoutError(f"matchfile root {self.root}: no such directory")
        self.index = FootprintIndex(self.root)
        self.opened: list[Path] = []
        self._snapshots: dict[Path, MatchfileSnapshot] = {}
        self._lock = threading.Lock()

    def snapshot(self, path: Path) -> MatchfileSnapshot:
        """The current snapshot of one matchfile (cached until the file or its shards change)."""
        with self._lock:
            snap = self._snapshots.get(path)
            if snap is None or not snap.is_current():
                snap = MatchfileSnapshot(path)
                self._snapshots[path] = snap
                self.opened.append(path)
            return snap

    def cone(self, ra: float, dec: float, radius_deg: float) -> Table:
        """Light curves of every object within ``radius_deg`` of (ra, dec), all filters."""
        check_position(ra, dec, radius_deg)
        tables = []
        for path, _ in self.index.files_covering(ra, dec, radius_deg):
            snap = self.snapshot(path)
            rows = snap.cone(ra, dec, radius_deg)
            if len(rows):
                tables.append(snap.lightcurve_table(rows))
        return _stack(tables)

    def by_oid(self, oids) -> Table:
        """Light curves of objects given by global object id."""
        tables = []
        for oid in sorted({int(o) for o in oids}):
            field, rcid, fid, local_id = split_oid(oid)
            path = matchfile_path(self.root, field, rcid // 4 + 1, rcid % 4 + 1, fid) if fid in (1, 2, 3) else None
            if path is None or not path.exists():
                continue
            snap = self.snapshot(path)
            rows = snap.rows_of_ids([local_id])
            if len(rows):
                tables.append(snap.lightcurve_table(rows))
        return _stack(tables)

    def plot_context(self, ra: float, dec: float, radius_deg: float) -> tuple[Table, Table]:
        """Reference magnitudes and upper limits of the objects in a cone
        (:meth:`MatchfileSnapshot.plot_context`, stacked over the files)."""
        check_position(ra, dec, radius_deg)
        references, limits = [], []
        for path, _ in self.index.files_covering(ra, dec, radius_deg):
            snap = self.snapshot(path)
            rows = snap.cone(ra, dec, radius_deg)
            if len(rows):
                ref, lim = snap.plot_context(rows)
                references.append(ref)
                limits.append(lim)
        if not references:
            return _empty_references(), _empty_limits()
        from astropy.table import vstack
        return vstack(references), vstack(limits)

    def unmatched(self, ra: float, dec: float, radius_deg: float) -> Table:
        """Unmatched (transient) detections within the cone, with their file's filter."""
        check_position(ra, dec, radius_deg)
        tables = []
        for path, keys in self.index.files_covering(ra, dec, radius_deg):
            table = self.snapshot(path).unmatched(ra, dec, radius_deg)
            table["fid"] = np.full(len(table), keys["fid"], dtype=np.int32)
            tables.append(table)
        if not tables:
            return Table()
        from astropy.table import vstack
        return vstack(tables)


def _empty_references() -> Table:
    return Table({"oid": np.zeros(0, np.int64), "filtercode": np.zeros(0, "U2"),
                  "refmag": np.zeros(0, np.float32), "refmagerr": np.zeros(0, np.float32)})


def _empty_limits() -> Table:
    return Table({"oid": np.zeros(0, np.int64), "filtercode": np.zeros(0, "U2"), "mjd": np.zeros(0),
                  "limitmag": np.zeros(0, np.float32)})


def _stack(tables: list[Table]) -> Table:
    if not tables:
        return _empty_table()
    if len(tables) == 1:
        return tables[0]
    from astropy.table import vstack
    out = vstack(tables)
    out.sort(["oid", "hjd"])
    return out


_READERS: dict[Path, LightcurveReader] = {}
_READERS_LOCK = threading.Lock()


def _reader(root: str | Path) -> LightcurveReader:
    root = Path(root).resolve()
    with _READERS_LOCK:
        reader = _READERS.get(root)
        if reader is None:
            reader = _READERS[root] = LightcurveReader(root)
        return reader


def lightcurve(ra: float, dec: float, radius_arcsec: float, root: str | Path) -> Table:
    """Light curves of the objects within ``radius_arcsec`` of (ra, dec) in the matchfiles under ``root``.

    Readers are cached per root, so repeated calls are warm.
    """
    return _reader(root).cone(float(ra), float(dec), float(radius_arcsec) / 3600.0)


def lightcurve_plot_context(ra: float, dec: float, radius_arcsec: float, root: str | Path) -> tuple[Table, Table]:
    """Reference magnitudes and upper limits of the objects of :func:`lightcurve`'s cone
    (:meth:`LightcurveReader.plot_context`), for :func:`plot_lightcurve`."""
    return _reader(root).plot_context(float(ra), float(dec), float(radius_arcsec) / 3600.0)


def select(table: Table, fids=None, mag_range=None, mjd_range=None, bad_flags_mask: int = 0,
           nobs_min: int = 0) -> Table:
    """Rows of a light-curve table passing IRSA-style filters.

    ``fids``: filter ids to keep; ``mag_range``/``mjd_range``: inclusive (min, max);
    ``bad_flags_mask``: drop rows with ``catflags & mask``; ``nobs_min``: drop objects with
    fewer remaining rows (per object and filter).
    """
    keep = np.ones(len(table), bool)
    if fids:
        codes = {"zg": 1, "zr": 2, "zi": 3}
        keep &= np.isin([codes.get(c, 0) for c in table["filtercode"]], list(fids))
    if mag_range is not None:
        keep &= (table["mag"] >= mag_range[0]) & (table["mag"] <= mag_range[1])
    if mjd_range is not None:
        keep &= (table["mjd"] >= mjd_range[0]) & (table["mjd"] <= mjd_range[1])
    if bad_flags_mask:
        keep &= (np.asarray(table["catflags"]) & int(bad_flags_mask)) == 0
    out = table[keep]
    if nobs_min and len(out):
        _, inverse, counts = np.unique(np.asarray(out["oid"]), return_inverse=True, return_counts=True)
        out = out[counts[inverse] >= nobs_min]
    return out


_VOTABLE_TYPES = {"i": {8: "long", 4: "int", 2: "short"}, "f": {8: "double", 4: "float"}}


def _cell_strings(column) -> list[str]:
    """Shortest round-tripping text of every value (numpy's repr algorithm, vectorised).

    Columns made of runs of one value (an object's oid and position, a file's field and
    filter, constant exposure times) are formatted once per run: formatting floats is most
    of a light-curve answer's cost.
    """
    values = np.asarray(column)
    n = len(values)
    if n > 1:
        starts = np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1])))
        if 4 * len(starts) <= n:
            text = values[starts].astype(str)
            if values.dtype.kind == "f":
                text[np.isnan(values[starts])] = "NaN"
            return np.repeat(text, np.diff(np.append(starts, n))).tolist()
    text = values.astype(str)
    if values.dtype.kind == "f":
        text[np.isnan(values)] = "NaN"
    return text.tolist()


def _votable(table: Table) -> bytes:
    """VOTable 1.4 TABLEDATA of a light-curve table.

    Hand-rolled because astropy's writer takes ~60 ms for a 500-row light curve, more than
    the service's whole latency budget; the types here are plain (ints, floats, short
    strings) and astropy's parser reads the result back (see the tests).
    """
    fields = []
    for name in table.colnames:
        column = table[name]
        unit = f' unit="{escape(str(column.unit))}"' if column.unit else ""
        kind = column.dtype.kind
        if kind in "US":
            fields.append(f'<FIELD name="{escape(name)}" datatype="char" arraysize="*"{unit}/>')
        else:
            fields.append(f'<FIELD name="{escape(name)}" datatype="{_VOTABLE_TYPES[kind][column.dtype.itemsize]}"'
                          f"{unit}/>")
    columns = [[escape(v) for v in _cell_strings(table[n])] if table[n].dtype.kind in "US"
               else _cell_strings(table[n]) for n in table.colnames]
    rows = "".join("<TR><TD>" + "</TD><TD>".join(cells) + "</TD></TR>\n" for cells in zip(*columns))
    return ('<?xml version="1.0" encoding="utf-8"?>\n'
            '<VOTABLE version="1.4" xmlns="http://www.ivoa.net/xml/VOTable/v1.3">\n'
            '<RESOURCE type="results">\n<TABLE name="lightcurves">\n' + "\n".join(fields)
            + "\n<DATA><TABLEDATA>\n" + rows + "</TABLEDATA></DATA>\n</TABLE>\n</RESOURCE>\n</VOTABLE>\n").encode()


def _csv(table: Table) -> bytes:
    """CSV with a header line (hand-rolled for speed like :func:`_votable`; no value here needs quoting)."""
    columns = [_cell_strings(table[n]) for n in table.colnames]
    lines = [",".join(table.colnames)] + [",".join(cells) for cells in zip(*columns)]
    return ("\n".join(lines) + "\n").encode()


def _tsv(table: Table) -> bytes:
    """Tab-separated values as IRSA writes them: a header line of the column names, then one
    line per row, cells separated by one tab (no value here holds a tab or needs quoting)."""
    columns = [_cell_strings(table[n]) for n in table.colnames]
    lines = ["\t".join(table.colnames)] + ["\t".join(cells) for cells in zip(*columns)]
    return ("\n".join(lines) + "\n").encode()


def _html(table: Table) -> bytes:
    """An HTML page holding the table as IRSA answers ``FORMAT=HTML``: one ``<table>`` whose
    header row names the columns (each ``<th>``'s title gives the unit and meaning) and one
    ``<tr>`` per row, the cells as in the CSV (hand-rolled for speed like :func:`_votable`)."""
    head = []
    for name in table.colnames:
        column = table[name]
        note = "; ".join(text for text in (str(column.unit or ""), column.description or "") if text)
        head.append(f"<th title={quoteattr(note)}>{escape(name)}</th>")
    columns = [[escape(v) for v in _cell_strings(table[n])] if table[n].dtype.kind in "US"
               else _cell_strings(table[n]) for n in table.colnames]
    rows = "".join("<tr><td>" + "</td><td>".join(cells) + "</td></tr>\n" for cells in zip(*columns))
    return ('<!DOCTYPE html>\n<html>\n<head><meta charset="utf-8"><title>ZTF light curves</title></head>\n'
            '<body>\n<table border="1">\n<thead>\n<tr>' + "".join(head) + "</tr>\n</thead>\n<tbody>\n"
            + rows + "</tbody>\n</table>\n</body>\n</html>\n").encode()


def serialise(table: Table, fmt: str) -> tuple[bytes, str]:
    """(bytes, content type) of a table in ``csv``, ``tsv``, ``html``, ``ecsv``, ``votable``,
    ``ipac_table`` or ``json``."""
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if fmt == "votable":
        return _votable(table), FORMATS[fmt]
    if fmt == "csv":
        return _csv(table), FORMATS[fmt]
    if fmt == "tsv":
        return _tsv(table), FORMATS[fmt]
    if fmt == "html":
        return _html(table), FORMATS[fmt]
    if fmt == "json":
        payload = {"columns": [{"name": n, "datatype": str(table[n].dtype), "unit": str(table[n].unit or "")}
                               for n in table.colnames],
                   "data": [list(row) for row in zip(*(table[n].tolist() for n in table.colnames))]}
        return json.dumps(payload).encode(), FORMATS[fmt]
    buffer = io.StringIO()
    table.write(buffer, format={"ecsv": "ascii.ecsv", "ipac_table": "ascii.ipac"}[fmt])
    return buffer.getvalue().encode(), FORMATS[fmt]


_FILTER_COLOURS = {"zg": "tab:green", "zr": "tab:red", "zi": "tab:brown"}


def lightcurve_figure(table: Table, title: str = "", references: Table | None = None,
                      upper_limits: Table | None = None):
    """Magnitude against MJD, one series per object and filter (a matplotlib Figure, Agg).

    Detections are points with error bars at the exposure's MJD (UTC, exposure start; the
    axis is plain MJD, no offset); ``upper_limits`` (:func:`lightcurve_plot_context`) are
    downward triangles at the limiting magnitude of each exposure without a detection;
    ``references`` draw each object's reference-image magnitude as a dashed line. Magnitudes
    increase downwards.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot(1, 1, 1)
    oids = sorted(set(np.asarray(table["oid"]).tolist())) if len(table) else []
    if references is not None and len(references):
        oids = sorted(set(oids) | set(np.asarray(references["oid"]).tolist()))
    for oid in oids:
        rows = table[table["oid"] == oid] if len(table) else table
        code = None
        if len(rows):
            code = str(rows["filtercode"][0])
            ax.errorbar(rows["mjd"], rows["mag"], rows["magerr"], fmt="o", ms=3, color=_FILTER_COLOURS.get(code),
                        label=f"{oid} {code}")
        if references is not None and len(references):
            ref = references[references["oid"] == oid]
            if len(ref) and np.isfinite(ref["refmag"][0]):
                code = code or str(ref["filtercode"][0])
                ax.axhline(float(ref["refmag"][0]), color=_FILTER_COLOURS.get(code), linestyle="--",
                           linewidth=1, label=f"{oid} {code} reference {float(ref['refmag'][0]):.2f}")
        if upper_limits is not None and len(upper_limits):
            lim = upper_limits[(upper_limits["oid"] == oid) & np.isfinite(np.asarray(upper_limits["limitmag"], float))]
            if len(lim):
                code = code or str(lim["filtercode"][0])
                ax.plot(lim["mjd"], lim["limitmag"], linestyle="none", marker="v", ms=6, mfc="none",
                        color=_FILTER_COLOURS.get(code), label=f"{oid} {code} upper limits (5 sigma)")
    ax.invert_yaxis()
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    ax.set_xlabel("MJD (UTC, exposure start)")
    ax.set_ylabel("magnitude")
    ax.set_title(title or f"{len(table)} points")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


def plot_lightcurve(table: Table, path: str | Path, title: str = "", references: Table | None = None,
                    upper_limits: Table | None = None) -> Path:
    """Write :func:`lightcurve_figure` as a PNG (atomically); returns its path."""
    from pipeline.formats.atomic import atomic_path

    figure = lightcurve_figure(table, title, references, upper_limits)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    return Path(path)
