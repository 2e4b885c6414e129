"""The difference-image archive: every difference image kept for forced photometry, indexed.

Layout under the archive root (``paths.fparchive``), format version :data:`ARCHIVE_VERSION`:

``index.sqlite``
    Table ``epochs``, one row per archived quadrant image, key ``(expid, rcid)``: ``field``,
    ``rcid``, ``fid``, ``filter``, ``jd`` (exposure start), ``pid``, ``refid``, the file (relative
    path), the image shape, the sky footprint as a centre and a radius (deg) that encloses the
    four corners, the image's WCS cards (so positions become pixels without opening the
    file), the byte offsets of the file's arrays, the tiles, and the image-level fields
    ``fp_hist`` records carry (``meta``, JSON).  Indexed by ``(field, rcid, fid, jd)`` and by
    ``jd``.  SQLite (write-ahead log) serialises concurrent writers; a rerun of an exposure
    replaces its row and file (``INSERT OR REPLACE``), never adds one.
``<field:06d>/<rcid:02d>/<filter>/<expid>.fits``
    Uncompressed FITS (so a stamp is read through a memory map, never the whole image):
    ``DIFF`` ZOGY's D (unit background variance; pixels flagged near bad ones set to NaN)
    with the science WCS, ``FLUXUNC`` ZOGY's ``alpha_std`` (1-sigma flux of a point source
    at each pixel, common system, background + source + registration noise), ``PSFD`` the
    tiles' P_D tabulated at n x n sub-pixel phases (ntiles, n, n, S, S; ``ZogyTile.psf_d_phased``;
    format version 1 stored the centred P_D only, (ntiles, S, S), read as n = 1),
    ``TILES`` (y0, y1, x0, x1, f_d, f_s, fwhm per tile).
``refcat/<refid>.fits``
    The reference's PSF-fit catalogue (ra, dec, mag, magerr, chi, sharp), for the nearest
    reference source of every forced measurement, written once per reference.

Retention: archiving an epoch removes the rows and files of epochs whose ``jd`` is more
than ``forcedphot.retention_days`` before it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from pipeline.core.config import ForcedPhotConfig
from pipeline.core.exits import BadInputError, RetryableError
from pipeline.formats.atomic import write_fits_atomic, write_table_atomic

__all__ = ["ARCHIVE_VERSION", "INDEX_NAME", "ArchiveError", "ArchivedEpoch", "DifferenceArchive",
           "archive_subtraction", "epoch_fields"]

log = logging.getLogger("skydiff.fparchive")

ARCHIVE_VERSION = 2
INDEX_NAME = "index.sqlite"
_REFCAT_COLUMNS = ("ra", "dec", "mag", "magerr", "chi", "sharp")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS archive (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS epochs (
    expid INTEGER NOT NULL, rcid INTEGER NOT NULL, field INTEGER NOT NULL, fid INTEGER NOT NULL,
    filter TEXT NOT NULL, jd REAL NOT NULL, pid INTEGER NOT NULL, refid INTEGER NOT NULL,
    path TEXT NOT NULL, ny INTEGER NOT NULL, nx INTEGER NOT NULL,
    ra_c REAL NOT NULL, dec_c REAL NOT NULL, radius REAL NOT NULL,
    wcs TEXT NOT NULL, layout TEXT NOT NULL, meta TEXT NOT NULL,
    PRIMARY KEY (expid, rcid));
CREATE INDEX IF NOT EXISTS epochs_place ON epochs (field, rcid, fid, jd);
CREATE INDEX IF NOT EXISTS epochs_jd ON epochs (jd);
"""
_COLUMNS = ("expid", "rcid", "field", "fid", "filter", "jd", "pid", "refid", "path", "ny", "nx",
            "ra_c", "dec_c", "radius", "wcs", "layout", "meta")


class ArchiveError(BadInputError):
    """An archive root or file that cannot be read (names it)."""


class ArchiveBusyError(RetryableError):
    """The archive index stayed locked by another writer for the whole timeout."""


def _unit(ra, dec) -> np.ndarray:
    ra, dec = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def _robust_rms(image: np.ndarray, stride: int = 7) -> float:
    """1.4826 MAD of the finite pixels of every ``stride``-th row and column."""
    sample = np.asarray(image[::stride, ::stride], dtype=np.float64).ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return math.nan
    return float(1.4826 * np.median(np.abs(sample - np.median(sample))))


