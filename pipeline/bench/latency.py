"""Latency benchmark: from a quadrant file appearing to its alerts acknowledged by the broker,
and to its matchfile epoch committed (``skydiff bench latency``).

A small survey is set up first and not timed: a Gaia tile store, a reference for the
quadrant coadded from five simulated frames of an earlier season, and a Kafka-protocol
broker on loopback (or ``--bootstrap``).  Then each simulated science quadrant is written
atomically into an incoming folder — the moment it appears starts the clock — and
:func:`pipeline.run.quadrant.run_quadrant` takes it through astrometry (raw header: the
telescope's first-guess WCS), subtraction, alerts (produced, flushed, acknowledged with
acks=all) and the matchfile append, on one pinned core.
"""
from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from pipeline.core.config import Config, PathsConfig, load_config

__all__ = ["bench_latency", "bench_latency_by_density"]


def _world(cfg: Config, root: Path, rcid: int):
    from catalogs import PS1, field_region, prefetch_from_table
    from pipeline.simulate.run import PS1_SEED_OFFSET
    from pipeline.reference.files import write_reference_into
    from pipeline.simulate.pairs import PairOptions, pair_sky, simulated_reference

    options = PairOptions(rcid=rcid)
    sky = pair_sky(cfg, options)
    gaia_path = root / "gaia.fits"
    sky.gaia_catalogue().write(gaia_path)
    prefetch_from_table(gaia_path, cfg.paths.resolve("catalogs"), field_region(options.field.ra, options.field.dec))
    ps1 = sky.ps1_catalogue(cfg.simulation.seed + PS1_SEED_OFFSET)
    prefetch_from_table(ps1, cfg.paths.resolve("ps1_catalogs"), field_region(options.field.ra, options.field.dec),
                        kind=PS1)
    write_reference_into(cfg.paths.resolve("references"), simulated_reference(cfg, options, sky))
    _known_minor_planets(cfg, root, options.science_night)
    return options, sky


def _known_minor_planets(cfg: Config, root: Path, night: str, n_orbits: int = 200_000) -> None:
    """An orbit store of synthetic MPCORB orbits and the science night prepared from it, as the
    survey's operators prepare each night before it starts (not timed)."""
    import numpy as np
    from pipeline.simulate.asteroids import synthetic_orbits
    from pipeline.simulate.plan import night_midpoint
    from pipeline.simulate.survey import prepare_solar_system
    from solarsystem.mpcorb import write_mpcorb

    epoch = np.floor(night_midpoint(night, cfg).tt.jd - 0.5) + 0.5 - 30.0
    mpcorb = write_mpcorb(synthetic_orbits(np.random.default_rng(7), n_orbits, epoch), root / "MPCORB.DAT")
    prepare_solar_system(cfg, mpcorb, [night])


