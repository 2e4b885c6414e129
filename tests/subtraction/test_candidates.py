"""Candidate detection and features against truth, on ZOGY subtractions of synthetic pairs.

The quadrant-like pair comes from tests/subtraction/test_zogy.py (stars in both images, point
transients of known S/N in the new image only); the small scenes here put single
objects where a feature must show: a fading source, a cosmic ray, a dipole, a mask.
"""
from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from pipeline.subtraction.candidates import (CANDIDATE_FLAGS, CandidateConfig, CandidateError,
                                 cutout_stamps, diffmaglim, find_candidates)
from pipeline.core.image import MASK_BITS
from pipeline.subtraction.zogy import ZogyConfig, zogy_subtract
from test_zogy import (CASES, FZ_NEW, FZ_REF, READ_NOISE, REF_DEPTH, REG_SIGMA, SKY_NEW,
                       gaussian_stamp, moffat_stamp, simulate_pair, subtract)

ZP = 25.0
SMALL = 192
HALF = 15                                   # half-size of the 31-px stamps of test_zogy
SIGMA_NEW = math.sqrt(SKY_NEW + READ_NOISE**2)
SIGMA_REF = math.sqrt(REF_DEPTH * (SKY_NEW + READ_NOISE**2)) / REF_DEPTH


def tan_wcs(shape, arcsec_per_px: float = 1.0) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 20.0]
    wcs.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    wcs.wcs.cdelt = [-arcsec_per_px / 3600, arcsec_per_px / 3600]
    return wcs


def mag(flux):
    return ZP - 2.5 * np.log10(flux)


@pytest.fixture(scope="module")
def quadrant():
    psf_new_at, psf_ref_at = CASES["ref_sharper"]
    pair = simulate_pair(3, psf_new_at, psf_ref_at)
    result = subtract(pair, psf_new_at(0, 0, 0, 0), psf_ref_at(0, 0, 0, 0),
                      astrometric_sigma=(REG_SIGMA, REG_SIGMA))
    wcs = tan_wcs(result.diff.shape)
    return pair, result, wcs, find_candidates(result, wcs, ZP)


def match(table, points):
    """Distance (px) from each point (0-based x, y) to the nearest candidate, its row."""
    tree = cKDTree(np.column_stack([table["xpos"] - 1, table["ypos"] - 1]))
    return tree.query(points)


def test_transients_are_found_where_they_are_with_unbiased_magnitudes(quadrant):
    pair, result, _, table = quadrant
    distance, row = match(table, pair["transients"])
    found = distance < 2
    snr = pair["snr"]
    assert found[snr >= 8].mean() >= 0.95
    assert len(table) - found.sum() <= 3                         # false candidates
    bright = found & (snr > 20)
    assert bright.sum() > 30
    assert distance[bright].max() < 0.3 and np.sqrt(np.mean(distance[bright] ** 2)) < 0.15
    measured = found & (snr >= 10)
    rows = table[row[measured]]
    truth = pair["transient_flux"][measured]
    assert np.all(rows["isdiffpos"])
    assert abs(np.mean(rows["magpsf"] - mag(truth))) < 0.02
    pull = (rows["flux"] - truth) / rows["fluxerr"]
    assert 0.9 <= pull.std() <= 1.2
    # magpsf's error is the flux error in magnitudes; the aperture agrees with the PSF fit.
    assert np.allclose(rows["sigmapsf"], 1.0857362 * rows["fluxerr"] / rows["flux"], rtol=1e-6)
    assert abs(np.mean(rows["magap"] - mag(truth))) < 0.03
    assert np.allclose(rows["magdiff"], rows["magap"] - rows["magpsf"])
    # Point sources: a round P_D-like profile, clean box, chi2 of noise.
    assert np.all(rows["nneg"] <= 5) and np.median(rows["sumrat"]) > 0.99
    assert abs(np.median(rows["sharpnessdiff"])) < 0.05
    assert 0.85 < np.median(rows["chipsf"]) < 1.2
    assert np.median(rows["elong"]) < 1.2
    assert np.all(np.isfinite(rows["fwhm"])) and np.all(rows["flagged"] == 0)


