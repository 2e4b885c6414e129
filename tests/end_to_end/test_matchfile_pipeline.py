"""Matchfiles filled from the pipeline's own photometry, on a simulated multi-night run of
one 2048 x 2048 quadrant: a reference coadded from 4 frames of an earlier season, then 8
science exposures on 8 nights (airmass 1.1-1.6, seeing 1.6-2.5"), each characterised
(PSF photometry, Gaia zero point) and appended; light curves read back with
:func:`pipeline.matchfile.lightcurves.lightcurve` and compared with the sky model's truth.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy.spatial import cKDTree

from pipeline.measure.characterize import characterize_image
from pipeline.core.config import Config, load_config
from pipeline.core.image import write_quadrant
from pipeline.matchfile.lightcurves import lightcurve
from pipeline.matchfile.store import combine, pending_shards
from pipeline.matchfile.layout import read_table
from pipeline.matchfile.epochs import (MatchfileRunError, PHOTOMETRY_QA_BITS, append_science_epoch, calibration_of,
                                    science_epoch, seed_matchfile_from_reference)
from pipeline.reference.build import build_reference
from pipeline.reference.files import write_reference
from pipeline.simulate.pairs import PairOptions, pair_sky, simulate_reference_frames, simulate_science

BAND = "ZTF_r"
NIGHTS = ("2026-03-06", "2026-03-08", "2026-03-10", "2026-03-12", "2026-03-14", "2026-03-16", "2026-03-18",
          "2026-03-20")
AIRMASS = (1.1, 1.4, 1.2, 1.6, 1.15, 1.3, 1.5, 1.25)
SEEING = (1.7, 2.2, 1.9, 2.5, 1.8, 2.0, 2.3, 1.6)


@dataclass
class Run:
    cfg: Config
    sky: object
    reference: object
    root: Path
    matchfile: Path
    epochs: list            # dict(expid, mid_mjd, truth, zeropoint, header, append_s, photcal)
    last: tuple             # (science QuadrantImage, Characterization) of the last epoch
    previous: object        # the science QuadrantImage of the epoch before


def _unit(ra, dec) -> np.ndarray:
    ra, dec = np.deg2rad(np.asarray(ra, float)), np.deg2rad(np.asarray(dec, float))
    return np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])


def _arcsec(chord) -> np.ndarray:
    return np.rad2deg(2 * np.arcsin(np.asarray(chord) / 2)) * 3600


def _run(root: Path) -> Run:
    cfg = load_config(overrides={"instrument": {"quadrant_nx": 2048, "quadrant_ny": 2048}})
    options = PairOptions(science_night=NIGHTS[-1], reference_seeing=(1.5, 1.6, 1.7, 1.8), n_inject=0)
    sky = pair_sky(cfg, options)
    band = cfg.instrument.filters[BAND]
    reference = build_reference(simulate_reference_frames(cfg, options, sky), sky.gaia_catalogue(), band)
    matchfile = seed_matchfile_from_reference(root, reference, cfg)
    epochs, last, previous = [], None, None
    for k, (night, airmass, seeing) in enumerate(zip(NIGHTS, AIRMASS, SEEING)):
        pair = simulate_science(cfg, replace(options, science_night=night, science_airmass=airmass,
                                             science_seeing=seeing, seed=options.seed + 10 * k), sky)
        image, meta = pair.science, pair.science.meta
        science = characterize_image(image.data, image.mask, image.wcs, meta.gain, meta.saturate, band,
                                     gaia=pair.gaia, header=image.header, read_noise=meta.readnoi)
        start = time.perf_counter()
        append_science_epoch(root, image.header, science, cfg)
        epochs.append(dict(expid=meta.expid, mid_mjd=meta.obstime.mjd, truth=pair.truth, zeropoint=pair.zeropoint,
                           header=image.header, append_s=time.perf_counter() - start, photcal=science.photcal))
        previous, last = (last[0] if last else None), (image, science)
    return Run(cfg, sky, reference, root, matchfile, epochs, last, previous)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    return _run(tmp_path_factory.mktemp("matchfiles"))


def _folded_tables(run: Run) -> dict[str, dict]:
    combine(run.matchfile, run.cfg.matchfile)
    with h5py.File(run.matchfile, "r", locking=False) as h5:
        return {name: read_table(h5, name) for name in ("sources", "exposures", "photometry", "unmatched")}


def test_seeding_is_idempotent_and_epochs_carry_the_calibration(run):
    with h5py.File(run.matchfile, "r", locking=False) as h5:
        created = h5.attrs["created"]
    assert seed_matchfile_from_reference(run.root, run.reference, run.cfg) == run.matchfile
    tables = _folded_tables(run)
    assert pending_shards(run.matchfile) == []
    with h5py.File(run.matchfile, "r", locking=False) as h5:
        assert int(h5.attrs["refid"]) == run.reference.refid and h5.attrs["created"] == created
    assert len(tables["sources"]["id"]) == len(run.reference.catalog)
    exposures = tables["exposures"]
    assert sorted(exposures["expid"]) == sorted(e["expid"] for e in run.epochs)
    truth_zp = {e["expid"]: e["zeropoint"] for e in run.epochs}
    zp_error = np.array([exposures["magzp"][i] - truth_zp[x] for i, x in enumerate(exposures["expid"])])
    true_seeing = {e["expid"]: e["truth"].meta["SEEING"] for e in run.epochs}
    seeing_ratio = np.array([exposures["seeing"][i] / true_seeing[x] for i, x in enumerate(exposures["expid"])])
    print(f"\nzero point - truth: {np.round(zp_error, 4)}; magzpunc {np.round(exposures['magzpunc'], 4)}; "
          f"seeing / true {np.round(seeing_ratio, 3)}; limmag {np.round(exposures['limmag'], 2)}; "
          f"append s {[round(e['append_s'], 3) for e in run.epochs]}")
    assert np.all(np.abs(zp_error) < 0.01)
    assert np.all(np.abs(seeing_ratio - 1) < 0.15)
    assert np.all((exposures["limmag"] > 20.5) & (exposures["limmag"] < 23.5))
    assert np.all(exposures["astrometry_qa"] == 0) and np.all(exposures["photometry_qa"] == 0)


def test_reappending_an_exposure_replaces_it(run):
    image, science = run.last
    before = _folded_tables(run)["photometry"]
    result = append_science_epoch(run.root, image.header, science, run.cfg)
    after = _folded_tables(run)["photometry"]
    assert result.nmatched == np.count_nonzero(before["expid"] == result.expid)
    assert len(after["objid"]) == len(before["objid"])
    pairs = after["objid"].astype(np.int64) * 10**10 + after["expid"]
    assert len(np.unique(pairs)) == len(pairs)


def _truth_rows(run: Run):
    truth = run.epochs[0]["truth"]
    stars = truth[(truth["kind"] == "star") & ~np.asarray(truth["saturated"], bool)]
    row_of = {int(s): i for i, s in enumerate(run.sky.stars["source_id"])}
    return stars, row_of


def test_variable_star_light_curves_match_truth(run):
    """Residuals of every simulated variable star against SkyModel.star_mag at mid-exposure."""
    stars, row_of = _truth_rows(run)
    mid = {e["expid"]: e["mid_mjd"] for e in run.epochs}
    variables = stars[np.asarray(stars["variable"], bool)]
    residuals, errors, objects = [], [], 0
    for star in variables:
        curve = lightcurve(star["ra"], star["dec"], 1.5, run.root)
        curve = curve[curve["catflags"] == 0]
        if len(set(curve["oid"])) != 1 or len(curve) < 4:
            continue     # blended with a neighbour in the reference, or mostly flagged
        row = [row_of[int(star["id"])]]
        true = np.array([run.sky.star_mag(BAND, mid[int(x)], rows=row)[0] for x in curve["expid"]])
        residuals.append(np.asarray(curve["mag"], float) - true)
        errors.append(np.asarray(curve["magerr"], float))
        objects += 1
    res, err = np.concatenate(residuals), np.concatenate(errors)
    offset = float(np.median(res))
    pull = (res - offset) / err
    # Per object, its own mean removed (a blend's constant bias), with the N/(N-1) correction.
    own = np.concatenate([(r - np.average(r, weights=e ** -2)) / e * np.sqrt(len(r) / (len(r) - 1))
                          for r, e in zip(residuals, errors)])
    amplitude = np.median([np.ptp(run.sky.star_mag(BAND, np.array(list(mid.values())), rows=[row_of[int(v["id"])]]))
                           for v in variables])
    print(f"\nvariable stars: {objects}/{len(variables)} on the quadrant, {len(res)} points; median offset "
          f"{offset:+.4f} mag; pull std {np.std(pull):.3f} (own mean removed {np.std(own):.3f}); "
          f"median |pull| {np.median(np.abs(pull)):.3f}; median true range over the epochs {amplitude:.2f} mag")
    assert objects >= 0.8 * len(variables) and objects >= 20
    assert abs(offset) < 0.01
    assert 0.8 <= np.std(pull) <= 1.25
    assert 0.8 <= np.std(own) <= 1.25


def test_constant_stars_repeat_to_their_errors(run):
    """Per-object std of mag against the median magerr, for isolated unflagged non-variable stars."""
    tables = _folded_tables(run)
    sources, phot = tables["sources"], tables["photometry"]
    stars, _ = _truth_rows(run)
    truth = run.epochs[0]["truth"]
    everything = cKDTree(_unit(truth["ra"], truth["dec"]))
    chord, index = cKDTree(_unit(stars["ra"], stars["dec"])).query(_unit(sources["ra"], sources["dec"]))
    ratios, magerr = [], []
    for i in np.flatnonzero(_arcsec(chord) < 0.5):
        star = stars[index[i]]
        start, count = sources["phot_start"][i], sources["phot_count"][i]
        flags = phot["flags"][start:start + count]
        if star["variable"] or count < len(run.epochs) or np.any(flags != 0):
            continue
        near = everything.query_ball_point(_unit([star["ra"]], [star["dec"]])[0], np.deg2rad(8 / 3600))
        if sum(truth["mag"][j] < star["mag"] + 3 for j in near) > 1:
            continue     # a neighbour within 8" brighter than 6 % of its flux
        mags, errs = phot["mag"][start:start + count], phot["magerr"][start:start + count]
        ratios.append(np.std(mags, ddof=1) / np.median(errs))
        magerr.append(np.median(errs))
    ratios, magerr = np.array(ratios), np.array(magerr)
    lines = []
    for low, high in ((0.0, 0.003), (0.003, 0.01), (0.01, 0.03), (0.03, 0.1)):
        sel = (magerr >= low) & (magerr < high)
        lines.append(f"magerr {low}-{high}: {sel.sum()} stars, median std/magerr {np.median(ratios[sel]):.3f}")
    print("\nconstant stars: " + "; ".join(lines))
    bright = (magerr >= 0.003) & (magerr < 0.03)
    assert bright.sum() >= 100
    assert 0.8 <= np.median(ratios[bright]) <= 1.3
    assert 0.8 <= np.median(ratios[magerr >= 0.03]) <= 1.3


def test_bright_transients_are_unmatched_detections(run):
    """Transients 1 mag above the limit and 3" from every reference object: in /unmatched."""
    tables = _folded_tables(run)
    sources, unmatched, exposures = tables["sources"], tables["unmatched"], tables["exposures"]
    limit = dict(zip(exposures["expid"], exposures["limmag"]))
    reference = cKDTree(_unit(sources["ra"], sources["dec"]))
    found, pulls, hosted = [], [], 0
    for epoch in run.epochs:
        truth = epoch["truth"]
        transients = truth[np.asarray(truth["transient"], bool) & (truth["mag"] < limit[epoch["expid"]] - 1.0)]
        rows = unmatched["expid"] == epoch["expid"]
        detections = cKDTree(_unit(unmatched["ra"][rows], unmatched["dec"][rows]))
        for t in transients:
            position = _unit([t["ra"]], [t["dec"]])
            if _arcsec(reference.query(position)[0][0]) < 3.0:
                hosted += 1     # on a reference object (its host): its flux goes to that object's row
                continue
            chord, j = detections.query(position)
            found.append(_arcsec(chord[0]) < 1.0)
            if found[-1]:
                pulls.append((unmatched["mag"][rows][j[0]] - t["mag"]) / unmatched["magerr"][rows][j[0]])
    pulls = np.array(pulls)
    print(f"\nbright transients: {len(found)} epoch-detections away from reference objects, {sum(found)} in "
          f"/unmatched within 1\"; {hosted} within 3\" of a reference object; pulls median {np.median(pulls):+.2f} "
          f"std {np.std(pulls):.2f} (undetected host light biases them bright)")
    assert len(found) >= 20
    assert np.mean(found) >= 0.95
    assert abs(np.median(pulls)) < 1.5


