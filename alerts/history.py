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

:class:`HistoryStore` is the interface; :class:`SQLiteHistoryStore` the embedded default: one
SQLite file in WAL mode with a busy timeout, each image one ``BEGIN IMMEDIATE`` transaction,
safe for several processes on one machine (never on a shared/network file system: SQLite's
locking is not reliable there).  A PostgreSQL store for a cluster implements the same two
methods over the same tables: the image transaction takes ``pg_advisory_xact_lock`` on the
footprint's HEALPix cells (so overlapping images associate one after the other) and mints
names with ``UPDATE id_counters ... RETURNING``.
"""
from __future__ import annotations

import abc
import datetime
import json
import math
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import astropy.units as u
import numpy as np
from astropy_healpix import HEALPix

from alerts.ids import object_id
from alerts.schema import EncodedRecord, encode_prv_candidate
from pipeline.core.exits import PipelineError

__all__ = ["ImageRecord", "CandidateHistory", "HistoryStore", "SQLiteHistoryStore", "HistoryError",
           "MATCH_RADIUS_ARCSEC", "HISTORY_DAYS"]

MATCH_RADIUS_ARCSEC = 1.5
HISTORY_DAYS = 30.0
_OBJECT_NSIDE = 16384
_IMAGE_NSIDE = 64
_ARCSEC = math.pi / (180.0 * 3600.0)


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
    def close(self) -> None:
        """Release the connection."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unit_vectors(ra_deg, dec_deg) -> np.ndarray:
    ra, dec = np.radians(np.asarray(ra_deg, float)), np.radians(np.asarray(dec_deg, float))
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def _separation_arcsec(ra0, dec0, ra, dec) -> np.ndarray:
    chord = np.linalg.norm(_unit_vectors(ra, dec) - _unit_vectors(ra0, dec0), axis=-1)
    return 2.0 * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0)) / _ARCSEC


