"""The demo: a small simulated survey run through the production quadrant runner.

``skydiff demo`` simulates one field over two nights in two filters (an inner and a corner
quadrant of each exposure) plus three nights of an earlier season for the references, and
takes it through the pipeline as the survey would, every quadrant through
:func:`pipeline.run.exposure.run_exposure` (astrometry, subtraction, alerts, matchfile
epoch, with a status record per quadrant):

1. makes the work directory a workspace (:mod:`pipeline.core.workspace`, as ``skydiff init``
   does: every data root under it) and writes its configuration to
   ``<workdir>/skydiff.toml``: the summary's "next commands" (``skydiff quadrant``,
   ``exposure``, ``lightcurve``, ... with ``--config`` and absolute paths) run on the demo's
   data afterwards, from any working directory;
2. simulates the survey (``<workdir>/sim``) and prefetches its Gaia catalogue into the tile
   store (``catalogs/``) and its PS1-like catalogue into ``catalogs-ps1/``;
3. fits a focal-plane distortion prior from simulated low-airmass exposures and puts it
   where the runner reads it (``priors/prior.fits``);
4. runs the earlier season's exposures: each quadrant is solved, then recorded unusable
   for want of a reference;
5. coadds a reference per quadrant and filter from the season's solved images
   (``references/``, as ``skydiff reference build`` does);
6. runs the science exposures in time order: subtraction against the references, alerts
   (later alerts carry earlier detections; to the spool, and to the broker when
   ``kafka.bootstrap_servers`` is set) and the matchfiles, seeded from the references;
7. reads the runner's status and QA records back for the summary: the astrometric RMS and
   verdict per quadrant, the scale-versus-airmass QA plot, the references, the candidates
   against the simulated transients, the alerts, the matchfiles with a light curve to look
   at, and the timings.

It is the first of the README's two commands: embedded defaults, no network.
"""
from __future__ import annotations

import importlib
import json
import logging
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.timing import StageClock
from pipeline.core.config import Config, config_to_toml
from pipeline.core.workspace import CONFIG_FILE, workspace_config
from pipeline.demo import records
from pipeline.simulate.plan import DEFAULT_FIELDS
from pipeline.simulate.survey import build_season_references, simulate_survey, solve_reference_season

log = logging.getLogger("skydiff.demo")

__all__ = ["DemoOptions", "DemoSummary", "demo_config", "run_demo", "format_summary", "next_commands",
           "NEXT_COMMANDS"]

#: The summary's heading of the commands it proposes, one per following line (indented).
NEXT_COMMANDS = "next commands (run as printed, from any directory):"


@dataclass(frozen=True)
class DemoOptions:
    """What the demo simulates, and how many quadrants run at once."""

    nights: tuple[str, ...] = ("2026-03-15", "2026-03-16")
    filters: tuple[str, ...] = ("ZTF_g", "ZTF_r")
    epochs_per_night: int = 4
    quadrants: tuple[int, ...] = (21, 60)     # an inner CCD (6) and a corner CCD (16)
    reference_nights: tuple[str, ...] = ("2025-11-18", "2025-11-21", "2025-11-24")
    fieldid: int = DEFAULT_FIELDS[0].fieldid
    jobs: int = 2


@dataclass
class DemoSummary:
    """What :func:`run_demo` did (see :mod:`pipeline.demo.records` for the records)."""

    workdir: Path
    config: Path
    simulation: dict
    stages: dict[str, float] = field(default_factory=dict)
    runner_stages: dict[str, float] = field(default_factory=dict)
    astrometry: list[dict] = field(default_factory=list)
    references: list[dict] = field(default_factory=list)
    subtractions: list[dict] = field(default_factory=list)
    alerts: dict = field(default_factory=dict)
    matchfiles: dict = field(default_factory=dict)
    products: dict[str, str] = field(default_factory=dict)
    next_commands: list[str] = field(default_factory=list)


def demo_config(cfg: Config, workdir: str | Path) -> Config:
    """``cfg`` with every data root (catalogues, prior, references, outputs, matchfiles,
    spool, alert history) inside ``workdir``: the workspace ``skydiff init workdir`` makes."""
    return workspace_config(cfg, workdir)


