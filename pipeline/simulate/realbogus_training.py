"""Training the real-bogus model on simulated pairs whose truth labels every candidate.

A candidate is *real* when it lies within ``match_radius_px`` of something that truly
changed between the reference and the science image: an injected point source, a simulated
transient or a variable star (:func:`pipeline.simulate.pairs.real_positions`); every other
candidate is *bogus*: cosmic rays, unmasked hot pixels, residuals of bright and saturated
stars, misregistration dipoles, PSF-mismatch residuals.  The pairs span the seeing
mismatches (reference sharper and broader than the science image), misregistrations up to
a few tenths of a pixel and unmasked hot pixels; each quadrant's reference is coadded once
and reused by its science images.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone

import numpy as np
from astropy.table import Table, vstack

from pipeline.core.config import Config
from pipeline.subtraction.realbogus import RB_FEATURES, RealBogusModel, feature_matrix, fit_model
from pipeline.subtraction.difference import SubtractionResult, subtract_images
from pipeline.simulate.pairs import (PairOptions, SimulatedPair, pair_sky, real_positions, simulate_science,
                                     simulated_reference)

__all__ = ["TrainingPlan", "DEFAULT_PLAN", "label_candidates", "subtract_pair", "training_candidates",
           "train_model"]

log = logging.getLogger("skydiff.simulate")


@dataclass(frozen=True)
class TrainingPlan:
    """Which simulated pairs make the training set.

    Each entry of ``quadrants`` is (rcid, seed): one reference; each entry of ``science``
    is (seeing arcsec, misregistration px, hot pixels): one science image per reference.
    """

    quadrants: tuple[tuple[int, int], ...] = ((21, 101), (42, 202), (60, 303))
    science: tuple[tuple[float, float, int], ...] = ((1.3, 0.0, 0), (2.0, 0.15, 60), (2.8, 0.0, 60),
                                                       (2.2, 0.3, 0))
    n_inject: int = 120
    snr_range: tuple[float, float] = (3.0, 150.0)
    match_radius_px: float = 2.0
    n_trees: int = 100
    # Real candidates fainter than this stay out of the training: an isolated point source
    # at |Scorr| 5-6.5 looks exactly like a noise peak, and Gaussian noise alone makes about
    # four peaks of each sign above 5 sigma on a quadrant (the Euler characteristic of a
    # smooth field), far more than the true transients at that level; trained on them the
    # model would pass those noise peaks as real.
    min_real_scorr: float = 6.5


DEFAULT_PLAN = TrainingPlan()


def label_candidates(candidates: Table, pair: SimulatedPair, radius_px: float = 2.0) -> np.ndarray:
    """1 for candidates within ``radius_px`` of a real change, else 0."""
    if len(candidates) == 0:
        return np.zeros(0, dtype=np.int8)
    real = real_positions(pair)
    if len(real) == 0:
        return np.zeros(len(candidates), dtype=np.int8)
    dx = np.asarray(candidates["xpos"], dtype=float)[:, None] - real[None, :, 0]
    dy = np.asarray(candidates["ypos"], dtype=float)[:, None] - real[None, :, 1]
    return (np.hypot(dx, dy).min(axis=1) <= radius_px).astype(np.int8)


def subtract_pair(pair: SimulatedPair, reference, score_realbogus: bool = True, rb_model=None,
                  extraction=None) -> SubtractionResult:
    """:func:`pipeline.subtraction.difference.subtract_images` on a simulated pair's science image
    (with ``extraction`` of it when given, as the quadrant runner hands over the astrometry
    stage's)."""
    sci = pair.science
    band = pair.cfg.instrument.filters[sci.meta.filter]
    return subtract_images(sci.data, sci.mask, sci.header, sci.wcs, reference, band, sci.meta.gain,
                           sci.meta.saturate, pair.cfg.instrument.pixel_scale_arcsec, gaia=pair.gaia,
                           read_noise=sci.meta.readnoi, rb_model=rb_model, score_realbogus=score_realbogus,
                           extraction=extraction)


def training_candidates(cfg: Config, plan: TrainingPlan = DEFAULT_PLAN) -> Table:
    """Every candidate of the plan's simulated pairs, with ``label`` (1 real), ``psf_fwhm``
    (the science image's) and ``image`` (running number)."""
    tables = []
    for rcid, seed in plan.quadrants:
        base = PairOptions(rcid=rcid, seed=seed, n_inject=plan.n_inject, snr_range=plan.snr_range)
        t0 = time.perf_counter()
        sky = pair_sky(cfg, base)
        reference = simulated_reference(cfg, base, sky)
        log.info("training: reference of rcid %d (seed %d) in %.1f s", rcid, seed, time.perf_counter() - t0)
        for k, (seeing, shift, hot) in enumerate(plan.science):
            options = replace(base, science_seeing=seeing, misregister_px=(shift, -0.5 * shift),
                              hot_pixels=hot, seed=seed + 10 * (k + 1))
            pair = simulate_science(cfg, options, sky)
            result = subtract_pair(pair, reference, score_realbogus=False)
            table = result.candidates.copy()
            table.meta = {}
            table["label"] = label_candidates(table, pair, plan.match_radius_px)
            table["psf_fwhm"] = float(result.science.psf.fwhm)
            table["image"] = len(tables)
            tables.append(table)
            log.info("training: rcid %d seeing %.1f\" shift %.2f px hot %d: %d real, %d bogus", rcid, seeing,
                     shift, hot, int(table["label"].sum()), int(len(table) - table["label"].sum()))
    return vstack(tables, metadata_conflicts="silent")


def train_model(cfg: Config, version: str, plan: TrainingPlan = DEFAULT_PLAN) -> RealBogusModel:
    """Simulate the plan's pairs, label their candidates and fit the model.

    The model's ``training`` record holds the counts, the plan and the training-set
    confusion figures at rb = 0.5 (optimistic: measured on the training set itself; the
    tests measure the model on pairs it has not seen).
    """
    t0 = time.perf_counter()
    table = training_candidates(cfg, plan)
    faint_real = (np.asarray(table["label"]) == 1) & (np.abs(np.asarray(table["scorr"])) < plan.min_real_scorr)
    table = table[~faint_real]
    x = feature_matrix(table, np.asarray(table["psf_fwhm"]))
    y = np.asarray(table["label"])
    model = fit_model(x, y, version, n_trees=plan.n_trees)
    rb = model.score_features(x)
    real, bogus = y == 1, y == 0
    counts = {"images": int(len(np.unique(table["image"]))), "real": int(real.sum()), "bogus": int(bogus.sum()),
              "faint_real_left_out": int(faint_real.sum())}
    model = replace(model, training={
        **counts, "features": list(RB_FEATURES), "n_trees": plan.n_trees,
        "plan": {"quadrants": [list(q) for q in plan.quadrants], "science": [list(s) for s in plan.science],
                 "n_inject": plan.n_inject, "snr_range": list(plan.snr_range),
                 "min_real_scorr": plan.min_real_scorr},
        "real_kept_at_0.5": round(float(np.mean(rb[real] >= 0.5)), 4) if real.any() else None,
        "bogus_passed_at_0.5": round(float(np.mean(rb[bogus] >= 0.5)), 4) if bogus.any() else None,
        "trained_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seconds": round(time.perf_counter() - t0, 1)})
    return model
