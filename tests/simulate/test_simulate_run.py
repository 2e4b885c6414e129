"""Simulating a run to disk, and the ``skydiff simulate`` command."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from pipeline.commands import simulate as simulate_command
from pipeline.core.config import load_config
from pipeline.core.image import read_quadrant
from pipeline.simulate.plan import Field
from pipeline.core.focalplane import QuadrantListError, parse_quadrants
from pipeline.simulate.run import simulate_run
from pipeline.simulate.sky import GAIA_COLUMNS

FIELDS = [Field(600, 150.0, 33.0)]
NIGHTS = ["2026-03-15"]


@pytest.fixture(scope="module")
def cfg():
    # Small quadrants and a sparse sky keep the run fast; the layout on disk is the real one.
    # (Transients are counted per quadrant: one per 256 x 256 quadrant is still ~10^4 per field.)
    return load_config(overrides={
        "simulation": {"star_density_per_deg2": 300.0, "galaxy_density_per_deg2": 100.0,
                       "transients_per_quadrant": 1},
        "instrument": {"quadrant_nx": 256, "quadrant_ny": 256}})


@pytest.fixture(scope="module")
def run_two(cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("sim_two")
    summary = simulate_run(cfg, out, FIELDS, NIGHTS, epochs_per_night=2, quadrants="0,21", seed=5)
    return out, summary


def _image_files(out):
    return sorted(p.relative_to(out) for p in (out / "exposures").rglob("*.fits"))


def test_run_writes_the_documented_layout(run_two):
    out, summary = run_two
    assert summary["n_exposures"] == 2 and summary["n_quadrant_images"] == 4
    images = _image_files(out)
    assert len(images) == 4
    for rel in images:
        assert rel.parts[0] == "exposures" and rel.parts[1] == "20260315"
        image = read_quadrant(out / rel)
        assert image.mask.shape == image.data.shape == (256, 256)
        name = rel.name
        assert name.startswith(f"ztf_{image.meta.expid}_f600_{image.meta.filter}_c{image.meta.ccdid:02d}_q")
        truth_path = out / "truth" / str(image.meta.expid) / name.replace(".fits", "_truth.fits")
        with fits.open(truth_path) as hdul:
            assert hdul[0].header["CTYPE1"] == "RA---TPV" and "TRUEZP" in hdul[0].header
            truth = Table(hdul["TRUTH"].data)
        assert {"id", "kind", "ra", "dec", "x", "y", "flux_e", "flux_adu", "mag"} <= set(truth.colnames)
    gaia = Table.read(out / "gaia" / "gaia_catalog.fits")
    assert gaia.colnames == GAIA_COLUMNS
    exposures = Table.read(out / "truth" / "exposures.ecsv")
    assert len(exposures) == 2 and {"expid", "seed", "true_ra", "true_dec", "airmass"} <= set(exposures.colnames)
    transients = Table.read(out / "truth" / "transients.ecsv")
    assert all(f"mag_{e}" in transients.colnames for e in exposures["expid"])
    # Transients peak within the simulated night (half a day either side).
    assert np.all(np.abs(transients["t_peak"] - np.mean(exposures["obsmjd"])) < 1.0)
    stars = Table.read(out / "truth" / "stars.fits")
    assert len(stars) == len(gaia) == summary["n_stars"]
    meta = json.loads((out / "simulation.json").read_text())
    assert meta["seed"] == 5 and meta["quadrants"] == [0, 21] and "version" in meta


def test_quadrant_alone_equals_quadrant_with_others_and_reruns_reproduce(cfg, run_two, tmp_path):
    out, _ = run_two
    simulate_run(cfg, tmp_path, FIELDS, NIGHTS, epochs_per_night=2, quadrants=[21], seed=5)
    alone = _image_files(tmp_path)
    assert len(alone) == 2
    for rel in alone:
        with fits.open(out / rel) as a, fits.open(tmp_path / rel) as b:
            np.testing.assert_array_equal(a[0].data, b[0].data)
            np.testing.assert_array_equal(a["MASK"].data, b["MASK"].data)
    gaia_a = Table.read(out / "gaia" / "gaia_catalog.fits")
    gaia_b = Table.read(tmp_path / "gaia" / "gaia_catalog.fits")
    np.testing.assert_array_equal(gaia_a["ra"], gaia_b["ra"])


def test_parallel_run_matches_serial(cfg, run_two, tmp_path):
    out, _ = run_two
    simulate_run(cfg, tmp_path, FIELDS, NIGHTS, epochs_per_night=2, quadrants="0,21", seed=5, jobs=2)
    for rel in _image_files(out):
        with fits.open(out / rel) as a, fits.open(tmp_path / rel) as b:
            np.testing.assert_array_equal(a[0].data, b[0].data)


def test_bad_arguments_are_clear_errors(cfg, tmp_path):
    with pytest.raises(ValueError, match="rcids 0-63"):
        parse_quadrants("0,64")
    with pytest.raises(ValueError, match="unknown filter"):
        simulate_run(cfg, tmp_path, FIELDS, NIGHTS, filters=["ZTF_z"], quadrants=[0])
    assert parse_quadrants("all") == list(range(64))
    assert parse_quadrants("5, 0,10-12,11") == [0, 5, 10, 11, 12]
    with pytest.raises(ValueError, match="10-12"):
        parse_quadrants("a-b")
    with pytest.raises(QuadrantListError, match="'5-2' runs backwards"):
        parse_quadrants("5-2")


def test_a_bad_quadrant_list_is_a_usage_error(cfg, tmp_path):
    """Exit 2, as the README's table says for usage errors, whichever command takes --quadrants."""
    from _cli import run_skydiff

    assert run_skydiff(["exposure", str(tmp_path), "--quadrants", "5-2"], cfg) == 2
    assert run_skydiff(["exposure", str(tmp_path), "--quadrants", "0,64"], cfg) == 2
    assert run_skydiff(["submit", str(tmp_path), "--quadrants", "x"], cfg) == 2


