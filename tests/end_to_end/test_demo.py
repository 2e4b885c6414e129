"""The demo end to end on a reduced plan: simulation, real SCAMP astrometry, a reference
coadded from an earlier season, subtraction, the summary's count of the simulated
transients found, and the alerts (no broker configured: they stay in the spool)."""
from __future__ import annotations

import json
from pathlib import Path

from astropy.table import Table

from alerts.ids import split_candid
from alerts.schema import read_alert_file, validate_alert

from pipeline.core.config import load_config
from pipeline.demo.survey import DemoOptions, format_summary, run_demo


def test_demo_builds_references_subtracts_and_finds_the_transients(tmp_path):
    options = DemoOptions(nights=("2026-03-15",), filters=("ZTF_r",), epochs_per_night=2, quadrants=(21,),
                          reference_nights=("2025-11-18", "2025-11-21"), jobs=2)
    summary = run_demo(load_config(), tmp_path, options)
    text = format_summary(summary)
    assert all(r["usable"] for r in summary.astrometry) and len(summary.astrometry) == 6
    (reference,) = summary.references
    assert reference["path"] and reference["nframes"] == 4
    assert len(summary.subtractions) == 2 and all(r["status"] == 0 for r in summary.subtractions)
    detectable = sum(r["transients_detectable"] for r in summary.subtractions)
    found = sum(r["transients_found"] for r in summary.subtractions)
    assert detectable >= 5 and found >= 0.9 * detectable
    assert "simulated transients above the limit" in text and "subtraction" in summary.stages
    saved = json.loads((tmp_path / "qa" / "subtraction.json").read_text())
    assert [r["n_candidates"] for r in saved] == [r["n_candidates"] for r in summary.subtractions]
    for r in summary.subtractions:
        out = tmp_path / "outputs" / "subtraction"
        assert any(out.rglob("candidates.ecsv"))
        assert r["n_rb_above_half"] <= r["n_candidates"]

    # Alerts: one per alertable candidate, all in the spool's pending folder (no broker).
    alerts = summary.alerts
    assert alerts["broker"] == "" and alerts["delivered"] == 0
    tables = [Table.read(Path(r["outdir"]) / "candidates.ecsv") for r in summary.subtractions]
    expected = sum(int((t["magpsf"] == t["magpsf"]).sum()) for t in tables)
    assert alerts["built"] == alerts["spooled"] == alerts["pending"] == expected > 0
    assert f"{expected} built, {expected} spooled, 0 delivered" in text
    packets = [read_alert_file(path) for path in sorted((tmp_path / "alerts" / "spool").rglob("pending/*.avro"))]
    assert len(packets) == expected
    for packet in packets[:20]:
        validate_alert(packet)
    # The later image's alerts of the transients carry the earlier image's detection.
    first, later = alerts["images"]
    assert first["with_history"] == 0 and later["with_history"] >= 5
    earlier = [p for packet in packets if split_candid(packet["candid"])[0] == later["expid"]
               for p in packet["prv_candidates"] or () if p["candid"] is not None]
    assert earlier and all(split_candid(p["candid"])[0] == first["expid"] for p in earlier)
