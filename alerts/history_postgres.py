"""The object history on PostgreSQL: the store for quadrant tasks on several nodes.

:class:`PostgresHistoryStore` implements :class:`alerts.history.HistoryStore` over the same
tables as the SQLite store (``objects``, ``detections``, ``images``, ``image_cells``,
``id_counters``) with the same association (:class:`alerts.history.SQLHistoryStore`).  What
differs is how writers are kept apart: SQLite lets one image transaction at a time write the
file, while here images on separate parts of the sky associate at the same time.  Each image
transaction (READ COMMITTED) first takes ``pg_advisory_xact_lock`` on every HEALPix cell
(nside 64) its footprint is listed in and every cell holding one of its candidates with their
neighbours, in ascending order (so two transactions never wait on each other in a cycle).  Two
images whose candidates could lie within 1.5 arcsec of each other, or one of which covers the
other's candidates, share a cell, so they associate one after the other, the second seeing
what the first committed: no two objects within 1.5 arcsec, no candidate without the images
that covered it.  Names are minted last with ``INSERT INTO id_counters ... ON CONFLICT DO
UPDATE ... RETURNING`` (the row lock is held until commit; a rolled-back transaction leaves no
gap, unlike a sequence).

An image costs few round trips and little client work: its lock, its writes and its four reads
go out together in libpq's pipeline mode, the new objects, detections and the commit together
again; rows are inserted over arrays in one statement per table; and each image row carries
its footprint's cone (schema version 3, :func:`footprint_cones`), with which the server leaves
out the images listed in a candidate's cell that cannot cover any of its candidates (most of
them: an image is listed in every cell within 1.8 degrees of its footprint).

The schema belongs to the project: :data:`MIGRATIONS` lists the steps from an empty database,
and :func:`ensure_schema` applies the missing ones in order under an advisory lock (so tasks
starting together do it once), recording each in ``skydiff_schema``.  A database written by a
newer skydiff is refused.

:func:`migrate_sqlite` copies a SQLite history into PostgreSQL (``skydiff history migrate``):
every table in one transaction through ``COPY`` into temporary tables, then inserted where
absent, so a second run adds nothing; the name counters are carried over (the larger of the two
values), so names minted afterwards continue the SQLite sequence.

A server that cannot be reached (down, wrong host or port) or that drops the connection is a
:class:`HistoryUnavailableError` (exit 75: a retry may help; a Slurm task is requeued); a
refused login or a missing database is a :class:`alerts.history.HistoryError` (exit 1).  Both
messages name the URL with its password replaced by ``***``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import psycopg

from alerts.history import HistoryError, SQLHistoryStore, _planes_of_many, _prv_encoding, _unit_vectors
from alerts.publish import SecretFilter
from pipeline.core.config import redacted_url
from pipeline.core.exits import RetryableError, UsageError

__all__ = ["PostgresHistoryStore", "HistoryUnavailableError", "MIGRATIONS", "SCHEMA_VERSION", "ensure_schema",
           "migrate_sqlite", "MigrationReport", "connect", "TABLE_COLUMNS", "footprint_cones", "fill_footprint_cones"]

log = logging.getLogger("skydiff.history")

#: Advisory-lock namespace (the first key of the two-key form): footprint cells use it with
#: the cell number, the schema migration with -1.
LOCK_NAMESPACE = 0x5344
_SCHEMA_LOCK = -1

#: The schema, one step per version, applied in order to reach :data:`SCHEMA_VERSION`.
MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE objects (
    object_id TEXT PRIMARY KEY, ra DOUBLE PRECISION NOT NULL, dec DOUBLE PRECISION NOT NULL,
    hpix BIGINT NOT NULL, first_jd DOUBLE PRECISION NOT NULL);
CREATE INDEX objects_hpix ON objects (hpix);
CREATE TABLE detections (
    candid BIGINT PRIMARY KEY, object_id TEXT NOT NULL, pid BIGINT NOT NULL, jd DOUBLE PRECISION NOT NULL,
    ra DOUBLE PRECISION NOT NULL, dec DOUBLE PRECISION NOT NULL, hpix BIGINT NOT NULL, field INTEGER,
    rcid INTEGER, record TEXT NOT NULL, avro BYTEA);
CREATE INDEX detections_hpix ON detections (hpix, jd);
CREATE TABLE images (
    pid BIGINT PRIMARY KEY, jd DOUBLE PRECISION NOT NULL, field INTEGER, rcid INTEGER,
    corners TEXT NOT NULL, upper_limit TEXT NOT NULL, upper_limit_avro BYTEA);
CREATE TABLE image_cells (hpix BIGINT NOT NULL, pid BIGINT NOT NULL, PRIMARY KEY (hpix, pid));
CREATE TABLE id_counters (year INTEGER PRIMARY KEY, next_serial BIGINT NOT NULL);
""",
    # Announced images (the time-order rule of alerts.history): transient, never migrated.
    2: """
CREATE TABLE pending_images (
    pid BIGINT PRIMARY KEY, jd DOUBLE PRECISION NOT NULL, announced_utc TEXT NOT NULL);
CREATE TABLE pending_cells (
    hpix BIGINT NOT NULL, pid BIGINT NOT NULL, jd DOUBLE PRECISION NOT NULL, PRIMARY KEY (hpix, pid));
""",
    # Footprint cones (centre unit vector, radius in radians) of the images, so the images query
    # leaves out, in the server, those listed in a candidate's cell that cannot cover it (most:
    # an image is listed in every cell within 1.8 degrees of its footprint).  Filled for the
    # rows already there by fill_footprint_cones after this step; NULL: no cone, never left out.
    3: """
ALTER TABLE images ADD COLUMN cone_x DOUBLE PRECISION, ADD COLUMN cone_y DOUBLE PRECISION,
    ADD COLUMN cone_z DOUBLE PRECISION, ADD COLUMN cone_radius DOUBLE PRECISION;
""",
}
SCHEMA_VERSION = max(MIGRATIONS)

