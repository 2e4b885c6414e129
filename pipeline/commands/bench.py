"""``skydiff bench``: benchmarks that print their figures (speed targets live here, not in tests).

Every benchmark runs pinned to one CPU core (:func:`pipeline.bench.cpu.pinned_to_one_core`)
so that its figures are those of "one core of this machine", whatever else runs.
"""
from __future__ import annotations

import json
import logging
import os

from pipeline.core.config import SKY_PRESETS

log = logging.getLogger("skydiff.bench")

#: name -> (help, runner(args) -> dict of figures, targets {figure: max seconds}, one-core run)
BENCHMARKS: dict = {}


def benchmark(name: str, help: str, targets: dict[str, float] | None = None, one_core: bool = True):
    """Register a benchmark; ``one_core=False`` for those measuring the whole machine (run once, unpinned)."""
    def wrap(func):
        BENCHMARKS[name] = (help, func, targets or {}, one_core)
        return func
    return wrap


@benchmark("astrometry", "extraction + two SCAMP passes + QA for one full quadrant (target: at most 4 s)",
           {"total": 4.0})
def _bench_astrometry(args) -> dict:
    from pipeline.bench.astrometry import bench_astrometry_quadrant
    return bench_astrometry_quadrant(args.cfg, rcid=args.rcid)


@benchmark("extraction", "the extraction stage against the bare sep calls it is built on (background, detection, "
           "flux radius, windowed positions) on one simulated full quadrant, alternated in one process "
           "(target: ratio at most 1.3 at the plane preset; use --repeat 1, it alternates 4 times; --density PRESET)",
           {"ratio_median": 1.3})
def _bench_extraction(args) -> dict:
    from pipeline.bench.extraction import bench_extraction
    return bench_extraction(args.cfg, rcid=args.rcid)


@benchmark("astrometry-night", "a simulated night (8 epochs, airmass up to 2.5) of six inner and corner "
           "quadrants run through the exposure executor, their astrometry compared with the true WCS "
           "(use --repeat 1; writes --out)")
def _bench_astrometry_night(args) -> dict:
    import tempfile
    from pipeline.bench.astrometry import validate_astrometry_night
    out = args.out or tempfile.mkdtemp(prefix="skydiff-night-")
    summary = validate_astrometry_night(args.cfg, out)
    figures = {"quadrants": summary["quadrants"], "usable": summary["usable"],
               "usable_fraction": f"{summary['usable_fraction']:.3f}",
               "airmass_min": f"{summary['airmass_range'][0]:.2f}", "airmass_max": f"{summary['airmass_range'][1]:.2f}"}
    if summary["wcs_error_rms_mas"]:
        figures.update({"wcs_error_rms_mas_median": f"{summary['wcs_error_rms_mas']['median']:.2f}",
                        "wcs_error_rms_mas_max": f"{summary['wcs_error_rms_mas']['max']:.2f}",
                        "wcs_error_max_mas": f"{summary['wcs_error_max_mas']:.2f}",
                        "highsn_over_floor_median": f"{summary['highsn_over_floor']['median']:.2f}",
                        "highsn_over_floor_max": f"{summary['highsn_over_floor']['max']:.2f}"})
    figures["seconds_per_quadrant"] = summary["seconds_per_quadrant_median"]
    figures["outputs"] = str(out)
    return figures


@benchmark("context", "catalogue context of one quadrant: PS1-like tiles read over the footprint (cold and "
           "cached) and the PS1/Gaia neighbours of 500 candidates, at the default and a dense (PS1 DR2 "
           "mean, 10^5 per deg^2) sky (target: default cold total at most 0.15 s; use --repeat 1, it "
           "repeats internally)", {"default_total_cold_s": 0.15})
def _bench_context(args) -> dict:
    from pipeline.bench.context import bench_context
    return _flat(bench_context(args.cfg))


@benchmark("simulate", "simulate one full 3072 x 3080 quadrant (target: at most 3 s)",
           {"quadrant_total": 3.0})
def _bench_simulate(args) -> dict:
    from pipeline.simulate.run import bench_simulate_quadrant
    return bench_simulate_quadrant(args.cfg, rcid=args.rcid)


@benchmark("zogy", "ZOGY D, S, Scorr for a registered 3080 x 3072 pair with known PSFs (target: at most 2 s)",
           {"whole_total": 2.0, "tiled_total": 2.0})
def _bench_zogy(args) -> dict:
    from pipeline.bench.zogy import bench_zogy
    return _flat(bench_zogy(repeats=1))