def next_commands(config: Path, exposure: Path, rcid: int, subtraction: Path | None,
                  lightcurve: dict | None) -> list[str]:
    """The commands the demo's summary proposes on its data, each with ``--config`` and
    absolute paths (so they run as printed from any working directory): the exposure's
    summary, one quadrant rerun, the exposure through the local executor (its quadrants are
    finished: it reports them), the quadrant's candidates, the light curve to look at."""
    config, exposure = str(config), str(exposure)
    commands = [["skydiff", "exposure-summary", "--config", config, exposure],
                ["skydiff", "quadrant", "--config", config, exposure, "--quadrant", str(rcid), "--force"],
                ["skydiff", "exposure", "--config", config, exposure]]
    if subtraction is not None:
        commands.append(["skydiff", "candidates", "list", "--config", config, str(subtraction), "--rb-min", "0.5"])
    lines = [shlex.join(c) for c in commands]
    if lightcurve:
        lines.append(lightcurve["command"])
    return lines


def _preload_stage_modules() -> None:
    """Import the stages' modules once here: the executor's worker processes are forked
    from this one for every exposure and inherit them instead of importing them again."""
    for name in ("alerts.from_subtraction", "alerts.history", "alerts.publish", "alerts.spool",
                 "pipeline.astrometry.files", "pipeline.subtraction.files", "pipeline.matchfile.epochs"):
        importlib.import_module(name)


def run_demo(cfg: Config, workdir: str | Path, options: DemoOptions = DemoOptions()) -> DemoSummary:
    """Simulate the demo survey under ``workdir`` and run it through the quadrant runner."""
    from pipeline.run.exposure import run_exposure
    from pipeline.simulate.priors import build_prior_from_simulation
    from priors.store import PRIOR_FILENAME, write_prior

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(cfg, workdir)
    config_path = workdir / CONFIG_FILE
    # Secrets are masked: the demo's defaults hold none, and a file in a work directory should not.
    config_path.write_text(config_to_toml(cfg))
    the_field = next(f for f in DEFAULT_FIELDS if f.fieldid == options.fieldid)
    stages: dict[str, float] = {}
    lap = StageClock(stages).lap

    log.info("demo: simulating %d night(s) x %d epoch(s), quadrants %s, into %s", len(options.nights),
             options.epochs_per_night, ",".join(map(str, options.quadrants)), workdir / "sim")
    survey = simulate_survey(cfg, [the_field], options.nights, reference_nights=options.reference_nights,
                             filters=options.filters, epochs_per_night=options.epochs_per_night,
                             quadrants=options.quadrants, jobs=options.jobs)
    summary = DemoSummary(workdir=workdir, config=config_path, simulation=survey.simulation, stages=stages)
    summary.products.update({"configuration": str(config_path), "simulation": str(survey.sim),
                             "catalogue store": str(cfg.paths.resolve("catalogs")),
                             "PS1 catalogue store": str(cfg.paths.resolve("ps1_catalogs"))})
    lap("simulate + catalogue stores")

    # The runner solves from the survey's prior in paths.priors.
    prior_path = cfg.paths.resolve("priors") / PRIOR_FILENAME
    write_prior(prior_path, build_prior_from_simulation(cfg, [the_field], n_exposures=12,
                                                        rcids=list(options.quadrants)))
    summary.products["distortion prior"] = str(prior_path)
    lap("distortion prior")

    _preload_stage_modules()
    log.info("demo: the earlier season, %d exposure(s), through the runner", len(survey.reference_expids))
    solve_reference_season(survey, options.jobs)
    lap("reference season")
    summary.references = build_season_references(survey, options.jobs)
    summary.products["references"] = str(cfg.paths.resolve("references"))
    lap("references")

    log.info("demo: %d science exposure(s) through the runner, in time order", len(survey.science_expids))
    for expid in survey.science_expids:
        result = run_exposure(survey.exposures[expid], cfg, jobs=options.jobs, progress=None)
        log.info("demo: exposure %d: %s; %d candidates, %d alerts", expid,
                 ", ".join(f"{n} {state}" for state, n in sorted(result["counts"].items())),
                 result["candidates"], result["alerts"])
    lap("science exposures")

    qa = workdir / "qa"
    qa.mkdir(exist_ok=True)
    summary.astrometry = records.astrometry_records(survey)
    summary.subtractions = records.subtraction_records(survey)
    summary.alerts = records.alerts_summary(cfg, summary.subtractions)
    summary.matchfiles = records.matchfiles_summary(survey, summary.subtractions, config_path)
    summary.runner_stages = records.stage_seconds(survey)
    for name in ("astrometry", "references", "subtractions", "alerts", "matchfiles"):
        (qa / f"{name}.json").write_text(json.dumps(getattr(summary, name), indent=1))
    summary.products.update({
        "quadrant outputs": f"{cfg.paths.resolve('outputs')}/<expid>/<rcid>/ (status.json, astrometry/, "
                            "subtraction/)",
        "scale vs airmass plot": str(records.plot_scale_vs_airmass(cfg, summary.astrometry,
                                                                   qa / "scale_vs_airmass.png")),
        "QA records": str(qa), "alert spool": summary.alerts["spool"], "matchfiles": summary.matchfiles["root"]})
    last = survey.science_expids[-1]
    rcid = options.quadrants[0]
    done = next((Path(r["outdir"]) for r in summary.subtractions
                 if r["subtracted"] and r["expid"] == last and r["rcid"] == rcid), None)
    summary.next_commands = next_commands(config_path, survey.exposures[last], rcid, done,
                                          summary.matchfiles.get("lightcurve"))
    lap("summary")
    return summary