def test_simulate_command_runs_and_summarises(cfg, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    common = argparse.ArgumentParser(add_help=False)
    simulate_command.register(parser.add_subparsers(dest="command"), common)
    args = parser.parse_args(["simulate", "--out", str(tmp_path), "--fields", "600:150:33",
                              "--filters", "r", "--epochs-per-night", "1", "--quadrants", "5", "--seed", "7"])
    args.cfg = cfg
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "simulated 1 exposure(s), 1 quadrant image(s)" in printed
    assert len(_image_files(tmp_path)) == 1
    bad = parser.parse_args(["simulate", "--out", str(tmp_path), "--fields", "12345"])
    bad.cfg = cfg
    assert bad.func(bad) == 2


def test_simulate_command_writes_the_ipac_layout(cfg, tmp_path, capsys):
    """``--layout ipac``: one sciimg/mskimg pair per quadrant, read back as the quadrant."""
    from pipeline.core.image import read_quadrant
    from pipeline.formats.exposure import exposure_rcids

    parser = argparse.ArgumentParser()
    common = argparse.ArgumentParser(add_help=False)
    simulate_command.register(parser.add_subparsers(dest="command"), common)
    args = parser.parse_args(["simulate", "--out", str(tmp_path), "--fields", "600:150:33", "--filters", "r",
                              "--epochs-per-night", "1", "--quadrants", "5", "--seed", "7", "--layout", "ipac",
                              "--compress", "fz"])
    args.cfg = cfg
    assert args.func(args) == 0
    (folder,) = [p for p in (tmp_path / "exposures").glob("*/*") if p.is_dir()]
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 and names[0].endswith("_zr_c02_o_q2_mskimg.fits.fz") and names[1].endswith("_sciimg.fits.fz")
    assert exposure_rcids(folder) == [5]
    image = read_quadrant(folder / names[1])
    assert image.meta.rcid == 5 and image.meta.filter == "ZTF_r" and image.mask.any()
    for bad in (["--compress", "gz"], ["--layout", "ipac", "--mef"]):
        args = parser.parse_args(["simulate", "--out", str(tmp_path / "x"), "--quadrants", "5", *bad])
        args.cfg = cfg
        assert args.func(args) == 2
