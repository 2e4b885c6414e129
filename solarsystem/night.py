"""Per-night preparation and per-quadrant lookup of known minor planets.

**Preparation** (``skydiff solarsystem prepare --night YYYY-MM-DD``, or a quadrant that
finds the night missing): every orbit of the store is propagated with skyfield's two-body
propagator to the night's middle (local midnight at the site), which is the expensive part
(about a minute per million orbits on one core).  The file keeps, per object, that exact
heliocentric state, H and G, and the HEALPix pixel of its geocentric direction then: objects
are sorted by pixel (``slow`` group, with each pixel's first row), except those moving faster
than ``fast_rate_deg_per_day`` across the sky, kept apart (``fast`` group) and checked for
every quadrant.  One HDF5 file per night, ``<paths.solar_system>/nights/<night>.h5``,
written atomically.

**Lookup** (:func:`objects_on_footprint`, per quadrant): the pixels of a cone around the
footprint, widened by how far a slow object can move between the night's middle and the
exposure, give contiguous row ranges; their coarse track (second-order Taylor expansion of
the exact state, seen from the geocentre) keeps those within ``coarse_margin_deg`` of the
cone; for those, light-time corrected astrometric positions from the site at the exposure's
mid-time (skyfield: two-body propagation to each emission time, DE421 for the Sun and the
Earth, WGS84 for the site) and the H,G magnitude.
"""
from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.table import Table

from pipeline.core.config import SiteConfig, SolarSystemConfig
from pipeline.core.exits import BadInputError
from pipeline.formats.atomic import atomic_path
from pipeline.formats.locks import LockTimeout, exclusive_lock
from solarsystem.mpcorb import ssnamenr_of
from solarsystem.orbits import (C_AU_PER_DAY, GM_SUN_AU3_D2, astrometric_positions, elements_to_states, hg_magnitude,
                                observer_barycentric, propagate_states, sun_barycentric, tt_jd_of_mjd_utc)
from solarsystem.store import orbit_store_path, read_orbit_store

__all__ = ["NIGHT_FILE_VERSION", "night_of_mjd", "night_midpoint_mjd", "night_path", "prepare_night",
           "write_night_file", "objects_on_footprint", "night_file_for", "KnownObjectsLookup"]

log = logging.getLogger("skydiff.solarsystem")

NIGHT_FILE_VERSION = 1
_EARTH_RADIUS_AU = 6378.137 / 149597870.700
_NAME_DTYPE = "S16"


def night_of_mjd(mjd_utc: float) -> str:
    """The night (its UT date, ``YYYY-MM-DD``, as ZTF names nights) of a UTC MJD."""
    from astropy.time import Time
    return Time(mjd_utc, format="mjd", scale="utc").strftime("%Y-%m-%d")


def night_midpoint_mjd(night: str, site: SiteConfig) -> float:
    """UTC MJD of local midnight at the site on the morning of the UT date ``night``."""
    try:
        day = date.fromisoformat(night)
    except ValueError:
        raise BadInputError(f"night {night!r}: expected YYYY-MM-DD") from None
    mjd0 = day.toordinal() - date(1858, 11, 17).toordinal()
    return mjd0 + ((-site.longitude_deg / 15.0) % 24.0) / 24.0


def night_path(root: str | os.PathLike, night: str) -> Path:
    """The night file of ``night`` under a solar-system folder."""
    return Path(root) / "nights" / f"{night}.h5"


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=0)


