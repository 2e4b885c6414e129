"""Zero point and colour term from Gaia-matched PSF photometry against the true zero point
(the truth header's ``TRUEZP``: the magnitude giving 1 ADU)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from astropy.table import Table

from _phot_scene import scene
from pipeline.measure.calibration import PhotCalError, calibrate_zeropoint
from pipeline.measure.photometry import psf_photometry


@pytest.fixture(scope="module")
def photometry():
    s = scene()
    inst = s.cfg.instrument
    table = psf_photometry(s.data, s.psf, s.catalog["XWIN_IMAGE"], s.catalog["YWIN_IMAGE"],
                           variance=s.rms ** 2, background=s.background, gain=inst.gain,
                           mask=s.mask, saturate=inst.saturate_adu)
    return s, table


def _calibrate(s, table, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the truth header's TPV keywords
        return calibrate_zeropoint(table, s.wcs, s.gaia, s.cfg.instrument.filters["ZTF_r"], **kwargs)


def test_zero_point_recovered_to_a_hundredth(photometry):
    s, table = photometry
    result = _calibrate(s, table)
    true_zp = s.truth_header["TRUEZP"]
    assert abs(result.magzpsci - true_zp) < 0.01
    assert abs(result.magzpsci - true_zp) < 5 * result.magzpsciunc + 0.003
    assert result.colour_fitted and result.clrcoeff == pytest.approx(
        s.cfg.instrument.filters["ZTF_r"].color_slope, abs=0.01)
    assert result.n_used > 100 and result.zp_source == "fit"
    assert 0 < result.magzpscirms < 0.1
    # ZTF's zpmed, clrmed, clrrms, zpclrcov: the median of target = ZP - clrcoeff * colour
    # is about the fit at the median colour.
    assert result.zpmed == pytest.approx(result.magzpsci - result.clrcoeff * result.clrmed, abs=0.02)
    assert 0.3 < result.clrmed < 3.0 and 0.05 < result.clrrms < 2.0
    assert np.isfinite(result.zpclrcov) and result.zpclrcov**2 <= result.magzpsciunc**2 * result.clrcounc**2


def test_header_magzp_is_used(photometry):
    s, table = photometry
    result = _calibrate(s, table, header={"MAGZP": 27.0})
    assert result.magzpsci == 27.0 and result.zp_source == "header"
    assert np.isnan(result.magzpsciunc)
    assert np.isnan(result.zpmed) and np.isnan(result.zpclrcov) and np.isfinite(result.clrmed)
    # The wrong fixed ZP (0.7 mag off) shows: the colour term cannot absorb it all.
    assert result.magzpscirms > 0.1
    right = _calibrate(s, table, header={"MAGZP": float(s.truth_header["TRUEZP"])})
    assert right.magzpscirms < 0.1 and right.clrcoeff == pytest.approx(-0.05, abs=0.01)


def test_too_few_stars_is_a_clear_error(photometry):
    s, table = photometry
    with pytest.raises(PhotCalError, match="zero point"):
        _calibrate(s, table[:3])
    with pytest.raises(PhotCalError, match="lacks column flux"):
        _calibrate(s, Table({"x": [1.0], "y": [1.0]}))
