"""SCAMP runner and .head handling, end to end against the real SCAMP binary.

The synthetic quadrants (``_scamp_fixtures``) have a known TPV WCS; the prior given to
SCAMP is off by ~20 arcsec in pointing and lacks the quadratic distortion terms, as the
focal-plane prior of a real exposure would be.
"""
from __future__ import annotations

import os
import stat
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from pipeline.core.config import AstrometryConfig
from pipeline.core.focalplane import scale_check_grid
from pipeline.astrometry.scamp import (ScampError, ScampInputError, ScampNotFoundError, run_scamp_pass,
                            scamp_parameters, solve_with_scamp)
from pipeline.formats.scamp_head import (WcsHeaderError, ahead_text, apply_wcs_header, is_wcs_keyword,
                               parse_head_text, read_head, strip_wcs_keywords,
                               wcs_from_header, write_ahead)

from _scamp_fixtures import make_quadrant, shifted_prior, write_catalogues

SCAMP = "/usr/bin/scamp"
pytestmark = pytest.mark.skipif(not Path(SCAMP).exists(), reason="SCAMP not installed")

# The production settings (pattern matching at 2 arcsec resolution with the brightest 500
# detections: pass 1 in a fraction of SCAMP's own defaults' time), two threads and a generous
# timeout, which keeps this file inside its time budget on two shared cores.
FAST = AstrometryConfig(scamp_binary=SCAMP, scamp_threads=2, scamp_timeout_s=120.0)


def wcs_error_mas(solved_header: fits.Header, quadrant) -> tuple[float, float]:
    """RMS and maximum sky distance (mas) between a WCS and the truth over the scale grid."""
    x, y = scale_check_grid()
    solved = wcs_from_header(solved_header, quadrant.shape)
    truth = quadrant.true_wcs
    sep = truth.pixel_to_world(x.ravel() - 1, y.ravel() - 1).separation(
        solved.pixel_to_world(x.ravel() - 1, y.ravel() - 1)).to_value("mas")
    return float(np.sqrt(np.mean(sep ** 2))), float(sep.max())


@pytest.fixture(scope="module")
def inner(tmp_path_factory):
    """A quadrant next to the boresight (CRPIX just off its corner) and its catalogues."""
    quadrant = make_quadrant(seed=1, ccdid=6, qid=1)
    folder = tmp_path_factory.mktemp("inner")
    return quadrant, *write_catalogues(quadrant, folder)


@pytest.fixture(scope="module")
def outer(tmp_path_factory):
    """A corner quadrant of the camera: CRPIX ~3 degrees away, strong TPV terms."""
    quadrant = make_quadrant(seed=2, ccdid=16, qid=1)
    folder = tmp_path_factory.mktemp("outer")
    return quadrant, *write_catalogues(quadrant, folder)


# ----------------------------------------------------------------- .head / .ahead handling

def test_strip_wcs_keywords_removes_every_convention():
    header = fits.Header()
    header["NAXIS1"], header["FILTER"], header["EXPTIME"] = 3072, "ZTF_r", 30.0
    stale = ["CTYPE1", "CRVAL2", "CRPIX1", "CD1_2", "PC2_1", "CDELT1", "CROTA2", "PV1_5",
             "PV2_10", "PROJP1", "LONPOLE", "LATPOLE", "RADESYS", "EQUINOX", "WCSAXES",
             "A_ORDER", "B_2_0", "AP_0_1", "BP_ORDER", "CUNIT1", "CTYPE1A", "EPOCH"]
    for key in stale:
        header[key] = 1.0
    header.append(("PV1_5", 2.0))           # a duplicate must go too
    stripped = strip_wcs_keywords(header)
    assert list(stripped.keys()) == ["NAXIS1", "FILTER", "EXPTIME"]
    assert all(is_wcs_keyword(k) for k in stale)
    assert not any(is_wcs_keyword(k) for k in ("NAXIS1", "FILTER", "AIRMASS", "ASTRRMS1"))