def test_no_zero_point_is_a_clear_error(run):
    image, science = run.last
    without = replace(science, photcal=None)
    with pytest.raises(MatchfileRunError, match="no zero point"):
        science_epoch(image.header, without, run.cfg)
    calibration = calibration_of(without, run.reference)
    assert calibration.source == "reference" and abs(calibration.magzp - science.zeropoint) < 0.02
    epoch = science_epoch(image.header, without, run.cfg, reference=run.reference)
    assert epoch.meta.photometry_qa & PHOTOMETRY_QA_BITS["ZP_NOT_FITTED"]
    plain = replace(run.reference, catalog=None)
    with pytest.raises(MatchfileRunError, match="no PSF catalogue"):
        seed_matchfile_from_reference(run.root, plain, run.cfg)


def test_command_appends_a_solved_image(run, tmp_path, capsys):
    from pipeline.commands import matchfile as command

    image, science = run.last
    write_quadrant(tmp_path / "science.fits", image.data, image.header, image.mask)
    write_reference(tmp_path / "ref.fits", run.reference)
    common = argparse.ArgumentParser(add_help=False)
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(), common)
    root = tmp_path / "matchfiles"
    args = parser.parse_args(["matchfile", "append", str(tmp_path / "science.fits"), "--reference",
                              str(tmp_path / "ref.fits"), "--root", str(root)])
    args.cfg = run.cfg
    assert args.func(args) == 0
    assert "matched" in capsys.readouterr().out
    catalog = run.reference.catalog
    star = catalog[np.nanargmin(np.where(catalog["flags"] == 0, np.abs(catalog["mag"] - 17.0), np.nan))]
    curve = lightcurve(star["ra"], star["dec"], 1.0, root)
    assert list(curve["expid"]) == [image.meta.expid]
    # The file's zero point came from the header (none here) or the reference: the same stars.
    assert abs(float(curve["mag"][0]) - float(star["mag"])) < 0.05
    bad = parser.parse_args(["matchfile", "append", str(tmp_path / "missing.fits"), "--root", str(root)])
    bad.cfg = run.cfg
    assert bad.func(bad) == 3


