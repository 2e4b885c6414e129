"""Whole exposures on this machine (``skydiff bench exposure``): the local executor and the
same exposures through Slurm job arrays, their products compared.

Set-up (not timed; kept under ``--out`` and reused by the next run): one field observed in
an earlier season (two nights, two epochs each, within airmass 1.3) and ``--exposures``
science exposures of it on one night (overlapping: the same field minutes apart), every
quadrant simulated; each science exposure written as one multi-extension file.  The reference frames carry their true WCS — the references are this benchmark's
input, not what it measures — and each quadrant's reference is coadded from them in a
process pool (:func:`pipeline.simulate.survey.true_wcs_references`), after which the raw
season is deleted (tens of GB otherwise).

Runs, each with its own outputs, spool, alert history and matchfiles (catalogues and
references shared):

- ``local``: :func:`pipeline.run.exposure.run_exposure` with ``--jobs`` workers, the
  exposures one after another (the sequential run);
- ``slurm``: :func:`slurm.submit.submit_exposure` on a running Slurm (``bash
  slurm/local-slurm.sh start`` on one machine: two nodes), every exposure submitted at once in
  time order, so their quadrant tasks run at the same time across the nodes, with the CPUs per
  task set so that at most ``--jobs`` tasks run at once on the cluster, timed from the first
  submission to the end of the last summary and fold jobs; the object history in PostgreSQL
  at ``--history-url`` (a server the nodes reach) or else the SQLite file (safe here, where
  every node shares this machine's kernel and file system);
- ``both``: the two, then :func:`pipeline.bench.compare.compare_exposure_outputs` for every
  exposure: with several overlapping exposures this is the check that concurrent tasks on
  several nodes group candidates into the same objects, with the same histories, as the
  sequential run.
"""
from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from pathlib import Path

from pipeline.core.config import Config

__all__ = ["prepare_exposure_survey", "bench_exposure", "EXECUTORS"]

log = logging.getLogger("skydiff.bench.exposure")

EXECUTORS = ("local", "slurm", "both")
FIELD = (600, 150.0, 33.0)
SCIENCE_NIGHT = "2026-03-15"
REFERENCE_NIGHTS = ("2025-11-18", "2025-11-21")
SURVEY_FILE = "survey.json"


def prepare_exposure_survey(cfg: Config, root: Path, rcids: list[int], jobs: int, exposures: int = 1) -> dict:
    """The survey of the benchmark under ``root`` (built once, then reused): its record, whose
    ``science`` lists the science exposures (``exposure``, ``expid``) in time order."""
    from pipeline.formats.exposure import write_exposure_mef
    from pipeline.simulate.plan import Field
    from pipeline.simulate.survey import simulate_survey, true_wcs_references

    record_path = root / SURVEY_FILE
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        held = len(record.get("science", [None]))
        if sorted(record["rcids"]) == sorted(rcids) and held == exposures:
            log.info("reusing the survey in %s", root)
            return record
        raise ValueError(f"{root} holds a survey of quadrants {record['rcids']} with {held} science exposure(s), "
                         f"not {rcids} with {exposures}: use another --out")
    start = time.perf_counter()
    survey = simulate_survey(cfg.replace(paths__root=str(root)), [Field(*FIELD)], [SCIENCE_NIGHT],
                             reference_nights=REFERENCE_NIGHTS, filters=("ZTF_r",), epochs_per_night=exposures,
                             quadrants=rcids, jobs=jobs)
    simulated = time.perf_counter() - start

    start = time.perf_counter()
    built = true_wcs_references(survey, jobs)
    referenced = time.perf_counter() - start
    missing = [f"{r['rcid']}: {r['error']}" for r in built if not r["path"]]
    if missing:
        raise RuntimeError(f"references not built for rcid {'; '.join(missing)}")

    science = [{"exposure": str(write_exposure_mef(sorted(survey.exposures[expid].glob("*.fits")),
                                                    root / "exposure" / f"ztf_{expid}.fits")), "expid": expid}
               for expid in survey.science_expids]
    for folder in survey.exposures.values():      # the raw frames are in the references and the MEFs now
        shutil.rmtree(folder)
    record = {"exposure": science[0]["exposure"], "expid": science[0]["expid"], "science": science, "rcids": rcids,
              "reference_frames": {str(r["rcid"]): r["frames"] for r in built},
              "simulate_s": round(simulated, 1), "references_s": round(referenced, 1),
              "reference_median_s": round(statistics.median(r["seconds"] for r in built), 1)}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def _run_config(cfg: Config, run: Path) -> Config:
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    return cfg.replace(paths__outputs=str(run / "outputs"), paths__spool=str(run / "spool"),
                       paths__history=str(run / "history" / "objects.sqlite"),
                       paths__matchfiles=str(run / "matchfiles"), kafka__bootstrap_servers="")


