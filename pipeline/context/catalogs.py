"""Catalogue context of candidates: the PS1-like and Gaia neighbours ZTF puts in a packet.

For each candidate, in the manner of ZTF's alert schema (v4.02):

- ``objectidps1..3``, ``sgmag1..3``, ``srmag1..3``, ``simag1..3``, ``szmag1..3``,
  ``sgscore1..3``, ``distpsnr1..3``: the three nearest PS1 sources within
  ``ps1_radius_arcsec`` (30"), nearest first; ``nmtchps``: how many PS1 sources lie
  within that radius.
- ``neargaia``, ``maggaia``: distance and G magnitude of the nearest Gaia source within
  ``gaia_radius_arcsec`` (90"); ``neargaiabright``, ``maggaiabright``: the same for the
  nearest source brighter than ``gaia_bright_mag`` (G < 14).

Conventions (ZTF's, as in real packets): an empty slot is -999 in every column of the
slot (``objectidps`` included); a source without a star/galaxy score has ``sgscore``
0.5; a source without a magnitude in a band has -999 in that band.  The catalogues must
cover the candidates (the caller loads them for the footprint): -999 means "searched,
nothing there".

Neighbours are found with :class:`scipy.spatial.cKDTree` on unit vectors (chord
distances, exact on the sphere).  Building a tree over a whole quadrant's catalogue costs
more than the queries, so only the rows in the grid cells around the candidates go into
it (:func:`_rows_near`).
"""
from __future__ import annotations

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

from catalogs.sky import radec_to_xyz
from pipeline.core.config import ContextConfig

__all__ = ["catalog_context", "add_catalog_context", "CONTEXT_COLUMNS", "PS1_SLOTS", "NONE"]

#: ZTF's value for "nothing within the search radius".
NONE = -999
#: PS1 neighbours reported per candidate.
PS1_SLOTS = 3
#: The score ZTF writes for a PS1 source without a star/galaxy classification.
_UNSCORED = 0.5
# stored PS1 column -> packet field prefix
_PS1_BANDS = {"gmag": "sgmag", "rmag": "srmag", "imag": "simag", "zmag": "szmag"}

#: Every column :func:`catalog_context` returns, with its dtype.
CONTEXT_COLUMNS: dict[str, type] = {
    **{f"objectidps{k}": np.int64 for k in range(1, PS1_SLOTS + 1)},
    **{f"{prefix}{k}": np.float32 for prefix in _PS1_BANDS.values() for k in range(1, PS1_SLOTS + 1)},
    **{f"sgscore{k}": np.float32 for k in range(1, PS1_SLOTS + 1)},
    **{f"distpsnr{k}": np.float32 for k in range(1, PS1_SLOTS + 1)},
    "nmtchps": np.int32,
    "neargaia": np.float32, "maggaia": np.float32,
    "neargaiabright": np.float32, "maggaiabright": np.float32,
}


def _chord(radius_arcsec: float) -> float:
    """Chord length on the unit sphere of an angle."""
    return 2.0 * np.sin(np.radians(radius_arcsec / 3600.0) / 2.0)


def _arcsec(chord: np.ndarray) -> np.ndarray:
    return np.degrees(2.0 * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0))) * 3600.0


