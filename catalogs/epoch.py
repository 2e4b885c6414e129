"""Epoch propagation of Gaia positions and the SCAMP reference catalogue built from them.

SCAMP 2.10 (Debian 12's 2.10.0) does not apply proper motions to a FILE reference
catalogue, so positions are moved to the exposure epoch here.

The motion model is Gaia's for a source without parallax or radial velocity: the direction
moves linearly in space, ``u(t) = normalise(u0 + (t - t0) * (pmra * e + pmdec * n))`` with
``e``, ``n`` the local east and north unit vectors.  This is what ERFA's ``pmsafe`` (behind
``SkyCoord.apply_space_motion``) computes for a very distant source, but in a few vectorised
numpy lines: ``apply_space_motion`` needs a distance we do not store (it warns and
substitutes one), and goes through a full coordinate frame for what is a rotation-free
vector sum.  Over 10 years the two agree to a few microarcseconds (see the tests).
Parallax and perspective acceleration are neglected: below 1 mas for all but a handful of
nearby stars, under the 45-85 mas ZTF reaches.

Errors: ``sigma(t)^2 = sigma0^2 + (sigma_pm * dt)^2`` per axis (correlations are not stored).
Two-parameter sources (no proper motion) keep their position and get an assumed
proper-motion dispersion instead of ``sigma_pm``; so do sources whose proper-motion error
is unknown (a catalogue without error columns), which are still moved by their motion.

Which stars SCAMP may use.  SCAMP applies its ``FLAGS_MASK`` to a ``FILE`` reference
catalogue exactly as to the detections (a row with ``FLAGS & FLAGS_MASK`` is not loaded),
and doubles the position error of any row whose ``FLAGS`` is not zero.  So the reference
table's ``FLAGS`` is 0 for every row: what a catalogue lacks (proper motion, its error, a
G magnitude) changes only the error model, recorded in the ``MODEL`` column (bits
``MODEL_*``, which SCAMP does not read).  The only rows left out are those SCAMP cannot
weigh: a position error that is not a positive finite number after propagation (a null
``ra_error``/``dec_error``); they are not written at all (a flag would depend on the
configured mask), and :func:`scamp_reference_table` counts them in its ``NLEFTOUT`` meta.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import astropy.units as u
from astropy.table import Table
from astropy.time import Time

from pipeline.formats.ldac import write_ldac

from catalogs.schema import CatalogError, as_gaia_table
from catalogs.sky import east_north, radec_to_xyz, xyz_to_radec

__all__ = [
    "DEFAULT_PM_DISPERSION_MAS_YR", "NOMINAL_MAGERR", "MODEL_NO_PROPER_MOTION",
    "MODEL_NO_PM_ERROR", "MODEL_NO_MAGNITUDE", "NO_USABLE_REFERENCE",
    "epoch_jyear", "propagate_to_epoch", "scamp_reference_table", "write_scamp_reference",
]

#: Assumed proper-motion dispersion per axis for sources without a measured one (mas/yr):
#: the spread of field-star motions at G ~ 19-21, where two-parameter sources are.
DEFAULT_PM_DISPERSION_MAS_YR = 5.0
#: MAGERR written for every reference star: the archive columns carry no G error.  SCAMP
#: uses MAGERR only for a photometric solution, which the pipeline does not ask of it.
NOMINAL_MAGERR = 0.01
#: ``MODEL`` bits of the SCAMP reference table: how each row's position and error were
#: modelled (informative; SCAMP does not read this column, and ``FLAGS`` stays 0).
MODEL_NO_PROPER_MOTION = 1      # a two-parameter source: kept in place, assumed motion dispersion
MODEL_NO_PM_ERROR = 2           # moved by its motion, error from the assumed dispersion
MODEL_NO_MAGNITUDE = 4          # no G: MAG 99 (SCAMP's convention), ranked faintest
#: The start of the reason given when a catalogue has rows around the footprint but none
#: SCAMP could use.
NO_USABLE_REFERENCE = "no usable reference star"

_MAS_TO_RAD = np.radians(1.0 / 3.6e6)


def epoch_jyear(epoch: Time) -> float:
    """Julian year of a time in TCB, the scale of Gaia's ``ref_epoch`` (J2016.0 TCB)."""
    return float(Time(epoch).tcb.jyear)


def propagate_to_epoch(table: Table, epoch: Time,
                       pm_dispersion_mas_yr: float = DEFAULT_PM_DISPERSION_MAS_YR) -> Table:
    """Move Gaia positions to ``epoch`` and inflate their errors.

    Parameters
    ----------
    table : Table
        Gaia columns (:data:`catalogs.schema.GAIA_COLUMNS`); ``pmra``/``pmdec`` NaN for
        two-parameter sources.
    epoch : Time
        The target epoch (e.g. the exposure's mid-time).
    pm_dispersion_mas_yr : float
        Proper-motion dispersion per axis assumed where no measured error exists.

    Returns
    -------
    Table
        A copy with ``ra``, ``dec``, ``ra_error``, ``dec_error`` at ``epoch`` and
        ``ref_epoch`` set to it (so a second call to the same epoch changes nothing).

    Raises
    ------
    CatalogError
        Missing columns or a non-finite ``ref_epoch``.
    """
    out = as_gaia_table(table, "propagation input")
    target = epoch_jyear(epoch)
    dt = target - np.asarray(out["ref_epoch"], dtype=float)
    if not np.all(np.isfinite(dt)):
        raise CatalogError(f"propagation input: {int((~np.isfinite(dt)).sum())} row(s) without ref_epoch")
    ra, dec = np.asarray(out["ra"]), np.asarray(out["dec"])
    pmra, pmdec = np.asarray(out["pmra"]), np.asarray(out["pmdec"])
    moving = np.isfinite(pmra) & np.isfinite(pmdec)
    east, north = east_north(ra, dec)
    step = np.where(moving, dt, 0.0)[:, None] * _MAS_TO_RAD * (
        np.nan_to_num(pmra)[:, None] * east + np.nan_to_num(pmdec)[:, None] * north)
    new_ra, new_dec = xyz_to_radec(radec_to_xyz(ra, dec) + step)
    # the vector round trip costs an ulp: sources without motion keep their exact values
    new_ra, new_dec = np.where(moving, new_ra, ra), np.where(moving, new_dec, dec)

    def inflated(sigma0, sigma_pm):
        sigma_pm = np.asarray(sigma_pm, dtype=float)
        known = moving & np.isfinite(sigma_pm)
        rate = np.where(known, sigma_pm, pm_dispersion_mas_yr)
        return np.hypot(np.asarray(sigma0, dtype=float), rate * dt)

    out["ra"] = new_ra * u.deg
    out["dec"] = new_dec * u.deg
    out["ra_error"] = (inflated(out["ra_error"], out["pmra_error"]) * u.mas).astype(np.float32)
    out["dec_error"] = (inflated(out["dec_error"], out["pmdec_error"]) * u.mas).astype(np.float32)
    out["ref_epoch"] = np.full(len(out), target) * u.yr
    out.meta["EPOCH"] = target
    return out


