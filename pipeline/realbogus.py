"""Real-bogus score of difference-image candidates: a logistic model over their features.

ZTF's first real-bogus classifiers (Mahabal et al. 2019, Duev et al. 2019) learnt from
candidate features, then from the cutouts.  The features this pipeline measures already
separate the artefacts the simulator makes — cosmic rays and hot pixels (sharper than the
PSF, negative sharpness), misregistration dipoles (negative pixels in the box, low
``sumrat``), bright-star residuals (a much brighter reference source underneath),
bad-pixel edges (``nbad``) — so a regularised logistic regression (statsmodels GLM) on a
few transformed features does the job, is trained in minutes from simulated pairs, and
ships as a small JSON file whose coefficients anyone can read.

The shipped model lives in ``pipeline/data/rb_model.json``; :func:`load_default_model`
reads it and ``skydiff realbogus train`` (see :mod:`pipeline.realbogus_train`) makes it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
from astropy.table import Table

__all__ = ["RB_FEATURES", "RealBogusModel", "RealBogusError", "feature_matrix", "fit_model",
           "load_default_model", "model_summary", "DEFAULT_MODEL_RESOURCE"]

DEFAULT_MODEL_RESOURCE = "data/rb_model.json"

#: Feature names, in the order of :func:`feature_matrix`'s columns.
RB_FEATURES = (
    "log_abs_scorr",      # log10 |Scorr|
    "fwhm_ratio",         # fwhm on D / science PSF fwhm
    "fwhm_ratio_dev2",    # (fwhm_ratio - 1)^2: too sharp and too broad are both suspect
    "elong",
    "neg_fraction",       # nneg / box^2
    "nbad",
    "sumrat",
    "magdiff",            # magap - magpsf: extended or dipole residuals
    "log_chipsf",
    "sharpness",          # sharpnessdiff: negative for cosmic rays, hot pixels
    "near_source",        # exp(-(distnr / 2")^2): on top of a reference source
    "brighter_below",     # near_source * (magpsf - magnr), clipped: a bright star underneath
    "negative",           # 1 for isdiffpos False
)


class RealBogusError(ValueError):
    """A model file that cannot be read, or candidates lacking the model's inputs."""


def _column(table: Table, name: str, default: float) -> np.ndarray:
    if name not in table.colnames:
        raise RealBogusError(f"candidates lack column {name!r} needed by the real-bogus features")
    values = np.asarray(table[name], dtype=np.float64)
    return np.where(np.isfinite(values), values, default)


def feature_matrix(candidates: Table, psf_fwhm: float) -> np.ndarray:
    """(N, len(RB_FEATURES)) features of candidates (columns of :func:`pipeline.candidates.find_candidates`)."""
    if not psf_fwhm > 0:
        raise RealBogusError(f"psf_fwhm must be positive, got {psf_fwhm}")
    box = 25.0
    scorr = np.abs(_column(candidates, "scorr", 5.0))
    ratio = np.clip(_column(candidates, "fwhm", psf_fwhm) / psf_fwhm, 0.0, 5.0)
    distnr = _column(candidates, "distnr", 99.0)
    near = np.exp(-(distnr / 2.0) ** 2)
    brighter = near * np.clip(_column(candidates, "magpsf", 20.0) - _column(candidates, "magnr", 30.0),
                              -5.0, 10.0)
    positive = np.asarray(candidates["isdiffpos"]).astype(bool) if len(candidates) else np.zeros(0, bool)
    columns = [
        np.log10(np.maximum(scorr, 1e-3)), ratio, (ratio - 1.0) ** 2,
        np.clip(_column(candidates, "elong", 1.0), 1.0, 5.0),
        np.clip(_column(candidates, "nneg", 0.0), 0, box) / box,
        np.clip(_column(candidates, "nbad", 0.0), 0, box),
        np.clip(_column(candidates, "sumrat", 1.0), -1.0, 1.0),
        np.clip(_column(candidates, "magdiff", 0.0), -3.0, 3.0),
        np.log10(np.clip(_column(candidates, "chipsf", 1.0), 1e-2, 1e4)),
        np.clip(_column(candidates, "sharpnessdiff", 0.0), -3.0, 3.0),
        near, brighter, (~positive).astype(np.float64),
    ]
    return np.column_stack(columns) if len(candidates) else np.zeros((0, len(RB_FEATURES)))


