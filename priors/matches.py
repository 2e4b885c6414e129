"""The input of a prior fit: detections matched to Gaia, with their exposure's metadata.

One row per matched star:

========  ======================================================================
expid     exposure id
rcid      readout channel 0-63
x, y      1-based quadrant pixel of the detection
ra, dec   Gaia position at the exposure epoch, ICRS degrees
telra     commanded pointing (the header's TELRA/TELDEC), degrees
teldec
obsmjd    UTC MJD of the exposure
airmass   the telescope's airmass
========  ======================================================================

Optional, per exposure (the image header's FILTER, PRESSURE and TEMPTURE), for the
refraction of the camera frame; the site's defaults are used when absent:

===========  ===================================================================
filter       filter name (a key of the instrument's filters)
pressure     site air pressure, hPa
temperature  site air temperature, deg C
===========  ===================================================================

A table may hold one quadrant of one exposure and carry the constant columns as metadata
(keywords EXPID, RCID, TELRA, TELDEC, OBSMJD, AIRMASS, FILTER, PRESSURE, TEMPERATURE, as a
FITS table header does);
:func:`stack_matches` fills them in and stacks any number of such tables.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
from astropy.io.registry import IORegistryError
from astropy.table import Table, vstack

from priors.model import PriorError

__all__ = ["MATCH_COLUMNS", "OPTIONAL_COLUMNS", "EXPOSURE_COLUMNS", "stack_matches", "read_matches",
           "validate_matches"]

#: Every column a match table must provide (directly or through its metadata).
MATCH_COLUMNS = ("expid", "rcid", "x", "y", "ra", "dec", "telra", "teldec", "obsmjd", "airmass")
#: Columns used when present.
OPTIONAL_COLUMNS = ("filter", "pressure", "temperature")
#: Columns that must be constant within an exposure.
EXPOSURE_COLUMNS = ("telra", "teldec", "obsmjd", "airmass", "pressure", "temperature")


def _with_metadata_columns(table: Table, source: str) -> Table:
    table = Table(table, copy=False)
    meta = {str(k).lower(): v for k, v in table.meta.items()}
    out = Table()
    for name in MATCH_COLUMNS + OPTIONAL_COLUMNS:
        column = next((c for c in table.colnames if c.lower() == name), None)
        if column is not None:
            out[name] = np.asarray(table[column])
        elif name in meta:
            out[name] = np.full(len(table), meta[name])
        elif name in MATCH_COLUMNS:
            raise PriorError(source, f"match table lacks column (or keyword) {name.upper()}")
    return out


def validate_matches(matches: Table, source: str = "<matches>") -> Table:
    """Check a stacked match table; return it with clean dtypes.

    Raises
    ------
    PriorError
        Empty table, missing column, non-finite value, rcid outside 0-63, or exposure
        metadata that differ between rows of the same exposure.
    """
    if len(matches) == 0:
        raise PriorError(source, "no matched stars")
    table = _with_metadata_columns(matches, source)
    for name in ("expid", "rcid"):
        table[name] = np.asarray(table[name]).astype(np.int64)
    if "filter" in table.colnames:
        table["filter"] = np.char.strip(np.asarray(table["filter"]).astype(str))
    for name in [c for c in MATCH_COLUMNS[2:] + OPTIONAL_COLUMNS[1:] if c in table.colnames]:
        values = np.asarray(table[name], dtype=float)
        if not np.all(np.isfinite(values)):
            raise PriorError(source, f"column {name} holds {np.count_nonzero(~np.isfinite(values))} "
                                     "non-finite values")
        table[name] = values
    bad = (table["rcid"] < 0) | (table["rcid"] > 63)
    if np.any(bad):
        raise PriorError(source, f"rcid must be 0-63, found {sorted(set(table['rcid'][bad]))[:5]}")
    by_exposure = table.group_by("expid")
    for group in by_exposure.groups:
        for name in [c for c in EXPOSURE_COLUMNS + ("filter",) if c in table.colnames]:
            values = np.asarray(group[name])
            if len(set(values)) > 1 if name == "filter" else np.ptp(values) > 1e-9:
                raise PriorError(source, f"exposure {group['expid'][0]} has differing {name} values")
    return table


def stack_matches(tables: Iterable[Table], sources: Sequence[str] | None = None) -> Table:
    """Stack match tables (one per quadrant-exposure, or already stacked) into one validated table.

    An optional column missing from any table is dropped from the stack.
    """
    tables = list(tables)
    sources = list(sources) if sources is not None else [f"<table {i}>" for i in range(len(tables))]
    if not tables:
        raise PriorError("<matches>", "no match tables given")
    parts = [_with_metadata_columns(t, s) for t, s in zip(tables, sources) if len(t)]
    if not parts:
        raise PriorError(", ".join(sources), "no matched stars in any table")
    source = sources[0] if len(sources) == 1 else f"{sources[0]} (+{len(sources) - 1} more)"
    return validate_matches(vstack(parts, join_type="inner", metadata_conflicts="silent"), source)


def read_matches(paths: Iterable[str | os.PathLike]) -> Table:
    """Read match tables (FITS binary tables, ECSV, or anything astropy's Table.read knows)."""
    tables, sources = [], []
    for path in paths:
        source = str(path)
        try:
            tables.append(Table.read(path))
        except FileNotFoundError:
            raise PriorError(source, "file not found") from None
        except (OSError, ValueError, TypeError, IORegistryError) as exc:
            raise PriorError(source, f"not a readable table ({exc})") from None
        sources.append(source)
    return stack_matches(tables, sources)
