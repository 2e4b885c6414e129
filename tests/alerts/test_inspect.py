"""Looking at candidates and alerts: ``skydiff candidates list|show`` and the triplet drawing
shared with ``skydiff alerts show --png`` (scores, sign, orientation, centre mark)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import fastavro
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from _cli import run_skydiff
from alerts.history import SQLiteHistoryStore
from alerts.inspect import alert_triplet, candidate_triplet, north_east, triplet_figure
from alerts.packet import make_alerts
from alerts.schema import serialize_alert
from pipeline.simulate.alerts import synthetic_candidates, synthetic_context, synthetic_cutouts

SAMPLES = Path(__file__).resolve().parents[1] / "data" / "ztf-alerts"


def _products(folder: Path, n: int = 6, drb: bool = False, rotation_deg: float = 0.0) -> Path:
    """A products folder as `skydiff subtract` writes it (the parts the inspection reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    candidates = synthetic_candidates(n, seed=3)
    if drb:
        candidates["drb"] = np.linspace(0.1, 0.9, n)
    triplets = synthetic_cutouts(candidates)
    candidates.write(folder / "candidates.ecsv", format="ascii.ecsv")
    hdus = [fits.PrimaryHDU()] + [fits.ImageHDU(np.stack([getattr(t, kind) for t in triplets]), name=kind.upper())
                                  for kind in ("science", "reference", "difference")]
    fits.HDUList(hdus).writeto(folder / "cutouts.fits")
    header = fits.Header(synthetic_context().wcs_header)
    scale, angle = abs(header["CD1_1"]), math.radians(rotation_deg)
    header["CD1_1"], header["CD1_2"] = -scale * math.cos(angle), scale * math.sin(angle)
    header["CD2_1"], header["CD2_2"] = scale * math.sin(angle), scale * math.cos(angle)
    header["FILTER"] = "ZTF_r"
    fits.PrimaryHDU(np.zeros((8, 8), np.float32), header=header).writeto(folder / "diff.fits")
    (folder / "qa.json").write_text(json.dumps({"expid": 302100001, "rcid": 21, "n_candidates": n}))
    return folder


def _texts(figure) -> str:
    return "\n".join(t.get_text() for t in figure.findobj(lambda a: hasattr(a, "get_text")))


def test_list_prints_every_candidate_and_cuts_on_rb(tmp_path, cfg, capsys):
    folder = _products(tmp_path / "sub")
    rb = np.asarray(synthetic_candidates(6, seed=3)["rb"])
    assert run_skydiff(["candidates", "list", str(folder)], cfg) == 0
    out = capsys.readouterr().out
    assert "6 candidate(s)" in out and "drb" not in out and "isdiffpos" in out
    assert run_skydiff(["candidates", "list", str(folder), "--rb-min", "0.5"], cfg) == 0
    out = capsys.readouterr().out
    assert f"{int(np.sum(rb >= 0.5))} candidate(s) with rb >= 0.5" in out
    assert run_skydiff(["candidates", "list", str(_products(tmp_path / "drb", drb=True))], cfg) == 0
    assert " drb " in capsys.readouterr().out


def test_show_draws_scores_sign_orientation_and_centre(tmp_path, cfg, capsys):
    folder = _products(tmp_path / "sub")
    png = tmp_path / "c2.png"
    assert run_skydiff(["candidates", "show", str(folder), "2", "--png", str(png)], cfg) == 0
    out = capsys.readouterr().out
    assert "drb n/a" in out and "cand_index 2" in out and png.stat().st_size > 5000
    view = candidate_triplet(folder, 2)
    row = synthetic_candidates(6, seed=3)[2]
    assert view.rb == pytest.approx(row["rb"]) and view.drb is None
    # North up, east left on this WCS.
    (nx, ny), (ex, ey) = view.orientation
    assert (nx, ny) == pytest.approx((0, 1), abs=1e-3) and (ex, ey) == pytest.approx((-1, 0), abs=1e-3)
    # Centre: the candidate's sub-pixel position in the 63 px stamp whose pixel 31 is round(x).
    x0 = row["xpos"] - 1
    assert view.centre[0] == pytest.approx(31 + x0 - math.floor(x0 + 0.5))
    figure = triplet_figure(view)
    texts = _texts(figure)
    assert "N" in texts.split() and "E" in texts.split() and "drb n/a" in texts
    assert f"rb {row['rb']:.3f}" in texts and ("isdiffpos +" if row["isdiffpos"] else "isdiffpos -") in texts
    # Four centre ticks on each of the three stamps.
    assert sum(line.get_label() == "_centre" for axes in figure.axes for line in axes.lines) == 12
    # By candid too; and a drb column is shown.
    drb_folder = _products(tmp_path / "drb", drb=True)
    view = candidate_triplet(drb_folder, (302100001 * 10**4 + 21 * 100 + 15) * 10**6 + 4)
    assert view.drb == pytest.approx(0.1 + 0.8 * 4 / 5) and f"drb {view.drb:.3f}" in view.scores_line


def test_orientation_follows_a_rotated_wcs(tmp_path):
    folder = _products(tmp_path / "rot", rotation_deg=30.0)
    view = candidate_triplet(folder, 1)
    # Intermediate world coordinates (east, north) = CD (dx, dy): north and east in pixels are CD^-1's columns.
    header = fits.getheader(folder / "diff.fits")
    cd = np.array([[header["CD1_1"], header["CD1_2"]], [header["CD2_1"], header["CD2_2"]]])
    east, north = np.linalg.inv(cd).T
    for got, expected in zip(view.orientation, (north, east)):
        angle = math.degrees(math.atan2(got[1], got[0]) - math.atan2(expected[1], expected[0]))
        assert (angle + 180) % 360 - 180 == pytest.approx(0, abs=0.05)
    assert north_east(WCS(naxis=2), 0, 0) is None


def test_show_bad_inputs_are_named(tmp_path, cfg, caplog):
    folder = _products(tmp_path / "sub")
    assert run_skydiff(["candidates", "show", str(folder), "99"], cfg) == 3
    assert "no such cand_index" in caplog.text and "candidates.ecsv" in caplog.text
    assert run_skydiff(["candidates", "list", str(tmp_path / "missing")], cfg) == 3
    assert "missing: no qa.json" in caplog.text
    assert run_skydiff(["candidates", "show", str(folder), "123456789012"], cfg) == 3
    assert "holds expid 302100001" in caplog.text or "was not made by make_candid" in caplog.text


def test_alert_triplet_our_packet_and_ztfs(tmp_path):
    context = synthetic_context()
    candidates = synthetic_candidates(1, seed=5)
    (triplet,) = synthetic_cutouts(candidates)
    (alert,) = make_alerts(context, candidates, [triplet],
                           SQLiteHistoryStore(tmp_path / "h.sqlite"), "test")
    alert = next(fastavro.reader(__import__("io").BytesIO(serialize_alert(alert))))
    view = alert_triplet(alert)
    (nx, ny), (ex, ey) = view.orientation
    assert (nx, ny) == pytest.approx((0, 1), abs=1e-3) and (ex, ey) == pytest.approx((-1, 0), abs=1e-3)
    expected = (candidates["xpos"][0] - 1 - triplet.origin[0], candidates["ypos"][0] - 1 - triplet.origin[1])
    # synthetic_candidates places ra/dec on a linear approximation of the TAN WCS: ~0.15 px off.
    assert view.centre == pytest.approx(expected, abs=0.3) and "drb n/a" in view.scores_line
    with_drb = next(fastavro.reader(open(SAMPLES / "1661382530015060001.avro", "rb")))
    view = alert_triplet(with_drb)
    assert view.orientation is None and view.drb == pytest.approx(with_drb["candidate"]["drb"])
    assert "isdiffpos -" in view.scores_line
    assert "orientation unknown" in _texts(triplet_figure(view))
