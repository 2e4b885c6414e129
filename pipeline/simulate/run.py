"""Simulating a whole run to disk: plan the nights, draw the sky, render and write quadrants.

Layout under ``outdir``::

    gaia/gaia_catalog.fits                                  Gaia-like catalogue (archive columns)
    ps1/ps1_catalog.fits                                    PS1-like catalogue of stars and galaxies
                                                            (objid ra dec gmag rmag imag zmag ps_score)
    exposures/<YYYYMMDD>/<expid>/ztf_<expid>_f<field>_<filter>_c<ccd>_q<qid>.fits
                                                            contract image + MASK extension
    truth/<expid>/<same name>_truth.fits                    HDU0: true WCS + truth keywords,
                                                            HDU1: per-object truth table (TRUTH),
                                                            HDU2: minor planets near the quadrant
                                                            (ASTEROIDS: ssnamenr, ra, dec, vmag, mag,
                                                            rmag, x, y, on_image), when simulated
    truth/exposures.ecsv                                    one row per exposure (plan + truth)
    truth/stars.fits                                        every star's true parameters
    truth/ps1_objects.fits                                  PS1 objid -> star (1) / galaxy (0), truth row, true r
    truth/transients.ecsv                                   transient parameters + true mag per exposure
    truth/asteroids.ecsv, truth/MPCORB.DAT                  minor planets' elements (table, MPCORB format)
    simulation.json                                         parameters, seed, version, counts

Every file is written to a temporary name and renamed, and everything is deterministic
given the seed, so a rerun reproduces the same bytes of data.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from astropy.io import fits
from astropy.table import Table

from catalogs.schema import PS1_COLUMNS
from pipeline import __version__
from pipeline.core.config import Config, config_to_toml
from pipeline.core.focalplane import ccd_qid_of_rcid, parse_quadrants, quadrant_geometry
from pipeline.core.image import write_quadrant
from pipeline.formats.atomic import write_fits_atomic, write_json_atomic, write_table_atomic
from pipeline.simulate.exposure import ExposureSpec
from pipeline.simulate.optics import true_boresight, true_quadrant_solution
from pipeline.simulate.plan import Field, plan_night
from pipeline.simulate.render import SimulatedQuadrant, image_zeropoint, render_quadrant
from pipeline.simulate.sky import SkyModel, make_sky

__all__ = ["simulate_run", "quadrant_paths", "write_simulated_quadrant", "simulate_quadrant",
           "exposures_table", "transients_table", "bench_simulate_quadrant"]

log = logging.getLogger("skydiff.simulate")
# The PS1-like catalogue's noise draws from its own generator, so the sky and the images
# stay the bytes they were before the catalogue existed.
PS1_SEED_OFFSET = 1013


def quadrant_paths(outdir: str | os.PathLike, spec: ExposureSpec, ccdid: int, qid: int) -> tuple[Path, Path]:
    """(image path, truth path) of one quadrant of one exposure under ``outdir``."""
    stem = f"ztf_{spec.expid}_f{spec.fieldid}_{spec.filter}_c{ccdid:02d}_q{qid}"
    outdir = Path(outdir)
    return (outdir / "exposures" / spec.night / str(spec.expid) / f"{stem}.fits",
            outdir / "truth" / str(spec.expid) / f"{stem}_truth.fits")


def write_simulated_quadrant(quadrant: SimulatedQuadrant, image_path: Path, truth_path: Path) -> None:
    """Write the image (with MASK) and its truth file, each atomically."""
    write_quadrant(image_path, quadrant.data, quadrant.header, quadrant.mask)
    truth_hdu = fits.table_to_hdu(quadrant.truth)
    truth_hdu.name = "TRUTH"
    hdus = [fits.PrimaryHDU(header=quadrant.truth_header), truth_hdu]
    if quadrant.asteroids is not None:
        asteroids_hdu = fits.table_to_hdu(quadrant.asteroids)
        asteroids_hdu.name = "ASTEROIDS"
        hdus.append(asteroids_hdu)
    write_fits_atomic(fits.HDUList(hdus), truth_path)


def simulate_quadrant(spec: ExposureSpec, rcid: int, sky: SkyModel, cfg: Config,
                      outdir: str | os.PathLike | None = None, noiseless: bool = False):
    """True WCS, render and (if ``outdir``) write one quadrant; returns (quadrant, timings)."""
    timings = {}
    start = time.perf_counter()
    geom = quadrant_geometry(cfg.instrument, *ccd_qid_of_rcid(rcid))
    wcs, wcs_header, _ = true_quadrant_solution(spec, geom, cfg)
    timings["wcs"] = time.perf_counter() - start
    start = time.perf_counter()
    quadrant = render_quadrant(spec, geom, wcs, sky, cfg, noiseless=noiseless, wcs_header=wcs_header)
    timings["render"] = time.perf_counter() - start
    if outdir is not None:
        start = time.perf_counter()
        write_simulated_quadrant(quadrant, *quadrant_paths(outdir, spec, geom.ccdid, geom.qid))
        timings["write"] = time.perf_counter() - start
    return quadrant, timings


def exposures_table(specs: Sequence[ExposureSpec], cfg: Config) -> Table:
    """One row per exposure: every ExposureSpec field, the true boresight and true zero point."""
    rows = []
    for spec in specs:
        row = dataclasses.asdict(spec)
        east, north = row.pop("pointing_offset_arcsec")
        row["pointing_offset_east_arcsec"], row["pointing_offset_north_arcsec"] = east, north
        row["true_ra"], row["true_dec"] = true_boresight(spec)
        row["night"] = spec.night
        row["true_zeropoint"] = image_zeropoint(spec, cfg)
        rows.append(row)
    return Table(rows=rows) if rows else Table()


def transients_table(sky: SkyModel, specs: Sequence[ExposureSpec]) -> Table:
    """Transient parameters plus a ``mag_<expid>`` column per exposure (its band, mid-exposure)."""
    table = sky.transients.copy()
    table["fieldid"] = np.array([sky.fields[i][0] for i in table["field_index"]], dtype=np.int64)
    for spec in specs:
        mjd_mid = spec.obsmjd + 0.5 * spec.exptime / 86400.0
        table[f"mag_{spec.expid}"] = sky.transient_mag(spec.filter, mjd_mid)
        table[f"mag_{spec.expid}"].description = f"{spec.filter} at MJD {mjd_mid:.5f}"
    return table


# Worker-process state: the sky is sent once per worker, not once per quadrant.
_WORKER: dict = {}


def _init_worker(sky: SkyModel, cfg: Config, outdir: str) -> None:
    _WORKER.update(sky=sky, cfg=cfg, outdir=outdir)


def _worker_task(task: tuple[ExposureSpec, int]) -> tuple[int, int, dict]:
    spec, rcid = task
    _, timings = simulate_quadrant(spec, rcid, _WORKER["sky"], _WORKER["cfg"], _WORKER["outdir"])
    return spec.expid, rcid, timings


def simulate_run(cfg: Config, outdir: str | os.PathLike, fields: Sequence[Field | tuple[int, float, float]],
                 nights: Sequence[str], filters: Sequence[str] = ("ZTF_g", "ZTF_r"),
                 epochs_per_night: int = 4, quadrants: str | Iterable[int] = "all",
                 seed: int | None = None, jobs: int = 1, reference_nights: Sequence[str] = (),
                 reference_epochs_per_night: int = 2, reference_max_airmass: float = 1.3) -> dict:
    """Simulate nights of observations of ``fields`` and write them under ``outdir``.

    Parameters
    ----------
    cfg : Config
    outdir : path-like
    fields : sequence of Field or (fieldid, ra, dec)
    nights : sequence of str
        UT dates ``YYYY-MM-DD``.
    filters : sequence of str
        Bands, alternating between the epochs of a field.
    epochs_per_night : int
    quadrants : 'all', comma-separated rcids, or iterable of rcids
    seed : int, optional
        Default ``cfg.simulation.seed``.
    jobs : int
        Worker processes for rendering (1 renders in this process).
    reference_nights : sequence of str
        Nights of an earlier season, observed ``reference_epochs_per_night`` times each
        (filters alternating, within ``reference_max_airmass``: references are taken in
        good conditions) for building reference images; this run's transients peak
        during ``nights`` only, so they are (nearly) absent from these exposures.

    Returns
    -------
    dict
        The summary also written to ``simulation.json``.
    """
    t_start = time.perf_counter()
    seed = cfg.simulation.seed if seed is None else int(seed)
    fields = [f if isinstance(f, Field) else Field(int(f[0]), float(f[1]), float(f[2])) for f in fields]
    unknown = [b for b in filters if b not in cfg.instrument.filters]
    if unknown or not filters:
        raise ValueError(f"unknown filter(s) {unknown}; configured: {', '.join(cfg.instrument.filters)}")
    if not fields or not nights:
        raise ValueError("simulate_run needs at least one field and one night")
    rcids = parse_quadrants(quadrants, cfg.instrument.n_quadrants)
    outdir = Path(outdir)
    specs: list[ExposureSpec] = []
    for night in nights:
        specs.extend(plan_night(cfg, fields, night, filters=tuple(filters),
                                epochs_per_night=epochs_per_night, seed=seed))
    mjds = [s.obsmjd for s in specs]
    reference_specs: list[ExposureSpec] = []
    for k, night in enumerate(reference_nights):
        reference_specs.extend(plan_night(cfg, fields, night, filters=tuple(filters),
                                          epochs_per_night=reference_epochs_per_night, seed=seed,
                                          max_airmass=reference_max_airmass,
                                          first_sequence=1 + 1000 * (k + 1)))
    specs = reference_specs + specs
    log.info("planned %d exposures of %d field(s) over %d night(s); %d quadrant(s) each",
             len(specs), len(fields), len(nights), len(rcids))
    from pipeline.simulate.plan import night_midpoint
    sky = make_sky(cfg, [(f.fieldid, f.ra, f.dec) for f in fields], seed,
                   mjd_range=(min(mjds) - 0.5, max(mjds) + 0.5),
                   asteroid_nights=[night_midpoint(night, cfg).mjd for night in nights])
    log.info("sky: %d stars, %d galaxies, %d transients", len(sky.stars), len(sky.galaxies), len(sky.transients))

    write_table_atomic(sky.gaia_catalogue(), outdir / "gaia" / "gaia_catalog.fits")
    ps1 = sky.ps1_catalogue(seed + PS1_SEED_OFFSET)
    write_table_atomic(ps1[list(PS1_COLUMNS)], outdir / "ps1" / "ps1_catalog.fits")
    write_table_atomic(ps1["objid", "sim_class", "sim_row", "true_rmag"], outdir / "truth" / "ps1_objects.fits")
    write_table_atomic(sky.stars, outdir / "truth" / "stars.fits")
    write_table_atomic(transients_table(sky, specs), outdir / "truth" / "transients.ecsv")
    if len(sky.asteroids):
        from pipeline.simulate.asteroids import asteroid_elements
        from solarsystem.mpcorb import write_mpcorb
        write_table_atomic(sky.asteroids, outdir / "truth" / "asteroids.ecsv")
        write_mpcorb(asteroid_elements(sky.asteroids), outdir / "truth" / "MPCORB.DAT")
    write_table_atomic(exposures_table(specs, cfg), outdir / "truth" / "exposures.ecsv")

    tasks = [(spec, rcid) for spec in specs for rcid in rcids]
    stage_totals: dict[str, float] = {}
    done = 0
    t_render = time.perf_counter()
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker,
                                 initargs=(sky, cfg, str(outdir))) as pool:
            results = pool.map(_worker_task, tasks, chunksize=1)
            for expid, rcid, timings in results:
                done += 1
                _report_progress(done, len(tasks), expid, rcid, timings, stage_totals)
    else:
        for spec, rcid in tasks:
            _, timings = simulate_quadrant(spec, rcid, sky, cfg, outdir)
            done += 1
            _report_progress(done, len(tasks), spec.expid, rcid, timings, stage_totals)
    summary = {
        "version": __version__, "seed": seed,
        "fields": [dataclasses.asdict(f) for f in fields], "nights": list(nights),
        "filters": list(filters), "epochs_per_night": epochs_per_night, "quadrants": rcids,
        "n_exposures": len(specs), "n_quadrant_images": len(tasks),
        "n_stars": len(sky.stars), "n_galaxies": len(sky.galaxies), "n_transients": len(sky.transients),
        "n_asteroids": len(sky.asteroids),
        "expids": [s.expid for s in specs],
        "reference_expids": [s.expid for s in reference_specs],
        "reference_nights": list(reference_nights),
        "config_toml": config_to_toml(cfg),
        "timings_s": {"total": time.perf_counter() - t_start, "rendering_wall": time.perf_counter() - t_render,
                      **{f"sum_{k}": v for k, v in stage_totals.items()}},
    }
    write_json_atomic(summary, outdir / "simulation.json")
    return summary


def _report_progress(done: int, total: int, expid: int, rcid: int, timings: dict, totals: dict) -> None:
    for key, value in timings.items():
        totals[key] = totals.get(key, 0.0) + value
    level = logging.INFO if done == total or done % 16 == 0 else logging.DEBUG
    log.log(level, "quadrant %d/%d done (exposure %d, rcid %d, %.2f s)", done, total, expid, rcid,
            sum(timings.values()))


class _Stopwatch:
    """Wall-clock and CPU seconds of a block (CPU time is the figure to trust on a busy machine)."""

    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def __exit__(self, *exc):
        self.timings[self.name] = time.perf_counter() - self.wall
        self.timings[f"{self.name}_cpu"] = time.process_time() - self.cpu


def bench_simulate_quadrant(cfg: Config, rcid: int = 21, field: Field | None = None) -> dict:
    """Time the simulation of one full quadrant, stage by stage (seconds, wall and CPU).

    Stages: ``sky`` (drawing the whole field's sky, once per run), ``select`` (catalogue
    lookup of the quadrant's objects, k-d tree build included), ``wcs`` (true WCS),
    ``render`` (the whole render, selection included), ``write`` (image + truth FITS) and
    ``quadrant_total`` (wcs + select + render + write: the per-quadrant cost, counting the
    k-d tree build that a run pays once).  Also reports the
    object counts.
    """
    from pipeline.simulate.plan import DEFAULT_FIELDS, exposure_at_airmass
    field = DEFAULT_FIELDS[0] if field is None else field
    spec = exposure_at_airmass(cfg, field, 1.2)
    timings: dict = {}
    with _Stopwatch(timings, "sky"):
        sky = make_sky(cfg, [(field.fieldid, field.ra, field.dec)], cfg.simulation.seed,
                       mjd_range=(spec.obsmjd - 1, spec.obsmjd + 1))
    geom = quadrant_geometry(cfg.instrument, *ccd_qid_of_rcid(rcid))
    with _Stopwatch(timings, "wcs"):
        wcs, wcs_header, _ = true_quadrant_solution(spec, geom, cfg)
    with _Stopwatch(timings, "select"):
        for kind in ("stars", "galaxies", "transients"):
            sky.in_footprint(kind, wcs, (geom.ny, geom.nx))
    with _Stopwatch(timings, "render"):
        quadrant = render_quadrant(spec, geom, wcs, sky, cfg, wcs_header=wcs_header)
    with tempfile.TemporaryDirectory(prefix="skydiff-bench-sim-") as tmp:
        with _Stopwatch(timings, "write"):
            write_simulated_quadrant(quadrant, *quadrant_paths(tmp, spec, geom.ccdid, geom.qid))
    for suffix in ("", "_cpu"):
        timings[f"quadrant_total{suffix}"] = sum(timings[f"{k}{suffix}"] for k in ("wcs", "select", "render", "write"))
    kinds, counts = np.unique(quadrant.truth["kind"], return_counts=True)
    timings.update({f"n_{k}": int(c) for k, c in zip(kinds, counts)})
    return timings
