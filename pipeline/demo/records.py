"""What the quadrant runner left of the demo's survey, read back for the summary.

The demo runs every quadrant through :func:`pipeline.run.exposure.run_exposure`; these
functions read its products under ``<paths.outputs>/<expid>/<rcid>/`` (``status.json``,
``astrometry/qa.json``, ``subtraction/candidates.ecsv``), the alert spool and the
matchfiles, and compare the candidates with the simulator's truth.
"""
from __future__ import annotations

import json
import logging
import shlex
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
from astropy.table import Table, vstack

from pipeline.core.config import Config
from pipeline.matchfile.layout import read_table
from pipeline.matchfile.lightcurves import lightcurve
from pipeline.core.exits import BadInputError
from pipeline.run.quadrant import quadrant_dir, read_status
from pipeline.simulate.survey import SimulatedSurvey

log = logging.getLogger("skydiff.demo")

__all__ = ["astrometry_records", "subtraction_records", "transient_recovery", "alerts_summary",
           "matchfiles_summary", "pick_variable_lightcurve", "stage_seconds", "plot_scale_vs_airmass"]


def _astrometry_qa(cfg: Config, expid: int, rcid: int) -> dict | None:
    try:
        return json.loads((quadrant_dir(cfg, expid, rcid) / "astrometry" / "qa.json").read_text())
    except (OSError, ValueError):
        return None


def astrometry_records(survey: SimulatedSurvey) -> list[dict]:
    """Every quadrant's astrometry QA record (the status record's reason where none was written)."""
    records = []
    for expid in survey.reference_expids + survey.science_expids:
        for rcid in survey.rcids:
            qa = _astrometry_qa(survey.cfg, expid, rcid)
            if qa is None:
                status = read_status(quadrant_dir(survey.cfg, expid, rcid)) or {}
                qa = {"expid": expid, "rcid": rcid, "usable": False,
                      "reasons": [status.get("reason") or "no status record"]}
            records.append(qa)
    return records


def transient_recovery(candidates_path: Path, truth_path: Path, diffmaglim: float,
                       radius_px: float = 2.0) -> dict:
    """The simulator's transients on an image against its candidates.

    ``transients_detectable``: transients on the image brighter than the difference
    image's 5-sigma limit; ``transients_found``: those with a candidate within
    ``radius_px``; ``transients_found_rb``: of those, with rb >= 0.5.
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
            "transients_found": found, "transients_found_rb": found_rb,
            **_asteroid_naming(truth_path, candidates, radius_px)}


def _asteroid_naming(truth_path: Path, candidates: Table, radius_px: float) -> dict:
    """``asteroids_found``: simulated minor planets on the image (also counted as transients
    above) with a candidate within ``radius_px``; ``asteroids_named``: of those, the candidate
    carries the object's ``ssnamenr``."""
    from astropy.io import fits

    with fits.open(truth_path) as hdul:
        if "ASTEROIDS" not in hdul:
            return {"asteroids_found": 0, "asteroids_named": 0}
        asteroids = Table(hdul["ASTEROIDS"].data)
    asteroids = asteroids[np.asarray(asteroids["on_image"], bool)]
    found = named = 0
    if len(asteroids) and len(candidates) and "ssnamenr" in candidates.colnames:
        dist = np.hypot(np.asarray(asteroids["x"])[:, None] - np.asarray(candidates["xpos"])[None, :],
                        np.asarray(asteroids["y"])[:, None] - np.asarray(candidates["ypos"])[None, :])
        nearest = dist.argmin(axis=1)
        hit = dist[np.arange(len(asteroids)), nearest] <= radius_px
        found = int(hit.sum())
        named = int(np.sum(hit & (np.asarray(candidates["ssnamenr"]).astype(str)[nearest]
                                  == np.asarray(asteroids["ssnamenr"]).astype(str))))
    return {"asteroids_found": found, "asteroids_named": named}


def subtraction_records(survey: SimulatedSurvey) -> list[dict]:
    """One record per science quadrant, in time order: the runner's verdict (``state``,
    ``exit_code``, ``stage``, ``reason``), and for a subtracted one its subtraction summary,
    ``seconds``, ``outdir`` and the transients found against the truth."""
    records = []
    for expid in survey.science_expids:
        for rcid in survey.rcids:
            folder = quadrant_dir(survey.cfg, expid, rcid)
            status = read_status(folder) or {"state": "missing", "reason": "no status record"}
            record = {"expid": expid, "rcid": rcid, **{k: status.get(k) for k in ("state", "exit_code", "stage",
                                                                                   "reason")}}
            if status.get("subtraction"):
                qa = _astrometry_qa(survey.cfg, expid, rcid) or {}
                record.update(status["subtraction"], subtracted=True, outdir=str(folder / "subtraction"),
                              science=qa.get("image"), seconds=status["timings_s"].get("subtraction"))
                record.update(transient_recovery(folder / "subtraction" / "candidates.ecsv",
                                                 survey.truth_path(qa["image"]), record["diffmaglim"]))
            else:
                record["subtracted"] = False
            records.append(record)
    return records