def test_table_order_index_units_and_meta(quadrant):
    _, result, wcs, table = quadrant
    assert list(table["cand_index"]) == list(range(len(table)))
    assert np.all(np.diff(np.abs(table["scorr"])) <= 0)
    peak_pixels = result.scorr[np.round(table["ypos"] - 1).astype(int),
                               np.round(table["xpos"] - 1).astype(int)]
    assert np.all(np.abs(peak_pixels) >= 5.0) and np.all(np.abs(table["scorr"]) >= np.abs(peak_pixels))
    assert table["xpos"].unit == "pix" and table["magpsf"].unit == "mag" and table["ra"].unit == "deg"
    ra, dec = wcs.all_pix2world(table["xpos"], table["ypos"], 1)
    assert np.allclose(table["ra"], ra) and np.allclose(table["dec"], dec)
    assert table.meta["n_peaks_total"] == len(table) and table.meta["truncated"] is False
    assert table.meta["threshold"] == 5.0
    assert table.meta["diffmaglim"] == pytest.approx(diffmaglim(result, ZP))
    assert np.all(np.isnan(table["distnr"]))            # no reference catalogue given


def test_a_flood_is_truncated_to_the_strongest_and_says_so(quadrant, caplog):
    _, result, wcs, table = quadrant
    with caplog.at_level(logging.WARNING, logger="skydiff.candidates"):
        short = find_candidates(result, wcs, ZP, config=CandidateConfig(max_candidates=50))
    assert len(short) == 50 and short.meta["truncated"] is True
    assert short.meta["n_peaks_total"] == len(table)
    assert np.abs(short["scorr"]).min() >= np.sort(np.abs(table["scorr"]))[-50] - 0.05
    assert "keeping the 50 highest" in caplog.text


def test_diffmaglim_is_the_5_sigma_psf_flux_of_the_background(quadrant):
    _, result, _, table = quadrant
    expected = ZP - 2.5 * math.log10(5 / math.sqrt(result.f_s))
    # Source and registration noise raise alpha_std slightly at the stars only.
    assert diffmaglim(result, ZP) == pytest.approx(expected, abs=0.02)


# --- small scenes -----------------------------------------------------------------------

#: PSFs of the small scenes: test_zogy's "ref_sharper" case, and ZTF-like 2.4 px FWHMs.
BROAD = (lambda dx, dy: gaussian_stamp(2.0, dx, dy), lambda dx, dy: moffat_stamp(3.0, 3.0, dx, dy))
SHARP = (lambda dx, dy: gaussian_stamp(1.1, dx, dy), lambda dx, dy: gaussian_stamp(1.0, dx, dy))


def small_pair(new_sources=(), ref_sources=(), hot_pixels=(), seed=0, psfs=BROAD):
    """Pair of SMALL x SMALL images: (x, y, flux) point sources (0-based) in each image,
    (x, y, electrons) hot pixels in the new one; noise as test_zogy's pairs."""
    rng = np.random.default_rng(seed)
    images = []
    for sources, scale, stamp in ((new_sources, FZ_NEW, psfs[0]),
                                  (ref_sources, REF_DEPTH * FZ_REF, psfs[1])):
        image = np.zeros((SMALL, SMALL))
        for x, y, flux in sources:
            ix, iy = int(round(x)), int(round(y))
            image[iy - HALF: iy + HALF + 1, ix - HALF: ix + HALF + 1] += (
                scale * flux * stamp(x - ix, y - iy))
        images.append(image)
    new, ref = images
    for x, y, electrons in hot_pixels:
        new[y, x] += electrons
    new = rng.poisson(new + SKY_NEW) - SKY_NEW + rng.normal(0, READ_NOISE, new.shape)
    sky_ref = REF_DEPTH * SKY_NEW
    ref = (rng.poisson(ref + sky_ref) - sky_ref
           + rng.normal(0, READ_NOISE * math.sqrt(REF_DEPTH), ref.shape)) / REF_DEPTH
    return new.astype(np.float32), ref.astype(np.float32)


def small_zogy(new, ref, mask=None, psfs=BROAD, **config):
    return zogy_subtract(new, ref, psfs[0](0, 0), psfs[1](0, 0), SIGMA_NEW, SIGMA_REF, FZ_NEW, FZ_REF,
                         gain_ref=float(REF_DEPTH), mask=None if mask is None else mask != 0,
                         config=ZogyConfig(**{"psf_error": 0.0, **config}))


def nearest_row(table, x, y):
    distance, row = match(table, np.array([[x, y]]))
    assert distance[0] < 1.0, f"no candidate near ({x}, {y})"
    return table[int(row[0])]


