"""Sky regions and the HEALPix tiles that cover them, in exact spherical geometry.

Everything works on unit vectors, so RA = 0 and the poles need no special case.  A
footprint is a convex spherical polygon (a quadrant's corners: its edges are great
circles in a TAN projection); "within the footprint plus a margin" means an angular
distance to the polygon of at most the margin.  A cone is the one-vertex case.

Tiles are HEALPix pixels in NESTED order.  ``astropy_healpix``'s ``cone_search_lonlat``
was found here to miss overlapping pixels (16 of 600 random cones lost a pixel holding
part of the cone), so the covering tiles are found by our own test: a pixel overlaps a
region if a point of its boundary, sampled finely, lies within the region widened by
half the sampling step, or if the region's centre lies in it.  That can only add a
neighbouring tile, never lose one.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import astropy.units as u
from astropy_healpix import HEALPix, nside_to_pixel_resolution

from catalogs.schema import CatalogError

__all__ = [
    "radec_to_xyz", "xyz_to_radec", "east_north", "healpix", "distance_to_polygon",
    "PolygonRegion", "SkyBox", "cone_region", "field_region", "footprint_region",
    "tiles_for_regions", "pixel_cone", "pixels_of",
]

# Boundary points per pixel side when testing overlap; the step they leave is padded.
_BOUNDARY_STEP = 8


def radec_to_xyz(ra_deg, dec_deg) -> np.ndarray:
    """Unit vectors (..., 3) of ICRS directions given in degrees."""
    ra = np.radians(np.asarray(ra_deg, dtype=float))
    dec = np.radians(np.asarray(dec_deg, dtype=float))
    cos_dec = np.cos(dec)
    return np.stack([cos_dec * np.cos(ra), cos_dec * np.sin(ra), np.sin(dec)], axis=-1)


def xyz_to_radec(xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in degrees of vectors (..., 3), which need not be normalised."""
    x, y, z = xyz[..., 0], xyz[..., 1], xyz[..., 2]
    ra = np.mod(np.degrees(np.arctan2(y, x)), 360.0)
    dec = np.degrees(np.arctan2(z, np.hypot(x, y)))
    return ra, dec


def east_north(ra_deg, dec_deg) -> tuple[np.ndarray, np.ndarray]:
    """Local unit vectors towards increasing RA (east) and Dec (north), shape (..., 3)."""
    ra = np.radians(np.asarray(ra_deg, dtype=float))
    dec = np.radians(np.asarray(dec_deg, dtype=float))
    east = np.stack([-np.sin(ra), np.cos(ra), np.zeros_like(ra)], axis=-1)
    north = np.stack([-np.sin(dec) * np.cos(ra), -np.sin(dec) * np.sin(ra), np.cos(dec)], axis=-1)
    return east, north


def _angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in degrees between unit vectors (atan2 form: accurate at small angles)."""
    return np.degrees(np.arctan2(np.linalg.norm(np.cross(a, b), axis=-1), np.sum(a * b, axis=-1)))


@lru_cache(maxsize=8)
def healpix(nside: int) -> HEALPix:
    """The store's HEALPix grid (NESTED: a pixel's children are 4p..4p+3)."""
    return HEALPix(nside=nside, order="nested")


@lru_cache(maxsize=4)
def _pixel_centres(nside: int) -> np.ndarray:
    lon, lat = healpix(nside).healpix_to_lonlat(np.arange(12 * nside * nside))
    return radec_to_xyz(lon.to_value(u.deg), lat.to_value(u.deg))


def _boundary_points(nside: int, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boundary vectors (n, 4*step, 3) of pixels and the largest gap between neighbours."""
    lon, lat = healpix(nside).boundaries_lonlat(pixels, step=_BOUNDARY_STEP)
    points = radec_to_xyz(lon.to_value(u.deg), lat.to_value(u.deg))
    gap = _angle(points, np.roll(points, 1, axis=-2)).max(axis=-1)
    return points, gap


