"""The distortion prior: fitted from simulated low-airmass exposures, checked against the simulator's truth."""
from __future__ import annotations


import numpy as np
import pytest
from _cli import run_skydiff
from astropy.io import fits
from astropy.table import Table

from pipeline.core.focalplane import all_quadrants, quadrant_geometry, scale_check_grid
from pipeline.simulate.optics import true_quadrant_solution
from pipeline.simulate.plan import DEFAULT_FIELDS, exposure_at_airmass
from pipeline.formats.tpv import sky_to_tangent, tpv_wcs
from priors.ahead import prior_wcs_header, write_ahead
from priors.fit import PriorFitSettings, fit_prior
from priors.model import PLACEMENT_FITTED, PLACEMENT_LAYOUT, PriorError
from pipeline.simulate.priors import low_airmass_exposures, simulated_matches
from priors.store import read_prior, write_prior

N_EXPOSURES = 12


@pytest.fixture(scope="module")
def training(cfg):
    specs = low_airmass_exposures(cfg, DEFAULT_FIELDS, N_EXPOSURES)
    return specs, simulated_matches(cfg, specs, stars_per_quadrant=25, seed=7)


@pytest.fixture(scope="module")
def prior(cfg, training):
    return fit_prior(training[1], cfg)


def _new_exposure(cfg, field, airmass):
    # A new exposure without pointing or position-angle error: neither is knowable in advance.
    return exposure_at_airmass(cfg, field, airmass, pointing_offset_arcsec=(0.0, 0.0), position_angle_deg=0.0)


def _header_for(prior, spec, geom, cfg):
    return prior_wcs_header(prior, geom.rcid, spec.field_ra, spec.field_dec, spec.obsmjd, (geom.ny, geom.nx),
                            pressure_hpa=spec.pressure_hpa, temperature_c=spec.temperature_c,
                            wavelength_um=cfg.instrument.filters[spec.filter].wavelength_um)


def _separation_arcsec(wcs_a, wcs_b, x, y):
    ra_a, dec_a = wcs_a.all_pix2world(x, y, 1)
    xi, eta = sky_to_tangent(*wcs_b.all_pix2world(x, y, 1), float(np.mean(ra_a)), float(np.mean(dec_a)))
    xi_a, eta_a = sky_to_tangent(ra_a, dec_a, float(np.mean(ra_a)), float(np.mean(dec_a)))
    return np.column_stack([xi - xi_a, eta - eta_a]) * 3600.0


def test_training_set_spans_two_fields_at_low_airmass(training, prior):
    specs, _ = training
    assert len({s.fieldid for s in specs}) == 2 and max(s.airmass for s in specs) < 1.3
    assert prior.provenance.n_exposures == N_EXPOSURES
    assert all(prior.quadrant(r).placement == PLACEMENT_FITTED for r in range(64))
    assert prior.provenance.rms_arcsec < 0.1        # centroid noise 0.05 px = 0.05 arcsec per axis


def test_prior_recovers_the_true_quadrant_centres(cfg, prior):
    spec = _new_exposure(cfg, DEFAULT_FIELDS[1], 1.1)
    errors = []
    for geom in all_quadrants(cfg.instrument):
        truth = true_quadrant_solution(spec, geom, cfg)[0]
        model = tpv_wcs(_header_for(prior, spec, geom, cfg))
        centre = (0.5 * (geom.nx + 1), 0.5 * (geom.ny + 1))
        errors.append(np.hypot(*_separation_arcsec(truth, model, *centre)[0]))
    errors = np.array(errors)
    print(f"\nquadrant centres vs truth (64 quadrants): max {errors.max():.3f} arcsec, "
          f"rms {np.sqrt(np.mean(errors ** 2)):.3f} arcsec")
    assert errors.max() < 0.3


@pytest.mark.parametrize("ccdid, qid, airmass", [(16, 1, 1.05), (1, 3, 1.2), (6, 1, 1.2)])
def test_prior_wcs_agrees_with_the_truth_over_the_scale_check_grid(cfg, prior, ccdid, qid, airmass):
    spec = _new_exposure(cfg, DEFAULT_FIELDS[0], airmass)
    geom = quadrant_geometry(cfg.instrument, ccdid, qid)
    x, y = (a.ravel() for a in scale_check_grid())
    diff = _separation_arcsec(true_quadrant_solution(spec, geom, cfg)[0],
                              tpv_wcs(_header_for(prior, spec, geom, cfg)), x, y)
    beyond_offset = np.hypot(*(diff - diff.mean(axis=0)).T)
    print(f"\nccd {ccdid} q{qid} airmass {airmass}: max {np.hypot(*diff.T).max():.3f} arcsec, "
          f"beyond the mean offset {beyond_offset.max():.3f} arcsec")
    assert np.hypot(*diff.T).max() < 0.3 and beyond_offset.max() < 0.1


def test_fit_measures_each_exposures_pointing_error(training, prior):
    specs, _ = training
    truth = {s.expid: s.pointing_offset_arcsec for s in specs}
    for row in prior.exposures:
        east, north = truth[int(row["expid"])]
        assert abs(row["offset_east_arcsec"] - east) < 0.1 and abs(row["offset_north_arcsec"] - north) < 0.1