def test_demo_names_a_light_curve_to_look_at(run):
    """The demo's pick: the simulated variable star with the most unflagged epochs; without
    truth, the most variable object."""
    from pipeline.demo.records import pick_variable_lightcurve

    combine(run.matchfile, run.cfg.matchfile)
    stars, _ = _truth_rows(run)
    variables = stars[np.asarray(stars["variable"], bool)]["id", "ra", "dec"]
    named = pick_variable_lightcurve(run.root, [run.matchfile], variables)
    print(f"\ndemo light curve: {named}")
    assert named["simulated_variable"] and named["epochs"] == len(run.epochs)
    assert named["command"].startswith(f"skydiff lightcurve {named['ra']:.6f} ")
    chord, _ = cKDTree(_unit(variables["ra"], variables["dec"])).query(_unit([named["ra"]], [named["dec"]]))
    assert _arcsec(chord[0]) < 1.0
    anyone = pick_variable_lightcurve(run.root, [run.matchfile], None)
    assert not anyone["simulated_variable"] and anyone["epochs"] >= 3


def test_chi_and_sharp_of_every_epoch(run):
    """Every detection's PSF-fit chi and sharp: finite; point sources chi ~ 1 and sharp ~ 0;
    the simulator's galaxies (extended) apart from the stars in sharp."""
    tables = _folded_tables(run)
    sources, phot, lone = tables["sources"], tables["photometry"], tables["unmatched"]
    chi, sharp = np.concatenate([phot["chi"], lone["chi"]]), np.concatenate([phot["sharp"], lone["sharp"]])
    finite = np.mean(np.isfinite(chi) & np.isfinite(sharp))
    truth = run.epochs[0]["truth"]
    unsaturated = ~np.asarray(truth["saturated"], bool)
    kinds = {}
    for kind in ("star", "galaxy"):
        objects = truth[(truth["kind"] == kind) & unsaturated & ~np.asarray(truth["variable"], bool)]
        chord, _ = cKDTree(_unit(objects["ra"], objects["dec"])).query(_unit(sources["ra"], sources["dec"]))
        rows = np.flatnonzero(_arcsec(chord) < 0.5)
        rows = np.concatenate([np.arange(sources["phot_start"][i], sources["phot_start"][i] + sources["phot_count"][i])
                               for i in rows])
        kinds[kind] = rows[(phot["flags"][rows] == 0) & (phot["magerr"][rows] < 0.1)]
    stars, galaxies = kinds["star"], kinds["galaxy"]
    print(f"\nchi and sharp finite on {100 * finite:.2f} % of {len(chi)} detections; point sources "
          f"({len(stars)} rows): chi median {np.median(phot['chi'][stars]):.3f}, |sharp| median "
          f"{np.median(np.abs(phot['sharp'][stars])):.3f}, sharp 5-95 % {np.percentile(phot['sharp'][stars], [5, 95]).round(3)}; "
          f"galaxies ({len(galaxies)} rows): sharp median {np.median(phot['sharp'][galaxies]):+.3f}, "
          f"5 % {np.percentile(phot['sharp'][galaxies], 5):+.3f}")
    assert finite >= 0.99
    assert len(stars) > 1000 and len(galaxies) > 50
    assert 0.8 <= np.median(phot["chi"][stars]) <= 1.3
    assert np.median(np.abs(phot["sharp"][stars])) <= 0.1
    cut = 0.3
    assert np.mean(phot["sharp"][stars] < cut) >= 0.95 and np.mean(phot["sharp"][galaxies] > cut) >= 0.9