def test_a_fading_source_is_a_negative_candidate_with_its_own_flux():
    flux = 8000.0
    new, ref = small_pair(new_sources=[(60.0, 60.0, flux)], ref_sources=[(130.4, 110.7, flux)], seed=1)
    table = find_candidates(small_zogy(new, ref), tan_wcs(new.shape), ZP)
    assert len(table) == 2
    rising, fading = nearest_row(table, 60.0, 60.0), nearest_row(table, 130.4, 110.7)
    assert rising["isdiffpos"] and not fading["isdiffpos"]
    assert fading["scorr"] < -5 and rising["scorr"] > 5
    assert math.hypot(fading["xpos"] - 131.4, fading["ypos"] - 111.7) < 0.3
    for row in (rising, fading):
        assert row["flux"] > 0
        assert abs(row["magpsf"] - mag(flux)) < 3 * row["sigmapsf"] + 0.01
        assert abs(row["magap"] - mag(flux)) < 3 * row["sigmagap"] + 0.02
        assert row["nneg"] <= 2 and row["sumrat"] > 0.95


def test_a_cosmic_ray_is_sharper_than_a_point_source():
    new, ref = small_pair(new_sources=[(60.3, 70.0, 6000.0)], hot_pixels=[(130, 120, 4000.0)],
                          seed=2)
    table = find_candidates(small_zogy(new, ref), tan_wcs(new.shape), ZP)
    star, ray = nearest_row(table, 60.3, 70.0), nearest_row(table, 130, 120)
    assert ray["scorr"] > 10 and star["scorr"] > 10
    assert ray["fwhm"] < 0.8 * star["fwhm"]
    assert ray["sharpnessdiff"] < -0.3 and abs(star["sharpnessdiff"]) < 0.15
    assert ray["chipsf"] > 2 * star["chipsf"]


def test_a_dipole_has_negative_pixels_in_its_box():
    flux = 30000.0
    new, ref = small_pair(new_sources=[(61.0, 70.0, flux), (130.0, 120.0, 0.3 * flux)],
                          ref_sources=[(60.0, 70.0, flux)], seed=3, psfs=SHARP)
    table = find_candidates(small_zogy(new, ref, psfs=SHARP), tan_wcs(new.shape), ZP)
    lobes = table[np.hypot(table["xpos"] - 61.5, table["ypos"] - 71) < 5]
    assert set(lobes["isdiffpos"]) == {True, False}
    clean = nearest_row(table, 130.0, 120.0)
    for lobe in lobes:
        assert lobe["nneg"] >= 3 > clean["nneg"]
        assert lobe["sumrat"] < 0.8 < clean["sumrat"]


def test_masked_pixels_are_counted_and_flagged_pixels_give_no_candidate():
    mask = np.zeros((SMALL, SMALL), dtype=np.int32)
    mask[:, 100] = MASK_BITS["BAD"]
    mask[60, 52] = MASK_BITS["SATURATED"]
    sources = [(101.8, 80.0, 6000.0), (50.0, 60.0, 6000.0), (150.0, 150.0, 6000.0)]
    new, ref = small_pair(new_sources=sources, seed=4)
    result = small_zogy(new, ref, mask=mask, mask_grow=1)
    wcs = tan_wcs(new.shape)
    table = find_candidates(result, wcs, ZP, mask=mask)
    by_column, saturated, clean = (nearest_row(table, x, y) for x, y, _ in sources)
    assert by_column["nbad"] == 5
    assert by_column["flagged"] & CANDIDATE_FLAGS["MASKED"]
    assert by_column["flagged"] & CANDIDATE_FLAGS["NEAR_FLAGGED"]
    assert saturated["nbad"] == 1 and saturated["flagged"] & CANDIDATE_FLAGS["SATURATED"]
    assert clean["nbad"] == 0 and clean["flagged"] == 0
    rows = np.round(table["ypos"] - 1).astype(int)
    cols = np.round(table["xpos"] - 1).astype(int)
    assert not result.flagged[rows, cols].any()
    # A peak on a flagged pixel never makes a candidate, whatever its score.
    flagged = result.flagged.copy()
    flagged[145:156, 145:156] = True
    covered = find_candidates(dataclasses.replace(result, flagged=flagged), wcs, ZP, mask=mask)
    assert len(covered) == len(table) - 1
    assert np.all(np.hypot(covered["xpos"] - 151, covered["ypos"] - 151) > 5)