#: Columns of each table, in the order COPY and the SQLite copy use them.
TABLE_COLUMNS = {
    "objects": ("object_id", "ra", "dec", "hpix", "first_jd"),
    "detections": ("candid", "object_id", "pid", "jd", "ra", "dec", "hpix", "field", "rcid", "record", "avro"),
    "images": ("pid", "jd", "field", "rcid", "corners", "upper_limit", "upper_limit_avro"),
    "image_cells": ("hpix", "pid"),
    "id_counters": ("year", "next_serial"),
}
#: Each column's PostgreSQL type, for inserts over arrays.
_COLUMN_TYPES = {"object_id": "text", "ra": "float8", "dec": "float8", "hpix": "int8", "first_jd": "float8",
                 "candid": "int8", "pid": "int8", "jd": "float8", "field": "int4", "rcid": "int4", "record": "text",
                 "avro": "bytea"}
_KEYS = {"objects": "object_id", "detections": "candid", "images": "pid", "image_cells": "hpix, pid",
         "id_counters": "year"}


class HistoryUnavailableError(HistoryError, RetryableError):
    """The history database cannot be reached or dropped the connection (exit 75)."""

    exit_status = RetryableError.exit_status
    kind = RetryableError.kind


#: What libpq says (the server refusing a connection for good carries no SQLSTATE here).
_REFUSALS = ("password authentication failed", "no pg_hba.conf entry", "does not exist", "permission denied")


def _failure(url: str, what: str, exc: psycopg.Error) -> HistoryError:
    """The error to raise for ``exc``: unavailable (75) unless the server refused us for good (1)."""
    text = SecretFilter([psycopg.conninfo.conninfo_to_dict(url).get("password") or ""]).scrub(
        " ".join(str(exc).split()))
    message = f"{redacted_url(url)}: {what}: {text}"
    state = getattr(exc, "sqlstate", None) or ""
    # 28: authorisation refused, 3D: no such database, 42: schema or permissions: no retry mends them.
    if state[:2] in ("28", "3D", "42") or (not state and any(r in text for r in _REFUSALS)):
        return HistoryError(message)
    return HistoryUnavailableError(message)


