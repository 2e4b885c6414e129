"""The demo's difference-imaging steps: references from the earlier season, subtraction of
every science image, the candidates compared with the simulator's transients, and the
alerts of every subtracted image published.

Used by :func:`pipeline.demo.survey.run_demo` after the astrometry of every image; each step
reads and writes the same files the ``skydiff reference build`` and ``skydiff subtract``
commands do.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from astropy.table import Table

from pipeline.core.config import Config

log = logging.getLogger("skydiff.demo")

__all__ = ["solved_path", "build_demo_references", "subtract_demo_images", "transient_recovery",
           "publish_demo_alerts"]

_worker_cfg: Config | None = None


def _init_worker(cfg: Config) -> None:
    global _worker_cfg
    _worker_cfg = cfg


def solved_path(record: dict, astrometry_root: Path) -> Path:
    """Where the astrometry stage wrote the solved copy of ``record``'s image."""
    image = Path(record["image"])
    return astrometry_root / image.parent.name / image.stem / image.name


def _filter_of(path: Path) -> str:
    from astropy.io import fits
    return str(fits.getval(path, "FILTER"))


def _reference_task(task: tuple[list[str], str, str]) -> dict:
    from catalogs import read_gaia_table
    from pipeline.core.image import read_quadrant
    from pipeline.reference.build import build_reference, reference_filename
    from pipeline.reference.files import write_reference
    from pipeline.reference.model import ReferenceError

    paths, gaia_path, out_dir = task
    frames = [read_quadrant(p) for p in paths]
    meta = frames[0].meta
    band = _worker_cfg.instrument.filters[meta.filter]
    try:
        reference = build_reference(frames, read_gaia_table(gaia_path), band)
    except ReferenceError as exc:
        return {"rcid": meta.rcid, "filter": meta.filter, "path": None, "error": str(exc)}
    path = Path(out_dir) / reference_filename(meta.fieldid, meta.ccdid, meta.qid, meta.filter)
    write_reference(path, reference)
    return {"rcid": meta.rcid, "filter": meta.filter, "path": str(path), "nframes": reference.nframes,
            "fwhm_arcsec": round(float(reference.fwhm_arcsec), 2), "seconds": round(reference.timings["total"], 1)}


def build_demo_references(cfg: Config, records: list[dict], reference_expids: set[int], astrometry_root: Path,
                          gaia_path: Path, out_dir: Path, jobs: int) -> list[dict]:
    """One reference per (quadrant, filter) from the usable reference-season images."""
    groups: dict[tuple[int, str], list[str]] = defaultdict(list)
    for r in records:
        if r.get("expid") in reference_expids and r.get("usable"):
            path = solved_path(r, astrometry_root)
            groups[(r["rcid"], _filter_of(path))].append(str(path))
    tasks = [(paths, str(gaia_path), str(out_dir)) for _, paths in sorted(groups.items())]
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("demo: %d reference(s) from %d frame(s)", len(tasks), sum(len(t[0]) for t in tasks))
    with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker, initargs=(cfg,)) as pool:
        return list(pool.map(_reference_task, tasks))


def _subtract_task(task: tuple[str, str, str, str, str]) -> dict:
    from pipeline.subtraction.files import run_subtraction

    science, reference, out, store, truth = task
    status, record = run_subtraction(science, reference, out, _worker_cfg, refcat=store)
    if record is None:
        return {"science": science, "status": status}
    record["status"] = status
    record["outdir"] = out
    record.update(transient_recovery(Path(out) / "candidates.ecsv", Path(truth), record["diffmaglim"]))
    return record


