"""Benchmark of forced photometry (``skydiff bench forcedphot``): accuracy against the
simulator's truth, the cost of ``fp_hists`` per quadrant and the service's answer time.

Accuracy: a reference coadded from an earlier season (no current transients), then science
epochs of the same quadrant on successive nights, each subtracted and archived; forced
fluxes at every simulated transient (``simulation.transients_per_quadrant`` raised so that
the statistics mean something) and at empty positions (nothing varying within 10 px, no
source brighter than mag 20 within 8 px) are compared with the truth: pull = (forced -
true) / uncertainty, true = the transient's flux in the science image (DN) less its light in
the reference (the simulator's light curves are faint but finite months before the peak:
the coadd's weighted mean of the frames' true fluxes), 0 when empty.  Transients with
another within 10 px are left out (measured blended with it; counted).

Cost: one real subtraction archived under 30 earlier exposures (its header's ``EXPID`` and
``OBSMJD`` changed: the same pixels and the same work per epoch as 30 real images), then
the ``fp_hists`` of 200 candidates (:func:`alerts.from_subtraction.forced_photometry_history`,
what the alerts stage runs) and the service's forced-photometry endpoint asked for 1,000
positions over those 30 epochs through HTTP on loopback.  The archive's files are warm in
the page cache, as a night's recent epochs are.
"""
from __future__ import annotations

import shutil
import tempfile
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from urllib.parse import quote

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

__all__ = ["bench_forcedphot", "pull_statistics"]

N_CANDIDATES = 200
N_EPOCHS = 30
N_SERVICE_POSITIONS = 1000


def _kind(truth) -> np.ndarray:
    return np.char.strip(np.asarray(truth["kind"]).astype(str))