def test_exposures_carry_the_calibration_colour_term_and_filefracday(run):
    """clrcoeff/clrcounc are each exposure's calibration's; within 2 sigma of the simulator's
    colour term where the stars' colours fitted it; filefracday from the exposure start."""
    from astropy.time import Time

    from pipeline.matchfile.layout import filefracday

    exposures = _folded_tables(run)["exposures"]
    slope = run.cfg.instrument.filters[BAND].color_slope
    row = {int(x): i for i, x in enumerate(exposures["expid"])}
    pulls = []
    for epoch in run.epochs:
        i, photcal = row[epoch["expid"]], epoch["photcal"]
        assert exposures["clrcoeff"][i] == np.float32(photcal.clrcoeff)
        assert exposures["clrcounc"][i] == np.float32(photcal.clrcounc)
        assert exposures["filefracday"][i] == filefracday(exposures["mjd"][i])[0]
        start = Time(epoch["header"]["OBSMJD"], format="mjd", scale="utc")
        assert str(exposures["filefracday"][i])[:8] == start.strftime("%Y%m%d")
        assert photcal.colour_fitted
        pulls.append((photcal.clrcoeff - slope) / photcal.clrcounc)
    print(f"\nclrcoeff - simulated colour term, in sigma: {np.round(pulls, 2)}")
    assert np.all(np.abs(pulls) <= 2)
