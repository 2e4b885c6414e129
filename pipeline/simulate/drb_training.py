"""Labelled cutout triplets for the deep real-bogus model (``drb``), and its training.

Triplets come from simulated pairs whose truth labels every candidate (as for the feature
model, :mod:`pipeline.simulate.realbogus_training`): *real* within ``match_radius_px`` of an
injected point source, a simulated transient or a variable star; *bogus* otherwise: cosmic
rays, unmasked hot pixels, unmasked hot or dead column segments, a glow along the readout
edges, residuals of bright and saturated stars, registration dipoles (misregistrations up
to 0.35 px) and noise peaks.  An injected point source with no counterpart in the reference
is also what an asteroid looks like in one triplet, so asteroids need no separate kind.

Or they come from a folder of labelled cutouts (:func:`folder_triplets`), so a survey can
train on its own scanned candidates: ``FOLDER/real/*.fits`` and ``FOLDER/bogus/*.fits``,
each file holding ``SCIENCE``, ``REFERENCE`` and ``DIFFERENCE`` image extensions of one
(63, 63) stamp or a (N, 63, 63) cube, as ``skydiff subtract`` writes ``cutouts.fits``.

Training (:func:`train_drb`) needs JAX and optax (the ``train`` extra); the trained weights
are stored for the NumPy forward pass of :class:`pipeline.subtraction.drb.DrbModel`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pipeline.core.config import Config
from pipeline.core.exits import BadInputError, PipelineError
from pipeline.subtraction.drb import (DRB_HIDDEN, DRB_LAYERS, DRB_STAMP, DrbModel, normalise_triplets)

__all__ = ["DrbPlan", "DRB_TRAINING_PLAN", "DRB_VALIDATION_PLAN", "DRB_HELD_OUT_PLAN", "LabelledTriplets",
           "simulated_triplets", "folder_triplets", "write_folder_triplets", "split_validation", "train_drb", "init_weights",
           "jax_logits", "purity_completeness", "require_training_framework", "DrbTrainingError", "TrainingFrameworkMissing"]

log = logging.getLogger("skydiff.simulate")

_CUBES = ("science", "reference", "difference")


class DrbTrainingError(BadInputError):
    """Labelled triplets that cannot train a model (names the folder or file)."""


class TrainingFrameworkMissing(PipelineError):
    """JAX/optax, needed to train (not to score), are not installed."""

    exit_status = 75


@dataclass(frozen=True)
class DrbPlan:
    """Which simulated pairs make a set of labelled triplets.

    Each entry of ``quadrants`` is (rcid, seed): one reference coadd; each entry of
    ``science`` is (seeing arcsec, misregistration px, unmasked hot pixels, unmasked bad
    column segments, readout-edge glow in sky sigmas): one science image per reference.
    """

    quadrants: tuple[tuple[int, int], ...]
    science: tuple[tuple[float, float, int, int, float], ...] = (
        (1.3, 0.0, 0, 0, 0.0), (2.0, 0.15, 80, 12, 0.0), (2.8, 0.0, 80, 0, 6.0), (2.2, 0.3, 0, 12, 4.0),
        (1.6, 0.35, 40, 6, 8.0), (2.5, 0.1, 120, 20, 0.0))
    n_inject: int = 200
    snr_range: tuple[float, float] = (3.0, 200.0)
    match_radius_px: float = 2.0


#: Training, validation (early stopping, the threshold, the rb calibration) and held-out
#: (benchmark only) pairs: distinct quadrants and seeds, none shared with the test suite's.
DRB_TRAINING_PLAN = DrbPlan(quadrants=((21, 1101), (42, 1202), (60, 1303), (7, 1404), (33, 1505)))
DRB_VALIDATION_PLAN = DrbPlan(quadrants=((50, 2606),), science=DrbPlan.science[1:5])
DRB_HELD_OUT_PLAN = DrbPlan(quadrants=((12, 3707), (55, 3808)), science=DrbPlan.science[:4])


@dataclass(frozen=True)
class LabelledTriplets:
    """Raw (unnormalised) cutout cubes (N, 63, 63) with labels (1 real) and, for simulated
    triplets, each candidate's |Scorr|, the shipped feature model's uncalibrated score (the
    forest's fraction of trees) and its features (:data:`pipeline.subtraction.realbogus.RB_FEATURES`;
    NaN, NaN and None from folders), and its image number."""

    science: np.ndarray
    reference: np.ndarray
    difference: np.ndarray
    label: np.ndarray
    snr: np.ndarray
    rb_forest: np.ndarray
    image: np.ndarray
    features: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.label.size)

    def subset(self, rows) -> "LabelledTriplets":
        return LabelledTriplets(*(np.asarray(getattr(self, f))[rows] for f in (
            "science", "reference", "difference", "label", "snr", "rb_forest", "image")),
            features=None if self.features is None else self.features[rows])

    @staticmethod
    def concatenate(parts: list["LabelledTriplets"]) -> "LabelledTriplets":
        offset, images = 0, []
        for p in parts:
            images.append(p.image + offset)
            offset += int(p.image.max()) + 1 if len(p) else 0
        features = None if any(p.features is None for p in parts) else np.concatenate([p.features for p in parts])
        return LabelledTriplets(*(np.concatenate([getattr(p, f) for p in parts]) for f in (
            "science", "reference", "difference", "label", "snr", "rb_forest")), image=np.concatenate(images),
            features=features)

    def counts(self) -> dict:
        return {"real": int(self.label.sum()), "bogus": int((self.label == 0).sum()),
                "images": int(np.unique(self.image).size)}


def simulated_triplets(cfg: Config, plan: DrbPlan) -> LabelledTriplets:
    """Every candidate of the plan's simulated pairs with its cutouts, label, |Scorr| and forest score."""
    from pipeline.simulate.pairs import PairOptions, pair_sky, simulate_science, simulated_reference
    from pipeline.simulate.realbogus_training import label_candidates, subtract_pair
    from pipeline.subtraction.realbogus import feature_matrix, load_default_model

    forest = load_default_model()
    parts = []
    for rcid, seed in plan.quadrants:
        base = PairOptions(rcid=rcid, seed=seed, n_inject=plan.n_inject, snr_range=plan.snr_range)
        t0 = time.perf_counter()
        sky = pair_sky(cfg, base)
        reference = simulated_reference(cfg, base, sky)
        log.info("drb triplets: reference of rcid %d (seed %d) in %.1f s", rcid, seed, time.perf_counter() - t0)
        for k, (seeing, shift, hot, columns, glow) in enumerate(plan.science):
            options = replace(base, science_seeing=seeing, misregister_px=(shift, -0.5 * shift), hot_pixels=hot,
                              bad_columns=columns, edge_glow_sigma=glow, seed=seed + 10 * (k + 1))
            pair = simulate_science(cfg, options, sky)
            result = subtract_pair(pair, reference, score_realbogus=False)
            table = result.candidates
            label = label_candidates(table, pair, plan.match_radius_px)
            features = feature_matrix(table, float(result.science.psf.fwhm))
            parts.append(LabelledTriplets(
                *(np.asarray(result.cutouts[c], dtype=np.float32) for c in _CUBES), label=label.astype(np.int8),
                snr=np.abs(np.asarray(table["scorr"], dtype=np.float64)), rb_forest=forest.forest_fraction(features),
                image=np.zeros(len(table), dtype=np.int32), features=features))
            log.info("drb triplets: rcid %d seeing %.1f\" shift %.2f hot %d columns %d glow %.0f: %d real, %d bogus",
                     rcid, seeing, shift, hot, columns, glow, int(label.sum()), int(len(label) - label.sum()))
    return LabelledTriplets.concatenate(parts)


