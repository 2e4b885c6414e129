"""The demo end to end on a reduced plan: simulation, then every quadrant through the
quadrant runner (real SCAMP astrometry; the earlier season left unusable for want of a
reference, its solved images coadded into the reference), subtraction, the summary's count
of the simulated transients found, the alerts (no broker configured: they stay in the
spool), the matchfile, and the configuration it writes for the runner's commands."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from astropy.table import Table

from alerts.ids import split_candid
from alerts.schema import read_alert_file, validate_alert

from pipeline.cli import main
from pipeline.core.config import load_config
from pipeline.demo.survey import NEXT_COMMANDS, DemoOptions, format_summary, run_demo


def test_demo_runs_the_survey_through_the_quadrant_runner(tmp_path, tmp_path_factory, monkeypatch, capsys):
    workdir = tmp_path.resolve()
    options = DemoOptions(nights=("2026-03-15",), filters=("ZTF_r",), epochs_per_night=2, quadrants=(21,),
                          reference_nights=("2025-11-18", "2025-11-21"), jobs=2)
    summary = run_demo(load_config(), workdir, options)
    text = format_summary(summary)
    assert all(r["usable"] for r in summary.astrometry) and len(summary.astrometry) == 6
    (reference,) = summary.references
    assert reference["path"] and reference["nframes"] == 4
    assert Path(reference["path"]).parent == workdir / "references"
    # The earlier season: solved, then unusable for want of a reference.
    season = {r["expid"] for r in summary.astrometry} - {r["expid"] for r in summary.subtractions}
    for expid in season:
        status = json.loads((workdir / "outputs" / str(expid) / "21" / "status.json").read_text())
        assert status["state"] == "unusable" and status["astrometry"]["usable"] and "no reference" in status["reason"]
    assert len(summary.subtractions) == 2 and all(r["state"] == "finished" for r in summary.subtractions)
    detectable = sum(r["transients_detectable"] for r in summary.subtractions)
    found = sum(r["transients_found"] for r in summary.subtractions)
    assert detectable >= 5 and found >= 0.9 * detectable
    asteroids = sum(r["asteroids_found"] for r in summary.subtractions)
    assert asteroids > 0 and sum(r["asteroids_named"] for r in summary.subtractions) == asteroids
    assert "simulated transients above the limit" in text and "science exposures" in summary.stages
    saved = json.loads((workdir / "qa" / "subtractions.json").read_text())
    assert [r["n_candidates"] for r in saved] == [r["n_candidates"] for r in summary.subtractions]
    for r in summary.subtractions:
        assert Path(r["outdir"]) == workdir / "outputs" / str(r["expid"]) / "21" / "subtraction"
        assert r["n_rb_above_half"] <= r["n_candidates"]

    # Alerts: one per alertable candidate, all in the spool's pending folder (no broker).
    alerts = summary.alerts
    assert alerts["broker"] == "" and alerts["delivered"] == 0
    tables = [Table.read(Path(r["outdir"]) / "candidates.ecsv") for r in summary.subtractions]
    expected = sum(int((t["magpsf"] == t["magpsf"]).sum()) for t in tables)
    assert alerts["built"] == alerts["spooled"] == alerts["pending"] == expected > 0
    assert f"{expected} built, {expected} spooled, 0 delivered" in text
    packets = [read_alert_file(path) for path in sorted((workdir / "spool").rglob("pending/*.avro"))]
    assert len(packets) == expected
    for packet in packets[:20]:
        validate_alert(packet)
    # The later image's alerts of the transients carry the earlier image's detection.
    first, later = alerts["images"]
    assert first["with_history"] == 0 and later["with_history"] >= 5
    earlier = [p for packet in packets if split_candid(packet["candid"])[0] == later["expid"]
               for p in packet["prv_candidates"] or () if p["candid"] is not None]
    assert earlier and all(split_candid(p["candid"])[0] == first["expid"] for p in earlier)

    # One matchfile, seeded from the reference, holding both science epochs.
    matchfiles = summary.matchfiles
    (matchfile,) = matchfiles["matchfiles"]
    assert matchfiles["epochs_appended"] == 2 and matchfile["epochs"] == 2 and not matchfiles["failed"]
    assert matchfiles["lightcurve"]["simulated_variable"] and matchfiles["lightcurve"]["epochs"] == 2

    # The configuration it wrote points the runner's commands at the demo's data.
    assert summary.config == workdir / "skydiff.toml" and str(summary.config) in text
    assert load_config(summary.config).paths.root == str(workdir)
    expid = summary.subtractions[0]["expid"]
    (exposure,) = (workdir / "sim" / "exposures").glob(f"*/{expid}")
    capsys.readouterr()
    assert main(["exposure-summary", "--config", str(summary.config), str(exposure)]) == 0
    assert f"exposure {expid}" in capsys.readouterr().out
    assert main(["quadrant", "--config", str(summary.config), str(exposure), "--quadrant", "21"]) == 0
    status = json.loads((workdir / "outputs" / str(expid) / "21" / "status.json").read_text())
    assert status["state"] == "finished" and status["attempt"] == 1      # finished: left alone

    # The summary's next commands run as printed (parsed from the printed text), from another
    # working directory: the quadrant rerun, the exposure, the candidates, the light curve.
    printed = text.split(NEXT_COMMANDS, 1)[1].splitlines()[1:]
    commands = [shlex.split(line) for line in printed if line.startswith("    skydiff ")]
    assert [c[1] for c in commands] == ["exposure-summary", "quadrant", "exposure", "candidates", "lightcurve"]
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    for command in commands:
        capsys.readouterr()
        assert main(command[1:]) == 0, command
        out = capsys.readouterr().out
        if command[1] == "lightcurve":
            assert str(matchfiles["lightcurve"]["oid"]) in out
        if command[1] == "candidates":
            assert out.count("\n") >= 2
    later = summary.subtractions[-1]["expid"]
    status = json.loads((workdir / "outputs" / str(later) / "21" / "status.json").read_text())
    assert status["state"] == "finished" and status["attempt"] == 2      # the forced rerun ran
