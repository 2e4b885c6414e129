"""Two-body orbits with skyfield: elements to states, propagation, the observer, light-time
corrected astrometric positions and H,G magnitudes.

Every position is in the ICRF (skyfield's frame; the MPC's J2000 ecliptic elements are
rotated with skyfield's ``ECLIPJ2000`` frame), in au and au/day, times as TT Julian dates.
The planetary ephemeris is DE421 from the ``skyfield-data`` package and the timescale is
skyfield's builtin one: nothing is downloaded.
"""
from __future__ import annotations

import os
import warnings
from functools import lru_cache

import numpy as np

from solarsystem.mpcorb import OrbitElements

__all__ = ["GM_SUN_AU3_D2", "C_AU_PER_DAY", "ephemeris", "timescale", "tt_jd_of_mjd_utc", "elements_to_states",
           "propagate_states", "observer_barycentric", "astrometric_positions", "hg_magnitude"]

#: The Sun's GM as skyfield's MPCORB orbits use it (Pitjeva 2005), in au^3/day^2.
GM_SUN_AU3_D2 = 132712440042.0 * (86400.0 ** 2) / (149597870.700 ** 3)
#: Speed of light, au/day.
C_AU_PER_DAY = 299792.458 * 86400.0 / 149597870.700
#: Propagation batch: skyfield's propagator holds several (n, 1) work arrays per call.
_BATCH = 200_000


@lru_cache(maxsize=1)
def ephemeris():
    """DE421 (skyfield-data's ``de421.bsp``), opened once per process."""
    from skyfield.api import load_file
    with warnings.catch_warnings():
        # skyfield-data warns that its IERS file (not used: builtin timescale) has expired.
        warnings.simplefilter("ignore", RuntimeWarning)
        from skyfield_data import get_skyfield_data_path
        folder = get_skyfield_data_path()
    return load_file(os.path.join(folder, "de421.bsp"))


@lru_cache(maxsize=1)
def timescale():
    """skyfield's timescale from its builtin leap-second and Delta T tables (no download)."""
    from skyfield.api import load
    with warnings.catch_warnings():
        # skyfield-data warns that its (unused here) IERS file has passed its expiry date.
        warnings.simplefilter("ignore", RuntimeWarning)
        return load.timescale(builtin=True)


def tt_jd_of_mjd_utc(mjd_utc) -> np.ndarray:
    """TT Julian dates of UTC modified Julian dates (skyfield's leap seconds)."""
    mjd_utc = np.asarray(mjd_utc, dtype=float)
    return np.asarray(timescale().utc(1858, 11, 17.0 + mjd_utc).tt)


def _eccentric_anomaly(e: np.ndarray, mean_anomaly: np.ndarray) -> np.ndarray:
    # skyfield's keplerlib.eccentric_anomaly takes one orbit at a time (a scalar convergence
    # test); this is the same Newton iteration over arrays, started at M + e sin M.
    E = mean_anomaly + e * np.sin(mean_anomaly)
    for _ in range(50):
        dE = (E - e * np.sin(E) - mean_anomaly) / (1.0 - e * np.cos(E))
        E -= dE
        if np.max(np.abs(dE), initial=0.0) < 1e-13:
            break
    return E


def elements_to_states(elements: OrbitElements) -> tuple[np.ndarray, np.ndarray]:
    """Heliocentric ICRF position and velocity (3, n) at each object's own epoch.

    skyfield's :func:`~skyfield.keplerlib.ele_to_vec` from the elements (mean anomaly turned
    into the true anomaly), then its J2000 ecliptic to ICRF rotation.
    """
    from skyfield.data.spice import inertial_frames
    from skyfield.keplerlib import ele_to_vec
    e = np.asarray(elements.e, float)
    M = np.radians(np.asarray(elements.mean_anomaly_deg, float) % 360.0)
    M = np.where(M > np.pi, M - 2 * np.pi, M)
    E = _eccentric_anomaly(e, M)
    nu = 2.0 * np.arctan2(np.sqrt(1.0 + e) * np.sin(E / 2), np.sqrt(1.0 - e) * np.cos(E / 2))
    p = np.asarray(elements.a_au, float) * (1.0 - e * e)
    pos, vel = ele_to_vec(p, e, np.radians(elements.incl_deg), np.radians(elements.node_deg),
                          np.radians(elements.peri_deg), nu, GM_SUN_AU3_D2)
    rotation = inertial_frames["ECLIPJ2000"].T
    return rotation @ np.atleast_2d(pos.T).T, rotation @ np.atleast_2d(vel.T).T


