"""The candidate fields ZTF fills are finite where the measurement degenerates: small
difference images with a hot pixel, a profile of the wrong sign and a non-positive aperture
flux; and the real-bogus features keep the encoding the model was trained with."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from pipeline.subtraction.candidates import CANDIDATE_FLAGS, find_candidates
from pipeline.subtraction.features import _FWHM_PER_SIGMA, _shape
from pipeline.subtraction.realbogus import RB_FEATURES, feature_matrix
from test_candidates import ZP, nearest_row, small_pair, small_zogy, tan_wcs

THIN_SIGMA = math.sqrt(1.0 / 12.0)
MEASURED = ("fwhm", "elong", "aimage", "bimage", "magap", "sigmagap", "magapbig", "sigmagapbig", "magdiff",
            "sky", "dsnrms", "ssnrms", "dsdiff", "seeratio", "chipsf")


def _pd_fwhm(result):
    from pipeline.measure.psf import fwhm_of_stamp
    return fwhm_of_stamp(np.asarray(result.tiles[0].psf_d, dtype=np.float64))


def test_a_hot_pixel_gets_sextractors_thin_detection_floor():
    new, ref = small_pair(new_sources=[(60.3, 70.0, 6000.0)], hot_pixels=[(130, 120, 4000.0)], seed=2)
    table = find_candidates(small_zogy(new, ref), tan_wcs(new.shape), ZP)
    star, ray = nearest_row(table, 60.3, 70.0), nearest_row(table, 130, 120)
    assert ray["flagged"] & CANDIDATE_FLAGS["THIN"] and not star["flagged"] & CANDIDATE_FLAGS["THIN"]
    # No extent along the minor axis: SExtractor's 1/12 px^2 on both axes.
    assert ray["bimage"] == pytest.approx(THIN_SIGMA)
    assert THIN_SIGMA <= ray["aimage"] < 1.0 and 1.0 <= ray["elong"] < 3.0
    assert ray["fwhm"] == pytest.approx(_FWHM_PER_SIGMA * math.sqrt(ray["aimage"] * ray["bimage"]))
    assert ray["fwhm"] < 0.5 * star["fwhm"]
    for row in (star, ray):
        assert all(math.isfinite(row[name]) for name in MEASURED), row
    # The real-bogus model still sees what it was trained on: fwhm 0, elong 10.
    features = feature_matrix(table, psf_fwhm=2.0)
    k = list(table["cand_index"]).index(ray["cand_index"])
    assert features[k, RB_FEATURES.index("fwhm_ratio")] == 0.0
    assert features[k, RB_FEATURES.index("elong")] == 10.0


def test_a_profile_of_the_wrong_sign_takes_the_local_psf_shape():
    sigma_w = np.array([1.2, 1.2])
    yy, xx = np.mgrid[-6:7, -6:7]
    blob = np.exp(-0.5 * (xx**2 + yy**2) / 1.1**2)
    stamps = np.stack([-blob, blob])          # no positive windowed flux / a point source
    usable = np.ones(stamps.shape, dtype=bool)
    zero = np.zeros(2)
    a, b, fwhm, elong, resolved, thin = _shape(stamps, usable, zero, zero, zero.astype(int), zero.astype(int),
                                               sigma_w)
    assert not resolved[0] and resolved[1] and not thin.any()
    assert a[0] == b[0] == 1.2 and elong[0] == 1.0
    assert fwhm[0] == pytest.approx(_FWHM_PER_SIGMA * 1.2)
    assert a[1] == pytest.approx(1.1, rel=0.02) and elong[1] == pytest.approx(1.0, abs=0.02)


def test_a_non_positive_aperture_flux_gives_sextractors_99():
    flux = 8000.0
    new, ref = small_pair(new_sources=[(60.0, 60.0, flux), (140.0, 130.0, flux)], seed=1)
    result = small_zogy(new, ref)
    # Turn the difference image's light around the first source negative while its score
    # stays: the aperture then holds no positive flux and the window no positive profile.
    diff = result.diff.copy()
    diff[45:76, 45:76] = -np.abs(diff[45:76, 45:76])
    table = find_candidates(dataclasses.replace(result, diff=diff), tan_wcs(new.shape), ZP)
    odd, clean = nearest_row(table, 60.0, 60.0), nearest_row(table, 140.0, 130.0)
    assert odd["flagged"] & CANDIDATE_FLAGS["APERTURE_NONPOSITIVE"]
    assert odd["magap"] == 99.0 and odd["sigmagap"] == 99.0 and odd["magapbig"] == 99.0
    assert odd["magdiff"] == pytest.approx(99.0 - odd["magpsf"])
    assert odd["flagged"] & CANDIDATE_FLAGS["NO_SHAPE"]
    assert odd["fwhm"] == pytest.approx(_pd_fwhm(result), rel=1e-6) and odd["elong"] == 1.0
    assert odd["seeratio"] == pytest.approx(1.0)
    assert not clean["flagged"] & (CANDIDATE_FLAGS["APERTURE_NONPOSITIVE"] | CANDIDATE_FLAGS["NO_SHAPE"])
    assert abs(clean["magap"] - (ZP - 2.5 * math.log10(flux))) < 3 * clean["sigmagap"] + 0.02
    assert abs(clean["magapbig"] - clean["magap"]) < 3 * clean["sigmagapbig"] + 0.02
    features = feature_matrix(table, psf_fwhm=2.0)
    k = list(table["cand_index"]).index(odd["cand_index"])
    assert features[k, RB_FEATURES.index("magdiff")] == 0.0


def test_sky_and_snr_ratios_on_a_clean_difference():
    flux = 20000.0
    new, ref = small_pair(new_sources=[(90.0, 90.0, flux)], seed=6)
    result = small_zogy(new, ref)
    row = nearest_row(find_candidates(result, tan_wcs(new.shape), ZP), 90.0, 90.0)
    # D has unit noise and a clean background: the annulus median is ~0 within its noise.
    f_d = result.tiles[0].f_d
    assert abs(row["sky"]) * f_d < 0.2
    assert row["dsnrms"] > 5 and row["ssnrms"] > 5
    assert row["dsdiff"] == pytest.approx(row["dsnrms"] - row["ssnrms"])
    assert row["tblid"] == row["cand_index"]
