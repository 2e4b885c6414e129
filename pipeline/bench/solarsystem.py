"""``skydiff bench solarsystem``: the per-night preparation for an MPC-sized catalogue of orbits
and the per-quadrant lookup plus association.

A synthetic MPCORB file of realistic orbits (:func:`pipeline.simulate.asteroids.synthetic_orbits`,
1.4 million by default, as many as the MPC's numbered and unnumbered minor planets) is
written by the simulator, ingested into an orbit store and prepared for one night (timed:
target 10 minutes on one core); then quadrant footprints near opposition on the ecliptic,
where known objects are densest, are looked up at exposure times through the night and
associated with a quadrant's worth of candidates (timed: target 0.15 s each).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.table import Table

from pipeline.core.config import Config

__all__ = ["bench_solar_system"]

NIGHT = "2026-03-15"
QUADRANT_RADIUS_DEG = 0.62      # centre to corner of a 3072 x 3080 quadrant at 1.01"/px


def bench_solar_system(cfg: Config, n_orbits: int = 1_400_000, n_quadrants: int = 20,
                       workdir: str | None = None) -> dict:
    """Figures (seconds, counts) of ingest, preparation and per-quadrant lookup."""
    from pipeline.context.solar_system import associate_solar_system
    from pipeline.simulate.asteroids import synthetic_orbits
    from solarsystem.mpcorb import write_mpcorb
    from solarsystem.night import night_midpoint_mjd, night_path, objects_on_footprint, prepare_night
    from solarsystem.orbits import observer_barycentric, sun_barycentric, tt_jd_of_mjd_utc
    from solarsystem.store import ingest_mpcorb, orbit_store_path

    with tempfile.TemporaryDirectory(prefix="skydiff-bench-ss-", dir=workdir) as tmp:
        root = Path(tmp)
        mid_mjd = night_midpoint_mjd(NIGHT, cfg.site)
        epoch = np.floor(float(tt_jd_of_mjd_utc(mid_mjd)) - 0.5) + 0.5 - 60.0
        rng = np.random.default_rng(20260315)
        t = time.perf_counter()
        write_mpcorb(synthetic_orbits(rng, n_orbits, epoch), root / "MPCORB.DAT.gz")
        figures: dict = {"n_orbits": n_orbits, "write_mpcorb_s": round(time.perf_counter() - t, 1)}
        t = time.perf_counter()
        ingest_mpcorb(root / "MPCORB.DAT.gz", root)
        figures["ingest_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        summary = prepare_night(orbit_store_path(root), NIGHT, cfg.site, cfg.solar_system, night_path(root, NIGHT))
        figures["prepare_s"] = round(time.perf_counter() - t, 1)
        figures.update({f"prepare_{k}_s": v for k, v in summary["timings_s"].items() if k != "total"})
        figures["n_fast_movers"] = summary["n_fast"]
        figures["night_file_megabytes"] = round(night_path(root, NIGHT).stat().st_size / 1e6, 1)

        # Quadrants near opposition, on the ecliptic: the densest sky for known objects.
        tt_mid = float(tt_jd_of_mjd_utc(mid_mjd))
        earth, _ = observer_barycentric(tt_mid)
        anti_sun = earth - sun_barycentric(tt_mid)
        anti_sun /= np.linalg.norm(anti_sun)
        ra0, dec0 = np.degrees(np.arctan2(anti_sun[1], anti_sun[0])) % 360, np.degrees(np.arcsin(anti_sun[2]))
        seconds, counts, matched = [], [], 0
        for k in range(n_quadrants):
            ra = ra0 + rng.uniform(-8, 8)
            dec = dec0 + rng.uniform(-4, 4) + 0.4 * (ra - ra0)
            mjd = mid_mjd + rng.uniform(-0.25, 0.25)
            candidates = Table({"ra": ra + rng.uniform(-0.43, 0.43, 300) / np.cos(np.radians(dec)),
                                "dec": dec + rng.uniform(-0.43, 0.43, 300)})
            t = time.perf_counter()
            known = objects_on_footprint(night_path(root, NIGHT), ra, dec, QUADRANT_RADIUS_DEG, mjd, cfg.site,
                                         cfg.solar_system)
            if len(known):   # half of the candidates on known objects, as on a real night
                pick = rng.integers(0, len(known), min(len(known), 150))
                candidates["ra"][:pick.size] = known["ra"][pick]
                candidates["dec"][:pick.size] = known["dec"][pick]
            associate_solar_system(candidates, known, cfg.solar_system)
            seconds.append(time.perf_counter() - t)
            counts.append(len(known))
            matched += int(np.sum(candidates["ssdistnr"] >= 0))
        figures.update({"quadrant_first_s": round(seconds[0], 3),
                        "quadrant_median_s": round(float(np.median(seconds)), 3),
                        "quadrant_max_s": round(float(np.max(seconds)), 3),
                        "known_per_quadrant_median": int(np.median(counts)),
                        "known_per_quadrant_max": int(np.max(counts)), "candidates_matched": matched})
    return figures
