"""The subtraction stage on full simulated quadrants against truth: completeness of injected
point sources, false candidates after real-bogus, Scorr normalisation, photometry, zero point,
and the ``skydiff subtract`` file edge.

One reference (five frames of a season earlier) serves two science images: one with worse
seeing than the reference and a 0.2 px misregistration of its WCS, one sharper than the
reference.  Seeds differ from those the shipped real-bogus model was trained on.
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from scipy.spatial import cKDTree

from catalogs import PS1_COLUMNS
from _cli import run_skydiff
from _external_data import plain_coadd
from pipeline.cli import main
from pipeline.simulate.drb_training import LabelledTriplets, write_folder_triplets
from pipeline.subtraction.drb import DrbModel, load_default_drb_model
from pipeline.context.catalogs import CONTEXT_COLUMNS
from pipeline.core.config import load_config
from pipeline.core.image import write_quadrant
from pipeline.simulate.realbogus_training import label_candidates, subtract_pair
from pipeline.reference.build import build_reference
from pipeline.reference.files import write_reference
from pipeline.simulate.pairs import PairOptions, pair_sky, simulate_reference_frames, simulate_science
from pipeline.subtraction.zogy import measure_flux

OPTIONS = PairOptions(rcid=42, seed=909, n_inject=150, snr_range=(3.0, 60.0))
CASES = {"science_broader": dict(science_seeing=2.6, misregister_px=(0.2, -0.1), hot_pixels=40),
         "science_sharper": dict(science_seeing=1.55)}


@pytest.fixture(scope="module")
def setting():
    cfg = load_config()
    sky = pair_sky(cfg, OPTIONS)
    frames = simulate_reference_frames(cfg, OPTIONS, sky)
    band = cfg.instrument.filters[frames[0].meta.filter]
    reference = build_reference(frames, sky.gaia_catalogue(), band)
    return cfg, sky, reference


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, setting):
    cfg, sky, reference = setting
    pair = simulate_science(cfg, replace(OPTIONS, **CASES[request.param]), sky)
    result = subtract_pair(pair, reference)
    return request.param, pair, reference, result


def _injected_snr(pair, result) -> tuple[np.ndarray, np.ndarray]:
    """True flux of each injected source in the reference's ADU and its S/N on the difference."""
    inj = pair.injected
    true_flux = np.asarray(inj["flux_adu"]) * 10 ** (-0.4 * (pair.zeropoint - result.zp_ref))
    _, flux_err = measure_flux(result.zogy, np.asarray(inj["x"]) - 1, np.asarray(inj["y"]) - 1)
    return true_flux, true_flux / flux_err


def _nearest_candidate(pair, candidates) -> tuple[np.ndarray, np.ndarray]:
    tree = cKDTree(np.column_stack([candidates["xpos"], candidates["ypos"]]))
    return tree.query(np.column_stack([pair.injected["x"], pair.injected["y"]]))


def test_injected_point_sources_are_found(case):
    name, pair, _, result = case
    _, snr = _injected_snr(pair, result)
    dist, index = _nearest_candidate(pair, result.candidates)
    found = (dist <= 2.0) & np.asarray(result.candidates["isdiffpos"])[index]
    bright, faint = snr >= 8, (snr >= 4.5) & (snr < 6)
    assert bright.sum() >= 40 and faint.sum() >= 5
    assert found[bright].mean() >= 0.95, (name, found[bright].sum(), bright.sum())
    assert found[faint].mean() >= 0.5, (name, found[faint].sum(), faint.sum())


