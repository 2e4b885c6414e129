"""The simulator's true WCS and the refraction model it must agree with."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import astropy.units as u
from astropy.coordinates import AltAz, SkyCoord
from astropy.time import Time

from pipeline.core.focalplane import all_quadrants, quadrant_geometry, scale_check_grid
from pipeline.core.refraction import RefractionModel, airmass_at, site_location
from pipeline.simulate.optics import pixels_to_sky, true_boresight, true_quadrant_solution
from pipeline.simulate.plan import DEFAULT_FIELDS, exposure_at_airmass, plan_night
from pipeline.formats.tpv import sky_to_tangent

FIELD = DEFAULT_FIELDS[0]


def test_focal_plane_layout_is_a_gapped_mosaic(cfg):
    quads = all_quadrants(cfg.instrument)
    assert [q.rcid for q in quads] == list(range(64))
    xs = sorted({q.x0 for q in quads})
    assert len(xs) == 8 and np.allclose(np.diff(xs)[::2], 3072)     # quadrants abut inside a CCD
    assert np.allclose(np.diff(xs)[1::2], 3072 + 700)                # CCD gaps
    span = (max(xs) + 3072 - min(xs)) * cfg.instrument.pixel_scale_arcsec / 3600
    assert 7.0 < span < 7.8                                          # ZTF: ~7.5 deg across


@pytest.mark.parametrize("ccdid, qid, airmass", [(6, 1, 1.02), (1, 3, 1.02), (16, 1, 2.5), (4, 4, 2.5)])
def test_true_wcs_reproduces_the_physical_chain(cfg, ccdid, qid, airmass):
    spec = exposure_at_airmass(cfg, FIELD, airmass)
    geom = quadrant_geometry(cfg.instrument, ccdid, qid)
    wcs, header, _ = true_quadrant_solution(spec, geom, cfg)
    rng = np.random.default_rng(3)
    x, y = rng.uniform(1, 3072, 300), rng.uniform(1, 3080, 300)
    ra, dec = pixels_to_sky(spec, geom, x, y, cfg)
    fit_ra, fit_dec = wcs.all_pix2world(x, y, 1)
    err_mas = np.hypot((fit_ra - ra) * np.cos(np.deg2rad(dec)), fit_dec - dec) * 3.6e6
    assert err_mas.max() < 0.1
    back_x, back_y = wcs.all_world2pix(ra, dec, 1, tolerance=1e-10)
    assert np.max(np.hypot(back_x - x, back_y - y)) < 1e-6
    assert header["CTYPE1"] == "RA---TPV" and "PV1_7" in header


def test_boresight_is_off_by_the_pointing_error(cfg):
    spec = exposure_at_airmass(cfg, FIELD, 1.3, pointing_offset_arcsec=(12.0, -25.0))
    ra, dec = true_boresight(spec)
    xi, eta = sky_to_tangent(ra, dec, FIELD.ra, FIELD.dec)
    assert abs(xi * 3600 - 12.0) < 1e-6 and abs(eta * 3600 + 25.0) < 1e-6


def _pixel_area(wcs, x, y, h=8.0):
    ra, dec = wcs.all_pix2world([x, x + h, x], [y, y, y + h], 1)
    xi, eta = sky_to_tangent(ra, dec, ra[0], dec[0])
    return abs((xi[1] - xi[0]) * (eta[2] - eta[0]) - (xi[2] - xi[0]) * (eta[1] - eta[0])) / h ** 2


@pytest.mark.parametrize("ccdid, qid", [(7, 3), (1, 3)])
def test_scale_change_between_airmass_1_and_2_5_matches_the_refraction_model(cfg, ccdid, qid):
    """The simulated images compress with airmass exactly as the refraction model predicts."""
    geom = quadrant_geometry(cfg.instrument, ccdid, qid)
    common = dict(pointing_offset_arcsec=(0.0, 0.0), position_angle_deg=0.0,
                  pressure_hpa=cfg.site.pressure_hpa, temperature_c=cfg.site.temperature_c)
    low = exposure_at_airmass(cfg, FIELD, 1.0005, **common)
    high = exposure_at_airmass(cfg, FIELD, 2.5, **common)
    x, y = 1536.0, 1540.0
    ra, dec = true_quadrant_solution(low, geom, cfg)[0].all_pix2world(x, y, 1)
    model = RefractionModel(cfg.site.pressure_hpa, cfg.site.temperature_c, cfg.site.relative_humidity,
                            cfg.instrument.filters[low.filter].wavelength_um)
    airmasses = [airmass_at(ra, dec, s.obstime if hasattr(s, "obstime") else
                            Time(s.obsmjd + s.exptime / 172800, format="mjd"), cfg.site)[0]
                 for s in (low, high)]
    measured = 100 * (np.sqrt(_pixel_area(true_quadrant_solution(high, geom, cfg)[0], x, y)
                              / _pixel_area(true_quadrant_solution(low, geom, cfg)[0], x, y)) - 1)
    expected = model.scale_change_pct(airmasses[1], airmasses[0])
    assert 0.04 < expected < 0.09          # ~0.06 % at Palomar's pressure
    assert abs(measured - expected) < 0.02 * expected


def test_refraction_model_matches_astropy_refraction(cfg):
    """The analytic compression equals what astropy's refracting AltAz frame does to a star pair."""
    site = cfg.site
    time = Time("2026-03-15T08:00:00")
    plain = AltAz(obstime=time, location=site_location(site))
    refracting = AltAz(obstime=time, location=site_location(site), pressure=site.pressure_hpa * u.hPa,
                       temperature=site.temperature_c * u.deg_C, relative_humidity=site.relative_humidity,
                       obswl=0.64 * u.micron)
    model = RefractionModel(site.pressure_hpa, site.temperature_c, site.relative_humidity, 0.64)
    for alt in (85.0, 50.0, 30.0):
        step = 0.05
        pair = SkyCoord(az=[100.0, 100.0] * u.deg, alt=[alt - step, alt + step] * u.deg, frame=plain)
        observed = pair.icrs.transform_to(refracting)
        true_sep, observed_sep = 2 * step, np.diff(observed.alt.deg)[0]
        vertical, _ = model.compression(1 / np.sin(np.deg2rad(alt)))
        assert abs(true_sep / observed_sep - vertical) < 2e-6


