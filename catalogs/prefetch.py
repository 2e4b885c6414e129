"""Building the tile store: from a local table in Gaia column names, or from a TAP service.

Each tile is written whole -- every source of its HEALPix pixel -- for every pixel that
overlaps the requested regions.  From TAP, a pixel is fetched with a cone that contains
it and cut to the exact pixel here; when the service truncates an answer (``OVERFLOW``,
e.g. a synchronous row cap), the pixel is split into its four NESTED children, recursively,
so a dense tile is still fetched whole.  TAP prefetches resume: a tile already in the
index from the same service, table and magnitude limit is skipped unless ``overwrite``.
"""
from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table, vstack

from catalogs.schema import GAIA_COLUMNS, CatalogError, as_gaia_table, empty_gaia_table, read_gaia_table
from catalogs.sky import pixel_cone, pixels_of, tiles_for_regions
from catalogs.store import DEFAULT_NSIDE, TileEntry, read_store_info, is_store, update_index, write_tile
from catalogs.tap import TapError, tap_sync_query

__all__ = ["GAIA_DR3_TABLE", "PrefetchResult", "prefetch_from_table", "prefetch_from_tap", "tile_adql"]

log = logging.getLogger("skydiff.catalogs")

GAIA_DR3_TABLE = "gaiadr3.gaia_source"
# Index updates while a long prefetch runs, so an interrupted run keeps what it wrote.
_INDEX_EVERY = 20
_MAX_SPLIT_NSIDE = 8192


@dataclass(frozen=True)
class PrefetchResult:
    """What a prefetch did."""

    store_dir: Path
    nside: int
    written: tuple[int, ...] = ()
    skipped: tuple[int, ...] = ()
    rows: int = 0
    queries: int = 0
    seconds: float = 0.0
    tiles: tuple[int, ...] = ()


def _as_regions(region) -> list:
    return list(region) if isinstance(region, (list, tuple)) else [region]


def _check_mag_limit(mag_limit: float | None) -> None:
    if mag_limit is not None and not np.isfinite(mag_limit):
        raise CatalogError(f"magnitude limit must be finite, got {mag_limit}")


class _TileWriter:
    """Writes tiles and keeps the index current every few tiles and at the end."""

    def __init__(self, store_dir: Path, nside: int, total: int):
        if is_store(store_dir) and read_store_info(store_dir).nside != nside:
            raise CatalogError(f"{store_dir}: store has nside {read_store_info(store_dir).nside}, "
                               f"not {nside}")
        self.store_dir, self.nside, self.total = store_dir, nside, total
        self.pending: list[TileEntry] = []
        self.written: list[int] = []
        self.rows = 0
        self.started = time.monotonic()

    def write(self, pixel: int, rows: Table, source: str, mag_limit: float | None) -> None:
        self.pending.append(write_tile(self.store_dir, self.nside, pixel, rows, source, mag_limit))
        self.written.append(pixel)
        self.rows += len(rows)
        log.info("tile %d/%d (nside %d pixel %d): %d rows", len(self.written), self.total,
                 self.nside, pixel, len(rows))
        if len(self.pending) >= _INDEX_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            update_index(self.store_dir, self.nside, self.pending)
            self.pending = []


def prefetch_from_table(table: Table | str | os.PathLike, store_dir: str | os.PathLike, region, *,
                        nside: int = DEFAULT_NSIDE, mag_limit: float | None = None) -> PrefetchResult:
    """Write the tiles of ``region`` from a local table in Gaia archive column names.

    Parameters
    ----------
    table : Table or path
        The catalogue (e.g. the simulator's FITS table); a path is read with
        :func:`catalogs.schema.read_gaia_table`.
    store_dir : path
        The store (created if needed).
    region : region or sequence of regions
        :class:`catalogs.sky.PolygonRegion` (fields, cones) or :class:`catalogs.sky.SkyBox`.
    nside : int
        HEALPix nside of a new store (must match an existing one).
    mag_limit : float, optional
        Keep ``phot_g_mean_mag <= mag_limit`` only.

    Returns
    -------
    PrefetchResult
        Tiles written (all tiles of the region, rewritten from this table), rows stored.
    """
    _check_mag_limit(mag_limit)
    store_dir = Path(store_dir)
    if isinstance(table, Table):
        source, gaia = "table", as_gaia_table(table, "input table")
    else:
        source, gaia = str(table), read_gaia_table(table)
    if mag_limit is not None:
        gaia = gaia[np.asarray(gaia["phot_g_mean_mag"] <= mag_limit)]
    tiles = tiles_for_regions(_as_regions(region), nside)
    pixels = pixels_of(nside, gaia["ra"], gaia["dec"])
    order = np.argsort(pixels, kind="stable")
    sorted_pixels = pixels[order]
    starts = np.searchsorted(sorted_pixels, tiles, side="left")
    ends = np.searchsorted(sorted_pixels, tiles, side="right")
    writer = _TileWriter(store_dir, nside, len(tiles))
    try:
        for pixel, start, end in zip(tiles, starts, ends):
            writer.write(int(pixel), gaia[order[start:end]], source, mag_limit)
    finally:
        writer.flush()
    return PrefetchResult(store_dir, nside, tuple(writer.written), (), writer.rows, 0,
                          time.monotonic() - writer.started, tuple(int(t) for t in tiles))


