"""The demo: a small simulated survey run through every stage that exists.

``skydiff demo`` simulates one field over two nights in two filters (an inner and a corner
quadrant of each exposure) plus three nights of an earlier season for the references, then,
as the survey's offline and real-time steps would:

1. prefetches the simulated Gaia catalogue into the offline tile store (``catalogs/``);
2. fits a focal-plane distortion prior from simulated low-airmass exposures (``priors/``);
3. solves every quadrant's astrometry with SCAMP from that prior and judges it;
4. writes the scale-versus-airmass QA plot;
5. coadds a reference per quadrant and filter from the earlier season;
6. subtracts each science image from its reference (ZOGY) and finds the candidates;
7. builds every science image's alert packets in time order (object history under the work
   directory, so later alerts carry earlier detections) and publishes them: to the spool
   (``<workdir>/alerts/spool``) by default, to the broker when ``kafka.bootstrap_servers``
   is set;
8. seeds a matchfile per quadrant and filter from its reference and appends every subtracted
   image's PSF photometry in exposure order, naming a variable star's light curve
   (``skydiff lightcurve RA DEC --root ...``),

and prints a summary with the astrometric RMS and verdict per quadrant, the candidates
against the simulated transients, the alerts built, spooled and delivered, the matchfiles
and the timings.
It is the first of the README's two commands: embedded defaults, no network.
"""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.config import Config
from pipeline.demo.matchfiles import fill_demo_matchfiles
from pipeline.demo.subtraction import build_demo_references, publish_demo_alerts, subtract_demo_images
from pipeline.simulate.plan import DEFAULT_FIELDS
from pipeline.simulate.run import simulate_run

log = logging.getLogger("skydiff.demo")

__all__ = ["DemoOptions", "DemoSummary", "run_demo", "format_summary"]


@dataclass(frozen=True)
class DemoOptions:
    """What the demo simulates."""

    nights: tuple[str, ...] = ("2026-03-15", "2026-03-16")
    filters: tuple[str, ...] = ("ZTF_g", "ZTF_r")
    epochs_per_night: int = 4
    quadrants: tuple[int, ...] = (21, 60)     # an inner CCD (6) and a corner CCD (16)
    reference_nights: tuple[str, ...] = ("2025-11-18", "2025-11-21", "2025-11-24")
    fieldid: int = DEFAULT_FIELDS[0].fieldid
    jobs: int = 2


@dataclass
class DemoSummary:
    workdir: Path
    simulation: dict
    stages: dict[str, float] = field(default_factory=dict)
    astrometry: list[dict] = field(default_factory=list)
    references: list[dict] = field(default_factory=list)
    subtractions: list[dict] = field(default_factory=list)
    alerts: dict = field(default_factory=dict)
    matchfiles: dict = field(default_factory=dict)
    products: dict[str, str] = field(default_factory=dict)


_worker_cfg: Config | None = None


def _init_worker(cfg: Config) -> None:
    global _worker_cfg
    _worker_cfg = cfg


def _astrometry_task(task: tuple[str, str, str, str]) -> tuple[int, dict | None, str]:
    from pipeline.astrometry.files import run_astrometry
    image, refcat, prior, out = task
    status, record = run_astrometry(image, refcat, prior, out, _worker_cfg, plots=True)
    return status, record, image


