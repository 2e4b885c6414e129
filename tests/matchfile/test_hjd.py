"""HJD by the 9 x 9 grid quadratic agrees with astropy's exact per-source light-travel time."""
from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord, SkyOffsetFrame
from astropy.time import Time

from pipeline.matchfile.hjd import exact_light_travel_time, field_centre, fit_light_travel_time, heliocentric_julian_date
from pipeline.core.refraction import site_location


def quadrant(ra0, dec0, n=3000, seed=0):
    rng = np.random.default_rng(seed)
    frame = SkyOffsetFrame(origin=SkyCoord(ra0 * u.deg, dec0 * u.deg))
    sky = SkyCoord(lon=rng.uniform(-0.45, 0.45, n) * u.deg, lat=rng.uniform(-0.45, 0.45, n) * u.deg,
                   frame=frame).icrs
    return sky.ra.deg, sky.dec.deg


@pytest.mark.parametrize("ra0,dec0", [(0.0, 5.0), (359.8, -25.0), (0.3, 60.0), (95.0, 20.0),
                                      (210.0, 86.0), (45.0, 89.7), (300.0, -70.0)])
def test_grid_fit_matches_exact_over_a_quadrant(cfg, ra0, dec0):
    location = site_location(cfg.site)
    ra, dec = quadrant(ra0, dec0)
    for mjd in (60010.25, 60102.4, 60190.1, 60290.9):
        time = Time(mjd, format="mjd", scale="utc")
        fit = fit_light_travel_time(ra, dec, time, location)
        exact = exact_light_travel_time(ra, dec, time, location)
        assert np.max(np.abs(fit.evaluate(ra, dec) - exact)) < 1e-3   # seconds; budget is 0.05 s
        assert np.ptp(exact) > 0.5        # the correction really varies across the quadrant


def test_field_centre_across_ra_zero():
    ra, dec = quadrant(0.1, 10.0)
    assert np.ptp(ra) > 359          # straddles RA = 0
    centre_ra, centre_dec = field_centre(ra, dec)
    assert min(centre_ra, 360 - centre_ra) < 0.1 + 0.05 and abs(centre_dec - 10.0) < 0.05


def test_hjd_at_mid_exposure(cfg):
    location = site_location(cfg.site)
    ra, dec = quadrant(150.0, 30.0, n=200)
    hjd = heliocentric_julian_date(ra, dec, 60050.2, 30.0, location)
    middle = Time(60050.2 + 15.0 / 86400, format="mjd", scale="utc")
    exact = middle.jd + exact_light_travel_time(ra, dec, middle, location) / 86400
    assert np.max(np.abs(hjd - exact)) * 86400 < 1e-3
    assert heliocentric_julian_date([], [], 60050.2, 30.0, location).size == 0


def test_single_source_and_bad_input(cfg):
    location = site_location(cfg.site)
    time = Time(60000.0, format="mjd")
    fit = fit_light_travel_time([10.0], [20.0], time, location)
    assert abs(fit.evaluate([10.0], [20.0])[0] - exact_light_travel_time(10.0, 20.0, time, location)[0]) < 1e-4
    with pytest.raises(ValueError, match="NaN"):
        fit_light_travel_time([10.0, np.nan], [20.0, 1.0], time, location)