def connect(url: str, connect_timeout_s: float = 10.0) -> psycopg.Connection:
    """A connection to the history database at ``url`` (errors name the URL, password hidden)."""
    try:
        return psycopg.connect(url, connect_timeout=max(1, round(connect_timeout_s)),
                               application_name="skydiff-history")
    except psycopg.Error as exc:
        raise _failure(url, "cannot connect to the history database", exc) from None


def ensure_schema(db: psycopg.Connection, url: str) -> int:
    """Bring the database's schema to :data:`SCHEMA_VERSION`; the version it had before.

    Raises
    ------
    HistoryError
        The database was written by a newer skydiff (its schema version is unknown here).
    """
    with db.transaction():
        db.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_NAMESPACE, _SCHEMA_LOCK))
        db.execute("CREATE TABLE IF NOT EXISTS skydiff_schema (version INTEGER PRIMARY KEY, "
                   "applied TIMESTAMPTZ NOT NULL DEFAULT now())")
        current = db.execute("SELECT coalesce(max(version), 0) FROM skydiff_schema").fetchone()[0]
        if current > SCHEMA_VERSION:
            raise HistoryError(f"{redacted_url(url)}: history schema version {current} is newer than this "
                               f"skydiff's ({SCHEMA_VERSION}): upgrade skydiff")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            db.execute(MIGRATIONS[version])
            if version in _DATA_STEPS:
                _DATA_STEPS[version](db)
            db.execute("INSERT INTO skydiff_schema (version) VALUES (%s)", (version,))
            log.info("%s: history schema migrated to version %d", redacted_url(url), version)
    return current


#: Slack (radians, 0.02 arcsec) added to the cone test against rounding: an image is left out
#: only when it is this much farther from every candidate of a cell than its footprint's
#: radius, which no rounding of the footprint test reaches.
_CONE_SLACK = 1e-7


def footprint_cones(corner_texts: Sequence[str]) -> list[tuple[float, float, float, float] | None]:
    """Each footprint's bounding cone (centre unit vector x, y, z and radius in radians), from
    its corners as the ``images.corners`` JSON; None for a footprint that is not convex (the
    footprint test, an intersection of the edges' half-spaces, may then hold points outside
    its corners' cone) or not within a hemisphere.

    A convex footprint is the spherical hull of its corners, inside any cap that holds the
    corners: every position it covers is within the radius of the centre.
    """
    planes = _planes_of_many(corner_texts)
    cones: list[tuple[float, float, float, float] | None] = []
    for text, (normals, orientation) in zip(corner_texts, planes):
        corners = np.asarray(json.loads(text), float)
        vectors = _unit_vectors(corners[:, 0], corners[:, 1])
        sides = (normals @ vectors.T) * orientation[:, None]
        centre = vectors.mean(axis=0)
        centre /= np.linalg.norm(centre)
        # The angle from the chord: exact for small angles, where arccos of a dot product is not.
        radius = float(np.max(2.0 * np.arcsin(np.clip(np.linalg.norm(vectors - centre, axis=1) / 2.0, 0.0, 1.0))))
        if (np.all(sides >= -1e-12) and np.all(orientation != 0) and radius < np.pi / 2
                and np.all(np.isfinite(centre))):
            cones.append((float(centre[0]), float(centre[1]), float(centre[2]), radius))
        else:
            cones.append(None)
    return cones


