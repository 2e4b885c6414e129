"""Run-time lookup: a catalogue's sources around one image footprint, from a store or a file."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from astropy.table import Table

from catalogs.schema import GAIA, CatalogError, CatalogKind, catalog_kind, read_catalog_table
from catalogs.sky import footprint_region
from catalogs.store import is_store, read_store_info, read_tiles

__all__ = ["catalog_for_footprint", "catalog_for_image"]


def catalog_for_footprint(source: str | os.PathLike, footprint_radec, margin_deg: float,
                          kind: CatalogKind | str = GAIA) -> Table:
    """The catalogue rows within ``margin_deg`` of a footprint.

    Parameters
    ----------
    source : path
        A tile store directory (only the tiles overlapping the footprint are read) or a
        single FITS table in the kind's column names (what ``--refcat`` may name).
    footprint_radec : array-like (n, 2)
        The footprint's corners in degrees, in order around it (a convex polygon, e.g. the
        four corners of a quadrant); one corner with a margin is a cone.
    margin_deg : float
        How far outside the footprint rows are kept (angular distance to the polygon).
    kind : CatalogKind or str
        The catalogue expected (:data:`catalogs.schema.GAIA` or ``PS1``); a store holding
        another is an error.

    Returns
    -------
    Table
        The kind's columns (e.g. :data:`catalogs.schema.GAIA_COLUMNS`) at the catalogue's
        own epoch, in the order of the source.

    Raises
    ------
    CatalogError
        A bad footprint, a path that is neither a store nor a readable table, a footprint
        not covered by the store, a store of another kind, or a corrupt tile (named).
    """
    kind = catalog_kind(kind)
    region = footprint_region(footprint_radec, margin_deg)
    path = Path(source)
    if path.is_dir():
        if not is_store(path):
            raise CatalogError(f"{path}: directory is not a catalogue store (no index.json)")
        info = read_store_info(path)
        if info.kind is not kind:
            raise CatalogError(f"{path}: store holds the {info.kind.name} catalogue, not {kind.name}")
        table = read_tiles(info, region.tiles(info.nside))
    elif path.exists():
        table = read_catalog_table(path, kind)
    else:
        raise CatalogError(f"{path}: no such catalogue store or file")
    keep = region.contains(np.asarray(table["ra"]), np.asarray(table["dec"]))
    result = table[keep]
    result.meta["FOOTMARG"] = float(margin_deg)
    return result


def catalog_for_image(source: str | os.PathLike, image, margin_deg: float,
                      kind: CatalogKind | str = GAIA) -> Table:
    """The catalogue over a solved image's footprint; Gaia's propagated to the image's
    mid-exposure epoch (a catalogue without proper motions, PS1's, as it is).

    ``image`` is a :class:`pipeline.core.image.QuadrantImage` with a WCS.

    Raises
    ------
    CatalogError
        As :func:`catalog_for_footprint`.
    """
    from catalogs.epoch import propagate_to_epoch
    from pipeline.core.image import footprint_corners

    kind = catalog_kind(kind)
    rows = catalog_for_footprint(source, footprint_corners(image.wcs, image.shape), margin_deg, kind)
    return propagate_to_epoch(rows, image.meta.obstime) if kind is GAIA else rows
