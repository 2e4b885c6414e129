"""Simulated minor planets: main-belt asteroids and near-Earth objects with real Keplerian
orbits that cross the simulated fields on the simulated nights, and their true positions.

Placement: for each field and night, a direction inside the field at the night's middle and
a heliocentric distance (main belt) or a geocentric distance (near-Earth) give a heliocentric
position; a velocity near the local circular speed (main belt) or from the vis-viva law for a
drawn semimajor axis (near-Earth), mostly prograde with a random tilt, completes a state whose
osculating elements are written in the MPCORB format (rounded to its precision; the truth is
computed from the rounded elements).  H is chosen so the object has a drawn r magnitude then.

True positions are computed here, independently of the pipeline's ephemeris code
(:mod:`solarsystem`, skyfield + DE421): this module's own elliptic Kepler solution, the
Sun and the Earth from astropy's builtin ERFA ephemeris (``epv00``), the observer from
astropy's :class:`~astropy.coordinates.EarthLocation`, and an iterated light time.
"""
from __future__ import annotations

import numpy as np
import astropy.units as u
from astropy.coordinates import EarthLocation, get_body_barycentric_posvel
from astropy.table import Table
from astropy.time import Time

__all__ = ["make_asteroids", "asteroid_positions", "asteroid_elements", "V_MINUS_R", "ASTEROID_G_R",
           "ASTEROID_R_I"]

#: Gaussian gravitational constant squared (au^3/day^2), the MPC's GM of the Sun.
_K2 = 0.01720209895 ** 2
_C_AU_PER_DAY = 299792.458 * 86400.0 / 149597870.700
#: Mean obliquity of J2000 (IAU 1976, 84381.448"): the MPC's ecliptic of J2000.
_EPS = np.radians(84381.448 / 3600.0)
#: Solar-like colours of an asteroid (V - r, g - r, r - i).
V_MINUS_R = 0.20
ASTEROID_G_R, ASTEROID_R_I = 0.55, 0.15
_HALF_MONTHS = "ABCDEFGHJKLMNOPQRSTUVWXY"
_SECOND_LETTERS = "ABCDEFGHJKLMNOPQRSTUVWXYZ"


def _ecliptic_to_equatorial(v: np.ndarray) -> np.ndarray:
    c, s = np.cos(_EPS), np.sin(_EPS)
    return np.stack([v[0], c * v[1] - s * v[2], s * v[1] + c * v[2]])


def _equatorial_to_ecliptic(v: np.ndarray) -> np.ndarray:
    c, s = np.cos(_EPS), np.sin(_EPS)
    return np.stack([v[0], c * v[1] + s * v[2], -s * v[1] + c * v[2]])


def _state_to_elements(r: np.ndarray, v: np.ndarray) -> dict[str, np.ndarray]:
    """Classical elements (ecliptic; angles in degrees) of heliocentric ecliptic states (3, n)."""
    h = np.cross(r, v, axis=0)
    rn, hn = np.linalg.norm(r, axis=0), np.linalg.norm(h, axis=0)
    e_vec = np.cross(v, h, axis=0) / _K2 - r / rn
    e = np.linalg.norm(e_vec, axis=0)
    a = 1.0 / (2.0 / rn - np.sum(v * v, axis=0) / _K2)
    incl = np.arccos(h[2] / hn)
    node_vec = np.stack([-h[1], h[0], np.zeros_like(hn)])
    nn = np.linalg.norm(node_vec, axis=0)
    node = np.arctan2(node_vec[1], node_vec[0]) % (2 * np.pi)
    peri = np.arccos(np.clip(np.sum(node_vec * e_vec, axis=0) / (nn * e), -1, 1))
    peri = np.where(e_vec[2] < 0, 2 * np.pi - peri, peri)
    nu = np.arccos(np.clip(np.sum(e_vec * r, axis=0) / (e * rn), -1, 1))
    nu = np.where(np.sum(r * v, axis=0) < 0, 2 * np.pi - nu, nu)
    E = 2 * np.arctan2(np.sqrt(1 - e) * np.sin(nu / 2), np.sqrt(1 + e) * np.cos(nu / 2))
    M = (E - e * np.sin(E)) % (2 * np.pi)
    return {"a_au": a, "e": e, "incl_deg": np.degrees(incl), "node_deg": np.degrees(node),
            "peri_deg": np.degrees(peri), "mean_anomaly_deg": np.degrees(M)}