def _alerts_with_history(spool_root: Path) -> tuple[Counter, list[str]]:
    """Spooled alerts (pending or delivered) whose ``prv_candidates`` hold an earlier
    detection, by (expid, rcid); and the topics."""
    from alerts.ids import split_candid
    from alerts.schema import read_alert_file
    from alerts.spool import DELIVERED, PENDING, Spool

    spool = Spool(spool_root, fsync=False)
    counts: Counter = Counter()
    topics = set()
    for state in (PENDING, DELIVERED):
        for entry in spool.entries(state):
            topics.add(entry.topic)
            packet = read_alert_file(entry.path)
            if any(p["candid"] is not None for p in packet["prv_candidates"] or ()):
                counts[split_candid(entry.candid)[:2]] += 1
    return counts, sorted(topics)


def alerts_summary(cfg: Config, subtractions: list[dict]) -> dict:
    """The alerts of the science quadrants, from their status records and the spool."""
    from alerts.spool import DELIVERED, PENDING, Spool

    root = cfg.paths.resolve("spool")
    with_history, topics = _alerts_with_history(root)
    images = []
    for record in subtractions:
        status = read_status(quadrant_dir(cfg, record["expid"], record["rcid"])) or {}
        alerts = status.get("alerts")
        if alerts is None:
            continue
        images.append({"expid": record["expid"], "rcid": record["rcid"], "topic": alerts["topic"],
                       "alerts": alerts["built"], "spooled": alerts["spooled"],
                       "already_delivered": alerts["already_delivered"],
                       "unacknowledged": alerts["unacknowledged"],
                       "with_history": with_history[(record["expid"], record["rcid"])],
                       "seconds": status["timings_s"].get("alerts")})
    spool = Spool(root, fsync=False)
    return {"built": sum(i["alerts"] for i in images), "spooled": sum(i["spooled"] for i in images),
            "already_delivered": sum(i["already_delivered"] for i in images),
            "delivered": spool.count(DELIVERED), "pending": spool.count(PENDING),
            "broker": cfg.kafka.bootstrap_servers, "spool": str(root), "topics": topics, "images": images}


def _variable_stars(truth_paths: list[Path]) -> Table | None:
    from astropy.io import fits

    positions = []
    for path in truth_paths:
        if not path.is_file():
            continue
        with fits.open(path) as hdul:
            truth = Table(hdul["TRUTH"].data)
        variable = (truth["kind"] == "star") & np.asarray(truth["variable"], bool) & ~np.asarray(truth["saturated"], bool)
        positions.append(truth[variable]["id", "ra", "dec"])
    if not positions:
        return None
    stars = vstack(positions)
    _, first = np.unique(np.asarray(stars["id"]), return_index=True)
    return stars[np.sort(first)]


def _most_variable(paths: list[Path]) -> tuple[float, float] | None:
    """Position of the unflagged object with the most epochs and, among those, the largest
    reduced chi^2 about its weighted mean magnitude (no truth needed)."""
    best, best_key = None, (0, 0.0)
    for path in paths:
        with h5py.File(path, "r", locking=False) as h5:
            sources, phot = read_table(h5, "sources"), read_table(h5, "photometry")
        for i in np.flatnonzero((sources["refflags"] == 0) & (sources["phot_count"] >= 3)):
            rows = slice(sources["phot_start"][i], sources["phot_start"][i] + sources["phot_count"][i])
            good = phot["flags"][rows] == 0
            mag, err = phot["mag"][rows][good].astype(float), phot["magerr"][rows][good].astype(float)
            if mag.size < 3:
                continue
            mean = np.average(mag, weights=err ** -2)
            key = (mag.size, float(np.sum(((mag - mean) / err) ** 2) / (mag.size - 1)))
            if key > best_key:
                best, best_key = (float(sources["ra"][i]), float(sources["dec"][i])), key
    return best