def _read_cutout_file(path: Path) -> list[np.ndarray]:
    from astropy.io import fits

    try:
        with fits.open(path) as hdul:
            cubes = []
            for name in _CUBES:
                data = np.asarray(hdul[name.upper()].data, dtype=np.float32)
                cubes.append(data[None] if data.ndim == 2 else data)
    except (OSError, ValueError) as exc:
        raise DrbTrainingError(f"{path}: not a readable FITS cutout file ({exc})") from None
    except KeyError as exc:
        raise DrbTrainingError(f"{path}: lacks the {exc} extension (SCIENCE, REFERENCE, DIFFERENCE needed)") from None
    if len({c.shape for c in cubes}) != 1 or cubes[0].ndim != 3 or cubes[0].shape[1:] != (DRB_STAMP, DRB_STAMP):
        raise DrbTrainingError(f"{path}: cutouts must be aligned {DRB_STAMP} x {DRB_STAMP} stamps, got "
                               f"{[c.shape for c in cubes]}")
    return cubes


def folder_triplets(folder: str | Path) -> LabelledTriplets:
    """Labelled triplets of ``folder/real/*.fits`` and ``folder/bogus/*.fits`` (each file one image group)."""
    folder = Path(folder)
    parts = []
    for label, sub in ((1, "real"), (0, "bogus")):
        files = sorted((folder / sub).glob("*.fits")) + sorted((folder / sub).glob("*.fits.gz"))
        if not files:
            raise DrbTrainingError(f"{folder / sub}: no labelled cutout files (*.fits) found")
        for path in files:
            sci, ref, diff = _read_cutout_file(path)
            n = sci.shape[0]
            parts.append(LabelledTriplets(sci, ref, diff, label=np.full(n, label, dtype=np.int8),
                                          snr=np.full(n, np.nan), rb_forest=np.full(n, np.nan),
                                          image=np.zeros(n, dtype=np.int32)))
    return LabelledTriplets.concatenate(parts)