def test_apply_wcs_header_ignores_stale_pc_cdelt_and_pv(outer):
    quadrant = outer[0]
    image_header = quadrant.image_header          # stale TAN in PC/CDELT form + a PV term
    applied = apply_wcs_header(image_header, quadrant.true_header)
    assert "CDELT1" not in applied and "PC1_1" not in applied
    assert applied["PV1_5"] == quadrant.true_header["PV1_5"]
    assert applied["FILTER"] == "ZTF_r" and applied["NAXIS1"] == 3072
    x, y = scale_check_grid()
    got = WCS(applied).all_pix2world(x.ravel(), y.ravel(), 1)
    want = quadrant.true_wcs.all_pix2world(x.ravel(), y.ravel(), 1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


def test_read_head_drops_non_ascii(tmp_path):
    text = ("COMMENT   (c) 2010-2018 Sorbonne Universit\u00e9/CNRS\n"
            "CTYPE1  = 'RA---TPV'\nCTYPE2  = 'DEC--TPV'\nCRVAL1  =   2.1E+02\n"
            "CRVAL2  =   3.5E+01\nCRPIX1  = 1.0\nCRPIX2  = 1.0\nCD1_1   = -2.8E-04\n"
            "CD2_2   = 2.8E-04\nEND     \n")
    path = tmp_path / "x.head"
    path.write_bytes(text.encode("utf-8"))
    with pytest.raises(UnicodeError):         # the trap this function exists for
        fits.Header.fromtextfile(path)
    header = read_head(path)
    assert header["CRVAL1"] == 210.0 and header["CTYPE2"] == "DEC--TPV"
    wcs = wcs_from_header(header, (3080, 3072))
    assert wcs.pixel_shape == (3072, 3080)
    with pytest.raises(WcsHeaderError, match="no CTYPE"):
        parse_head_text("FILTER  = 'r'\nEND\n", source="bad.head")
    with pytest.raises(WcsHeaderError, match="missing.head"):
        read_head(tmp_path / "missing.head")


def test_write_ahead_is_scamp_readable_ascii(tmp_path, outer):
    quadrant = outer[0]
    path = write_ahead(tmp_path / "q.ahead", quadrant.ahead)
    raw = path.read_bytes()
    raw.decode("ascii")
    lines = raw.decode().splitlines()
    assert all(len(line) == 80 for line in lines) and lines[-1].rstrip() == "END"
    # SCAMP reads "5E-05" as the integer 5: every float value carries a decimal point.
    for line in lines:
        if line.startswith("PV1_7"):
            assert "." in line.split("=")[1]
    back = read_head(path)
    for key in ("CRVAL1", "CRVAL2", "CD1_1", "PV1_7", "PV2_9"):
        # 20-column FITS floats keep at least 14 significant digits.
        assert back[key] == pytest.approx(quadrant.ahead[key], rel=1e-13)
    from_wcs = parse_head_text(ahead_text(wcs_from_header(quadrant.ahead, quadrant.shape)))
    assert "CD1_1" in from_wcs and "PC1_1" not in from_wcs and "NAXIS1" not in from_wcs
    x, y = scale_check_grid()
    np.testing.assert_allclose(WCS(from_wcs).all_pix2world(x.ravel(), y.ravel(), 1),
                               WCS(quadrant.ahead).all_pix2world(x.ravel(), y.ravel(), 1),
                               rtol=0, atol=1e-9)


# ------------------------------------------------------------------------- settings

def test_settings_carry_the_two_pass_recipe():
    settings = AstrometryConfig(position_maxerr_arcmin=4.0)
    first, second = scamp_parameters(settings, 1), scamp_parameters(settings, 2)
    assert first["MATCH"] == "Y" and first["STABILITY_TYPE"] == "PRE-DISTORTED"
    assert first["FOCDISTORT_DEGREE"] == "2" and first["POSITION_MAXERR"] == "4"
    assert first["POSANGLE_MAXERR"] == "0.5" and first["PIXSCALE_MAXERR"] == "1.02"
    assert first["CROSSID_RADIUS"] == "3" and first["MATCH_RESOL"] == "2" and first["MATCH_NMAX"] == "500"
    assert second["MATCH"] == "N" and second["STABILITY_TYPE"] == "INSTRUMENT"
    assert second["DISTORT_DEGREES"] == "4" and second["CROSSID_RADIUS"] == "1.5"
    for common in (first, second):
        assert common["ASTREF_CATALOG"] == "FILE" and common["PROJECTION_TYPE"] == "TPV"
        assert common["SOLVE_PHOTOM"] == "N" and common["CHECKPLOT_DEV"] == "NULL"
        assert common["SN_THRESHOLDS"] == "10,100" and common["WRITE_XML"] == "Y"
    with pytest.raises(ValueError, match="degree 1"):
        AstrometryConfig(focdistort_degree=1)


# ------------------------------------------------------------------- real solutions

def test_solve_inner_quadrant(inner, tmp_path):
    quadrant, detections, reference = inner
    result = solve_with_scamp(detections, reference, quadrant.ahead, quadrant.shape,
                              FAST, tmp_path)
    assert result.ok, result.reason
    prior_rms, _ = wcs_error_mas(quadrant.ahead, quadrant)
    rms, worst = wcs_error_mas(result.wcs_header, quadrant)
    print(f"\ninner quadrant: prior {prior_rms / 1000:.1f} arcsec RMS -> pass 2 {rms:.2f} mas "
          f"RMS (max {worst:.2f}); pass 1 {result.seconds_pass1:.2f} s, "
          f"pass 2 {result.seconds_pass2:.2f} s")
    assert prior_rms > 5000.0 and rms < 10.0
    qa1, qa2 = result.pass1, result.pass2
    assert qa1.xy_contrast > 20.0
    assert qa1.n_detections_loaded > 2000 and qa1.n_reference_loaded > 2000
    assert qa2.astrom_ndets_reference > 0.8 * result.n_detections
    assert max(qa2.astrom_sigma_reference_highsn_arcsec) < 0.015   # centroid-noise floor
    assert max(qa2.astrom_sigma_reference_arcsec) < 0.06
    assert 0.1 < qa2.astrom_chi2_reference < 5.0
    assert result.returncode == 0 and result.stderr_tail


def test_solve_outer_quadrant_and_pass1_alone(outer, tmp_path):
    quadrant, detections, reference = outer
    result = solve_with_scamp(detections, reference, quadrant.ahead, quadrant.shape,
                              FAST, tmp_path)
    assert result.ok, result.reason
    rms, worst = wcs_error_mas(result.wcs_header, quadrant)
    pass1_rms, _ = wcs_error_mas(read_head(tmp_path / "scamp_pass1" / "quadrant.head"),
                                 quadrant)
    print(f"\nouter quadrant: pass 1 {pass1_rms:.1f} mas RMS, pass 2 {rms:.2f} mas RMS "
          f"(max {worst:.2f})")
    assert rms < 10.0 and pass1_rms < 100.0
    # SCAMP keeps the prior's CRVAL/CRPIX and puts the correction into the PV terms.
    assert result.wcs_header["CRPIX1"] == quadrant.ahead["CRPIX1"]
    applied = apply_wcs_header(quadrant.image_header, result.wcs_header)
    assert wcs_error_mas(applied, quadrant)[0] == pytest.approx(rms, rel=1e-6)


@pytest.mark.parametrize("maxerr, expect_ok", [(1.5, False), (6.0, True)])
def test_prior_off_by_5_arcmin(outer, tmp_path, maxerr, expect_ok):
    quadrant, detections, reference = outer
    off = shifted_prior(quadrant, (300.0, 0.0))
    settings = replace(FAST, position_maxerr_arcmin=maxerr)
    result = run_scamp_pass(1, detections, reference, off.ahead, settings, tmp_path)
    print(f"\n5 arcmin off, POSITION_MAXERR {maxerr}: ok={result.ok} "
          f"contrast={result.qa.xy_contrast:.3g} ({result.seconds:.2f} s)")
    assert result.ok is expect_ok
    if expect_ok:
        assert result.qa.xy_contrast > 20.0
        assert wcs_error_mas(result.head, quadrant)[0] < 100.0
    else:
        assert "pattern matching failed" in result.reason
        assert result.qa.xy_contrast < 1.0 and result.returncode == 0   # SCAMP "succeeded"


def test_wrong_stars_in_the_field_fail_in_scamp(inner, tmp_path):
    """Reference stars where the field is, but not the field's stars: SCAMP runs, no match."""
    quadrant, detections, _ = inner
    impostor = make_quadrant(seed=99, ccdid=6, qid=1).reference
    folder = tmp_path / "cats"
    _, reference = write_catalogues(quadrant, folder, reference=impostor)
    result = solve_with_scamp(detections, reference, quadrant.ahead, quadrant.shape,
                              FAST, tmp_path)
    assert not result.ok and result.pass1 is not None and result.pass2 is None
    assert "pattern matching failed" in result.reason and result.wcs_header is None


# ------------------------------------------------------- failures caught before SCAMP

def test_too_few_detections_not_run(inner, tmp_path):
    quadrant, _, reference = inner
    few = quadrant.detections[:10]
    detections = write_catalogues(quadrant, tmp_path, detections=few)[0]
    result = solve_with_scamp(detections, reference, quadrant.ahead, quadrant.shape,
                              FAST, tmp_path)
    assert not result.ok and "too few detections: 10" in result.reason
    assert result.pass1 is None and result.seconds_pass1 is None
    assert not (tmp_path / "scamp_pass1").exists()


def test_empty_reference_not_run(inner, tmp_path):
    quadrant, detections, _ = inner
    empty = quadrant.reference[:0]
    reference = write_catalogues(quadrant, tmp_path, reference=empty)[1]
    result = solve_with_scamp(detections, reference, quadrant.ahead, quadrant.shape,
                              FAST, tmp_path)
    assert not result.ok and "is empty" in result.reason and result.pass1 is None


def test_reference_of_another_field_not_run(inner, tmp_path):
    quadrant, detections, _ = inner
    elsewhere = make_quadrant(seed=3, field_centre=(30.0, -20.0)).reference
    reference = write_catalogues(quadrant, tmp_path, reference=elsewhere)[1]
    result = solve_with_scamp(detections, reference, quadrant.ahead, quadrant.shape,
                              FAST, tmp_path)
    assert not result.ok and result.pass1 is None
    assert result.reason.startswith(f"only 0 of {len(elsewhere)} reference stars")


def test_bad_inputs_raise_clear_errors(inner, tmp_path):
    quadrant, detections, reference = inner
    with pytest.raises(ScampNotFoundError, match="no-such-scamp"):
        solve_with_scamp(detections, reference, quadrant.ahead, quadrant.shape,
                         AstrometryConfig(scamp_binary="no-such-scamp"), tmp_path)
    with pytest.raises(ScampInputError, match="differs from the image shape"):
        solve_with_scamp(detections, reference, quadrant.ahead, (3072, 3080), FAST, tmp_path)
    no_mag = quadrant.reference.copy()
    no_mag.remove_column("MAG")
    bad_ref = write_catalogues(quadrant, tmp_path / "bad", reference=no_mag)[1]
    with pytest.raises(ScampInputError, match=r"gaia.ldac: missing column\(s\) MAG"):
        solve_with_scamp(detections, bad_ref, quadrant.ahead, quadrant.shape, FAST, tmp_path)
    not_ldac = tmp_path / "image.fits"
    fits.PrimaryHDU(np.zeros((2, 2))).writeto(not_ldac)
    with pytest.raises(ScampInputError, match="image.fits: no LDAC_OBJECTS"):
        solve_with_scamp(not_ldac, reference, quadrant.ahead, quadrant.shape, FAST, tmp_path)
    with pytest.raises(ScampInputError, match="XML"):
        solve_with_scamp(detections, reference, quadrant.ahead, quadrant.shape, FAST,
                         tmp_path / "a&b")


def test_unstartable_binary_raises(inner, tmp_path):
    quadrant, detections, reference = inner
    not_executable = tmp_path / "scamp_copy"
    not_executable.write_text("#!/bin/sh\nexit 0\n")
    not_executable.chmod(0o644)
    with pytest.raises(ScampError, match="not found|cannot start"):
        solve_with_scamp(detections, reference, quadrant.ahead, quadrant.shape,
                         AstrometryConfig(scamp_binary=str(not_executable)), tmp_path)


# -------------------------------------------------------------- timeouts and crashes

def test_timeout_kills_scamp(inner, tmp_path):
    quadrant, detections, reference = inner
    settings = replace(FAST, scamp_timeout_s=0.05)
    start = time.perf_counter()
    result = solve_with_scamp(detections, reference, quadrant.ahead, quadrant.shape,
                              settings, tmp_path)
    assert not result.ok and "timeout" in result.reason
    assert result.returncode is None and result.pass1 is None
    assert time.perf_counter() - start < 30.0       # a guard against a hang, not a benchmark


def _fake_binary(folder: Path, body: str) -> str:
    path = folder / "fake_scamp"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_timeout_kills_the_whole_process_group(inner, tmp_path):
    quadrant, detections, reference = inner
    binary = _fake_binary(tmp_path, "sleep 60 &\necho $! > child.pid\nwait")
    settings = AstrometryConfig(scamp_binary=binary, scamp_timeout_s=1.0)
    result = run_scamp_pass(1, detections, reference, quadrant.ahead, settings, tmp_path)
    assert not result.ok and "timeout" in result.reason
    child = int((result.run_dir / "child.pid").read_text())
    for _ in range(50):                              # init reaps the orphan asynchronously
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"SCAMP's child process {child} survived the timeout")