def _quadrant_figures(cfg: Config, expid: int, rcids: list[int]) -> dict:
    """Per-quadrant time on its worker (median, worst) and the stages' medians, from the status records."""
    from pipeline.run.quadrant import quadrant_dir, read_status
    records = [r for r in (read_status(quadrant_dir(cfg, expid, rcid)) for rcid in rcids) if r]
    timings = [r.get("timings_s") or {} for r in records if r.get("state") == "finished"]
    totals = [t["total"] for t in timings if "total" in t]
    figures = {"per_quadrant_median_s": round(statistics.median(totals), 2) if totals else None,
               "per_quadrant_worst_s": round(max(totals), 2) if totals else None}
    for stage in sorted({k for t in timings for k in t} - {"total"}):
        values = [t[stage] for t in timings if stage in t]
        figures[f"stage_{stage}_median_s"] = round(statistics.median(values), 2)
    return figures


def _summary_figures(label: str, summaries: list[dict], wall_s: float) -> dict:
    """The runs' figures over all their exposures' summaries."""
    quadrants = [q for summary in summaries for q in summary["quadrants"]]
    counts: dict[str, int] = {}
    for q in quadrants:
        counts[q["state"]] = counts.get(q["state"], 0) + 1
    flagged = [f"{q['rcid']}:{q['state']}:{q['reason']}" for q in quadrants if q["state"] != "finished"]
    return {f"{label}_wall_s": round(wall_s, 1),
            f"{label}_states": ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
            f"{label}_flagged": "; ".join(flagged) or "none",
            f"{label}_reprocess": sum(len(summary["reprocess"]) for summary in summaries),
            f"{label}_candidates": sum(summary["candidates"] for summary in summaries),
            f"{label}_alerts": sum(summary["alerts"] for summary in summaries)}


def _run_local(cfg: Config, exposures: list[str], jobs: int) -> tuple[list[dict], float]:
    """The exposures one after another through the local executor (the sequential run)."""
    from pipeline.run.exposure import run_exposure
    start = time.perf_counter()
    summaries = [run_exposure(exposure, cfg, jobs=jobs) for exposure in exposures]
    return summaries, time.perf_counter() - start


def _cluster_cpus() -> int:
    """CPUs the cluster declares, over all its nodes."""
    from slurm.jobs import run_slurm
    return sum(int(v) for v in run_slurm(["sinfo", "--noheader", "--Node", "--format=%c"]).split())


