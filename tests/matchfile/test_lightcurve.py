"""Light-curve reader across files (footprint index), selection, output formats, plot and command."""
from __future__ import annotations

import argparse
import io
import json

import numpy as np
import pytest
from astropy.io.votable import parse_single_table
from astropy.table import Table

from pipeline.commands import lightcurve as lightcurve_command
from pipeline.matchfile.lightcurves import LightcurveReader, lightcurve, select, serialise
from pipeline.matchfile.store import ReferenceMeta, append_epoch, create_matchfile
from pipeline.matchfile.index import FootprintIndex, rebuild_index
from pipeline.simulate.matchfile_truth import synthetic_epoch, synthetic_sky
from pipeline.core.refraction import site_location

# Four quadrant footprints: two neighbours, one across RA = 0, and a second filter of the first.
FILES = [((0.5, 30.0), ReferenceMeta(500, 7, 1, 1, 11, 2459000.5, 2459100.5, 15)),
         ((1.55, 30.0), ReferenceMeta(500, 7, 2, 1, 12, 2459000.5, 2459100.5, 15)),
         ((359.95, -10.0), ReferenceMeta(700, 3, 4, 2, 13, 2459000.5, 2459100.5, 15)),
         ((0.5, 30.0), ReferenceMeta(500, 7, 1, 2, 14, 2459000.5, 2459100.5, 15))]


@pytest.fixture(scope="module")
def root(tmp_path_factory, cfg):
    root = tmp_path_factory.mktemp("lcroot")
    location = site_location(cfg.site)
    skies = []
    for n, ((ra, dec), meta) in enumerate(FILES):
        # The two filters of one quadrant share the stars (same seed), as a real sky would.
        sky = synthetic_sky(400, ra, dec, seed=1 if n in (0, 3) else 10 + n, meta=meta, half_width_deg=0.45)
        path = create_matchfile(root, sky.reference, meta)
        for k in range(3):
            append_epoch(path, *synthetic_epoch(sky, 100 * n + k + 1, 60000.0 + k), location)
        skies.append((path, sky))
    return root, skies


def test_footprint_index_opens_only_covering_files(root):
    root, skies = root
    path, sky = skies[0]
    ra, dec = float(sky.reference["ra"][0]), float(sky.reference["dec"][0])
    reader = LightcurveReader(root)
    table = reader.cone(ra, dec, 1.0 / 3600)
    assert set(reader.opened) == {skies[0][0], skies[3][0]}        # both filters of that quadrant, nothing else
    assert sorted(set(table["filtercode"])) == ["zg", "zr"] and len(table) == 6
    assert len(set(table["oid"])) == 2                               # one object per filter
    across = skies[2][1]
    reader = LightcurveReader(root)
    table = reader.cone(float(across.reference["ra"][3]), float(across.reference["dec"][3]), 1.0 / 3600)
    assert reader.opened == [skies[2][0]] and len(table) == 3
    assert reader.cone(180.0, -60.0, 0.01).colnames == table.colnames and reader.opened == [skies[2][0]]


def test_index_rebuilds_from_the_files(root):
    root, skies = root
    before = {p: e for p, e in FootprintIndex(root).entries()}
    assert rebuild_index(root) == len(FILES)
    after = {p: e for p, e in FootprintIndex(root).entries()}
    assert after.keys() == before.keys()
    for p in before:
        assert before[p] == pytest.approx(after[p])


def test_lightcurve_function_and_selection(root):
    root, skies = root
    sky = skies[0][1]
    brightest = int(np.argmin(sky.true_mag))        # detected at every epoch in both filters
    ra, dec = float(sky.reference["ra"][brightest]), float(sky.reference["dec"][brightest])
    table = lightcurve(ra, dec, 1.0, root)
    assert len(table) == 6
    for column in ("oid", "filtercode", "mjd", "hjd", "mag", "magerr", "catflags", "expid", "field", "ccdid", "qid"):
        assert column in table.colnames
    assert list(table["field"]) == [500] * len(table) and set(table["qid"]) == {1}
    assert np.all(np.diff(table["hjd"][table["filtercode"] == "zg"]) > 0)
    assert set(select(table, fids=[2])["filtercode"]) == {"zr"}
    assert len(select(table, mjd_range=(60000.5, 60001.5))) == 2
    assert len(select(table, nobs_min=4)) == 0 and len(select(table, nobs_min=3)) == len(table)
    flagged = table.copy()
    flagged["catflags"][0] = 32768
    assert len(select(flagged, bad_flags_mask=32768)) == len(table) - 1
    with pytest.raises(ValueError, match="dec"):
        lightcurve(10.0, 95.0, 1.0, root)


