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


#: GM of the perturbing planets (system barycentres), au^3/day^2 (DE421's values).
_PLANET_GM = {"venus barycenter": 7.243452486e-10, "earth barycenter": 8.997011390e-10,
              "mars barycenter": 9.549535105e-11, "jupiter barycenter": 2.825345909e-07,
              "saturn barycenter": 8.459715185e-08, "uranus barycenter": 1.292024916e-08,
              "neptune barycenter": 1.524358900e-08}


def bench_two_body_drift(cfg: Config, days=(30, 100, 365)) -> dict:
    """How far the pipeline's two-body positions drift from a perturbed (N-body) integration.

    Sample orbits (inner, middle and outer main belt, a Hilda, a near-Earth object) start from
    the same state; the perturbed path integrates the Sun plus the seven planets of DE421
    (positions from skyfield, scipy's DOP853 at a 1e-12 relative tolerance); the difference
    at each time since the epoch is seen from the Earth (arcsec).
    """
    from scipy.integrate import solve_ivp
    from solarsystem.mpcorb import OrbitElements
    from solarsystem.orbits import (GM_SUN_AU3_D2, elements_to_states, ephemeris, observer_barycentric,
                                    propagate_states, timescale)
    eph, ts = ephemeris(), timescale()
    planets = [(eph[name], gm) for name, gm in _PLANET_GM.items()]
    sun = eph["sun"]
    epoch = 2461104.5
    samples = {"inner MBA": (2.25, 0.15, 5.0), "middle MBA": (2.75, 0.10, 10.0), "outer MBA": (3.15, 0.08, 12.0),
               "Hilda": (3.97, 0.18, 8.0), "NEO": (1.6, 0.45, 15.0)}
    n = len(samples)
    elements = OrbitElements(designation=np.array(list(samples)), H=np.full(n, 15.0), G=np.full(n, 0.15),
                             epoch_jd=np.full(n, epoch), mean_anomaly_deg=np.linspace(20, 300, n),
                             peri_deg=np.linspace(40, 330, n), node_deg=np.linspace(10, 250, n),
                             incl_deg=np.array([v[2] for v in samples.values()]),
                             e=np.array([v[1] for v in samples.values()]), a_au=np.array([v[0] for v in samples.values()]))
    pos0, vel0 = elements_to_states(elements)

    def rhs(t, y):
        r = y[:3]
        acc = -GM_SUN_AU3_D2 * r / np.linalg.norm(r) ** 3
        when = ts.tt_jd(t)
        sun_at = sun.at(when).position.au
        for body, gm in planets:
            s = body.at(when).position.au - sun_at
            d = s - r
            acc += gm * (d / np.linalg.norm(d) ** 3 - s / np.linalg.norm(s) ** 3)
        return np.concatenate([y[3:], acc])

    figures: dict = {}
    t_end = epoch + max(days)
    for k, name in enumerate(samples):
        solution = solve_ivp(rhs, (epoch, t_end), np.concatenate([pos0[:, k], vel0[:, k]]), method="DOP853",
                             rtol=1e-12, atol=1e-15, t_eval=[epoch + d for d in days])
        for d, perturbed in zip(days, solution.y[:3].T):
            two_body, _ = propagate_states(pos0[:, k:k + 1], vel0[:, k:k + 1], epoch, epoch + d)
            earth, _ = observer_barycentric(epoch + d)
            geo = sun.at(ts.tt_jd(epoch + d)).position.au + perturbed - earth
            shift = np.linalg.norm(np.cross(two_body[:, 0] - perturbed, geo / np.linalg.norm(geo)))
            figures[f"{name.replace(' ', '_')}_{d}d_arcsec"] = round(float(np.degrees(shift / np.linalg.norm(geo)) * 3600), 1)
    return figures