def _run_slurm(cfg: Config, science: list[dict], jobs: int, n_quadrants: int) -> tuple[list[dict], float, dict]:
    """Every exposure submitted at once, in time order; their summaries, the wall time and where
    the tasks ran."""
    from slurm.jobs import SlurmError, completed_tasks, wait_for_jobs
    from slurm.submit import submit_exposure
    try:
        cluster_cpus = _cluster_cpus()
    except SlurmError as exc:
        raise SlurmError(f"no Slurm to submit to ({exc}); on one machine start it with "
                         "`bash slurm/local-slurm.sh start`") from None
    # The test cluster declares more CPUs than the machine has (fast array scheduling);
    # asking for cluster_cpus // jobs per task keeps at most `jobs` quadrants running at once.
    cfg = cfg.replace(slurm__cpus_per_task=max(1, cluster_cpus // jobs), slurm__time_limit="00:30:00")
    start = time.perf_counter()
    submitted = [submit_exposure(entry["exposure"], cfg) for entry in science]
    job_ids = [i for s in submitted for i in (s.array_job_id, s.summary_job_id, s.fold_job_id) if i is not None]
    wait_for_jobs(job_ids, timeout_s=120 + 60 * n_quadrants * len(science))
    wall = time.perf_counter() - start
    summaries = []
    for entry, job in zip(science, submitted):
        summary_path = cfg.paths.resolve("outputs") / str(entry["expid"]) / "summary.json"
        if not summary_path.is_file():
            raise SlurmError(f"the follow-up job {job.summary_job_id} wrote no {summary_path}; logs in "
                             f"{job.workdir / 'logs'}")
        summaries.append(json.loads(summary_path.read_text()))
    tasks = completed_tasks(job_ids=[s.array_job_id for s in submitted])
    nodes: dict[str, int] = {}
    for task in tasks:
        nodes[task.node] = nodes.get(task.node, 0) + 1
    return summaries, wall, {"slurm_tasks_per_node": ", ".join(f"{n} {k}" for k, n in sorted(nodes.items()))}


def bench_exposure(cfg: Config, out: str | Path, rcids: list[int], jobs: int, executor: str = "local",
                   exposures: int = 1, history_url: str = "") -> dict:
    """Set up (or reuse) the survey under ``out``, run its ``exposures`` science exposures with
    ``executor`` (the Slurm run's history in PostgreSQL at ``history_url`` when given); its figures."""
    from pipeline.bench.compare import compare_exposure_outputs
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    root = Path(out).resolve()
    base = cfg.replace(paths__root=str(root), paths__catalogs=str(root / "catalogs"),
                       paths__ps1_catalogs=str(root / "catalogs-ps1"),
                       paths__references=str(root / "references"))
    survey = prepare_exposure_survey(base, root, rcids, jobs, exposures)
    science = survey.get("science") or [{"exposure": survey["exposure"], "expid": survey["expid"]}]
    expids = [entry["expid"] for entry in science]
    figures = {"quadrants": len(rcids), "exposures": len(science), "jobs": jobs,
               "expids": ", ".join(map(str, expids)),
               "setup_simulate_s": survey["simulate_s"], "setup_references_s": survey["references_s"]}
    runs: dict[str, Config] = {}
    if executor in ("local", "both"):
        runs["local"] = _run_config(base, root / "runs" / "local")
        summaries, wall = _run_local(runs["local"], [entry["exposure"] for entry in science], jobs)
        figures |= _summary_figures("local", summaries, wall)
        figures |= _quadrant_figures(runs["local"], expids[0], rcids)
    if executor in ("slurm", "both"):
        runs["slurm"] = _run_config(base, root / "runs" / "slurm").replace(history__url=history_url)
        summaries, wall, placement = _run_slurm(runs["slurm"], science, jobs, len(rcids))
        figures |= _summary_figures("slurm", summaries, wall) | placement
        if executor == "slurm":
            figures |= _quadrant_figures(runs["slurm"], expids[0], rcids)
    if executor == "both":
        differences, alerts, rows = [], 0, 0
        for expid in expids:
            comparison = compare_exposure_outputs(runs["local"], runs["slurm"], expid, rcids)
            differences += comparison["differences"]
            alerts, rows = comparison["alerts"], rows + comparison["matchfile_rows"]
        figures |= {"products_identical": not differences, "compared_alerts": alerts,
                    "compared_matchfile_rows": rows, "differences": len(differences),
                    "first_differences": "; ".join(differences[:5]) or "none"}
    return figures