@pytest.mark.parametrize("fmt", ["csv", "ecsv", "votable", "ipac_table", "json"])
def test_every_format_round_trips(root, fmt):
    root, skies = root
    sky = skies[1][1]
    table = lightcurve(float(sky.reference["ra"][0]), float(sky.reference["dec"][0]), 1.0, root)
    body, _ = serialise(table, fmt)
    if fmt == "json":
        payload = json.loads(body)
        back = Table(rows=payload["data"], names=[c["name"] for c in payload["columns"]])
    elif fmt == "votable":
        back = parse_single_table(io.BytesIO(body)).to_table()
    else:
        back = Table.read(body.decode(), format={"csv": "ascii.csv", "ecsv": "ascii.ecsv",
                                                 "ipac_table": "ascii.ipac"}[fmt])
    assert len(back) == len(table) == 3
    assert np.allclose(back["hjd"], table["hjd"], rtol=0, atol=1e-8)
    assert list(back["oid"]) == list(table["oid"])


def test_command_prints_and_plots(root, tmp_path, capsysbinary, cfg):
    root, skies = root
    sky = skies[0][1]
    parser = argparse.ArgumentParser()
    lightcurve_command.register(parser.add_subparsers(dest="command"), argparse.ArgumentParser(add_help=False))
    plot = tmp_path / "lc.png"
    args = parser.parse_args(["lightcurve", str(float(sky.reference["ra"][2])), str(float(sky.reference["dec"][2])),
                              "--root", str(root), "--format", "ecsv", "--plot", str(plot)])
    args.cfg = cfg
    assert args.func(args) == 0
    table = Table.read(capsysbinary.readouterr().out.decode(), format="ascii.ecsv")
    assert len(table) == 6 and plot.stat().st_size > 10000
    args = parser.parse_args(["lightcurve", "400", "0", "--root", str(root)])
    args.cfg = cfg
    assert args.func(args) == 2


def test_commands_on_a_missing_root_exit_3_naming_it(tmp_path, cfg, caplog):
    """A mistyped --root is bad input (3), not an empty table or an empty service (exit 0)."""
    from _cli import run_skydiff

    missing = tmp_path / "no-such-root"
    assert run_skydiff(["lightcurve", "150", "30", "--root", str(missing)], cfg) == 3
    assert run_skydiff(["serve-lightcurves", "--port", "0", "--root", str(missing)], cfg) == 3
    assert str(missing) in caplog.text and "no such directory" in caplog.text


def test_plot_in_mjd_with_upper_limits_and_reference_magnitude(root):
    """The plot a scientist expects: plain MJD (no offset), every epoch without a detection
    as an upper limit at the exposure's limiting magnitude, and the reference magnitude."""
    from pipeline.matchfile.lightcurves import lightcurve_figure, lightcurve_plot_context

    root, skies = root
    sky = skies[0][1]
    # An object of the first file seen at some epochs but not all (a faint one).
    counts = {}
    for i in range(len(sky.reference)):
        table = lightcurve(float(sky.reference["ra"][i]), float(sky.reference["dec"][i]), 0.5, root)
        table = table[table["filtercode"] == "zg"]
        if 0 < len(table) < 3:
            counts[i] = table
            break
    (i, table), = counts.items()
    ra, dec = float(sky.reference["ra"][i]), float(sky.reference["dec"][i])
    references, limits = lightcurve_plot_context(ra, dec, 0.5, root)
    oid = int(table["oid"][0])
    mine = limits[limits["oid"] == oid]
    assert len(mine) == 3 - len(table) and not set(np.round(mine["mjd"], 6)) & set(np.round(table["mjd"], 6))
    ref = references[references["oid"] == oid]
    assert float(ref["refmag"][0]) == pytest.approx(float(sky.reference["mag"][i]), abs=1e-4)
    full = lightcurve(ra, dec, 0.5, root)
    figure = lightcurve_figure(full, "t", references, limits)
    figure.canvas.draw()
    ax = figure.axes[0]
    assert ax.get_xlabel().startswith("MJD") and ax.xaxis.get_major_formatter().get_offset() == ""
    assert ax.yaxis_inverted()
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert f"{oid} zg upper limits (5 sigma)" in labels
    assert any(label.startswith(f"{oid} zg reference ") for label in labels)
    triangles = [line for line in ax.lines if line.get_marker() == "v"]
    assert sum(len(line.get_xdata()) for line in triangles) == len(limits)
    lo, hi = ax.get_xlim()
    assert lo < 60000.0 and hi > 60002.0     # the epochs' MJDs, not an offset
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert float(ref["refmag"][0]) in [line.get_ydata()[0] for line in dashed]
