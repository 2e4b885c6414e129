"""The sky model and the quadrant renderer against their own truth."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy.stats import mad_std, sigma_clipped_stats

from pipeline.core.config import load_config
from pipeline.core.focalplane import quadrant_geometry
from pipeline.core.image import MASK_BITS, REQUIRED_KEYWORDS, header_wcs, validate_header
from pipeline.simulate.optics import true_quadrant_solution
from pipeline.simulate.plan import Field, exposure_at_airmass
from pipeline.simulate.render import render_quadrant, sky_electrons_per_pixel
from pipeline.simulate.sky import GAIA_COLUMNS, make_sky, propagate_positions

FIELD = Field(600, 150.0, 33.0)
NPIX = 1024


def small_config(**simulation):
    base = {"star_density_per_deg2": 300.0, "galaxy_density_per_deg2": 0.0}
    base.update(simulation)
    return load_config(overrides={"simulation": base,
                                  "instrument": {"quadrant_nx": NPIX, "quadrant_ny": NPIX}})


@pytest.fixture(scope="module")
def setup():
    # Bright stars only (a few hundred per quadrant), so many are isolated and none saturates.
    cfg = small_config(star_density_per_deg2=1500.0, g_min_mag=14.0, g_max_mag=17.5)
    spec = exposure_at_airmass(cfg, FIELD, 1.3)
    sky = make_sky(cfg, [(FIELD.fieldid, FIELD.ra, FIELD.dec)], rng_seed=11)
    geom = quadrant_geometry(cfg.instrument, 6, 2)
    wcs, wcs_header, _ = true_quadrant_solution(spec, geom, cfg)
    return cfg, spec, sky, geom, wcs, wcs_header


@pytest.fixture(scope="module")
def noisy(setup):
    cfg, spec, sky, geom, wcs, wcs_header = setup
    return render_quadrant(spec, geom, wcs, sky, cfg, wcs_header=wcs_header)


@pytest.fixture(scope="module")
def noiseless(setup):
    cfg, spec, sky, geom, wcs, wcs_header = setup
    return render_quadrant(spec, geom, wcs, sky, cfg, noiseless=True, wcs_header=wcs_header)


def _isolated_bright_stars(truth, npix, lo=14.0, hi=17.0, edge=30, radius=50.0):
    stars = truth[truth["kind"] == "star"]
    x, y = np.asarray(truth["x"]), np.asarray(truth["y"])
    keep = []
    for row in stars:
        if row["saturated"] or not (lo < row["mag"] < hi and edge < row["x"] < npix - edge and edge < row["y"] < npix - edge):
            continue
        near = np.hypot(x - row["x"], y - row["y"]) < radius
        if near.sum() == 1:
            keep.append(row)
    assert len(keep) >= 5, "the test sky must hold several isolated bright stars"
    return keep


def _background_plane(data, xc, yc, r_in=22, r_out=30):
    """Plane fitted to an annulus: the sky gradient must not bias the first moments."""
    half = r_out + 1
    c0, r0 = int(round(xc)) - 1, int(round(yc)) - 1
    yy, xx = np.mgrid[r0 - half:r0 + half + 1, c0 - half:c0 + half + 1] + 1.0
    cut = data[r0 - half:r0 + half + 1, c0 - half:c0 + half + 1].astype(float)
    ring = (np.hypot(xx - xc, yy - yc) >= r_in) & (np.hypot(xx - xc, yy - yc) < r_out)
    design = np.column_stack([np.ones(ring.sum()), xx[ring] - xc, yy[ring] - yc])
    coef = np.linalg.lstsq(design, cut[ring], rcond=None)[0]
    return lambda x, y: coef[0] + coef[1] * (x - xc) + coef[2] * (y - yc)


def _centroid_and_flux(data, xc, yc, half=15):
    plane = _background_plane(data, xc, yc)
    for _ in range(2):   # recentre the window once on the first estimate
        c0, r0 = int(round(xc)) - 1, int(round(yc)) - 1
        yy, xx = np.mgrid[r0 - half:r0 + half + 1, c0 - half:c0 + half + 1] + 1.0
        box = data[r0 - half:r0 + half + 1, c0 - half:c0 + half + 1] - plane(xx, yy)
        xc, yc = (box * xx).sum() / box.sum(), (box * yy).sum() / box.sum()
    c0, r0 = int(round(xc)) - 1, int(round(yc)) - 1
    yy, xx = np.mgrid[r0 - 20:r0 + 21, c0 - 20:c0 + 21] + 1.0
    return xc, yc, (data[r0 - 20:r0 + 21, c0 - 20:c0 + 21] - plane(xx, yy)).sum()


def test_background_level_and_noise_match_parameters(setup, noisy):
    cfg, spec, *_ = setup
    gain, rn = cfg.instrument.gain, cfg.instrument.read_noise
    sky_e = sky_electrons_per_pixel(spec, cfg)
    good = noisy.mask == 0
    _, median, _ = sigma_clipped_stats(noisy.data[good], sigma=3.0)
    assert median * gain == pytest.approx(sky_e, rel=0.02)
    # Differences of neighbouring pixels cancel the sky gradient; divide by sqrt(2).
    diff = np.diff(noisy.data, axis=1)[good[:, 1:] & good[:, :-1]] / np.sqrt(2)
    assert mad_std(diff) == pytest.approx(np.sqrt(sky_e + rn ** 2) / gain, rel=0.02)


def test_noiseless_centroids_follow_catalogue_and_true_wcs(setup, noiseless):
    cfg, spec, sky, geom, wcs, _ = setup
    gaia = sky.gaia_catalogue()
    index = {sid: i for i, sid in enumerate(gaia["source_id"])}
    epoch = noiseless.truth.meta["EPOCH"]
    offsets = []
    for star in _isolated_bright_stars(noiseless.truth, NPIX):
        cat = gaia[index[star["id"]]]
        ra, dec = propagate_positions(cat["ra"], cat["dec"], cat["pmra"], cat["pmdec"], epoch - cat["ref_epoch"])
        x_exp, y_exp = wcs.all_world2pix(ra, dec, 1)
        x_meas, y_meas, _ = _centroid_and_flux(noiseless.data, star["x"], star["y"])
        offsets.append((x_meas - x_exp, y_meas - y_exp))
    offsets = np.abs(np.array(offsets))
    assert offsets.max() < 0.01, offsets.max()


def test_noiseless_total_flux_equals_truth(noiseless):
    ratios = [(_centroid_and_flux(noiseless.data, s["x"], s["y"])[2] / s["flux_adu"])
              for s in _isolated_bright_stars(noiseless.truth, NPIX)]
    np.testing.assert_allclose(ratios, 1.0, atol=0.005)


def test_saturated_star_leaves_a_flagged_bleed_trail():
    cfg = small_config(star_density_per_deg2=150.0, g_min_mag=9.0, g_max_mag=10.5)
    spec = exposure_at_airmass(cfg, FIELD, 1.3)
    sky = make_sky(cfg, [(FIELD.fieldid, FIELD.ra, FIELD.dec)], rng_seed=3)
    geom = quadrant_geometry(cfg.instrument, 6, 2)
    wcs = true_quadrant_solution(spec, geom, cfg)[0]
    q = render_quadrant(spec, geom, wcs, sky, cfg, noiseless=True)
    saturated = q.truth[q.truth["saturated"]]
    assert len(saturated) >= 1
    sat_level = cfg.instrument.saturate_adu
    star = max(saturated, key=lambda s: s["flux_adu"])
    col, row = int(round(star["x"])) - 1, int(round(star["y"])) - 1
    assert q.data[row, col] == pytest.approx(sat_level)
    assert q.mask[row, col] & MASK_BITS["SATURATED"]
    bleed_rows = np.nonzero(q.mask[:, col] & MASK_BITS["BLEED"])[0]
    assert bleed_rows.size >= 2
    assert bleed_rows.min() < row < bleed_rows.max()      # the trail runs both up and down
    assert np.all(q.data[:, col][q.mask[:, col] & MASK_BITS["SATURATED"] > 0] == np.float32(sat_level))
    assert np.all(q.data <= np.float32(sat_level))


def test_same_seed_gives_identical_images_and_channels_differ(setup, noisy):
    cfg, spec, sky, geom, wcs, wcs_header = setup
    again = render_quadrant(spec, geom, wcs, sky, cfg, wcs_header=wcs_header)
    np.testing.assert_array_equal(again.data, noisy.data)
    np.testing.assert_array_equal(again.mask, noisy.mask)
    assert (noisy.mask & MASK_BITS["BAD"]).any()
    other = quadrant_geometry(cfg.instrument, 6, 3)
    q_other = render_quadrant(spec, other, true_quadrant_solution(spec, other, cfg)[0], sky, cfg)
    assert not np.array_equal(q_other.mask, noisy.mask)


def test_header_follows_contract_with_first_guess_wcs(setup, noisy):
    cfg, spec, sky, geom, wcs, _ = setup
    meta = validate_header(noisy.header)
    assert set(REQUIRED_KEYWORDS) <= set(noisy.header)
    assert (meta.fieldid, meta.ccdid, meta.qid, meta.expid) == (spec.fieldid, 6, 2, spec.expid)
    assert meta.temperature == spec.temperature_c and meta.pressure == spec.pressure_hpa
    assert meta.magzp is None
    guess = header_wcs(noisy.header)
    assert noisy.header["CTYPE1"] == "RA---TAN" and "PV1_1" not in noisy.header
    # The first guess is off from the truth by about the pointing error, never exact.
    centre = (NPIX + 1) / 2
    guess_sky = SkyCoord(*guess.all_pix2world(centre, centre, 1), unit="deg")
    true_sky = SkyCoord(*wcs.all_pix2world(centre, centre, 1), unit="deg")
    assert guess_sky.separation(true_sky).arcsec == pytest.approx(np.hypot(*spec.pointing_offset_arcsec), abs=3.0)
    assert noisy.truth_header["CTYPE1"] == "RA---TPV"
    assert noisy.data.dtype == np.float32 and noisy.mask.dtype == np.int16


def test_gaia_catalogue_has_archive_columns_and_two_parameter_rows():
    cfg = small_config(star_density_per_deg2=400.0)
    gaia = make_sky(cfg, [(FIELD.fieldid, FIELD.ra, FIELD.dec)], rng_seed=9).gaia_catalogue()
    assert gaia.colnames == GAIA_COLUMNS
    assert len(np.unique(gaia["source_id"])) == len(gaia) and gaia["source_id"].dtype == np.int64
    no_pm = np.isnan(gaia["pmra"])
    np.testing.assert_array_equal(no_pm, np.isnan(gaia["pmdec"]))
    assert no_pm.any() and np.all(gaia["phot_g_mean_mag"][no_pm] > 19)
    faint = gaia["phot_g_mean_mag"] > 19
    assert no_pm[faint].mean() == pytest.approx(cfg.simulation.two_parameter_fraction_faint, abs=0.03)
    bright = gaia["phot_g_mean_mag"] < 15
    very_faint = faint & ~no_pm & (gaia["phot_g_mean_mag"] > 20.5)
    assert np.median(gaia["ra_error"][bright]) < 0.05 < 0.5 < np.median(gaia["ra_error"][very_faint])
    assert np.median(gaia["ra_error"][no_pm]) > 2 * np.median(gaia["ra_error"][faint & ~no_pm])


def test_sky_is_uniform_across_ra_zero():
    cfg = small_config(star_density_per_deg2=2000.0)
    sky = make_sky(cfg, [(1, 0.0, 10.0)], rng_seed=2)
    ra, dec = np.asarray(sky.stars["ra"]), np.asarray(sky.stars["dec"])
    band = np.abs(dec - 10.0) < 2
    east, west = np.sum(band & (ra < 2)), np.sum(band & (ra >= 358))
    assert east == pytest.approx(west, rel=4 / np.sqrt(east))
    assert east / (4 * 2 * np.cos(np.deg2rad(10))) == pytest.approx(2000.0, rel=0.05)


def test_proper_motion_propagation_is_exact_for_the_displacement():
    ra, dec = np.array([359.9999, 45.0, 120.0]), np.array([0.0, 89.9, -30.0])
    pmra, pmdec = np.array([1000.0, -500.0, np.nan]), np.array([0.0, 500.0, np.nan])
    moved = propagate_positions(ra, dec, pmra, pmdec, 10.0)
    start, end = SkyCoord(ra, dec, unit="deg"), SkyCoord(*moved, unit="deg")
    np.testing.assert_allclose(start.separation(end).arcsec, [10.0, np.hypot(5.0, 5.0), 0.0], atol=1e-6)
    # Direction: the position angle of the motion is that of (pmra, pmdec) at the start.
    np.testing.assert_allclose(start[:2].position_angle(end[:2]).deg, [90.0, 315.0], atol=1e-4)


def test_light_curves_peak_and_average_as_specified():
    cfg = small_config(variable_fraction=1.0, galaxy_density_per_deg2=1500.0)
    sky = make_sky(cfg, [(FIELD.fieldid, FIELD.ra, FIELD.dec)], rng_seed=4, mjd_range=(61000.0, 61002.0))
    t = sky.transients
    assert len(t) > 0 and set(np.unique(t["kind"])) == {"supernova", "nuclear", "hostless"}
    peak = np.array([sky.transient_mag("ZTF_r", tp, [i]) for i, tp in enumerate(t["t_peak"])]).ravel()
    np.testing.assert_allclose(peak, t["peak_rmag"], atol=1e-9)
    later = np.array([sky.transient_mag("ZTF_r", tp + 30, [i]) for i, tp in enumerate(t["t_peak"])]).ravel()
    assert np.all(later > peak)
    s = sky.stars[:200]
    sine = np.nonzero(s["var_kind"] == 1)[0]
    times = np.linspace(0, 1, 400, endpoint=False)
    for i in sine[:5]:
        period = s["var_period"][i]
        curve = np.array([sky.star_mag("ZTF_g", 60000 + period * f, [i])[0] for f in times])
        base = s["gmag"][i] + 0.35 + 0.55 * s["bp_rp"][i]
        assert curve.mean() == pytest.approx(base, abs=1e-6)
        assert np.ptp(curve) == pytest.approx(s["var_amplitude"][i], rel=1e-3)


@pytest.mark.parametrize("preset", ["high-latitude", "plane"])
def test_sky_presets_follow_their_broken_power_law(preset):
    from pipeline.core.config import SKY_PRESETS
    from pipeline.simulate.sky import _star_mags
    counts = SKY_PRESETS[preset]
    g = _star_mags(np.random.default_rng(5), 400_000, 9.0, 21.0, counts)
    assert g.min() >= 9.0 and g.max() <= 21.0
    # log N(<m) rises slope_bright per magnitude below the break and slope_faint beyond it
    n = {m: np.sum(g < m) for m in (13.0, 16.0, 19.0, 21.0)}
    assert np.log10(n[16.0] / n[13.0]) / 3 == pytest.approx(counts.slope_bright, abs=0.01)
    assert np.log10(n[21.0] / n[19.0]) / 2 == pytest.approx(counts.slope_faint, abs=0.01)


def test_custom_sky_draws_as_before_presets_existed():
    # The default ("custom") sky keeps its single power law and its random stream, so the
    # simulated data of every other test and benchmark is unchanged.
    from pipeline.core.config import SkyCounts
    from pipeline.simulate.sky import _power_law_mags, _star_mags
    single = SkyCounts(5000.0, 0.3, 0.3, 21.0, 1500.0)
    np.testing.assert_array_equal(_star_mags(np.random.default_rng(3), 1000, 9.0, 21.0, single),
                                  _power_law_mags(np.random.default_rng(3), 1000, 9.0, 21.0, 0.3))
