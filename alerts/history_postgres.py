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
that covered it.  Names are minted last with ``UPDATE id_counters ... RETURNING`` (the row lock
is held until commit; a rolled-back transaction leaves no gap, unlike a sequence).

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

import psycopg

from alerts.history import HistoryError, SQLHistoryStore
from alerts.publish import SecretFilter
from pipeline.core.config import redacted_url
from pipeline.core.exits import RetryableError, UsageError

__all__ = ["PostgresHistoryStore", "HistoryUnavailableError", "MIGRATIONS", "SCHEMA_VERSION", "ensure_schema",
           "migrate_sqlite", "MigrationReport", "connect", "TABLE_COLUMNS"]

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
            db.execute("INSERT INTO skydiff_schema (version) VALUES (%s)", (version,))
            log.info("%s: history schema migrated to version %d", redacted_url(url), version)
    return current


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
    except psycopg.Error as exc:
        raise _failure(url, f"cannot copy {path} into the history database", exc) from None
    finally:
        db.close()
        source.close()
    return report