def write_folder_triplets(triplets: LabelledTriplets, folder: str | Path) -> None:
    """Write ``triplets`` as a labelled cutout folder (one file per label and image)."""
    from astropy.io import fits
    from pipeline.formats.atomic import write_fits_atomic

    folder = Path(folder)
    for label, sub in ((1, "real"), (0, "bogus")):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for image in np.unique(triplets.image):
            rows = (triplets.label == label) & (triplets.image == image)
            if not rows.any():
                continue
            hdus = [fits.PrimaryHDU()] + [fits.ImageHDU(getattr(triplets, c)[rows], name=c.upper()) for c in _CUBES]
            write_fits_atomic(fits.HDUList(hdus), folder / sub / f"image{int(image):04d}.fits")


def split_validation(triplets: LabelledTriplets, fraction: float, seed: int = 0
                     ) -> tuple[LabelledTriplets, LabelledTriplets]:
    """(training, validation): about ``fraction`` of each label's files held out whole (the
    candidates of one image are alike), or of its candidates where a label has too few files."""
    rng = np.random.default_rng(seed)
    held_rows = np.zeros(len(triplets), dtype=bool)
    for label in (0, 1):
        rows = triplets.label == label
        images = np.unique(triplets.image[rows])
        n_held = int(round(fraction * images.size))
        if 1 <= n_held < images.size:
            held_rows |= rows & np.isin(triplets.image, rng.choice(images, n_held, replace=False))
        else:
            held_rows |= rows & (rng.random(len(triplets)) < fraction)
    return triplets.subset(~held_rows), triplets.subset(held_rows)


# --- the network in JAX (training only) -------------------------------------------------------

def require_training_framework():
    try:
        import jax
        import jax.numpy as jnp
        import optax
    except ImportError as exc:
        raise TrainingFrameworkMissing(f"training drb needs JAX and optax ({exc.name} is not installed): "
                                       "pip install 'skydiff[train]'") from None
    return jax, jnp, optax