def tile_adql(gaia_table: str, ra_deg: float, dec_deg: float, radius_deg: float,
              mag_limit: float | None = None) -> str:
    """The ADQL selecting the store's columns in a cone (and to a G limit)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", gaia_table):
        raise CatalogError(f"not a table name: {gaia_table!r}")
    where = (f"1 = CONTAINS(POINT('ICRS', ra, dec), "
             f"CIRCLE('ICRS', {ra_deg:.9f}, {dec_deg:.9f}, {radius_deg:.9f}))")
    if mag_limit is not None:
        where += f" AND phot_g_mean_mag <= {float(mag_limit):.4f}"
    return f"SELECT {', '.join(GAIA_COLUMNS)} FROM {gaia_table} WHERE {where}"


@dataclass
class _TapFetcher:
    url: str
    gaia_table: str
    mag_limit: float | None
    timeout_s: float
    max_rows: int | None
    queries: int = 0

    def pixel_rows(self, nside: int, pixel: int) -> Table:
        """All sources of one NESTED pixel, splitting into children on truncation."""
        ra, dec, radius = pixel_cone(nside, pixel)
        adql = tile_adql(self.gaia_table, ra, dec, radius, self.mag_limit)
        result = tap_sync_query(self.url, adql, self.timeout_s, self.max_rows)
        self.queries += 1
        truncated = result.overflow or (self.max_rows is not None and len(result.table) >= self.max_rows)
        if truncated:
            if 2 * nside > _MAX_SPLIT_NSIDE:
                raise TapError(f"{self.url}: answer for nside {nside} pixel {pixel} still truncated "
                               f"at {len(result.table)} rows; raise the service's row limit")
            log.debug("nside %d pixel %d truncated at %d rows: splitting", nside, pixel, len(result.table))
            parts = [self.pixel_rows(2 * nside, 4 * pixel + child) for child in range(4)]
            parts = [p for p in parts if len(p)]
            return vstack(parts, metadata_conflicts="silent") if parts else empty_gaia_table()
        gaia = as_gaia_table(result.table, f"{self.url} (nside {nside} pixel {pixel})")
        return gaia[pixels_of(nside, gaia["ra"], gaia["dec"]) == pixel]


def prefetch_from_tap(url: str, store_dir: str | os.PathLike, region, *,
                      mag_limit: float | None = None, timeout_s: float = 120.0,
                      nside: int = DEFAULT_NSIDE, gaia_table: str = GAIA_DR3_TABLE,
                      max_rows: int | None = None, overwrite: bool = False) -> PrefetchResult:
    """Fetch the tiles of ``region`` from a TAP service, one synchronous query per tile.

    Parameters
    ----------
    url : str
        TAP service base URL (configuration; the Gaia archive is :data:`GAIA_TAP_URL`).
    store_dir, region, nside, mag_limit
        As for :func:`prefetch_from_table`.
    timeout_s : float
        Limit per query (connection, execution and download).
    gaia_table : str
        The archive table (Gaia archive column names).
    max_rows : int, optional
        ``MAXREC`` per query; a full answer counts as truncated and is split.
    overwrite : bool
        Refetch tiles already stored from this service, table and magnitude limit.

    Raises
    ------
    TapError
        The service failed (HTTP error, error document, timeout); tiles written before the
        failure stay in the store and index, so a rerun resumes.
    """
    _check_mag_limit(mag_limit)
    store_dir = Path(store_dir)
    source = f"{url.rstrip('/')} {gaia_table}"
    tiles = tiles_for_regions(_as_regions(region), nside)
    done: set[int] = set()
    if is_store(store_dir) and not overwrite:
        info = read_store_info(store_dir)
        done = {p for p, e in info.tiles.items()
                if e.source == source and e.mag_limit == (None if mag_limit is None else float(mag_limit))}
    todo = [int(t) for t in tiles if int(t) not in done]
    log.info("%d tile(s) in region, %d already stored, %d to fetch from %s",
             len(tiles), len(tiles) - len(todo), len(todo), url)
    fetcher = _TapFetcher(url, gaia_table, mag_limit, timeout_s, max_rows)
    writer = _TileWriter(store_dir, nside, len(todo))
    try:
        for pixel in todo:
            writer.write(pixel, fetcher.pixel_rows(nside, pixel), source, mag_limit)
    finally:
        writer.flush()
    return PrefetchResult(store_dir, nside, tuple(writer.written),
                          tuple(sorted(int(t) for t in tiles if int(t) in done)), writer.rows,
                          fetcher.queries, time.monotonic() - writer.started,
                          tuple(int(t) for t in tiles))
