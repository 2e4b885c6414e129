"""Source extraction against synthetic images with known stars."""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from astropy.io import fits
from astropy.io.votable import parse
from astropy.table import Table
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from pipeline.measure.extract import (FLAG_BITS, ExtractionConfig, ExtractionError, catalog_columns,
                              extract_sources, to_scamp_ldac)
from pipeline.core.image import MASK_BITS
from pipeline.formats.ldac import read_ldac, write_ldac

GAIN = 6.2          # e-/ADU
READ_NOISE = 8.0    # e-
SKY_E = 1000.0      # e- per pixel
SATURATE = 50000.0  # ADU
FWHM = 2.2          # px
BETA = 3.0


def moffat_stars(shape, x, y, flux_e, fwhm=FWHM, beta=BETA, half=10, oversample=5):
    """Noise-free image (e-) of circular Moffat stars integrated over the pixels.

    ``x, y`` are 0-based pixel coordinates (pixel centres at integers); each star is
    integrated by ``oversample``-fold sampling of a stamp of half-size ``half`` and
    normalised so that the stamp holds exactly ``flux_e``.
    """
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    ny, nx = shape
    image = np.zeros(ny * nx)
    sub = (np.arange(oversample) + 0.5) / oversample - 0.5
    offsets = np.arange(-half, half + 1)
    fine = (offsets[:, None] + sub[None, :]).ravel()
    for start in range(0, len(x), 400):
        cx = np.rint(x[start:start + 400]).astype(int)
        cy = np.rint(y[start:start + 400]).astype(int)
        fx = cx[:, None] + fine[None, :] - x[start:start + 400, None]
        fy = cy[:, None] + fine[None, :] - y[start:start + 400, None]
        r2 = fy[:, :, None] ** 2 + fx[:, None, :] ** 2
        profile = np.exp(-beta * np.log1p(r2 / alpha ** 2))
        n = len(cx)
        k = 2 * half + 1
        pixels = profile.reshape(n, k, oversample, k, oversample).sum(axis=(2, 4))
        pixels *= (flux_e[start:start + 400] / pixels.sum(axis=(1, 2)))[:, None, None]
        px = cx[:, None, None] + offsets[None, None, :]
        py = cy[:, None, None] + offsets[None, :, None]
        ok = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
        flat = (py * nx + px)[ok]
        image += np.bincount(flat, weights=pixels[ok], minlength=ny * nx)
    return image.reshape(shape)


def observe(stars_e, rng, sky_e=SKY_E):
    """Add sky and Poisson-like Gaussian noise; return ADU clipped at saturation."""
    expected = stars_e + sky_e
    noisy = expected + rng.normal(size=expected.shape) * np.sqrt(expected + READ_NOISE ** 2)
    return np.minimum(noisy / GAIN, SATURATE).astype(np.float32)


def star_field(shape, n, rng, flux_range=(300.0, 3e5), min_sep=0.0, border=8):
    """Random star positions (0-based) and fluxes (e-), log-uniform in flux."""
    xs, ys = [], []
    while len(xs) < n:
        x, y = rng.uniform(border, shape[1] - 1 - border), rng.uniform(border, shape[0] - 1 - border)
        if min_sep == 0 or all((x - a) ** 2 + (y - b) ** 2 > min_sep ** 2 for a, b in zip(xs, ys)):
            xs.append(x)
            ys.append(y)
    flux = np.exp(rng.uniform(*np.log(flux_range), size=n))
    return np.array(xs), np.array(ys), flux


def match(catalog, x, y, radius=1.5):
    """Index of the truth star matched to each catalogue row (-1: none), 1-based catalogue."""
    dist, idx = cKDTree(np.column_stack([x + 1.0, y + 1.0])).query(
        np.column_stack([catalog["XWIN_IMAGE"], catalog["YWIN_IMAGE"]]), distance_upper_bound=radius)
    return np.where(np.isfinite(dist), idx, -1)