def fill_footprint_cones(db: psycopg.Connection, batch: int = 50_000) -> int:
    """Give the images without a footprint cone theirs (:func:`footprint_cones`), in the open
    transaction, ``batch`` rows a statement; the number of images given one."""
    filled, after = 0, None
    while True:
        rows = db.execute("SELECT pid, corners FROM images WHERE cone_radius IS NULL"
                          + ("" if after is None else " AND pid > %s") + " ORDER BY pid LIMIT %s",
                          ((batch,) if after is None else (after, batch))).fetchall()
        if not rows:
            return filled
        after = rows[-1][0]
        cones = footprint_cones([corners for _, corners in rows])
        keep = [(pid, cone) for (pid, _), cone in zip(rows, cones) if cone is not None]
        if keep:
            db.execute("UPDATE images i SET cone_x = c.x, cone_y = c.y, cone_z = c.z, cone_radius = c.r FROM "
                       "unnest(%s::int8[], %s::float8[], %s::float8[], %s::float8[], %s::float8[]) AS c(pid, x, y, z, r) "
                       "WHERE i.pid = c.pid", [[pid for pid, _ in keep]] + [[cone[k] for _, cone in keep]
                                                                             for k in range(4)])
        filled += len(keep)


#: What a migration step computes for the rows already there, after its SQL.
_DATA_STEPS = {3: fill_footprint_cones}