def _astrometry_lines(astrometry: list[dict]) -> list[str]:
    usable = sum(1 for r in astrometry if r.get("usable"))
    lines = [f"  astrometry          {usable}/{len(astrometry)} quadrants usable",
             "    expid      rcid airmass usable  RMS ra/dec (mas, S/N>=10)  high-S/N/floor  matched  "
             "scale diff %  seconds"]
    for r in sorted(astrometry, key=lambda r: (r.get("expid", 0), r.get("rcid", 0))):
        if r.get("rms_ra_mas") is None:
            lines.append(f"    {r.get('expid', '?'):<10} {r.get('rcid', '?'):>4}  unusable: "
                         f"{'; '.join(r.get('reasons', []))}")
            continue
        ratio = max(r["rms_ra_highsn_mas"], r["rms_dec_highsn_mas"]) / r["floor_highsn_mas"]
        lines.append(f"    {r['expid']:<10} {r['rcid']:>4}  {r['airmass_quadrant']:6.2f}  "
                     f"{'yes' if r['usable'] else 'NO ':<5}  {r['rms_ra_mas']:7.1f} / {r['rms_dec_mas']:<7.1f}"
                     f"          {ratio:5.2f}        {r['n_matched']:6d}  {r['scale_diff_pct_max']:8.3f}"
                     f"      {r['seconds']:6.1f}")
        for reason in r.get("reasons", []):
            lines.append(f"        reason: {reason}")
    return lines


def _subtraction_lines(subtractions: list[dict]) -> list[str]:
    done = [r for r in subtractions if r["subtracted"]]
    detectable = sum(r["transients_detectable"] for r in done)
    found = sum(r["transients_found"] for r in done)
    found_rb = sum(r["transients_found_rb"] for r in done)
    lines = [f"  subtraction         {len(done)}/{len(subtractions)} science images subtracted; "
             f"simulated transients above the limit: {detectable}, found {found} ({found_rb} with rb >= 0.5); "
             f"of the simulated asteroids among them, {sum(r['asteroids_found'] for r in done)} found, "
             f"{sum(r['asteroids_named'] for r in done)} named (ssnamenr)",
             "    expid      rcid  candidates  rb>=0.5  diffmaglim  transients (detectable/found)  seconds"]
    for r in done:
        lines.append(f"    {r['expid']:<10} {r['rcid']:>4}  {r['n_candidates']:10d}  {r['n_rb_above_half']:7d}  "
                     f"{r['diffmaglim']:10.2f}  {r['transients_detectable']:>14d} / {r['transients_found']:<12d}"
                     f"{r['seconds']:7.1f}")
    for r in subtractions:
        if not r["subtracted"]:
            lines.append(f"    {r['expid']:<10} {r['rcid']:>4}  not subtracted: {r['state']} at {r['stage']}: "
                         f"{r['reason']}")
    return lines


