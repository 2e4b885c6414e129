"""The Gaia source columns the store keeps, and reading any table that carries them.

Tiles keep the Gaia archive's own column names, types and units (``gaiadr3.gaia_source``),
so a table fetched from the archive, the simulator's catalogue and a tile read back all
have one shape.  ``pmra_error``/``pmdec_error`` are optional on input (the simulator's
catalogue has no such columns): they are stored as NaN when absent, and the epoch
propagation then falls back on an assumed proper-motion dispersion for the error.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import astropy.units as u
from astropy.io import fits
from astropy.table import MaskedColumn, Table
from pipeline.core.exits import BadInputError

__all__ = [
    "CatalogError", "GAIA_COLUMNS", "REQUIRED_COLUMNS", "OPTIONAL_COLUMNS",
    "as_gaia_table", "empty_gaia_table", "read_gaia_table",
]


class CatalogError(BadInputError):
    """A catalogue file, store or service answer that cannot be used; the message names it."""


# name -> (dtype, unit) as in gaiadr3.gaia_source.  ra_error is the error on ra*cos(dec).
GAIA_COLUMNS: dict[str, tuple[str, u.UnitBase | None]] = {
    "source_id": ("i8", None),
    "ra": ("f8", u.deg),
    "dec": ("f8", u.deg),
    "ra_error": ("f4", u.mas),
    "dec_error": ("f4", u.mas),
    "pmra": ("f8", u.mas / u.yr),
    "pmdec": ("f8", u.mas / u.yr),
    "pmra_error": ("f4", u.mas / u.yr),
    "pmdec_error": ("f4", u.mas / u.yr),
    "ref_epoch": ("f8", u.yr),
    "phot_g_mean_mag": ("f4", u.mag),
    "phot_bp_mean_mag": ("f4", u.mag),
    "phot_rp_mean_mag": ("f4", u.mag),
}
OPTIONAL_COLUMNS = ("pmra_error", "pmdec_error")
REQUIRED_COLUMNS = tuple(name for name in GAIA_COLUMNS if name not in OPTIONAL_COLUMNS)


def _known_unit(unit) -> u.UnitBase | None:
    """A parsed unit, or None for no unit or one astropy does not recognise."""
    if unit is None or unit == "":
        return None
    try:
        parsed = u.Unit(unit)
    except (ValueError, TypeError):
        return None
    return None if isinstance(parsed, u.UnrecognizedUnit) else parsed


def _plain_values(column, name: str, dtype: str, unit, source: str) -> np.ndarray:
    """Column values as a plain array of ``dtype`` in ``unit``; masked floats become NaN."""
    col_unit = _known_unit(getattr(column, "unit", None))
    values = column
    if isinstance(column, MaskedColumn) or np.ma.isMaskedArray(column):
        if np.dtype(dtype).kind != "f":
            if np.any(np.ma.getmaskarray(column)):
                raise CatalogError(f"{source}: column {name} has null values")
            values = np.ma.getdata(column)
        else:
            values = np.ma.filled(np.ma.asarray(column, dtype=dtype), np.nan)
    values = np.asarray(values)
    # Tables read from FITS come without units (and in big-endian order): a missing unit
    # means the Gaia archive's unit; a different but convertible unit is converted.
    if unit is not None and col_unit is not None and col_unit != unit:
        try:
            values = (values * col_unit).to_value(unit)
        except u.UnitConversionError:
            raise CatalogError(f"{source}: column {name} is in {col_unit}, expected {unit}") from None
    try:
        return np.asarray(values, dtype=np.dtype(dtype).newbyteorder("="))
    except (TypeError, ValueError):
        raise CatalogError(f"{source}: column {name} is not numeric") from None


def as_gaia_table(table: Table, source: str | os.PathLike = "table") -> Table:
    """Check and normalise a table in Gaia archive column names.

    Parameters
    ----------
    table : Table
        Must hold the :data:`REQUIRED_COLUMNS` (case-insensitive); other columns are dropped.
    source : str
        What the table came from, for error messages.

    Returns
    -------
    Table
        The columns of :data:`GAIA_COLUMNS` in that order, native-endian, with units,
        NaN for nulls (two-parameter sources) and for absent optional columns.

    Raises
    ------
    CatalogError
        A required column is missing, not numeric, in a foreign unit, or ra/dec is not finite.
    """
    source = str(source)
    by_lower = {name.lower(): name for name in table.colnames}
    missing = [name for name in REQUIRED_COLUMNS if name not in by_lower]
    if missing:
        raise CatalogError(f"{source}: missing Gaia column(s) {', '.join(missing)}")
    out = Table(meta=dict(table.meta))
    for name, (dtype, unit) in GAIA_COLUMNS.items():
        if name in by_lower:
            values = _plain_values(table[by_lower[name]], name, dtype, unit, source)
        else:
            values = np.full(len(table), np.nan, dtype=dtype)
        out[name] = values
        if unit is not None:
            out[name].unit = unit
    bad = ~(np.isfinite(out["ra"]) & np.isfinite(out["dec"]) & (np.abs(out["dec"]) <= 90.0))
    if np.any(bad):
        raise CatalogError(f"{source}: {int(bad.sum())} row(s) with invalid ra/dec")
    out["ra"] = np.mod(out["ra"], 360.0)
    return out


def empty_gaia_table() -> Table:
    """A zero-row table with the store's columns."""
    return as_gaia_table(Table({name: np.zeros(0, dtype) for name, (dtype, _) in GAIA_COLUMNS.items()}))


def read_gaia_table(path: str | os.PathLike) -> Table:
    """Read a FITS table in Gaia column names (the first binary table holding ra and dec).

    This is how a plain catalogue file (the simulator's, or one exported from the archive)
    is read; an LDAC tile qualifies too.

    Raises
    ------
    CatalogError
        The file cannot be read, holds no such table, or lacks a required column.
    """
    path = Path(path)
    try:
        with fits.open(path) as hdul:
            for hdu in hdul:
                if isinstance(hdu, fits.BinTableHDU) and {"ra", "dec"} <= {
                        n.lower() for n in hdu.columns.names}:
                    table = Table(hdu.data.copy())
                    for col, fits_col in zip(table.columns.values(), hdu.columns):
                        if fits_col.unit:
                            col.unit = u.Unit(fits_col.unit, parse_strict="silent")
                    break
            else:
                raise CatalogError(f"{path}: no FITS binary table with ra and dec columns")
    except CatalogError:
        raise
    except FileNotFoundError:
        raise CatalogError(f"{path}: no such catalogue file") from None
    except (OSError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise CatalogError(f"{path}: not a readable FITS table ({exc})") from None
    return as_gaia_table(table, path)