def _lonlat(unit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.degrees(np.arctan2(unit[1], unit[0])) % 360.0, np.degrees(np.arcsin(np.clip(unit[2], -1, 1)))


def prepare_night(store: str | os.PathLike, night: str, site: SiteConfig, config: SolarSystemConfig,
                  out: str | os.PathLike) -> dict:
    """Prepare the night file of ``night`` from the orbit store file ``store``; returns a summary.

    Raises
    ------
    BadInputError
        No orbit store, or a malformed night.
    """
    from catalogs.sky import healpix
    timings = {}
    t0 = time.perf_counter()
    mid_mjd = night_midpoint_mjd(night, site)
    elements, meta = read_orbit_store(store)
    timings["read_store"] = time.perf_counter() - t0
    t = time.perf_counter()
    tt_mid = float(tt_jd_of_mjd_utc(mid_mjd))
    pos0, vel0 = elements_to_states(elements)
    timings["states"] = time.perf_counter() - t
    t = time.perf_counter()
    pos, vel = propagate_states(pos0, vel0, np.asarray(elements.epoch_jd, float), tt_mid)
    timings["propagate"] = time.perf_counter() - t
    t = time.perf_counter()
    earth_p, earth_v = observer_barycentric(tt_mid)
    sun_pv = ephemeris_sun_state(tt_mid)
    geo = sun_pv[0][:, None] + pos - earth_p[:, None]
    geo_v = sun_pv[1][:, None] + vel - earth_v[:, None]
    distance = np.linalg.norm(geo, axis=0)
    unit = geo / distance
    transverse = geo_v - unit * np.sum(geo_v * unit, axis=0)
    rate = np.degrees(np.linalg.norm(transverse, axis=0) / distance)
    lon, lat = _lonlat(unit)
    pixel = healpix(config.healpix_nside).lonlat_to_healpix(lon * u.deg, lat * u.deg)
    fast = rate > config.fast_rate_deg_per_day
    slow_rows = np.flatnonzero(~fast)
    slow_rows = slow_rows[np.argsort(pixel[slow_rows], kind="stable")]
    fast_rows = np.flatnonzero(fast)
    timings["index"] = time.perf_counter() - t
    t = time.perf_counter()
    attrs = {"version": NIGHT_FILE_VERSION, "night": night, "mid_mjd_utc": mid_mjd, "tt_mid": tt_mid,
             "healpix_nside": config.healpix_nside, "fast_rate_deg_per_day": config.fast_rate_deg_per_day,
             "orbit_store": str(store), "orbit_source": meta.get("source", ""), "n_objects": len(elements)}
    write_night_file(out, attrs, elements, np.vstack([pos, vel]), pixel, slow_rows, fast_rows)
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    summary = {"night_file": str(out), "night": night, "n_objects": len(elements), "n_fast": int(fast.sum()),
               "max_days_from_epoch": float(np.max(np.abs(tt_mid - np.asarray(elements.epoch_jd)), initial=0)),
               "timings_s": {k: round(v, 2) for k, v in timings.items()}}
    log.info("night %s: %d objects (%d fast movers) prepared in %.1f s -> %s", night, len(elements),
             summary["n_fast"], timings["total"], out)
    return summary


def ephemeris_sun_state(tt_jd: float) -> tuple[np.ndarray, np.ndarray]:
    """Barycentric position and velocity (3,) of the Sun (DE421)."""
    from solarsystem.orbits import ephemeris, timescale
    at = ephemeris()["sun"].at(timescale().tt_jd(tt_jd))
    return at.position.au, at.velocity.au_per_d


def write_night_file(path, attrs: dict, elements, states: np.ndarray, pixel: np.ndarray,
                     slow_rows: np.ndarray, fast_rows: np.ndarray) -> Path:
    """Write a night file atomically (layout in the module docstring)."""
    import h5py
    names = np.array([ssnamenr_of(str(d)) for d in elements.designation], dtype=_NAME_DTYPE)
    npix = 12 * attrs["healpix_nside"] ** 2
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs.update(attrs)
            for group, rows in (("slow", slow_rows), ("fast", fast_rows)):
                g = h5.create_group(group)
                g["name"] = names[rows]
                g["H"] = np.asarray(elements.H, np.float32)[rows]
                g["G"] = np.asarray(elements.G, np.float32)[rows]
                g["state"] = np.ascontiguousarray(states[:, rows].T)
            h5["slow"]["pixel_start"] = np.searchsorted(pixel[slow_rows], np.arange(npix + 1)).astype(np.int64)
    return Path(path)


def _row_ranges(pixels: np.ndarray, pixel_start: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous row ranges of the (sorted) pixels, neighbouring ranges merged."""
    ranges: list[tuple[int, int]] = []
    for p in np.sort(pixels):
        a, b = int(pixel_start[p]), int(pixel_start[p + 1])
        if a == b:
            continue
        if ranges and ranges[-1][1] == a:
            ranges[-1] = (ranges[-1][0], b)
        else:
            ranges.append((a, b))
    return ranges


def _read_rows(group, ranges) -> dict[str, np.ndarray]:
    parts = {k: [group[k][a:b] for a, b in ranges] for k in ("name", "H", "G", "state")}
    empty = {"name": np.zeros(0, _NAME_DTYPE), "H": np.zeros(0, np.float32), "G": np.zeros(0, np.float32),
             "state": np.zeros((0, 6))}
    return {k: np.concatenate(v) if v else empty[k] for k, v in parts.items()}


def objects_on_footprint(night_file: str | os.PathLike, ra_deg: float, dec_deg: float, radius_deg: float,
                         mjd_utc: float, site: SiteConfig, config: SolarSystemConfig) -> Table:
    """Known objects within ``radius_deg`` of a position at the UTC MJD ``mjd_utc``.

    Returns
    -------
    Table
        ``ssnamenr``, ``ra``, ``dec`` (astrometric, deg), ``delta``, ``r`` (au), ``phase``
        (deg) and ``vmag`` (H,G predicted V), one row per object.

    Raises
    ------
    BadInputError
        The night file is missing or unreadable, or ``mjd_utc`` is outside the night it
        serves (the message names the file).
    """
    import h5py
    from catalogs.sky import healpix, radec_to_xyz
    night_file = Path(night_file)
    try:
        h5 = h5py.File(night_file, "r")
    except OSError as exc:
        raise BadInputError(f"{night_file}: cannot read the night ephemeris ({exc}); "
                            "prepare it with `skydiff solarsystem prepare --night`") from None
    with h5:
        tt_mid = float(h5.attrs["tt_mid"])
        tt = float(tt_jd_of_mjd_utc(mjd_utc))
        dt = tt - tt_mid
        if abs(dt) * 24.0 > config.night_half_window_hours:
            raise BadInputError(f"{night_file}: prepared for the night {h5.attrs['night']}, "
                                f"{dt * 24:+.1f} h from MJD {mjd_utc:.5f} (limit "
                                f"{config.night_half_window_hours} h, solar_system.night_half_window_hours)")
        nside = int(h5.attrs["healpix_nside"])
        slow_reach = float(h5.attrs["fast_rate_deg_per_day"]) * abs(dt)
        cone = radius_deg + config.coarse_margin_deg + slow_reach
        pixels = healpix(nside).cone_search_lonlat(ra_deg * u.deg, dec_deg * u.deg, cone * u.deg)
        slow = h5["slow"]
        rows = _read_rows(slow, _row_ranges(np.asarray(pixels), slow["pixel_start"][:]))
        fast = _read_rows(h5["fast"], [(0, h5["fast"]["name"].shape[0])])
    rows = {k: np.concatenate([rows[k], fast[k]]) for k in rows}
    state = rows["state"].T
    # Coarse track: second-order Taylor expansion of the heliocentric motion from the night's
    # middle, light-time corrected to first order, seen from the geocentre.  Its error is in
    # coarse_margin_deg; each object's horizontal parallax (Earth radius over its distance)
    # is added to it, so near-Earth objects are not lost to the site's offset.
    r_norm = np.maximum(np.linalg.norm(state[:3], axis=0), 1e-9)
    velocity = state[3:] - GM_SUN_AU3_D2 * state[:3] / r_norm ** 3 * dt
    helio = state[:3] + state[3:] * dt - 0.5 * GM_SUN_AU3_D2 * state[:3] / r_norm ** 3 * dt * dt
    earth, _ = observer_barycentric(tt)
    geo = sun_barycentric(tt)[:, None] + helio - earth[:, None]
    distance = np.linalg.norm(geo, axis=0)
    geo = _unit(geo - velocity * distance / C_AU_PER_DAY)
    centre = radec_to_xyz(np.array([ra_deg]), np.array([dec_deg]))[0]
    parallax = np.degrees(np.arcsin(np.minimum(1.0, _EARTH_RADIUS_AU / distance)))
    near = geo.T @ centre >= np.cos(np.radians(radius_deg + config.coarse_margin_deg + parallax))
    keep = np.flatnonzero(near)
    pos = astrometric_positions(state[:3, keep], state[3:, keep], tt_mid, tt, site)
    vmag = hg_magnitude(rows["H"][keep], rows["G"][keep], pos["r"], pos["delta"], pos["phase"])
    on = radec_to_xyz(pos["ra"], pos["dec"]) @ centre >= np.cos(np.radians(radius_deg))
    table = Table({"ssnamenr": rows["name"][keep][on].astype(str), "ra": pos["ra"][on], "dec": pos["dec"][on],
                   "delta": pos["delta"][on], "r": pos["r"][on], "phase": pos["phase"][on],
                   "vmag": vmag[on]})
    table.meta.update(night_file=str(night_file), n_coarse=int(len(rows["name"])), n_precise=int(keep.size))
    return table


@contextmanager
def _night_lock(path: Path, timeout_s: float):
    # One preparer per night file: parallel quadrant tasks of the same night wait for it.
    try:
        with exclusive_lock(f"{path}.lock", timeout_s, poll_s=0.5):
            yield
    except LockTimeout:
        raise BadInputError(f"{path}: another process has been preparing this night file for "
                            f"over {timeout_s:.0f} s (solar_system.lock_timeout_s)") from None


def night_file_for(root: str | os.PathLike, mjd_utc: float, site: SiteConfig, config: SolarSystemConfig) -> Path:
    """The night file serving an exposure at ``mjd_utc``, prepared now if missing and allowed.

    Raises
    ------
    BadInputError
        Neither the night file nor the orbit store exists, or the night file is missing and
        ``solar_system.prepare_missing_night`` is off.
    """
    night = night_of_mjd(mjd_utc)
    path = night_path(root, night)
    if path.is_file():
        return path
    store = orbit_store_path(root)
    if not store.is_file():
        raise BadInputError(f"{path}: no night ephemeris and no orbit store {store} to prepare it from "
                            "(`skydiff solarsystem ingest MPCORB.DAT`, paths.solar_system)")
    if not config.prepare_missing_night:
        raise BadInputError(f"{path}: no night ephemeris (`skydiff solarsystem prepare --night {night}`; "
                            "solar_system.prepare_missing_night is off)")
    with _night_lock(path, config.lock_timeout_s):
        if not path.is_file():
            log.info("night file %s missing: preparing it from %s", path, store)
            prepare_night(store, night, site, config, path)
    return path


class KnownObjectsLookup:
    """What the subtraction's edge calls: the known objects on a quadrant at its mid-time."""

    def __init__(self, root: str | os.PathLike, site: SiteConfig, config: SolarSystemConfig):
        self.root, self.site, self.config = Path(root), site, config

    def __call__(self, wcs, shape: tuple[int, int], mjd_mid_utc: float) -> Table:
        ny, nx = shape
        x = np.array([0.5, nx + 0.5, 0.5, nx + 0.5, (nx + 1) / 2])
        y = np.array([0.5, 0.5, ny + 0.5, ny + 0.5, (ny + 1) / 2])
        ra, dec = wcs.all_pix2world(x, y, 1)
        from catalogs.sky import radec_to_xyz
        vec = radec_to_xyz(ra, dec)
        radius = float(np.degrees(np.max(np.arccos(np.clip(vec[:4] @ vec[4], -1, 1)))))
        radius += self.config.search_radius_arcsec / 3600.0
        path = night_file_for(self.root, mjd_mid_utc, self.site, self.config)
        return objects_on_footprint(path, float(ra[4]), float(dec[4]), radius, mjd_mid_utc, self.site, self.config)