def distance_to_polygon(xyz: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Angular distance in degrees from points to a convex spherical polygon (0 inside).

    Parameters
    ----------
    xyz : ndarray (..., 3)
        Unit vectors of the points.
    vertices : ndarray (n, 3)
        Unit vectors of the polygon's vertices in order (either sense); one vertex is a
        point, two an arc.
    """
    xyz = np.asarray(xyz, dtype=float)
    if len(vertices) == 1:
        return _angle(xyz, vertices[0])
    edges = [(vertices[i], vertices[(i + 1) % len(vertices)])
             for i in range(len(vertices) if len(vertices) > 2 else 1)]
    inside = np.full(xyz.shape[:-1], len(vertices) > 2)
    distance = np.full(xyz.shape[:-1], np.inf)
    sense = np.sign(np.dot(np.cross(vertices[0], vertices[1]), vertices.sum(axis=0)))
    for a, b in edges:
        normal = np.cross(a, b)
        normal /= np.linalg.norm(normal)
        height = xyz @ normal
        inside &= sense * height >= 0.0
        foot = xyz - height[..., None] * normal
        on_arc = (np.cross(a, foot) @ normal >= 0.0) & (np.cross(foot, b) @ normal >= 0.0)
        to_arc = np.where(on_arc, np.degrees(np.arcsin(np.clip(np.abs(height), 0.0, 1.0))),
                          np.minimum(_angle(xyz, a), _angle(xyz, b)))
        distance = np.minimum(distance, to_arc)
    return np.where(inside, 0.0, distance)


@dataclass(frozen=True)
class PolygonRegion:
    """A convex spherical polygon (vertices in degrees, in order) widened by a margin.

    A single vertex with a margin is a cone.  Build with :func:`footprint_region`,
    :func:`cone_region` or :func:`field_region`, which check the polygon.
    """

    vertices_radec: tuple[tuple[float, float], ...]
    margin_deg: float = 0.0

    @property
    def vertices(self) -> np.ndarray:
        return radec_to_xyz(*np.array(self.vertices_radec, dtype=float).T)

    @property
    def centre(self) -> np.ndarray:
        total = self.vertices.sum(axis=0)
        return total / np.linalg.norm(total)

    def contains(self, ra_deg, dec_deg) -> np.ndarray:
        """True where (ra, dec) lies in the polygon or within the margin of it.

        Only points in the band just outside the polygon need the exact distance: a point
        on the inner side of every edge's great circle is inside, and one farther than
        the margin from the circle of an edge it lies outside of is farther than that from
        the polygon (every path to it crosses that circle).  A quadrant's lookup of ~10^5
        rows is ~10 times faster so.
        """
        xyz = radec_to_xyz(ra_deg, dec_deg)
        vertices = self.vertices
        if len(vertices) < 3:
            return distance_to_polygon(xyz, vertices) <= self.margin_deg
        sense = np.sign(np.dot(np.cross(vertices[0], vertices[1]), vertices.sum(axis=0)))
        normals = sense * np.cross(vertices, np.roll(vertices, -1, axis=0))
        normals /= np.linalg.norm(normals, axis=1)[:, None]
        lowest = (xyz @ normals.T).min(axis=-1)       # < 0: outside that edge's circle
        inside = lowest >= 0.0
        band = ~inside & (lowest >= -np.sin(np.radians(min(self.margin_deg, 90.0))) - 1e-12)
        result = inside.copy()
        result[band] = distance_to_polygon(xyz[band], vertices) <= self.margin_deg
        return result

    def tiles(self, nside: int) -> np.ndarray:
        """Sorted NESTED pixels overlapping the region (a superset, never missing one)."""
        centre = self.centre
        reach = _angle(self.vertices, centre).max() + self.margin_deg
        # 1.5 resolutions bounds a HEALPix pixel's centre-to-corner distance (ratio <= 1.05).
        near = np.flatnonzero(_pixel_centres(nside) @ centre >= np.cos(np.radians(
            min(180.0, reach + 1.5 * nside_to_pixel_resolution(nside).to_value(u.deg)))))
        points, gap = _boundary_points(nside, near)
        reached = distance_to_polygon(points, self.vertices).min(axis=-1) <= self.margin_deg + 0.6 * gap
        own = healpix(nside).lonlat_to_healpix(*[v * u.deg for v in xyz_to_radec(centre)])
        return np.union1d(near[reached], np.atleast_1d(own)).astype(np.int64)


def footprint_region(footprint_radec, margin_deg: float = 0.0) -> PolygonRegion:
    """A region from footprint corners (n, 2) in degrees, checked to be convex.

    Raises
    ------
    CatalogError
        Fewer than one corner, non-finite values, a negative margin, a polygon that is
        not convex (corners out of order) or wider than 90 degrees.
    """
    corners = np.asarray(footprint_radec, dtype=float).reshape(-1, 2)
    if len(corners) == 0 or not np.all(np.isfinite(corners)) or np.any(np.abs(corners[:, 1]) > 90):
        raise CatalogError(f"footprint corners must be finite (ra, dec) pairs in degrees, got {corners.tolist()}")
    if not np.isfinite(margin_deg) or margin_deg < 0:
        raise CatalogError(f"footprint margin must be >= 0 deg, got {margin_deg}")
    region = PolygonRegion(tuple(map(tuple, corners.tolist())), float(margin_deg))
    vertices = region.vertices
    if _angle(vertices, region.centre).max() >= 90.0:
        raise CatalogError("footprint spans more than a hemisphere")
    if len(vertices) > 2:
        sense = np.sign(np.dot(np.cross(vertices[0], vertices[1]), vertices.sum(axis=0)))
        for i in range(len(vertices)):
            normal = np.cross(vertices[i], vertices[(i + 1) % len(vertices)])
            if np.any(sense * (vertices @ normal) < -1e-12):
                raise CatalogError(f"footprint corners do not form a convex polygon in order: {corners.tolist()}")
    return region


def cone_region(ra_deg: float, dec_deg: float, radius_deg: float) -> PolygonRegion:
    """All directions within ``radius_deg`` of (ra, dec)."""
    return footprint_region([(ra_deg, dec_deg)], radius_deg)


def field_region(ra_deg: float, dec_deg: float, width_deg: float = 7.5, height_deg: float = 7.3,
                 margin_deg: float = 0.25) -> PolygonRegion:
    """A survey field: a box north-up in the tangent plane at its centre, plus a margin.

    The defaults are the ZTF-like focal plane (7.5 x 7.3 deg including the CCD gaps); the
    margin covers the catalogue margin of the lookup and the pointing error.
    """
    if not (0 < width_deg < 90 and 0 < height_deg < 90):
        raise CatalogError(f"field size must be 0-90 deg, got {width_deg} x {height_deg}")
    east, north = east_north(ra_deg, dec_deg)
    centre = radec_to_xyz(ra_deg, dec_deg)
    half_x, half_y = np.tan(np.radians(width_deg / 2)), np.tan(np.radians(height_deg / 2))
    corners = [centre + sx * half_x * east + sy * half_y * north
               for sx, sy in ((1, 1), (-1, 1), (-1, -1), (1, -1))]
    ra, dec = xyz_to_radec(np.array(corners))
    return footprint_region(np.column_stack([ra, dec]), margin_deg)


@dataclass(frozen=True)
class SkyBox:
    """Right ascension and declination ranges in degrees; ``ra_min > ra_max`` wraps through 0."""

    ra_min: float
    ra_max: float
    dec_min: float
    dec_max: float

    def __post_init__(self):
        values = (self.ra_min, self.ra_max, self.dec_min, self.dec_max)
        if not np.all(np.isfinite(values)) or not -90 <= self.dec_min < self.dec_max <= 90:
            raise CatalogError(f"sky box needs -90 <= dec_min < dec_max <= 90 and finite values, got {values}")

    def _contains(self, ra, dec, pad_deg=0.0) -> np.ndarray:
        ra = np.mod(np.asarray(ra, dtype=float), 360.0)
        dec = np.asarray(dec, dtype=float)
        in_dec = (dec >= self.dec_min - pad_deg) & (dec <= self.dec_max + pad_deg)
        lo, hi = np.mod(self.ra_min, 360.0), np.mod(self.ra_max, 360.0)
        if self.ra_max - self.ra_min >= 360.0:
            return in_dec
        cos_dec = np.cos(np.radians(np.minimum(np.abs(dec), 89.999)))
        ra_pad = np.where(np.abs(dec) + pad_deg >= 90.0, 360.0, pad_deg / cos_dec)
        from_lo, to_hi = np.mod(ra - lo, 360.0), np.mod(hi - lo, 360.0)
        in_ra = (from_lo <= to_hi + ra_pad) | (from_lo >= 360.0 - ra_pad)
        return in_dec & in_ra

    def contains(self, ra_deg, dec_deg) -> np.ndarray:
        """True inside the box (edges included)."""
        return self._contains(ra_deg, dec_deg)

    def tiles(self, nside: int) -> np.ndarray:
        """Sorted NESTED pixels overlapping the box (a superset, never missing one)."""
        resolution = nside_to_pixel_resolution(nside).to_value(u.deg)
        _, dec_centres = xyz_to_radec(_pixel_centres(nside))
        near = np.flatnonzero((dec_centres >= self.dec_min - 1.5 * resolution)
                              & (dec_centres <= self.dec_max + 1.5 * resolution))
        points, gap = _boundary_points(nside, near)
        ra, dec = xyz_to_radec(points)
        reached = self._contains(ra, dec, 0.6 * gap[:, None]).any(axis=-1)
        span = np.mod(self.ra_max - self.ra_min, 360.0) if self.ra_max - self.ra_min < 360 else 0.0
        mid_ra = self.ra_min + span / 2
        own = healpix(nside).lonlat_to_healpix(mid_ra * u.deg, (self.dec_min + self.dec_max) / 2 * u.deg)
        return np.union1d(near[reached], np.atleast_1d(own)).astype(np.int64)


def pixels_of(nside: int, ra_deg, dec_deg) -> np.ndarray:
    """NESTED pixel of each (ra, dec) in degrees."""
    return np.asarray(healpix(nside).lonlat_to_healpix(np.asarray(ra_deg) * u.deg,
                                                       np.asarray(dec_deg) * u.deg), dtype=np.int64)


def tiles_for_regions(regions, nside: int) -> np.ndarray:
    """Sorted union of the tiles of several regions."""
    tiles = [np.asarray(region.tiles(nside), dtype=np.int64) for region in regions]
    return np.unique(np.concatenate(tiles)) if tiles else np.zeros(0, dtype=np.int64)


def pixel_cone(nside: int, pixel: int) -> tuple[float, float, float]:
    """(ra, dec, radius) in degrees of a cone that surely contains a NESTED pixel."""
    lon, lat = healpix(nside).healpix_to_lonlat(np.array([pixel]))
    ra, dec = lon.to_value(u.deg)[0], lat.to_value(u.deg)[0]
    points, gap = _boundary_points(nside, np.array([pixel]))
    # Sampled corners bound the pixel to within half a sampling step; 1" more for rounding.
    radius = _angle(points[0], radec_to_xyz(ra, dec)).max() + 0.6 * gap[0] + 1.0 / 3600
    return float(ra), float(dec), float(radius)