def _proc_status_mib(pid: int, key: str) -> float:
    """A memory figure of ``/proc/<pid>/status`` (VmRSS, VmHWM) in MiB; 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    """Process ids of the children of ``pid`` (SCAMP, while it runs)."""
    found = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    return found


def _quadrant_task(cfg: Config, root: Path, expid: int, rcid: int, quadrant) -> dict:
    """``skydiff quadrant`` run on one quadrant in a process of its own, as a Slurm array task
    runs it: its peak memory (MiB) and its latency (s).

    Returns the task process's own high-water mark (``VmHWM``, read while it runs), the
    largest sum of the resident sets of the task and its children (SCAMP) seen by sampling
    every 20 ms, and the seconds from the process's start to its alerts acknowledged and to
    its end (the interpreter's start and the imports included).  The kernel's ``ru_maxrss`` of the task is no use here: a child started from
    this (large) benchmark process is charged the parent's resident set until it execs.
    """
    import subprocess
    import sys

    from pipeline.core.config import config_to_toml

    config_file = root / "task.toml"
    config_file.write_text(config_to_toml(cfg, hide_secrets=False))
    incoming = _deliver(root, rcid, expid, quadrant)
    started = time.perf_counter()
    task = subprocess.Popen([sys.executable, "-c", "import sys; from pipeline.cli import main; sys.exit(main())",
                             "quadrant", "--config", str(config_file), str(incoming), "--quadrant", str(rcid)],
                            stdout=subprocess.DEVNULL)
    own_hwm = total_peak = 0.0
    while task.poll() is None:
        own_hwm = max(own_hwm, _proc_status_mib(task.pid, "VmHWM"))
        total = _proc_status_mib(task.pid, "VmRSS") + sum(_proc_status_mib(c, "VmRSS") for c in _children(task.pid))
        total_peak = max(total_peak, total)
        time.sleep(0.02)
    wall = time.perf_counter() - started
    if task.returncode != 0:
        raise RuntimeError(f"expid {expid}: the quadrant task ended with exit {task.returncode}")
    from pipeline.run.quadrant import quadrant_dir, read_status
    timings = read_status(quadrant_dir(cfg, expid, rcid))["timings_s"]
    # the runner's clock starts after the interpreter and the imports: the rest of the wall time
    before_runner = wall - timings["total"]
    return {"quadrant_task_hwm_mib": round(own_hwm, 1), "quadrant_task_with_scamp_peak_mib": round(total_peak, 1),
            "quadrant_task_alerts_latency_s": round(before_runner + timings["to_alerts"], 3),
            "quadrant_task_latency_s": round(wall, 3), "quadrant_task_start_s": round(before_runner, 3)}


def _deliver(root: Path, rcid: int, expid: int, quadrant) -> Path:
    """Write a quadrant atomically into its exposure's incoming folder, as the camera's
    transfer would; the folder."""
    from pipeline.core.image import write_quadrant

    incoming = root / "incoming" / str(expid)
    write_quadrant(incoming / f"ztf_{expid}_q{rcid:02d}.fits", quadrant.data, quadrant.header, quadrant.mask)
    return incoming


def _arrival(cfg: Config, options, sky, rcid: int, k: int):
    """The ``k``-th simulated science quadrant of the benchmark's survey: ``(expid, quadrant)``."""
    from pipeline.simulate.plan import exposure_at_airmass
    from pipeline.simulate.run import simulate_quadrant

    spec = exposure_at_airmass(cfg, options.field, 1.15 + 0.05 * k, night=options.science_night,
                               seed=options.seed + 500 + k)
    return spec.expid, simulate_quadrant(spec, rcid, sky, cfg)[0]


def _run_arrival(cfg: Config, root: Path, rcid: int, expid: int, quadrant) -> tuple[dict, float, float]:
    """Write the quadrant atomically into the incoming folder and run it in this process:
    its status record and the seconds from the file appearing to the task's end and to its
    alerts acknowledged."""
    from pipeline.run.quadrant import run_quadrant

    incoming = _deliver(root, rcid, expid, quadrant)
    start = time.perf_counter()        # the file has just appeared (atomic rename)
    code, record = run_quadrant(incoming, rcid, cfg)
    end = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"expid {expid}: quadrant ended with exit {code}: {record.get('reason')}")
    # run_quadrant's clock starts as it is called, a moment after ``start``.
    timings = record["timings_s"]
    return record, end, timings["to_alerts"] + end - timings["total"]


def bench_latency(cfg: Config | None = None, n_quadrants: int = 3, rcid: int = 21,
                  bootstrap: str | None = None) -> dict:
    """Median and worst latency, file to acknowledged alerts and file to the task's end
    (matchfile epoch committed).

    Returns both latencies (s), the median time of every stage, the alerts delivered, and the
    peak memory and latencies of one more quadrant run as a task of its own (``skydiff
    quadrant``, as Slurm runs it: a new process, which pays for its start and imports).
    """
    from pipeline.bench.alerts import local_broker
    from pipeline.bench.cpu import pinned_to_one_core

    base = load_config() if cfg is None else cfg
    with tempfile.TemporaryDirectory(prefix="skydiff-latency-") as folder, contextlib.ExitStack() as stack:
        root = Path(folder)
        broker = bootstrap or stack.enter_context(local_broker(folder))
        cfg = replace(base, paths=PathsConfig(root=str(root)), kafka=replace(base.kafka, bootstrap_servers=broker))
        t0 = time.perf_counter()
        options, sky = _world(cfg, root, rcid)
        setup_s = time.perf_counter() - t0
        arrivals = [_arrival(cfg, options, sky, rcid, k) for k in range(n_quadrants)]
        latencies, to_alerts, stages, delivered = [], [], {}, 0
        with pinned_to_one_core() as cpu:
            for expid, quadrant in arrivals:
                record, end, alerts = _run_arrival(cfg, root, rcid, expid, quadrant)
                latencies.append(end)
                to_alerts.append(alerts)
                for name, value in record["timings_s"].items():
                    stages.setdefault(name, []).append(value)
                delivered += record["alerts"]["built"] - record["alerts"]["unacknowledged"]
        # One more quadrant as a task of its own, as a Slurm array task runs it: its peak memory.
        expid, quadrant = _arrival(cfg, options, sky, rcid, n_quadrants)
        task = _quadrant_task(cfg, root, expid, rcid, quadrant)
    return {"quadrants": n_quadrants, "cpu": cpu, "setup_s": round(setup_s, 1), **task,
            "sky": cfg.simulation.sky_preset,
            "alerts_latency_median_s": round(statistics.median(to_alerts), 3),
            "alerts_latency_max_s": round(max(to_alerts), 3),
            "latency_median_s": round(statistics.median(latencies), 3), "latency_max_s": round(max(latencies), 3),
            "stages_median_s": {k: round(statistics.median(v), 3) for k, v in stages.items()},
            "alerts_acknowledged": delivered, "broker": "given" if bootstrap else "local Tansu on loopback"}


