"""Object history: objects, their detections and the images that covered them.

For each new quadrant image the store, in one transaction,

1. records the image (its pid, time, filter, 5-sigma limit and sky footprint), so later
   candidates at any position it covered get an upper limit from it and count it in
   ``ncovhist``;
2. gives every candidate an ``objectId``: the nearest known object within 1.5 arcsec, or a
   newly minted name (``ZTF26aaaaaab``...) from a per-year counter;
3. records the candidate as a detection (keyed by ``candid``, so a rerun of the same quadrant
   adds nothing and returns the same objectId);
4. returns the candidate's history: ``prv_candidates`` (detections within 1.5 arcsec and upper
   limits from covering images without such a detection, from the 30 days before this
   exposure, all filters, oldest first), ``ndethist``, ``jdstarthist``, ``jdendhist`` (detections
   within 1.5 arcsec on the same field and rcid, this one included, as ZTF counts them) and
   ``ncovhist`` (every image on any field/rcid that covered the position, this one included).

Each detection and each image's upper limit is stored with its Avro encoding as a
``prv_candidate`` (it never changes), and returned as an :class:`~alerts.schema.EncodedRecord`
that the packet serialiser splices in unencoded: an alert's 30 history entries cost no
encoding.  Databases written before that column existed are migrated on opening (their old
rows have no encoding and are encoded when serialised).

Spatial lookups use HEALPix (nested): detections and objects are indexed at nside 16384
(12.9 arcsec cells; a 1.5 arcsec search reads one cell and its 8 neighbours), image
footprints at nside 64 (0.9 degree cells, each image listed in every cell it touches).

:class:`HistoryStore` is the interface; :class:`SQLHistoryStore` the association over the
tables, shared by both backends.  :class:`SQLiteHistoryStore` is the embedded default: one
SQLite file in WAL mode with a busy timeout, each image one ``BEGIN IMMEDIATE`` transaction,
safe for several processes on one machine (never on a shared/network file system: SQLite's
locking is not reliable there).  :class:`alerts.history_postgres.PostgresHistoryStore`, for a
cluster, runs the same association over the same tables: the image transaction takes
``pg_advisory_xact_lock`` on the footprint's HEALPix cells (so overlapping images associate
one after the other) and mints names with ``INSERT INTO id_counters ... ON CONFLICT DO UPDATE
... RETURNING``.
Images that run at the same time on several nodes associate in time order: the order a
sequential run would give them, so the same objects, ``prv_candidates`` and ``ndethist``.
``skydiff submit`` *announces* every quadrant of an exposure before it queues the tasks
(:meth:`HistoryStore.announce`: the image's pid, jd and the nside-64 cells of its nominal
footprint, in ``pending_images`` and ``pending_cells``).  Before its transaction an image
waits while an announced image of an earlier jd shares one of its cells; its own
announcement is removed in its transaction, and one that will never be recorded (an unusable
quadrant, a task out of retries) is withdrawn by the task or the exposure's summary job
(:meth:`HistoryStore.withdraw`).  The wait is bounded (``[history] order_wait_s``): an
announced image that has not been recorded by then (its job cancelled, its node lost) is
declared abandoned, its announcement withdrawn with a warning, and the waiting image goes
on.  Images of one exposure (one jd) never wait on each other; images nobody announced never
wait.  Exposures must be submitted in time order for the rule to hold (``skydiff watch``
does).
:func:`open_history_store` opens the one the ``[history]`` configuration names.
"""
from __future__ import annotations

import abc
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import astropy.units as u
import numpy as np
import orjson
from astropy_healpix import HEALPix
from scipy.spatial import cKDTree

from alerts.ids import object_id
from alerts.schema import EncodedRecord, encode_prv_candidate
from pipeline.core.exits import PipelineError

__all__ = ["ImageRecord", "PendingImage", "CandidateHistory", "HistoryStore", "SQLHistoryStore", "SQLiteHistoryStore", "HistoryError",
           "MATCH_RADIUS_ARCSEC", "HISTORY_DAYS", "open_history_store"]

MATCH_RADIUS_ARCSEC = 1.5
HISTORY_DAYS = 30.0
_OBJECT_NSIDE = 16384
_IMAGE_NSIDE = 64
_ARCSEC = math.pi / (180.0 * 3600.0)
#: How often an image waiting for an earlier announced image looks again.
_ORDER_POLL_S = 0.2

log = logging.getLogger("skydiff.history")


class HistoryError(PipelineError, RuntimeError):
    """The object history database cannot be opened (exit 1; the message names the file)."""


@dataclass(frozen=True)
class ImageRecord:
    """What the history keeps of one quadrant image.

    ``footprint`` holds the four sky corners (ra, dec in degrees, in order around the edge);
    ``upper_limit`` is the ``prv_candidate`` entry (candid null) that any position it covered
    without a detection receives.
    """

    pid: int
    jd: float
    field: int
    rcid: int
    footprint: tuple[tuple[float, float], ...]
    upper_limit: Mapping[str, Any]


