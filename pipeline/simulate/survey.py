"""A simulated survey on disk, made ready for the quadrant runner: the set-up shared by the
demo, the end-to-end tests and the exposure benchmark.

:func:`simulate_survey` simulates nights of a field plus an earlier season for the
references under ``<paths.root>/sim`` (:func:`pipeline.simulate.run.simulate_run`: one
folder of quadrant files per exposure) and prefetches the simulated Gaia catalogue into the
configuration's tile store (``paths.catalogs``).  The references then come one of two ways:

- :func:`solve_reference_season` runs the earlier season through the production exposure
  executor (:func:`pipeline.run.exposure.run_exposure`): every quadrant is solved, then
  recorded unusable for want of a reference, its solved image left under
  ``<paths.outputs>/<expid>/<rcid>/astrometry/``; :func:`build_season_references` coadds
  the usable solved images with :func:`pipeline.reference.files.build_references` (what
  ``skydiff reference build`` runs) into ``paths.references``, where the runner looks;
- :func:`true_wcs_references` coadds the season's frames with their true WCS, no
  astrometry run (for benchmarks whose input, not whose subject, the references are).

Either way one process builds each (quadrant, filter) reference, ``jobs`` at a time; the
configuration reaches it as its TOML text (:class:`pipeline.core.config.Config` holds
read-only mappings, which do not pickle).
"""
from __future__ import annotations

import json
import logging
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from astropy.io import fits
from astropy.table import Table

from pipeline.core.config import Config, config_to_toml, load_config
from pipeline.simulate.plan import Field
from pipeline.simulate.run import simulate_run

__all__ = ["SimulatedSurvey", "simulate_survey", "solve_reference_season", "build_season_references",
           "true_wcs_references"]

log = logging.getLogger("skydiff.simulate")


@dataclass(frozen=True)
class SimulatedSurvey:
    """A survey simulated by :func:`simulate_survey`.

    ``simulation`` is :func:`pipeline.simulate.run.simulate_run`'s summary, ``exposures`` the
    folder of every exposure by expid, ``reference_expids`` and ``science_expids`` the
    earlier season's exposures and the others, each in time order.
    """

    cfg: Config
    sim: Path
    simulation: dict
    exposures: dict[int, Path]
    reference_expids: list[int]
    science_expids: list[int]

    @property
    def rcids(self) -> list[int]:
        return list(self.simulation["quadrants"])

    @property
    def ps1(self) -> Path:
        """The simulated PS1-like catalogue (objid, ra, dec, gmag..zmag, ps_score)."""
        return self.sim / "ps1" / "ps1_catalog.fits"

    @property
    def ps1_truth(self) -> Path:
        """Per PS1 objid: star (``sim_class`` 1) or galaxy (0), its truth row, true r."""
        return self.sim / "truth" / "ps1_objects.fits"

    @property
    def gaia(self) -> Path:
        """The simulated Gaia catalogue (a FITS table in the archive's column names)."""
        return self.sim / "gaia" / "gaia_catalog.fits"

    def truth_path(self, image: str | Path) -> Path:
        """The simulator's truth file of one of the survey's quadrant files."""
        image = Path(image)
        return self.sim / "truth" / image.parent.name / f"{image.stem}_truth.fits"


def simulate_survey(cfg: Config, fields: Sequence[Field], nights: Sequence[str], *,
                    reference_nights: Sequence[str], filters: Sequence[str] = ("ZTF_r",),
                    epochs_per_night: int = 4, quadrants: Sequence[int] = (21,), jobs: int = 1) -> SimulatedSurvey:
    """Simulate ``fields`` over ``nights`` and ``reference_nights`` under ``<paths.root>/sim``
    and prefetch their Gaia stars into ``paths.catalogs`` and the PS1-like catalogue of their
    stars and galaxies into ``paths.ps1_catalogs``."""
    from catalogs import PS1, field_region, prefetch_from_table

    sim = cfg.paths.resolve("root") / "sim"
    simulation = simulate_run(cfg, sim, list(fields), list(nights), filters=tuple(filters),
                              epochs_per_night=epochs_per_night, quadrants=list(quadrants), jobs=jobs,
                              reference_nights=list(reference_nights))
    for f in fields:
        prefetch_from_table(sim / "gaia" / "gaia_catalog.fits", cfg.paths.resolve("catalogs"),
                            field_region(f.ra, f.dec))
        prefetch_from_table(sim / "ps1" / "ps1_catalog.fits", cfg.paths.resolve("ps1_catalogs"),
                            field_region(f.ra, f.dec), kind=PS1)
    prepare_solar_system(cfg, sim / "truth" / "MPCORB.DAT", nights)
    plan = Table.read(sim / "truth" / "exposures.ecsv")
    in_time_order = [int(e) for e in plan[plan.argsort("obsmjd")]["expid"]]
    exposures = {int(p.name): p for p in (sim / "exposures").glob("*/*") if p.is_dir()}
    reference = set(simulation["reference_expids"])
    return SimulatedSurvey(cfg, sim, simulation, exposures, [e for e in in_time_order if e in reference],
                           [e for e in in_time_order if e not in reference])


def prepare_solar_system(cfg: Config, mpcorb: Path, nights: Sequence[str]) -> None:
    """The orbit store from the simulated minor planets' MPCORB file and the night files of
    ``nights`` (under ``paths.solar_system``), as the survey's operators would prepare them."""
    from solarsystem.night import night_path, prepare_night
    from solarsystem.store import ingest_mpcorb, orbit_store_path

    root = cfg.paths.resolve("solar_system")
    ingest_mpcorb(mpcorb, root)
    for night in nights:
        prepare_night(orbit_store_path(root), night, cfg.site, cfg.solar_system, night_path(root, night))