class PostgresHistoryStore(SQLHistoryStore):
    """The object history in a PostgreSQL database, shared by processes on any number of nodes.

    Parameters
    ----------
    url : str
        ``postgresql://user:password@host:port/database`` (any libpq connection URI).
    survey : str
        Prefix of minted object names (``"ztf"`` gives ``ZTF26aaaaaaa``).
    connect_timeout_s : float
        Bound on the connection attempt.
    lock_timeout_s : float
        How long an image waits for the transactions of overlapping images before giving up
        (:class:`HistoryUnavailableError`, a retry).
    order_wait_s : float
        How long an image waits for earlier overlapping announced images
        (:mod:`alerts.history`'s time-order rule).

    Raises
    ------
    HistoryError
        The server refused the login or has no such database (exit 1).
    HistoryUnavailableError
        The server cannot be reached (exit 75).
    """

    def __init__(self, url: str, survey: str = "ztf", connect_timeout_s: float = 10.0,
                 lock_timeout_s: float = 120.0, order_wait_s: float = 600.0):
        super().__init__(survey, order_wait_s)
        self.url = url
        self._db = connect(url, connect_timeout_s)
        try:
            ensure_schema(self._db, url)
            self._db.execute(f"SET lock_timeout = {int(lock_timeout_s * 1000)}")
            # An image's reads are a few thousand rows by index: starting parallel workers for
            # them (the planner's choice once the detections table is large) costs more than the
            # scan, 10 ms of the detections query's 14 ms measured at 500,000 detections.
            self._db.execute("SET max_parallel_workers_per_gather = 0")
            self._db.commit()
        except psycopg.Error as exc:
            self._db.close()
            raise _failure(url, "cannot prepare the history database", exc) from None
        except BaseException:
            self._db.close()
            raise

    def __repr__(self) -> str:
        return f"PostgresHistoryStore({redacted_url(self.url)!r})"

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def _failures(self, what: str):
        """A database error inside becomes the HistoryError naming the URL and ``what``."""
        try:
            yield
        except psycopg.Error as exc:
            raise _failure(self.url, what, exc) from None

    def record_image(self, image, detections):
        with self._failures(f"image pid {image.pid} not recorded"):
            return super().record_image(image, detections)

    def announce(self, images):
        with self._failures("images not announced"):
            return super().announce(images)

    def wait_for_earlier_images(self, pid, jd, footprint):
        with self._failures(f"image pid {pid}: announced images not read"):
            return super().wait_for_earlier_images(pid, jd, footprint)

    def withdraw(self, pids):
        with self._failures("announcements not withdrawn"):
            return super().withdraw(pids)

    @staticmethod
    def _sql(sql: str) -> str:
        return sql.replace("?", "%s")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        # Binary results: numbers and the stored Avro bytes arrive without text parsing
        # (an image's reads carry some 2,000 detections).
        return self._db.execute(self._sql(sql), args, binary=True).fetchall()

    def _pipeline(self):
        # libpq's pipeline mode: statements go out without waiting for each answer, so an
        # image's lock, writes and four reads cost one round trip, not one each.
        return self._db.pipeline()

    def _submit(self, sql: str, args: Sequence[Any] = ()):
        cursor = self._db.cursor(binary=True)
        cursor.execute(self._sql(sql), args)
        return cursor.fetchall

    def _read_outside(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        if self._db.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            return super()._read_outside(sql, args)
        # Autocommit: the query alone, without the BEGIN and ROLLBACK round trips around it.
        self._db.autocommit = True
        try:
            return self._query(sql, args)
        finally:
            self._db.autocommit = False

    def _insert_rows(self, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                     conflict: str = "") -> None:
        # One statement over arrays (a column each) rather than a statement per row: psycopg's
        # executemany costs some 40 microseconds of Python per row, an image writes 250 rows.
        if not rows:
            return
        # Binary parameters: a text array would escape every record's quotes through a regex.
        arrays = ", ".join(f"%b::{_COLUMN_TYPES[c]}[]" for c in columns)
        self._db.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM unnest({arrays}) {conflict}",
                         [list(values) for values in zip(*rows)])

    def _insert_image(self, image, corners, cells) -> None:
        # The image, its footprint cone and its cells in one statement; the cells only with a
        # new image row, as the shared code does with two.
        text = json.dumps(corners)
        cone = footprint_cones([text])[0] or (None, None, None, None)
        self._db.execute(
            "WITH inserted AS (INSERT INTO images (pid, jd, field, rcid, corners, upper_limit, upper_limit_avro, "
            "cone_x, cone_y, cone_z, cone_radius) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (pid) DO NOTHING RETURNING pid) "
            "INSERT INTO image_cells (hpix, pid) SELECT c, inserted.pid FROM inserted, unnest(%s::int8[]) AS c "
            "ON CONFLICT DO NOTHING",
            (int(image.pid), float(image.jd), image.field, image.rcid, text, json.dumps(dict(image.upper_limit)),
             _prv_encoding(image.upper_limit), *cone, [int(c) for c in cells]))

    def _images_select(self, cells, points, max_jd):
        # Per footprint cell, the cone around the candidates in it: an image listed there whose
        # own cone does not reach it (footprint_cones) covers none of them and is not sent.
        unique, inverse = np.unique(cells, return_inverse=True)
        centres = np.zeros((len(unique), 3))
        np.add.at(centres, inverse, points)
        centres /= np.linalg.norm(centres, axis=1)[:, None]
        chords = np.linalg.norm(points - centres[inverse], axis=1)
        radii = np.zeros(len(unique))
        np.maximum.at(radii, inverse, 2.0 * np.arcsin(np.clip(chords / 2.0, 0.0, 1.0)))
        return ("SELECT q.hpix, i.jd, i.pid, i.corners, i.upper_limit, i.upper_limit_avro "
                "FROM unnest(%s::int8[], %s::float8[], %s::float8[], %s::float8[], %s::float8[]) AS q(hpix, x, y, z, r) "
                "JOIN image_cells c ON c.hpix = q.hpix JOIN images i ON i.pid = c.pid "
                "WHERE i.jd <= %s AND (i.cone_radius IS NULL OR i.cone_x * q.x + i.cone_y * q.y + i.cone_z * q.z "
                ">= cos(least(i.cone_radius + q.r + %s, pi())))",
                (unique.tolist(), *(centres[:, k].tolist() for k in range(3)), radii.tolist(), max_jd, _CONE_SLACK))


    def _execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        return self._db.execute(self._sql(sql), args).rowcount

    def _execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            with self._db.cursor() as cursor:
                cursor.executemany(self._sql(sql), rows)

    def _begin(self) -> None:
        # psycopg opens the transaction with the first statement (autocommit off).
        pass

    def _commit(self) -> None:
        self._db.commit()

    def _rollback(self) -> None:
        if not self._db.closed:
            with contextlib.suppress(psycopg.Error):
                self._db.rollback()

    def _in_list(self, column: str) -> str:
        return f"{column} = ANY(?)"

    def _lock_cells(self, cells: Sequence[int]) -> None:
        if cells:
            self._db.execute("SELECT count(pg_advisory_xact_lock(%s, c)) FROM "
                             "(SELECT c FROM unnest(%s::int[]) AS c ORDER BY c) AS ordered",
                             (LOCK_NAMESPACE, sorted(int(c) for c in cells)))