def true_snr(flux_e):
    """Point-source S/N of a Moffat star on this sky (noise-equivalent area, all in e-)."""
    alpha = FWHM / (2.0 * np.sqrt(2.0 ** (1.0 / BETA) - 1.0))
    area = 4.0 * np.pi * alpha ** 2 * (BETA - 0.5) ** 2 / ((BETA - 1.0) ** 2 * (2 * BETA - 1.0))
    return flux_e / np.sqrt(flux_e + area * (SKY_E + READ_NOISE ** 2))


@pytest.fixture(scope="module")
def crop_field():
    """A 700x700 field of isolated stars spanning S/N ~3 to ~2000."""
    rng = np.random.default_rng(11)
    shape = (700, 700)
    x, y, flux = star_field(shape, 500, rng, min_sep=16.0)
    data = observe(moffat_stars(shape, x, y, flux), rng)
    result = extract_sources(data, np.zeros(shape, np.int16), GAIN, SATURATE, ExtractionConfig(),
                             read_noise=READ_NOISE)
    return x, y, flux, result


def test_bright_stars_all_found_once(crop_field):
    x, y, flux, result = crop_field
    cat = result.catalog
    matched = match(cat, x, y)
    bright = np.flatnonzero(true_snr(flux) > 20)
    found = np.isin(bright, matched)
    assert found.mean() == 1.0
    assert len(np.unique(matched[matched >= 0])) == (matched >= 0).sum()  # no star twice
    pairs = cKDTree(np.column_stack([cat["XWIN_IMAGE"], cat["YWIN_IMAGE"]])).query_pairs(1.0)
    assert not pairs


def test_windowed_errors_match_scatter(crop_field):
    """rms(residual) / median(error) per S/N bin, and the overall pull, for S/N 20-200.

    The ratio is taken per bin because over the whole 20-200 range the rms is ruled by
    the faintest stars and the median error by the middle ones.
    """
    x, y, flux, result = crop_field
    cat = result.catalog
    idx = match(cat, x, y)
    snr = true_snr(flux[np.maximum(idx, 0)])
    good = (idx >= 0) & (cat["FLAGS"] == 0)
    dx = cat["XWIN_IMAGE"] - (x[idx] + 1.0)
    dy = cat["YWIN_IMAGE"] - (y[idx] + 1.0)
    # for these round stars the error ellipse is a circle to within ~10 %
    err = np.sqrt(0.5 * (cat["ERRAWIN_IMAGE"] ** 2 + cat["ERRBWIN_IMAGE"] ** 2))
    report = []
    for low, high in ((20, 50), (50, 100), (100, 200)):
        sel = good & (snr > low) & (snr < high)
        assert sel.sum() > 40
        rms = np.sqrt(np.mean(np.concatenate([dx[sel], dy[sel]]) ** 2))
        ratio = rms / np.median(err[sel])
        report.append(f"S/N {low}-{high}: {sel.sum()} stars, ratio {ratio:.3f}")
        assert 0.7 < ratio < 1.4
    sel = good & (snr > 20) & (snr < 200)
    pull = np.sqrt(np.mean(np.concatenate([dx[sel] / err[sel], dy[sel] / err[sel]]) ** 2))
    print("\nrms(residual)/median(err): " + "; ".join(report) + f"; rms pull {pull:.3f}")
    assert 0.8 < pull < 1.25


