"""PSF-fit and forced photometry against the simulator's true fluxes."""
from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np
import pytest
from scipy.spatial import cKDTree

from _phot_scene import isolated_stars, scene
from pipeline.measure.photometry import PHOT_FLAGS, PhotometryError, forced_photometry, psf_photometry


def _photometry(s, x, y, **kwargs):
    inst = s.cfg.instrument
    return psf_photometry(s.data, s.psf, x, y, variance=s.rms ** 2, background=s.background,
                          gain=inst.gain, mask=s.mask, saturate=inst.saturate_adu, **kwargs)


@pytest.fixture(scope="module")
def measured():
    s = scene()
    rows = isolated_stars(s.truth)
    cat = s.catalog
    dist, match = cKDTree(np.column_stack([cat["XWIN_IMAGE"], cat["YWIN_IMAGE"]])).query(
        np.column_stack([s.truth["x"][rows], s.truth["y"][rows]]))
    rows, match = rows[dist < 1.0], match[dist < 1.0]
    table = _photometry(s, cat["XWIN_IMAGE"][match], cat["YWIN_IMAGE"][match], fit_positions=True)
    return s, rows, table


@pytest.mark.parametrize("fit_positions", [False, True])
def test_flux_bias_and_pull_of_isolated_stars(fit_positions):
    s = scene()
    rows = isolated_stars(s.truth)
    x, y = np.asarray(s.truth["x"])[rows], np.asarray(s.truth["y"])[rows]
    if fit_positions:
        # Start half a pixel off: the fit has to find the stars.
        x, y = x + 0.3, y - 0.3
    table = _photometry(s, x, y, fit_positions=fit_positions)
    true_flux = np.asarray(s.truth["flux_adu"])[rows]
    ok = (table["flags"] == 0) & (table["snr"] >= 10)
    assert ok.sum() > 200
    ratio = table["flux"][ok] / true_flux[ok]
    pull = (table["flux"][ok] - true_flux[ok]) / table["fluxerr"][ok]
    assert abs(np.median(ratio) - 1) < 0.01
    assert 0.9 < np.std(pull) < 1.2
    mag_bias = np.median(table["mag"][ok] + 2.5 * np.log10(true_flux[ok]))
    assert abs(mag_bias) < 0.02
    assert np.median(np.abs(table["chi2"][ok] - 1)) < 0.2
    assert abs(np.median(table["sharpness"][ok])) < 0.05
    if fit_positions:
        dx = table["x"][ok] - (x[ok] - 0.3)
        assert np.median(np.abs(dx)) < 0.1
        # Position errors hold below S/N 100; brighter, the model's own centring (~0.01 px)
        # dominates the formal error.
        moderate = table["snr"][ok] < 100
        assert 0.8 < np.std(dx[moderate] / table["xerr"][ok][moderate]) < 1.3


def test_fluxes_at_extracted_positions(measured):
    s, rows, table = measured
    ok = (table["flags"] == 0) & (table["snr"] >= 10)
    ratio = table["flux"][ok] / np.asarray(s.truth["flux_adu"])[rows][ok]
    assert abs(np.median(ratio) - 1) < 0.01


def test_forced_photometry_on_empty_sky_is_consistent_with_zero():
    s = scene()
    rng = np.random.default_rng(5)
    x, y = rng.uniform(30, s.data.shape[1] - 30, 3000), rng.uniform(30, s.data.shape[0] - 30, 3000)
    dist, _ = cKDTree(np.column_stack([s.truth["x"], s.truth["y"]])).query(np.column_stack([x, y]))
    empty = dist > 15
    ra, dec = s.wcs.all_pix2world(x[empty], y[empty], 1)
    inst = s.cfg.instrument
    table = forced_photometry(s.data, s.psf, s.wcs, ra, dec, variance=s.rms ** 2,
                              background=s.background, gain=inst.gain, mask=s.mask)
    good = table["flags"] == 0
    assert good.sum() > 50
    pull = np.asarray(table["flux"][good] / table["fluxerr"][good])
    # Robust statistics: cosmic rays are not in the mask, and faint undetected galaxies'
    # light is real flux at a few positions.
    assert abs(np.median(pull)) < 0.15
    assert 0.85 < 1.4826 * np.median(np.abs(pull - np.median(pull))) < 1.2
    np.testing.assert_allclose(table["x"], x[empty], atol=1e-6)


def test_flags_edges_masks_and_off_image():
    s = scene()
    ny, nx = s.data.shape
    mask = np.zeros_like(s.mask)
    mask[500, 500] = 1
    table = psf_photometry(s.data, s.psf, [500.0, 2.0, -50.0, 700.0], [501.0, 300.0, 10.0, 700.0],
                           variance=s.rms ** 2, background=s.background, mask=mask)
    assert table["flags"][0] & PHOT_FLAGS["MASKED"]
    assert table["flags"][1] & PHOT_FLAGS["EDGE"] and np.isfinite(table["flux"][1])
    assert table["flags"][2] & PHOT_FLAGS["OFF_IMAGE"] and np.isnan(table["flux"][2])
    assert table["flags"][3] == 0