def test_a_source_half_in_a_flagged_region_is_measured_where_it_is():
    # Scorr is 0 on flagged pixels, so its highest unflagged pixel is at the region's edge,
    # 1.4 px from a source centred just inside; measured there the PSF fit lost 40 % of the
    # flux.  S is not zeroed: its peak is the source's.
    flux = 20000.0
    new, ref = small_pair(new_sources=[(100.0, 80.0, flux), (60.0, 140.0, flux)], seed=10)
    result = small_zogy(new, ref)
    flagged = np.zeros(result.scorr.shape, dtype=bool)
    flagged[:, 94:101] = True
    fake = dataclasses.replace(result, flagged=flagged, scorr=np.where(flagged, 0, result.scorr).astype(np.float32))
    wcs = tan_wcs(new.shape)
    table = find_candidates(fake, wcs, ZP)
    edge, clean = nearest_row(table, 100.0, 80.0), nearest_row(table, 60.0, 140.0)
    assert math.hypot(edge["xpos"] - 101.0, edge["ypos"] - 81.0) < 0.2
    assert abs(edge["magpsf"] - mag(flux)) < 3 * edge["sigmapsf"]
    # The fit used only the unflagged half of the profile: its error is larger than a clean twin's.
    assert edge["sigmapsf"] > 1.4 * clean["sigmapsf"]
    assert edge["flagged"] & CANDIDATE_FLAGS["NEAR_FLAGGED"]
    at_scorr_peak = find_candidates(fake, wcs, ZP, config=CandidateConfig(position_max_shift_px=0))
    stuck = at_scorr_peak[np.argmin(np.hypot(at_scorr_peak["xpos"] - 101.0, at_scorr_peak["ypos"] - 81.0))]
    assert stuck["xpos"] - 101.0 > 1.0 and stuck["magpsf"] - mag(flux) > 0.3


def test_close_peaks_of_one_sign_keep_the_higher(quadrant):
    _, result, wcs, _ = quadrant
    yy, xx = np.mgrid[:result.scorr.shape[0], :result.scorr.shape[1]]
    scorr = np.zeros(result.scorr.shape, dtype=np.float32)
    for x, y, peak in ((200, 300, 9.0), (203, 300, 12.0), (200, 302, -10.0), (500, 300, 8.0),
                       (509, 300, 7.0)):
        scorr += peak * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 0.6**2))
    # S peaks where Scorr does (the candidates are measured where S peaks).
    fake = dataclasses.replace(result, scorr=scorr, score=scorr, flagged=np.zeros(scorr.shape, dtype=bool))
    table = find_candidates(fake, wcs, ZP)
    kept = {(int(round(x - 1)), int(round(y - 1))) for x, y in zip(table["xpos"], table["ypos"])}
    assert kept == {(203, 300), (200, 302), (500, 300), (509, 300)}
    assert table.meta["n_peaks_total"] == 4
    spread = find_candidates(fake, wcs, ZP, config=CandidateConfig(min_separation_px=10))
    assert len(spread) == 3 and 509 not in np.round(spread["xpos"] - 1)


def test_the_nearest_reference_source_is_found():
    new, ref = small_pair(new_sources=[(60.0, 60.0, 6000.0), (140.0, 130.0, 6000.0)], seed=5)
    wcs = tan_wcs(new.shape, arcsec_per_px=1.0)
    # Sources 1.5", 5" and 40" from the first transient; none within 30" of the second.
    xs = np.array([61.5, 60.0, 100.0])
    ys = np.array([60.0, 65.0, 60.0])
    ra, dec = wcs.all_pix2world(xs, ys, 0)
    catalog = Table({"ra": ra, "dec": dec, "mag": [19.1, 18.0, 15.0], "magerr": [0.05, 0.02, 0.01],
                     "sharp": [0.01, 0.2, -0.1], "chi": [1.1, 0.9, 1.3]})
    table = find_candidates(small_zogy(new, ref), wcs, ZP, reference_catalog=catalog)
    near, alone = nearest_row(table, 60.0, 60.0), nearest_row(table, 140.0, 130.0)
    assert near["magnr"] == 19.1 and near["sigmagnr"] == 0.05
    assert near["sharpnr"] == 0.01 and near["chinr"] == 1.1
    assert near["ranr"] == pytest.approx(ra[0]) and near["decnr"] == pytest.approx(dec[0])
    assert near["distnr"] == pytest.approx(1.5, abs=0.3)
    # Nothing within 30": ZTF's -999 in every nearest-source column; no catalogue: NaN.
    assert all(alone[name] == -999 for name in ("distnr", "magnr", "sigmagnr", "sharpnr", "chinr", "ranr", "decnr"))
    unsearched = find_candidates(small_zogy(new, ref), wcs, ZP)
    assert np.isnan(unsearched["distnr"]).all() and np.isnan(unsearched["magnr"]).all()
    with pytest.raises(CandidateError, match="chi"):
        find_candidates(small_zogy(new, ref), wcs, ZP, reference_catalog=catalog["ra", "dec", "mag"])


