"""Matchfiles: seeding from a reference catalogue, appending epochs, folding pending epochs.

Input contract (what the photometry stages hand over)
-----------------------------------------------------
*Reference catalogue* (seeds a matchfile): an astropy Table with ``id`` (int, unique,
0 <= id < 10**8), ``ra``, ``dec`` (deg, ICRS), ``mag``, ``magerr`` (reference PSF
magnitude) and optionally ``flags`` (int); plus :class:`ReferenceMeta` (field, ccdid,
qid, fid, reference id, JD range and number of frames of the coadd).

*One epoch*: :class:`EpochMeta` (expid, obsmjd = MJD (UTC) at the start of the exposure,
exptime (s), airmass, magzp, magzpunc, seeing (arcsec), limiting magnitude, field-centre
ra/dec, astrometric and photometric QA flags (0 = good), programid, the calibration's
colour coefficient clrcoeff and its uncertainty clrcounc) and the PSF photometry of the
science image's sources: a Table with ``ra``, ``dec`` (deg), ``flux``, ``fluxerr`` (ADU on
the image zero point: ``mag = magzp - 2.5 log10 flux``), ``mag``, ``magerr``, ``flags``
(int), ``chi`` (reduced chi-square of the PSF fit) and ``sharp`` (its sharpness, see
:func:`pipeline.measure.photometry.psf_photometry`); other columns (``x``, ``y``...) are
ignored.  The exposure row's ``filefracday`` is computed from obsmjd
(:func:`pipeline.matchfile.layout.filefracday`).

Appending
---------
Detections are matched one-to-one to reference objects within ``match_radius_arcsec``
(nearest neighbour in a KD-tree over unit vectors, :func:`match_epoch`; when two detections
claim one object the nearer wins, the other becomes unmatched).  Every row gets its
heliocentric JD at mid-exposure from the 9 x 9 grid fit of :mod:`pipeline.matchfile.hjd`; the
exposure row gets the exact HJD at the field centre.  Appending an expid already present
replaces it.

Safety: write-ahead epoch shards, committed by rename, folded by one dedicated step
----------------------------------------------------------------------------------
An HDF5 file modified in place is not crash safe: a writer killed while HDF5 holds dirty
metadata in its cache leaves a file that may not open at all.  So the main file is never
modified in place, and no correctness depends on a lock: the quadrant tasks that write
matchfiles run on several nodes of a shared file system, where ``flock`` is not dependable.

*Append* (any number of processes, on any nodes, no lock): the epoch is written as a small
HDF5 *shard* to a unique temporary name in ``<matchfile>.wal/``, fsynced, renamed to
``<expid>.h5`` and the folder fsynced (:func:`append_epoch`).  The rename is the commit; a
re-append of an exposure renames over its shard (an atomic replace), so an exposure never
has two plain shards.  Appending never folds.

*Seeding* (any number of processes, no lock): the new file is written to a unique temporary
name, fsynced, then hard-linked to its final name (:func:`create_matchfile`).  ``link`` never
replaces an existing name, so of two tasks seeding the same matchfile at once exactly one
wins and the other finds the winner's file and checks it came from the same reference (its
own copy would have been equal: the content depends only on the reference catalogue, its
:class:`ReferenceMeta` and ``match_radius_arcsec``, but for the ``created`` time).  A rename
could not do this: it would replace a file that may already have been folded into.

*Fold* (:func:`fold`, the ``skydiff matchfile fold`` step; **one process at a time per
matchfile**: the Slurm fold job is a ``singleton``, the local executor folds after its pool;
a ``flock`` of ``<matchfile>.lock`` is taken too, as an extra guard where it works):

1. it *claims* each shard it will fold by renaming ``<expid>.h5`` to
   ``<expid>.h5.folding-<token>``, so that a re-append of that exposure while the fold runs
   creates a fresh ``<expid>.h5`` which the fold will not touch; a claimed shard left by a
   killed fold is *adopted* (folded again), unless a plain shard of the same expid
   supersedes it, in which case it is deleted first;
2. it writes main + claimed shards (old rows minus the shards' expids, plus the shards'
   rows, re-sorted by object) as a new main file through a temporary file, fsync and rename;
3. it deletes the claimed shards it folded, and nothing else.

Readers (:mod:`pipeline.matchfile.lightcurves`) see the main file plus every committed shard
(:func:`pipeline.matchfile.layout.committed_shards`): a plain shard takes precedence over a
claimed one of the same expid, and either over the main file.  Every step above keeps each
committed epoch visible exactly once under that rule (a claimed shard's rows equal the new
main file's rows for its expid), so readers need no lock; they check that the main file and
the shard listing did not change while they read them.

Crash states: a kill at any instant leaves only these.  A stray temporary file (hidden,
ignored by readers; a fold removes those older than :data:`STALE_TEMPORARY_S`: a younger
one may belong to a live writer on another node).  A committed plain shard.  Claimed shards
whose rows are not yet in the main file (killed while claiming or writing): the next fold
adopts them.  A new main file whose claimed shards are not yet deleted (their rows equal
the main file's): the next fold adopts and folds them again, which changes nothing.  A
seeded main file without its ``.wal`` folder: the first append makes it.

Two folds of one matchfile at once would be wrong (the later rename would drop the other's
epochs); as a last line of defence a fold refuses to rename its file in when the main file
changed since it read it (:class:`MatchfileError`, its claims left for the next fold), but
that check and the rename are not one atomic step, so the one-at-a-time rule stands.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
from astropy.coordinates import EarthLocation
from astropy.table import Table
from astropy.time import Time
from scipy.spatial import cKDTree

from pipeline.core.config import MatchfileConfig
from pipeline.core.image import rcid_of
from pipeline import __version__
from pipeline.matchfile.hjd import unit_vectors, exact_light_travel_time, heliocentric_julian_date, SECONDS_PER_DAY
from pipeline.matchfile.index import footprint_of, register_footprint
from pipeline.matchfile.layout import (CLAIM_MARK, ID_DIGITS, LAYOUT_VERSION, LayoutError, ShardFile,
                                       check_layout_version, coerce_columns, committed_shards, empty_columns,
                                       filefracday, filtercode_of, matchfile_path, read_table, shard_dir,
                                       write_h5_atomic, write_table)
from pipeline.core.exits import PipelineError, RetryableError
from pipeline.formats.locks import LockTimeout, exclusive_lock
from pipeline.formats.atomic import TEMPORARY_MARK, _create_temporary, atomic_path, fsync_directory, fsync_file

__all__ = ["MatchfileConfig", "ReferenceMeta", "EpochMeta", "MatchfileError", "MatchfileLockTimeout",
           "EpochMatch", "AppendResult", "match_epoch", "epoch_tables", "create_matchfile", "append_epoch",
           "combine", "fold", "fold_root", "FoldReport", "matchfiles_under", "pending_shards", "matchfile_lock",
           "STALE_TEMPORARY_S"]

log = logging.getLogger("skydiff.matchfile")

#: A temporary file older than this (s) is taken for a killed writer's and removed by a fold.
#: Appenders and seeders take no lock, so a fold cannot tell a live writer's temporary file
#: from a dead one's but by its age: an append writes its shard in well under a second.
STALE_TEMPORARY_S = 3600.0

#: Test hook: called with a stage name at each step of a fold ("claimed", "written",
#: "deleted"), so tests can kill a fold at a chosen point.  None in normal runs.
_FOLD_HOOK = None


class MatchfileError(PipelineError, RuntimeError):
    """A matchfile that cannot be written as asked (the message names the file)."""


class MatchfileLockTimeout(MatchfileError, RetryableError):
    """Another writer held the matchfile's lock for longer than the timeout."""


