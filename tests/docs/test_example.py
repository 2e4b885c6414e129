"""docs/examples/stages.py, the stages called from Python, runs on the session survey's
workspace and science quadrant: usable astrometry, candidates that find the simulated
transients."""
from __future__ import annotations

import importlib.util
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "stages.py"


def test_stages_example_runs_on_simulated_data(survey21, capsys):
    spec = importlib.util.spec_from_file_location("stages_example", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    expid = survey21.science[0]
    (image,) = sorted(survey21.exposures[expid].glob("*.fits"))
    truth = Path(survey21.cfg.paths.root) / "sim" / "truth" / image.parent.name / f"{image.stem}_truth.fits"
    result = example.main([str(image), "--config", str(survey21.config), "--truth", str(truth)])
    printed = capsys.readouterr().out
    assert result["usable"] and max(result["rms_mas"]) < 150 and result["n_sources"] > 1000
    assert result["n_candidates"] >= result["n_rb"] > 0
    assert result["transients_detectable"] >= result["bright_transients"] >= 3
    assert result["bright_found"] == result["bright_transients"]
    assert result["transients_found"] >= 0.6 * result["transients_detectable"]
    for stage in ("read ", "extracted ", "astrometry ", "subtraction: ", "truth: "):
        assert stage in printed, stage
