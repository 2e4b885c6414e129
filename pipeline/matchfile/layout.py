"""The HDF5 matchfile layout (version 2): tables, names, object ids and the file writer.

One matchfile per (field, CCD, quadrant, filter), seeded from the reference image's PSF
catalogue, at ``<root>/<field:06d>/ztf_<field:06d>_<filtercode>_c<ccdid:02d>_q<qid>_match.h5``
(filtercode ``zg``, ``zr``, ``zi`` for fid 1, 2, 3).  Pending epochs live beside it in
``<matchfile>.wal/<expid>.h5``, or ``<matchfile>.wal/<expid>.h5.folding-<token>`` once a fold has
claimed them (see :mod:`pipeline.matchfile.store` for why; :func:`committed_shards` lists them
as every reader must).

Every table is an HDF5 group holding one 1-D dataset per column, all of one length;
datasets are chunked, compressed (gzip level 1 with the shuffle filter, readable by any
HDF5 tool; ``chi`` and ``sharp`` are not, see :data:`UNCOMPRESSED`) and resizable (``maxshape=(None,)``), with the unit and meaning of each column
in its ``unit`` and ``description`` attributes.  Column datasets rather than compound
tables so that a reader pulls only the columns it needs.

Root attributes: ``layout_version`` (2), ``kind`` (``matchfile`` or ``epoch-shard``),
``field``, ``ccdid``, ``qid``, ``rcid``, ``fid``, ``filtercode``, ``refid``,
``ref_jd_start``, ``ref_jd_end``, ``ref_nframes``, ``match_radius_arcsec``, ``created``
(ISO UTC), ``software``; a shard also has ``expid``.

``/sources``      one row per reference object, in reference-catalogue order (sorted by id)
``/exposures``    one row per epoch, sorted by mjd
``/photometry``   one row per (object, epoch) match, sorted by object (``/sources`` order)
                  then hjd: the rows of source ``i`` are
                  ``phot_start[i] : phot_start[i] + phot_count[i]``
``/unmatched``    detections that matched no reference object (the transient table),
                  sorted by expid

Version 2 added ``chi`` and ``sharp`` to ``/photometry`` and ``/unmatched`` and ``filefracday``,
``clrcoeff`` and ``clrcounc`` to ``/exposures``.  A version-1 file cannot be migrated (its
epochs' PSF fits are gone, so ``chi`` and ``sharp`` cannot be measured again from it):
readers and writers refuse it with a :class:`LayoutError` naming the file and saying to
rebuild it (:func:`check_layout_version`).

An object's global id (``oid``, as in IRSA's light-curve service) is the decimal
concatenation field, rcid (2 digits), fid (1 digit), reference id (8 digits):
``oid = ((field * 100 + rcid) * 10 + fid) * 10**8 + id``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import h5py
import numpy as np
from pipeline.core.exits import BadInputError
from pipeline.formats.atomic import atomic_path

__all__ = ["LAYOUT_VERSION", "TABLES", "ColumnSpec", "FILTERCODES", "filtercode_of", "fid_of_band",
           "make_oid", "split_oid", "matchfile_path", "shard_dir", "ShardFile", "committed_shards", "CLAIM_MARK",
           "write_table",
           "read_table", "coerce_columns", "empty_columns", "write_h5_atomic", "LayoutError", "ID_DIGITS",
           "check_layout_version", "filefracday", "COMPRESSION", "UNCOMPRESSED"]

LAYOUT_VERSION = 2
ID_DIGITS = 8
FILTERCODES = {1: "zg", 2: "zr", 3: "zi"}
COMPRESSION = dict(compression="gzip", compression_opts=1, shuffle=True)
#: Columns stored without compression: the PSF fit's chi and sharp are noise-like floats that
#: gzip shrinks by only 9-20 % at ten times the cost of writing them (measured on 250,000 rows:
#: 12-14 ms a column compressed, 1 ms not), which the fold pays for every row it rewrites.
UNCOMPRESSED = frozenset({"chi", "sharp"})


class LayoutError(BadInputError):
    """A matchfile or its input that does not follow the layout (message names the file)."""


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    dtype: str
    unit: str
    description: str


def _specs(*rows) -> tuple[ColumnSpec, ...]:
    return tuple(ColumnSpec(*row) for row in rows)


#: table -> (row chunk, columns)
TABLES: dict[str, tuple[int, tuple[ColumnSpec, ...]]] = {
    "sources": (8192, _specs(
        ("id", "i8", "", "reference object id (unique in the file)"),
        ("ra", "f8", "deg", "reference position, ICRS"),
        ("dec", "f8", "deg", "reference position, ICRS"),
        ("refmag", "f4", "mag", "reference-image PSF magnitude"),
        ("refmagerr", "f4", "mag", "its uncertainty"),
        ("refflags", "i4", "", "reference catalogue flags"),
        ("phot_start", "i8", "", "first row of the object in /photometry"),
        ("phot_count", "i4", "", "number of rows of the object in /photometry"),
    )),
    "exposures": (1024, _specs(
        ("expid", "i8", "", "exposure id"),
        ("mjd", "f8", "d", "MJD (UTC) at the start of the exposure"),
        ("hjd", "f8", "d", "heliocentric JD (UTC-based) at mid-exposure, at the field centre"),
        ("exptime", "f4", "s", "exposure time"),
        ("airmass", "f4", "", "airmass"),
        ("magzp", "f4", "mag", "photometric zero point (mag = magzp - 2.5 log10 flux)"),
        ("magzpunc", "f4", "mag", "zero-point uncertainty"),
        ("seeing", "f4", "arcsec", "seeing FWHM"),
        ("limmag", "f4", "mag", "5-sigma limiting magnitude"),
        ("field_ra", "f8", "deg", "field centre (telescope pointing)"),
        ("field_dec", "f8", "deg", "field centre (telescope pointing)"),
        ("astrometry_qa", "i4", "", "astrometric QA flag (0 = good)"),
        ("photometry_qa", "i4", "", "photometric QA flag (0 = good)"),
        ("programid", "i4", "", "survey programme"),
        ("nmatched", "i4", "", "detections matched to reference objects"),
        ("nunmatched", "i4", "", "detections matched to none"),
        ("filefracday", "i8", "", "UT date and day fraction at the exposure start, YYYYMMDDdddddd"),
        ("clrcoeff", "f4", "", "colour coefficient of the photometric calibration (on Gaia BP - RP)"),
        ("clrcounc", "f4", "", "its uncertainty (NaN when the coefficient was fixed, not fitted)"),
    )),
    "photometry": (4096, _specs(
        ("objid", "i8", "", "reference object id (/sources id)"),
        ("expid", "i8", "", "exposure id"),
        ("mag", "f4", "mag", "PSF magnitude"),
        ("magerr", "f4", "mag", "its uncertainty"),
        ("flux", "f4", "ADU", "PSF flux on the image zero point (mag = magzp - 2.5 log10 flux)"),
        ("fluxerr", "f4", "ADU", "its uncertainty"),
        ("flags", "i4", "", "photometry flags (catflags)"),
        ("hjd", "f8", "d", "heliocentric JD (UTC-based) at mid-exposure at the detection"),
        ("chi", "f4", "", "reduced chi-square of the PSF fit"),
        ("sharp", "f4", "", "sharpness: fractional excess of the source's width^2 over the PSF's"),
    )),
    "unmatched": (8192, _specs(
        ("expid", "i8", "", "exposure id"),
        ("ra", "f8", "deg", "detected position, ICRS"),
        ("dec", "f8", "deg", "detected position, ICRS"),
        ("mag", "f4", "mag", "PSF magnitude"),
        ("magerr", "f4", "mag", "its uncertainty"),
        ("flux", "f4", "ADU", "PSF flux on the image zero point"),
        ("fluxerr", "f4", "ADU", "its uncertainty"),
        ("flags", "i4", "", "photometry flags"),
        ("hjd", "f8", "d", "heliocentric JD (UTC-based) at mid-exposure at the detection"),
        ("chi", "f4", "", "reduced chi-square of the PSF fit"),
        ("sharp", "f4", "", "sharpness: fractional excess of the source's width^2 over the PSF's"),
    )),
}


def check_layout_version(h5: h5py.File, path: str | Path) -> None:
    """LayoutError naming ``path`` unless the open file ``h5`` has this software's layout version."""
    version = h5.attrs.get("layout_version")
    if version != LAYOUT_VERSION:
        found = "none recorded" if version is None else f"{version}"
        raise LayoutError(f"{path}: matchfile layout version {found}, this software reads version "
                          f"{LAYOUT_VERSION} (which adds chi, sharp, filefracday, clrcoeff and clrcounc); "
                          "a version-1 file cannot be migrated: move it away and rebuild it with "
                          "`skydiff matchfile seed` and `skydiff matchfile append`")