def run_demo(cfg: Config, workdir: str | Path, options: DemoOptions = DemoOptions()) -> DemoSummary:
    """Simulate the demo survey under ``workdir`` and run the stages on it."""
    from catalogs import field_region, prefetch_from_table
    from pipeline.simulate.priors import build_prior_from_simulation
    from priors.store import write_prior

    workdir = Path(workdir)
    the_field = next(f for f in DEFAULT_FIELDS if f.fieldid == options.fieldid)
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        summary.stages[stage] = now - clock
        clock = now

    log.info("demo: simulating %d night(s) x %d epoch(s), quadrants %s, into %s", len(options.nights),
             options.epochs_per_night, ",".join(map(str, options.quadrants)), workdir / "sim")
    simulation = simulate_run(cfg, workdir / "sim", [the_field], list(options.nights), filters=options.filters,
                              epochs_per_night=options.epochs_per_night, quadrants=list(options.quadrants),
                              jobs=options.jobs, reference_nights=list(options.reference_nights))
    summary = DemoSummary(workdir=workdir, simulation=simulation)
    lap("simulate")

    store = workdir / "catalogs"
    prefetch_from_table(workdir / "sim" / "gaia" / "gaia_catalog.fits", store,
                        field_region(the_field.ra, the_field.dec))
    summary.products["catalogue store"] = str(store)
    lap("catalogue store")

    prior_path = workdir / "priors" / "prior.fits"
    write_prior(prior_path, build_prior_from_simulation(cfg, [the_field], n_exposures=12,
                                                        rcids=list(options.quadrants)))
    summary.products["distortion prior"] = str(prior_path)
    lap("distortion prior")

    images = sorted((workdir / "sim" / "exposures").glob("*/*/*.fits"))
    out_root = workdir / "outputs" / "astrometry"
    tasks = [(str(p), str(store), str(prior_path), str(out_root / p.parent.name / p.stem)) for p in images]
    log.info("demo: astrometry of %d quadrant images with %d worker(s)", len(tasks), options.jobs)
    with ProcessPoolExecutor(max_workers=options.jobs, initializer=_init_worker, initargs=(cfg,)) as pool:
        for status, record, image in pool.map(_astrometry_task, tasks):
            if record is None:
                record = {"image": image, "usable": False, "reasons": [f"exit status {status}"]}
            summary.astrometry.append(record)
    lap("astrometry")

    _scale_plot(cfg, summary, workdir / "qa" / "scale_vs_airmass.png")
    (workdir / "qa" / "astrometry.json").write_text(json.dumps(summary.astrometry, indent=1))
    summary.products["scale vs airmass plot"] = str(workdir / "qa" / "scale_vs_airmass.png")
    summary.products["astrometry outputs"] = str(out_root)
    lap("qa plots")

    reference_expids = set(simulation.get("reference_expids", []))
    summary.references = build_demo_references(cfg, summary.astrometry, reference_expids, out_root,
                                                workdir / "sim" / "gaia" / "gaia_catalog.fits",
                                                workdir / "outputs" / "references", options.jobs)
    summary.products["references"] = str(workdir / "outputs" / "references")
    lap("references")
    summary.subtractions = subtract_demo_images(cfg, summary.astrometry, reference_expids, summary.references,
                                                out_root, store, workdir / "sim" / "truth",
                                                workdir / "outputs" / "subtraction", options.jobs)
    (workdir / "qa" / "subtraction.json").write_text(json.dumps(summary.subtractions, indent=1))
    summary.products["subtraction outputs"] = str(workdir / "outputs" / "subtraction")
    lap("subtraction")
    summary.alerts = publish_demo_alerts(cfg, summary.subtractions, workdir / "alerts")
    (workdir / "qa" / "alerts.json").write_text(json.dumps(summary.alerts, indent=1))
    summary.products["alert spool"] = summary.alerts["spool"]
    lap("alerts")
    summary.matchfiles = fill_demo_matchfiles(cfg, summary.references, summary.subtractions, workdir / "matchfiles",
                                              truth_root=workdir / "sim" / "truth", jobs=options.jobs)
    (workdir / "qa" / "matchfiles.json").write_text(json.dumps(summary.matchfiles, indent=1))
    summary.products["matchfiles"] = summary.matchfiles["root"]
    lap("matchfiles")
    return summary


def _scale_plot(cfg: Config, summary: DemoSummary, path: Path) -> None:
    """Each quadrant's solved pixel scale against its own lowest-airmass solution, with the model."""
    from pipeline.astrometry.plots import plot_scale_vs_airmass
    from pipeline.core.refraction import RefractionModel
    usable = [r for r in summary.astrometry if r.get("usable") and r.get("pixel_scale_arcsec")]
    points, lowest = [], 1.0
    for rcid in sorted({r["rcid"] for r in usable}):
        rows = [r for r in usable if r["rcid"] == rcid]
        base = min(rows, key=lambda r: r["airmass_quadrant"])
        lowest = min(lowest if points else base["airmass_quadrant"], base["airmass_quadrant"])
        points += [{"airmass_quadrant": r["airmass_quadrant"], "usable": True,
                    "scale_diff_pct_mean": 100 * (r["pixel_scale_arcsec"] / base["pixel_scale_arcsec"] - 1)}
                   for r in rows]
    model = RefractionModel(cfg.site.pressure_hpa, cfg.site.temperature_c, cfg.site.relative_humidity,
                            cfg.instrument.filters["ZTF_r"].wavelength_um)
    plot_scale_vs_airmass(points, model, lowest, path,
                          title="Demo: solved pixel scale vs airmass",
                          ylabel="pixel scale change vs the quadrant's lowest-airmass solution (%)")