def pick_variable_lightcurve(root: Path, matchfiles: list[Path], variables: Table | None,
                             config: Path | None = None) -> dict | None:
    """A light curve worth looking at: the simulated variable star (``variables``: id, ra,
    dec) with the most unflagged epochs, the largest magnitude range breaking ties; without
    truth, the most variable object with the most epochs.  Its ``command`` names the
    configuration file ``config`` when given (the matchfile root otherwise)."""
    candidates = [] if variables is None else list(zip(variables["ra"], variables["dec"]))
    if not candidates:
        position = _most_variable(matchfiles)
        candidates = [] if position is None else [position]
    best, best_key = None, (0, 0.0)
    for ra, dec in candidates:
        curve = lightcurve(float(ra), float(dec), 2.0, root)
        curve = curve[curve["catflags"] == 0]
        if len(curve) == 0:
            continue
        oids, counts = np.unique(np.asarray(curve["oid"]), return_counts=True)
        curve = curve[curve["oid"] == oids[counts.argmax()]]     # the object at the position, not a neighbour
        key = (len(curve), float(np.ptp(curve["mag"])))
        if key > best_key:
            best, best_key = curve, key
    if best is None:
        return None
    ra, dec = float(best["ra"][0]), float(best["dec"][0])
    return {"oid": int(best["oid"][0]), "ra": round(ra, 6), "dec": round(dec, 6),
            "filters": sorted(set(str(f) for f in best["filtercode"])), "epochs": len(best),
            "mag_min": round(float(np.min(best["mag"])), 3), "mag_max": round(float(np.max(best["mag"])), 3),
            "simulated_variable": variables is not None and len(variables) > 0,
            "command": shlex.join(["skydiff", "lightcurve", f"{ra:.6f}", f"{dec:.6f}",
                                   *(["--config", str(config)] if config is not None else ["--root", str(root)])])}


def matchfiles_summary(survey: SimulatedSurvey, subtractions: list[dict], config: Path | None = None) -> dict:
    """The matchfiles the runner seeded and filled, with a light curve to look at.

    Returns ``root``, ``matchfiles`` (path, epochs, photometry and unmatched rows of each,
    after folding the pending epoch shards), ``epochs_appended``, ``failed`` (science
    quadrants that did not reach their matchfile, with the reason), ``append_s`` (mean
    seconds of the matchfile stage) and ``lightcurve`` (:func:`pick_variable_lightcurve`).
    """
    from pipeline.matchfile.store import combine

    cfg = survey.cfg
    root = cfg.paths.resolve("matchfiles")
    append_s, failed = [], []
    for record in subtractions:
        status = read_status(quadrant_dir(cfg, record["expid"], record["rcid"])) or {}
        if status.get("matchfile") is not None:
            append_s.append(status["timings_s"]["matchfile"])
        else:
            failed.append({"source": f"expid {record['expid']} rcid {record['rcid']}",
                           "reason": f"{record['state']} at {record['stage']}: {record['reason']}"})
    paths = sorted(p for p in root.rglob("*.h5") if not p.name.startswith(".") and not p.parent.name.endswith(".wal"))
    files = []
    for path in paths:
        combine(path, cfg.matchfile)
        with h5py.File(path, "r", locking=False) as h5:
            files.append({"path": str(path), "epochs": int(h5["exposures/expid"].shape[0]),
                          "photometry_rows": int(h5["photometry/objid"].shape[0]),
                          "unmatched_rows": int(h5["unmatched/expid"].shape[0])})
    variables = _variable_stars([survey.truth_path(r["science"]) for r in subtractions if r.get("science")])
    return {"root": str(root), "matchfiles": files, "epochs_appended": len(append_s), "failed": failed,
            "append_s": round(float(np.mean(append_s)), 3) if append_s else 0.0,
            "lightcurve": pick_variable_lightcurve(root, paths, variables, config) if paths else None}


def stage_seconds(survey: SimulatedSurvey) -> dict[str, float]:
    """Seconds of each runner stage summed over every quadrant's status record."""
    totals: dict[str, float] = {}
    for expid in survey.reference_expids + survey.science_expids:
        for rcid in survey.rcids:
            status = read_status(quadrant_dir(survey.cfg, expid, rcid)) or {}
            for stage, seconds in (status.get("timings_s") or {}).items():
                totals[stage] = totals.get(stage, 0.0) + seconds
    total = totals.pop("total", None)       # last, after the stages in the order they ran
    return {k: round(v, 1) for k, v in totals.items()} | ({} if total is None else {"total": round(total, 1)})


def plot_scale_vs_airmass(cfg: Config, astrometry: list[dict], path: Path) -> Path | None:
    """Each usable quadrant's solved pixel scale against airmass with the refraction model, annual
    aberration taken out (what ``skydiff qa scale-airmass`` draws for the solved images)."""
    from pipeline.astrometry.plots import plot_scale_airmass
    from pipeline.astrometry.scale_airmass import scale_airmass_study

    images = []
    for record in astrometry:
        if record.get("usable"):
            folder = quadrant_dir(cfg, record["expid"], record["rcid"]) / "astrometry"
            images += sorted(p for p in folder.glob("*.fits") if not p.name.endswith("_matches.fits"))
    try:
        table, models, _ = scale_airmass_study(images, cfg)
    except BadInputError as exc:
        log.warning("no scale-vs-airmass plot: %s", exc)
        return None
    return plot_scale_airmass(table, models, path, title="Demo: solved pixel scale vs airmass")