def filefracday(mjd) -> np.ndarray:
    """IRSA's ``filefracday`` of UTC MJDs: the UT date and the fraction of the day as the
    integer ``YYYYMMDDdddddd`` (``dddddd`` = the day fraction truncated to 6 digits, so it
    never rounds up into the next day).

    MJD days start at 0 h UTC, so the fraction is the MJD's own; ``1e-10`` d (9 us) is added
    before truncating so that an instant stored as ``...0.2499999999`` (float rounding of a
    round time) still reads as ``250000``.
    """
    from astropy.time import Time

    mjd = np.atleast_1d(np.asarray(mjd, dtype=np.float64))
    day = np.floor(mjd + 1e-10)
    fraction = np.minimum(np.floor((mjd + 1e-10 - day) * 1e6), 999999).astype(np.int64)
    ymd = Time(day, format="mjd", scale="utc").to_value("ymdhms")
    date = ymd["year"].astype(np.int64) * 10000 + ymd["month"] * 100 + ymd["day"]
    return date.astype(np.int64) * 1000000 + fraction


def filtercode_of(fid: int) -> str:
    try:
        return FILTERCODES[int(fid)]
    except KeyError:
        raise LayoutError(f"unknown filter id {fid!r} (expected one of {sorted(FILTERCODES)})") from None