def _empty_positions(truth, shape, n: int, seed: int, avoid=None) -> np.ndarray:
    """(n, 2) 1-based pixel positions with nothing varying (nor any of ``avoid``) within
    10 px and no source brighter than mag 20 within 8 px."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    points = np.column_stack([rng.uniform(40, nx - 40, 6 * n), rng.uniform(40, ny - 40, 6 * n)])
    varying = np.asarray(truth["variable"], bool) | np.asarray(truth["transient"], bool)
    bright = np.asarray(truth["mag"], float) < 20.0
    far = np.ones(len(points), bool)
    for sel, radius in ((varying, 10.0), (bright, 8.0)):
        tree = cKDTree(np.column_stack([np.asarray(truth["x"])[sel], np.asarray(truth["y"])[sel]]))
        far &= ~np.isfinite(tree.query(points, distance_upper_bound=radius)[0])
    if avoid is not None and len(avoid):
        far &= ~np.isfinite(cKDTree(avoid).query(points, distance_upper_bound=10.0)[0])
    return points[far][:n]


def pull_statistics(pulls: np.ndarray) -> dict:
    """Median, standard deviation and robust (1.4826 MAD) width of pulls."""
    pulls = np.asarray(pulls, float)
    median = float(np.median(pulls))
    return {"n": int(pulls.size), "median": round(median, 3), "std": round(float(np.std(pulls)), 3),
            "robust_std": round(float(1.4826 * np.median(np.abs(pulls - median))), 3)}


def _accuracy(cfg, root: Path, nights: tuple[str, ...], n_transients: int, n_empty: int):
    from pipeline.forcedphot.archive import DifferenceArchive, archive_subtraction
    from pipeline.forcedphot.lightcurves import MISSING, forced_photometry
    from pipeline.reference.build import build_reference
    from pipeline.simulate.pairs import (PairOptions, coadd_true_mag, pair_sky, simulate_reference_frames,
                                        simulate_science)
    from pipeline.simulate.realbogus_training import subtract_pair

    sim_cfg = cfg.replace(simulation__transients_per_quadrant=n_transients)
    # Faint point sources injected into each epoch (S/N 0.5-5: below the detection limit),
    # each night's at its own sky positions (the same pixels, another pointing).
    options = PairOptions(n_inject=100, snr_range=(0.5, 5.0), reference_seeing=(1.5, 1.6, 1.7))
    sky = pair_sky(sim_cfg, options)
    frames = simulate_reference_frames(sim_cfg, options, sky)
    reference = build_reference(frames, sky.gaia_catalogue(), cfg.instrument.filters[frames[0].meta.filter])
    epochs = []
    for night in nights:
        pair = simulate_science(sim_cfg, replace(options, science_night=night), sky)
        result = subtract_pair(pair, reference)
        archive_subtraction(root, pair.science.header, pair.science.wcs, result, reference, cfg.forcedphot)
        epochs.append((pair, result))
    archive = DifferenceArchive(root)
    first = epochs[0][0].truth
    transient = _kind(first) == "transient"
    ids = np.asarray(first["id"])[transient]
    # The reference season may hold some light of a transient: the truth of the difference is
    # the science flux less the coadd's (its frames' true fluxes, weighted as coadded).
    row_of = {int(t): k for k, t in enumerate(np.asarray(sky.transients["transient_id"]).tolist())}
    sky_rows = np.array([row_of[int(i)] for i in ids.tolist()])
    band = frames[0].meta.filter
    frame_mags = {int(f.meta.expid): dict(zip(ids.tolist(), sky.transient_mag(
        band, f.meta.obsmjd + 0.5 * f.meta.exptime / 86400.0, sky_rows).tolist())) for f in frames}
    reference_mag = coadd_true_mag(reference.frames, frame_mags, ids)
    # A transient with another within 10 px is measured blended with it (at 150 per quadrant
    # the simulator puts several supernovae in one host): left out of the pulls, counted.
    xy = np.column_stack([np.asarray(first["x"])[transient], np.asarray(first["y"])[transient]])
    isolated = cKDTree(xy).query(xy, k=2)[0][:, 1] > 10.0
    ids = ids[isolated]
    sky_rows = sky_rows[isolated]
    reference_mag = reference_mag[isolated]
    ra, dec = np.asarray(first["ra"])[transient][isolated], np.asarray(first["dec"])[transient][isolated]
    empty_xy = _empty_positions(first, epochs[0][0].science.data.shape, n_empty, seed=11,
                                avoid=np.column_stack([epochs[0][0].injected["x"], epochs[0][0].injected["y"]]))
    empty_ra, empty_dec = epochs[0][0].science.wcs.all_pix2world(empty_xy[:, 0], empty_xy[:, 1], 1)
    transient_table = forced_photometry(archive, ra, dec, config=cfg.forcedphot)
    empty_table = forced_photometry(archive, empty_ra, empty_dec, config=cfg.forcedphot)
    transient_pulls, transient_snr, empty_pulls, transient_rows, calibrated_pulls = [], [], [], [], []
    for pair, result in epochs:
        expid = pair.science.meta.expid
        truth = pair.truth
        own = _kind(truth) == "transient"
        flux_of = dict(zip(np.asarray(truth["id"])[own].tolist(), np.asarray(truth["flux_adu"], float)[own].tolist()))
        # In science DN at the measured zero point, as forcediffimflux is.
        reference_dn = 10 ** (0.4 * (result.zp_science - reference_mag))
        true = np.array([flux_of.get(i, 0.0) for i in ids.tolist()]) - reference_dn
        # The same through the true magnitudes and magzpsci: what mag = magzpsci - 2.5 log10(flux)
        # users compute (the zero point, fitted with the same PSF photometry, absorbs the PSF
        # model's missing wing light; its own error, ~0.002 mag, enters instead).
        mag_of = dict(zip(np.asarray(truth["id"])[own].tolist(), np.asarray(truth["mag"], float)[own].tolist()))
        true_calibrated = 10 ** (0.4 * (result.zp_science - np.array([mag_of.get(i, np.inf) for i in ids.tolist()]))) \
            - reference_dn
        rows = transient_table[(transient_table["expid"] == expid) & (transient_table["forcediffimflux"] != MISSING)]
        pulls = (rows["forcediffimflux"] - true[rows["index"]]) / rows["forcediffimfluxunc"]
        calibrated_pulls.append(np.asarray((rows["forcediffimflux"] - true_calibrated[rows["index"]])
                                           / rows["forcediffimfluxunc"]))
        transient_pulls.append(np.asarray(pulls))
        transient_rows.append(rows)
        transient_snr.append(np.asarray(np.abs(true[rows["index"]]) / rows["forcediffimfluxunc"]))
        rows = empty_table[(empty_table["expid"] == expid) & (empty_table["forcediffimflux"] != MISSING)]
        empty_pulls.append(np.asarray(rows["forcediffimflux"] / rows["forcediffimfluxunc"]))
    # The injected faint sources: each night's measured on every epoch (true flux its own
    # night's, 0 on the others: its position is empty there).
    faint, faint_own = [], []
    for k, (pair, _) in enumerate(epochs):
        ra_k, dec_k = pair.science.wcs.all_pix2world(pair.injected["x"], pair.injected["y"], 1)
        table = forced_photometry(archive, ra_k, dec_k, config=cfg.forcedphot)
        table = table[table["forcediffimflux"] != MISSING]
        own = table["expid"] == pair.science.meta.expid
        true = np.where(own, np.asarray(pair.injected["flux_adu"])[table["index"]], 0.0)
        pulls = np.asarray((table["forcediffimflux"] - true) / table["forcediffimfluxunc"])
        faint.append(pulls)
        faint_own.append(pulls[np.asarray(own)])
    transient_pulls, transient_snr = np.concatenate(transient_pulls), np.concatenate(transient_snr)
    calibrated_pulls = np.concatenate(calibrated_pulls)
    statistics = {"transients": pull_statistics(transient_pulls),
                  "transients_calibrated": pull_statistics(calibrated_pulls),
                  "transients_blended_left_out": {"n": int((~isolated).sum())}}
    # Without the epochs whose procstatus warns of masked pixels or the image edge in the fit
    # box (56, 61), as a user of ZTF's forced photometry filters them.
    status = np.concatenate([np.asarray(t["procstatus"]).astype(str) for t in transient_rows])
    clean = np.array([set(code.split(",")) <= {"0", "57", "58"} for code in status])
    statistics["transients_clean"] = pull_statistics(transient_pulls[clean])
    outlier = np.abs(transient_pulls) > 5
    statistics["transients_outliers_5sigma"] = {"n": int(outlier.sum())}
    statistics["transients_outliers_5sigma_flagged"] = {"n": int((outlier & ~clean).sum())}
    # Nuclear transients sit on their host's core, where the subtraction's residual of the
    # galaxy (no part of the flux error model) adds to the forced flux.
    kinds = np.char.strip(np.asarray(sky.transients["kind"]).astype(str))[sky_rows]
    kind_of_pull = np.concatenate([kinds[np.asarray(t["index"])] for t in transient_rows])
    for kind in ("nuclear", "supernova"):
        sel = kind_of_pull == kind
        if sel.any():
            statistics[f"transients_{kind}"] = pull_statistics(transient_pulls[sel])
    for low, high in ((0, 20), (20, 100), (100, np.inf)):
        sel = (transient_snr >= low) & (transient_snr < high)
        if sel.any():
            statistics[f"transients_snr{low}-{high:g}"] = pull_statistics(transient_pulls[sel])
            statistics[f"transients_calibrated_snr{low}-{high:g}"] = pull_statistics(calibrated_pulls[sel])
    statistics["faint_injected_own_epoch"] = pull_statistics(np.concatenate(faint_own))
    statistics["faint_injected_all_epochs"] = pull_statistics(np.concatenate(faint))
    statistics["empty"] = pull_statistics(np.concatenate(empty_pulls))
    return epochs, reference, statistics


def bench_forcedphot(cfg=None, out: str | None = None, nights=("2026-03-15", "2026-03-17", "2026-03-19"),
                     n_transients: int = 150, n_empty: int = 300) -> dict:
    """Accuracy, fp_hists cost and service time (see the module); the archives go under
    ``out`` (default a temporary folder, removed)."""
    from alerts.from_subtraction import alertable, forced_photometry_history
    from alerts.packet import AlertContext
    from pipeline.core.config import load_config
    from pipeline.forcedphot.archive import archive_subtraction
    from pipeline.matchfile.service import FORCED_PATH, make_server

    cfg = load_config() if cfg is None else cfg
    base = Path(out) if out else Path(tempfile.mkdtemp(prefix="skydiff-fp-"))
    try:
        t0 = time.perf_counter()
        epochs, reference, accuracy = _accuracy(cfg, base / "accuracy", nights, n_transients, n_empty)
        report: dict = {"accuracy_setup_s": round(time.perf_counter() - t0, 1)}
        for kind, stats in accuracy.items():
            for key, value in stats.items():
                report[f"{'n_' if key == 'n' else ''}pull_{kind}{'' if key == 'n' else '_' + key}"] = value

        # 30 earlier epochs: one real subtraction archived under 30 exposures.
        pair, result = epochs[-1]
        header = pair.science.header
        root = base / "cost"
        mjd0 = float(header["OBSMJD"])
        write_s = []
        for k in range(N_EPOCHS):
            h = header.copy()
            h["EXPID"] = int(header["EXPID"]) - 1000 * (k + 1)
            h["OBSMJD"] = mjd0 - 0.95 * (k + 1)
            t0 = time.perf_counter()
            archive_subtraction(root, h, pair.science.wcs, result, reference, cfg.forcedphot)
            write_s.append(time.perf_counter() - t0)
        report["archive_write_s"] = round(float(np.median(write_s)), 3)
        candidates = result.candidates[alertable(result.candidates)]
        ny, nx = result.zogy.diff.shape
        rng = np.random.default_rng(3)
        extra = N_CANDIDATES - min(len(candidates), N_CANDIDATES)
        xs = np.concatenate([np.asarray(candidates["xpos"], float)[:N_CANDIDATES], rng.uniform(20, nx - 20, extra)])
        ys = np.concatenate([np.asarray(candidates["ypos"], float)[:N_CANDIDATES], rng.uniform(20, ny - 20, extra)])
        ra, dec = pair.science.wcs.all_pix2world(xs, ys, 1)
        positions = Table({"ra": ra, "dec": dec})
        context = AlertContext(jd=mjd0 + 2400000.5, fid=2, expid=int(header["EXPID"]), rcid=int(header["RCID"]),
                               field=int(header["FIELDID"]), programid=1, night="20260319", rfid=1,
                               jdstartref=0.0, jdendref=0.0, nframesref=1, footprint=())
        fp_cfg = cfg.replace(paths__fparchive=str(root))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            hists = forced_photometry_history(context, positions, fp_cfg)
            times.append(time.perf_counter() - t0)
        report["fp_hists_s"] = round(min(times), 3)
        report["fp_hists_first_s"] = round(times[0], 3)
        report["n_fp_hist_entries"] = sum(len(h) for h in hists)

        (base / "matchfiles").mkdir(exist_ok=True)      # the light-curve side, empty here
        server = make_server(base / "matchfiles", "127.0.0.1", 0, archive=root, forced_config=cfg.forcedphot)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            ra, dec = pair.science.wcs.all_pix2world(rng.uniform(20, nx - 20, N_SERVICE_POSITIONS),
                                                     rng.uniform(20, ny - 20, N_SERVICE_POSITIONS), 1)
            query = "POS=" + quote(";".join(f"{r:.7f} {d:.7f}" for r, d in zip(ra, dec))) + "&FORMAT=CSV"
            url = f"http://127.0.0.1:{server.server_address[1]}{FORCED_PATH}?{query}"
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                with urllib.request.urlopen(url, timeout=600) as response:
                    body = response.read()
                times.append(time.perf_counter() - t0)
            report["service_1000x30_s"] = round(min(times), 3)
            report["service_first_s"] = round(times[0], 3)
            report["n_service_rows"] = body.count(b"\n") - 1
        finally:
            server.shutdown()
            server.server_close()
        return report
    finally:
        if not out:
            shutil.rmtree(base, ignore_errors=True)
