"""Extraction at the densest sky preset ("plane", 60,000 stars per deg^2) against the simulator's truth.

A 1024 x 1024 quadrant (a ninth of a real one, the same density: ~5,000 objects) keeps the
module to a few seconds; the sky is drawn once for the module.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from pipeline.core.config import load_config
from pipeline.core.focalplane import quadrant_geometry
from pipeline.measure._kernels import window_sums
from pipeline.measure.extract import (FLAG_BITS, _window_moments, detect_sources, extract_sources,
                                     measure_detections)
from pipeline.simulate.optics import true_quadrant_solution
from pipeline.simulate.plan import Field, exposure_at_airmass
from pipeline.simulate.render import render_quadrant, sky_electrons_per_pixel
from pipeline.simulate.sky import make_sky

NPIX = 1024
FIELD = Field(600, 150.0, 33.0)


@pytest.fixture(scope="module")
def plane():
    cfg = load_config(overrides={"simulation": {"sky_preset": "plane"},
                                 "instrument": {"quadrant_nx": NPIX, "quadrant_ny": NPIX}})
    spec = exposure_at_airmass(cfg, FIELD, 1.3)
    sky = make_sky(cfg, [(FIELD.fieldid, FIELD.ra, FIELD.dec)], rng_seed=11)
    geom = quadrant_geometry(cfg.instrument, 6, 2)
    wcs, wcs_header, _ = true_quadrant_solution(spec, geom, cfg)
    quadrant = render_quadrant(spec, geom, wcs, sky, cfg, wcs_header=wcs_header)
    inst = cfg.instrument
    result = extract_sources(quadrant.data, quadrant.mask, inst.gain, inst.saturate_adu, cfg.extraction,
                             read_noise=inst.read_noise)
    return cfg, spec, quadrant, result


def _truth_snr(cfg, spec, truth, fwhm_px):
    """S/N of each true object's flux within a Gaussian PSF's effective area (4 pi sigma^2)."""
    flux = np.asarray(truth["flux_e"])
    n_eff = 4 * np.pi * (fwhm_px / 2.3548) ** 2
    noise_per_px = sky_electrons_per_pixel(spec, cfg) + cfg.instrument.read_noise ** 2
    return flux / np.sqrt(flux + n_eff * noise_per_px)


def test_the_plane_preset_is_crowded(plane):
    _, _, quadrant, result = plane
    area_deg2 = (NPIX * 1.012 / 3600) ** 2
    assert len(quadrant.truth) / area_deg2 == pytest.approx(60_000 * 1.02, rel=0.06)   # stars + galaxies
    assert len(result.catalog) > 0.65 * len(quadrant.truth)


def test_isolated_stars_are_found(plane):
    cfg, spec, quadrant, result = plane
    truth = quadrant.truth
    x, y = np.asarray(truth["x"]), np.asarray(truth["y"])
    nearest = cKDTree(np.column_stack([x, y])).query(np.column_stack([x, y]), k=2)[0][:, 1]
    snr = _truth_snr(cfg, spec, truth, result.seeing_fwhm_px)
    inner = (x > 10) & (x < NPIX - 10) & (y > 10) & (y < NPIX - 10)
    isolated = inner & (nearest >= 8) & (np.asarray(truth["kind"]) == "star") & ~np.asarray(truth["saturated"])
    catalog = result.catalog
    found = cKDTree(np.column_stack([catalog["XWIN_IMAGE"], catalog["YWIN_IMAGE"]])).query(
        np.column_stack([x, y]))[0] < 1.5
    for snr_min, completeness in ((20, 0.93), (50, 0.95)):
        chosen = isolated & (snr >= snr_min)
        assert chosen.sum() > 500
        assert found[chosen].mean() >= completeness, (snr_min, found[chosen].mean())


def test_centroids_of_clean_stars_against_truth(plane):
    _, _, quadrant, result = plane
    truth, catalog = quadrant.truth, result.catalog
    x, y, flux = np.asarray(truth["x"]), np.asarray(truth["y"]), np.asarray(truth["flux_e"])
    tree = cKDTree(np.column_stack([x, y]))
    xw, yw = np.asarray(catalog["XWIN_IMAGE"]), np.asarray(catalog["YWIN_IMAGE"])
    dist, idx = tree.query(np.column_stack([xw, yw]))
    # clean: no true neighbour within 4 FWHM holding 1 % of the star's flux or more
    radius = 4 * result.seeing_fwhm_px
    clean = np.array([all(flux[j] < 0.01 * flux[i] for j in near if j != i)
                      for i, near in enumerate(tree.query_ball_point(np.column_stack([x, y]), radius))])
    good = ((dist < 1) & (np.asarray(catalog["FLAGS"]) == 0) & clean[idx] & (np.asarray(catalog["SNR_WIN"]) >= 20)
            & (np.asarray(truth["kind"])[idx] == "star"))
    assert good.sum() > 150
    residual = np.column_stack([xw - x[idx], yw - y[idx]])[good]
    error = np.asarray(catalog["ERRAWIN_IMAGE"], dtype=float)[good]
    assert np.all(np.abs(np.median(residual, axis=0)) < 0.01)
    assert np.all(np.sqrt(np.mean(residual ** 2, axis=0)) < 0.06)
    pull = residual / error[:, None]
    assert np.all((pull.std(axis=0) > 0.7) & (pull.std(axis=0) < 1.15)), pull.std(axis=0)


def _direct_window_sums(image, rms, bad, gain, x, y, sigma, half_light, max_half):
    """The window sums of pipeline.measure.extract, one source at a time, straight from the
    definitions (every pixel within the stamp), for checking the compiled ones."""
    ny, nx = image.shape
    rows = []
    for xc, yc, s, rh in zip(x, y, sigma, half_light):
        h = int(np.clip(np.ceil(4 * s), 2, max_half))
        cx, cy = int(np.rint(xc)), int(np.rint(yc))
        T = Mxx = Myy = Mxy = Cxx = Cyy = Cxy = E = 0.0
        n = S0 = S1 = S2 = Sy = Sxy = 0.0      # the core fit: positive pixels within rh, weights I^2
        for py in range(cy - h, cy + h + 1):
            for px in range(cx - h, cx + h + 1):
                if not (0 <= px < nx and 0 <= py < ny) or bad[py, px]:
                    continue
                dx, dy = px - xc, py - yc
                r2 = dx * dx + dy * dy
                if r2 >= 16 * s * s:
                    continue
                pix = float(image[py, px])
                var = float(rms[py, px]) ** 2 + max(pix, 0.0) / gain
                w = np.exp(-0.5 * r2 / (s * s))
                T += w * pix
                Mxx, Myy, Mxy = Mxx + w * pix * dx * dx, Myy + w * pix * dy * dy, Mxy + w * pix * dx * dy
                E += w * w * var
                Cxx, Cyy, Cxy = Cxx + w * w * var * dx * dx, Cyy + w * w * var * dy * dy, Cxy + w * w * var * dx * dy
                if r2 < rh * rh and pix > 0:
                    n, S0, S1, S2 = n + 1, S0 + pix ** 2, S1 + pix ** 2 * r2, S2 + pix ** 2 * r2 * r2
                    Sy, Sxy = Sy + pix ** 2 * np.log(pix), Sxy + pix ** 2 * np.log(pix) * r2
        rows.append((T, Mxx, Myy, Mxy, E, Cxx, Cyy, Cxy, n, S0, S1, S2, Sy, Sxy))
    return np.array(rows)


def test_compiled_window_sums_equal_the_direct_sums():
    rng = np.random.default_rng(4)
    image = rng.normal(0.0, 5.0, (60, 70)).astype(np.float32)
    image[20:25, 30:34] += 300.0
    rms = np.full(image.shape, 5.0, np.float32)
    bad = np.zeros(image.shape, bool)
    bad[:, 12] = True
    # sources everywhere, edges and corners included (stamps shifted inside the image)
    x = np.array([0.2, 69.4, 35.0, 31.7, 12.3, 3.0, 66.0, 50.5])
    y = np.array([0.4, 59.1, 30.0, 22.2, 40.0, 57.6, 2.2, 10.0])
    sigma = np.array([1.4, 1.6, 3.0, 1.4, 2.0, 5.5, 1.5, 1.4])
    half_light = sigma * 1.2
    direct = _direct_window_sums(image, rms, bad, 6.2, x, y, sigma, half_light, 24)
    sums = window_sums(image, rms, bad.view(np.uint8), 6.2, x, y, sigma, half_light, 24)
    # the compiled rows in the direct sums' order (T, Mxx, Myy, Mxy, E, Cxx, Cyy, Cxy, then the core fit's)
    compiled = sums[[0, 2, 3, 4, 1, 5, 6, 7, 8, 9, 10, 11, 12, 13]].T
    assert (compiled[:, 8] > 0).all()      # every source has core pixels: those sums are checked too
    for i in range(len(x)):
        for part in (slice(0, 8), slice(8, 14)):    # the window's sums, the core fit's (larger)
            np.testing.assert_allclose(compiled[i, part], direct[i, part], rtol=1e-9,
                                       atol=1e-9 * np.abs(direct[i, part]).max())
    # maps or per-source arrays that do not agree are refused, not read past their ends
    with pytest.raises(ValueError, match="one shape"):
        window_sums(image, rms[:30], bad.view(np.uint8), 6.2, x, y, sigma, half_light, 24)
    with pytest.raises(ValueError, match="one length"):
        window_sums(image, rms, bad.view(np.uint8), 6.2, x, y, sigma[:2], half_light, 24)
    # and many sources at once give what each source gives alone
    moments = _window_moments(image, rms, bad, 6.2, x, y, sigma, half_light, 24)
    for i in range(len(x)):
        alone = _window_moments(image, rms, bad, 6.2, x[i:i + 1], y[i:i + 1], sigma[i:i + 1],
                                half_light[i:i + 1], 24)
        assert moments["snr"][i] == pytest.approx(alone["snr"][0], rel=1e-12)
        assert moments["fallback"][i] == alone["fallback"][0]


def test_a_subset_is_measured_as_among_all_detections(plane):
    """The brightest detections measured first and the full catalogue measured after (the
    quadrant runner's order) give every source the values one extract_sources call gives."""
    cfg, _, quadrant, full = plane
    inst = cfg.instrument
    detections = detect_sources(quadrant.data, quadrant.mask, inst.gain, inst.saturate_adu, cfg.extraction,
                                read_noise=inst.read_noise)
    assert len(detections) == full.n_detected
    rows = np.sort(np.argsort(-detections.objects["flux"])[:500])
    subset = measure_detections(detections, rows)
    assert subset.n_detected == full.n_detected and 450 <= len(subset.catalog) <= 500
    again = measure_detections(detections)
    columns = [c for c in full.catalog.colnames if c != "NUMBER"]
    for name in columns:
        np.testing.assert_array_equal(np.asarray(again.catalog[name]), np.asarray(full.catalog[name]), err_msg=name)
    # The subset's sources are the full catalogue's rows at the same windowed positions.
    index = {(x, y): k for k, (x, y) in enumerate(zip(full.catalog["XWIN_IMAGE"], full.catalog["YWIN_IMAGE"]))}
    found = [index.get((x, y)) for x, y in zip(subset.catalog["XWIN_IMAGE"], subset.catalog["YWIN_IMAGE"])]
    assert all(k is not None for k in found)
    for name in columns:
        if name == "FLAGS":     # NOT_POINTLIKE is judged against the seeing of the sources measured
            mask = ~np.int16(FLAG_BITS["NOT_POINTLIKE"])
            np.testing.assert_array_equal(np.asarray(subset.catalog[name]) & mask,
                                          np.asarray(full.catalog[name])[found] & mask)
            continue
        np.testing.assert_array_equal(np.asarray(subset.catalog[name]), np.asarray(full.catalog[name])[found],
                                      err_msg=name)


def test_the_calibration_detection_is_the_bright_part_of_the_full_one(plane):
    """Detected at the astrometry stage's calibration threshold, the image holds the bright
    stars; detected again at the survey's threshold on the same background, it gives exactly
    what one detection at that threshold gives."""
    from dataclasses import replace

    from pipeline.astrometry.solve import calibration_extraction
    from pipeline.core.image import quadrant_image
    from pipeline.measure.extract import detect_again

    cfg, _, quadrant, full = plane
    inst = cfg.instrument
    high = replace(cfg.extraction, detect_thresh=8.0)
    bright = detect_sources(quadrant.data, quadrant.mask, inst.gain, inst.saturate_adu, high,
                            read_noise=inst.read_noise)
    assert 0.2 * full.n_detected < len(bright) < 0.8 * full.n_detected
    again = detect_again(bright, cfg.extraction)
    assert again.config == cfg.extraction and len(again) == full.n_detected
    catalog = measure_detections(again).catalog
    for name in full.catalog.colnames:
        np.testing.assert_array_equal(np.asarray(catalog[name]), np.asarray(full.catalog[name]), err_msg=name)
    # The bright sources' windowed centroids are as close to the truth as the full
    # catalogue's (their isophotes, and so their windows and some deblending, differ with
    # the threshold: 78 % of them are within 0.01 px of the full catalogue's).
    truth = quadrant.truth
    tree = cKDTree(np.column_stack([truth["x"], truth["y"]]))
    errors = []
    for table in (measure_detections(bright).catalog, full.catalog):
        dist, idx = tree.query(np.column_stack([table["XWIN_IMAGE"], table["YWIN_IMAGE"]]))
        good = (dist < 1.0) & (np.asarray(table["SNR_WIN"]) >= 20) & (np.asarray(truth["kind"])[idx] == "star")
        errors.append(dict(zip(idx[good], dist[good])))
    common = sorted(set(errors[0]) & set(errors[1]))
    assert len(common) > 0.9 * len(errors[0]) > 500
    rms = [float(np.sqrt(np.mean([e[k] ** 2 for k in common]))) for e in errors]
    print(f"\n{len(common)} stars at S/N >= 20: centroid error rms {rms[0]:.4f} px (calibration detection), "
          f"{rms[1]:.4f} px (full)")
    assert rms[0] <= 1.05 * rms[1]

    # The astrometry stage's entry: the calibration threshold, or the survey's when that
    # finds too few (a shallow exposure); 0 = the survey's alone.
    image = quadrant_image(quadrant.data, quadrant.header, quadrant.mask, "plane")
    for thresh, least, expected in [(8.0, 100, len(bright)), (8.0, 10 * full.n_detected, full.n_detected),
                                    (0.0, 0, full.n_detected)]:
        detections, rows, extraction = calibration_extraction(image, cfg.extraction, 600, thresh, least)
        assert len(detections) == expected and extraction.n_detected == expected
        assert rows is not None and len(rows) == 600
