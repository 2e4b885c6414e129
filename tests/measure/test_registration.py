"""Registration (reference -> science grid) against simulator truth.

Two noiseless 1024 x 1024 exposures of one quadrant whose pointings differ by ~40 arcsec
and 0.03 degrees of position angle, each with its true TPV WCS: the first is registered
onto the second's grid and compared with the second's truth.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import sep
from astropy.wcs import WCS
from astropy.wcs.utils import pixel_to_pixel

from pipeline.core.config import load_config
from pipeline.core.image import MASK_BITS, header_wcs
from pipeline.measure.registration import RegistrationConfig, RegistrationError, register_image
from pipeline.simulate.plan import Field, exposure_at_airmass
from pipeline.simulate.run import simulate_quadrant
from pipeline.simulate.sky import make_sky

NPIX = 1024
FIELD = Field(600, 150.0, 33.0)
RCID = 0          # a corner CCD: the strongest distortion


def _sky_adu(quadrant, gain: float) -> np.ndarray:
    """The simulator's sky (mean, linear gradient) in ADU, rebuilt from the truth keywords."""
    header = quadrant.truth_header
    ny, nx = quadrant.data.shape
    u = (np.arange(nx) + 0.5) / nx - 0.5
    v = (np.arange(ny) + 0.5) / ny - 0.5
    return (header["SKYE"] * (1 + header["SKYGRADY"] * v[:, None] + header["SKYGRADX"] * u[None, :])
            / gain).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _pair():
    cfg = load_config(overrides={"instrument": {"quadrant_nx": NPIX, "quadrant_ny": NPIX}})
    sky = make_sky(cfg, [(FIELD.fieldid, FIELD.ra, FIELD.dec)], rng_seed=5)
    specs = [exposure_at_airmass(cfg, FIELD, 1.2, pointing_offset_arcsec=(10.0, -5.0), position_angle_deg=0.0),
             exposure_at_airmass(cfg, FIELD, 1.2, pointing_offset_arcsec=(-25.0, 18.0), position_angle_deg=0.03)]
    quadrants = [simulate_quadrant(spec, RCID, sky, cfg, noiseless=True)[0] for spec in specs]
    images = [q.data - _sky_adu(q, cfg.instrument.gain) for q in quadrants]
    wcss = [header_wcs(q.truth_header) for q in quadrants]
    registered = register_image(images[0], wcss[0], wcss[1], images[1].shape)
    return quadrants, images, wcss, registered


def _isolated_bright_stars(truth, radius: float = 12.0, edge: float = 30.0):
    """Rows of unsaturated, non-variable stars (S/N-rich) with no other object within ``radius``."""
    x, y, flux = (np.asarray(truth[c], dtype=float) for c in ("x", "y", "flux_adu"))
    keep = ((np.asarray(truth["kind"]) == "star") & ~np.asarray(truth["saturated"])
            & ~np.asarray(truth["variable"]) & (flux > 2e3) & (flux < 2e5)
            & (x > edge) & (x < NPIX - edge) & (y > edge) & (y < NPIX - edge))
    d2 = (x[:, None] - x[None, :]) ** 2 + (y[:, None] - y[None, :]) ** 2
    np.fill_diagonal(d2, np.inf)
    return np.flatnonzero(keep & (d2.min(axis=1) > radius ** 2))


def _matched(truth_a, truth_b, rows_b):
    """Rows of A's truth holding the same objects as ``rows_b`` of B's."""
    index_a = {(k, i): n for n, (k, i) in enumerate(zip(truth_a["kind"], truth_a["id"]))}
    pairs = [(index_a.get((truth_b["kind"][r], truth_b["id"][r])), r) for r in rows_b]
    pairs = [(a, b) for a, b in pairs if a is not None]
    return np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])