def _flat(report: dict) -> dict:
    flat = {}
    for label, value in report.items():
        if isinstance(value, dict):
            flat.update({f"{label}_{k}": (float(v) if isinstance(v, (int, float)) else v)
                         for k, v in value.items()})
        else:
            flat[label] = float(value) if isinstance(value, float) else value
    return flat


@benchmark("registration", "resample a reference onto a science grid, full 3080 x 3072 quadrant "
           "(target: at most 1 s)", {"total": 1.0})
def _bench_registration(args) -> dict:
    from pipeline.bench.subtraction import bench_registration
    return _flat(bench_registration(args.cfg, rcid=args.rcid, repeats=1))


@benchmark("candidates", "candidate detection and features on a full quadrant's ZOGY products "
           "(target: at most 0.3 s)", {"find_candidates": 0.3})
def _bench_candidates(args) -> dict:
    from pipeline.bench.subtraction import bench_candidates
    return _flat(bench_candidates(repeats=1))


@benchmark("subtract", "characterise + register + ZOGY + candidates + real-bogus for one simulated full "
           "quadrant against a 5-frame reference (targets: stage at most 6 s, ZOGY at most 2 s; "
           "use --repeat 1, it repeats internally)", {"stage_s": 6.0, "zogy_s": 2.0})
def _bench_subtract(args) -> dict:
    from pipeline.bench.subtraction import bench_subtraction
    return _flat(bench_subtraction(args.cfg))


@benchmark("subtract-accuracy", "completeness, false candidates after real-bogus, Scorr normalisation, "
           "photometry and zero point against truth on 2 quadrants x 3 seeing cases (several minutes; use --repeat 1)")
def _bench_subtract_accuracy(args) -> dict:
    from pipeline.bench.subtraction_accuracy import validate_subtraction
    return _flat(validate_subtraction(args.cfg))


@benchmark("reference", "build a reference from 20 simulated full-size frames (use --repeat 1)")
def _bench_reference(args) -> dict:
    from pipeline.commands.reference import bench_reference
    return _flat(bench_reference(cfg=args.cfg))


@benchmark("latency", "file appearing -> alerts acknowledged by the broker (alerts_latency) and -> matchfile "
           "epoch committed (latency), "
           "per quadrant on one core (target: median at most 20 s; use --repeat 1; --bootstrap or a local "
           "broker)", {"latency_median_s": 20.0})
def _bench_latency(args) -> dict:
    from pipeline.bench.latency import bench_latency
    return _flat(bench_latency(args.cfg, rcid=args.rcid,
                               bootstrap=getattr(args, "bootstrap", None)))


@benchmark("latency-density", "the latency of the three sky presets, a quadrant of each in turn for --rounds "
           "rounds on one core, as ratios to high-latitude's within each round (targets: alerts at most 1.15x at "
           "mid-latitude and 1.4x in the plane, medians over the rounds; at most 7 s and 9 s; use --repeat 1)",
           {"ratio_alerts_mid_latitude_median": 1.15, "ratio_alerts_plane_median": 1.4,
            "mid_latitude_alerts_latency_median_s": 7.0, "plane_alerts_latency_median_s": 9.0})
def _bench_latency_density(args) -> dict:
    from pipeline.bench.latency import bench_latency_by_density
    return bench_latency_by_density(args.cfg, rounds=args.rounds, rcid=args.rcid,
                                    bootstrap=getattr(args, "bootstrap", None))


@benchmark("exposure", "whole simulated exposures (every quadrant, each with a 4-frame reference; --exposures "
           "overlapping ones of one field) through the local executor one after another (--executor local), "
           "a running Slurm all at once (slurm; its history in PostgreSQL at --history-url if given), or both "
           "with their products compared (both); --jobs workers; the survey is built once under --out and "
           "reused", one_core=False)
def _bench_exposure(args) -> dict:
    import tempfile
    from pipeline.bench.exposure import bench_exposure
    from pipeline.core.focalplane import parse_quadrants
    rcids = parse_quadrants(args.quadrants, args.cfg.instrument.n_quadrants)
    jobs = args.jobs or len(os.sched_getaffinity(0))
    if args.exposures < 1:
        from pipeline.core.exits import UsageError
        raise UsageError(f"--exposures must be at least 1, got {args.exposures}")
    options = dict(exposures=args.exposures, history_url=args.history_url or "")
    if args.out:
        return bench_exposure(args.cfg, args.out, rcids, jobs, args.executor, **options)
    with tempfile.TemporaryDirectory(prefix="skydiff-exposure-bench-") as out:
        return bench_exposure(args.cfg, out, rcids, jobs, args.executor, **options)


@benchmark("matchfile-append", "append one 50,000-source epoch to a matchfile (target: at most 1 s)",
           {"append": 1.0})