def test_few_false_candidates_pass_real_bogus(case):
    name, pair, _, result = case
    cands = result.candidates
    real = label_candidates(cands, pair, 2.0).astype(bool)
    rb = np.asarray(cands["rb"])
    false = (~real) & (rb >= 0.5)
    assert false.sum() <= 5, (name, int(false.sum()), int((~real).sum()))
    # And the model keeps the real ones.
    _, snr = _injected_snr(pair, result)
    dist, index = _nearest_candidate(pair, cands)
    found = (dist <= 2.0) & (snr >= 8)
    assert np.mean(rb[index[found]] >= 0.5) >= 0.9
    assert set(np.asarray(cands["rbversion"])) == {result.candidates.meta["rbversion"]}
    # rb is a calibrated probability: no mass at exactly 0 or 1
    assert np.all((rb > 0) & (rb < 1))


def test_drb_keeps_the_real_and_rejects_the_bogus(case):
    name, pair, _, result = case
    cands = result.candidates
    drb = np.asarray(cands["drb"])
    threshold = load_default_drb_model().threshold
    real = label_candidates(cands, pair, 2.0).astype(bool)
    snr5 = np.abs(np.asarray(cands["scorr"])) >= 5
    passed = (drb >= threshold) & snr5
    assert (passed & ~real).sum() <= 5, (name, int((passed & ~real).sum()), int((~real & snr5).sum()))
    assert (passed & real).sum() >= 0.95 * (real & snr5).sum(), (name, int((passed & real).sum()), int((real & snr5).sum()))
    assert set(np.asarray(cands["drbversion"])) == {load_default_drb_model().version} == {cands.meta["drbversion"]}
    assert result.qa()["drbversion"] == cands.meta["drbversion"]


def test_train_drb_on_a_folder_of_labelled_cutouts(case, cfg, tmp_path):
    """A survey's own scanned candidates: a folder of real/ and bogus/ cutout files trains a
    (tiny, few-second) model that `show` then describes."""
    name, pair, _, result = case
    if name != "science_broader":
        pytest.skip("one case is enough")
    cands = result.candidates
    labels = label_candidates(cands, pair, 2.0)
    triplets = LabelledTriplets(*(result.cutouts[c] for c in ("science", "reference", "difference")),
                                label=labels, snr=np.abs(np.asarray(cands["scorr"])),
                                rb_forest=np.zeros(len(cands)), image=np.arange(len(cands)) % 5)
    folder = tmp_path / "scanned"
    write_folder_triplets(triplets, folder)
    assert sorted(p.name for p in (folder / "real").iterdir()) == [f"image{i:04d}.fits" for i in range(5)]
    out = tmp_path / "drb.npz"
    assert run_skydiff(["realbogus", "train-drb", "--cutouts", str(folder), "--epochs", "60", "--out", str(out),
                        "--version", "scanned-1"], cfg) == 0
    model = DrbModel.read(out)
    assert model.version == "scanned-1" and model.training["source"].startswith("labelled cutouts")
    counts = model.training["training"]
    assert counts["real"] + model.training["validation"]["real"] == int(labels.sum())
    # a few seconds of training already separates most real from bogus on the folder's candidates
    from sklearn.metrics import roc_auc_score
    assert roc_auc_score(labels, model.score(result.cutouts)) > 0.9
    assert run_skydiff(["realbogus", "show", "--drb", str(out)], cfg) == 0
    # a label folder without files is bad input
    for path in (folder / "bogus").iterdir():
        path.unlink()
    assert run_skydiff(["realbogus", "train-drb", "--cutouts", str(folder), "--out", str(out)], cfg) == 3


def test_scorr_is_unit_normal_away_from_sources(case):
    name, pair, _, result = case
    scorr = result.zogy.scorr
    rows, cols = np.mgrid[0:scorr.shape[0]:5, 0:scorr.shape[1]:5]
    truth = pair.truth
    tree = cKDTree(np.column_stack([np.asarray(truth["x"]) - 1, np.asarray(truth["y"]) - 1]))
    dist, _ = tree.query(np.column_stack([cols.ravel(), rows.ravel()]))
    injected = cKDTree(np.column_stack([np.asarray(pair.injected["x"]) - 1, np.asarray(pair.injected["y"]) - 1]))
    dist_inj, _ = injected.query(np.column_stack([cols.ravel(), rows.ravel()]))
    free = (dist > 15) & (dist_inj > 15) & ~result.zogy.flagged[rows, cols].ravel()
    values = scorr[rows, cols].ravel()[free]
    # Cosmic rays and hot pixels are not in the truth: a 5-sigma clip leaves them out.
    inside = np.abs(values) < 5
    assert 0.9 <= values[inside].std() <= 1.1, name
    assert (~inside).mean() < 1e-3


