"""Heliocentric dates: the light-travel-time correction by a quadratic fit over a quadrant.

The method of the seed paper (ZTF's matchfile builder): rather than asking the ephemeris
for every source, compute the exact heliocentric light-travel time on a 9 x 9 grid in a
:class:`~astropy.coordinates.SkyOffsetFrame` centred on the field, fit it as a quadratic in
the offset longitude and latitude, and evaluate the quadratic per source.

*The field's maximum coordinate.*  The seed paper centres the offset frame on "the field's
maximum coordinate"; we read that as the centre of the sources' extent, taken as the
direction of their mean unit vector.  Unlike a mean or midpoint of RA it is well defined
for fields straddling RA = 0 and near the celestial pole, and in the offset frame the
footprint is a small patch around (0, 0) whatever its RA and declination, so the grid
(spanning the sources' offset longitude/latitude extent) and the quadratic behave the same
everywhere on the sky.

*Accuracy.*  The correction is ``-r_obs . n / c`` (about 500 s times the cosine of the angle
to the Sun), so across a half-width ``h`` (radians) the terms beyond second order are of
size ``500 s * h**3 / 6``: 4e-5 s for a 0.9-degree quadrant, far inside the 0.05 s budget.

*No network.*  The light-travel time is astropy's exact
``Time.light_travel_time(..., kind='heliocentric', ephemeris='builtin')`` (ERFA's analytic
``epv00`` Earth/Sun model, so nothing is downloaded) at the fixed site location from the
configuration (:func:`pipeline.core.refraction.site_location`).

*Convention.*  HJD = JD(UTC) + light-travel time, the usual (and ZTF's) convention, as a
full Julian date; :func:`heliocentric_julian_date` takes the time of the exposure's middle.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import astropy.units as u
from astropy.coordinates import EarthLocation, SkyCoord, SkyOffsetFrame
from astropy.time import Time

__all__ = ["LightTravelFit", "fit_light_travel_time", "exact_light_travel_time",
           "heliocentric_julian_date", "field_centre", "unit_vectors", "GRID_SIZE"]

GRID_SIZE = 9
#: Smallest grid half-width (deg): a single source or a tight clump still gives a solvable fit.
MIN_HALF_WIDTH_DEG = 0.01
SECONDS_PER_DAY = 86400.0


def unit_vectors(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """Unit vectors (..., 3) of ICRS directions given in degrees."""
    ra, dec = np.deg2rad(ra_deg), np.deg2rad(dec_deg)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def field_centre(ra_deg, dec_deg) -> tuple[float, float]:
    """Centre (deg) of a set of positions: the direction of their mean unit vector.

    Raises
    ------
    ValueError
        No positions, or positions spread so evenly over the sky that they have no centre.
    """
    xyz = unit_vectors(np.asarray(ra_deg, float), np.asarray(dec_deg, float)).reshape(-1, 3)
    if len(xyz) == 0:
        raise ValueError("no positions to centre on")
    mean = xyz.mean(axis=0)
    norm = np.linalg.norm(mean)
    if norm < 1e-6:
        raise ValueError("positions have no well-defined centre (spread over the whole sky)")
    x, y, z = mean / norm
    return float(np.rad2deg(np.arctan2(y, x)) % 360.0), float(np.rad2deg(np.arcsin(z)))


def _design(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(lon), lon, lat, lon * lon, lon * lat, lat * lat], axis=-1)


def exact_light_travel_time(ra_deg, dec_deg, time: Time, location: EarthLocation) -> np.ndarray:
    """astropy's exact heliocentric light-travel time (s) for each position at one time."""
    coords = SkyCoord(ra=np.atleast_1d(ra_deg) * u.deg, dec=np.atleast_1d(dec_deg) * u.deg)
    ltt = time.light_travel_time(coords, kind="heliocentric", location=location, ephemeris="builtin")
    return np.asarray(ltt.to_value(u.s), dtype=float)