def test_cutouts_are_centred_and_nan_padded():
    image = np.zeros((SMALL, SMALL), dtype=np.float32)
    image[80, 100] = 1.0                        # 0-based row 80, column 100
    image[5, 2] = 2.0
    stamps = cutout_stamps({"science": image, "difference": -image}, [101.0, 101.4, 3.0],
                           [81.0, 80.6, 6.0])
    assert set(stamps) == {"science", "difference"}
    science = stamps["science"]
    assert science.shape == (3, 63, 63) and science.dtype == np.float32
    for k in (0, 1):
        assert np.unravel_index(np.nanargmax(science[k]), (63, 63)) == (31, 31)
        assert not np.isnan(science[k]).any()
    edge = science[2]                           # image pixel (2, 5) 0-based at its centre
    assert edge[31, 31] == 2.0
    assert np.isnan(edge[:, :29]).all() and np.isnan(edge[:26]).all()
    assert not np.isnan(edge[26:, 29:]).any()
    assert stamps["difference"][0, 31, 31] == -1.0


def test_candidates_and_cutouts_feed_the_alert_packets(quadrant):
    from alerts.packet import AlertContext, candidate_records

    pair, result, _, table = quadrant
    stamps = cutout_stamps({"difference": result.diff}, table["xpos"], table["ypos"])
    rows = np.round(table["ypos"] - 1).astype(int)
    cols = np.round(table["xpos"] - 1).astype(int)
    assert np.array_equal(stamps["difference"][:, 31, 31], result.diff[rows, cols])
    context = AlertContext(jd=2460000.5, fid=2, expid=123456, rcid=10, field=600, programid=1,
                           night="20240101", rfid=1, jdstartref=2459000.5, jdendref=2459100.5,
                           nframesref=20, footprint=((0, 0), (1, 0), (1, 1), (0, 1)))
    records = candidate_records(context, table[:5])
    assert [r["isdiffpos"] for r in records] == ["t"] * 5
    assert records[0]["xpos"] == pytest.approx(table["xpos"][0])
    assert records[0]["nneg"] == table["nneg"][0]


def test_no_peak_gives_an_empty_table_with_every_column(quadrant):
    _, result, wcs, table = quadrant
    empty = find_candidates(result, wcs, ZP, config=CandidateConfig(threshold=1e6))
    assert len(empty) == 0 and empty.colnames == table.colnames
    assert empty.meta["n_peaks_total"] == 0


def test_bad_input_is_named(quadrant):
    _, result, wcs, _ = quadrant
    with pytest.raises(CandidateError, match="mask shape"):
        find_candidates(result, wcs, ZP, mask=np.zeros((10, 10), dtype=np.int32))
    with pytest.raises(CandidateError, match="diff"):
        find_candidates(dataclasses.replace(result, diff=result.diff[:10]), wcs, ZP)
    empty = np.zeros((0, 0), dtype=np.float32)
    with pytest.raises(CandidateError, match="non-empty"):
        find_candidates(dataclasses.replace(result, diff=empty, score=empty, scorr=empty,
                                            alpha=empty, alpha_std=empty,
                                            flagged=empty.astype(bool)), wcs, ZP)
    with pytest.raises(CandidateError, match="wcs"):
        find_candidates(result, None, ZP)
    with pytest.raises(ValueError, match="box"):
        CandidateConfig(box=4)
    with pytest.raises(CandidateError, match="one shape"):
        cutout_stamps({"a": np.zeros((5, 5)), "b": np.zeros((5, 6))}, [1], [1])
    with pytest.raises(CandidateError, match="one length"):
        cutout_stamps({"a": np.zeros((5, 5))}, [1, 2], [1])