def test_mapping_follows_the_exact_wcs_mapping():
    _, _, (wcs_a, wcs_b), registered = _pair()
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, NPIX - 1, 3000), rng.uniform(0, NPIX - 1, 3000)
    exact_x, exact_y = pixel_to_pixel(wcs_b, wcs_a, x, y)
    got_x, got_y = registered.input_position(x, y)
    error = np.hypot(got_x - exact_x, got_y - exact_y)
    assert error.max() < 0.005
    assert registered.mapping_error_px < 0.005
    # The grids really differ: tens of pixels of shift and a rotation.
    assert 20 < np.median(np.hypot(exact_x - x, exact_y - y)) < 80
    assert abs(registered.jacobian_median - 1) < 1e-3
    assert set(registered.timings) == {"mapping", "prefilter", "resample", "mask"}


def test_stars_land_on_the_true_positions_with_their_flux():
    (quad_a, quad_b), (image_a, _), _, registered = _pair()
    data = np.ascontiguousarray(registered.data, dtype=np.float64)
    rows_b = _isolated_bright_stars(quad_b.truth)
    # Stars whose aperture has input: the grids are ~40 px apart.
    covered = [r for r in rows_b if np.isfinite(data[int(quad_b.truth["y"][r]) - 13:int(quad_b.truth["y"][r]) + 12,
                                                     int(quad_b.truth["x"][r]) - 13:int(quad_b.truth["x"][r]) + 12]).all()]
    rows_a, rows_b = _matched(quad_a.truth, quad_b.truth, covered)
    assert rows_b.size >= 30
    true_x = np.asarray(quad_b.truth["x"], dtype=float)[rows_b] - 1
    true_y = np.asarray(quad_b.truth["y"], dtype=float)[rows_b] - 1
    win_x, win_y, flag = sep.winpos(data, true_x, true_y, np.full(true_x.size, 1.2))
    assert (flag == 0).all()
    offset = np.hypot(win_x - true_x, win_y - true_y)
    assert np.median(offset) < 0.01 and offset.max() < 0.02

    flux_out = sep.sum_circle(data, true_x, true_y, 10.0)[0]
    ax = np.asarray(quad_a.truth["x"], dtype=float)[rows_a] - 1
    ay = np.asarray(quad_a.truth["y"], dtype=float)[rows_a] - 1
    flux_in = sep.sum_circle(np.ascontiguousarray(image_a, dtype=np.float64), ax, ay, 10.0)[0]
    ratio = flux_out / flux_in
    assert abs(np.median(ratio) - 1) < 0.002 and np.abs(ratio - 1).max() < 0.005


def test_flux_is_conserved_through_a_scale_change():
    """A 1 % finer output grid: each output pixel holds 1.02 input pixels' worth of flux."""
    def tan(scale_arcsec, crpix):
        wcs = WCS(naxis=2)
        wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        wcs.wcs.crval = [150.0, 33.0]
        wcs.wcs.crpix = crpix
        wcs.wcs.cdelt = [-scale_arcsec / 3600, scale_arcsec / 3600]
        return wcs
    yy, xx = np.mgrid[0:200, 0:200]
    stars = [(60.3, 70.8, 5e4), (140.6, 120.2, 2e4), (95.0, 150.4, 1e4)]
    image = sum(f / (2 * np.pi * 1.3 ** 2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.3 ** 2))
                for x, y, f in stars).astype(np.float32)
    # Linear interpolation's smoothing depends on the pixel phase: fluxes to a few 1e-3.
    for order, tolerance in ((3, 1e-4), (1, 5e-3)):
        result = register_image(image, tan(1.0, [100.5, 100.5]), tan(1.01, [98.0, 103.0]), (200, 200),
                                config=RegistrationConfig(order=order))
        assert result.jacobian_median == pytest.approx(1.01 ** 2, rel=1e-5)
        fluxes = []
        for x, y, _ in stars:
            ox, oy = (x - 99.5) / 1.01 + 97, (y - 99.5) / 1.01 + 102
            fluxes.append(sep.sum_circle(np.ascontiguousarray(result.data, dtype=np.float64),
                                         [ox], [oy], 9.0)[0][0])
        assert np.allclose(fluxes, [f for _, _, f in stars], rtol=tolerance)