@dataclass(frozen=True)
class RealBogusModel:
    """A logistic model: ``rb = 1 / (1 + exp(-(b0 + sum b_i (f_i - mean_i) / scale_i)))``."""

    version: str
    features: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coefficients: np.ndarray
    intercept: float
    training: dict = field(default_factory=dict)

    def __post_init__(self):
        if tuple(self.features) != RB_FEATURES:
            raise RealBogusError(f"model {self.version} was trained on features {list(self.features)}, "
                                 f"this code computes {list(RB_FEATURES)}")

    def score(self, candidates: Table, psf_fwhm: float) -> np.ndarray:
        """Real-bogus score in [0, 1] per candidate (1: real)."""
        x = feature_matrix(candidates, psf_fwhm)
        return self.score_features(x)

    def score_features(self, x: np.ndarray) -> np.ndarray:
        z = self.intercept + ((x - self.mean) / self.scale) @ self.coefficients
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))

    def to_json(self) -> str:
        return json.dumps({
            "version": self.version, "features": list(self.features), "mean": self.mean.tolist(),
            "scale": self.scale.tolist(), "coefficients": self.coefficients.tolist(),
            "intercept": self.intercept, "training": self.training}, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "<model>") -> "RealBogusModel":
        try:
            d = json.loads(text)
            n = len(d["features"])
            arrays = [np.asarray(d[k], dtype=np.float64) for k in ("mean", "scale", "coefficients")]
            if any(a.shape != (n,) for a in arrays) or not np.all(arrays[1] > 0):
                raise ValueError("mean, scale, coefficients must each have one positive-scale entry per feature")
            return cls(version=str(d["version"]), features=tuple(d["features"]), mean=arrays[0],
                       scale=arrays[1], coefficients=arrays[2], intercept=float(d["intercept"]),
                       training=dict(d.get("training", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise RealBogusError(f"{source}: not a real-bogus model file ({exc})") from None

    @classmethod
    def read(cls, path: str | Path) -> "RealBogusModel":
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise RealBogusError(f"{path}: cannot read the real-bogus model ({exc.strerror})") from None
        return cls.from_json(text, str(path))


def fit_model(features: np.ndarray, labels: np.ndarray, version: str, l2: float = 1e-3,
              training: dict | None = None) -> RealBogusModel:
    """Fit the logistic model with a ridge penalty (statsmodels GLM, binomial family).

    The penalty keeps the fit finite when a feature separates the classes perfectly (as
    several do on simulated artefacts), where the plain maximum-likelihood fit diverges.
    """
    import statsmodels.api as sm

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != len(RB_FEATURES) or x.shape[0] != y.size:
        raise RealBogusError(f"features must be (N, {len(RB_FEATURES)}) with N labels")
    if not (0 < y.sum() < y.size):
        raise RealBogusError("training needs both real and bogus examples")
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    design = sm.add_constant((x - mean) / scale, has_constant="add")
    # Balance the classes: bogus candidates outnumber real ones many times.
    weights = np.where(y > 0, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    fit = sm.GLM(y, design, family=sm.families.Binomial(), freq_weights=weights).fit_regularized(
        alpha=l2, L1_wt=0.0, maxiter=500)
    params = np.asarray(fit.params, dtype=np.float64)
    return RealBogusModel(version=version, features=RB_FEATURES, mean=mean, scale=scale,
                          coefficients=params[1:], intercept=float(params[0]), training=dict(training or {}))


def load_default_model() -> RealBogusModel:
    """The model shipped with the package (``pipeline/data/rb_model.json``)."""
    resource = resources.files("pipeline").joinpath(DEFAULT_MODEL_RESOURCE)
    try:
        text = resource.read_text()
    except (FileNotFoundError, OSError):
        raise RealBogusError(f"the shipped real-bogus model {DEFAULT_MODEL_RESOURCE} is missing from "
                             "the installation; train one with `skydiff realbogus train`") from None
    return RealBogusModel.from_json(text, DEFAULT_MODEL_RESOURCE)


def model_summary(model: RealBogusModel) -> str:
    """Human-readable coefficients, largest first."""
    order = np.argsort(-np.abs(model.coefficients))
    lines = [f"real-bogus model {model.version}: intercept {model.intercept:+.3f}"]
    lines += [f"  {model.features[i]:<16} {model.coefficients[i]:+.3f}" for i in order]
    for key, value in model.training.items():
        lines.append(f"  training {key}: {value}")
    return "\n".join(lines)