def test_saturated_stars_are_flagged():
    s = scene()
    sat = np.asarray(s.truth["saturated"]) & (np.asarray(s.truth["kind"]) == "star")
    if not sat.any():
        pytest.skip("no saturated star in the scene")
    table = _photometry(s, s.truth["x"][sat], s.truth["y"][sat])
    assert np.all(table["flags"] & PHOT_FLAGS["SATURATED"])


def test_bad_inputs_are_clear_errors():
    s = scene()
    with pytest.raises(PhotometryError, match="variance shape"):
        psf_photometry(s.data, s.psf, [10.0], [10.0], variance=np.ones((5, 5)))
    with pytest.raises(PhotometryError, match="equal length"):
        psf_photometry(s.data, s.psf, [10.0, 11.0], [10.0], variance=1.0)
    with pytest.raises(PhotometryError, match="keeps the given positions"):
        forced_photometry(s.data, s.psf, s.wcs, [150.0], [33.0], variance=1.0, fit_positions=True)


def bench_psf_photometry(n: int = 4000):
    """Print PSF photometry times on one core for n sources (fixed and fitted positions)."""
    from pipeline.bench.cpu import pinned_to_one_core
    s = scene()
    rng = np.random.default_rng(1)
    x, y = rng.uniform(1, s.data.shape[1], n), rng.uniform(1, s.data.shape[0], n)
    with pinned_to_one_core():
        for fit in (False, True):
            start = time.perf_counter()
            _photometry(s, x, y, fit_positions=fit)
            print(f"psf_photometry n={n} fit_positions={fit}: {time.perf_counter() - start:.3f} s")


if __name__ == "__main__":
    import sys
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    bench_psf_photometry()


def test_chi_and_sharp_separate_point_sources_galaxies_and_cosmic_rays():
    """chi (reduced chi-square) and sharp on the extracted sources against the simulator's
    truth (stars, galaxies), and on cosmic rays injected as one or two hot pixels on empty sky."""
    s = scene()
    cat = s.catalog
    table = _photometry(s, cat["XWIN_IMAGE"], cat["YWIN_IMAGE"])
    truth_xy = np.column_stack([s.truth["x"], s.truth["y"]])
    dist, nearest = cKDTree(truth_xy).query(np.column_stack([table["x"], table["y"]]))
    kind = np.where(dist < 1.0, np.asarray(s.truth["kind"])[nearest], "")
    measured = np.isfinite(table["flux"]) & (table["flux"] > 0)
    assert np.mean(np.isfinite(table["chi2"][measured]) & np.isfinite(table["sharpness"][measured])) >= 0.99
    stars = measured & (kind == "star") & (table["flags"] == 0)
    galaxies = measured & (kind == "galaxy") & (table["flags"] == 0) & (table["snr"] >= 10)
    rng = np.random.default_rng(1)
    x, y = rng.uniform(40, s.data.shape[1] - 40, 300), rng.uniform(40, s.data.shape[0] - 40, 300)
    empty = cKDTree(truth_xy).query(np.column_stack([x, y]))[0] > 15
    x, y = np.round(x[empty]), np.round(y[empty])
    data = s.data.copy()
    for col, row in zip(x.astype(int) - 1, y.astype(int) - 1):
        data[row, col:col + rng.integers(1, 3)] += rng.uniform(300, 3000)
    hits = _photometry(replace(s, data=data), x, y)
    hits = hits[np.isfinite(hits["flux"]) & (hits["flux"] > 0)]
    sharp_star = np.asarray(table["sharpness"][stars])
    print(f"\nstars {stars.sum()}: chi median {np.median(table['chi2'][stars]):.3f}, sharp median "
          f"{np.median(sharp_star):+.3f}, |sharp| median {np.median(np.abs(sharp_star)):.3f}, 5-95 % "
          f"{np.percentile(sharp_star, [5, 95]).round(3)}; galaxies {galaxies.sum()}: sharp median "
          f"{np.median(table['sharpness'][galaxies]):+.3f}; cosmic rays {len(hits)}: sharp median "
          f"{np.median(hits['sharpness']):+.2f}")
    assert stars.sum() > 500 and galaxies.sum() > 30 and len(hits) > 150
    assert 0.8 <= np.median(table["chi2"][stars]) <= 1.3
    assert np.median(np.abs(sharp_star)) <= 0.1
    # One cut at +-0.3 keeps 95 % of the stars and drops 90 % of galaxies and cosmic rays.
    assert np.mean(np.abs(sharp_star) < 0.3) >= 0.95
    assert np.mean(table["sharpness"][galaxies] > 0.3) >= 0.9
    assert np.mean(hits["sharpness"] < -0.3) >= 0.9