def test_flux_auto_and_fwhm(crop_field):
    x, y, flux, result = crop_field
    cat = result.catalog
    idx = match(cat, x, y)
    sel = (idx >= 0) & (cat["FLAGS"] == 0) & (cat["SNR_WIN"] > 200)
    assert sel.sum() > 50
    ratio = cat["FLUX_AUTO"][sel] * GAIN / flux[idx[sel]]
    print(f"\nFLUX_AUTO/true: median {np.median(ratio):.4f}, "
          f"16-84% {np.percentile(ratio, 16):.4f}-{np.percentile(ratio, 84):.4f}; "
          f"seeing {result.seeing_fwhm_px:.3f} px (true {FWHM})")
    assert abs(np.median(ratio) - 1.0) < 0.03
    assert abs(result.seeing_fwhm_px - FWHM) < 0.15 * FWHM
    # FLUXERR_AUTO matches the scatter about the (aperture-loss) mean ratio
    pull = (ratio - np.median(ratio)) * flux[idx[sel]] / (cat["FLUXERR_AUTO"][sel] * GAIN)
    print(f"FLUX_AUTO pull about the median ratio: std {np.std(pull):.3f}")
    assert 0.7 < np.std(pull) < 1.4


def test_centroids_of_bright_stars_in_low_noise():
    rng = np.random.default_rng(5)
    shape = (300, 300)
    x, y, flux = star_field(shape, 60, rng, flux_range=(2e5, 2e6), min_sep=20.0, border=12)
    stars = moffat_stars(shape, x, y, flux)
    data = observe(stars, rng, sky_e=50.0)  # faint sky: S/N of every star in the thousands
    data = np.minimum(data, SATURATE)
    result = extract_sources(data, None, GAIN, 1e9, ExtractionConfig(), read_noise=READ_NOISE)
    cat = result.catalog
    idx = match(cat, x, y)
    sel = idx >= 0
    assert sel.sum() == len(x)
    dx = cat["XWIN_IMAGE"][sel] - (x[idx[sel]] + 1.0)
    dy = cat["YWIN_IMAGE"][sel] - (y[idx[sel]] + 1.0)
    print(f"\nlow-noise centroid residual: max |dx| {np.abs(dx).max():.4f}, "
          f"max |dy| {np.abs(dy).max():.4f}, rms {np.sqrt(np.mean(dx**2 + dy**2) / 2):.4f} px")
    assert np.abs(dx).max() < 0.02 and np.abs(dy).max() < 0.02


def test_aperture_fluxes_only_at_configured_radii():
    """No FLUX_APER by default; with radii, against the true flux of bright isolated stars."""
    rng = np.random.default_rng(8)
    shape = (300, 300)
    x, y, flux = star_field(shape, 40, rng, flux_range=(1e5, 1e6), min_sep=30.0, border=15)
    data = observe(moffat_stars(shape, x, y, flux), rng)
    assert "FLUX_APER" not in extract_sources(data, None, GAIN, SATURATE, read_noise=READ_NOISE).catalog.colnames
    cat = extract_sources(data, None, GAIN, SATURATE, ExtractionConfig(aperture_radii=(3.0, 10.0)),
                          read_noise=READ_NOISE).catalog
    assert cat["FLUX_APER"].shape == cat["FLUXERR_APER"].shape == (len(cat), 2)
    idx = match(cat, x, y)
    sel = idx >= 0
    assert sel.sum() == len(x)
    ratio = np.asarray(cat["FLUX_APER"][sel], float) * GAIN / flux[idx[sel], None]
    # the Moffat profile's encircled energy within 3 px; the stars end at 10 px (moffat_stars)
    alpha = FWHM / (2.0 * np.sqrt(2.0 ** (1.0 / BETA) - 1.0))
    within_3 = 1.0 - (1.0 + 9.0 / alpha ** 2) ** (1.0 - BETA)
    print(f"\nFLUX_APER/true: 3 px {np.median(ratio[:, 0]):.4f} (Moffat {within_3:.4f}), "
          f"10 px {np.median(ratio[:, 1]):.4f}")
    assert abs(np.median(ratio[:, 1]) - 1.0) < 0.01
    assert abs(np.median(ratio[:, 0]) - within_3) < 0.02
    pull = (ratio[:, 0] - np.median(ratio[:, 0])) * flux[idx[sel]] / (np.asarray(cat["FLUXERR_APER"][sel, 0]) * GAIN)
    assert 0.7 < np.std(pull) < 1.4