@dataclass(frozen=True)
class ReferenceMeta:
    field: int
    ccdid: int
    qid: int
    fid: int
    refid: int
    jd_start: float
    jd_end: float
    nframes: int

    @property
    def rcid(self) -> int:
        return rcid_of(self.ccdid, self.qid)


@dataclass(frozen=True)
class EpochMeta:
    expid: int
    obsmjd: float
    exptime: float
    airmass: float
    magzp: float
    magzpunc: float
    seeing: float
    limmag: float
    field_ra: float
    field_dec: float
    astrometry_qa: int = 0
    photometry_qa: int = 0
    programid: int = 1
    clrcoeff: float = math.nan     # colour coefficient of the calibration (NaN: none known)
    clrcounc: float = math.nan     # its uncertainty (NaN: fixed, not fitted, or none known)


@dataclass(frozen=True)
class EpochMatch:
    """One-to-one match of an epoch's detections to reference objects."""

    detection: np.ndarray          # matched detection rows
    source: np.ndarray             # their reference-object rows
    separation_arcsec: np.ndarray
    unmatched: np.ndarray          # detection rows matched to no object


@dataclass(frozen=True)
class AppendResult:
    expid: int
    nmatched: int
    nunmatched: int
    shard: Path


@contextmanager
def matchfile_lock(path: str | Path, timeout_s: float):
    """Exclusive writer lock on ``<path>.lock`` (flock), or :class:`MatchfileLockTimeout`."""
    path = Path(path)
    lock_path = path.with_name(path.name + ".lock")
    try:
        with exclusive_lock(lock_path, timeout_s):
            yield
    except LockTimeout as exc:
        raise MatchfileLockTimeout(f"{path}: another writer held {lock_path.name} for more than "
                                   f"{timeout_s:g} s (holder: {exc.holder})") from None


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary files of killed writers: those older than :data:`STALE_TEMPORARY_S`.

    A younger one may be a live appender's or seeder's on another node (they take no lock).
    """
    stale = list(path.parent.glob(f".{path.name}{TEMPORARY_MARK}*"))
    if shard_dir(path).is_dir():
        stale += shard_dir(path).glob(f".*{TEMPORARY_MARK}*")
    cutoff = time.time() - STALE_TEMPORARY_S
    for leftover in stale:
        try:
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink(missing_ok=True)
        except FileNotFoundError:
            pass


def _column(table: Table, name: str, where: str, default=None) -> np.ndarray:
    if name in table.colnames:
        column = table[name]
        return np.asarray(column.filled(np.nan) if hasattr(column, "filled") and column.dtype.kind == "f"
                          else column)
    if default is not None:
        return np.full(len(table), default)
    raise LayoutError(f"{where}: missing column {name!r} (has {', '.join(table.colnames) or 'none'})")


def _check_positions(ra: np.ndarray, dec: np.ndarray, where: str) -> None:
    bad = ~(np.isfinite(ra) & np.isfinite(dec)) | (np.abs(dec) > 90)
    if np.any(bad):
        raise LayoutError(f"{where}: {int(bad.sum())} row(s) with missing or impossible ra/dec "
                          f"(first at row {int(np.flatnonzero(bad)[0])})")


def create_matchfile(root: str | Path, reference: Table, meta: ReferenceMeta,
                     config: MatchfileConfig = MatchfileConfig()) -> Path:
    """Seed the matchfile of (field, ccdid, qid, fid) from a reference catalogue.

    Idempotent and safe to run concurrently on several nodes without a lock: if the file
    exists from the same reference id it is left as it is, and of concurrent seeders exactly
    one creates it (:func:`_seed_exclusively`).  The matchfile is then registered in the
    root's footprint index (whose ``flock`` may not hold across nodes: every fold repairs
    the index, :func:`fold_root`).

    Raises
    ------
    LayoutError
        The catalogue breaks the input contract (missing column, duplicate or out-of-range id, bad position).
    MatchfileError
        The file exists, seeded from another reference.
    """
    root = Path(root)
    path = matchfile_path(root, meta.field, meta.ccdid, meta.qid, meta.fid)
    where = f"reference catalogue {meta.refid} for {path.name}"
    ids = _column(reference, "id", where).astype(np.int64)
    ra, dec = _column(reference, "ra", where).astype(float), _column(reference, "dec", where).astype(float)
    if len(ids) == 0:
        raise LayoutError(f"{where}: no sources")
    _check_positions(ra, dec, where)
    if len(np.unique(ids)) != len(ids):
        raise LayoutError(f"{where}: duplicate ids")
    if ids.min() < 0 or ids.max() >= 10**ID_DIGITS:
        raise LayoutError(f"{where}: ids must lie in 0..{10**ID_DIGITS - 1} to form object ids")
    order = np.argsort(ids)
    sources = coerce_columns("sources", {
        "id": ids[order], "ra": ra[order], "dec": dec[order],
        "refmag": _column(reference, "mag", where)[order], "refmagerr": _column(reference, "magerr", where)[order],
        "refflags": _column(reference, "flags", where, default=0)[order],
        "phot_start": np.zeros(len(ids), np.int64), "phot_count": np.zeros(len(ids), np.int32)}, where)
    footprint = footprint_of(ra, dec)
    attrs = {"layout_version": LAYOUT_VERSION, "kind": "matchfile", "field": meta.field, "ccdid": meta.ccdid,
             "qid": meta.qid, "rcid": meta.rcid, "fid": meta.fid, "filtercode": filtercode_of(meta.fid),
             "refid": meta.refid, "ref_jd_start": meta.jd_start, "ref_jd_end": meta.jd_end,
             "ref_nframes": meta.nframes, "match_radius_arcsec": config.match_radius_arcsec,
             "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "software": f"skydiff {__version__}",
             **{f"footprint_{k}": v for k, v in asdict(footprint).items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        def fill(h5: h5py.File) -> None:
            h5.attrs.update(attrs)
            write_table(h5, "sources", sources)
            for table in ("exposures", "photometry", "unmatched"):
                write_table(h5, table, empty_columns(table))
        _seed_exclusively(path, fill)
    # Ours or a concurrent seeder's: either way it must come from this reference.
    _check_seeded_from(path, meta.refid)
    shard_dir(path).mkdir(exist_ok=True)
    register_footprint(root, path, footprint, {k: attrs[k] for k in ("field", "ccdid", "qid", "fid")})
    return path


def _seed_exclusively(path: Path, fill) -> bool:
    """Write a new matchfile at ``path`` unless one appears meanwhile; True if this call made it.

    The file is written whole to a unique hidden temporary name beside ``path`` and fsynced,
    then ``link``-ed to ``path``: a link never replaces an existing name, so of concurrent
    seeders (on any nodes) exactly one wins, and the others keep the winner's file.  NFS may
    answer a retransmitted ``link`` that did succeed with EEXIST; the temporary file's link
    count (2 while both names exist) tells that case apart, as open(2) advises for lock
    files on NFS.
    """
    temporary = _create_temporary(path, 0o666)
    try:
        with h5py.File(temporary, "w", libver=("earliest", "v110"), locking=False) as h5:
            fill(h5)
        fsync_file(temporary)
        try:
            os.link(temporary, path)
            made = True
        except FileExistsError:
            made = os.stat(temporary).st_nlink == 2 and os.path.samefile(temporary, path)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise MatchfileError(f"{path}: the file system does not support hard links, which seeding a "
                                     "matchfile safely needs (see the README's file-system notes)") from None
            raise
    finally:
        temporary.unlink(missing_ok=True)
    fsync_directory(path.parent)
    return made


def _check_seeded_from(path: Path, refid: int) -> None:
    try:
        with h5py.File(path, "r", locking=False) as h5:
            check_layout_version(h5, path)
            existing = int(h5.attrs["refid"])
    except OSError as exc:
        raise MatchfileError(f"{path}: not a readable HDF5 matchfile ({exc})") from None
    if existing != refid:
        raise MatchfileError(f"{path}: seeded from reference {existing}, not {refid}; "
                             "re-seeding would orphan its epochs")


def match_epoch(ref_ra, ref_dec, det_ra, det_dec, radius_arcsec: float) -> EpochMatch:
    """Match detections to reference objects one-to-one within a radius (nearer detection wins).

    Each detection's nearest reference object comes from scipy's KD-tree over unit vectors
    searched only within the radius's chord: astropy's ``match_to_catalog_sky`` (the same
    tree, searched without a bound) took twice as long on a 50,000-source epoch.
    """
    det_ra = np.asarray(det_ra, float)
    if len(det_ra) == 0:
        empty = np.zeros(0, np.int64)
        return EpochMatch(empty, empty, np.zeros(0), empty)
    tree = cKDTree(unit_vectors(np.asarray(ref_ra, float), np.asarray(ref_dec, float)))
    bound = 2.0 * math.sin(math.radians(radius_arcsec / 3600.0) / 2.0) * (1.0 + 1e-9)
    chord, nearest = tree.query(unit_vectors(det_ra, np.asarray(det_dec, float)), distance_upper_bound=bound)
    within = np.isfinite(chord)
    sep = np.full(len(det_ra), np.inf)
    sep[within] = np.rad2deg(2.0 * np.arcsin(chord[within] / 2.0)) * 3600.0
    candidates = np.flatnonzero(sep <= radius_arcsec)
    # Nearest first, then keep each object's first claimant.
    candidates = candidates[np.argsort(sep[candidates], kind="stable")]
    _, first = np.unique(nearest[candidates], return_index=True)
    matched = np.sort(candidates[first])
    is_matched = np.zeros(len(det_ra), bool)
    is_matched[matched] = True
    unmatched = np.flatnonzero(~is_matched)
    return EpochMatch(matched, nearest[matched].astype(np.int64), sep[matched], unmatched)


def epoch_tables(sources: dict, meta: EpochMeta, photometry: Table, location: EarthLocation,
                 radius_arcsec: float, where: str = "epoch") -> dict[str, dict]:
    """The rows one epoch adds: ``exposures`` (one row), ``photometry`` and ``unmatched``.

    ``sources`` holds the matchfile's ``id``, ``ra``, ``dec`` (sorted by id).
    """
    where = f"{where} expid {meta.expid}"
    ra, dec = _column(photometry, "ra", where).astype(float), _column(photometry, "dec", where).astype(float)
    _check_positions(ra, dec, where)
    values = {name: _column(photometry, name, where)
              for name in ("mag", "magerr", "flux", "fluxerr", "flags", "chi", "sharp")}
    match = match_epoch(sources["ra"], sources["dec"], ra, dec, radius_arcsec)
    hjd = heliocentric_julian_date(ra, dec, meta.obsmjd, meta.exptime, location) if len(ra) else np.zeros(0)
    middle = Time(meta.obsmjd + 0.5 * meta.exptime / SECONDS_PER_DAY, format="mjd", scale="utc")
    centre_hjd = middle.jd + exact_light_travel_time(meta.field_ra, meta.field_dec, middle, location)[0] / SECONDS_PER_DAY
    rows = match.detection[np.argsort(match.source, kind="stable")]
    phot = {"objid": sources["id"][np.sort(match.source)], "expid": np.full(len(rows), meta.expid),
            **{k: v[rows] for k, v in values.items()}, "hjd": hjd[rows]}
    lone = match.unmatched
    unmatched = {"expid": np.full(len(lone), meta.expid), "ra": ra[lone], "dec": dec[lone],
                 **{k: v[lone] for k, v in values.items()}, "hjd": hjd[lone]}
    exposure = {**{k: [v] for k, v in asdict(meta).items() if k != "obsmjd"}, "mjd": [meta.obsmjd],
                "hjd": [centre_hjd], "nmatched": [len(rows)], "nunmatched": [len(lone)],
                "filefracday": filefracday(meta.obsmjd)}
    return {"exposures": coerce_columns("exposures", exposure, where),
            "photometry": coerce_columns("photometry", phot, where),
            "unmatched": coerce_columns("unmatched", unmatched, where)}


def pending_shards(path: str | Path) -> list[Path]:
    """The committed epoch shards not yet folded into the main file (plain or claimed, one per expid)."""
    return [shard.path for shard in committed_shards(path)]


def _require_matchfile(path: Path) -> dict:
    if not path.exists():
        raise MatchfileError(f"{path}: no such matchfile (seed it from the reference catalogue first)")
    try:
        with h5py.File(path, "r", locking=False) as h5:
            check_layout_version(h5, path)
            return {"attrs": dict(h5.attrs), **read_table(h5, "sources", ["id", "ra", "dec"])}
    except OSError as exc:
        raise MatchfileError(f"{path}: not a readable HDF5 matchfile ({exc})") from None


def append_epoch(path: str | Path, meta: EpochMeta, photometry: Table, location: EarthLocation,
                 config: MatchfileConfig = MatchfileConfig()) -> AppendResult:
    """Match one epoch's photometry to the reference objects and commit it to the matchfile.

    Returns once the epoch is committed: its shard written to a unique temporary name,
    fsynced, renamed to ``<expid>.h5`` (replacing an earlier shard of the exposure) and its
    folder fsynced.  Takes no lock and never folds (see the module docstring): any number of
    processes on any nodes may append to one matchfile at once.
    """
    path = Path(path)
    sources = _require_matchfile(path)
    tables = epoch_tables(sources, meta, photometry, location, config.match_radius_arcsec, where=str(path))
    shard = shard_dir(path) / f"{int(meta.expid)}.h5"
    keys = {k: sources["attrs"][k] for k in ("field", "ccdid", "qid", "rcid", "fid", "filtercode", "refid")}

    def fill(h5: h5py.File) -> None:
        h5.attrs.update({"layout_version": LAYOUT_VERSION, "kind": "epoch-shard", "expid": int(meta.expid), **keys})
        for name, columns in tables.items():
            # A shard lives until the next fold, which reads it once: not compressing it
            # makes both the append and the fold's reading of it cheaper.
            write_table(h5, name, columns, compress=False)

    shard.parent.mkdir(exist_ok=True)
    write_h5_atomic(shard, fill)
    return AppendResult(int(meta.expid), len(tables["photometry"]["objid"]), len(tables["unmatched"]["expid"]),
                        shard)


def combine(path: str | Path, config: MatchfileConfig = MatchfileConfig()) -> int:
    """Fold every pending shard into the main file now (:func:`fold` with ``everything``); the number folded."""
    return fold(path, config, everything=True)


def fold(path: str | Path, config: MatchfileConfig = MatchfileConfig(), everything: bool = False) -> int:
    """Fold a matchfile's pending shards into a new main file; the number of shards folded.

    Folds when at least ``config.combine_threshold`` shards are pending, when a killed
    fold left claimed shards, or always with ``everything``.  Only one fold of a matchfile
    may run at a time (the caller's duty: the Slurm fold job is a singleton; the
    ``flock`` taken here guards where it works, but not across every shared file system).
    The protocol (claim, write, delete only the claimed) is in the module docstring.

    Raises
    ------
    MatchfileError
        No readable main file, an unreadable shard (left in place), or the main file
        replaced by another fold meanwhile (this fold's claims are left for the next one).
    MatchfileLockTimeout
        Another fold held ``<matchfile>.lock`` for ``config.lock_timeout_s``.
    """
    path = Path(path)
    _require_matchfile(path)
    with matchfile_lock(path, config.lock_timeout_s):
        _remove_stale_temporaries(path)
        shards = committed_shards(path)
        if not shards:
            return 0
        # Claims a killed fold left (even ones a newer plain shard supersedes) are finished
        # now, whatever the threshold: they are the fold's own unfinished business.
        if not (everything or len(shards) >= config.combine_threshold or _has_claims(path)):
            return 0
        claimed = _claim(path, shards)
        if not claimed:
            return 0
        _write_folded(path, claimed)
        _hook("written")
        for shard in claimed:
            shard.unlink(missing_ok=True)
            _hook("deleted")
        fsync_directory(shard_dir(path))
    log.debug("%s: folded %d epoch shard(s)", path, len(claimed))
    return len(claimed)


def _has_claims(path: Path) -> bool:
    try:
        return any(CLAIM_MARK in name and not name.startswith(".") for name in os.listdir(shard_dir(path)))
    except FileNotFoundError:
        return False


def _hook(stage: str) -> None:
    if _FOLD_HOOK is not None:
        _FOLD_HOOK(stage)


def _claim(path: Path, shards: list[ShardFile]) -> list[Path]:
    """Claim every listed shard for this fold; the claimed paths (plain ones renamed, stale claims adopted).

    A plain ``<key>.h5`` is renamed to ``<key>.h5.folding-<token>``: from then on a re-append
    of that exposure makes a new plain shard, which this fold neither reads nor deletes.  A
    claim left by a killed fold for a key that now also has a plain shard is older than it
    (the plain one was committed after the claim), so it is deleted before the plain one is
    claimed, keeping one claimed shard per key.
    """
    token = secrets.token_hex(4)
    directory = shard_dir(path)
    stale_claims: dict[str, list[Path]] = {}
    for entry in directory.iterdir():
        if CLAIM_MARK in entry.name and not entry.name.startswith("."):
            stale_claims.setdefault(entry.name.split(".h5" + CLAIM_MARK, 1)[0], []).append(entry)
    claimed = []
    for shard in shards:
        # Older claims of this key: superseded by the plain shard, or (only if folds ever ran
        # concurrently) by the newer claim adopted here; left, a later fold would adopt one
        # and fold an older version over a newer.
        for superseded in stale_claims.get(shard.key, []):
            if superseded != shard.path:
                superseded.unlink(missing_ok=True)
        if shard.claimed:
            claimed.append(shard.path)            # adopted from a killed fold
            continue
        target = shard.path.with_name(f"{shard.path.name}{CLAIM_MARK}{token}")
        try:
            os.rename(shard.path, target)
        except FileNotFoundError:
            continue                               # cannot happen with one fold at a time; skip it then
        claimed.append(target)
        _hook("claimed")
    fsync_directory(directory)
    return claimed


def _read_shard(path: Path) -> dict[str, dict]:
    try:
        with h5py.File(path, "r", locking=False) as h5:
            check_layout_version(h5, path)
            return {name: read_table(h5, name) for name in ("exposures", "photometry", "unmatched")}
    except (OSError, KeyError) as exc:
        raise MatchfileError(f"{path}: unreadable epoch shard ({exc})") from None


def _main_identity(path: Path) -> tuple:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


def _write_folded(path: Path, shard_paths: list[Path]) -> None:
    """Write main + shards as a new main file (temporary file, fsync, rename, folder fsync)."""
    shards = [_read_shard(p) for p in shard_paths]
    new_expids = np.concatenate([s["exposures"]["expid"] for s in shards])
    identity = _main_identity(path)
    with h5py.File(path, "r", locking=False) as main:
        attrs = dict(main.attrs)
        sources = read_table(main, "sources")
        groups = {t: main[t] for t in ("exposures", "photometry", "unmatched")}
        keep = {t: ~np.isin(group["expid"][...], new_expids) for t, group in groups.items()}
        # The sort keys are merged once and kept for their own columns' writing.
        keys: dict[tuple[str, str], np.ndarray] = {}

        def merged(table: str, name: str) -> np.ndarray:
            if (table, name) in keys:
                return keys[table, name]
            return np.concatenate([groups[table][name][...][keep[table]]] + [s[table][name] for s in shards])

        for key in (("photometry", "objid"), ("photometry", "hjd"), ("exposures", "mjd"), ("unmatched", "expid")):
            keys[key] = merged(*key)
        source_row = np.searchsorted(sources["id"], merged("photometry", "objid"))
        photometry_order = np.lexsort((merged("photometry", "hjd"), source_row))
        exposure_order = np.argsort(merged("exposures", "mjd"), kind="stable")
        unmatched_order = np.argsort(merged("unmatched", "expid"), kind="stable")
        counts = np.bincount(source_row, minlength=len(sources["id"]))
        sources["phot_count"] = counts.astype(np.int32)
        sources["phot_start"] = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        orders = {"exposures": exposure_order, "photometry": photometry_order, "unmatched": unmatched_order}

        with atomic_path(path, durable=True) as temporary:
            with h5py.File(temporary, "w", libver=("earliest", "v110"), locking=False) as h5:
                h5.attrs.update(attrs)
                write_table(h5, "sources", sources)
                for table, order in orders.items():
                    write_table(h5, table, _LazyColumns(lambda name, t=table, o=order: merged(t, name)[o]))
            # Last line of defence against a second fold of this file running against the
            # rules: its rename would be lost under ours, or ours would drop its epochs.
            if _main_identity(path) != identity:
                raise MatchfileError(f"{path}: replaced by another fold while this one ran; one fold at a time "
                                     "per matchfile (this fold's claimed shards are left for the next fold)")


@dataclass
class FoldReport:
    """What :func:`fold_root` did: shards folded per matchfile, files that failed, index entries repaired."""

    folded: dict[Path, int] = field(default_factory=dict)
    failed: dict[Path, str] = field(default_factory=dict)
    indexed: int = 0


def matchfiles_under(root: str | Path) -> list[Path]:
    """Every matchfile under ``root`` (``*_match.h5``, hidden temporary files left out)."""
    return sorted(p for p in Path(root).rglob("*_match.h5") if not p.name.startswith("."))


def fold_root(root: str | Path, config: MatchfileConfig = MatchfileConfig(), paths=None,
              everything: bool = False) -> FoldReport:
    """Fold the matchfiles under ``root`` (or ``paths``) that need it, and repair the root's index.

    The dedicated fold step (``skydiff matchfile fold``; the Slurm fold job; the local
    executor after its quadrants).  A matchfile that fails (:class:`MatchfileError`, an
    unreadable shard...) is reported and the others are still folded.  Every matchfile
    under the root missing from the footprint index is registered again: seeders on several
    nodes update the index under a ``flock`` that may not hold across them, so an entry
    can be lost; the one-at-a-time fold step puts it back.
    """
    from pipeline.matchfile.index import ensure_indexed

    root = Path(root)
    report = FoldReport()
    targets = matchfiles_under(root) if paths is None else [Path(p) for p in paths]
    for path in targets:
        try:
            folded = fold(path, config, everything=everything)
        except (MatchfileError, LayoutError) as exc:
            report.failed[path] = str(exc)
            log.error("%s", exc)
            continue
        if folded:
            report.folded[path] = folded
    if root.is_dir():
        report.indexed = ensure_indexed(root, [p for p in targets if p.exists()])
    return report


class _LazyColumns:
    """Columns computed one at a time as the writer asks for them (bounded memory on large folds)."""

    def __init__(self, compute):
        self._compute = compute

    def __getitem__(self, name: str) -> np.ndarray:
        return self._compute(name)
