"""A small simulated survey for the end-to-end tests of quadrants, exposures and Slurm.

One field, quadrant 21: a reference season (two nights, two epochs each) simulated and taken
through ``skydiff quadrant`` (solved by the real SCAMP, then unusable for want of a
reference), its solved frames coadded into the quadrant's reference; then science
exposures of a later night, as folders, the second also as a multi-extension file.
Built once per test session (``survey21`` in conftest.py); tests give each run its own
outputs, spool, history and matchfiles where they must not see each other's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from catalogs import field_region, prefetch_from_table, read_gaia_table
from pipeline.cli import main
from pipeline.core.config import Config, load_config
from pipeline.formats.exposure import write_exposure_mef
from pipeline.core.image import read_quadrant
from pipeline.reference.build import build_reference, reference_filename
from pipeline.reference.files import write_reference
from pipeline.simulate.plan import Field
from pipeline.simulate.run import simulate_run

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
    summary = simulate_run(cfg, root / "sim", [FIELD], ["2026-03-15"], filters=("ZTF_r",),
                           epochs_per_night=science_epochs, quadrants=[RCID],
                           reference_nights=["2025-11-18", "2025-11-21"])
    gaia = root / "sim" / "gaia" / "gaia_catalog.fits"
    prefetch_from_table(gaia, cfg.paths.resolve("catalogs"), field_region(FIELD.ra, FIELD.dec))
    exposures = {int(p.name): p for p in (root / "sim" / "exposures").glob("*/*") if p.is_dir()}
    reference_expids = summary["reference_expids"]
    for expid in reference_expids:
        assert main(["quadrant", "--config", str(config), str(exposures[expid]), "--quadrant", str(RCID)]) == 4
    solved = [read_quadrant(cfg.paths.resolve("outputs") / str(e) / f"{RCID:02d}" / "astrometry" / p.name)
              for e in reference_expids for p in exposures[e].glob("*.fits")]
    reference = build_reference(solved, read_gaia_table(gaia), cfg.instrument.filters["ZTF_r"])
    meta = solved[0].meta
    write_reference(cfg.paths.resolve("references") / reference_filename(meta.fieldid, meta.ccdid, meta.qid,
                                                                         meta.filter), reference)
    science = sorted(set(exposures) - set(reference_expids))
    assert len(science) == science_epochs
    mef = write_exposure_mef(sorted(exposures[science[1]].glob("*.fits")), root / "mef" / f"{science[1]}.fits")
    return Survey(cfg, config, exposures, science, mef)