def init_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """He-initialised weights of the drb network (NumPy float32)."""
    rng = np.random.default_rng(seed)
    weights, c_in, side = {}, 3, DRB_STAMP
    for i, (c_out, stride) in enumerate(DRB_LAYERS):
        weights[f"conv{i}_w"] = (rng.normal(0, np.sqrt(2.0 / (9 * c_in)), (3, 3, c_in, c_out))).astype(np.float32)
        weights[f"conv{i}_b"] = np.zeros(c_out, np.float32)
        c_in, side = c_out, (side - 3) // stride + 1
    flat = side * side * c_in
    weights["dense_w"] = rng.normal(0, np.sqrt(2.0 / flat), (flat, DRB_HIDDEN)).astype(np.float32)
    weights["dense_b"] = np.zeros(DRB_HIDDEN, np.float32)
    weights["out_w"] = rng.normal(0, np.sqrt(1.0 / DRB_HIDDEN), (DRB_HIDDEN, 1)).astype(np.float32)
    weights["out_b"] = np.zeros(1, np.float32)
    return weights


def jax_logits(params, tiles):
    """The network of :meth:`pipeline.subtraction.drb.DrbModel.logits` in JAX (the same
    arithmetic: a product of the 3 x 3 tiles, then 'valid' strided convolutions in NHWC)."""
    jax, jnp, _ = require_training_framework()
    n, side = tiles.shape[0], tiles.shape[1]
    x = tiles.reshape(n, side, side, 27) @ params["conv0_w"].reshape(27, -1) + params["conv0_b"]
    x = jax.nn.relu(x)
    for i, (_, stride) in enumerate(DRB_LAYERS[1:], start=1):
        x = jax.lax.conv_general_dilated(x, params[f"conv{i}_w"], (stride, stride), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        x = jax.nn.relu(x + params[f"conv{i}_b"])
    hidden = jax.nn.relu(x.reshape(n, -1) @ params["dense_w"] + params["dense_b"])
    return (hidden @ params["out_w"] + params["out_b"])[:, 0]


def _dihedral(cubes: list[np.ndarray], k: int, flip: bool) -> list[np.ndarray]:
    """The same rotation by k x 90 deg (and flip) of every stamp: the sky has no preferred
    orientation, so the 8 symmetries multiply the training examples."""
    out = [np.rot90(c, k, axes=(1, 2)) for c in cubes]
    return [o[:, :, ::-1] for o in out] if flip else out


def purity_completeness(score: np.ndarray, label: np.ndarray, threshold: float) -> tuple[float, float]:
    """(purity, completeness) of ``score >= threshold`` against ``label`` (NaN where undefined)."""
    passed = score >= threshold
    real = label == 1
    purity = float((passed & real).sum() / passed.sum()) if passed.any() else float("nan")
    completeness = float((passed & real).sum() / real.sum()) if real.any() else float("nan")
    return purity, completeness


def train_drb(train: LabelledTriplets, validation: LabelledTriplets, version: str, epochs: int = 30,
              batch: int = 128, learning_rate: float = 2e-3, seed: int = 0, source: str = "simulated",
              max_seconds: float | None = None) -> DrbModel:
    """Train the drb network (Adam, class-balanced cross-entropy, random dihedral
    augmentation) and keep the weights of the epoch with the lowest validation loss.

    The threshold is the one of best validation F1 (:func:`_choose_threshold`).  ``max_seconds`` stops training early
    (for tests).

    Raises
    ------
    TrainingFrameworkMissing
        JAX or optax are not installed.
    DrbTrainingError
        A set lacks real or bogus examples.
    """
    jax, jnp, optax = require_training_framework()
    for name, part in (("training", train), ("validation", validation)):
        if not (0 < part.label.sum() < len(part)):
            raise DrbTrainingError(f"the {name} triplets need both real and bogus examples, got {part.counts()}")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    y = train.label.astype(np.float32)
    weight_real = 0.5 * len(y) / y.sum()
    weight_bogus = 0.5 * len(y) / (len(y) - y.sum())
    cubes = [train.science, train.reference, train.difference]
    val_x = jnp.asarray(normalise_triplets(validation.science, validation.reference, validation.difference))
    val_y = jnp.asarray(validation.label.astype(np.float32))
    params = {k: jnp.asarray(v) for k, v in init_weights(seed).items()}
    steps_per_epoch = max(1, len(y) // batch)
    schedule = optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch, alpha=0.05)
    optimiser = optax.adamw(schedule, weight_decay=1e-4)
    state = optimiser.init(params)

    def loss_fn(p, x, t, w):
        return jnp.sum(w * optax.sigmoid_binary_cross_entropy(jax_logits(p, x), t)) / jnp.sum(w)

    @jax.jit
    def step(p, s, x, t, w):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, t, w)
        updates, s = optimiser.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    @jax.jit
    def evaluate(p):
        logits = jax_logits(p, val_x)
        w = jnp.where(val_y > 0, weight_real, weight_bogus)
        return jnp.sum(w * optax.sigmoid_binary_cross_entropy(logits, val_y)) / jnp.sum(w), logits

    best = (np.inf, None, -1)
    history = []
    for epoch in range(epochs):
        order = rng.permutation(len(y))
        losses = []
        for b in range(steps_per_epoch):
            rows = np.sort(order[b * batch:(b + 1) * batch])
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            sci, ref, diff = _dihedral([c[rows] for c in cubes], k, flip)
            x = normalise_triplets(sci, ref, diff)
            t = y[rows]
            w = np.where(t > 0, weight_real, weight_bogus).astype(np.float32)
            params, state, loss = step(params, state, x, t, w)
            losses.append(float(loss))
        val_loss, _ = evaluate(params)
        val_loss = float(val_loss)
        history.append((round(float(np.mean(losses)), 4), round(val_loss, 4)))
        log.info("drb epoch %d: training loss %.4f, validation loss %.4f (%.0f s)", epoch + 1, np.mean(losses),
                 val_loss, time.perf_counter() - t0)
        if val_loss < best[0]:
            best = (val_loss, {k: np.asarray(v) for k, v in params.items()}, epoch + 1)
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break
    weights = best[1]
    model = DrbModel(version=version, weights=weights, threshold=0.5)
    val_score = model.score_input(np.asarray(val_x))
    threshold = _choose_threshold(val_score, validation.label)
    purity, completeness = purity_completeness(val_score, validation.label, threshold)
    training = {
        "source": source, "trained_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "training": train.counts(), "validation": validation.counts(), "epochs_run": len(history),
        "best_epoch": best[2], "batch": batch, "learning_rate": learning_rate, "seed": seed,
        "augmentation": "random rotation by k x 90 deg and flip per batch",
        "loss_per_epoch": history, "validation_purity": round(purity, 4),
        "validation_completeness": round(completeness, 4), "seconds": round(time.perf_counter() - t0, 1)}
    return replace(model, threshold=threshold, training=training)


def _choose_threshold(score: np.ndarray, label: np.ndarray) -> float:
    """The threshold in [0.05, 0.95] (steps of 0.01) with the highest validation F1, the
    harmonic mean of purity and completeness (the lowest such; 0.5 when none is defined)."""
    best, chosen = -1.0, 0.5
    for threshold in np.round(np.arange(0.05, 0.951, 0.01), 2):
        purity, completeness = purity_completeness(score, label, threshold)
        if not (np.isfinite(purity) and np.isfinite(completeness)) or purity + completeness == 0:
            continue
        f1 = 2 * purity * completeness / (purity + completeness)
        if f1 > best + 1e-9:
            best, chosen = f1, float(threshold)
    return chosen