class MigrationReport(dict):
    """Rows per table: ``{table: (in SQLite, added to PostgreSQL)}``."""

    def __str__(self) -> str:
        return ", ".join(f"{table} {found} ({added} new)" for table, (found, added) in self.items())


def _sqlite_rows(source: sqlite3.Connection, table: str) -> Iterator[tuple]:
    present = {row[1] for row in source.execute(f"PRAGMA table_info({table})")}
    columns = ", ".join(c if c in present else "NULL" for c in TABLE_COLUMNS[table])
    yield from source.execute(f"SELECT {columns} FROM {table}")


def migrate_sqlite(sqlite_path: str | Path, url: str, connect_timeout_s: float = 10.0) -> MigrationReport:
    """Copy the SQLite history ``sqlite_path`` into the PostgreSQL database at ``url``.

    Idempotent: rows already there (by key) are kept, so running it again adds nothing; the
    name counters become the larger of the two.  The target must be empty or hold an earlier
    copy of the same history: a target with objects the SQLite file does not have is refused,
    since names minted by two separate histories collide.

    Raises
    ------
    BadInputError
        The SQLite file is missing or not a history database.
    UsageError
        The target holds another history.
    HistoryError, HistoryUnavailableError
        As for :class:`PostgresHistoryStore`.
    """
    from pipeline.core.exits import BadInputError

    path = Path(sqlite_path)
    if not path.is_file():
        raise BadInputError(f"{path}: no such SQLite history file")
    try:
        source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        tables = {row[0] for row in source.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise BadInputError(f"{path}: not a SQLite history database: {exc}") from None
    missing = sorted(set(TABLE_COLUMNS) - tables)
    if missing:
        source.close()
        raise BadInputError(f"{path}: not a skydiff history database (no table {', '.join(missing)})")
    report = MigrationReport()
    db = connect(url, connect_timeout_s)
    try:
        ensure_schema(db, url)
        with db.transaction():
            for table, columns in TABLE_COLUMNS.items():
                names = ", ".join(columns)
                db.execute(f"CREATE TEMPORARY TABLE incoming_{table} (LIKE {table}) ON COMMIT DROP")
                found = 0
                with db.cursor().copy(f"COPY incoming_{table} ({names}) FROM STDIN") as copy:
                    for row in _sqlite_rows(source, table):
                        copy.write_row(row)
                        found += 1
                if table == "objects":
                    foreign = db.execute("SELECT count(*) FROM objects o LEFT JOIN incoming_objects i "
                                         "USING (object_id) WHERE i.object_id IS NULL OR i.ra <> o.ra "
                                         "OR i.dec <> o.dec").fetchone()[0]
                    if foreign:
                        raise UsageError(f"{redacted_url(url)}: holds {foreign} object(s) that {path} does not "
                                         "(or elsewhere on the sky): "
                                         "it is another history; migrate into an empty database")
                if table == "id_counters":
                    conflict = "ON CONFLICT (year) DO UPDATE SET next_serial = " \
                               "GREATEST(id_counters.next_serial, EXCLUDED.next_serial) " \
                               "WHERE id_counters.next_serial < EXCLUDED.next_serial"
                else:
                    conflict = f"ON CONFLICT ({_KEYS[table]}) DO NOTHING"
                added = db.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM incoming_{table} "
                                   f"{conflict}").rowcount
                report[table] = (found, added)
            fill_footprint_cones(db)
    except psycopg.Error as exc:
        raise _failure(url, f"cannot copy {path} into the history database", exc) from None
    finally:
        db.close()
        source.close()
    return report