def scamp_reference_table(table: Table, epoch: Time,
                          pm_dispersion_mas_yr: float = DEFAULT_PM_DISPERSION_MAS_YR) -> Table:
    """The SCAMP reference catalogue (``ASTREF_CATALOG FILE``) of Gaia sources at ``epoch``.

    Columns: ``X_WORLD``, ``Y_WORLD`` (deg, f8); ``ERRA_WORLD``, ``ERRB_WORLD`` (deg, f4) --
    SCAMP reads these two into its per-axis errors (along RA*cos(dec) and Dec; its own
    catalogue loaders project error ellipses onto those axes), so they carry ``ra_error``
    and ``dec_error``; ``MAG`` (Gaia G, 99 when missing, SCAMP's convention), ``MAGERR``
    (:data:`NOMINAL_MAGERR`), ``OBSDATE`` (the epoch as a decimal Julian year, f8),
    ``FLAGS`` (int16, always 0: see the module docstring) and ``MODEL`` (int16, bits
    ``MODEL_*``).  Positions are propagated with :func:`propagate_to_epoch`.

    Rows SCAMP cannot weigh (no positive finite position error) are left out; their number
    is ``meta["NLEFTOUT"]`` and ``meta["NINPUT"]`` the number of input rows.  Any
    optional column (``pmra_error``, ``pmdec_error``) or missing value (proper motion, G)
    changes only the errors, never which rows are kept.
    """
    moved = propagate_to_epoch(table, epoch, pm_dispersion_mas_yr)
    g_mag = np.asarray(moved["phot_g_mean_mag"], dtype=np.float32)
    no_pm = ~(np.isfinite(moved["pmra"]) & np.isfinite(moved["pmdec"]))
    no_pm_error = ~no_pm & ~(np.isfinite(moved["pmra_error"]) & np.isfinite(moved["pmdec_error"]))
    model = (MODEL_NO_PROPER_MOTION * no_pm + MODEL_NO_PM_ERROR * no_pm_error
             + MODEL_NO_MAGNITUDE * ~np.isfinite(g_mag)).astype(np.int16)
    mas_to_deg = 1.0 / 3.6e6
    err_ra = np.asarray(moved["ra_error"], dtype=np.float64)
    err_dec = np.asarray(moved["dec_error"], dtype=np.float64)
    usable = np.isfinite(err_ra) & np.isfinite(err_dec) & (err_ra > 0) & (err_dec > 0)
    ref = Table()
    ref["X_WORLD"] = np.asarray(moved["ra"], dtype=np.float64)[usable] * u.deg
    ref["Y_WORLD"] = np.asarray(moved["dec"], dtype=np.float64)[usable] * u.deg
    ref["ERRA_WORLD"] = (err_ra[usable] * mas_to_deg).astype(np.float32) * u.deg
    ref["ERRB_WORLD"] = (err_dec[usable] * mas_to_deg).astype(np.float32) * u.deg
    ref["MAG"] = np.where(np.isfinite(g_mag), g_mag, np.float32(99.0))[usable] * u.mag
    ref["MAGERR"] = np.full(len(ref), NOMINAL_MAGERR, dtype=np.float32) * u.mag
    ref["OBSDATE"] = np.full(len(ref), moved.meta["EPOCH"]) * u.yr
    ref["FLAGS"] = np.zeros(len(ref), dtype=np.int16)
    ref["MODEL"] = model[usable]
    ref.meta["NINPUT"] = len(moved)
    ref.meta["NLEFTOUT"] = int((~usable).sum())
    return ref


def write_scamp_reference(path: str | os.PathLike, table: Table) -> Path:
    """Write a SCAMP reference table as LDAC (``LDAC_OBJECTS`` only), atomically.

    Raises
    ------
    CatalogError
        The table lacks a SCAMP column or has no rows: SCAMP 2.10 spins at 100 % CPU until
        killed on a reference catalogue without stars in the field.
    """
    needed = ("X_WORLD", "Y_WORLD", "ERRA_WORLD", "ERRB_WORLD", "MAG")
    missing = [name for name in needed if name not in table.colnames]
    if missing:
        raise CatalogError(f"{path}: SCAMP reference table lacks {', '.join(missing)}")
    if len(table) == 0:
        raise CatalogError(f"{path}: no reference stars to write (SCAMP would hang on an empty catalogue)")
    return write_ldac(path, table)