def solve_reference_season(survey: SimulatedSurvey, jobs: int = 1) -> list[dict]:
    """Run every exposure of the earlier season through the exposure executor; their summaries.

    No reference exists yet, so each quadrant ends ``unusable`` after its astrometry, which
    leaves the solved image for :func:`build_season_references`.
    """
    from pipeline.run.exposure import run_exposure

    summaries = []
    for expid in survey.reference_expids:
        summary = run_exposure(survey.exposures[expid], survey.cfg, jobs=jobs, progress=None)
        log.info("reference season: exposure %d: %s", expid,
                 ", ".join(f"{n} {state}" for state, n in sorted(summary["counts"].items())))
        summaries.append(summary)
    return summaries


def _solved_images(survey: SimulatedSurvey) -> dict[tuple[int, str], list[str]]:
    """The season's usable solved images by (rcid, filter), from the astrometry QA records."""
    from pipeline.run.quadrant import quadrant_dir

    groups: dict[tuple[int, str], list[str]] = {}
    for expid in survey.reference_expids:
        for rcid in survey.rcids:
            folder = quadrant_dir(survey.cfg, expid, rcid) / "astrometry"
            try:
                qa = json.loads((folder / "qa.json").read_text())
            except (OSError, ValueError):
                continue
            if qa.get("usable"):
                solved = folder / Path(qa["image"]).name
                groups.setdefault((rcid, str(fits.getval(solved, "FILTER"))), []).append(str(solved))
    return groups


def _reference_record(rcid: int, band: str, frames: int, path, reference, error: str | None) -> dict:
    if reference is None:
        return {"rcid": rcid, "filter": band, "frames": frames, "path": None, "error": error}
    return {"rcid": rcid, "filter": band, "frames": frames, "path": str(path), "error": None,
            "nframes": reference.nframes, "fwhm_arcsec": round(float(reference.fwhm_arcsec), 2),
            "seconds": round(float(reference.timings.get("total", float("nan"))), 1)}


def _config_of(text: str) -> Config:
    """The configuration a worker was sent as :func:`config_to_toml` text."""
    return load_config(overrides=tomllib.loads(text))


def _build_solved_group(task: tuple[str, int, str, list[str]]) -> dict:
    from pipeline.reference.files import build_references, read_groups

    config, rcid, band, files = task
    cfg = _config_of(config)
    _, (summary, *_) = build_references(read_groups(files), cfg.paths.resolve("catalogs"),
                                        cfg.paths.resolve("references"), cfg)
    return _reference_record(rcid, band, len(files), summary["path"], summary.get("reference"), summary["error"])


def _build_true_wcs_group(task: tuple[str, int, str, list[tuple[str, str]], str]) -> dict:
    from catalogs import read_gaia_table
    from pipeline.reference.build import build_reference
    from pipeline.reference.files import ReferenceError, write_reference_into
    from pipeline.simulate.pairs import read_with_true_wcs

    config, rcid, band, files, gaia = task
    cfg = _config_of(config)
    frames = [read_with_true_wcs(image, truth) for image, truth in files]
    try:
        reference = build_reference(frames, read_gaia_table(gaia), cfg.instrument.filters[band])
    except ReferenceError as exc:
        return _reference_record(rcid, band, len(files), None, None, str(exc))
    return _reference_record(rcid, band, len(files), write_reference_into(cfg.paths.resolve("references"),
                                                                          reference), reference, None)


def _map(function: Callable, tasks: list, jobs: int) -> list:
    if jobs <= 1 or len(tasks) <= 1:
        return [function(task) for task in tasks]
    with ProcessPoolExecutor(max_workers=min(jobs, len(tasks))) as pool:
        return list(pool.map(function, tasks))


def build_season_references(survey: SimulatedSurvey, jobs: int = 1) -> list[dict]:
    """One reference per (quadrant, filter) from the season's usable solved images.

    Returns one record per reference, by (rcid, filter): ``rcid``, ``filter``, ``frames``
    offered, ``path`` (None when not built, ``error`` saying why), and when built
    ``nframes`` used, ``fwhm_arcsec`` and ``seconds``.
    """
    groups = _solved_images(survey)
    log.info("references: %d from %d solved image(s)", len(groups), sum(len(v) for v in groups.values()))
    start = time.perf_counter()
    config = config_to_toml(survey.cfg, hide_secrets=False)
    records = _map(_build_solved_group, [(config, rcid, band, files)
                                         for (rcid, band), files in sorted(groups.items())], jobs)
    log.info("references: built in %.1f s", time.perf_counter() - start)
    return records


def true_wcs_references(survey: SimulatedSurvey, jobs: int = 1) -> list[dict]:
    """One reference per (quadrant, filter) from the season's frames with their true WCS,
    coadded against the whole simulated Gaia catalogue (records as
    :func:`build_season_references`')."""
    from pipeline.core.image import rcid_of

    groups: dict[tuple[int, str], list[tuple[str, str]]] = {}
    for expid in survey.reference_expids:
        for image in sorted(survey.exposures[expid].glob("*.fits")):
            header = fits.getheader(image, 0)
            key = (rcid_of(int(header["CCDID"]), int(header["QID"])), str(header["FILTER"]))
            groups.setdefault(key, []).append((str(image), str(survey.truth_path(image))))
    config = config_to_toml(survey.cfg, hide_secrets=False)
    return _map(_build_true_wcs_group, [(config, rcid, band, files, str(survey.gaia))
                                        for (rcid, band), files in sorted(groups.items())], jobs)