def _bench_matchfile_append(args) -> dict:
    from pipeline.bench.matchfile import bench_append
    return bench_append(site=args.cfg.site)


@benchmark("lightcurve-cone", "warm cone query on a matchfile of 20,000 objects x 500 epochs "
           "(target: at most 20 ms)", {"cone_warm_median": 0.02, "cone_warm_p95": 0.02})
def _bench_lightcurve_cone(args) -> dict:
    from pipeline.bench.matchfile import bench_cone
    return bench_cone()


@benchmark("lightcurve-service", "light-curve HTTP service under 50 requests/s for 30 s on loopback "
           "(target: p95 at most 50 ms; use --repeat 1)", {"p95": 0.05})
def _bench_lightcurve_service(args) -> dict:
    from pipeline.bench.matchfile import bench_service
    return bench_service()


@benchmark("alert-packets", "build and serialise 3000 alert packets with cutouts and 30 history entries "
           "(target: at least 3000 alerts/s)", {"alerts_per_s": 3000.0})
def _bench_alert_packets(args) -> dict:
    from pipeline.bench.alerts import bench_packets
    return bench_packets()


@benchmark("alert-publish", "publish 5000 full-size alerts through the durable spool with acks=all and "
           "idempotence (target: at least 1000 alerts/s); --bootstrap HOST:PORT, or a local Tansu broker "
           "on loopback is started per run", {"alerts_per_s": 1000.0})
def _bench_alert_publish(args) -> dict:
    from pipeline.bench.alerts import bench_publish
    return bench_publish(args.bootstrap)


@benchmark("solarsystem", "per-night preparation of 1.4 million synthetic MPCORB orbits (target: at most "
           "600 s) and per-quadrant lookup + association near opposition (target: at most 0.15 s; use --repeat 1)",
           {"prepare_s": 600.0, "quadrant_max_s": 0.15})
def _bench_solarsystem(args) -> dict:
    from pipeline.bench.solarsystem import bench_solar_system
    return bench_solar_system(args.cfg, n_orbits=args.orbits)


@benchmark("solarsystem-drift", "two-body positions against a planet-perturbed integration 30, 100 and 365 days "
           "from the elements' epoch, seen from the Earth (use --repeat 1)")
def _bench_solarsystem_drift(args) -> dict:
    from pipeline.bench.solarsystem import bench_two_body_drift
    return bench_two_body_drift(args.cfg)


@benchmark("drb", "rb and drb on held-out simulated pairs (two quadrants x four science images, about 3 "
           "minutes): purity and completeness at their thresholds for candidates at S/N >= 5 (targets for "
           "drb: purity at least 97 %, completeness at least 95 %), and the time to score 200 candidates' "
           "triplets with one BLAS thread (target: at most 20 ms; use --repeat 1, it repeats internally)",
           {"score_200_best_s": 0.020, "score_200_median_s": 0.020})
def _bench_drb(args) -> dict:
    from pipeline.bench.drb import bench_drb
    return bench_drb(args.cfg)


@benchmark("forcedphot", "forced photometry: pulls against the simulator's truth on transients and empty "
           "positions (targets: median within +-0.1, std 0.9-1.2), fp_hists of 200 candidates over 30 earlier "
           "epochs (target: at most 0.5 s) and the service's 1,000 positions x 30 epochs (target: at most 10 s; "
           "use --repeat 1, it repeats internally; --out keeps the archives)",
           {"fp_hists_s": 0.5, "service_1000x30_s": 10.0})
def _bench_forcedphot(args) -> dict:
    from pipeline.bench.forcedphot import bench_forcedphot
    return bench_forcedphot(args.cfg, args.out)


@benchmark("history", "the object history on PostgreSQL under load: a simulated survey (--objects, default "
           "1,000,000, times --detections-per-object, default 10) loaded by COPY, then 200-candidate images "
           "associated by one writer, by --writers (default 16) at once back to back, and by as many with "
           "images arriving at ZTF's rate (targets, 16 writers at the survey's rate: median at most 50 ms, p99 at "
           "most 200 ms per image; back to back, 16 writers on a small machine measure its CPU, not the "
           "store); --history-url an empty database, else a private server is started on loopback (measures "
           "the whole machine)", {"paced_median_s": 0.050, "paced_p99_s": 0.200},
           one_core=False)
def _bench_history(args) -> dict:
    from pipeline.bench.history import bench_history

    def progress(counts):
        log.info("history fill: %d objects, %d detections", counts["objects"], counts["detections"])
    return bench_history(args.history_url, objects=args.objects, detections_per_object=args.detections_per_object,
                         writers=args.writers, progress=progress)