def fid_of_band(band: str) -> int:
    """Filter id of a band name: ``g``, ``zg``, ``ZTF_g`` -> 1."""
    code = "z" + str(band).strip().lower()[-1:]
    for fid, name in FILTERCODES.items():
        if name == code:
            return fid
    raise LayoutError(f"unknown band {band!r} (expected g, r or i)")


def make_oid(field, rcid, fid, local_id) -> np.ndarray:
    """Global object id(s) from the matchfile keys and the reference id (see module docstring)."""
    local_id = np.asarray(local_id, dtype=np.int64)
    return ((np.int64(field) * 100 + np.int64(rcid)) * 10 + np.int64(fid)) * 10**ID_DIGITS + local_id


def split_oid(oid) -> tuple[int, int, int, int]:
    """(field, rcid, fid, reference id) of a global object id."""
    oid = int(oid)
    if oid < 0:
        raise LayoutError(f"object id {oid} is negative")
    rest, local_id = divmod(oid, 10**ID_DIGITS)
    rest, fid = divmod(rest, 10)
    field, rcid = divmod(rest, 100)
    return field, rcid, fid, local_id


def matchfile_path(root: str | Path, field: int, ccdid: int, qid: int, fid: int) -> Path:
    code = filtercode_of(fid)
    return Path(root) / f"{int(field):06d}" / f"ztf_{int(field):06d}_{code}_c{int(ccdid):02d}_q{int(qid)}_match.h5"


def shard_dir(path: str | Path) -> Path:
    """Directory of the pending epoch shards of a matchfile."""
    path = Path(path)
    return path.with_name(path.name + ".wal")


#: What a fold appends to a shard's name when it claims it: ``<expid>.h5.folding-<token>``.
CLAIM_MARK = ".folding-"


@dataclass(frozen=True)
class ShardFile:
    """One committed epoch shard: ``key`` is its name before ``.h5`` (the expid), ``claimed``
    whether a fold has renamed it to ``<key>.h5.folding-<token>``."""

    key: str
    path: Path
    claimed: bool
    inode: int
    mtime_ns: int