def test_photometry_is_unbiased_with_right_errors(case):
    name, pair, _, result = case
    true_flux, snr = _injected_snr(pair, result)
    dist, index = _nearest_candidate(pair, result.candidates)
    use = (dist <= 2.0) & (snr >= 10)
    cands = result.candidates[index[use]]
    true_mag = result.zp_ref - 2.5 * np.log10(true_flux[use])
    delta = np.asarray(cands["magpsf"]) - true_mag
    pull = delta / np.asarray(cands["sigmapsf"])
    assert use.sum() >= 30
    assert abs(np.median(delta)) < 0.02, name
    assert 0.9 <= pull.std() <= 1.2, (name, pull.std())


def test_zero_point_and_registration_offset(case):
    name, pair, _, result = case
    assert abs(result.zp_science - pair.zeropoint) < 0.01
    shift = CASES[name].get("misregister_px", (0.0, 0.0))
    offset = result.registration_offset
    # The WCS was moved by +shift in CRPIX: the stars sit -shift from where it says.
    assert abs(offset.dx + shift[0]) < 0.02 and abs(offset.dy + shift[1]) < 0.02


def test_reference_catalogue_calibrates_like_gaia(case):
    # Without Gaia or MAGZP the science image is calibrated on the reference's catalogue.
    from pipeline.subtraction.difference import relative_zeropoint
    name, pair, reference, result = case
    zp, err, n = relative_zeropoint(result.science.photometry, reference.catalog)
    assert n >= 100 and err < 0.005
    assert abs(zp - pair.zeropoint) < 0.02, (name, zp, pair.zeropoint)


def test_subtract_command_writes_every_product(setting, tmp_path):
    cfg, sky, reference = setting
    pair = simulate_science(cfg, replace(OPTIONS, n_inject=20), sky)
    sci = pair.science
    science_path = tmp_path / "science.fits"
    write_quadrant(science_path, sci.data, sci.header, sci.mask)
    reference_path = tmp_path / "ref.fits"
    write_reference(reference_path, reference)
    gaia_path = tmp_path / "gaia.fits"
    sky.gaia_catalogue().write(gaia_path)
    ps1_path = tmp_path / "ps1.fits"
    sky.ps1_catalogue(5)[list(PS1_COLUMNS)].write(ps1_path)
    out = tmp_path / "out"
    assert main(["subtract", str(science_path), str(reference_path), "--out", str(out),
                 "--refcat", str(gaia_path), "--ps1cat", str(ps1_path)]) == 0
    qa = json.loads((out / "qa.json").read_text())
    cands = Table.read(out / "candidates.ecsv")
    for column in ("ra", "dec", "xpos", "ypos", "magpsf", "sigmapsf", "isdiffpos", "scorr", "rb", "fwhm",
                   "elong", "nbad", *CONTEXT_COLUMNS):
        assert column in cands.colnames
    assert qa["n_candidates"] == len(cands) > 0 and qa["zp_source"] == "gaia"
    assert {"zogy", "registration", "candidates", "context", "total"} <= set(qa["timings_s"])
    # the context of a full simulated quadrant: PS1 neighbours within 30", nearest first
    found = cands["distpsnr1"] != -999
    assert found.mean() > 0.5 and np.all(cands["distpsnr1"][found] <= 30.0)
    assert np.all((cands["distpsnr2"][found] == -999) | (cands["distpsnr2"][found] >= cands["distpsnr1"][found]))
    assert np.all(cands["nmtchps"][~found] == 0) and np.all(cands["objectidps1"][~found] == -999)
    # a missing PS1 store is bad input naming it, found before the subtraction's work
    missing = tmp_path / "no-ps1-store"
    assert main(["subtract", str(science_path), str(reference_path), "--out", str(tmp_path / "out2"),
                 "--refcat", str(gaia_path), "--ps1cat", str(missing)]) == 3
    assert not (tmp_path / "out2" / "qa.json").exists()
    with fits.open(out / "diff.fits") as diff, fits.open(out / "scorr.fits") as scorr, \
            fits.open(out / "cutouts.fits") as cutouts:
        assert diff[0].data.shape == scorr[0].data.shape == sci.data.shape
        assert diff[0].header["MAGZPREF"] == pytest.approx(reference.zeropoint)
        assert cutouts["DIFFERENCE"].data.shape == (len(cands), 63, 63)
    # Every injected source brighter than S/N 15 on the sky alone is among the candidates.
    bright = pair.injected[pair.injected["snr_sky"] > 15]
    tree = cKDTree(np.column_stack([cands["xpos"], cands["ypos"]]))
    dist, _ = tree.query(np.column_stack([bright["x"], bright["y"]]))
    assert np.mean(dist <= 2) >= 0.9


