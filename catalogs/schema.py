"""The catalogues a store can hold (its *kind*), their columns, and reading any table that
carries them.

Two kinds share the tile machinery:

``gaia``
    Tiles keep the Gaia archive's own column names, types and units
    (``gaiadr3.gaia_source``), so a table fetched from the archive, the simulator's
    catalogue and a tile read back all have one shape.  ``pmra_error``/``pmdec_error`` are
    optional on input (the simulator's catalogue has no such columns): they are stored as
    NaN when absent, and the epoch propagation then falls back on an assumed proper-motion
    dispersion for the error.
``ps1``
    A Pan-STARRS1-like catalogue for the alert context: PS1 DR2 mean-object positions and
    PSF magnitudes (MAST's ``dbo.MeanObjectView``: ``objID``, ``raMean``, ``decMean``,
    ``gMeanPSFMag`` ..) with the point-source score of the PS1 point-source catalogue
    (Tachibana & Miller 2018, ``ps_score``: 1 star, 0 galaxy), stored as ``objid, ra, dec,
    gmag, rmag, imag, zmag, ps_score``.  A missing magnitude is NaN (PS1 writes -999);
    a missing score (a source the PSC does not classify) is NaN.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import astropy.units as u
from astropy.io import fits
from astropy.table import MaskedColumn, Table
from pipeline.core.exits import BadInputError

__all__ = [
    "CatalogError", "CatalogKind", "GAIA", "PS1", "CATALOG_KINDS", "catalog_kind",
    "GAIA_COLUMNS", "PS1_COLUMNS", "REQUIRED_COLUMNS", "OPTIONAL_COLUMNS",
    "as_catalog_table", "empty_catalog_table", "read_catalog_table",
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

# name -> (dtype, unit): PS1 DR2 mean PSF magnitudes and the PS1 PSC score.
PS1_COLUMNS: dict[str, tuple[str, u.UnitBase | None]] = {
    "objid": ("i8", None),
    "ra": ("f8", u.deg),
    "dec": ("f8", u.deg),
    "gmag": ("f4", u.mag),
    "rmag": ("f4", u.mag),
    "imag": ("f4", u.mag),
    "zmag": ("f4", u.mag),
    "ps_score": ("f4", None),
}


@dataclass(frozen=True)
class CatalogKind:
    """One catalogue a store can hold: its columns and how a TAP service serves them.

    Attributes
    ----------
    name : str
        ``gaia`` or ``ps1`` (recorded in the store index).
    store_format : str
        The index's ``format`` (Gaia stores keep the original ``skydiff-gaia-tiles``).
    columns : dict
        Stored name -> (dtype, unit), in order.
    optional : tuple of str
        Columns that may be absent on input (stored as NaN).
    mag_column : str
        The magnitude a ``mag_limit`` applies to.
    tap_url, tap_table : str
        The default TAP service and table.
    tap_columns : dict
        Stored name -> the service table's column (ADQL ``expr AS name`` when they differ).
    tap_absent : tuple of str
        Optional columns the default service table does not have (not selected; NaN).
    null_mag_at_or_below : float or None
        Magnitudes at or below this are the catalogue's "no measurement" (PS1's -999).
    """

    name: str
    store_format: str
    columns: dict
    optional: tuple = ()
    mag_column: str = ""
    tap_url: str = ""
    tap_table: str = ""
    tap_columns: dict = field(default_factory=dict)
    tap_absent: tuple = ()
    null_mag_at_or_below: float | None = None

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(name for name in self.columns if name not in self.optional)

    def tap_column(self, name: str) -> str:
        return self.tap_columns.get(name, name)


GAIA = CatalogKind(
    name="gaia", store_format="skydiff-gaia-tiles", columns=GAIA_COLUMNS, optional=OPTIONAL_COLUMNS,
    mag_column="phot_g_mean_mag", tap_url="https://gea.esac.esa.int/tap-server/tap",
    tap_table="gaiadr3.gaia_source")
# MAST's PS1 DR2 TAP service serves the mean-object view; the PSC score is MAST's HLSP
# table (CasJobs ``PS1_PSC``), so a service or table without it leaves ps_score NaN.
PS1 = CatalogKind(
    name="ps1", store_format="skydiff-ps1-tiles", columns=PS1_COLUMNS, optional=("ps_score",),
    mag_column="rmag", tap_url="https://mast.stsci.edu/vo-tap/api/v0.1/ps1dr2",
    tap_table="dbo.MeanObjectView",
    tap_columns={"objid": "objID", "ra": "raMean", "dec": "decMean", "gmag": "gMeanPSFMag",
                 "rmag": "rMeanPSFMag", "imag": "iMeanPSFMag", "zmag": "zMeanPSFMag"},
    tap_absent=("ps_score",), null_mag_at_or_below=-999.0)
CATALOG_KINDS = {kind.name: kind for kind in (GAIA, PS1)}


def catalog_kind(name: str | CatalogKind) -> CatalogKind:
    """The kind called ``name`` (a kind is returned as is).

    Raises
    ------
    CatalogError
        Unknown name.
    """
    if isinstance(name, CatalogKind):
        return name
    try:
        return CATALOG_KINDS[str(name)]
    except KeyError:
        raise CatalogError(f"unknown catalogue kind {name!r} (known: {', '.join(CATALOG_KINDS)})") from None


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


def as_catalog_table(table: Table, kind: CatalogKind | str = GAIA, source: str | os.PathLike = "table") -> Table:
    """Check and normalise a table in a catalogue kind's column names.

    Parameters
    ----------
    table : Table
        Must hold the kind's required columns (case-insensitive); other columns are dropped.
    kind : CatalogKind or str
        :data:`GAIA` (Gaia archive names) or :data:`PS1`.
    source : str
        What the table came from, for error messages.

    Returns
    -------
    Table
        The kind's columns in order, native-endian, with units, NaN for nulls (Gaia
        two-parameter sources, PS1's -999 magnitudes) and for absent optional columns.

    Raises
    ------
    CatalogError
        A required column is missing, not numeric, in a foreign unit, ra/dec is not
        finite, or a PS1 score lies outside 0..1.
    """
    kind = catalog_kind(kind)
    source = str(source)
    by_lower = {name.lower(): name for name in table.colnames}
    missing = [name for name in kind.required if name not in by_lower]
    if missing:
        label = "Gaia" if kind is GAIA else kind.name.upper()
        raise CatalogError(f"{source}: missing {label} column(s) {', '.join(missing)}")
    out = Table(meta=dict(table.meta))
    for name, (dtype, unit) in kind.columns.items():
        if name in by_lower:
            values = _plain_values(table[by_lower[name]], name, dtype, unit, source)
        else:
            values = np.full(len(table), np.nan, dtype=dtype)
        if kind.null_mag_at_or_below is not None and unit == u.mag:
            values = np.where(values <= kind.null_mag_at_or_below, np.nan, values).astype(values.dtype)
        out[name] = values
        if unit is not None:
            out[name].unit = unit
    bad = ~(np.isfinite(out["ra"]) & np.isfinite(out["dec"]) & (np.abs(out["dec"]) <= 90.0))
    if np.any(bad):
        raise CatalogError(f"{source}: {int(bad.sum())} row(s) with invalid ra/dec")
    if "ps_score" in out.colnames:
        score = np.asarray(out["ps_score"])
        outside = np.isfinite(score) & ((score < 0.0) | (score > 1.0))
        if np.any(outside):
            raise CatalogError(f"{source}: {int(outside.sum())} row(s) with ps_score outside 0..1")
    out["ra"] = np.mod(out["ra"], 360.0)
    return out


def as_gaia_table(table: Table, source: str | os.PathLike = "table") -> Table:
    """:func:`as_catalog_table` for the Gaia kind (the Gaia archive's column names)."""
    return as_catalog_table(table, GAIA, source)


def empty_catalog_table(kind: CatalogKind | str = GAIA) -> Table:
    """A zero-row table with a kind's columns."""
    kind = catalog_kind(kind)
    return as_catalog_table(Table({name: np.zeros(0, dtype) for name, (dtype, _) in kind.columns.items()}), kind)


def empty_gaia_table() -> Table:
    """A zero-row table with the Gaia store's columns."""
    return empty_catalog_table(GAIA)


def read_gaia_table(path: str | os.PathLike) -> Table:
    """:func:`read_catalog_table` for the Gaia kind."""
    return read_catalog_table(path, GAIA)


def read_catalog_table(path: str | os.PathLike, kind: CatalogKind | str = GAIA) -> Table:
    """Read a FITS table in a kind's column names (the first binary table holding ra and dec).

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
    return as_catalog_table(table, kind, path)
