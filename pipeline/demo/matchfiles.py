"""The demo's matchfile step: every reference seeds its matchfile, every subtracted science
image is appended in time order, and one variable star's light curve is named to look at.

Used by :func:`pipeline.demo.survey.run_demo` after the subtraction step; it does what ``skydiff
matchfile seed`` and ``skydiff matchfile append OUTDIR`` do (a subtraction folder's science
image characterised again on the subtraction's zero point, see :mod:`pipeline.matchfile.epochs`),
the characterisations in a process pool and the appends in exposure order.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import h5py
import numpy as np
from astropy.table import Table, vstack

from pipeline.core.config import Config
from pipeline.matchfile.lightcurves import lightcurve
from pipeline.matchfile.store import MatchfileError, combine
from pipeline.matchfile.layout import read_table
from pipeline.matchfile.epochs import BAD_INPUT_ERRORS, commit_epoch, epoch_from_files, seed_matchfile_from_reference

log = logging.getLogger("skydiff.demo")

__all__ = ["fill_demo_matchfiles", "pick_variable_lightcurve"]

_worker_cfg: Config | None = None


def _init_worker(cfg: Config) -> None:
    global _worker_cfg
    _worker_cfg = cfg


def _epoch_task(outdir: str):
    start = time.perf_counter()
    try:
        epoch, _ = epoch_from_files(outdir, _worker_cfg)
    except BAD_INPUT_ERRORS as exc:
        return outdir, None, str(exc), time.perf_counter() - start
    return outdir, epoch, None, time.perf_counter() - start


def _truth_path(science: Path, truth_root: Path) -> Path:
    """The simulator's truth of a solved image ``<astrometry>/<night>/<stem>/<stem>.fits``."""
    return truth_root / science.parent.parent.name / f"{science.stem}_truth.fits"


def _variable_stars(sciences: list[Path], truth_root: Path) -> Table | None:
    from astropy.io import fits

    positions = []
    for science in sciences:
        path = _truth_path(science, truth_root)
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


def pick_variable_lightcurve(root: Path, matchfiles: list[Path], variables: Table | None) -> dict | None:
    """A light curve worth looking at: the simulated variable star (``variables``: id, ra,
    dec) with the most unflagged epochs, the largest magnitude range breaking ties; without
    truth, the most variable object with the most epochs."""
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
            "command": f"skydiff lightcurve {ra:.6f} {dec:.6f} --root {root}"}


def fill_demo_matchfiles(cfg: Config, references: list[dict], subtractions: list[dict], root: Path,
                         truth_root: Path | None = None, jobs: int = 2) -> dict:
    """Seed a matchfile from every built reference and append every subtracted image.

    Parameters
    ----------
    references : list of dict
        :func:`pipeline.demo.subtraction.build_demo_references` records (``path`` of each).
    subtractions : list of dict
        :func:`pipeline.demo.subtraction.subtract_demo_images` records (``status``, ``outdir``).
    root : Path
        Matchfile root.
    truth_root : Path, optional
        The simulator's truth folder: names a simulated variable star's light curve.
    jobs : int
        Processes characterising the science images.

    Returns
    -------
    dict
        ``root``, ``matchfiles`` (path, epochs, photometry and unmatched rows of each),
        ``epochs_appended``, ``failed`` (source and reason), ``characterize_s`` and
        ``append_s`` (mean seconds per image), ``lightcurve`` (see :func:`pick_variable_lightcurve`).
    """
    from pipeline.reference.files import read_reference
    from pipeline.reference.model import ReferenceError

    root = Path(root)
    failed, seeded = [], set()
    for record in references:
        if not record.get("path"):
            continue
        try:
            seeded.add(seed_matchfile_from_reference(root, read_reference(record["path"]), cfg))
        except (ReferenceError, MatchfileError, *BAD_INPUT_ERRORS) as exc:
            failed.append({"source": record["path"], "reason": str(exc)})
    outdirs = [r["outdir"] for r in subtractions if r.get("status") == 0 and r.get("outdir")]
    log.info("demo: matchfiles: %d seeded, characterising %d science image(s)", len(seeded), len(outdirs))
    with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker, initargs=(cfg,)) as pool:
        results = list(pool.map(_epoch_task, outdirs))
    epochs = []
    for outdir, epoch, error, _ in results:
        if epoch is None:
            failed.append({"source": outdir, "reason": error})
        else:
            epochs.append(epoch)
    append_s = []
    for epoch in sorted(epochs, key=lambda e: e.meta.obsmjd):
        start = time.perf_counter()
        try:
            commit_epoch(root, epoch, cfg)
        except (MatchfileError, *BAD_INPUT_ERRORS) as exc:
            failed.append({"source": epoch.source, "reason": str(exc)})
            continue
        append_s.append(time.perf_counter() - start)
    files = []
    for path in sorted(seeded):
        combine(path, cfg.matchfile)
        with h5py.File(path, "r", locking=False) as h5:
            files.append({"path": str(path), "epochs": int(h5["exposures/expid"].shape[0]),
                          "photometry_rows": int(h5["photometry/objid"].shape[0]),
                          "unmatched_rows": int(h5["unmatched/expid"].shape[0])})
    variables = None
    if truth_root is not None:
        variables = _variable_stars([Path(r["science"]) for r in subtractions if r.get("status") == 0
                                     and r.get("science")], Path(truth_root))
    return {"root": str(root), "matchfiles": files, "epochs_appended": len(append_s), "failed": failed,
            "characterize_s": round(float(np.mean([r[3] for r in results])), 2) if results else 0.0,
            "append_s": round(float(np.mean(append_s)), 3) if append_s else 0.0,
            "lightcurve": pick_variable_lightcurve(root, sorted(seeded), variables)}