def test_subtract_command_rejects_bad_inputs(setting, tmp_path):
    cfg, sky, reference = setting
    pair = simulate_science(cfg, replace(OPTIONS, n_inject=0), sky)
    header = pair.science.header.copy()
    for key in [k for k in header if k.startswith(("CTYPE", "CRVAL", "CRPIX", "CD", "PV"))]:
        del header[key]
    science_path = tmp_path / "nowcs.fits"
    write_quadrant(science_path, pair.science.data, header, pair.science.mask)
    reference_path = tmp_path / "ref.fits"
    reference_path.write_bytes(b"SIMPLE  =                    T" + b" " * 100)
    out = tmp_path / "out"
    assert main(["subtract", str(science_path), str(reference_path), "--out", str(out)]) == 3
    unusable = pair.science.header.copy()
    unusable["ASTRUSE"] = False
    write_quadrant(science_path, pair.science.data, unusable, pair.science.mask)
    assert main(["subtract", str(science_path), str(reference_path), "--out", str(out)]) == 4
    good_header = pair.science.header.copy()
    write_quadrant(science_path, pair.science.data, good_header, pair.science.mask)
    assert main(["subtract", str(science_path), str(reference_path), "--out", str(out)]) == 3
    assert not (out / "qa.json").exists()


ZTF_MEASURED = ("fwhm", "elong", "aimage", "bimage", "magdiff", "magap", "sigmagap", "magapbig", "sigmagapbig",
                "distnr", "magnr", "sigmagnr", "ranr", "decnr", "classtar", "sky", "dsnrms", "ssnrms", "dsdiff",
                "seeratio", "tblid")