def committed_shards(path: str | Path) -> list[ShardFile]:
    """The committed epoch shards of a matchfile, one per key, sorted by key.

    A plain ``<key>.h5`` takes precedence over a claimed ``<key>.h5.folding-<token>`` of the
    same key: a plain shard present next to a claimed one was committed after the fold
    claimed the other (a re-append of the exposure), so it is the newer.  Folds run one at a
    time and a fold deletes a claimed shard a plain one supersedes before claiming the plain
    one, so there is at most one claimed shard per key; should there be more (folds run
    concurrently against the rules), the most recently written one is taken.  Hidden names
    (writers' temporary files) are skipped, and so is an entry that disappears while it is
    listed (claimed or folded meanwhile: the caller's consistency check sees the change).
    """
    directory = shard_dir(path)
    best: dict[str, ShardFile] = {}
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for entry in entries:
        name = entry.name
        if name.startswith("."):
            continue
        if name.endswith(".h5"):
            key, claimed = name[:-3], False
        elif ".h5" + CLAIM_MARK in name:
            key, claimed = name.split(".h5" + CLAIM_MARK, 1)[0], True
        else:
            continue
        try:
            st = entry.stat()
        except FileNotFoundError:
            continue
        shard = ShardFile(key, Path(entry.path), claimed, st.st_ino, st.st_mtime_ns)
        held = best.get(key)
        if held is None or (held.claimed and not claimed) or \
                (held.claimed == claimed and (st.st_mtime_ns, name) > (held.mtime_ns, held.path.name)):
            best[key] = shard
    return [best[key] for key in sorted(best)]


def empty_columns(table: str) -> dict[str, np.ndarray]:
    return {c.name: np.zeros(0, dtype=c.dtype) for c in TABLES[table][1]}


def coerce_columns(table: str, values: Mapping[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """The columns of ``table`` from ``values``, cast to the layout's types, equal lengths."""
    out, length = {}, None
    for spec in TABLES[table][1]:
        if spec.name not in values:
            raise LayoutError(f"{where}: table {table} lacks column {spec.name!r}")
        column = np.asarray(values[spec.name]).astype(spec.dtype, copy=False).ravel()
        if length is not None and len(column) != length:
            raise LayoutError(f"{where}: column {table}/{spec.name} has {len(column)} rows, expected {length}")
        length = len(column)
        out[spec.name] = column
    return out


def write_table(h5: h5py.File, table: str, columns: Mapping[str, np.ndarray], compress: bool = True) -> None:
    """Create ``/table`` with one chunked, resizable dataset per column, compressed (unless
    ``compress`` is false) but for :data:`UNCOMPRESSED`."""
    chunk, specs = TABLES[table]
    group = h5.create_group(table)
    for spec in specs:
        data = np.asarray(columns[spec.name], dtype=spec.dtype)
        ds = group.create_dataset(spec.name, data=data, maxshape=(None,),
                                  chunks=(min(chunk, max(len(data), 1)),),
                                  **(COMPRESSION if compress and spec.name not in UNCOMPRESSED else {}))
        ds.attrs["unit"] = spec.unit
        ds.attrs["description"] = spec.description


def read_table(h5: h5py.File, table: str, names=None, rows=slice(None)) -> dict[str, np.ndarray]:
    """Columns of ``/table`` (all, or ``names``), optionally a row slice."""
    names = [c.name for c in TABLES[table][1]] if names is None else names
    group = h5[table]
    return {name: group[name][rows] for name in names}


def write_h5_atomic(path: str | Path, fill: Callable[[h5py.File], None]) -> Path:
    """Write an HDF5 file durably and atomically: ``fill(h5)`` writes a temporary file, which is
    fsynced, renamed into place, and its folder fsynced (:func:`pipeline.formats.atomic.atomic_path`).

    A reader (or a process killed half-way) sees either no file or the complete one.
    """
    with atomic_path(path, durable=True) as temporary:
        with h5py.File(temporary, "w", libver=("earliest", "v110"), locking=False) as h5:
            fill(h5)
    return Path(path)
