"""Pixel-scale check and Gaia-match QA, on WCSs from the simulator's optics."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from astropy.table import Table

from pipeline.astrometry.qa import astrometric_qa, match_to_reference
from pipeline.core.focalplane import quadrant_geometry
from pipeline.core.image import header_wcs
from pipeline.astrometry.scale_check import local_pixel_scale, scale_check
from pipeline.simulate.optics import first_guess_header, true_quadrant_solution
from pipeline.simulate.plan import DEFAULT_FIELDS, exposure_at_airmass
from pipeline.formats.tpv import tpv_wcs

FIELD = DEFAULT_FIELDS[0]


@pytest.fixture(scope="module")
def pair(cfg):
    spec = exposure_at_airmass(cfg, FIELD, 2.0)
    geom = quadrant_geometry(cfg.instrument, 16, 1)
    wcs, header, _ = true_quadrant_solution(spec, geom, cfg)
    return spec, geom, wcs, header


def test_local_pixel_scale_is_the_plate_scale(cfg, pair):
    _, _, wcs, _ = pair
    scale = local_pixel_scale(wcs, np.array([1536.0]), np.array([1540.0]))
    assert abs(scale[0] / cfg.instrument.pixel_scale_arcsec - 1) < 0.005


def test_true_solution_against_its_first_guess_is_usable(cfg, pair):
    spec, geom, wcs, _ = pair
    prior = header_wcs(first_guess_header(spec, geom, cfg))
    check = scale_check(wcs, prior, spec_time(spec), cfg.site, 0.64, prior_airmass=spec.airmass)
    assert check.usable and check.reason is None
    assert check.max_abs_pct < 0.2          # a linear guess misses the distortion gradient, far below 1 %
    assert abs(check.airmass_quadrant - spec.airmass) > 0.01     # a corner CCD: its own airmass
    assert abs(check.expected_pct) < 0.02


def test_runaway_corner_distortion_is_unusable(cfg, pair):
    spec, geom, wcs, header = pair
    broken = header.copy()
    # A large quartic term: harmless near the quadrant centre, wild in the far corner.
    x_c, y_c = (np.array(geom.boresight_pixel) * -1 + [3072, 3080]) * 1.012 / 3600
    broken["PV1_12"] = broken.get("PV1_12", 0.0) + 0.02 / x_c ** 3
    check = scale_check(tpv_wcs(broken), wcs, spec_time(spec), cfg.site, 0.64, prior_airmass=spec.airmass)
    assert not check.usable and "pixel scale differs" in check.reason
    assert check.max_abs_pct > 1.0


def spec_time(spec):
    from astropy.time import Time
    return Time(spec.obsmjd + spec.exptime / 172800.0, format="mjd")


def _detections(wcs, n, rng, err_px=0.02):
    x, y = rng.uniform(20, 3050, n), rng.uniform(20, 3060, n)
    ra, dec = wcs.all_pix2world(x, y, 1)
    det = Table({"XWIN_IMAGE": x + rng.normal(0, err_px, n), "YWIN_IMAGE": y + rng.normal(0, err_px, n),
                 "ERRAWIN_IMAGE": np.full(n, err_px), "FLUX_AUTO": np.full(n, 1e5),
                 "FLUXERR_AUTO": np.full(n, 1e5 / rng.uniform(20, 400, n))})
    ref = Table({"X_WORLD": ra, "Y_WORLD": dec, "ERRA_WORLD": np.full(n, 1e-3 / 3.6e6)})
    return det, ref


def test_qa_measures_the_injected_scatter(pair):
    _, _, wcs, _ = pair
    rng = np.random.default_rng(5)
    det, ref = _detections(wcs, 2000, rng)
    qa, matches = astrometric_qa(det, wcs, ref)
    expected = 0.02 * 1.012e3                         # 20 mas per axis
    assert qa.n_matched == 2000
    assert abs(qa.rms_ra_mas / expected - 1) < 0.06 and abs(qa.rms_dec_mas / expected - 1) < 0.06
    assert 0.85 < qa.chi2 < 1.15
    assert abs(qa.rms_ra_highsn_mas / qa.floor_highsn_mas - 1) < 0.15


def test_qa_does_not_hide_a_systematically_wrong_solution(cfg, pair):
    spec, geom, wcs, _ = pair
    rng = np.random.default_rng(6)
    det, ref = _detections(wcs, 1000, rng)
    guess = header_wcs(first_guess_header(dataclasses.replace(spec, pointing_offset_arcsec=(0.0, 0.0)),
                                          geom, cfg))
    qa, _ = astrometric_qa(det, guess, ref, radius_arcsec=60)
    assert qa.rms_ra_mas > 100 or qa.rms_dec_mas > 100          # the linearised guess is not a solution


def test_matching_is_one_to_one():
    di, ri = match_to_reference([10.0, 10.0 + 0.2 / 3600], [0.0, 0.0], [10.0], [0.0], 1.0)
    assert list(di) == [0] and list(ri) == [0]
    di, ri = match_to_reference([], [], [1.0], [1.0], 1.0)
    assert len(di) == 0


def test_qa_sees_a_solution_bent_in_one_region(pair):
    """A corner bent by ~100 mas keeps the global RMS near the noise but shows in its cell."""
    _, geom, wcs, header = pair
    rng = np.random.default_rng(8)
    det, ref = _detections(wcs, 3000, rng)
    bent = header.copy()
    x_far = abs(geom.x0 - 0.5) * 1.012 / 3600.0      # the quadrant's edge nearest the axis, deg
    # x^4 term: 100 mas at that edge, growing outward across the quadrant.
    bent["PV1_12"] = bent.get("PV1_12", 0.0) + (0.1 / 3600) / x_far ** 4
    qa_good, _ = astrometric_qa(det, wcs, ref)
    qa_bent, _ = astrometric_qa(det, tpv_wcs(bent), ref)
    assert qa_good.max_cell_offset_mas < 10
    assert qa_bent.max_cell_offset_mas > 25 and qa_bent.max_cell_significance > 5