def _rows_near(catalog_xyz: np.ndarray, xyz: np.ndarray, radius_arcsec: float) -> np.ndarray:
    """Indices of the catalogue rows that may lie within the radius of a candidate.

    Unit vectors are binned in a cubic grid of cells one chord-radius wide; a row within
    the radius of a candidate lies in one of the 27 cells around the candidate's.  A
    vectorised hash join (``np.isin`` on cell keys) is used because no library offers
    "rows near any of these points" cheaper than building a k-d tree over all rows,
    which is the cost avoided here.
    """
    cell = _chord(radius_arcsec)
    span = int(np.ceil(2.0 / cell)) + 4
    if span ** 3 >= 2 ** 62 or len(xyz) == 0:       # radius too small for int64 keys: no filter
        return np.arange(len(catalog_xyz)) if len(xyz) else np.zeros(0, dtype=np.int64)

    def keys(cells: np.ndarray) -> np.ndarray:
        cells = cells + (span // 2)
        return (cells[..., 0] * span + cells[..., 1]) * span + cells[..., 2]

    own = np.floor(xyz / cell).astype(np.int64)
    steps = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    wanted = np.unique(keys(own[:, None, :] + steps[None, :, :]).ravel())
    return np.flatnonzero(np.isin(keys(np.floor(catalog_xyz / cell).astype(np.int64)), wanted))


def _nearest(tree_xyz: np.ndarray, xyz: np.ndarray, k: int, radius_arcsec: float):
    """Indices (n, k) of the ``k`` nearest rows within the radius (-1 for none) and their
    distances in arcsec."""
    n = len(xyz)
    index = np.full((n, k), -1, dtype=np.int64)
    distance = np.full((n, k), np.nan)
    if len(tree_xyz) == 0 or n == 0:
        return index, distance
    near = _rows_near(tree_xyz, xyz, radius_arcsec)
    if len(near) == 0:
        return index, distance
    k_tree = min(k, len(near))
    chord, found = cKDTree(tree_xyz[near]).query(xyz, k=k_tree, distance_upper_bound=_chord(radius_arcsec))
    chord, found = chord.reshape(n, k_tree), found.reshape(n, k_tree)
    hit = np.isfinite(chord)           # a missing neighbour comes back as inf, index len(tree)
    index[:, :k_tree] = np.where(hit, near[np.minimum(found, len(near) - 1)], -1)
    distance[:, :k_tree] = np.where(hit, _arcsec(np.where(hit, chord, 0.0)), np.nan)
    return index, distance


def _column(values, dtype) -> np.ndarray:
    return np.asarray(values).astype(dtype)


def catalog_context(ra_deg, dec_deg, ps1: Table, gaia: Table, config: ContextConfig = ContextConfig()) -> Table:
    """The PS1 and Gaia context columns of candidates at (ra, dec).

    Parameters
    ----------
    ra_deg, dec_deg : array-like (n,)
        Candidate positions, degrees (ICRS).
    ps1 : Table
        The PS1-like catalogue around the candidates (:data:`catalogs.schema.PS1_COLUMNS`:
        objid, ra, dec, gmag, rmag, imag, zmag, ps_score; NaN for missing values), covering
        every candidate to ``config.ps1_radius_arcsec``.
    gaia : Table
        Gaia sources around the candidates (``ra``, ``dec``, ``phot_g_mean_mag``, at the
        image's epoch), covering them to ``config.gaia_radius_arcsec``.
    config : ContextConfig
        The radii and the bright limit.

    Returns
    -------
    Table
        One row per candidate, the columns of :data:`CONTEXT_COLUMNS` in that order, with
        ZTF's conventions for empty slots (see the module docstring).
    """
    xyz = radec_to_xyz(np.asarray(ra_deg, dtype=float), np.asarray(dec_deg, dtype=float)).reshape(-1, 3)
    n = len(xyz)
    out: dict[str, np.ndarray] = {}

    ps1_xyz = radec_to_xyz(np.asarray(ps1["ra"], dtype=float), np.asarray(ps1["dec"], dtype=float)).reshape(-1, 3)
    index, distance = _nearest(ps1_xyz, xyz, PS1_SLOTS, config.ps1_radius_arcsec)
    empty = index < 0
    safe = np.where(empty, 0, index)
    objid = np.asarray(ps1["objid"], dtype=np.int64)
    score = np.asarray(ps1["ps_score"], dtype=float)
    for k in range(PS1_SLOTS):
        slot_empty, rows = empty[:, k], safe[:, k]
        if len(ps1):
            out[f"objectidps{k + 1}"] = np.where(slot_empty, NONE, objid[rows])
        else:
            out[f"objectidps{k + 1}"] = np.full(n, NONE, dtype=np.int64)
    for column, prefix in _PS1_BANDS.items():
        mags = np.asarray(ps1[column], dtype=float)
        for k in range(PS1_SLOTS):
            value = mags[safe[:, k]] if len(ps1) else np.full(n, np.nan)
            out[f"{prefix}{k + 1}"] = np.where(empty[:, k] | ~np.isfinite(value), NONE, value)
    for k in range(PS1_SLOTS):
        value = score[safe[:, k]] if len(ps1) else np.full(n, np.nan)
        out[f"sgscore{k + 1}"] = np.where(empty[:, k], NONE, np.where(np.isfinite(value), value, _UNSCORED))
    for k in range(PS1_SLOTS):
        out[f"distpsnr{k + 1}"] = np.where(empty[:, k], NONE, distance[:, k])
    near = _rows_near(ps1_xyz, xyz, config.ps1_radius_arcsec)
    if len(near):
        out["nmtchps"] = cKDTree(ps1_xyz[near]).query_ball_point(xyz, _chord(config.ps1_radius_arcsec),
                                                                 return_length=True)
    else:
        out["nmtchps"] = np.zeros(n, dtype=np.int32)

    gaia_xyz = radec_to_xyz(np.asarray(gaia["ra"], dtype=float), np.asarray(gaia["dec"], dtype=float)).reshape(-1, 3)
    gmag = np.asarray(gaia["phot_g_mean_mag"], dtype=float)
    bright = np.flatnonzero(gmag < config.gaia_bright_mag)
    for suffix, rows in (("", np.arange(len(gaia))), ("bright", bright)):
        index, distance = _nearest(gaia_xyz[rows], xyz, 1, config.gaia_radius_arcsec)
        found = index[:, 0] >= 0
        mag = gmag[rows][np.where(found, index[:, 0], 0)] if len(rows) else np.full(n, np.nan)
        out[f"neargaia{suffix}"] = np.where(found, distance[:, 0], NONE)
        out[f"maggaia{suffix}"] = np.where(found & np.isfinite(mag), mag, NONE)

    return Table({name: _column(out[name], dtype) for name, dtype in CONTEXT_COLUMNS.items()})


def add_catalog_context(candidates: Table, ps1: Table, gaia: Table, config: ContextConfig = ContextConfig()) -> None:
    """Add the :func:`catalog_context` columns of ``candidates`` (``ra``, ``dec``) to it in place."""
    context = catalog_context(candidates["ra"], candidates["dec"], ps1, gaia, config)
    for name in context.colnames:
        candidates[name] = context[name]
