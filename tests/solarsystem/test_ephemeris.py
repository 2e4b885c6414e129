"""The pipeline's ephemerides (skyfield + DE421, two-body) against the simulator's independent
truth (its own Kepler solution, astropy's ERFA ephemeris and observer), through the orbit
store, the night file and the per-quadrant lookup."""
from __future__ import annotations

import numpy as np
from astropy.coordinates import angular_separation
import pytest
from astropy.table import Table

from pipeline.core.exits import BadInputError
from pipeline.simulate.asteroids import asteroid_elements, asteroid_positions, make_asteroids
from pipeline.simulate.plan import night_midpoint
from solarsystem.mpcorb import write_mpcorb
from solarsystem.night import night_file_for, night_path, objects_on_footprint, prepare_night
from solarsystem.store import ingest_mpcorb, orbit_store_path

NIGHT = "2026-03-15"
FIELD = (600, 150.0, 33.0)


def _separation_arcsec(ra1, dec1, ra2, dec2):
    return np.degrees(angular_separation(*(np.radians(np.asarray(v, float)) for v in (ra1, dec1, ra2, dec2)))) * 3600


@pytest.fixture(scope="module")
def world(tmp_path_factory, cfg):
    root = tmp_path_factory.mktemp("solarsystem")
    mid = night_midpoint(NIGHT, cfg).mjd
    asteroids = make_asteroids(np.random.default_rng(5), [FIELD], [mid], 3.0, 4, (16.5, 20.5), (3.75, 3.65))
    ingest_mpcorb(write_mpcorb(asteroid_elements(asteroids), root / "MPCORB.DAT"), root)
    prepare_night(orbit_store_path(root), NIGHT, cfg.site, cfg.solar_system, night_path(root, NIGHT))
    return root, asteroids, mid


@pytest.mark.parametrize("hours", [-6.0, 0.0, 5.0])
def test_positions_match_the_independent_truth(world, cfg, hours):
    root, asteroids, mid = world
    mjd = mid + hours / 24
    truth = asteroid_positions(asteroids, mjd, cfg.site)
    known = objects_on_footprint(night_path(root, NIGHT), FIELD[1], FIELD[2], 8.0, mjd, cfg.site, cfg.solar_system)
    names = [str(d).replace(" ", "") for d in asteroids["designation"]]
    inside = _separation_arcsec(truth["ra"], truth["dec"], FIELD[1], FIELD[2]) < 8.0 * 3600 - 60
    row = {n: k for k, n in enumerate(known["ssnamenr"])}
    assert all(names[k] in row for k in np.flatnonzero(inside))
    k = np.array([row[names[j]] for j in np.flatnonzero(inside)])
    sep = _separation_arcsec(known["ra"][k], known["dec"][k], truth["ra"][inside], truth["dec"][inside])
    dv = np.abs(known["vmag"][k] - truth["vmag"][inside])
    print(f"\n{hours:+.0f} h: {inside.sum()} objects, max separation {sep.max():.4f}\", max |dV| {dv.max():.2e}")
    assert sep.max() < 0.1 and dv.max() < 1e-3


def test_fast_movers_are_found_the_same_way(world, cfg):
    root, asteroids, mid = world
    fast = cfg.solar_system.__class__(fast_rate_deg_per_day=0.01)
    path = prepare_night(orbit_store_path(root), NIGHT, cfg.site, fast, root / "fast.h5")["night_file"]
    a = objects_on_footprint(path, FIELD[1], FIELD[2], 1.0, mid + 0.2, cfg.site, fast)
    b = objects_on_footprint(night_path(root, NIGHT), FIELD[1], FIELD[2], 1.0, mid + 0.2, cfg.site, cfg.solar_system)
    assert len(a) == len(b) > 0 and sorted(a["ssnamenr"]) == sorted(b["ssnamenr"])


def test_errors_name_the_store_and_the_night(world, cfg, tmp_path):
    root, _, mid = world
    with pytest.raises(BadInputError, match="orbit store"):
        night_file_for(tmp_path, mid, cfg.site, cfg.solar_system)
    with pytest.raises(BadInputError, match=NIGHT):
        objects_on_footprint(night_path(root, NIGHT), FIELD[1], FIELD[2], 1.0, mid + 1.5, cfg.site, cfg.solar_system)
    no_prepare = cfg.solar_system.__class__(prepare_missing_night=False)
    with pytest.raises(BadInputError, match="2026-03-17"):
        night_file_for(root, mid + 2, cfg.site, no_prepare)


def test_a_missing_night_is_prepared_once(world, cfg):
    root, _, mid = world
    path = night_file_for(root, mid + 1, cfg.site, cfg.solar_system)
    assert path == night_path(root, "2026-03-16") and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert night_file_for(root, mid + 1.1, cfg.site, cfg.solar_system) == path and path.stat().st_mtime_ns == stamp


def test_settings_are_validated_by_name():
    from pipeline.core.config import ConfigValueError, SolarSystemConfig
    with pytest.raises(ConfigValueError, match="healpix_nside"):
        SolarSystemConfig(healpix_nside=12)
    with pytest.raises(ConfigValueError, match="search_radius_arcsec"):
        SolarSystemConfig(search_radius_arcsec=0)