def _finite(value, digits: int = 6):
    if value is None:
        return None
    value = float(value)
    return round(value, digits) if math.isfinite(value) else None


def epoch_fields(science_header: fits.Header, result, reference) -> dict:
    """The image-level fields of an archived epoch (those of the ``fp_hist`` record and the
    forced-photometry table) from the science header, the subtraction result and the reference."""
    from alerts.ids import make_pid
    from pipeline.core.image import validate_header

    meta = validate_header(science_header, "science header")
    photcal = result.science.photcal
    extraction = result.science.extraction

    def mas_to_arcsec(key):
        value = science_header.get(key)
        return None if not isinstance(value, (int, float)) else _finite(float(value) / 1000.0)

    return {
        "expid": meta.expid, "rcid": meta.rcid, "field": meta.fieldid, "fid": meta.filterid,
        "filter": meta.filter, "ccdid": meta.ccdid, "qid": meta.qid, "pid": make_pid(meta.expid, meta.rcid),
        "jd": float(meta.obsmjd) + 2400000.5, "programid": int(meta.progrmid), "exptime": float(meta.exptime),
        "refid": int(reference.refid), "refjdstart": _finite(reference.jdstart, 7),
        "refjdend": _finite(reference.jdend, 7), "magzpsci": _finite(result.zp_science),
        "magzpref": _finite(result.zp_ref),
        "magzpsciunc": None if photcal is None else _finite(photcal.magzpsciunc),
        "magzpscirms": None if photcal is None else _finite(photcal.magzpscirms),
        "clrcoeff": None if photcal is None else _finite(photcal.clrcoeff),
        "clrcounc": None if photcal is None else _finite(photcal.clrcounc),
        "ncalmatches": 0 if photcal is None else int(photcal.n_used),
        "sciinpseeing": _finite(result.science.psf.fwhm, 4),
        "scibckgnd": _finite(extraction.background_level, 4), "scisigpix": _finite(extraction.background_rms, 4),
        "adpctdif1": mas_to_arcsec("ASTRRMSA"), "adpctdif2": mas_to_arcsec("ASTRRMSD"),
        "diffmaglim": _finite(result.diffmaglim),
    }


def _epoch_file(root: Path, fields: dict) -> Path:
    return root / f"{fields['field']:06d}" / f"{fields['rcid']:02d}" / fields["filter"] / f"{fields['expid']}.fits"


def _connect(path: Path, timeout_s: float, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout_s, isolation_level=None,
                             check_same_thread=False)
    else:
        db = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_SCHEMA)
    return db