@dataclass(frozen=True)
class PendingImage:
    """An image announced before it is processed (see :meth:`HistoryStore.announce`).

    ``footprint`` is its nominal sky footprint (corners in degrees, e.g. from the raw header's
    WCS: the nside-64 cells it is listed in have a margin of two cells, 1.8 degrees, far more
    than a raw pointing's error).
    """

    pid: int
    jd: float
    footprint: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class CandidateHistory:
    """The history-derived part of one alert."""

    object_id: str
    prv_candidates: list = field(default_factory=list)
    ndethist: int = 1
    ncovhist: int = 1
    jdstarthist: float | None = None
    jdendhist: float | None = None
    new_object: bool = False


class HistoryStore(abc.ABC):
    """Where objects and their history live (SQLite by default; PostgreSQL for a cluster)."""

    survey: str

    @abc.abstractmethod
    def record_image(self, image: ImageRecord, detections: Sequence[Mapping[str, Any]]) -> list[CandidateHistory]:
        """Record an image and its detections atomically; return each detection's history.

        ``detections`` are ``prv_candidate``-shaped records with at least ``candid``, ``jd``,
        ``ra``, ``dec``, ``field`` and ``rcid``.  Idempotent per ``candid`` and ``pid``.
        """

    @abc.abstractmethod
    def announce(self, images: Sequence[PendingImage]) -> int:
        """Announce images about to be processed, so that later images overlapping them wait
        for them (the time-order rule of the module docstring); the number announced.
        Images already recorded are not announced again."""

    @abc.abstractmethod
    def withdraw(self, pids: Sequence[int]) -> int:
        """Withdraw announcements of images that will not be recorded; the number withdrawn."""

    @abc.abstractmethod
    def wait_for_earlier_images(self, pid: int, jd: float, footprint: Sequence[tuple[float, float]]) -> None:
        """Return once no announced image of an earlier jd overlaps this footprint (or after
        the bounded wait of the module docstring).  :meth:`record_image` waits so itself;
        whatever else must see the earlier images (forced photometry of their archived
        difference images) calls it first."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unit_vectors(ra_deg, dec_deg) -> np.ndarray:
    ra, dec = np.radians(np.asarray(ra_deg, float)), np.radians(np.asarray(dec_deg, float))
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def _chord_arcsec(chord: np.ndarray) -> np.ndarray:
    """The angle (arcsec) between unit vectors ``chord`` apart."""
    return 2.0 * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0)) / _ARCSEC


def _year_of_jd(jd: float) -> int:
    return (datetime.datetime(2000, 1, 1, 12) + datetime.timedelta(days=jd - 2451545.0)).year


_TABLES = """
CREATE TABLE IF NOT EXISTS objects (
    object_id TEXT PRIMARY KEY, ra REAL NOT NULL, dec REAL NOT NULL,
    hpix INTEGER NOT NULL, first_jd REAL NOT NULL);
CREATE INDEX IF NOT EXISTS objects_hpix ON objects (hpix);
CREATE TABLE IF NOT EXISTS detections (
    candid INTEGER PRIMARY KEY, object_id TEXT NOT NULL, pid INTEGER NOT NULL, jd REAL NOT NULL,
    ra REAL NOT NULL, dec REAL NOT NULL, hpix INTEGER NOT NULL, field INTEGER, rcid INTEGER,
    record TEXT NOT NULL, avro BLOB);
CREATE INDEX IF NOT EXISTS detections_hpix ON detections (hpix, jd);
CREATE TABLE IF NOT EXISTS images (
    pid INTEGER PRIMARY KEY, jd REAL NOT NULL, field INTEGER, rcid INTEGER,
    corners TEXT NOT NULL, upper_limit TEXT NOT NULL, upper_limit_avro BLOB);
