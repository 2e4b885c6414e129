"""The camera's own sky frame at one exposure, and the way between it and ICRS.

The telescope is equatorially mounted: it points in *observed* coordinates (refracted, of
date) and its camera stays aligned with the hour-angle/declination axes, i.e. with the
apparent pole.  Relative to ICRS the focal plane is therefore

* rotated by the precession and nutation since J2000 (0.1-0.2 degrees, depending on the
  position and epoch),
* stretched by differential annual aberration (up to 1e-4: an arcsecond at the field edge),
* compressed by refraction towards the zenith, and rotated by it too: the refracted
  position of the boresight lies up to ~1 arcmin from the true one, and north there differs
  by the meridian convergence, up to ~2e-4 rad at airmass 1.3.

Each of these is arcsecond-sized at the edge of the 7-degree field and differs between
exposures, so the prior is fitted and stored in the camera frame itself: astropy's
refracting :class:`~astropy.coordinates.HADec` frame for the site, the exposure's time and
its weather and filter (the frame the simulator's optics use).  Standard coordinates in it
are taken with longitude ``-HA``, which grows east like right ascension.  What remains
between exposures is the pointing error and a small position-angle error.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import astropy.units as u
from astropy.coordinates import HADec, SkyCoord
from astropy.time import Time

from pipeline.core.config import SiteConfig
from pipeline.core.refraction import site_location
from pipeline.formats.tpv import sky_to_tangent, tangent_to_sky

__all__ = ["CameraFrame", "rotation_matrix"]


@dataclass(frozen=True)
class CameraFrame:
    """The frame the focal plane is fixed in during one exposure.

    Parameters
    ----------
    obsmjd : float
        UTC MJD of the exposure.
    site : SiteConfig
        The observatory (its fixed location and default humidity).
    pressure_hpa, temperature_c : float
        Weather at the exposure (refraction).
    wavelength_um : float
        Effective wavelength of the filter.
    """

    obsmjd: float
    site: SiteConfig
    pressure_hpa: float
    temperature_c: float
    wavelength_um: float

    def astropy_frame(self) -> HADec:
        return HADec(obstime=Time(self.obsmjd, format="mjd", scale="utc"), location=site_location(self.site),
                     pressure=self.pressure_hpa * u.hPa, temperature=self.temperature_c * u.deg_C,
                     relative_humidity=self.site.relative_humidity, obswl=self.wavelength_um * u.micron)

    def _lonlat(self, ra, dec) -> tuple[np.ndarray, np.ndarray]:
        c = SkyCoord(ra=np.asarray(ra, float) * u.deg, dec=np.asarray(dec, float) * u.deg,
                     frame="icrs").transform_to(self.astropy_frame())
        return -c.ha.to_value(u.deg), c.dec.to_value(u.deg)

    def pointing(self, telra: float, teldec: float) -> tuple[float, float]:
        """The commanded pointing (ICRS degrees) as (-HA, dec) in the camera frame, degrees."""
        lon, lat = self._lonlat(telra, teldec)
        return float(lon), float(lat)

    def to_tangent(self, ra, dec, telra: float, teldec: float,
                   centre_offset: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
        """Standard coordinates (deg; east, north in the camera frame) of ICRS positions.

        The idealized 1-degree-per-pixel TAN projection of the prior method, made in the
        camera frame about the commanded pointing, or about the point ``centre_offset``
        (standard coordinates, deg) from it: the true boresight once the pointing error is
        known.  The projection centre matters: north at a point 20 arcsec east of another
        differs by ~1e-4 rad (meridian convergence).
        """
        lon0, lat0 = self.pointing(telra, teldec)
        centre = tangent_to_sky(centre_offset[0], centre_offset[1], lon0, lat0)
        lon, lat = self._lonlat(ra, dec)
        return sky_to_tangent(lon, lat, float(centre[0]), float(centre[1]))

    def centre_offset(self, xi: float, eta: float, telra: float, teldec: float,
                      centre_offset: tuple[float, float]) -> tuple[float, float]:
        """Offset from the pointing of the point at (xi, eta) about a projection centre."""
        lon0, lat0 = self.pointing(telra, teldec)
        centre = tangent_to_sky(centre_offset[0], centre_offset[1], lon0, lat0)
        point = tangent_to_sky(xi, eta, float(centre[0]), float(centre[1]))
        offset = sky_to_tangent(float(point[0]), float(point[1]), lon0, lat0)
        return float(offset[0]), float(offset[1])

    def to_icrs(self, xi, eta, telra: float, teldec: float) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of :meth:`to_tangent`: ICRS (ra, dec) in degrees."""
        lon, lat = tangent_to_sky(xi, eta, *self.pointing(telra, teldec))
        c = SkyCoord(ha=-np.asarray(lon) * u.deg, dec=np.asarray(lat) * u.deg,
                     frame=self.astropy_frame()).transform_to("icrs")
        return c.ra.deg, c.dec.deg

    def rotation_deg(self, telra: float, teldec: float) -> float:
        """Position angle (deg, east of north) in ICRS of the camera frame's north at the pointing.

        A direction at position angle ``phi`` in the camera frame has ``phi + rotation`` in
        ICRS; the prior's CD matrix is turned by this angle for an exposure.
        """
        lon0, lat0 = self.pointing(telra, teldec)
        # Step towards the frame's north, or away from it within an arcminute of its pole.
        step, turn = (1.0 / 60.0, 0.0) if lat0 < 89.9 else (-1.0 / 60.0, 180.0)
        ra, dec = self.to_icrs(*sky_to_tangent([lon0, lon0], [lat0, lat0 + step], lon0, lat0),
                               telra, teldec)
        pair = SkyCoord(ra=ra * u.deg, dec=dec * u.deg)
        angle = pair[0].position_angle(pair[1]).deg - turn
        return float((angle + 180.0) % 360.0 - 180.0)


def rotation_matrix(angle_deg: float) -> np.ndarray:
    """Turns standard coordinates by a position angle: camera frame to ICRS for ``rotation_deg``."""
    theta = np.deg2rad(angle_deg)
    return np.array([[np.cos(theta), np.sin(theta)], [-np.sin(theta), np.cos(theta)]])