def test_every_image_measured_field_is_finite_and_true(case):
    name, pair, _, result = case
    cands = result.candidates
    alertable = np.isfinite(np.asarray(cands["magpsf"], dtype=float))
    for column in ZTF_MEASURED:
        values = np.asarray(cands[column], dtype=float)[alertable]
        assert np.isfinite(values).all(), (name, column, int((~np.isfinite(values)).sum()))
    classtar = np.asarray(cands["classtar"])
    assert ((classtar >= 0) & (classtar <= 1)).all()
    # Bright isolated injected point sources: the profile on D is P_D, so fwhm is P_D's FWHM.
    from pipeline.measure.psf import fwhm_of_stamp
    _, snr = _injected_snr(pair, result)
    dist, index = _nearest_candidate(pair, cands)
    use = (dist <= 1.0) & (snr >= 20)
    rows = cands[index[use]]
    rows = rows[np.asarray(rows["flagged"]) == 0]
    tile_fwhm = np.array([fwhm_of_stamp(np.asarray(t.psf_d, dtype=float)) for t in result.zogy.tiles])
    tiles = [next(k for k, t in enumerate(result.zogy.tiles)
                  if t.y0 <= round(r["ypos"] - 1) < t.y1 and t.x0 <= round(r["xpos"] - 1) < t.x1) for r in rows]
    ratio = np.asarray(rows["fwhm"]) / tile_fwhm[tiles]
    assert len(rows) >= 20
    # Moments of a profile with Moffat wings read its FWHM a few per cent broad (as SExtractor's do).
    assert abs(np.median(ratio) - 1) < 0.1 and np.mean(np.abs(ratio - 1) < 0.15) >= 0.9, (name, np.sort(ratio))
    assert np.median(np.asarray(rows["elong"])) < 1.15
    # A point source's aperture and PSF magnitudes agree within their errors.
    pull = np.asarray(rows["magdiff"]) / np.hypot(np.asarray(rows["sigmagap"]), np.asarray(rows["sigmapsf"]))
    assert np.abs(pull).max() < 4 and abs(np.median(np.asarray(rows["magdiff"]))) < 0.05, (name, pull)
    # -999 (ZTF's "no reference source within 30 arcsec") in every nearest-source column together.
    has = np.asarray(cands["distnr"]) != -999
    assert has.any()
    for column in ("magnr", "sigmagnr", "ranr", "decnr"):
        assert (np.asarray(cands[column])[~has] == -999).all() and (np.asarray(cands[column])[has] != -999).all()
    # A saturated reference star without a PSF fit: magnr is a bound its true magnitude is brighter than.
    from pipeline.subtraction.candidates import CANDIDATE_FLAGS
    unfit = cands[(np.asarray(cands["flagged"]) & CANDIDATE_FLAGS["NR_UNFIT"]) > 0]
    if len(unfit):
        assert (np.asarray(unfit["sigmagnr"]) == 99).all()
        stars = pair.truth[np.asarray(pair.truth["kind"]) == "star"]
        x, y = pair.true_wcs.all_world2pix(np.asarray(unfit["ranr"]), np.asarray(unfit["decnr"]), 1)
        dist, nearest = cKDTree(np.column_stack([stars["x"], stars["y"]])).query(np.column_stack([x, y]))
        assert (dist < 6).all(), dist        # a saturated core leaves the catalogue position a few px off
        assert (np.asarray(stars["mag"])[nearest] < np.asarray(unfit["magnr"]) + 0.2).all()


def test_classtar_separates_stars_from_galaxies(case):
    """classtar on the science image at the true positions of stars and galaxies (r < 20)."""
    from sklearn.metrics import roc_auc_score
    from pipeline.measure.stargalaxy import star_probability

    name, pair, _, result = case
    sci, truth = pair.science, pair.truth
    image = sci.data.astype(np.float32) - result.science.extraction.background_map
    ny, nx = image.shape
    x, y = np.asarray(truth["x"]), np.asarray(truth["y"])
    kind = np.asarray(truth["kind"])
    use = (np.isin(kind, ["star", "galaxy"]) & (np.asarray(truth["mag"]) < 20) & ~np.asarray(truth["saturated"])
           & (x > 20) & (x < nx - 20) & (y > 20) & (y < ny - 20))
    star = kind[use] == "star"
    assert star.sum() > 200 and (~star).sum() > 30
    cfg = pair.cfg.subtraction.candidates
    p = star_probability(image, result.science.extraction.rms_map, result.science.psf, x[use], y[use],
                         mask=sci.mask, gain=sci.meta.gain, inner_fwhm=cfg.classtar_inner_fwhm,
                         outer_fwhm=cfg.classtar_outer_fwhm, galaxy_broadening=cfg.classtar_galaxy_broadening,
                         psf_error=cfg.classtar_psf_error)
    auc = roc_auc_score(star, p)
    assert auc >= 0.95, (name, auc)
    assert np.median(p[star]) > 0.9 and np.median(p[~star]) < 0.1