CREATE TABLE IF NOT EXISTS image_cells (
    hpix INTEGER NOT NULL, pid INTEGER NOT NULL, PRIMARY KEY (hpix, pid)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS id_counters (year INTEGER PRIMARY KEY, next_serial INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pending_images (pid INTEGER PRIMARY KEY, jd REAL NOT NULL, announced_utc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pending_cells (
    hpix INTEGER NOT NULL, pid INTEGER NOT NULL, jd REAL NOT NULL, PRIMARY KEY (hpix, pid)) WITHOUT ROWID;
"""
#: Columns added after the first release: (table, column, type), added to older databases.
_ADDED_COLUMNS = (("detections", "avro", "BLOB"), ("images", "upper_limit_avro", "BLOB"))


def _parse_record(text: str) -> dict:
    """A stored record (written by :func:`_record_text`).  orjson parses one in a fifth of
    json's time, and an image reads some 2,000 of them; json parses the rare record orjson
    refuses (``json.dumps`` writes a NaN as the bare token ``NaN``, which strict JSON has not)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _record_text(entry: Mapping[str, Any]) -> str:
    """The stored text of a record: JSON that :func:`_parse_record` reads back as ``entry``.

    orjson writes a record in a tenth of ``json.dumps``'s time (an image writes 200).  It
    writes NaN and infinities as ``null`` and refuses what JSON cannot hold exactly (integers
    beyond 64 bits, lone surrogates), so records holding those are written by ``json.dumps``
    as before: either way the record parses back to the same values.
    """
    for value in entry.values():
        if isinstance(value, float) and not math.isfinite(value):
            return json.dumps(dict(entry))
    try:
        return orjson.dumps(entry).decode()
    except TypeError:              # orjson.JSONEncodeError; json.dumps raises for what it cannot hold
        return json.dumps(dict(entry))


def _prv_encoding(entry: Mapping[str, Any]) -> bytes | None:
    """The entry's Avro encoding, or None when it does not fit the schema (the error then
    surfaces when an alert holding it is serialised, as for any other bad value)."""
    try:
        return encode_prv_candidate(entry)
    except (ValueError, TypeError, AttributeError, OverflowError):
        return None


class _Stored(NamedTuple):
    """One detection as the association sees it (read from the store or added by this image);
    the columns of the detections query, in its order, so a row becomes one without work."""

    ra: float
    dec: float
    candid: int
    pid: int
    jd: float
    field: int | None
    rcid: int | None
    record: str
    avro: bytes | None


#: The detections query's columns, in :class:`_Stored`'s order.
_STORED_COLUMNS = "ra, dec, candid, pid, jd, field, rcid, record, avro"


def _planes_of_many(corner_texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Convex footprints' edge planes: for each (its corners as JSON text), the normals of its
    edges and on which side of each the inside lies.  Footprints with the same number of
    corners are done in one set of array operations (an image reads some hundreds of
    footprints, and per footprint the NumPy calls' overhead was most of the cost)."""
    corners = [np.asarray(_parse_record(text), float) for text in corner_texts]
    planes: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(corners)
    by_size: dict[int, list[int]] = {}
    for i, c in enumerate(corners):
        by_size.setdefault(len(c), []).append(i)
    for members in by_size.values():
        stack = np.stack([corners[i] for i in members])                    # (m, k, 2)
        vectors = _unit_vectors(stack[..., 0], stack[..., 1])              # (m, k, 3)
        normals = np.cross(vectors, np.roll(vectors, -1, axis=1))
        orientation = np.sign(np.einsum("mkc,mc->mk", normals, vectors.mean(axis=1)))
        for j, i in enumerate(members):
            planes[i] = (normals[j], orientation[j])
    return planes  # type: ignore[return-value]


def _covering_images(images: Mapping[int, list[tuple]], cells: np.ndarray, points: np.ndarray,
                     jds: Sequence[float], planes: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> list[list[tuple]]:
    """For each candidate: the images (jd, pid, limit, avro), in pid order, taken by its time
    whose footprint holds it; ``images`` lists (jd, pid, corners, limit, avro) per footprint
    cell, ``cells`` is each candidate's footprint cell, ``points`` its unit vector, and
    ``planes`` every listed image's edge planes by pid (:func:`_planes_of_many`)."""
    covering: list[list[tuple]] = [[] for _ in range(len(points))]
    jds = np.asarray(jds, float)
    for cell, rows in images.items():
        members = np.flatnonzero(cells == cell)
        if not members.size or not rows:
            continue
        rows = sorted(rows, key=lambda row: row[1])
        cell_planes = [planes[row[1]] for row in rows]
        k = max(len(n) for n, _ in cell_planes)
        if all(len(n) == k for n, _ in cell_planes):
            normals = np.stack([n for n, _ in cell_planes])
            orientation = np.stack([o for _, o in cell_planes])
        else:
            normals = np.zeros((len(rows), k, 3))
            orientation = np.zeros((len(rows), k))      # padding: 0 on either side counts as inside
            for j, (n, o) in enumerate(cell_planes):
                normals[j, :len(n)], orientation[j, :len(o)] = n, o
        sides = np.einsum("ikc,dc->dik", normals, points[members]) * orientation[None]
        taken = np.array([row[0] for row in rows])[None, :] <= jds[members][:, None]
        inside = np.all(sides >= 0.0, axis=2) & taken
        for a, i in enumerate(members.tolist()):
            covering[i] = [(rows[j][0], rows[j][1], rows[j][3], rows[j][4]) for j in np.flatnonzero(inside[a])]
    return covering


class SQLHistoryStore(HistoryStore):
    """The association over the history tables, shared by the SQLite and PostgreSQL stores.

    One image is one transaction: the image and its footprint cells are written, what the
    association needs is read in four queries (the candids already stored, the objects and
    detections in the candidates' HEALPix cells and their 8 neighbours, the images listed in
    the candidates' footprint cells), the candidates are associated in their order, in
    memory, exactly as if each were looked up after the previous one was written (a
    candidate within 1.5 arcsec of an object minted for an earlier candidate of the same
    image joins it), and the new objects and detections are written in bulk.  Names are
    minted last, with one ``INSERT INTO id_counters ... ON CONFLICT DO UPDATE ... RETURNING``
    per year, so a transaction holds its counter row only for its final writes and commit.

    A subclass provides the connection: :meth:`_query`, :meth:`_execute`,
    :meth:`_execute_many`, :meth:`_begin`, :meth:`_commit`, :meth:`_rollback`, the SQL of a
    list parameter (:meth:`_in_list`), and :meth:`_lock_cells`, which serialises images on
    overlapping footprints where the database does not serialise every writer already.  A
    client-server backend may also send statements without waiting for each (:meth:`_pipeline`,
    :meth:`_submit`), insert rows its own way (:meth:`_insert_rows`, :meth:`_insert_image`),
    read outside a transaction more cheaply (:meth:`_read_outside`), and read cells or images
    with other SQL giving the same association (:meth:`_cells_select`, :meth:`_images_select`).
    Statements are written with ``?`` placeholders.
    """

    def __init__(self, survey: str, order_wait_s: float = 600.0):
        self.survey = survey
        self.order_wait_s = float(order_wait_s)
        self._objects_hp = HEALPix(_OBJECT_NSIDE, order="nested")
        self._images_hp = HEALPix(_IMAGE_NSIDE, order="nested")
        self._planes_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    # -- what a backend provides --------------------------------------------------------
    @abc.abstractmethod
    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        """Rows of one statement."""

    @abc.abstractmethod
    def _execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""

    @abc.abstractmethod
    def _execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement for each row of parameters."""

    @abc.abstractmethod
    def _begin(self) -> None:
        """Start the image transaction (waiting for other writers as the backend must)."""

    @abc.abstractmethod
    def _commit(self) -> None:
        """Commit the image transaction."""

    @abc.abstractmethod
    def _rollback(self) -> None:
        """Roll the image transaction back."""

    @abc.abstractmethod
    def _in_list(self, column: str) -> str:
        """SQL testing ``column`` against one list parameter (see :meth:`_list_arg`)."""

    def _list_arg(self, values: Sequence[int]) -> Any:
        """The parameter :meth:`_in_list` expects for ``values``."""
        return [int(v) for v in values]

    def _lock_cells(self, cells: Sequence[int]) -> None:
        """Serialise this transaction with every other one touching ``cells`` (footprint
        cells at nside 64, ascending); nothing to do where the transaction locks the store."""

    def _pipeline(self):
        """A context in which statements may be sent without waiting for each one's answer
        (a client-server backend then pays one round trip for them all); the results of
        :meth:`_submit` are read after it closes."""
        return contextlib.nullcontext()

    def _submit(self, sql: str, args: Sequence[Any] = ()) -> Callable[[], list[tuple]]:
        """Send one query (inside :meth:`_pipeline`, possibly without waiting); a function
        that gives its rows."""
        rows = self._query(sql, args)
        return lambda: rows

    def _insert_rows(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                     conflict: str = "") -> None:
        """Insert ``rows`` (values of ``columns``) into ``table``, ``conflict`` being its
        ``ON CONFLICT`` clause if any."""
        marks = ", ".join("?" * len(columns))
        self._execute_many(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks}) {conflict}", rows)

    def _read_outside(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        """Rows of one query run outside any image transaction (none is left open)."""
        rows = self._query(sql, args)
        self._end_read()
        return rows

    def _cells_select(self, columns: str, table: str, cells: np.ndarray, where: str = "",
                      args: Sequence[Any] = ()) -> tuple[str, tuple]:
        """A query of ``columns`` from the rows of ``table`` whose ``hpix`` is one of
        ``cells`` (sorted, each once) and that meet ``where`` (on ``args``): its SQL and
        arguments."""
        return (f"SELECT {columns} FROM {table} WHERE {self._in_list('hpix')}" + (f" AND {where}" if where else ""),
                (self._list_arg(cells), *args))

    def _images_select(self, cells: np.ndarray, points: np.ndarray, max_jd: float) -> tuple[str, tuple]:
        """The query of the images listed in the footprint cells ``cells`` (sorted, each
        once) taken by ``max_jd``, as rows (cell, jd, pid, corners, limit, limit's Avro):
        every image that may hold one of the candidates ``points`` (unit vectors, in the
        same order as ``cells`` lists their cells) and perhaps others; its SQL and
        arguments."""
        return ("SELECT c.hpix, i.jd, i.pid, i.corners, i.upper_limit, i.upper_limit_avro FROM image_cells c "
                f"JOIN images i ON i.pid = c.pid WHERE {self._in_list('c.hpix')} AND i.jd <= ?",
                (self._list_arg(np.unique(cells)), max_jd))

    # -- spatial helpers -------------------------------------------------------------
    def object_cells(self, ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
        """The nside-16384 cells detections and objects at (ra, dec) are indexed under."""
        return np.atleast_1d(self._objects_hp.lonlat_to_healpix(ra * u.deg, dec * u.deg)).astype(np.int64)

    def _search_cells(self, centres: np.ndarray) -> np.ndarray:
        """The cells ``centres`` and their 8 neighbours, sorted, each once (a 1.5 arcsec search
        around a position never leaves its cell's neighbours)."""
        if not len(centres):
            return np.zeros(0, np.int64)
        cells = np.concatenate([centres, np.ravel(self._objects_hp.neighbours(centres))]).astype(np.int64)
        return np.unique(cells[cells >= 0])

    def footprint_cells(self, corners: list[list[float]]) -> list[int]:
        """The nside-64 cells an image is listed in: a cone around its corners, with a margin."""
        vectors = _unit_vectors([c[0] for c in corners], [c[1] for c in corners])
        centre = vectors.mean(axis=0)
        centre /= np.linalg.norm(centre)
        radius = float(np.max(np.arccos(np.clip(vectors @ centre, -1, 1))))
        lon, lat = math.atan2(centre[1], centre[0]), math.asin(centre[2])
        cells = self._images_hp.cone_search_lonlat(
            lon * u.rad, lat * u.rad, (radius * u.rad + 2 * self._images_hp.pixel_resolution).to(u.deg))
        return sorted({int(c) for c in cells})

    # -- time order across writers ------------------------------------------------------
    def announce(self, images: Sequence[PendingImage]) -> int:
        announced = 0
        self._begin()
        try:
            for image in images:
                pid = int(image.pid)
                self._execute("DELETE FROM pending_cells WHERE pid = ?", (pid,))
                self._execute("DELETE FROM pending_images WHERE pid = ?", (pid,))
                if self._query("SELECT 1 FROM images WHERE pid = ?", (pid,)):
                    continue
                cells = self.footprint_cells([[float(ra), float(dec)] for ra, dec in image.footprint])
                self._execute("INSERT INTO pending_images (pid, jd, announced_utc) VALUES (?, ?, ?)",
                              (pid, float(image.jd), datetime.datetime.now(datetime.timezone.utc).isoformat()))
                self._execute_many("INSERT INTO pending_cells (hpix, pid, jd) VALUES (?, ?, ?)",
                                   [(c, pid, float(image.jd)) for c in cells])
                announced += 1
            self._commit()
        except BaseException:
            self._rollback()
            raise
        return announced

    def withdraw(self, pids: Sequence[int]) -> int:
        pids = sorted({int(p) for p in pids})
        if not pids:
            return 0
        self._begin()
        try:
            self._execute(f"DELETE FROM pending_cells WHERE {self._in_list('pid')}", (self._list_arg(pids),))
            withdrawn = self._execute(f"DELETE FROM pending_images WHERE {self._in_list('pid')}",
                                      (self._list_arg(pids),))
            self._commit()
        except BaseException:
            self._rollback()
            raise
        return withdrawn

    def wait_for_earlier_images(self, pid, jd, footprint) -> None:
        corners = [[float(ra), float(dec)] for ra, dec in footprint]
        self._wait_for_earlier_cells(int(pid), float(jd), self.footprint_cells(corners))

    def _wait_for_earlier_cells(self, pid: int, jd: float, footprint: list[int]) -> None:
        """Wait while an announced image of an earlier jd shares a footprint cell with this one.

        Polled outside any transaction (nothing is held while waiting).  After
        ``order_wait_s`` the images still announced are declared abandoned: their
        announcements are withdrawn (so later images do not wait for them too) and this
        image goes on.
        """
        deadline = time.monotonic() + self.order_wait_s
        waited_for: set[int] = set()
        while True:
            earlier = {int(row[0]) for row in self._read_outside(
                f"SELECT DISTINCT pid FROM pending_cells WHERE {self._in_list('hpix')} AND jd < ? AND pid <> ?",
                (self._list_arg(footprint), float(jd), int(pid)))}
            if not earlier:
                if waited_for:
                    log.info("image pid %d: earlier overlapping image(s) %s recorded; associating", pid,
                             ", ".join(map(str, sorted(waited_for))))
                return
            if not waited_for:
                log.info("image pid %d: waiting for earlier overlapping image(s) %s", pid,
                         ", ".join(map(str, sorted(earlier))))
            waited_for |= earlier
            if time.monotonic() >= deadline:
                log.warning("image pid %d: earlier overlapping image(s) %s announced but not recorded after %.0f s "
                            "(history.order_wait_s): declared abandoned, their announcements withdrawn; "
                            "associating without them", pid, ", ".join(map(str, sorted(earlier))),
                            self.order_wait_s)
                self.withdraw(sorted(earlier))
                return
            time.sleep(_ORDER_POLL_S)

    def _end_read(self) -> None:
        """End a read outside the image transaction (PostgreSQL opens one with any statement)."""
        self._rollback()

    # -- the image transaction ---------------------------------------------------------
    def _insert_image(self, image: ImageRecord, corners: list[list[float]], cells: list[int]) -> None:
        inserted = self._execute(
            "INSERT INTO images (pid, jd, field, rcid, corners, upper_limit, upper_limit_avro) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (pid) DO NOTHING",
            (int(image.pid), float(image.jd), image.field, image.rcid, json.dumps(corners),
             json.dumps(dict(image.upper_limit)), _prv_encoding(image.upper_limit)))
        if inserted:
            self._execute_many("INSERT INTO image_cells (hpix, pid) VALUES (?, ?) ON CONFLICT DO NOTHING",
                               [(c, int(image.pid)) for c in cells])

    def _mint(self, years: list[int]) -> list[str]:
        """Names for new objects of these years (in this order), from the per-year counters."""
        names: list[str | None] = [None] * len(years)
        for year in sorted(set(years)):
            slots = [i for i, y in enumerate(years) if y == year]
            # One statement: the year's row is created or advanced, and locked until commit.
            (first,), = self._query(
                "INSERT INTO id_counters (year, next_serial) VALUES (?, ?) ON CONFLICT (year) DO UPDATE "
                "SET next_serial = id_counters.next_serial + excluded.next_serial RETURNING next_serial - ?",
                (year, len(slots), len(slots)))
            for k, slot in enumerate(slots):
                names[slot] = object_id(self.survey, year, int(first) + k)
        return names  # type: ignore[return-value]

    def record_image(self, image: ImageRecord, detections: Sequence[Mapping[str, Any]]) -> list[CandidateHistory]:
        corners = [[float(ra), float(dec)] for ra, dec in image.footprint]
        if len(corners) < 3:
            raise ValueError(f"image pid {image.pid}: footprint needs at least 3 corners, got {len(corners)}")
        dets = list(detections)
        footprint = self.footprint_cells(corners)
        ra = np.array([float(d["ra"]) for d in dets])
        dec = np.array([float(d["dec"]) for d in dets])
        jds = [float(d["jd"]) for d in dets]
        cells = self.object_cells(ra, dec) if dets else np.zeros(0, np.int64)
        image_cells = (np.atleast_1d(self._images_hp.lonlat_to_healpix(ra * u.deg, dec * u.deg)).astype(np.int64)
                       if dets else np.zeros(0, np.int64))
        lock = set(footprint) | set(image_cells.tolist())
        if len(image_cells):
            lock |= {int(n) for n in np.ravel(self._images_hp.neighbours(image_cells)) if n >= 0}
        self._wait_for_earlier_cells(int(image.pid), float(image.jd), sorted(lock))
        self._begin()
        try:
            # Everything up to the association is sent at once: the lock first (the server
            # runs the statements in order, so the reads see what overlapping images committed
            # before it), then the image, then the reads.
            with self._pipeline():
                self._lock_cells(sorted(lock))
                self._insert_image(image, corners, footprint)
                # The announcement goes with the record, in one commit: a later image waiting on
                # it sees both at once.
                self._execute("DELETE FROM pending_cells WHERE pid = ?", (int(image.pid),))
                self._execute("DELETE FROM pending_images WHERE pid = ?", (int(image.pid),))
                reads = self._submit_reads(dets, cells, image_cells, ra, dec, jds)
            plan = self._associate(int(image.pid), dets, ra, dec, jds, cells, image_cells, *(r() for r in reads))
            names = self._mint([year for year, *_ in plan.new_objects])
            with self._pipeline():
                self._insert_rows("objects", ("object_id", "ra", "dec", "hpix", "first_jd"),
                                  [(name, o_ra, o_dec, hpix, jd)
                                   for name, (_, o_ra, o_dec, hpix, jd) in zip(names, plan.new_objects)])
                self._insert_rows(
                    "detections", ("candid", "object_id", "pid", "jd", "ra", "dec", "hpix", "field", "rcid", "record",
                                   "avro"),
                    [(row.candid, plan.name(ref, names), int(image.pid), row.jd, row.ra, row.dec, int(cells[i]),
                      row.field, row.rcid, row.record, row.avro) for i, ref, row in plan.inserts],
                    "ON CONFLICT (candid) DO NOTHING")
                self._commit()
        except BaseException:
            self._rollback()
            raise
        return [dataclasses.replace(history, object_id=plan.name(ref, names)) for ref, history in plan.histories]

    def _submit_reads(self, dets, cells, image_cells, ra, dec, jds) -> list[Callable[[], list[tuple]]]:
        """Send the association's four queries: the candids already stored, the objects and
        the detections (taken by the image's time) in the candidates' cells and their
        neighbours, the images listed in the candidates' footprint cells; their results."""
        if not dets:
            return []
        max_jd = max(jds)
        wanted = self._search_cells(cells)
        return [self._submit(f"SELECT candid, object_id FROM detections WHERE {self._in_list('candid')}",
                             (self._list_arg([int(d["candid"]) for d in dets]),)),
                self._submit(*self._cells_select("ra, dec, object_id", "objects", wanted)),
                self._submit(*self._cells_select(_STORED_COLUMNS, "detections", wanted, "jd <= ?", (max_jd,))),
                self._submit(*self._images_select(image_cells, _unit_vectors(ra, dec).reshape(-1, 3), max_jd))]

    def _associate(self, pid, dets, ra, dec, jds, cells, image_cells, known_rows=(), objects=(), stored_rows=(),
                   image_rows=()) -> "_Plan":
        """Associate the candidates in order with what the reads gave (nothing written).

        The neighbours within the match radius (stored objects, stored detections, the
        image's own earlier candidates) are found for every candidate at once with KD-trees
        over unit vectors; the loop over candidates, which must run in order because a
        candidate may join an object minted by an earlier one, then only picks among them.
        """
        plan = _Plan()
        if not dets:
            return plan
        candids = [int(d["candid"]) for d in dets]
        known: dict[int, Any] = {int(c): name for c, name in known_rows}
        stored = [_Stored(*row) if type(row[8]) is not memoryview else _Stored(*row[:8], bytes(row[8]))
                  for row in stored_rows]
        images: dict[int, list[tuple]] = {}
        for hpix, *row in image_rows:
            images.setdefault(int(hpix), []).append(
                (float(row[0]), int(row[1]), row[2], row[3], None if row[4] is None else bytes(row[4])))
        points = _unit_vectors(ra, dec).reshape(-1, 3)
        covering = _covering_images(images, image_cells, points, jds, self._planes_for(images.values()))
        near_objects = _neighbours(points, _unit_vectors([o[0] for o in objects], [o[1] for o in objects]))
        near_stored = _neighbours(points, _unit_vectors([r.ra for r in stored], [r.dec for r in stored]))
        near_earlier = _neighbours(points, points, earlier_only=True)
        limits: dict[int, dict] = {}                         # each covering image's limit, parsed once
        minted: list[int | None] = [None] * len(dets)        # the new object candidate i minted
        added: list[_Stored | None] = [None] * len(dets)     # the detection candidate i added
        for i, det in enumerate(dets):
            candid, jd = candids[i], jds[i]
            new = False
            if candid in known:
                ref = known[candid]
            else:
                # The nearest object within the radius, stored or minted by an earlier candidate
                # (ties: the smaller name, new objects named by their index as before minting).
                options = [(sep, str(objects[o][2]), objects[o][2]) for o, sep in near_objects[i]]
                options += [(sep, str(minted[j]), minted[j]) for j, sep in near_earlier[i] if minted[j] is not None]
                if options:
                    ref = min(options, key=lambda option: option[:2])[2]
                else:
                    ref = minted[i] = len(plan.new_objects)
                    new = True
                    plan.new_objects.append((_year_of_jd(jd), float(ra[i]), float(dec[i]), int(cells[i]), jd))
                row = added[i] = _Stored(float(ra[i]), float(dec[i]), candid, pid, jd, det.get("field"),
                                         det.get("rcid"), _record_text(det), _prv_encoding(det))
                known[candid] = ref
                plan.inserts.append((i, ref, row))
            near = [(sep, stored[k]) for k, sep in near_stored[i] if stored[k].jd <= jd]
            near += [(sep, added[j]) for j, sep in near_earlier[i] if added[j] is not None and added[j].jd <= jd]
            if added[i] is not None:
                near.append((0.0, added[i]))
            near.sort(key=lambda entry: (entry[0], entry[1].candid))
            plan.histories.append((ref, _history(det, [row for _, row in near], covering[i], new, limits)))
        return plan

    def _planes_for(self, listed) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """The edge planes of every image in ``listed`` (lists of image rows, pid second and
        corners third), kept per pid (an image's corners never change); those not kept yet
        are computed together."""
        cache = self._planes_cache
        needed = {row[1]: row[2] for rows in listed for row in rows}
        missing = {pid: corners for pid, corners in needed.items() if pid not in cache}
        if missing and len(cache) + len(missing) > _PLANES_CACHE_SIZE:
            cache.clear()
            missing = needed
        if missing:
            cache.update(zip(missing, _planes_of_many(list(missing.values()))))
        return cache


#: Footprints whose edge planes a store keeps (a few MB; cleared when full).
_PLANES_CACHE_SIZE = 20_000


def _neighbours(points: np.ndarray, others: np.ndarray, earlier_only: bool = False) -> list[list[tuple[int, float]]]:
    """For each of ``points``: the ``others`` within the match radius, as (index, separation
    in arcsec); with ``earlier_only`` (``others`` is ``points``) only those of a smaller index.

    scipy's KD-tree over unit vectors finds them within the radius's chord (a hair wider);
    the radius is then applied to their exact separations.
    """
    found: list[list[tuple[int, float]]] = [[] for _ in range(len(points))]
    others = np.asarray(others, float).reshape(-1, 3)
    if not len(points) or not len(others):
        return found
    chord = 2.0 * math.sin(MATCH_RADIUS_ARCSEC * _ARCSEC / 2.0) * (1.0 + 1e-6)
    lists = cKDTree(others).query_ball_point(points, chord)
    counts = np.fromiter((len(item) for item in lists), np.int64, len(lists))
    a = np.repeat(np.arange(len(points)), counts)
    b = np.fromiter((j for item in lists for j in item), np.int64, int(counts.sum()))
    if earlier_only:
        keep = b < a
        a, b = a[keep], b[keep]
    sep = _chord_arcsec(np.linalg.norm(others[b] - points[a], axis=-1))
    within = sep <= MATCH_RADIUS_ARCSEC
    for i, j, s in zip(a[within].tolist(), b[within].tolist(), sep[within].tolist()):
        found[i].append((j, s))
    return found


@dataclass
class _Plan:
    """An image's association before names are minted: new objects (year, ra, dec, hpix,
    jd) in minting order, the detections to insert and each candidate's history, each with
    its object as a name or the index of a new object."""

    new_objects: list[tuple] = field(default_factory=list)
    inserts: list[tuple[int, Any, _Stored]] = field(default_factory=list)
    histories: list[tuple[Any, CandidateHistory]] = field(default_factory=list)

    @staticmethod
    def name(ref: Any, minted: list[str]) -> str:
        return ref if isinstance(ref, str) else minted[ref]


def _history(det: Mapping[str, Any], near: list[_Stored], covering: list[tuple], new: bool,
             limits: dict[int, dict] | None = None) -> CandidateHistory:
    """A candidate's history from the detections within the match radius taken by its time
    (nearest first, then by candid) and the images covering it; the object name is filled in
    once minted.  ``limits`` keeps the covering images' parsed upper limits by pid across an
    image's candidates (each entry gets its own copy)."""
    jd, start = float(det["jd"]), float(det["jd"]) - HISTORY_DAYS
    same_channel = [r.jd for r in near if r.field == det.get("field") and r.rcid == det.get("rcid")]
    detected_pids = {r.pid for r in near}
    previous = [(r.jd, EncodedRecord(_parse_record(r.record), r.avro)) for r in near
                if start <= r.jd < jd and r.candid != det["candid"]]
    if limits is None:
        limits = {}
    for row_jd, pid, limit, avro in covering:
        if start <= row_jd < jd and pid not in detected_pids:
            if pid not in limits:
                limits[pid] = _parse_record(limit)
            previous.append((row_jd, EncodedRecord(limits[pid], avro)))
    previous.sort(key=lambda entry: entry[0])
    return CandidateHistory(
        object_id="", prv_candidates=[entry for _, entry in previous],
        ndethist=len(same_channel), ncovhist=len(covering),
        jdstarthist=min(same_channel) if same_channel else None,
        jdendhist=max(same_channel) if same_channel else None, new_object=new)


class SQLiteHistoryStore(SQLHistoryStore):
    """The embedded history store: one SQLite file (WAL), shared by processes on one machine.

    Parameters
    ----------
    path : str or Path
        The database file (created with its tables if missing).
    survey : str
        Prefix of minted object names (``"ztf"`` gives ``ZTF26aaaaaaa``).
    busy_timeout_s : float
        How long a writer waits for another process's image transaction.
    order_wait_s : float
        How long an image waits for earlier overlapping announced images (module docstring).
    """

    def __init__(self, path: str | Path, survey: str = "ztf", busy_timeout_s: float = 60.0,
                 order_wait_s: float = 600.0):
        super().__init__(survey, order_wait_s)
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=busy_timeout_s, isolation_level=None)
            self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._db.executescript("BEGIN IMMEDIATE;" + _TABLES)
            for table, column, kind in _ADDED_COLUMNS:
                if column not in {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            self._db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise HistoryError(f"{self.path}: cannot open the history database: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        return self._db.execute(sql, args).fetchall()

    def _execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._db.execute(sql, args).rowcount

    def _execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._db.executemany(sql, rows)

    def _begin(self) -> None:
        # One writer at a time on the whole file: no cell locks needed.
        self._db.execute("BEGIN IMMEDIATE")

    def _commit(self) -> None:
        self._db.execute("COMMIT")

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _in_list(self, column: str) -> str:
        return f"{column} IN (SELECT value FROM json_each(?))"

    def _list_arg(self, values: Sequence[int]) -> Any:
        return json.dumps([int(v) for v in values])


def open_history_store(history, sqlite_path: str | Path, survey: str) -> HistoryStore:
    """The store the ``[history]`` section names.

    Parameters
    ----------
    history : pipeline.core.config.HistoryConfig
        ``url`` set: the PostgreSQL store there (:mod:`alerts.history_postgres`); empty: the
        SQLite file ``sqlite_path``.
    sqlite_path : str or Path
        The SQLite file (``paths.history``, or a command's ``--history``).
    survey : str
        Prefix of minted object names.
    """
    if history.url:
        from alerts.history_postgres import PostgresHistoryStore

        return PostgresHistoryStore(history.url, survey=survey, connect_timeout_s=history.connect_timeout_s,
                                    lock_timeout_s=history.lock_timeout_s, order_wait_s=history.order_wait_s)
    return SQLiteHistoryStore(sqlite_path, survey=survey, order_wait_s=history.order_wait_s)