@pytest.mark.parametrize("body, expected", [
    ("kill -SEGV $$", "crashed (killed by signal 11 SIGSEGV)"),
    ("echo '> *Error*: Corrupted FITS header' >&2; exit 1", "failed with exit status 1"),
])
def test_crash_is_reported(inner, tmp_path, body, expected):
    quadrant, detections, reference = inner
    settings = AstrometryConfig(scamp_binary=_fake_binary(tmp_path, body), scamp_timeout_s=10.0)
    result = solve_with_scamp(detections, reference, quadrant.ahead, quadrant.shape,
                              settings, tmp_path)
    assert not result.ok and expected in result.reason
    assert result.wcs_header is None
    if "Corrupted" in body:
        assert "Corrupted FITS header" in result.stderr_tail


@pytest.mark.parametrize("body, expected", [
    ("exit 0", "SCAMP exited 0 but wrote no XML"),
    ("echo garbage > scamp.xml; exit 0", "SCAMP exited 0 but"),
])
def test_success_without_readable_output_is_retryable(inner, tmp_path, body, expected):
    """SCAMP exiting 0 without a readable XML is an environment fault (75, retry), not a
    verdict that the image is unusable (4)."""
    from pipeline.astrometry.scamp import ScampOutputError
    from pipeline.core.exits import exit_status_of

    quadrant, detections, reference = inner
    settings = AstrometryConfig(scamp_binary=_fake_binary(tmp_path, body), scamp_timeout_s=10.0)
    with pytest.raises(ScampOutputError, match=expected) as info:
        solve_with_scamp(detections, reference, quadrant.ahead, quadrant.shape, settings, tmp_path)
    assert exit_status_of(info.value) == 75


# ------------------------------------------------------------------------ benchmark

def test_benchmark_pass_timings(outer, tmp_path):
    """Prints SCAMP's per-pass wall time with the project's configured settings, 1 and 2 threads."""
    quadrant, detections, reference = outer
    for threads in (1, 2):
        settings = AstrometryConfig(scamp_binary=SCAMP, scamp_threads=threads, scamp_timeout_s=120.0)
        result = solve_with_scamp(detections, reference, quadrant.ahead, quadrant.shape,
                                  settings, tmp_path / f"t{threads}")
        assert result.ok, result.reason
        rms, worst = wcs_error_mas(result.wcs_header, quadrant)
        print(f"\nNTHREADS {threads}, MATCH_RESOL {settings.match_resol_arcsec:g}: pass 1 "
              f"{result.seconds_pass1:.2f} s, pass 2 {result.seconds_pass2:.2f} s; "
              f"WCS error {rms:.2f} mas RMS (max {worst:.2f})")
