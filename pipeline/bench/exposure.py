"""A whole exposure on this machine (``skydiff bench exposure``): the local executor and the
same exposure through a Slurm job array, their products compared.

Set-up (not timed; kept under ``--out`` and reused by the next run): one field observed in
an earlier season (two nights, two epochs each, within airmass 1.3) and one science
exposure, every quadrant simulated; the science exposure written as one multi-extension
file.  The reference frames carry their true WCS — the references are this benchmark's
input, not what it measures — and each quadrant's reference is coadded from them in a
process pool (:func:`pipeline.simulate.survey.true_wcs_references`), after which the raw
season is deleted (tens of GB otherwise).

Runs, each with its own outputs, spool, alert history and matchfiles (catalogues and
references shared):

- ``local``: :func:`pipeline.run.exposure.run_exposure` with ``--jobs`` workers;
- ``slurm``: :func:`slurm.submit.submit_exposure` on a running Slurm (``bash
  slurm/local-slurm.sh start`` on one machine), with the CPUs per task set so that at
  most ``--jobs`` tasks run at once on the node, timed from submission to the follow-up
  summary job's end;
- ``both``: the two, then :func:`pipeline.bench.compare.compare_exposure_outputs`.
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


def prepare_exposure_survey(cfg: Config, root: Path, rcids: list[int], jobs: int) -> dict:
    """The survey of the benchmark under ``root`` (built once, then reused): its record."""
    from pipeline.formats.exposure import write_exposure_mef
    from pipeline.simulate.plan import Field
    from pipeline.simulate.survey import simulate_survey, true_wcs_references

    record_path = root / SURVEY_FILE
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if sorted(record["rcids"]) == sorted(rcids):
            log.info("reusing the survey in %s", root)
            return record
        raise ValueError(f"{root} holds a survey of quadrants {record['rcids']}, not {rcids}: use another --out")
    start = time.perf_counter()
    survey = simulate_survey(cfg.replace(paths__root=str(root)), [Field(*FIELD)], [SCIENCE_NIGHT],
                             reference_nights=REFERENCE_NIGHTS, filters=("ZTF_r",), epochs_per_night=1,
                             quadrants=rcids, jobs=jobs)
    (science_expid,) = survey.science_expids
    simulated = time.perf_counter() - start

    start = time.perf_counter()
    built = true_wcs_references(survey, jobs)
    referenced = time.perf_counter() - start
    missing = [f"{r['rcid']}: {r['error']}" for r in built if not r["path"]]
    if missing:
        raise RuntimeError(f"references not built for rcid {'; '.join(missing)}")

    science = sorted(survey.exposures[science_expid].glob("*.fits"))
    exposure = write_exposure_mef(science, root / "exposure" / f"ztf_{science_expid}.fits")
    for folder in survey.exposures.values():      # the raw frames are in the references and the MEF now
        shutil.rmtree(folder)
    record = {"exposure": str(exposure), "expid": science_expid, "rcids": rcids,
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


def _summary_figures(label: str, summary: dict, wall_s: float) -> dict:
    flagged = [f"{q['rcid']}:{q['state']}:{q['reason']}" for q in summary["quadrants"] if q["state"] != "finished"]
    return {f"{label}_wall_s": round(wall_s, 1),
            f"{label}_states": ", ".join(f"{n} {s}" for s, n in sorted(summary["counts"].items())),
            f"{label}_flagged": "; ".join(flagged) or "none", f"{label}_reprocess": len(summary["reprocess"]),
            f"{label}_candidates": summary["candidates"], f"{label}_alerts": summary["alerts"]}


def _run_local(cfg: Config, exposure: str, jobs: int) -> tuple[dict, float]:
    from pipeline.run.exposure import run_exposure
    start = time.perf_counter()
    summary = run_exposure(exposure, cfg, jobs=jobs)
    return summary, time.perf_counter() - start


def _node_cpus() -> int:
    from slurm.jobs import run_slurm
    return int(run_slurm(["sinfo", "--noheader", "--Node", "--format=%c"]).split()[0])


def _run_slurm(cfg: Config, exposure: str, expid: int, jobs: int, n_quadrants: int) -> tuple[dict, float]:
    from slurm.jobs import SlurmError, wait_for_jobs
    from slurm.submit import submit_exposure
    try:
        node_cpus = _node_cpus()
    except SlurmError as exc:
        raise SlurmError(f"no Slurm to submit to ({exc}); on one machine start it with "
                         "`bash slurm/local-slurm.sh start`") from None
    # The one-machine Slurm declares more CPUs than the machine has (fast array scheduling);
    # asking for node_cpus // jobs per task keeps at most `jobs` quadrants running at once.
    cfg = cfg.replace(slurm__cpus_per_task=max(1, node_cpus // jobs), slurm__time_limit="00:30:00")
    start = time.perf_counter()
    submitted = submit_exposure(exposure, cfg)
    wait_for_jobs([submitted.array_job_id, submitted.summary_job_id], timeout_s=120 + 60 * n_quadrants)
    wall = time.perf_counter() - start
    summary_path = cfg.paths.resolve("outputs") / str(expid) / "summary.json"
    if not summary_path.is_file():
        raise SlurmError(f"the follow-up job {submitted.summary_job_id} wrote no {summary_path}; logs in "
                         f"{submitted.workdir / 'logs'}")
    return json.loads(summary_path.read_text()), wall


def bench_exposure(cfg: Config, out: str | Path, rcids: list[int], jobs: int, executor: str = "local") -> dict:
    """Set up (or reuse) the survey under ``out``, run the exposure with ``executor``; its figures."""
    from pipeline.bench.compare import compare_exposure_outputs
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    root = Path(out).resolve()
    base = cfg.replace(paths__root=str(root), paths__catalogs=str(root / "catalogs"),
                       paths__ps1_catalogs=str(root / "catalogs-ps1"),
                       paths__references=str(root / "references"))
    survey = prepare_exposure_survey(base, root, rcids, jobs)
    figures = {"quadrants": len(rcids), "jobs": jobs, "expid": survey["expid"],
               "setup_simulate_s": survey["simulate_s"], "setup_references_s": survey["references_s"]}
    runs: dict[str, Config] = {}
    if executor in ("local", "both"):
        runs["local"] = _run_config(base, root / "runs" / "local")
        summary, wall = _run_local(runs["local"], survey["exposure"], jobs)
        figures |= _summary_figures("local", summary, wall)
        figures |= _quadrant_figures(runs["local"], survey["expid"], rcids)
    if executor in ("slurm", "both"):
        runs["slurm"] = _run_config(base, root / "runs" / "slurm")
        summary, wall = _run_slurm(runs["slurm"], survey["exposure"], survey["expid"], jobs, len(rcids))
        figures |= _summary_figures("slurm", summary, wall)
        if executor == "slurm":
            figures |= _quadrant_figures(runs["slurm"], survey["expid"], rcids)
    if executor == "both":
        comparison = compare_exposure_outputs(runs["local"], runs["slurm"], survey["expid"], rcids)
        figures |= {"products_identical": comparison["identical"],
                    "compared_alerts": comparison["alerts"], "compared_matchfile_rows": comparison["matchfile_rows"],
                    "differences": len(comparison["differences"]),
                    "first_differences": "; ".join(comparison["differences"][:5]) or "none"}
    return figures
