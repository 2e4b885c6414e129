"""Sky-position checks shared by the tests of the object history (SQLite, PostgreSQL, Slurm)."""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from alerts.history import MATCH_RADIUS_ARCSEC
from catalogs.sky import radec_to_xyz


def close_pairs(ra, dec, radius_arcsec: float = MATCH_RADIUS_ARCSEC) -> set[tuple[int, int]]:
    """Index pairs of positions (degrees) closer than ``radius_arcsec`` on the sky (by default
    the history's match radius: objects so close should have been one)."""
    chord = 2.0 * np.sin(np.radians(radius_arcsec / 3600.0) / 2.0)
    return cKDTree(radec_to_xyz(ra, dec).reshape(-1, 3)).query_pairs(chord)