def _recovery(pair, result):
    """Injected sources found (S/N >= 8) and the PSF photometry of those at S/N >= 10 against truth."""
    true_flux, snr = _injected_snr(pair, result)
    dist, index = _nearest_candidate(pair, result.candidates)
    found = (dist <= 2.0) & np.asarray(result.candidates["isdiffpos"])[index]
    use = found & (snr >= 10)
    true_mag = pair.zeropoint - 2.5 * np.log10(np.asarray(pair.injected["flux_adu"])[use])
    delta = np.asarray(result.candidates["magpsf"])[index[use]] - true_mag
    pull = delta / np.asarray(result.candidates["sigmapsf"])[index[use]]
    return dict(found=round(float(found[snr >= 8].mean()), 3), n=int((snr >= 8).sum()),
                dmag=round(float(np.median(delta)), 4), scatter=round(float(np.std(delta)), 4),
                pull=round(float(pull.std()), 3))


def test_a_reference_made_elsewhere_is_imported_and_finds_the_transients_as_the_native_one(setting, tmp_path):
    from pipeline.reference.files import read_reference, reference_filename
    cfg, sky, native = setting
    plain = plain_coadd(native, tmp_path / "coadd_from_elsewhere.fits")
    gaia_path = tmp_path / "gaia.fits"
    sky.gaia_catalogue().write(gaia_path)
    pair = simulate_science(cfg, replace(OPTIONS, science_seeing=2.2, seed=4242), sky)

    # the plain coadd fails nowhere: characterised on the fly by `skydiff subtract`
    science_path = tmp_path / "science.fits"
    write_quadrant(science_path, pair.science.data, pair.science.header, pair.science.mask)
    assert main(["subtract", str(science_path), str(plain), "--out", str(tmp_path / "fly"),
                 "--refcat", str(gaia_path)]) == 0
    on_the_fly = Table.read(tmp_path / "fly" / "candidates.ecsv")

    # stored once in skydiff's format, under the name the quadrant runner looks up
    store = tmp_path / "references"
    assert main(["reference", "import", str(plain), "--out", str(store), "--refcat", str(gaia_path)]) == 0
    m = native
    stored = store / reference_filename(m.fieldid, m.ccdid, m.qid, m.filter)
    imported = read_reference(stored)
    assert imported.psf is not None and imported.catalog is not None and imported.rms is not None
    assert imported.header["IMAGETYP"] == "REFERENCE" and imported.refid is not None
    assert abs(imported.zeropoint - native.zeropoint) < 0.02            # fitted to Gaia: 27.0 by construction
    assert abs(imported.psf.fwhm - native.psf.fwhm) < 0.05 * native.psf.fwhm
    assert len(imported.catalog) > 0.8 * len(native.catalog)

    with_native, with_imported = _recovery(pair, subtract_pair(pair, native)), \
        _recovery(pair, subtract_pair(pair, imported))
    print("injected transients, native vs imported reference:", with_native, with_imported,
          "on the fly:", len(on_the_fly), "candidates; NOISECOR", imported.header["NOISECOR"])
    assert with_imported["n"] >= 40
    assert with_imported["found"] >= with_native["found"] - 0.03 and with_imported["found"] >= 0.95
    assert abs(with_imported["dmag"]) < 0.02 and abs(with_imported["dmag"] - with_native["dmag"]) < 0.015
    assert with_imported["scatter"] <= 1.15 * with_native["scatter"]
    assert abs(with_imported["pull"] - with_native["pull"]) < 0.1          # errors as the native ones
    # the plain file given straight to `skydiff subtract` finds them too
    dist, _ = cKDTree(np.column_stack([on_the_fly["xpos"], on_the_fly["ypos"]])).query(
        np.column_stack([pair.injected["x"], pair.injected["y"]]))
    assert np.mean(dist[pair.injected["snr_sky"] > 15] <= 2.0) >= 0.95