def _inside(corners: np.ndarray, point: np.ndarray) -> bool:
    """Whether a unit vector lies inside a convex spherical polygon (corners in edge order)."""
    normals = np.cross(corners, np.roll(corners, -1, axis=0))
    sides = normals @ point
    orientation = np.sign(normals @ corners.mean(axis=0))
    return bool(np.all(sides * orientation >= 0.0))


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
"""
#: Columns added after the first release: (table, column, type), added to older databases.
_ADDED_COLUMNS = (("detections", "avro", "BLOB"), ("images", "upper_limit_avro", "BLOB"))


def _prv_encoding(entry: Mapping[str, Any]) -> bytes | None:
    """The entry's Avro encoding, or None when it does not fit the schema (the error then
    surfaces when an alert holding it is serialised, as for any other bad value)."""
    try:
        return encode_prv_candidate(entry)
    except (ValueError, TypeError, AttributeError, OverflowError):
        return None


class SQLiteHistoryStore(HistoryStore):
    """The embedded history store: one SQLite file (WAL), shared by processes on one machine.

    Parameters
    ----------
    path : str or Path
        The database file (created with its tables if missing).
    survey : str
        Prefix of minted object names (``"ztf"`` gives ``ZTF26aaaaaaa``).
    busy_timeout_s : float
        How long a writer waits for another process's image transaction.
    """

    def __init__(self, path: str | Path, survey: str = "ztf", busy_timeout_s: float = 60.0):
        self.path = Path(path)
        self.survey = survey
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
        self._objects_hp = HEALPix(_OBJECT_NSIDE, order="nested")
        self._images_hp = HEALPix(_IMAGE_NSIDE, order="nested")

    def close(self) -> None:
        self._db.close()

    # -- spatial helpers -------------------------------------------------------------
    def _object_cell(self, ra: float, dec: float) -> int:
        return int(self._objects_hp.lonlat_to_healpix(ra * u.deg, dec * u.deg))

    def _search_cells(self, ra: float, dec: float) -> list[int]:
        centre = self._object_cell(ra, dec)
        neighbours = self._objects_hp.neighbours(centre)
        return [centre] + [int(n) for n in np.ravel(neighbours) if n >= 0]

    def _near(self, table: str, columns: str, ra: float, dec: float, extra: str = "", args=()) -> list:
        cells = self._search_cells(ra, dec)
        rows = self._db.execute(
            f"SELECT ra, dec, {columns} FROM {table} WHERE hpix IN ({','.join('?' * len(cells))}) {extra}",
            (*cells, *args)).fetchall()
        if not rows:
            return []
        sep = _separation_arcsec(ra, dec, [r[0] for r in rows], [r[1] for r in rows])
        return sorted((float(s), row[2:]) for s, row in zip(np.atleast_1d(sep), rows) if s <= MATCH_RADIUS_ARCSEC)

    # -- the image transaction ---------------------------------------------------------
    def _insert_image(self, image: ImageRecord) -> None:
        corners = [[float(ra), float(dec)] for ra, dec in image.footprint]
        if len(corners) < 3:
            raise ValueError(f"image pid {image.pid}: footprint needs at least 3 corners, got {len(corners)}")
        inserted = self._db.execute(
            "INSERT OR IGNORE INTO images (pid, jd, field, rcid, corners, upper_limit, upper_limit_avro) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (image.pid, image.jd, image.field, image.rcid, json.dumps(corners),
             json.dumps(dict(image.upper_limit)), _prv_encoding(image.upper_limit))).rowcount
        if not inserted:
            return
        vectors = _unit_vectors([c[0] for c in corners], [c[1] for c in corners])
        centre = vectors.mean(axis=0)
        centre /= np.linalg.norm(centre)
        radius = float(np.max(np.arccos(np.clip(vectors @ centre, -1, 1))))
        lon, lat = math.atan2(centre[1], centre[0]), math.asin(centre[2])
        cells = self._images_hp.cone_search_lonlat(
            lon * u.rad, lat * u.rad, (radius * u.rad + 2 * self._images_hp.pixel_resolution).to(u.deg))
        self._db.executemany("INSERT OR IGNORE INTO image_cells VALUES (?, ?)",
                             [(int(c), image.pid) for c in cells])

    def _covering_images(self, ra: float, dec: float, jd: float) -> list[tuple[float, int, str, bytes | None]]:
        cell = int(self._images_hp.lonlat_to_healpix(ra * u.deg, dec * u.deg))
        rows = self._db.execute(
            "SELECT i.jd, i.pid, i.corners, i.upper_limit, i.upper_limit_avro FROM image_cells c "
            "JOIN images i USING (pid) WHERE c.hpix = ? AND i.jd <= ?", (cell, jd)).fetchall()
        point = _unit_vectors(ra, dec)
        covering = []
        for row_jd, pid, corners, limit, avro in rows:
            corners = np.asarray(json.loads(corners))
            if _inside(_unit_vectors(corners[:, 0], corners[:, 1]), point):
                covering.append((row_jd, pid, limit, avro))
        return covering

    def _associate(self, det: Mapping[str, Any]) -> tuple[str, bool]:
        known = self._db.execute("SELECT object_id FROM detections WHERE candid = ?", (det["candid"],)).fetchone()
        if known:
            return known[0], False
        nearest = self._near("objects", "object_id", det["ra"], det["dec"])
        if nearest:
            return nearest[0][1][0], False
        year = _year_of_jd(det["jd"])
        self._db.execute("INSERT OR IGNORE INTO id_counters VALUES (?, 0)", (year,))
        serial = self._db.execute("UPDATE id_counters SET next_serial = next_serial + 1 WHERE year = ? "
                                  "RETURNING next_serial - 1", (year,)).fetchone()[0]
        name = object_id(self.survey, year, serial)
        self._db.execute("INSERT INTO objects VALUES (?, ?, ?, ?, ?)",
                         (name, det["ra"], det["dec"], self._object_cell(det["ra"], det["dec"]), det["jd"]))
        return name, True

    def _history(self, det: Mapping[str, Any], name: str, new: bool) -> CandidateHistory:
        jd, start = det["jd"], det["jd"] - HISTORY_DAYS
        near = [row for _, row in self._near(
            "detections", "candid, pid, jd, field, rcid, record, avro", det["ra"], det["dec"], "AND jd <= ?", (jd,))]
        same_channel = [row[2] for row in near if row[3] == det.get("field") and row[4] == det.get("rcid")]
        detected_pids = {row[1] for row in near}
        previous = [(row[2], EncodedRecord(json.loads(row[5]), row[6])) for row in near
                    if start <= row[2] < jd and row[0] != det["candid"]]
        covering = self._covering_images(det["ra"], det["dec"], jd)
        previous += [(row_jd, EncodedRecord(json.loads(limit), avro)) for row_jd, pid, limit, avro in covering
                     if start <= row_jd < jd and pid not in detected_pids]
        previous.sort(key=lambda entry: entry[0])
        return CandidateHistory(
            object_id=name, prv_candidates=[entry for _, entry in previous],
            ndethist=len(same_channel), ncovhist=len(covering),
            jdstarthist=min(same_channel) if same_channel else None,
            jdendhist=max(same_channel) if same_channel else None, new_object=new)

    def record_image(self, image: ImageRecord, detections: Sequence[Mapping[str, Any]]) -> list[CandidateHistory]:
        histories = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._insert_image(image)
            for det in detections:
                name, new = self._associate(det)
                self._db.execute(
                    "INSERT OR IGNORE INTO detections (candid, object_id, pid, jd, ra, dec, hpix, field, rcid, "
                    "record, avro) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (det["candid"], name, image.pid, det["jd"], det["ra"], det["dec"],
                     self._object_cell(det["ra"], det["dec"]), det.get("field"), det.get("rcid"),
                     json.dumps(dict(det)), _prv_encoding(det)))
                histories.append(self._history(det, name, new))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return histories