def _kepler_positions(el: dict, tt_jd: np.ndarray) -> np.ndarray:
    """Heliocentric equatorial (ICRS axes) positions (3, n) at TT Julian dates ``tt_jd`` (n,)."""
    a, e = np.asarray(el["a_au"], float), np.asarray(el["e"], float)
    n = np.sqrt(_K2 / a ** 3)
    M = np.radians(el["mean_anomaly_deg"]) + n * (tt_jd - el["epoch_jd"])
    M = np.remainder(M + np.pi, 2 * np.pi) - np.pi
    E = np.where(e < 0.8, M, np.pi * np.sign(M))
    for _ in range(60):
        E = E - (E - e * np.sin(E) - M) / (1 - e * np.cos(E))
    x, y = a * (np.cos(E) - e), a * np.sqrt(1 - e * e) * np.sin(E)
    i, O, w = (np.radians(el[k]) for k in ("incl_deg", "node_deg", "peri_deg"))
    cO, sO, ci, si, cw, sw = np.cos(O), np.sin(O), np.cos(i), np.sin(i), np.cos(w), np.sin(w)
    px = np.stack([cO * cw - sO * sw * ci, sO * cw + cO * sw * ci, sw * si])
    qx = np.stack([-cO * sw - sO * cw * ci, -sO * sw + cO * cw * ci, cw * si])
    return _ecliptic_to_equatorial(px * x + qx * y)


def _sun_earth(time: Time) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Barycentric Sun position and Earth position/velocity (au, au/day), ERFA's epv00."""
    sun, _ = get_body_barycentric_posvel("sun", time, ephemeris="builtin")
    earth, earth_v = get_body_barycentric_posvel("earth", time, ephemeris="builtin")
    return (sun.xyz.to_value(u.au), earth.xyz.to_value(u.au), earth_v.xyz.to_value(u.au / u.day))


def asteroid_positions(asteroids: Table, mjd_utc: float, site=None) -> dict[str, np.ndarray]:
    """True astrometric positions of ``asteroids`` seen from ``site`` (``SiteConfig``; the
    geocentre if None) at the UTC MJD ``mjd_utc``: ``ra``, ``dec`` (deg), ``delta``, ``r`` (au),
    ``phase`` (deg) and ``vmag`` (H,G)."""
    n = len(asteroids)
    t = Time(mjd_utc, format="mjd", scale="utc")
    _, earth, _ = _sun_earth(t)
    observer = earth
    if site is not None:
        location = EarthLocation.from_geodetic(site.longitude_deg * u.deg, site.latitude_deg * u.deg,
                                               site.height_m * u.m)
        gcrs, _ = location.get_gcrs_posvel(t)
        observer = earth + gcrs.xyz.to_value(u.au)
    el = {k: np.asarray(asteroids[k], float) for k in ("a_au", "e", "incl_deg", "node_deg", "peri_deg",
                                                       "mean_anomaly_deg", "epoch_jd")}
    lt = np.zeros(n)
    for _ in range(3):
        emit = t - lt * u.day
        sun, _, _ = _sun_earth(emit)
        helio = _kepler_positions(el, emit.tt.jd)
        topo = sun + helio - observer[:, None]
        delta = np.linalg.norm(topo, axis=0)
        lt = delta / _C_AU_PER_DAY
    r = np.linalg.norm(helio, axis=0)
    phase = np.degrees(np.arccos(np.clip(np.sum(helio * topo, axis=0) / (r * delta), -1, 1)))
    tan_half = np.tan(np.radians(phase) / 2)
    G = np.asarray(asteroids["G"], float)
    phi = (1 - G) * np.exp(-3.33 * tan_half ** 0.63) + G * np.exp(-1.87 * tan_half ** 1.22)
    vmag = np.asarray(asteroids["H"], float) + 5 * np.log10(r * delta) - 2.5 * np.log10(phi)
    return {"ra": np.degrees(np.arctan2(topo[1], topo[0])) % 360, "dec": np.degrees(np.arcsin(topo[2] / delta)),
            "delta": delta, "r": r, "phase": phase, "vmag": vmag}


def _designations(rng, n: int) -> list[str]:
    names: set[str] = set()
    out = []
    while len(out) < n:
        if rng.random() < 0.5:   # numbered: all three packings (5 digits, letter + 4, ~ + 4)
            name = str(int(rng.choice([rng.integers(1, 100000), rng.integers(100000, 620000),
                                       rng.integers(620000, 900000)])))
        else:
            name = (f"{rng.integers(1995, 2026)} {_HALF_MONTHS[rng.integers(24)]}"
                    f"{_SECOND_LETTERS[rng.integers(25)]}{rng.integers(0, 300) or ''}")
        if name not in names:
            names.add(name)
            out.append(name)
    return out