def archive_subtraction(root: str | os.PathLike, science_header: fits.Header, wcs, result, reference,
                        config: ForcedPhotConfig = ForcedPhotConfig()) -> dict:
    """Archive one subtraction's difference image for forced photometry; prune old epochs.

    Parameters
    ----------
    root : path-like
        The archive root (created if missing).
    science_header : astropy.io.fits.Header
        The solved science image's header (contract keywords, ``ASTRRMSA``/``ASTRRMSD``).
    wcs : astropy.wcs.WCS
        The science image's WCS (that of D).
    result : SubtractionResult
    reference : ReferenceImage
        ``refid``, ``jdstart``, ``jdend`` and its ``catalog`` (copied once per refid).

    Returns
    -------
    dict
        ``path`` of the epoch file, ``replaced`` (a row of that exposure existed),
        ``pruned`` (epochs removed by the retention), ``bytes`` written.

    Raises
    ------
    ArchiveBusyError
        Another writer held the index for ``config.lock_timeout_s``.
    """
    from pipeline.core.image import footprint_corners
    from pipeline.measure.psf import fwhm_of_stamp

    root = Path(root)
    fields = epoch_fields(science_header, result, reference)
    zogy = result.zogy
    ny, nx = zogy.diff.shape
    diff = np.asarray(zogy.diff, dtype=np.float32).copy()
    # ZOGY leaves D as computed next to bad pixels; forced photometry must not use them.
    diff[np.asarray(zogy.flagged, bool)] = np.nan
    fields["diff_rms"] = _finite(_robust_rms(diff))
    wcs_header = wcs.to_header(relax=True)
    primary = fits.PrimaryHDU()
    primary.header["FPARCHV"] = (ARCHIVE_VERSION, "difference-image archive format version")
    for key in ("expid", "rcid", "field", "fid", "refid", "jd"):
        primary.header[key.upper()] = fields[key]
    size = max(t.psf_d.shape[0] for t in zogy.tiles)
    phases = max(t.phased.shape[0] for t in zogy.tiles)
    psf_cube = np.zeros((len(zogy.tiles), phases, phases, size, size), dtype=np.float32)
    for k, tile in enumerate(zogy.tiles):
        s = tile.psf_d.shape[0]
        o = (size - s) // 2
        if tile.phased.shape[0] != phases:
            raise ArchiveError(f"tiles of exposure {fields['expid']} have P_D at different numbers of phases")
        psf_cube[k, :, :, o:o + s, o:o + s] = tile.phased
    tiles = Table({"y0": [t.y0 for t in zogy.tiles], "y1": [t.y1 for t in zogy.tiles],
                   "x0": [t.x0 for t in zogy.tiles], "x1": [t.x1 for t in zogy.tiles],
                   "f_d": [float(t.f_d) for t in zogy.tiles], "f_s": [float(t.f_s) for t in zogy.tiles],
                   "fwhm": [float(fwhm_of_stamp(np.asarray(t.psf_d, float))) for t in zogy.tiles]})
    hdul = fits.HDUList([primary, fits.ImageHDU(diff, header=wcs_header, name="DIFF"),
                         fits.ImageHDU(np.asarray(zogy.alpha_std, dtype=np.float32), name="FLUXUNC"),
                         fits.ImageHDU(psf_cube, name="PSFD"), fits.BinTableHDU(tiles, name="TILES")])
    path = _epoch_file(root, fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_fits_atomic(hdul, path)
    with fits.open(path, memmap=True) as written:
        offsets = {name: int(written.fileinfo(i)["datLoc"]) for i, name in ((1, "DIFF"), (2, "FLUXUNC"), (3, "PSFD"))}
    refcat = root / "refcat" / f"{fields['refid']}.fits"
    if not refcat.exists() and getattr(reference, "catalog", None) is not None:
        write_table_atomic(Table({k: np.asarray(reference.catalog[k], float) for k in _REFCAT_COLUMNS}), refcat)
    corners = footprint_corners(wcs, (ny, nx))
    centre_ra, centre_dec = (float(v[0]) for v in wcs.all_pix2world([(nx + 1) / 2], [(ny + 1) / 2], 1))
    centre = _unit(centre_ra, centre_dec)
    radius = float(np.degrees(np.arccos(np.clip(_unit(corners[:, 0], corners[:, 1]) @ centre, -1, 1)).max()))
    layout = {"version": ARCHIVE_VERSION, "offsets": offsets, "psf_shape": list(psf_cube.shape),
              "tiles": {k: tiles[k].tolist() for k in tiles.colnames}}
    row = (fields["expid"], fields["rcid"], fields["field"], fields["fid"], fields["filter"], fields["jd"],
           fields["pid"], fields["refid"], str(path.relative_to(root)), ny, nx, centre_ra, centre_dec,
           radius + 1.0 / 3600.0, wcs_header.tostring(), json.dumps(layout), json.dumps(fields))
    horizon = fields["jd"] - config.retention_days
    try:
        db = _connect(root / INDEX_NAME, config.lock_timeout_s)
        try:
            db.execute("BEGIN IMMEDIATE")
            replaced = db.execute("SELECT COUNT(*) FROM epochs WHERE expid = ? AND rcid = ?",
                                  (fields["expid"], fields["rcid"])).fetchone()[0] > 0
            old = [r[0] for r in db.execute("SELECT path FROM epochs WHERE jd < ?", (horizon,))]
            db.execute("DELETE FROM epochs WHERE jd < ?", (horizon,))
            db.execute(f"INSERT OR REPLACE INTO epochs ({', '.join(_COLUMNS)}) VALUES "
                       f"({', '.join('?' * len(_COLUMNS))})", row)
            db.execute("INSERT OR REPLACE INTO archive VALUES ('version', ?)", (str(ARCHIVE_VERSION),))
            db.execute("COMMIT")
        finally:
            db.close()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise ArchiveBusyError(f"{root / INDEX_NAME}: locked by another writer for "
                                   f"{config.lock_timeout_s:g} s") from None
        raise ArchiveError(f"{root / INDEX_NAME}: {exc}") from None
    for relative in old:
        # Readers holding a memory map of a removed file keep reading it (POSIX unlink).
        (root / relative).unlink(missing_ok=True)
    if old:
        log.info("archive %s: %d epoch(s) older than %g days removed", root, len(old), config.retention_days)
    return {"path": str(path), "replaced": replaced, "pruned": len(old), "bytes": path.stat().st_size}


@dataclass(frozen=True)
class ArchivedEpoch:
    """One archived difference image as the index describes it (no file opened)."""

    root: Path
    row: dict

    @property
    def meta(self) -> dict:
        return self.row["meta"]

    @property
    def path(self) -> Path:
        return self.root / self.row["path"]

    def wcs(self):
        return _cached_wcs(self.row["wcs"])

    def pixels(self, ra, dec) -> tuple[np.ndarray, np.ndarray]:
        """0-based (x, y) of sky positions on this image."""
        x, y = self.wcs().all_world2pix(np.asarray(ra, float), np.asarray(dec, float), 0)
        return np.asarray(x), np.asarray(y)

    def on_image(self, x, y) -> np.ndarray:
        """Positions whose pixel centre lies on the image."""
        x, y = np.asarray(x), np.asarray(y)
        return np.isfinite(x) & np.isfinite(y) & (x > -0.5) & (x < self.row["nx"] - 0.5) & \
            (y > -0.5) & (y < self.row["ny"] - 0.5)

    def arrays(self) -> "EpochArrays":
        return EpochArrays.open(self)


_WCS_CACHE: OrderedDict = OrderedDict()
_WCS_LOCK = threading.Lock()


def _cached_wcs(text: str):
    """The WCS of an index row's header text (parsed once per process for recent ones)."""
    from pipeline.core.image import header_wcs

    with _WCS_LOCK:
        wcs = _WCS_CACHE.get(text)
        if wcs is not None:
            _WCS_CACHE.move_to_end(text)
            return wcs
    wcs = header_wcs(fits.Header.fromstring(text))
    with _WCS_LOCK:
        _WCS_CACHE[text] = wcs
        while len(_WCS_CACHE) > 512:
            _WCS_CACHE.popitem(last=False)
    return wcs


@dataclass(frozen=True)
class EpochArrays:
    """Memory maps of an epoch file's arrays (nothing is read until a stamp is cut)."""

    diff: np.ndarray
    fluxunc: np.ndarray
    psf: np.ndarray         # P_D per tile and sub-pixel phase, (ntiles, n, n, S, S)
    tiles: dict

    @classmethod
    def open(cls, epoch: ArchivedEpoch) -> "EpochArrays":
        layout = json.loads(epoch.row["layout"]) if isinstance(epoch.row["layout"], str) else epoch.row["layout"]
        shape = (epoch.row["ny"], epoch.row["nx"])
        offsets = layout["offsets"]
        try:
            diff = np.memmap(epoch.path, dtype=">f4", mode="r", offset=offsets["DIFF"], shape=shape)
            fluxunc = np.memmap(epoch.path, dtype=">f4", mode="r", offset=offsets["FLUXUNC"], shape=shape)
            psf = np.memmap(epoch.path, dtype=">f4", mode="r", offset=offsets["PSFD"],
                            shape=tuple(layout["psf_shape"]))
        except (OSError, ValueError) as exc:
            raise ArchiveError(f"{epoch.path}: archived difference image unreadable ({exc})") from None
        if psf.ndim == 3:           # format version 1: the centred P_D only
            psf = psf[:, None, None]
        tiles = {k: np.asarray(v) for k, v in layout["tiles"].items()}
        return cls(diff, fluxunc, psf, tiles)

    def tile_of(self, col: np.ndarray, row: np.ndarray) -> np.ndarray:
        """Index of the tile whose inner region holds each (integer) pixel."""
        t = self.tiles
        inside = ((row[:, None] >= t["y0"]) & (row[:, None] < t["y1"]) &
                  (col[:, None] >= t["x0"]) & (col[:, None] < t["x1"]))
        return np.argmax(inside, axis=1)

    def stamps(self, image: np.ndarray, col: np.ndarray, row: np.ndarray, half: int):
        """(N, 2h+1, 2h+1) stamps centred on integer pixels (NaN off the image) and their
        on-image masks; only those pixels are read from the file."""
        ny, nx = image.shape
        offsets = np.arange(-half, half + 1)
        rows = row[:, None, None] + offsets[None, :, None]
        cols = col[:, None, None] + offsets[None, None, :]
        inside = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
        values = np.asarray(image[np.clip(rows, 0, ny - 1), np.clip(cols, 0, nx - 1)], dtype=np.float64)
        values[~inside] = np.nan
        return values, inside


class DifferenceArchive:
    """Read access to an archive root: which epochs cover which positions.

    Raises
    ------
    ArchiveError
        The root has no readable ``index.sqlite``.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        index = self.root / INDEX_NAME
        if not index.is_file():
            raise ArchiveError(f"{self.root}: no difference-image archive here (no {INDEX_NAME}; "
                               "the quadrant runner writes it with forcedphot.archive = true)")
        self._index = index
        self._local = threading.local()
        self._refcats: dict[int, tuple] = {}
        self._refcat_lock = threading.Lock()

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = _connect(self._index, 30.0, readonly=True)
                db.execute("SELECT COUNT(*) FROM epochs").fetchone()
            except sqlite3.DatabaseError as exc:
                raise ArchiveError(f"{self._index}: unreadable archive index ({exc})") from None
            self._local.db = db
        return db

    def epochs(self, ra, dec, jd_min: float = -math.inf, jd_max: float = math.inf, fids=None,
               margin_deg: float = 0.0) -> list[ArchivedEpoch]:
        """Epochs with ``jd_min <= jd < jd_max`` (and a filter in ``fids``) whose footprint
        circle comes within ``margin_deg`` of any of the positions ``ra``, ``dec`` (deg).

        Only the index is read.  The circle is a superset of the image: the exact test is
        :meth:`ArchivedEpoch.on_image`.
        """
        ra, dec = np.atleast_1d(np.asarray(ra, float)), np.atleast_1d(np.asarray(dec, float))
        if ra.size == 0:
            return []
        sql = "SELECT * FROM epochs WHERE jd >= ? AND jd < ? AND dec_c - radius <= ? AND dec_c + radius >= ?"
        args = [max(jd_min, -1e30), min(jd_max, 1e30), float(dec.max()) + margin_deg,
                float(dec.min()) - margin_deg]
        if fids:
            sql += f" AND fid IN ({', '.join('?' * len(fids))})"
            args += [int(f) for f in fids]
        try:
            cursor = self._db().execute(sql + " ORDER BY jd, expid, rcid", args)
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, r)) for r in cursor.fetchall()]
        except sqlite3.DatabaseError as exc:
            raise ArchiveError(f"{self._index}: unreadable archive index ({exc})") from None
        if not rows:
            return []
        points = _unit(ra, dec)
        keep = []
        for row in rows:
            centre = _unit(row["ra_c"], row["dec_c"])
            cos_limit = math.cos(math.radians(min(row["radius"] + margin_deg, 180.0)))
            if np.any(points @ centre >= cos_limit):
                row["meta"] = json.loads(row["meta"])
                keep.append(ArchivedEpoch(self.root, row))
        return keep

    def reference_catalog(self, refid: int):
        """(unit vectors, table) of a reference's catalogue, or None when not archived."""
        with self._refcat_lock:
            if refid in self._refcats:
                return self._refcats[refid]
        path = self.root / "refcat" / f"{refid}.fits"
        value = None
        if path.is_file():
            try:
                table = Table.read(path)
            except (OSError, ValueError) as exc:
                raise ArchiveError(f"{path}: unreadable reference catalogue ({exc})") from None
            from scipy.spatial import cKDTree
            value = (cKDTree(_unit(table["ra"], table["dec"])), table)
        with self._refcat_lock:
            self._refcats[refid] = value
        return value