def register(subparsers, common) -> None:
    p = subparsers.add_parser("bench", parents=[common], help="run a benchmark and print its figures",
                              description="Benchmarks, each on one pinned CPU core, printing stage timings "
                                          "against the project's targets.")
    p.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    p.add_argument("--rcid", type=int, default=60, help="quadrant to use (0-63; default a corner CCD)")
    p.add_argument("--repeat", type=int, default=3, help="runs; the best is reported alongside the first")
    p.add_argument("--json", action="store_true", help="print the figures as JSON only")
    p.add_argument("--out", metavar="DIR", help="where benchmarks that write products put them")
    p.add_argument("--bootstrap", metavar="HOST:PORT",
                   help="Kafka broker for alert-publish (default: start a local one on loopback)")
    p.add_argument("--executor", choices=("local", "slurm", "both"), default="local",
                   help="exposure: who runs the quadrants (both: the two, products compared)")
    p.add_argument("--jobs", type=int, help="exposure: quadrants at once (default: the machine's cores)")
    p.add_argument("--orbits", type=int, default=1_400_000, help="solarsystem: orbits in the synthetic MPCORB")
    p.add_argument("--quadrants", default="all", help="exposure: 'all' or rcids, e.g. 0,5,10-12")
    p.add_argument("--exposures", type=int, default=1,
                   help="exposure: overlapping science exposures of one field (Slurm: submitted at once)")
    p.add_argument("--objects", type=int, default=1_000_000, help="history: objects in the simulated survey")
    p.add_argument("--detections-per-object", type=int, default=10, help="history: detections of each object")
    p.add_argument("--writers", type=int, default=16, help="history: images associated at once")
    p.add_argument("--history-url", metavar="URL", help="history: an empty PostgreSQL database (default: a "
                   "private server on loopback for the run); exposure: the Slurm run's history (default: SQLite)")
    p.add_argument("--rounds", type=int, default=4, help="latency-density: quadrants of each preset")
    p.add_argument("--density", choices=("custom", *SKY_PRESETS), metavar="PRESET",
                   help="the simulated sky of the benchmarks that simulate one ([simulation] sky_preset): "
                        f"custom (the configuration's densities), {', '.join(SKY_PRESETS)}")
    p.set_defaults(func=run)


def _best(name: str, values: list):
    """Seconds: the smallest; rates (``*_per_s``): the largest; anything else: the first run's."""
    if not isinstance(values[0], float):
        return values[0]
    return max(values) if name.endswith("_per_s") else min(values)


def _unit(name: str) -> str:
    if name.endswith("_arcsec"):
        return '"'
    if name.endswith("_mib"):
        return "MiB"
    if name.endswith("_megabytes"):
        return "MB"
    if name.startswith("ratio"):
        return "x"
    if name.startswith(("n_", "known_", "candidates_", "pull_")):
        return ""
    return "/s" if name.endswith("_per_s") else "s"


def run(args) -> int:
    help_text, runner, targets, one_core = BENCHMARKS[args.name]
    if args.density is not None:
        # A preset replaces the configuration's custom densities (an explicit one with a
        # preset is refused by the configuration itself, naming both).
        args.cfg = args.cfg.replace(simulation__sky_preset=args.density)
        help_text = f"{help_text}; sky: {args.density}"
    if one_core:
        from pipeline.bench.cpu import pinned_to_one_core
        with pinned_to_one_core() as cpu:
            runs = [runner(args) for _ in range(max(1, args.repeat))]
        pinned = "not pinned (sched_setaffinity unavailable)" if cpu is None else f"pinned to CPU {cpu}"
    else:
        pinned, runs = "not pinned (measures the whole machine)", [runner(args)]
    best = {k: _best(k, [r[k] for r in runs]) for k in runs[0]}
    if args.json:
        print(json.dumps({"benchmark": args.name, "runs": runs, "best": best}, indent=2))
        return 0
    print(f"benchmark {args.name}: {help_text}; {pinned}; {len(runs)} run(s)")
    width = max(len(k) for k in best)
    print(f"  {'figure':<{width}}  {'first':>9}  {'best':>9}  unit target")
    for key in runs[0]:
        first, value = runs[0][key], best[key]
        if isinstance(value, float):
            target = targets.get(key)
            if target is None:
                verdict = ""
            elif key.endswith("_per_s"):
                verdict = f">= {target:g} /s  {'met' if value >= target else 'MISSED'}"
            else:
                verdict = f"<= {target:g} {_unit(key)}  {'met' if value <= target else 'MISSED'}"
            print(f"  {key:<{width}}  {first:9.3f}  {value:9.3f}  {_unit(key):<3} {verdict}")
        else:
            print(f"  {key:<{width}}  {first!s:>9}  {value!s:>9}")
    return 0