def format_summary(summary: DemoSummary) -> str:
    """The demo's printed summary."""
    sim = summary.simulation
    lines = [
        "skydiff demo summary",
        f"  work directory      {summary.workdir}",
        f"  simulated           {sim['n_exposures']} exposures x {len(sim['quadrants'])} quadrants = "
        f"{sim['n_quadrant_images']} images; {sim['n_stars']} stars, {sim['n_galaxies']} galaxies, "
        f"{sim['n_transients']} transients in the field",
    ]
    if summary.astrometry:
        usable = sum(1 for r in summary.astrometry if r.get("usable"))
        lines.append(f"  astrometry          {usable}/{len(summary.astrometry)} quadrants usable")
        lines.append("    expid      rcid airmass usable  RMS ra/dec (mas, S/N>=10)  high-S/N/floor  matched  "
                     "scale diff %  seconds")
        for r in sorted(summary.astrometry, key=lambda r: (r.get("expid", 0), r.get("rcid", 0))):
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
    for r in summary.references:
        if r.get("path"):
            lines.append(f"  reference           rcid {r['rcid']:>2} {r['filter']}: {r['nframes']} frames, "
                         f"FWHM {r['fwhm_arcsec']:.2f}\", {r['seconds']:.0f} s")
        else:
            lines.append(f"  reference           rcid {r['rcid']:>2} {r['filter']}: not built: {r['error']}")
    if summary.subtractions:
        done = [r for r in summary.subtractions if r.get("status") == 0]
        detectable = sum(r["transients_detectable"] for r in done)
        found = sum(r["transients_found"] for r in done)
        found_rb = sum(r["transients_found_rb"] for r in done)
        lines.append(f"  subtraction         {len(done)}/{len(summary.subtractions)} science images subtracted; "
                     f"simulated transients above the limit: {detectable}, found {found} "
                     f"({found_rb} with rb >= 0.5)")
        lines.append("    expid      rcid  candidates  rb>=0.5  diffmaglim  transients (detectable/found)  seconds")
        for r in sorted(done, key=lambda r: (r["expid"], r["rcid"])):
            lines.append(f"    {r['expid']:<10} {r['rcid']:>4}  {r['n_candidates']:10d}  {r['n_rb_above_half']:7d}  "
                         f"{r['diffmaglim']:10.2f}  {r['transients_detectable']:>14d} / {r['transients_found']:<12d}"
                         f"{r['timings_s']['total']:7.1f}")
        for r in summary.subtractions:
            if r.get("status") != 0:
                lines.append(f"    {r.get('science')}: not subtracted (exit status {r.get('status')})")
    if summary.alerts:
        a = summary.alerts
        where = f"broker {a['broker']}" if a["broker"] else "no broker configured: kept in the spool"
        lines.append(f"  alerts              {a['built']} built, {a['spooled']} spooled, {a['delivered']} delivered, "
                     f"{a['pending']} pending ({where}); topics {', '.join(a['topics']) or '-'}")
        lines.append("    expid      rcid  alerts  with earlier detections  build s  publish s")
        for r in a["images"]:
            lines.append(f"    {r['expid']:<10} {r['rcid']:>4}  {r['alerts']:6d}  {r['with_history']:23d}  "
                         f"{r['build_s']:7.2f}  {r['publish_s']:9.2f}")
    if summary.matchfiles:
        m = summary.matchfiles
        lines.append(f"  matchfiles          {len(m['matchfiles'])} file(s), {m['epochs_appended']} epochs appended "
                     f"(characterise {m['characterize_s']:.1f} s, append {m['append_s']:.2f} s per image)")
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
    for name, path in summary.products.items():
        lines.append(f"  {name:<24}{path}")
    lines.append("  stage timings (s)   " + ", ".join(f"{k} {v:.1f}" for k, v in summary.stages.items()))
    return "\n".join(lines)