def subtract_demo_images(cfg: Config, records: list[dict], reference_expids: set[int], references: list[dict],
                         astrometry_root: Path, store: Path, truth_root: Path, out_root: Path,
                         jobs: int) -> list[dict]:
    """Subtract each usable science image from its quadrant-and-filter reference."""
    by_group = {(r["rcid"], r["filter"]): r["path"] for r in references if r.get("path")}
    tasks = []
    for r in records:
        if r.get("expid") in reference_expids or not r.get("usable"):
            continue
        image = Path(r["image"])
        reference = by_group.get((r["rcid"], _filter_of(solved_path(r, astrometry_root))))
        if reference is None:
            continue
        truth = truth_root / image.parent.name / f"{image.stem}_truth.fits"
        tasks.append((str(solved_path(r, astrometry_root)), reference,
                      str(out_root / image.parent.name / image.stem), str(store), str(truth)))
    log.info("demo: subtracting %d science image(s)", len(tasks))
    with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker, initargs=(cfg,)) as pool:
        return list(pool.map(_subtract_task, tasks))


def transient_recovery(candidates_path: Path, truth_path: Path, diffmaglim: float,
                       radius_px: float = 2.0) -> dict:
    """The simulator's transients on an image against its candidates.

    ``transients_detectable``: transients on the image brighter than the difference
    image's 5-sigma limit; ``transients_found``: those with a candidate within
    ``radius_px``; ``found_rb``: of those, with rb >= 0.5.
    """
    from astropy.io import fits

    with fits.open(truth_path) as hdul:
        truth = Table(hdul["TRUTH"].data)
    candidates = Table.read(candidates_path)
    transients = truth[np.asarray(truth["transient"], bool)]
    detectable = transients[np.asarray(transients["mag"]) < diffmaglim]
    found = found_rb = 0
    if len(detectable) and len(candidates):
        dx = np.asarray(detectable["x"])[:, None] - np.asarray(candidates["xpos"])[None, :]
        dy = np.asarray(detectable["y"])[:, None] - np.asarray(candidates["ypos"])[None, :]
        dist = np.hypot(dx, dy)
        nearest = dist.argmin(axis=1)
        hit = dist[np.arange(len(detectable)), nearest] <= radius_px
        found = int(hit.sum())
        found_rb = int(np.count_nonzero(hit & (np.asarray(candidates["rb"])[nearest] >= 0.5)))
    return {"transients_on_image": len(transients), "transients_detectable": len(detectable),
            "transients_found": found, "transients_found_rb": found_rb}


def publish_demo_alerts(cfg: Config, subtractions: list[dict], alerts_root: Path) -> dict:
    """Build and publish the alerts of every subtracted image, earliest exposure first.

    The object history and the spool live under ``alerts_root``; packets go to the broker
    when ``cfg.kafka.bootstrap_servers`` is set and stay in the spool otherwise (the
    default), as ``skydiff alerts publish`` does.  Returns the counts and one record per image.
    """
    from alerts.from_subtraction import publish_products
    from alerts.history import SQLiteHistoryStore
    from alerts.publish import AlertPublisher
    from alerts.spool import PENDING, Spool

    outdirs = [r["outdir"] for r in subtractions if r.get("status") == 0]
    spool = Spool(alerts_root / "spool")
    log.info("demo: alerts of %d subtracted image(s) to %s", len(outdirs),
             cfg.kafka.bootstrap_servers or f"the spool {spool.root}")
    with SQLiteHistoryStore(alerts_root / "history.sqlite", survey=cfg.kafka.survey) as store, \
            AlertPublisher(cfg.kafka, spool) as publisher:
        images = publish_products(outdirs, cfg, store, publisher)
        publisher.flush()
        report = publisher.report
    return {"built": sum(i.alerts for i in images), "spooled": report.spooled,
            "already_delivered": report.already_delivered, "delivered": report.delivered,
            "pending": spool.count(PENDING), "broker": cfg.kafka.bootstrap_servers, "spool": str(spool.root),
            "topics": sorted({i.topic for i in images}),
            "images": [{"outdir": i.outdir, "expid": i.expid, "rcid": i.rcid, "topic": i.topic, "alerts": i.alerts,
                        "with_history": i.with_history, "build_s": round(i.build_s, 3),
                        "publish_s": round(i.publish_s, 3)} for i in images]}