def test_plan_spreads_epochs_over_the_airmass_range(cfg):
    specs = plan_night(cfg, [FIELD], "2026-03-15", epochs_per_night=6, max_airmass=2.5)
    assert len(specs) == 6 and len({s.expid for s in specs}) == 6
    airmass = np.array([s.airmass for s in specs])
    assert airmass.min() < 1.1 and 2.4 < airmass.max() < 2.55
    assert {s.filter for s in specs} == {"ZTF_g", "ZTF_r"}
    again = plan_night(cfg, [FIELD], "2026-03-15", epochs_per_night=6, max_airmass=2.5)
    assert again == specs


def test_exposure_at_airmass_hits_the_airmass(cfg):
    spec = exposure_at_airmass(cfg, FIELD, 2.5, rising=True)
    assert abs(spec.airmass - 2.5) < 1e-3
    assert spec.obsmjd < exposure_at_airmass(cfg, FIELD, 2.5).obsmjd


def test_scale_check_grid_is_the_designed_one():
    x, y = scale_check_grid()
    assert x.shape == (23, 25) and x[0, 0] == 1 and x[0, -1] == 3073 and y[-1, 0] == 3081
    assert np.all(np.diff(x[0]) == 128) and np.all(np.diff(y[:, 0]) == 140)


@pytest.mark.parametrize("ccdid, qid", [(6, 1), (16, 4)])
def test_first_guess_header_is_off_by_about_the_pointing_error(cfg, ccdid, qid):
    from pipeline.core.image import header_wcs
    from pipeline.simulate.optics import first_guess_header
    spec = exposure_at_airmass(cfg, FIELD, 1.8, pointing_offset_arcsec=(20.0, 0.0))
    geom = quadrant_geometry(cfg.instrument, ccdid, qid)
    guess = header_wcs(first_guess_header(spec, geom, cfg))
    true = true_quadrant_solution(spec, geom, cfg)[0]
    x, y = (a.ravel() for a in scale_check_grid())
    ra_g, dec_g = guess.all_pix2world(x, y, 1)
    ra_t, dec_t = true.all_pix2world(x, y, 1)
    xi, eta = sky_to_tangent(ra_g, dec_g, FIELD.ra, FIELD.dec)
    xi_t, eta_t = sky_to_tangent(ra_t, dec_t, FIELD.ra, FIELD.dec)
    offset = np.column_stack([xi - xi_t, eta - eta_t]) * 3600
    # A shift of ~20 arcsec, almost rigid over the quadrant (the linearisation costs < 2 arcsec).
    assert 15 < np.hypot(*offset.mean(axis=0)) < 25
    assert np.max(np.hypot(*(offset - offset.mean(axis=0)).T)) < 2.0