def test_prior_file_and_ahead_round_trip(cfg, prior, tmp_path):
    path = write_prior(tmp_path / "prior.fits", prior)
    again = read_prior(path)
    assert again.provenance == prior.provenance and len(again.exposures) == N_EXPOSURES
    spec = _new_exposure(cfg, DEFAULT_FIELDS[0], 1.1)
    geom = quadrant_geometry(cfg.instrument, 1, 3)
    header = _header_for(prior, spec, geom, cfg)
    assert _header_for(again, spec, geom, cfg) == header

    ahead = write_ahead(tmp_path / "q.ahead", header)
    raw = ahead.read_bytes()
    lines = raw.decode("ascii").splitlines()
    assert all(len(line) == 80 for line in lines) and lines[-1].rstrip() == "END"
    assert "NAXIS1" not in raw.decode()
    back = fits.Header.fromtextfile(str(ahead))
    assert back["CTYPE1"] == "RA---TPV" and back["CTYPE2"] == "DEC--TPV"
    for key in ("CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD2_2", "PV1_7", "PV2_7"):
        assert back[key] == pytest.approx(header[key], rel=1e-13)


def test_displaced_channel_gets_its_own_crpix(cfg, training):
    _, matches = training
    subset = matches[np.isin(matches["rcid"], [0, 1, 2, 3, 24, 25, 60, 61, 62, 63])]
    shifted = subset.copy()
    moved = shifted["rcid"] == 25
    shifted["x"][moved] += 3.0      # the chip sits 3 pixels to the left of the layout
    shifted["y"][moved] -= 2.0
    base, test = fit_prior(subset, cfg), fit_prior(shifted, cfg)
    d1 = test.quadrant(25).crpix[0] - base.quadrant(25).crpix[0]
    d2 = test.quadrant(25).crpix[1] - base.quadrant(25).crpix[1]
    assert abs(d1 - 3.0) < 0.3 and abs(d2 + 2.0) < 0.3
    assert abs(test.quadrant(60).crpix[0] - base.quadrant(60).crpix[0]) < 0.5
    assert test.quadrant(40).placement == PLACEMENT_LAYOUT and test.quadrant(40).n_stars == 0


def test_bad_input_is_named(cfg, training, caplog):
    _, matches = training
    with pytest.raises(PriorError, match="no matched stars"):
        fit_prior(matches[:0], cfg)
    with pytest.raises(PriorError, match="lacks column .*AIRMASS"):
        fit_prior(Table(matches)[["expid", "rcid", "x", "y", "ra", "dec", "telra", "teldec", "obsmjd"]], cfg)
    with pytest.raises(PriorError, match="no exposure at airmass <= 1.0"):
        fit_prior(matches, cfg, PriorFitSettings(max_airmass=1.0))
    # A quadrant with too few stars falls back to the nominal layout, with a warning.
    keep = np.isin(matches["rcid"], [0, 1, 2, 3, 60, 61, 62, 63]) | \
        ((matches["rcid"] == 30) & (np.arange(len(matches)) % 50 == 0))
    sparse = fit_prior(matches[keep], cfg)
    assert sparse.quadrant(30).placement == PLACEMENT_LAYOUT and "rcid 30" in caplog.text
    with pytest.raises(PriorError, match="image shape"):
        prior_wcs_header(sparse, 0, 150.0, 33.0, 61114.2, (100, 100))
    with pytest.raises(PriorError, match="file not found"):
        read_prior("/nonexistent/prior.fits")


def _run_command(cfg, argv):
    return run_skydiff(argv, cfg)


def test_priors_command_builds_and_writes_ahead(cfg, training, tmp_path):
    _, matches = training
    subset = matches[np.isin(matches["rcid"], [0, 1, 2, 3, 60, 61, 62, 63])]
    subset.write(tmp_path / "matches.fits")
    assert _run_command(cfg, ["priors", "build", str(tmp_path / "matches.fits"),
                              "--out", str(tmp_path / "prior.fits")]) == 0
    spec = _new_exposure(cfg, DEFAULT_FIELDS[0], 1.1)
    header = fits.Header({"FIELDID": spec.fieldid, "CCDID": 16, "QID": 1, "FILTER": spec.filter, "FILTERID": 2,
                          "OBSMJD": spec.obsmjd, "EXPTIME": 30.0, "EXPID": spec.expid, "PROGRMID": 1,
                          "TELRA": spec.field_ra, "TELDEC": spec.field_dec, "AIRMASS": spec.airmass,
                          "GAIN": 6.2, "READNOI": 8.0, "SATURATE": 50000.0,
                          "PRESSURE": spec.pressure_hpa, "TEMPTURE": spec.temperature_c})
    fits.PrimaryHDU(np.zeros((3080, 3072), np.uint8), header).writeto(tmp_path / "image.fits")
    assert _run_command(cfg, ["priors", "ahead", str(tmp_path / "prior.fits"), str(tmp_path / "image.fits"),
                              "--out", str(tmp_path / "image.ahead")]) == 0
    ahead = tpv_wcs(fits.Header.fromtextfile(str(tmp_path / "image.ahead")))
    geom = quadrant_geometry(cfg.instrument, 16, 1)
    diff = _separation_arcsec(true_quadrant_solution(spec, geom, cfg)[0], ahead, 1536.5, 1540.5)
    assert np.hypot(*diff[0]) < 0.3
    assert _run_command(cfg, ["priors", "build", str(tmp_path / "missing.fits"),
                              "--out", str(tmp_path / "p2.fits")]) == 3
