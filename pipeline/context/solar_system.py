"""Solar-system context of the candidates: ZTF's ``ssdistnr``, ``ssmagnr`` and ``ssnamenr``.

Pure: the candidates and the known objects' predicted positions at the exposure's mid-time
(:class:`solarsystem.night.KnownObjectsLookup`, the night's ephemeris) in, the candidates
with the three columns out.  ZTF's convention where no known object is within the search
radius: ``ssdistnr = ssmagnr = -999``, ``ssnamenr = "null"``.
"""
from __future__ import annotations

import numpy as np
from astropy.table import Table

from pipeline.core.config import SolarSystemConfig

__all__ = ["SolarSystemConfig", "associate_solar_system", "NO_DISTANCE", "NO_NAME"]

NO_DISTANCE = -999.0
NO_NAME = "null"


def _unit(ra, dec) -> np.ndarray:
    ra, dec = np.radians(np.asarray(ra, float)), np.radians(np.asarray(dec, float))
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def associate_solar_system(candidates: Table, known: Table, config: SolarSystemConfig) -> Table:
    """Add ``ssdistnr`` (arcsec), ``ssmagnr`` (predicted V) and ``ssnamenr`` to ``candidates``
    (in place, also returned): the nearest known object within ``config.search_radius_arcsec``.

    Parameters
    ----------
    candidates : Table
        With ``ra`` and ``dec`` (deg).
    known : Table
        The known objects on the footprint: ``ssnamenr``, ``ra``, ``dec`` (astrometric, deg)
        and ``vmag``.
    config : SolarSystemConfig
    """
    n = len(candidates)
    distance = np.full(n, NO_DISTANCE)
    vmag = np.full(n, NO_DISTANCE)
    names = np.full(n, NO_NAME, dtype=object)
    if n and len(known):
        c = _unit(candidates["ra"], candidates["dec"])
        k = _unit(known["ra"], known["dec"])
        # A few hundred candidates against tens of objects: the full matrix of separations.
        cross = np.linalg.norm(np.cross(c[:, None, :], k[None, :, :]), axis=-1)
        separation = np.degrees(np.arctan2(cross, c @ k.T)) * 3600.0
        nearest = np.argmin(separation, axis=1)
        best = separation[np.arange(n), nearest]
        hit = best <= config.search_radius_arcsec
        distance[hit] = best[hit]
        predicted = np.asarray(known["vmag"], float)[nearest[hit]]
        # An object without H in MPCORB has no predicted magnitude: ZTF's "none" value.
        vmag[hit] = np.where(np.isfinite(predicted), predicted, NO_DISTANCE)
        names[hit] = np.asarray(known["ssnamenr"]).astype(str)[nearest[hit]]
    candidates["ssdistnr"] = distance
    candidates["ssdistnr"].unit = "arcsec"
    candidates["ssmagnr"] = vmag
    candidates["ssmagnr"].unit = "mag"
    candidates["ssnamenr"] = names.astype(str)
    return candidates