def _single_star(flux_e, shape=(80, 80), x0=40.3, y0=39.6, seed=3):
    rng = np.random.default_rng(seed)
    return observe(moffat_stars(shape, np.array([x0]), np.array([y0]), np.array([flux_e])), rng)


def test_saturated_star_is_flagged():
    data = _single_star(3e7)
    assert (data >= SATURATE).sum() > 4
    cat = extract_sources(data, None, GAIN, SATURATE).catalog
    brightest = np.argmax(cat["FLUX_AUTO"])
    assert cat["FLAGS"][brightest] & FLAG_BITS["SATURATED"]
    # the same star unsaturated is not flagged
    cat = extract_sources(_single_star(1e5), None, GAIN, SATURATE).catalog
    assert len(cat) == 1 and not cat["FLAGS"][0] & FLAG_BITS["SATURATED"]


def test_bad_column_next_to_star_sets_flag_and_nan_is_masked():
    data = _single_star(2e5)
    mask = np.zeros(data.shape, np.int32)
    mask[:, 42] = MASK_BITS["BAD"]
    data[10:20, 10:20] = np.nan
    cat = extract_sources(data, mask, GAIN, SATURATE).catalog
    idx = match(cat, np.array([40.3]), np.array([39.6]))
    assert (idx == 0).sum() == 1
    star = np.flatnonzero(idx == 0)[0]
    assert cat["FLAGS"][star] & FLAG_BITS["NEAR_MASKED"]
    assert np.isfinite(cat["XWIN_IMAGE"]).all() and np.isfinite(cat["FLUX_AUTO"]).all()
    # a NaN patch without a mask: still runs, nothing detected in it
    assert not ((cat["X_IMAGE"] > 10) & (cat["X_IMAGE"] < 21)
                & (cat["Y_IMAGE"] > 10) & (cat["Y_IMAGE"] < 21)).any()


def test_empty_image_gives_empty_table_with_all_columns(tmp_path):
    rng = np.random.default_rng(1)
    data = observe(np.zeros((200, 200)), rng)
    result = extract_sources(data, None, GAIN, SATURATE, ExtractionConfig(detect_thresh=5.0,
                                                                            minarea=20))
    assert len(result.catalog) == 0
    assert result.catalog.colnames == list(catalog_columns(0))
    assert result.catalog["FLAGS"].dtype == np.int16
    assert abs(result.background_level - SKY_E / GAIN) < 1.0
    expected_rms = np.sqrt(SKY_E + READ_NOISE ** 2) / GAIN
    assert abs(result.background_rms / expected_rms - 1.0) < 0.05


def test_bad_input_raises_clear_errors():
    with pytest.raises(ExtractionError, match="2-D"):
        extract_sources(np.zeros(10), None, GAIN, SATURATE)
    with pytest.raises(ExtractionError, match="mask shape"):
        extract_sources(np.zeros((10, 10)), np.zeros((5, 5)), GAIN, SATURATE)
    with pytest.raises(ExtractionError, match="no finite pixel"):
        extract_sources(np.full((10, 10), np.nan), None, GAIN, SATURATE)
    with pytest.raises(ExtractionError, match="gain"):
        extract_sources(np.zeros((10, 10)), None, 0.0, SATURATE)