def _preset_slug(preset: str) -> str:
    return preset.replace("-", "_")


def bench_latency_by_density(cfg: Config | None = None, presets: tuple[str, ...] = ("high-latitude", "mid-latitude",
                                                                                    "plane"),
                             rounds: int = 4, rcid: int = 21, bootstrap: str | None = None) -> dict:
    """The latency of the sky presets as ratios to the first, measured in one run.

    A survey is set up for each preset (not timed), sharing one broker; then ``rounds``
    rounds each take one quadrant of every preset through
    :func:`pipeline.run.quadrant.run_quadrant` on one pinned core, the presets' order
    rotating from round to round, so that the load of a machine shared with other work
    moves the quadrants of a round alike.  The ratios are each round's latency over the
    first preset's in that round, their median and worst over the rounds.

    Returns
    -------
    dict
        Per preset (``<preset>_...``, dashes as underscores): the median latency to the
        alerts acknowledged and to the task's end, the median detections, each stage's
        median seconds; and
        ``ratio_alerts_<preset>_median`` / ``_worst``, ``ratio_end_<preset>_median``.
    """
    from pipeline.bench.alerts import local_broker
    from pipeline.bench.cpu import pinned_to_one_core

    base = load_config() if cfg is None else cfg
    with tempfile.TemporaryDirectory(prefix="skydiff-latency-density-") as folder, contextlib.ExitStack() as stack:
        broker = bootstrap or stack.enter_context(local_broker(folder))
        t0 = time.perf_counter()
        worlds = {}
        for preset in presets:
            root = Path(folder) / preset
            root.mkdir()
            preset_cfg = replace(base.replace(simulation__sky_preset=preset), paths=PathsConfig(root=str(root)),
                                 kafka=replace(base.kafka, bootstrap_servers=broker))
            options, sky = _world(preset_cfg, root, rcid)
            worlds[preset] = (preset_cfg, root, [_arrival(preset_cfg, options, sky, rcid, k) for k in range(rounds)])
        setup_s = time.perf_counter() - t0
        to_alerts = {p: [] for p in presets}
        to_end = {p: [] for p in presets}
        detected = {p: [] for p in presets}
        stages = {p: {} for p in presets}
        with pinned_to_one_core() as cpu:
            for k in range(rounds):
                for preset in presets[k % len(presets):] + presets[:k % len(presets)]:
                    preset_cfg, root, arrivals = worlds[preset]
                    record, end, alerts = _run_arrival(preset_cfg, root, rcid, *arrivals[k])
                    to_end[preset].append(end)
                    to_alerts[preset].append(alerts)
                    detected[preset].append((record.get("catalog") or {}).get("n_detected", 0))
                    for name in ("astrometry", "subtraction", "archive", "alerts", "catalog"):
                        if name in record["timings_s"]:
                            stages[preset].setdefault(name, []).append(record["timings_s"][name])
    first = presets[0]
    figures: dict = {"rounds": rounds, "cpu": cpu, "setup_s": round(setup_s, 1)}
    for preset in presets:
        slug = _preset_slug(preset)
        figures[f"{slug}_alerts_latency_median_s"] = round(statistics.median(to_alerts[preset]), 3)
        figures[f"{slug}_alerts_latency_max_s"] = round(max(to_alerts[preset]), 3)
        figures[f"{slug}_latency_median_s"] = round(statistics.median(to_end[preset]), 3)
        figures[f"n_detected_{slug}"] = int(statistics.median(detected[preset]))
        figures.update({f"{slug}_{name}_median_s": round(statistics.median(values), 3)
                        for name, values in stages[preset].items()})
    for preset in presets[1:]:
        slug = _preset_slug(preset)
        alerts = [a / b for a, b in zip(to_alerts[preset], to_alerts[first])]
        ends = [a / b for a, b in zip(to_end[preset], to_end[first])]
        figures[f"ratio_alerts_{slug}_median"] = round(statistics.median(alerts), 3)
        figures[f"ratio_alerts_{slug}_worst"] = round(max(alerts), 3)
        figures[f"ratio_end_{slug}_median"] = round(statistics.median(ends), 3)
    figures["broker"] = "given" if bootstrap else "local Tansu on loopback"
    return figures