def _unit_in_field(rng, ra0: float, dec0: float, half_deg: tuple[float, float], n: int) -> np.ndarray:
    from pipeline.formats.tpv import tangent_to_sky
    xi = rng.uniform(-half_deg[0], half_deg[0], n)
    eta = rng.uniform(-half_deg[1], half_deg[1], n)
    ra, dec = tangent_to_sky(xi, eta, ra0, dec0)
    ra, dec = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])


def _rotate_about(vectors: np.ndarray, axes: np.ndarray, angles: np.ndarray) -> np.ndarray:
    c, s = np.cos(angles), np.sin(angles)
    return (vectors * c + np.cross(axes, vectors, axis=0) * s
            + axes * np.sum(axes * vectors, axis=0) * (1 - c))


def make_asteroids(rng: np.random.Generator, fields, night_mjds, mba_per_deg2: float, neos_per_field: int,
                   rmag_range: tuple[float, float], half_deg: tuple[float, float]) -> Table:
    """Draw the minor planets crossing ``fields`` at the UTC MJDs ``night_mjds`` (night middles).

    Returns
    -------
    Table
        One row per object: ``designation`` (unpacked: number or provisional designation),
        ``kind`` (``mba``/``neo``), MPCORB elements (``H``, ``G``, ``epoch_jd`` TT at 0h,
        ``mean_anomaly_deg``, ``peri_deg``, ``node_deg``, ``incl_deg``, ``e``, ``a_au``) rounded
        to the format's precision, and the placement (``fieldid``, ``place_mjd``).
    """
    rows: dict[str, list] = {k: [] for k in ("kind", "fieldid", "place_mjd", "H", "G", "epoch_jd", "a_au", "e",
                                             "incl_deg", "node_deg", "peri_deg", "mean_anomaly_deg")}
    area = 4 * half_deg[0] * half_deg[1]
    z_ecl = _ecliptic_to_equatorial(np.array([[0.0], [0.0], [1.0]]))
    for mjd in night_mjds:
        t = Time(mjd, format="mjd", scale="utc")
        sun, earth, _ = _sun_earth(t)
        earth_helio = (earth - sun)[:, None]
        epoch_jd = np.floor(t.tt.jd - 0.5) + 0.5 - 10.0      # a whole day 0h TT, 10 days before
        for fieldid, ra0, dec0 in fields:
            n_mba = int(rng.poisson(mba_per_deg2 * area))
            for kind, n in (("mba", n_mba), ("neo", neos_per_field)):
                if n == 0:
                    continue
                uvec = _unit_in_field(rng, ra0, dec0, half_deg, n)
                eu = np.sum(earth_helio * uvec, axis=0)
                if kind == "mba":
                    r_target = rng.uniform(2.2, 3.2, n)
                    delta = -eu + np.sqrt(eu ** 2 - np.sum(earth_helio ** 2) + r_target ** 2)
                else:
                    delta = rng.uniform(0.15, 0.5, n)
                pos = earth_helio + delta * uvec
                rn = np.linalg.norm(pos, axis=0)
                radial = pos / rn
                prograde = np.cross(np.broadcast_to(z_ecl, pos.shape), pos, axis=0)
                prograde /= np.linalg.norm(prograde, axis=0)
                if kind == "mba":
                    speed = np.sqrt(_K2 / rn) * rng.uniform(0.92, 1.08, n)
                    tilt = rng.normal(0, np.radians(8), n)
                    radial_fraction = rng.uniform(-0.1, 0.1, n)
                else:
                    a = rng.uniform(np.maximum(1.05, 0.7 * rn), 2.6, n)
                    speed = np.sqrt(_K2 * (2 / rn - 1 / a))
                    tilt = rng.normal(0, np.radians(20), n)
                    radial_fraction = rng.uniform(-0.4, 0.4, n)
                direction = _rotate_about(prograde, radial, tilt)
                vel = speed * (np.sqrt(1 - radial_fraction ** 2) * direction + radial_fraction * radial)
                el = _state_to_elements(_equatorial_to_ecliptic(pos), _equatorial_to_ecliptic(vel))
                keep = el["e"] < 0.95
                n_days = epoch_jd - t.tt.jd
                mean_motion = np.degrees(np.sqrt(_K2 / el["a_au"] ** 3))
                el["mean_anomaly_deg"] = (el["mean_anomaly_deg"] + mean_motion * n_days) % 360.0
                # H from a drawn r magnitude at placement (H,G phase law, G = 0.15).
                lo, hi = rmag_range if kind == "mba" else (rmag_range[0], min(rmag_range[1], 19.5))
                rmag = rng.uniform(lo, hi, n)
                cos_phase = np.sum(pos * (pos - earth_helio), axis=0) / (rn * delta)
                tan_half = np.tan(np.arccos(np.clip(cos_phase, -1, 1)) / 2)
                phi = 0.85 * np.exp(-3.33 * tan_half ** 0.63) + 0.15 * np.exp(-1.87 * tan_half ** 1.22)
                H = rmag + V_MINUS_R - 5 * np.log10(rn * delta) + 2.5 * np.log10(phi)
                values = {"kind": [kind] * n, "fieldid": [fieldid] * n, "place_mjd": [mjd] * n,
                          "H": np.round(H, 2), "G": np.full(n, 0.15), "epoch_jd": np.full(n, epoch_jd),
                          "a_au": np.round(el["a_au"], 7), "e": np.round(el["e"], 7),
                          **{k: np.round(el[k] % 360 if k != "incl_deg" else el[k], 5)
                             for k in ("incl_deg", "node_deg", "peri_deg", "mean_anomaly_deg")}}
                for k, v in values.items():
                    rows[k].extend(np.asarray(v)[keep])
    table = Table({k: np.asarray(v) for k, v in rows.items()})
    table.add_column(np.array(_designations(rng, len(table)), dtype=str), name="designation", index=0)
    table["asteroid_id"] = np.arange(len(table), dtype=np.int64)
    return table


