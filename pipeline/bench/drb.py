"""Real-bogus scores against held-out simulated pairs: purity, completeness, ROC curves, speed.

``skydiff bench drb`` and ``skydiff realbogus show --roc`` share these.  The held-out pairs
(:data:`pipeline.simulate.drb_training.DRB_HELD_OUT_PLAN`) share no quadrant or seed with the
pairs either model was trained, validated or calibrated on.  Figures are over the candidates
at S/N >= 5 (|Scorr|, the detection statistic), where purity = real among those passing
and completeness = passing among the real.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from pipeline.simulate.drb_training import LabelledTriplets, purity_completeness
from pipeline.subtraction.drb import DrbModel
from pipeline.subtraction.realbogus import RealBogusModel, platt_probability

__all__ = ["score_held_out", "held_out_figures", "time_drb_scoring", "plot_roc", "bench_drb", "MIN_SNR", "RB_THRESHOLD",
           "DRB_MIN_PURITY", "DRB_MIN_COMPLETENESS"]

MIN_SNR = 5.0
RB_THRESHOLD = 0.5


def score_held_out(triplets: LabelledTriplets, rb_model: RealBogusModel, drb_model: DrbModel) -> dict:
    """``rb`` (calibrated when the model is) and ``drb`` of every held-out candidate."""
    if triplets.features is not None:
        rb = rb_model.score_features(triplets.features)
    else:   # triplets saved without features: the shipped forest's fractions
        rb = triplets.rb_forest if rb_model.calibration is None else platt_probability(triplets.rb_forest,
                                                                                           rb_model.calibration)
    drb = drb_model.score(_cubes(triplets)) if len(triplets) else np.zeros(0)
    return {"rb": np.asarray(rb, dtype=float), "drb": np.asarray(drb, dtype=float)}


def _cubes(triplets: LabelledTriplets) -> dict:
    return {"science": triplets.science, "reference": triplets.reference, "difference": triplets.difference}


def _roc(score: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(label, score)
    return fpr, tpr, float(roc_auc_score(label, score))


def held_out_figures(triplets: LabelledTriplets, scores: dict, rb_threshold: float, drb_threshold: float,
                     min_snr: float = MIN_SNR) -> dict:
    """Purity, completeness and ROC area of rb and drb on the candidates at S/N >= ``min_snr``."""
    keep = triplets.snr >= min_snr
    label = triplets.label[keep]
    figures = {"candidates": int(keep.sum()), "real": int(label.sum()), "bogus": int((label == 0).sum()),
               "images": int(np.unique(triplets.image).size)}
    for name, threshold in (("rb", rb_threshold), ("drb", drb_threshold)):
        score = scores[name][keep]
        purity, completeness = purity_completeness(score, label, threshold)
        _, _, auc = _roc(score, label)
        figures.update({f"{name}_threshold": round(float(threshold), 3), f"{name}_purity": round(purity, 4),
                        f"{name}_completeness": round(completeness, 4), f"{name}_roc_auc": round(auc, 4),
                        f"{name}_exactly_0": int(np.sum(scores[name][keep] == 0.0))})
    return figures


def time_drb_scoring(model: DrbModel, triplets: LabelledTriplets, n: int = 200, repeats: int = 30) -> dict:
    """Seconds to score ``n`` candidates (normalisation included): best and median of ``repeats``,
    on however many cores the caller allows (the benchmark pins one, and one BLAS thread)."""
    rows = np.arange(n) % max(len(triplets), 1)
    cubes = {k: np.ascontiguousarray(v[rows]) for k, v in _cubes(triplets).items()}
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.score(cubes)
        times.append(time.perf_counter() - t0)
    return {"score_200_best_s": round(min(times), 5), "score_200_median_s": round(float(np.median(times)), 5)}


def plot_roc(triplets: LabelledTriplets, scores: dict, thresholds: dict, path: str | os.PathLike,
             min_snr: float = MIN_SNR, title: str = "") -> Path:
    """ROC curves (completeness against the fraction of bogus passing) of rb and drb at
    S/N >= ``min_snr``, each with its threshold marked; one PNG, written atomically."""
    from pipeline.astrometry.plots import _save, plt

    keep = triplets.snr >= min_snr
    label = triplets.label[keep]
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    for name, colour in (("rb", "tab:blue"), ("drb", "tab:red")):
        score = scores[name][keep]
        fpr, tpr, auc = _roc(score, label)
        ax.plot(fpr, tpr, color=colour, label=f"{name} (area {auc:.4f})")
        passed = score >= thresholds[name]
        real = label == 1
        ax.plot([np.mean(passed[~real])], [np.mean(passed[real])], "o", color=colour,
                label=f"{name} >= {thresholds[name]:.2f}")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0.5, 1.001)
    ax.set_xlabel("bogus passing (false-positive rate)")
    ax.set_ylabel("real passing (completeness)")
    ax.set_title(title or f"held-out simulated pairs, S/N >= {min_snr:g}: {int(label.sum())} real, "
                          f"{int((label == 0).sum())} bogus", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


#: The issue's targets for drb on held-out pairs at S/N >= 5.
DRB_MIN_PURITY, DRB_MIN_COMPLETENESS = 0.97, 0.95


def bench_drb(cfg, rb_model: RealBogusModel | None = None, drb_model: DrbModel | None = None,
              held_out: LabelledTriplets | None = None) -> dict:
    """Figures of ``skydiff bench drb``: held-out purity/completeness of rb and drb (as text,
    with the drb targets' verdicts) and the seconds to score 200 candidates on one thread."""
    from threadpoolctl import threadpool_limits

    from pipeline.simulate.drb_training import DRB_HELD_OUT_PLAN, simulated_triplets
    from pipeline.subtraction.drb import load_drb_model
    from pipeline.subtraction.realbogus import load_model

    rb_model = rb_model if rb_model is not None else load_model(cfg.realbogus)
    drb_model = drb_model if drb_model is not None else load_drb_model(cfg.realbogus)
    held_out = held_out if held_out is not None else simulated_triplets(cfg, DRB_HELD_OUT_PLAN)
    scores = score_held_out(held_out, rb_model, drb_model)
    figures = held_out_figures(held_out, scores, RB_THRESHOLD, drb_model.threshold)
    out = {"held_out_quadrants": str([list(q) for q in DRB_HELD_OUT_PLAN.quadrants]),
           "drbversion": drb_model.version, "rbversion": rb_model.version,
           "candidates_snr_ge_5": f"{figures['candidates']} ({figures['real']} real, {figures['bogus']} bogus)"}
    for name in ("rb", "drb"):
        out[f"{name}_threshold"] = f"{figures[f'{name}_threshold']:.2f}"
        purity, completeness = figures[f"{name}_purity"], figures[f"{name}_completeness"]
        if name == "drb":
            out["drb_purity"] = f"{purity:.4f} (target >= {DRB_MIN_PURITY}: {'met' if purity >= DRB_MIN_PURITY else 'MISSED'})"
            out["drb_completeness"] = (f"{completeness:.4f} (target >= {DRB_MIN_COMPLETENESS}: "
                                       f"{'met' if completeness >= DRB_MIN_COMPLETENESS else 'MISSED'})")
        else:
            out["rb_purity"], out["rb_completeness"] = f"{purity:.4f}", f"{completeness:.4f}"
        out[f"{name}_roc_auc"] = f"{figures[f'{name}_roc_auc']:.4f}"
        out[f"{name}_exactly_0"] = str(figures[f"{name}_exactly_0"])
    with threadpool_limits(1):
        out.update(time_drb_scoring(drb_model, held_out))
    return out