def test_scamp_ldac_round_trip(crop_field, tmp_path):
    _, _, _, result = crop_field
    header = fits.Header({"EXPTIME": 30.0, "FILTER": "ZTF_r"})
    path = to_scamp_ldac(result, header, tmp_path / "cat.ldac")
    objects, imhead = read_ldac(path)
    assert len(objects) == len(result.catalog)
    assert imhead["NAXIS1"] == 700 and imhead["NAXIS2"] == 700 and imhead["EXPTIME"] == 30.0
    assert list(imhead)[:5] == ["SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2"]
    assert objects["FLAGS"].dtype.kind == "i" and objects["FLAGS"].dtype.itemsize == 2
    for name in ("XWIN_IMAGE", "YWIN_IMAGE", "ERRAWIN_IMAGE", "ERRBWIN_IMAGE", "FLUX_AUTO",
                 "FLUXERR_AUTO"):
        np.testing.assert_array_equal(objects[name], result.catalog[name])
    with pytest.raises(ExtractionError, match="NAXIS1"):
        to_scamp_ldac(result, fits.Header({"NAXIS1": 3072, "NAXIS2": 700}), tmp_path / "x.ldac")


def test_full_quadrant():
    """One full 3072 x 3080 quadrant with ~3000 stars: duplicates, accuracy, stage timings."""
    rng = np.random.default_rng(2024)
    shape = (3080, 3072)
    x, y, flux = star_field(shape, 3000, rng, flux_range=(500.0, 1e6))
    data = observe(moffat_stars(shape, x, y, flux, half=8, oversample=3), rng)
    result = extract_sources(data, np.zeros(shape, np.int16), GAIN, SATURATE,
                             read_noise=READ_NOISE)
    cat = result.catalog
    idx = match(cat, x, y)
    # isolated: no other star with S/N > 5 within 12 px (closer ones blend at FWHM 2.2 px)
    visible = true_snr(flux) > 5
    tree = cKDTree(np.column_stack([x[visible], y[visible]]))
    neighbours = tree.query_ball_point(np.column_stack([x, y]), 12.0, return_length=True)
    alone = neighbours - visible == 0
    good = (idx >= 0) & (cat["FLAGS"] == 0)
    isolated = good & alone[np.maximum(idx, 0)] & (true_snr(flux[np.maximum(idx, 0)]) > 100)
    dx = cat["XWIN_IMAGE"][isolated] - (x[idx[isolated]] + 1.0)
    dy = cat["YWIN_IMAGE"][isolated] - (y[idx[isolated]] + 1.0)
    total = sum(result.timings.values())
    print(f"\nfull quadrant: {len(cat)} sources ({result.n_detected} detections, "
          f"{result.n_dropped_drift} window drifts, {result.n_dropped_close} close pairs "
          f"dropped); S/N>100 isolated: {isolated.sum()} stars, rms dx {np.std(dx):.4f}, "
          f"dy {np.std(dy):.4f} px; seeing {result.seeing_fwhm_px:.3f} px")
    print("timings: " + ", ".join(f"{k} {v:.3f}" for k, v in result.timings.items())
          + f"; total {total:.3f} s")
    bright = true_snr(flux) > 20
    found_all = np.isin(np.flatnonzero(bright), idx).mean()
    found_alone = np.isin(np.flatnonzero(bright & alone), idx).mean()
    print(f"completeness at S/N > 20: {found_all:.4f} of all, {found_alone:.4f} of isolated")
    assert found_alone == 1.0 and found_all > 0.97
    assert not cKDTree(np.column_stack([cat["XWIN_IMAGE"], cat["YWIN_IMAGE"]])).query_pairs(1.0)
    assert len(np.unique(idx[idx >= 0])) == (idx >= 0).sum()
    assert isolated.sum() > 300
    assert np.sqrt(np.mean(dx ** 2 + dy ** 2) / 2) < 0.02
    assert result.n_dropped_drift + result.n_dropped_close < 0.05 * result.n_detected