def propagate_states(position: np.ndarray, velocity: np.ndarray, t0, t1) -> tuple[np.ndarray, np.ndarray]:
    """Two-body propagation about the Sun with skyfield's :func:`~skyfield.keplerlib.propagate`.

    Parameters
    ----------
    position, velocity : (3, n) arrays
        Heliocentric states at ``t0``.
    t0, t1 : float or (n,) arrays
        TT Julian dates, per object or common.

    Returns
    -------
    position, velocity : (3, n) arrays at ``t1``.
    """
    from skyfield.keplerlib import propagate
    n = position.shape[1]
    t0 = np.broadcast_to(np.asarray(t0, float), (n,))
    # One time per object as an (n, 1) column: propagate() then works orbit by orbit (with a
    # 1-D time array its final reshape only supports a single orbit).
    t1 = np.broadcast_to(np.asarray(t1, float), (n,))
    out_p, out_v = np.empty((3, n)), np.empty((3, n))
    for start in range(0, n, _BATCH):
        part = slice(start, min(n, start + _BATCH))
        p, v = propagate(position[:, part], velocity[:, part], t0[part], t1[part, None], GM_SUN_AU3_D2)
        out_p[:, part], out_v[:, part] = p[:, :, 0], v[:, :, 0]
    return out_p, out_v


def observer_barycentric(tt_jd: float, site=None) -> tuple[np.ndarray, np.ndarray]:
    """Barycentric ICRF position and velocity (3,) of the geocentre, or of a site
    (:class:`pipeline.core.config.SiteConfig`), at a TT Julian date."""
    eph = ephemeris()
    observer = eph["earth"]
    if site is not None:
        from skyfield.api import wgs84
        observer = observer + wgs84.latlon(site.latitude_deg, site.longitude_deg, elevation_m=site.height_m)
    at = observer.at(timescale().tt_jd(tt_jd))
    return at.position.au, at.velocity.au_per_d


def sun_barycentric(tt_jd) -> np.ndarray:
    """Barycentric ICRF position of the Sun, (3,) or (3, n), at TT Julian dates."""
    return ephemeris()["sun"].at(timescale().tt_jd(tt_jd)).position.au


def astrometric_positions(position: np.ndarray, velocity: np.ndarray, t0, tt_jd: float, site=None,
                          iterations: int = 3) -> dict[str, np.ndarray]:
    """Astrometric (light-time corrected, ICRF) positions seen from ``site`` at ``tt_jd``.

    Each object is propagated once, exactly, to ``tt_jd`` (skyfield's two-body propagator);
    over the light time (minutes) its motion back to the emission time is the second-order
    expansion of that state (the error, of order GM/r^3 * v * lt^3, stays below a
    microarcsecond), iterated with the Sun taken at the emission time.  Aberration and
    light deflection are left out: astrometric positions compare directly with a
    Gaia-calibrated image.

    Returns
    -------
    dict with ``ra``, ``dec`` (deg), ``delta`` (observer distance, au), ``r`` (heliocentric
    distance, au) and ``phase`` (Sun-object-observer angle, deg).
    """
    n = position.shape[1]
    obs, _ = observer_barycentric(tt_jd, site)
    at_t, vel_t = propagate_states(position, velocity, t0, tt_jd)
    acc_t = -GM_SUN_AU3_D2 * at_t / np.maximum(np.linalg.norm(at_t, axis=0), 1e-9) ** 3
    lt = np.zeros(n)
    for _ in range(iterations):
        helio = at_t - vel_t * lt + 0.5 * acc_t * lt * lt
        sun = sun_barycentric(tt_jd - lt) if n else np.zeros((3, 0))
        topo = sun + helio - obs[:, None]
        delta = np.linalg.norm(topo, axis=0)
        lt = delta / C_AU_PER_DAY
    r = np.linalg.norm(helio, axis=0)
    ra = np.degrees(np.arctan2(topo[1], topo[0])) % 360.0
    dec = np.degrees(np.arcsin(np.clip(topo[2] / np.where(delta > 0, delta, 1.0), -1, 1)))
    cos_phase = np.sum(helio * topo, axis=0) / np.where(r * delta > 0, r * delta, 1.0)
    return {"ra": ra, "dec": dec, "delta": delta, "r": r, "phase": np.degrees(np.arccos(np.clip(cos_phase, -1, 1)))}


def hg_magnitude(H, G, r_au, delta_au, phase_deg) -> np.ndarray:
    """Predicted V magnitude in the IAU H,G system (Bowell et al. 1989), as the MPC computes it.

    No installed library provides it (sbpy would be a large dependency for one formula).
    """
    half_tan = np.tan(np.radians(np.asarray(phase_deg, float)) / 2.0)
    phi1 = np.exp(-3.33 * half_tan ** 0.63)
    phi2 = np.exp(-1.87 * half_tan ** 1.22)
    G = np.asarray(G, float)
    return (np.asarray(H, float) + 5.0 * np.log10(np.asarray(r_au) * np.asarray(delta_au))
            - 2.5 * np.log10((1.0 - G) * phi1 + G * phi2))