def test_flagged_and_missing_input_pixels_reach_the_right_output_pixels():
    (_, quad_b), (image_a, _), (wcs_a, wcs_b), _ = _pair()
    mask = np.zeros(image_a.shape, np.int16)
    mask[400:406, 300:303] = MASK_BITS["BAD"]
    mask[700, :] |= MASK_BITS["SATURATED"]
    data = image_a.copy()
    data[200, 800] = np.nan
    result = register_image(data, wcs_a, wcs_b, quad_b.data.shape, mask=mask)

    yy, xx = np.mgrid[0:NPIX, 0:NPIX]
    in_x, in_y = result.input_position(xx, yy)
    near_x, near_y = np.rint(in_x).astype(int), np.rint(in_y).astype(int)

    def within(y0, y1, x0, x1, r=2):
        return (near_y >= y0 - r) & (near_y <= y1 + r) & (near_x >= x0 - r) & (near_x <= x1 + r)

    edge = (near_x < 2) | (near_x > NPIX - 3) | (near_y < 2) | (near_y > NPIX - 3)
    # The nearest input pixel is taken along each axis in turn: where a position sits
    # within 1e-3 px of a rounding boundary, either neighbour is right.
    clear = (np.abs(in_x % 1 - 0.5) > 1e-3) & (np.abs(in_y % 1 - 0.5) > 1e-3)
    assert clear.mean() > 0.99

    def same(bit, expected):
        np.testing.assert_array_equal(((result.mask & MASK_BITS[bit]) > 0)[clear], expected[clear])

    expected_bad = within(400, 405, 300, 302) & ~edge
    assert expected_bad.sum() > 50
    same("BAD", expected_bad)
    same("SATURATED", within(700, 700, 0, NPIX - 1) & ~edge)
    same("NAN", within(200, 200, 800, 800) & ~edge)
    same("EDGE", edge)
    np.testing.assert_array_equal(np.isnan(result.data), (result.mask & MASK_BITS["EDGE"]) > 0)
    assert np.isfinite(result.data[~edge]).all()
    assert edge.sum() > 20 * NPIX          # the 40 px offset leaves a band without input
    assert result.data.dtype == np.float32 and result.mask.dtype == np.int16


def test_bad_inputs_raise_clear_errors():
    (_, quad_b), (image_a, _), (wcs_a, wcs_b), _ = _pair()
    linear = WCS(naxis=2)
    with pytest.raises(RegistrationError, match="celestial"):
        register_image(image_a, linear, wcs_b, (NPIX, NPIX))
    with pytest.raises(RegistrationError, match="2-D image"):
        register_image(image_a[0], wcs_a, wcs_b, (NPIX, NPIX))
    with pytest.raises(RegistrationError, match="mask shape"):
        register_image(image_a, wcs_a, wcs_b, (NPIX, NPIX), mask=np.zeros((10, 10), np.int16))
    with pytest.raises(RegistrationError, match="shape_out"):
        register_image(image_a, wcs_a, wcs_b, (0, NPIX))
    far = wcs_b.deepcopy()
    far.wcs.crval = far.wcs.crval + [3.0, 0.0]
    with pytest.raises(RegistrationError, match="no overlap"):
        register_image(image_a, wcs_a, far, (NPIX, NPIX))
    flipped = wcs_b.deepcopy()
    flipped.wcs.cd = flipped.wcs.cd @ np.diag([-1.0, 1.0])     # mirrored about the image's centre
    flipped.wcs.crpix = [NPIX + 1 - flipped.wcs.crpix[0], flipped.wcs.crpix[1]]
    with pytest.raises(RegistrationError, match="flipped"):
        register_image(image_a, wcs_a, flipped, (NPIX, NPIX))
    with pytest.raises(ValueError, match="order"):
        RegistrationConfig(order=2)


def test_the_configuration_offers_exactly_the_implemented_orders():
    from pipeline.core.config import REGISTRATION_ORDERS
    from pipeline.measure.registration import _TAPS
    assert set(REGISTRATION_ORDERS) == set(_TAPS)