def test_edge_and_blend_flags():
    rng = np.random.default_rng(8)
    shape = (120, 120)
    x = np.array([1.2, 60.0, 66.0, 30.0])   # on the left edge; a blended pair; isolated
    y = np.array([50.0, 60.0, 60.8, 30.0])
    flux = np.array([2e5, 2e5, 1e5, 2e5])
    data = observe(moffat_stars(shape, x, y, flux), rng)
    cat = extract_sources(data, None, GAIN, SATURATE).catalog
    idx = match(cat, x, y)
    flags = {i: int(cat["FLAGS"][np.flatnonzero(idx == i)[0]]) for i in range(4)}
    assert flags[0] & FLAG_BITS["NEAR_EDGE"] and flags[0] & FLAG_BITS["TRUNCATED"]
    assert flags[1] & FLAG_BITS["BLENDED"] and flags[2] & FLAG_BITS["BLENDED"]
    assert flags[3] == 0


@pytest.mark.skipif(shutil.which("scamp") is None, reason="SCAMP is not installed")
def test_scamp_solves_from_our_catalogue(tmp_path):
    """SCAMP reads the LDAC, matches it with a 5-arcsec pointing error and fits it."""
    rng = np.random.default_rng(7)
    shape = (1000, 1000)
    x, y, flux = star_field(shape, 400, rng, flux_range=(2e3, 1e6))
    data = observe(moffat_stars(shape, x, y, flux), rng)
    header = fits.Header({"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": 150.0,
                          "CRVAL2": 30.0, "CRPIX1": 500.0, "CRPIX2": 500.0,
                          "CD1_1": -1.012 / 3600, "CD1_2": 0.0, "CD2_1": 0.0,
                          "CD2_2": 1.012 / 3600, "EXPTIME": 30.0})
    ra, dec = WCS(header).all_pix2world(x + 1.0, y + 1.0, 1)
    write_ldac(tmp_path / "ref.ldac", Table({
        "X_WORLD": ra, "Y_WORLD": dec, "ERRA_WORLD": np.full(len(x), 1e-6),
        "ERRB_WORLD": np.full(len(x), 1e-6), "MAG": 25.0 - 2.5 * np.log10(flux),
        "MAGERR": np.full(len(x), 0.01)}))
    header["CRVAL1"] += 5.0 / 3600.0
    to_scamp_ldac(extract_sources(data, None, GAIN, SATURATE), header, tmp_path / "det.ldac")
    run = subprocess.run(
        ["scamp", "det.ldac", "-ASTREF_CATALOG", "FILE", "-ASTREFCAT_NAME", "ref.ldac",
         "-PROJECTION_TYPE", "TAN", "-MOSAIC_TYPE", "UNCHANGED", "-SOLVE_PHOTOM", "N",
         "-CHECKPLOT_TYPE", "NONE", "-CHECKPLOT_DEV", "NULL", "-WRITE_XML", "Y",
         "-XML_NAME", "scamp.xml", "-AHEADER_GLOBAL", "none.ahead", "-DISTORT_DEGREES", "1",
         "-CROSSID_RADIUS", "2", "-POSITION_MAXERR", "1", "-NTHREADS", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-500:]
    xml = parse(tmp_path / "scamp.xml")
    contrast = xml.get_table_by_id("Fields").array["XY_Contrast"][0]
    groups = xml.get_table_by_id("FGroups").array
    sigma_mas = 1000 * np.asarray(groups["AstromSigma_Reference_HighSN"][0])
    print(f"\nSCAMP: XY contrast {contrast:.1f}, {groups['AstromNDets_Reference'][0]} matches, "
          f"high-S/N sigma {sigma_mas[0]:.1f}, {sigma_mas[1]:.1f} mas")
    assert contrast > 20 and groups["AstromNDets_Reference"][0] > 200
    assert (sigma_mas < 15).all()


def test_background_maps_are_kept_for_later_stages():
    rng = np.random.default_rng(4)
    data = (1000.0 + rng.normal(0, 10, (256, 256))).astype(np.float32)
    result = extract_sources(data, None, 6.2, 50000.0, read_noise=8.0)
    assert result.background_map.shape == data.shape and result.rms_map.shape == data.shape
    assert abs(np.median(result.background_map) - 1000.0) < 1.0
    assert abs(np.median(result.rms_map) - 10.0) < 0.5