def _alert_lines(a: dict) -> list[str]:
    where = f"broker {a['broker']}" if a["broker"] else "no broker configured: kept in the spool"
    lines = [f"  alerts              {a['built']} built, {a['spooled']} spooled, {a['delivered']} delivered, "
             f"{a['pending']} pending ({where}); topics {', '.join(a['topics']) or '-'}",
             "    expid      rcid  alerts  with earlier detections  seconds"]
    for r in a["images"]:
        lines.append(f"    {r['expid']:<10} {r['rcid']:>4}  {r['alerts']:6d}  {r['with_history']:23d}  "
                     f"{r['seconds']:7.2f}")
    return lines


def _matchfile_lines(m: dict) -> list[str]:
    lines = [f"  matchfiles          {len(m['matchfiles'])} file(s), {m['epochs_appended']} epochs appended "
             f"({m['append_s']:.2f} s per image)"]
    for f in m["matchfiles"]:
        lines.append(f"    {f['path']}: {f['epochs']} epochs, {f['photometry_rows']} photometry rows, "
                     f"{f['unmatched_rows']} unmatched detections")
    for f in m["failed"]:
        lines.append(f"    {f['source']}: not appended: {f['reason']}")
    lc = m["lightcurve"]
    if lc:
        what = "simulated variable star" if lc["simulated_variable"] else "most variable object"
        lines.append(f"  light curve to see  {what} oid {lc['oid']}, {lc['epochs']} epochs "
                     f"({', '.join(lc['filters'])}), mag {lc['mag_min']:.2f}-{lc['mag_max']:.2f}: {lc['command']}")
    return lines


def format_summary(summary: DemoSummary) -> str:
    """The demo's printed summary."""
    sim = summary.simulation
    lines = [
        "skydiff demo summary",
        f"  work directory      {summary.workdir}",
        f"  configuration       {summary.config} (a workspace, as skydiff init makes: "
        f"skydiff COMMAND --config {shlex.quote(str(summary.config))} ...)",
        f"  simulated           {sim['n_exposures']} exposures x {len(sim['quadrants'])} quadrants = "
        f"{sim['n_quadrant_images']} images; {sim['n_stars']} stars, {sim['n_galaxies']} galaxies, "
        f"{sim['n_transients']} transients in the field",
    ]
    if summary.astrometry:
        lines += _astrometry_lines(summary.astrometry)
    for r in summary.references:
        if r.get("path"):
            lines.append(f"  reference           rcid {r['rcid']:>2} {r['filter']}: {r['nframes']} of {r['frames']} "
                         f"frames, FWHM {r['fwhm_arcsec']:.2f}\", {r['seconds']:.0f} s")
        else:
            lines.append(f"  reference           rcid {r['rcid']:>2} {r['filter']}: not built: {r['error']}")
    if summary.subtractions:
        lines += _subtraction_lines(summary.subtractions)
    if summary.alerts:
        lines += _alert_lines(summary.alerts)
    if summary.matchfiles:
        lines += _matchfile_lines(summary.matchfiles)
    for name, path in summary.products.items():
        lines.append(f"  {name:<24}{path}")
    lines.append("  stage timings (s)   " + ", ".join(f"{k} {v:.1f}" for k, v in summary.stages.items()))
    lines.append("  runner stages (s, summed over quadrants)  "
                 + ", ".join(f"{k} {v:.1f}" for k, v in summary.runner_stages.items()))
    if summary.next_commands:
        lines.append(f"  {NEXT_COMMANDS}")
        lines += [f"    {command}" for command in summary.next_commands]
    return "\n".join(lines)
