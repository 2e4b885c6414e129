"""Building a tile store: from a local table in a catalogue kind's column names (Gaia
archive names, or the PS1 kind's), or from a TAP service.

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

from catalogs.schema import (GAIA, CatalogError, CatalogKind, as_catalog_table, catalog_kind,
                             empty_catalog_table, read_catalog_table)
from catalogs.sky import pixel_cone, pixels_of, tiles_for_regions
from catalogs.store import DEFAULT_NSIDE, TileEntry, read_store_info, is_store, update_index, write_tile
from catalogs.tap import TapError, tap_sync_query

__all__ = ["GAIA_DR3_TABLE", "PrefetchResult", "prefetch_from_table", "prefetch_from_tap", "tile_adql"]

log = logging.getLogger("skydiff.catalogs")

GAIA_DR3_TABLE = GAIA.tap_table
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

    def __init__(self, store_dir: Path, nside: int, total: int, kind: CatalogKind):
        if is_store(store_dir):
            info = read_store_info(store_dir)
            if info.nside != nside:
                raise CatalogError(f"{store_dir}: store has nside {info.nside}, not {nside}")
            if info.kind is not kind:
                raise CatalogError(f"{store_dir}: store holds the {info.kind.name} catalogue, not {kind.name}")
        self.store_dir, self.nside, self.total, self.kind = store_dir, nside, total, kind
        self.pending: list[TileEntry] = []
        self.written: list[int] = []
        self.rows = 0
        self.started = time.monotonic()

    def write(self, pixel: int, rows: Table, source: str, mag_limit: float | None) -> None:
        self.pending.append(write_tile(self.store_dir, self.nside, pixel, rows, source, mag_limit, self.kind))
        self.written.append(pixel)
        self.rows += len(rows)
        # One line per tile only at DEBUG: a field is ~50 tiles, and the summary says it all.
        log.debug("tile %d/%d (nside %d pixel %d): %d rows", len(self.written), self.total,
                  self.nside, pixel, len(rows))
        if len(self.pending) >= _INDEX_EVERY:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            update_index(self.store_dir, self.nside, self.pending, self.kind)
            self.pending = []


def _logged(result: "PrefetchResult", source: str, kind: CatalogKind) -> "PrefetchResult":
    """Log one summary line of a prefetch (the per-tile lines are DEBUG)."""
    log.info("%s store %s: %d tile(s) written (nside %d), %d already present, %d rows, %d TAP queries, "
             "%.1f s, from %s", kind.name, result.store_dir, len(result.written), result.nside,
             len(result.skipped), result.rows, result.queries, result.seconds, source)
    return result


def prefetch_from_table(table: Table | str | os.PathLike, store_dir: str | os.PathLike, region, *,
                        nside: int = DEFAULT_NSIDE, mag_limit: float | None = None,
                        kind: CatalogKind | str = GAIA) -> PrefetchResult:
    """Write the tiles of ``region`` from a local table in a kind's column names.

    Parameters
    ----------
    table : Table or path
        The catalogue (e.g. the simulator's FITS table); a path is read with
        :func:`catalogs.schema.read_catalog_table`.
    store_dir : path
        The store (created if needed).
    region : region or sequence of regions
        :class:`catalogs.sky.PolygonRegion` (fields, cones) or :class:`catalogs.sky.SkyBox`.
    nside : int
        HEALPix nside of a new store (must match an existing one).
    mag_limit : float, optional
        Keep rows with the kind's magnitude (Gaia ``phot_g_mean_mag``, PS1 ``rmag``)
        ``<= mag_limit`` only.
    kind : CatalogKind or str
        The catalogue (:data:`catalogs.schema.GAIA` or ``PS1``); the store must hold it.

    Returns
    -------
    PrefetchResult
        Tiles written (all tiles of the region, rewritten from this table), rows stored.
    """
    _check_mag_limit(mag_limit)
    kind = catalog_kind(kind)
    store_dir = Path(store_dir)
    if isinstance(table, Table):
        source, rows = "table", as_catalog_table(table, kind, "input table")
    else:
        source, rows = str(table), read_catalog_table(table, kind)
    if mag_limit is not None:
        rows = rows[np.asarray(rows[kind.mag_column] <= mag_limit)]
    tiles = tiles_for_regions(_as_regions(region), nside)
    pixels = pixels_of(nside, rows["ra"], rows["dec"])
    order = np.argsort(pixels, kind="stable")
    sorted_pixels = pixels[order]
    starts = np.searchsorted(sorted_pixels, tiles, side="left")
    ends = np.searchsorted(sorted_pixels, tiles, side="right")
    writer = _TileWriter(store_dir, nside, len(tiles), kind)
    try:
        for pixel, start, end in zip(tiles, starts, ends):
            writer.write(int(pixel), rows[order[start:end]], source, mag_limit)
    finally:
        writer.flush()
    return _logged(PrefetchResult(store_dir, nside, tuple(writer.written), (), writer.rows, 0,
                                  time.monotonic() - writer.started, tuple(int(t) for t in tiles)), source, kind)


def tile_adql(tap_table: str, ra_deg: float, dec_deg: float, radius_deg: float,
              mag_limit: float | None = None, kind: CatalogKind | str = GAIA) -> str:
    """The ADQL selecting a kind's columns in a cone (and to a magnitude limit).

    The service's column names are the kind's :attr:`~catalogs.schema.CatalogKind.tap_columns`
    (PS1 DR2's ``raMean`` ..), renamed to the stored names with ``AS``.
    """
    kind = catalog_kind(kind)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", tap_table):
        raise CatalogError(f"not a table name: {tap_table!r}")
    ra, dec = kind.tap_column("ra"), kind.tap_column("dec")
    where = (f"1 = CONTAINS(POINT('ICRS', {ra}, {dec}), "
             f"CIRCLE('ICRS', {ra_deg:.9f}, {dec_deg:.9f}, {radius_deg:.9f}))")
    if mag_limit is not None:
        where += f" AND {kind.tap_column(kind.mag_column)} <= {float(mag_limit):.4f}"
    names = [name for name in kind.columns if name not in kind.tap_absent]
    select = ", ".join(name if kind.tap_column(name) == name else f"{kind.tap_column(name)} AS {name}"
                       for name in names)
    return f"SELECT {select} FROM {tap_table} WHERE {where}"


@dataclass
class _TapFetcher:
    url: str
    tap_table: str
    kind: CatalogKind
    mag_limit: float | None
    timeout_s: float
    max_rows: int | None
    queries: int = 0

    def pixel_rows(self, nside: int, pixel: int) -> Table:
        """All sources of one NESTED pixel, splitting into children on truncation."""
        ra, dec, radius = pixel_cone(nside, pixel)
        adql = tile_adql(self.tap_table, ra, dec, radius, self.mag_limit, self.kind)
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
            return vstack(parts, metadata_conflicts="silent") if parts else empty_catalog_table(self.kind)
        rows = as_catalog_table(result.table, self.kind, f"{self.url} (nside {nside} pixel {pixel})")
        return rows[pixels_of(nside, rows["ra"], rows["dec"]) == pixel]


def prefetch_from_tap(url: str | None, store_dir: str | os.PathLike, region, *,
                      mag_limit: float | None = None, timeout_s: float = 120.0,
                      nside: int = DEFAULT_NSIDE, gaia_table: str | None = None,
                      max_rows: int | None = None, overwrite: bool = False,
                      kind: CatalogKind | str = GAIA) -> PrefetchResult:
    """Fetch the tiles of ``region`` from a TAP service, one synchronous query per tile.

    Parameters
    ----------
    url : str or None
        TAP service base URL (configuration); None: the kind's service (the Gaia archive,
        :data:`GAIA_TAP_URL`; MAST's PS1 DR2 service).
    store_dir, region, nside, mag_limit, kind
        As for :func:`prefetch_from_table`.
    timeout_s : float
        Limit per query (connection, execution and download).
    gaia_table : str, optional
        The service's table (default: the kind's, ``gaiadr3.gaia_source`` or
        ``dbo.MeanObjectView``), with the kind's service column names.
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
    kind = catalog_kind(kind)
    url = url or kind.tap_url
    tap_table = gaia_table or kind.tap_table
    store_dir = Path(store_dir)
    source = f"{url.rstrip('/')} {tap_table}"
    tiles = tiles_for_regions(_as_regions(region), nside)
    done: set[int] = set()
    if is_store(store_dir) and not overwrite:
        info = read_store_info(store_dir)
        done = {p for p, e in info.tiles.items()
                if e.source == source and e.mag_limit == (None if mag_limit is None else float(mag_limit))}
    todo = [int(t) for t in tiles if int(t) not in done]
    log.info("%d tile(s) in region, %d already stored, %d to fetch from %s",
             len(tiles), len(tiles) - len(todo), len(todo), url)
    fetcher = _TapFetcher(url, tap_table, kind, mag_limit, timeout_s, max_rows)
    writer = _TileWriter(store_dir, nside, len(todo), kind)
    try:
        for pixel in todo:
            writer.write(pixel, fetcher.pixel_rows(nside, pixel), source, mag_limit)
    finally:
        writer.flush()
    return _logged(PrefetchResult(store_dir, nside, tuple(writer.written),
                                  tuple(sorted(int(t) for t in tiles if int(t) in done)), writer.rows,
                                  fetcher.queries, time.monotonic() - writer.started,
                                  tuple(int(t) for t in tiles)), source, kind)
