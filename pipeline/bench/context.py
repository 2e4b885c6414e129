"""Per-quadrant cost of the catalogue context: reading the PS1-like tiles over a quadrant's
footprint and finding every candidate's PS1 and Gaia neighbours
(:func:`pipeline.context.catalogs.catalog_context`).

Two skies: the simulator's default density (its stars plus galaxies per square degree) and
a dense one at the mean density of the real PS1 DR2 mean-object table (~3 x 10^9 objects
over 3 pi sr, ~10^5 per square degree), with Gaia at 15 times the default too.  The
catalogues are uniform random rows (the cost depends on the row count, not on what the
rows are), written through the real prefetch into a temporary store.  "cold" reads the
tiles from disk (the process tile cache emptied first, as for a worker's first quadrant of
a field); "warm" is a later quadrant of the same field in the same worker.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS

from pipeline.core.config import Config

__all__ = ["bench_context", "DENSE_PS1_PER_DEG2"]

#: Mean PS1 DR2 mean-object density (3 x 10^9 objects over the 3 pi steradian survey).
DENSE_PS1_PER_DEG2 = 100_000.0
_CENTRE = (150.0, 33.0)


def _quadrant_wcs(cfg: Config) -> tuple[WCS, tuple[int, int]]:
    inst = cfg.instrument
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = list(_CENTRE)
    wcs.wcs.crpix = [(inst.quadrant_nx + 1) / 2, (inst.quadrant_ny + 1) / 2]
    scale = inst.pixel_scale_arcsec / 3600.0
    wcs.wcs.cd = [[-scale, 0.0], [0.0, scale]]
    return wcs, (inst.quadrant_ny, inst.quadrant_nx)


def _uniform_cap(rng, radius_deg: float, density_per_deg2: float) -> tuple[np.ndarray, np.ndarray]:
    from pipeline.simulate.sky import _offset_positions
    area = 2 * np.pi * (1 - np.cos(np.radians(radius_deg))) * (180 / np.pi) ** 2
    n = int(density_per_deg2 * area)
    rho = np.degrees(np.arccos(1 - rng.random(n) * (1 - np.cos(np.radians(radius_deg)))))
    return _offset_positions(_CENTRE[0], _CENTRE[1], rho, rng.uniform(0, 360, n))


def _one_sky(cfg: Config, store: Path, ps1_density: float, gaia_density: float, n_candidates: int,
             repeats: int, rng) -> dict:
    from catalogs import PS1, catalog_for_footprint, cone_region, prefetch_from_table
    from catalogs import store as tile_store
    from pipeline.context.catalogs import catalog_context
    from pipeline.core.image import footprint_corners

    radius = 0.9      # covers the quadrant (0.61 deg to a corner) and its tiles' neighbours
    ra, dec = _uniform_cap(rng, radius, ps1_density)
    r = rng.uniform(14.0, 23.0, ra.size)
    ps1 = Table({"objid": np.arange(ra.size, dtype=np.int64) + 10 ** 17, "ra": ra, "dec": dec,
                 "gmag": r + 0.5, "rmag": r, "imag": r - 0.2, "zmag": r - 0.3, "ps_score": rng.random(ra.size)})
    prefetch_from_table(ps1, store, cone_region(*_CENTRE, radius), kind=PS1)
    g_ra, g_dec = _uniform_cap(rng, radius, gaia_density)
    gaia = Table({"ra": g_ra, "dec": g_dec, "phot_g_mean_mag": rng.uniform(9.0, 21.0, g_ra.size)})
    wcs, shape = _quadrant_wcs(cfg)
    corners = footprint_corners(wcs, shape)
    x, y = rng.uniform(1, shape[1], n_candidates), rng.uniform(1, shape[0], n_candidates)
    cand_ra, cand_dec = wcs.all_pix2world(x, y, 1)
    margin = cfg.context.ps1_radius_arcsec / 3600.0

    cold, warm, match, rows = [], [], [], 0
    for _ in range(repeats):
        tile_store._TILE_CACHE.clear()
        t0 = time.perf_counter()
        rows_read = catalog_for_footprint(store, corners, margin, kind=PS1)
        cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        catalog_for_footprint(store, corners, margin, kind=PS1)
        warm.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        catalog_context(cand_ra, cand_dec, rows_read, gaia, cfg.context)
        match.append(time.perf_counter() - t0)
        rows = len(rows_read)
    return {"ps1_rows": rows, "gaia_rows": len(gaia), "candidates": n_candidates,
            "read_cold_s": float(np.median(cold)), "read_warm_s": float(np.median(warm)),
            "match_s": float(np.median(match)),
            "total_cold_s": float(np.median(cold) + np.median(match)),
            "total_warm_s": float(np.median(warm) + np.median(match))}


def bench_context(cfg: Config, n_candidates: int = 500, repeats: int = 3, seed: int = 13) -> dict:
    """Per-quadrant context cost at the default and a dense sky.

    Returns
    -------
    dict
        ``{"default": {...}, "dense": {...}}`` with rows read, ``read_cold_s``,
        ``read_warm_s``, ``match_s`` and the totals (seconds, medians over ``repeats``).
    """
    rng = np.random.default_rng(seed)
    sim = cfg.simulation
    skies = {"default": (sim.star_density_per_deg2 + sim.galaxy_density_per_deg2, sim.star_density_per_deg2),
             "dense": (DENSE_PS1_PER_DEG2, 15 * sim.star_density_per_deg2)}
    report = {}
    with tempfile.TemporaryDirectory(prefix="skydiff-bench-context-") as tmp:
        for label, (ps1_density, gaia_density) in skies.items():
            report[label] = _one_sky(cfg, Path(tmp) / label, ps1_density, gaia_density, n_candidates,
                                     repeats, rng)
    return report