@dataclass(frozen=True)
class LightTravelFit:
    """The quadratic light-travel-time model of one exposure over one field.

    ``seconds = c0 + c1 L + c2 B + c3 L^2 + c4 L B + c5 B^2`` with ``(L, B)`` the offset
    longitude and latitude in degrees in the frame centred on ``(origin_ra, origin_dec)``.
    """

    origin_ra: float
    origin_dec: float
    coefficients: np.ndarray
    grid_rms_s: float      # rms of the fit residual at the grid nodes

    def _offsets(self, ra_deg, dec_deg) -> tuple[np.ndarray, np.ndarray]:
        frame = SkyOffsetFrame(origin=SkyCoord(self.origin_ra * u.deg, self.origin_dec * u.deg))
        offset = SkyCoord(ra=np.atleast_1d(ra_deg) * u.deg,
                          dec=np.atleast_1d(dec_deg) * u.deg).transform_to(frame)
        return offset.lon.wrap_at(180 * u.deg).to_value(u.deg), offset.lat.to_value(u.deg)

    def evaluate(self, ra_deg, dec_deg) -> np.ndarray:
        """Light-travel time (s) at each position."""
        ra = np.atleast_1d(np.asarray(ra_deg, float))
        if ra.size == 0:
            return np.zeros(0)
        lon, lat = self._offsets(ra, dec_deg)
        return _design(lon, lat) @ self.coefficients


def fit_light_travel_time(ra_deg, dec_deg, time: Time, location: EarthLocation,
                          grid_size: int = GRID_SIZE) -> LightTravelFit:
    """Fit the heliocentric light-travel time over the extent of a set of sources.

    Parameters
    ----------
    ra_deg, dec_deg : array_like
        Source positions (deg, ICRS); their extent sets the grid.
    time : astropy.time.Time
        One instant (the middle of the exposure).
    location : EarthLocation
        The fixed site (``pipeline.core.refraction.site_location(cfg.site)``).
    grid_size : int
        Nodes per axis of the grid (9 by the seed method).
    """
    ra = np.asarray(ra_deg, float).ravel()
    dec = np.asarray(dec_deg, float).ravel()
    if ra.size == 0:
        raise ValueError("no sources to fit the light-travel time over")
    if not (np.all(np.isfinite(ra)) and np.all(np.isfinite(dec))):
        raise ValueError("source positions hold NaN or infinite values")
    origin_ra, origin_dec = field_centre(ra, dec)
    probe = LightTravelFit(origin_ra, origin_dec, np.zeros(6), 0.0)
    lon, lat = probe._offsets(ra, dec)
    lon_nodes = _grid_axis(lon, grid_size)
    lat_nodes = _grid_axis(lat, grid_size)
    grid_lon, grid_lat = (a.ravel() for a in np.meshgrid(lon_nodes, lat_nodes))
    frame = SkyOffsetFrame(origin=SkyCoord(origin_ra * u.deg, origin_dec * u.deg))
    nodes = SkyCoord(lon=grid_lon * u.deg, lat=grid_lat * u.deg, frame=frame).icrs
    seconds = exact_light_travel_time(nodes.ra.deg, nodes.dec.deg, time, location)
    design = _design(grid_lon, grid_lat)
    coefficients, *_ = np.linalg.lstsq(design, seconds, rcond=None)
    rms = float(np.sqrt(np.mean((design @ coefficients - seconds) ** 2)))
    return LightTravelFit(origin_ra, origin_dec, coefficients, rms)


def _grid_axis(values: np.ndarray, grid_size: int) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    mid, half = 0.5 * (lo + hi), max(0.5 * (hi - lo), MIN_HALF_WIDTH_DEG)
    return np.linspace(mid - half, mid + half, grid_size)


def heliocentric_julian_date(ra_deg, dec_deg, obsmjd_start: float, exptime_s: float,
                             location: EarthLocation) -> np.ndarray:
    """HJD (full Julian date, UTC-based) at mid-exposure for each source, by the grid fit.

    Parameters
    ----------
    ra_deg, dec_deg : array_like
        Source positions (deg).
    obsmjd_start : float
        MJD (UTC) of the start of the exposure.
    exptime_s : float
        Exposure time (s); the HJD refers to the middle of the exposure.
    location : EarthLocation
        The fixed site.
    """
    ra = np.atleast_1d(np.asarray(ra_deg, float))
    if ra.size == 0:
        return np.zeros(0)
    middle = Time(obsmjd_start + 0.5 * exptime_s / SECONDS_PER_DAY, format="mjd", scale="utc")
    fit = fit_light_travel_time(ra, dec_deg, middle, location)
    return middle.jd + fit.evaluate(ra, dec_deg) / SECONDS_PER_DAY
