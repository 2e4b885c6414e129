"""characterize_image against the simulator's truth (zero point, photometry, limit)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.io import fits

from _phot_scene import scene
from pipeline.measure.characterize import CharacterizeError, characterize_image


@pytest.fixture(scope="module")
def characterised():
    s = scene()
    inst = s.cfg.instrument
    return s, characterize_image(s.data, s.mask, s.wcs, inst.gain, inst.saturate_adu,
                                 inst.filters["ZTF_r"], gaia=s.gaia, read_noise=inst.read_noise)


def test_zero_point_and_calibrated_magnitudes_match_the_truth(characterised):
    s, ch = characterised
    true_zp = float(s.truth_header["TRUEZP"])
    assert abs(ch.zeropoint - true_zp) < 0.01
    # Bright isolated unflagged stars: calibrated PSF magnitudes against the true magnitudes.
    ph = ch.photometry
    good = (ph["flags"] == 0) & (ph["snr"] > 50)
    stars = s.truth[(s.truth["kind"] == "star") & ~s.truth["variable"]]
    dx = np.asarray(ph["x"])[good][:, None] - np.asarray(stars["x"])[None, :]
    dy = np.asarray(ph["y"])[good][:, None] - np.asarray(stars["y"])[None, :]
    d2 = dx ** 2 + dy ** 2
    nearest = d2.argmin(axis=1)
    close = d2[np.arange(nearest.size), nearest] < 0.5 ** 2
    offset = np.asarray(ph["mag_cal"])[good][close] - np.asarray(stars["mag"])[nearest[close]]
    assert close.sum() > 50
    # The colour term is not applied to mag_cal: the median over stars of all colours stays small.
    assert abs(np.median(offset)) < 0.05


def test_positions_and_limit(characterised):
    s, ch = characterised
    ra, dec = s.wcs.all_pix2world(np.asarray(ch.photometry["x"]), np.asarray(ch.photometry["y"]), 1)
    assert np.allclose(ra, ch.photometry["ra"]) and np.allclose(dec, ch.photometry["dec"])
    # The 5-sigma limit from the sky noise: a ZTF-like 30 s r image reaches about 20.5-21.
    assert 19.5 < ch.limiting_mag < 22.5
    assert set(ch.timings) >= {"extract", "psf", "photometry", "photcal", "total"}


def test_header_zero_point_without_gaia(characterised):
    s, ch = characterised
    inst = s.cfg.instrument
    header = fits.Header({"MAGZP": 26.5})
    again = characterize_image(s.data, s.mask, s.wcs, inst.gain, inst.saturate_adu,
                               inst.filters["ZTF_r"], header=header, extraction=ch.extraction)
    assert again.photcal.zp_source == "header" and again.zeropoint == 26.5
    assert "extract" not in again.timings
    none = characterize_image(s.data, s.mask, s.wcs, inst.gain, inst.saturate_adu,
                              inst.filters["ZTF_r"], extraction=ch.extraction)
    assert none.photcal is None and math.isnan(none.limiting_mag) and "mag_cal" not in none.photometry.colnames


def test_blank_image_is_a_clear_error():
    s = scene()
    inst = s.cfg.instrument
    rng = np.random.default_rng(3)
    blank = (100 + rng.normal(0, 5, (256, 256))).astype(np.float32)
    with pytest.raises(CharacterizeError, match="PSF|extraction"):
        characterize_image(blank, None, s.wcs, inst.gain, inst.saturate_adu, inst.filters["ZTF_r"])
