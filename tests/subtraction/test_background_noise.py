"""ZOGY's background noise in a crowded field, against truth.

A field as crowded as the plane preset (most of its stars too faint to detect) makes sep's
background rms hold the confusion of the unresolved stars, static and so absent from the
difference; the background noise ZOGY needs is the sky's photon noise plus the read noise
(:func:`pipeline.subtraction.difference.background_noise_map`), and Scorr is unit-normal
with it.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.measure.extract import extract_sources
from pipeline.subtraction.difference import background_noise_map
from pipeline.subtraction.zogy import ZogyConfig, zogy_subtract
from test_zogy import gaussian_stamp

SIZE, HALF = 640, 15
SKY, READ_NOISE, GAIN, REF_DEPTH = 400.0, 10.0, 2.0, 4      # e-, e-, e-/ADU, frames in the reference
PSF_NEW, PSF_REF = gaussian_stamp(1.3), gaussian_stamp(1.0)


def _render(x, y, flux_e, psf_sigma):
    image = np.zeros((SIZE + 2 * HALF, SIZE + 2 * HALF))
    for xi, yi, f in zip(x, y, flux_e):
        ix, iy = int(round(xi)), int(round(yi))
        image[iy: iy + 2 * HALF + 1, ix: ix + 2 * HALF + 1] += f * gaussian_stamp(psf_sigma, xi - ix, yi - iy)
    return image[HALF:-HALF, HALF:-HALF]


@pytest.fixture(scope="module")
def crowded():
    """New image (ADU, sky included), reference (background-subtracted ADU, REF_DEPTH frames
    averaged) and the new image's extraction, of one field: 0.06 stars per px^2 with log N
    rising 0.26 per magnitude from 20 e- (far below one pixel's noise) to 2e5 e-.  sep's rms
    comes out 17 % above the photon noise (the plane preset's quadrants: 15-18 %)."""
    rng = np.random.default_rng(21)
    n = int(0.06 * SIZE**2)
    slope = 0.26 / 0.4                       # N(> f) ~ f^-0.65
    flux = 20.0 * (1 - rng.random(n)) ** (-1 / slope)
    flux = np.minimum(flux, 2e5)
    x, y = rng.uniform(0, SIZE - 1, n), rng.uniform(0, SIZE - 1, n)
    new_e = _render(x, y, flux, 1.3) + SKY
    new = (rng.poisson(new_e) + rng.normal(0, READ_NOISE, new_e.shape)) / GAIN
    ref_e = REF_DEPTH * (_render(x, y, flux, 1.0) + SKY)
    ref = (rng.poisson(ref_e) + rng.normal(0, READ_NOISE * math.sqrt(REF_DEPTH), ref_e.shape)
           - REF_DEPTH * SKY) / (REF_DEPTH * GAIN)
    extraction = extract_sources(new.astype(np.float32), None, GAIN, 1e9, read_noise=READ_NOISE)
    return new.astype(np.float32), ref.astype(np.float32), extraction


def _scorr_std(new, ref, extraction, sigma_new) -> float:
    sigma_ref = math.sqrt(REF_DEPTH * (SKY + READ_NOISE**2)) / (REF_DEPTH * GAIN)
    result = zogy_subtract(new - extraction.background_map, ref, PSF_NEW, PSF_REF, sigma_new, sigma_ref,
                           1.0, 1.0, gain_new=GAIN, gain_ref=REF_DEPTH * GAIN, config=ZogyConfig(psf_error=0.0))
    inner = result.scorr[40:-40, 40:-40]
    # Every pixel is near some star here: the robust width of all of them.
    return float(1.4826 * np.median(np.abs(inner - np.median(inner))))


def test_the_photon_noise_is_the_sky_s_and_sep_s_rms_holds_the_confusion(crowded):
    _, _, extraction = crowded
    true_noise = math.sqrt(SKY + READ_NOISE**2) / GAIN
    poisson = background_noise_map(extraction, GAIN, READ_NOISE)
    assert np.median(poisson) == pytest.approx(true_noise, rel=0.03)
    assert np.median(extraction.rms_map) > 1.08 * true_noise
    assert background_noise_map(extraction, GAIN, READ_NOISE, "measured") is extraction.rms_map
    assert background_noise_map(extraction, GAIN, None) is extraction.rms_map


def test_scorr_is_unit_normal_in_a_crowded_field_with_the_photon_noise(crowded):
    new, ref, extraction = crowded
    assert 0.95 <= _scorr_std(new, ref, extraction, background_noise_map(extraction, GAIN, READ_NOISE)) <= 1.05
    assert _scorr_std(new, ref, extraction, extraction.rms_map) < 0.93
