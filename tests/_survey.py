"""A small simulated survey for the end-to-end tests of quadrants, exposures and Slurm.

One field, quadrant 21: a reference season (two nights, two epochs each) simulated and taken
through the exposure executor (solved by the real SCAMP, then unusable for want of a
reference), its solved frames coadded into the quadrant's reference
(:mod:`pipeline.simulate.survey`, as the demo does); then science exposures of a later
night, as folders, the second also as a multi-extension file.
Built once per test session (``survey21`` in conftest.py); tests give each run its own
outputs, spool, history and matchfiles where they must not see each other's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.core.config import Config, load_config
from pipeline.formats.exposure import write_exposure_mef
from pipeline.simulate.plan import Field
from pipeline.simulate.survey import build_season_references, simulate_survey, solve_reference_season

FIELD = Field(600, 150.0, 33.0)
RCID = 21


@dataclass(frozen=True)
class Survey:
    cfg: Config
    config: Path                  # the TOML file of ``cfg`` (for the command line)
    exposures: dict[int, Path]    # expid -> exposure folder (reference season and science)
    science: list[int]            # science expids in time order
    mef: Path                     # science[1] as one multi-extension file


def build_survey(root: Path, science_epochs: int = 3) -> Survey:
    config = root / "skydiff.toml"
    config.write_text(f'[paths]\nroot = "{root}"\n')
    cfg = load_config(config)
    survey = simulate_survey(cfg, [FIELD], ["2026-03-15"], reference_nights=["2025-11-18", "2025-11-21"],
                             filters=("ZTF_r",), epochs_per_night=science_epochs, quadrants=[RCID])
    for summary in solve_reference_season(survey):
        assert summary["counts"] == {"unusable": 1}, summary
    (reference,) = build_season_references(survey)
    assert reference["path"], reference
    science = survey.science_expids
    assert len(science) == science_epochs
    mef = write_exposure_mef(sorted(survey.exposures[science[1]].glob("*.fits")), root / "mef" / f"{science[1]}.fits")
    return Survey(cfg, config, survey.exposures, science, mef)