def asteroid_elements(asteroids: Table):
    """The table's elements as :class:`solarsystem.mpcorb.OrbitElements` (to write MPCORB)."""
    from solarsystem.mpcorb import OrbitElements
    return OrbitElements(**{k: np.asarray(asteroids[k]) for k in OrbitElements.__dataclass_fields__})


def synthetic_orbits(rng: np.random.Generator, n: int, epoch_jd: float, old_epoch_fraction: float = 0.1):
    """``n`` realistic minor-planet orbits (for benchmarks sized like the MPC's catalogue):
    main belt (a 2.1-3.3 au, Rayleigh e and i), 2.5 % near-Earth (perihelion under 1.3 au),
    1 % Hildas and Jupiter trojans; H from 8 to 20, more faint than bright; the first half
    numbered, the rest provisional; most at the common epoch ``epoch_jd`` (TT, 0h), a
    fraction at older epochs (up to three years), as in MPCORB.

    Returns
    -------
    solarsystem.mpcorb.OrbitElements
    """
    from solarsystem.mpcorb import OrbitElements
    kind = rng.choice(3, size=n, p=[0.965, 0.025, 0.01])
    a = rng.uniform(2.1, 3.3, n)
    e = np.clip(rng.rayleigh(0.1, n), 0, 0.45)
    incl = np.clip(rng.rayleigh(7.0, n), 0, 60)
    neo = kind == 1
    a[neo] = rng.uniform(0.8, 3.0, neo.sum())
    q = rng.uniform(0.3, 1.3, neo.sum())
    e[neo] = np.clip(1 - q / a[neo], 0.02, 0.9)
    incl[neo] = np.clip(rng.rayleigh(12.0, neo.sum()), 0, 70)
    outer = kind == 2
    a[outer] = rng.choice([3.97, 5.2], outer.sum()) + rng.normal(0, 0.03, outer.sum())
    H = np.round(20.0 - rng.power(3.0, n) * 12.0, 2)
    epochs = np.full(n, float(epoch_jd))
    old = rng.random(n) < old_epoch_fraction
    epochs[old] -= np.floor(rng.uniform(1, 1100, old.sum()))
    numbers = np.arange(1, n // 2 + 1)
    designation = [str(k) for k in numbers]
    half_months, letters = _HALF_MONTHS, _SECOND_LETTERS
    for k in range(n - len(designation)):
        year, rest = 1995 + k % 31, k // 31
        designation.append(f"{year} {half_months[rest % 24]}{letters[(rest // 24) % 25]}{rest // 600 or ''}")
    return OrbitElements(designation=np.array(designation), H=H, G=np.full(n, 0.15), epoch_jd=epochs,
                         mean_anomaly_deg=np.round(rng.uniform(0, 360, n), 5),
                         peri_deg=np.round(rng.uniform(0, 360, n), 5), node_deg=np.round(rng.uniform(0, 360, n), 5),
                         incl_deg=np.round(incl, 5), e=np.round(e, 7), a_au=np.round(a, 7))
