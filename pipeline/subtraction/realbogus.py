"""Real-bogus score of difference-image candidates: a random forest over their features.

ZTF's first real-bogus classifier (Mahabal et al. 2019) was a random forest over candidate
features; later ones learnt from the cutouts.  The features this pipeline measures already
separate the artefacts the simulator makes — cosmic rays and hot pixels (sharper than the
PSF, negative sharpness, large chi2), misregistration dipoles (negative pixels in the box,
low ``sumrat``), residuals of bright and saturated stars (a much brighter reference source
underneath or nearby, a flagged region close by), bad-pixel edges (``nbad``) — but not
linearly (a star's residual is bogus at a few percent of the star and real at tens of
percent), hence trees.

The forest is trained with scikit-learn (:mod:`pipeline.simulate.realbogus_training`) and stored as
plain node arrays in JSON; scoring walks those arrays with NumPy for all candidates at
once, so the shipped model does not depend on scikit-learn's version or its pickles.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np
from astropy.table import Table
from pipeline.core.config import RealBogusConfig
from pipeline.core.exits import BadInputError

__all__ = ["RB_FEATURES", "RealBogusConfig", "RealBogusModel", "RealBogusError", "feature_matrix", "fit_model",
           "load_default_model", "load_model", "model_summary", "DEFAULT_MODEL_RESOURCE", "calibrate_model",
           "platt_probability"]

DEFAULT_MODEL_RESOURCE = "data/rb_model.json"

#: Candidate flag bits used as features (pipeline.subtraction.candidates.CANDIDATE_FLAGS).
_MASKED, _SATURATED, _NEAR_FLAGGED, _EDGE, _NO_SHAPE = 1, 2, 4, 8, 16
#: Bits marking a published convention in place of a measurement; the features keep the
#: encoding the model was trained with (missing values, see :func:`feature_matrix`).
_THIN, _APERTURE_NONPOSITIVE, _NR_UNFIT = 32, 64, 128
_NO_COUNTERPART = -999.0    # ZTF's "no reference source within the search radius"

#: Feature names, in the order of :func:`feature_matrix`'s columns.
RB_FEATURES = (
    "log_abs_scorr",      # log10 |Scorr|
    "fwhm_ratio",         # fwhm on D / science PSF fwhm (0: a single hot pixel)
    "elong",
    "neg_fraction",       # nneg / box^2
    "nbad",
    "sumrat",
    "magdiff",            # magap - magpsf: extended or dipole residuals
    "log_chipsf",
    "sharpness",          # sharpnessdiff: negative for cosmic rays, hot pixels
    "log_distnr",         # log10 of the distance to the nearest reference source, px
    "contrast_nr",        # magpsf - magnr: > 0 when the reference source is brighter
    "negative",           # 1 for isdiffpos False
    "near_flagged",       # ZOGY-flagged pixels (masks, saturation) within the aperture
    "masked",             # masked or saturated pixels in the box
    "no_shape",
    "log_sigmapsf",
)

_NO_NEIGHBOUR_PX = 60.0     # distnr of candidates with no reference source within the search radius


class RealBogusError(BadInputError):
    """A model file that cannot be read, or candidates lacking the model's inputs."""


def _column(table: Table, name: str, default: float) -> np.ndarray:
    if name not in table.colnames:
        raise RealBogusError(f"candidates lack column {name!r} needed by the real-bogus features")
    values = np.asarray(table[name], dtype=np.float64)
    return np.where(np.isfinite(values), values, default)


def feature_matrix(candidates: Table, psf_fwhm) -> np.ndarray:
    """(N, len(RB_FEATURES)) features of candidates (columns of :func:`pipeline.subtraction.candidates.find_candidates`).

    ``psf_fwhm`` is the science image's PSF FWHM (px): a scalar, or one per candidate.
    The published columns carry ZTF's conventions where there was nothing to measure
    (distnr -999, magap 99, the local P_D's shape, SExtractor's floor for thin profiles,
    flagged in ``flagged``); the features see those as the missing values the model was
    trained with: no shape (fwhm 0, elong 10), a thin profile (fwhm 0, elong 10), no
    positive aperture flux (magdiff 0), no neighbour, a neighbour without a PSF fit
    (contrast 10: saturated in the reference).
    """
    psf_fwhm = np.asarray(psf_fwhm, dtype=np.float64)
    if not np.all(psf_fwhm > 0):
        raise RealBogusError(f"psf_fwhm must be positive, got {psf_fwhm}")
    if len(candidates) == 0:
        return np.zeros((0, len(RB_FEATURES)))
    box = 25.0
    flags = np.asarray(candidates["flagged"]).astype(np.int64)
    scorr = np.abs(_column(candidates, "scorr", 5.0))
    raw_distnr = np.asarray(candidates["distnr"], dtype=float)
    has_neighbour = np.isfinite(raw_distnr) & (raw_distnr != _NO_COUNTERPART)
    distnr = np.where(has_neighbour, raw_distnr, _NO_NEIGHBOUR_PX)
    magpsf = _column(candidates, "magpsf", 22.0)
    magnr = np.asarray(candidates["magnr"], dtype=float)
    magnr = np.where((flags & _NR_UNFIT) > 0, np.nan, magnr)
    # A matched reference source without a magnitude is saturated in the reference: bright.
    contrast = np.where(has_neighbour, np.where(np.isfinite(magnr), magpsf - magnr, 10.0), -5.0)
    no_shape = (flags & (_NO_SHAPE | _THIN)) > 0
    fwhm = np.where(no_shape, 0.0, _column(candidates, "fwhm", 0.0))
    elong = np.where(no_shape, 10.0, _column(candidates, "elong", 10.0))
    magdiff = np.where((flags & _APERTURE_NONPOSITIVE) > 0, 0.0, _column(candidates, "magdiff", 0.0))
    positive = np.asarray(candidates["isdiffpos"]).astype(bool)
    columns = [
        np.log10(np.maximum(scorr, 1e-3)),
        np.clip(fwhm / psf_fwhm, 0.0, 5.0),
        np.clip(elong, 1.0, 10.0),
        np.clip(_column(candidates, "nneg", 0.0), 0, box) / box,
        np.clip(_column(candidates, "nbad", 0.0), 0, box),
        np.clip(_column(candidates, "sumrat", 1.0), -1.0, 1.0),
        np.clip(magdiff, -3.0, 3.0),
        np.log10(np.clip(_column(candidates, "chipsf", 1.0), 1e-2, 1e5)),
        np.clip(_column(candidates, "sharpnessdiff", 0.0), -5.0, 5.0),
        np.log10(np.clip(distnr, 0.05, _NO_NEIGHBOUR_PX)),
        np.clip(contrast, -5.0, 10.0),
        (~positive).astype(np.float64),
        ((flags & _NEAR_FLAGGED) > 0).astype(np.float64),
        ((flags & (_MASKED | _SATURATED)) > 0).astype(np.float64),
        ((flags & _NO_SHAPE) > 0).astype(np.float64),
        np.log10(np.clip(_column(candidates, "sigmapsf", 1.0), 1e-4, 10.0)),
    ]
    return np.column_stack(columns)


@dataclass(frozen=True)
class RealBogusModel:
    """A forest of binary decision trees; the score is the mean of the trees' leaf values.

    Each tree is a dict of equal-length arrays over its nodes: ``feature`` (-1 at a leaf),
    ``threshold`` (go left when the feature is <= it), ``left``, ``right`` (child node
    indices) and ``value`` (fraction of real training candidates at the node, class-
    weighted).
    """

    version: str
    features: tuple[str, ...]
    trees: tuple[dict, ...]
    training: dict = field(default_factory=dict)
    calibration: dict | None = None     # Platt scaling of the trees' mean: {"a", "b", ...}

    def __post_init__(self):
        if tuple(self.features) != RB_FEATURES:
            raise RealBogusError(f"model {self.version} was trained on features {list(self.features)}, "
                                 f"this code computes {list(RB_FEATURES)}")
        if not self.trees:
            raise RealBogusError(f"model {self.version} has no trees")

    def score(self, candidates: Table, psf_fwhm: float) -> np.ndarray:
        """Real-bogus score per candidate (1: real): the calibrated probability when the
        model has a calibration, else the trees' mean."""
        return self.score_features(feature_matrix(candidates, psf_fwhm))

    def score_features(self, x: np.ndarray) -> np.ndarray:
        """:meth:`score` of a feature matrix."""
        fraction = self.forest_fraction(x)
        return fraction if self.calibration is None else platt_probability(fraction, self.calibration)

    def forest_fraction(self, x: np.ndarray) -> np.ndarray:
        """The trees' mean leaf value in [0, 1] (uncalibrated: many candidates get exactly 0)."""
        x = np.asarray(x, dtype=np.float64)
        total = np.zeros(x.shape[0])
        rows = np.arange(x.shape[0])
        for tree in self.trees:
            node = np.zeros(x.shape[0], dtype=np.int64)
            feature = tree["feature"]
            while True:
                f = feature[node]
                inner = f >= 0
                if not inner.any():
                    break
                go_left = x[rows, np.where(inner, f, 0)] <= tree["threshold"][node]
                node = np.where(inner, np.where(go_left, tree["left"][node], tree["right"][node]), node)
            total += tree["value"][node]
        return total / len(self.trees)

    def to_json(self) -> str:
        trees = [{"feature": t["feature"].tolist(), "threshold": [round(float(v), 6) for v in t["threshold"]],
                  "left": t["left"].tolist(), "right": t["right"].tolist(),
                  "value": [round(float(v), 5) for v in t["value"]]} for t in self.trees]
        record = {"version": self.version, "features": list(self.features), "training": self.training}
        if self.calibration is not None:
            record["calibration"] = self.calibration
        return json.dumps({**record, "trees": trees}, separators=(",", ":")) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "<model>") -> "RealBogusModel":
        try:
            d = json.loads(text)
            trees = []
            for t in d["trees"]:
                tree = {"feature": np.asarray(t["feature"], dtype=np.int64),
                        "threshold": np.asarray(t["threshold"], dtype=np.float64),
                        "left": np.asarray(t["left"], dtype=np.int64),
                        "right": np.asarray(t["right"], dtype=np.int64),
                        "value": np.asarray(t["value"], dtype=np.float64)}
                n = tree["feature"].size
                if any(a.shape != (n,) for a in tree.values()):
                    raise ValueError("a tree's node arrays differ in length")
                inner = tree["feature"] >= 0
                if (np.any(tree["feature"] >= len(d["features"]))
                        or np.any((tree["left"][inner] <= 0) | (tree["left"][inner] >= n))
                        or np.any((tree["right"][inner] <= 0) | (tree["right"][inner] >= n))):
                    raise ValueError("a tree refers to a node or feature that does not exist")
                trees.append(tree)
            calibration = d.get("calibration")
            if calibration is not None:
                calibration = {**calibration, "a": float(calibration["a"]), "b": float(calibration["b"])}
            return cls(version=str(d["version"]), features=tuple(d["features"]), trees=tuple(trees),
                       training=dict(d.get("training", {})), calibration=calibration)
        except (KeyError, TypeError, ValueError) as exc:
            raise RealBogusError(f"{source}: not a real-bogus model file ({exc})") from None

    @classmethod
    def read(cls, path: str | Path) -> "RealBogusModel":
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise RealBogusError(f"{path}: cannot read the real-bogus model ({exc.strerror})") from None
        return cls.from_json(text, str(path))


def _forest_logit(fraction: np.ndarray, n_trees: int) -> np.ndarray:
    """logit of the trees' mean, kept finite: 0 and 1 move half a tree inwards."""
    eps = 0.5 / max(n_trees, 1)
    p = np.clip(np.asarray(fraction, dtype=np.float64), eps, 1.0 - eps)
    return np.log(p / (1.0 - p))


def platt_probability(fraction: np.ndarray, calibration: dict) -> np.ndarray:
    """Calibrated probability of being real: ``1 / (1 + exp(-(a logit(f) + b)))`` of the
    trees' mean ``f`` (Platt scaling); strictly inside (0, 1)."""
    z = calibration["a"] * _forest_logit(fraction, int(calibration.get("n_trees", 100))) + calibration["b"]
    return 1.0 / (1.0 + np.exp(-z))


def calibrate_model(model: "RealBogusModel", fraction: np.ndarray, labels: np.ndarray, source: str) -> "RealBogusModel":
    """``model`` with a Platt calibration fitted (scikit-learn's logistic regression, no
    penalty) to its trees' mean ``fraction`` on held-out candidates with ``labels``.

    A forest's mean is no probability: a fifth of the demo's candidates got exactly 0, and
    class-balanced training shifts it towards real.  Platt scaling (a logistic function of
    the mean's logit) keeps the forest's ranking, so the ROC curve is unchanged, and maps it
    onto the observed fraction of real candidates, with no mass at exactly 0 or 1.
    """
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(labels, dtype=np.int64)
    if not (0 < y.sum() < y.size):
        raise RealBogusError("calibration needs both real and bogus held-out candidates")
    z = _forest_logit(fraction, len(model.trees))[:, None]
    fit = LogisticRegression(C=1e6, max_iter=1000).fit(z, y)   # C large: no penalty, in every version
    calibration = {"method": "platt", "a": round(float(fit.coef_[0, 0]), 6), "b": round(float(fit.intercept_[0]), 6),
                   "n_trees": len(model.trees), "candidates": int(y.size), "real": int(y.sum()), "source": source}
    return replace(model, calibration=calibration)


def fit_model(features: np.ndarray, labels: np.ndarray, version: str, n_trees: int = 100,
              min_samples_leaf: int = 3, seed: int = 0, training: dict | None = None) -> RealBogusModel:
    """Fit a class-balanced random forest (scikit-learn) and keep its trees as node arrays."""
    from sklearn.ensemble import RandomForestClassifier

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != len(RB_FEATURES) or x.shape[0] != y.size:
        raise RealBogusError(f"features must be (N, {len(RB_FEATURES)}) with N labels")
    if not (0 < y.sum() < y.size):
        raise RealBogusError("training needs both real and bogus examples")
    forest = RandomForestClassifier(n_estimators=n_trees, min_samples_leaf=min_samples_leaf,
                                    class_weight="balanced_subsample", random_state=seed, n_jobs=1)
    forest.fit(x, y)
    real_column = list(forest.classes_).index(1)
    trees = []
    for estimator in forest.estimators_:
        t = estimator.tree_
        counts = t.value[:, 0, :]
        value = counts[:, real_column] / np.maximum(counts.sum(axis=1), 1e-300)
        trees.append({"feature": np.where(t.children_left >= 0, t.feature, -1).astype(np.int64),
                      "threshold": t.threshold.astype(np.float64), "left": t.children_left.astype(np.int64),
                      "right": t.children_right.astype(np.int64), "value": value.astype(np.float64)})
    return RealBogusModel(version=version, features=RB_FEATURES, trees=tuple(trees), training=dict(training or {}))


def load_default_model() -> RealBogusModel:
    """The model shipped with the package (``pipeline/subtraction/data/rb_model.json``)."""
    resource = resources.files("pipeline.subtraction").joinpath(DEFAULT_MODEL_RESOURCE)
    try:
        text = resource.read_text()
    except (FileNotFoundError, OSError):
        raise RealBogusError(f"the shipped real-bogus model {DEFAULT_MODEL_RESOURCE} is missing from "
                             "the installation; train one with `skydiff realbogus train`") from None
    return RealBogusModel.from_json(text, DEFAULT_MODEL_RESOURCE)


def load_model(config: RealBogusConfig) -> RealBogusModel:
    """The model the ``[realbogus]`` section names: its ``model`` file, or the shipped model
    when that is empty.

    Raises
    ------
    RealBogusError
        The file cannot be read or holds no usable model.
    """
    return RealBogusModel.read(config.model) if config.model else load_default_model()


def model_summary(model: RealBogusModel) -> str:
    """Human-readable description: size, how often each feature splits, the training record."""
    splits = np.zeros(len(model.features), dtype=int)
    for tree in model.trees:
        used = tree["feature"][tree["feature"] >= 0]
        splits += np.bincount(used, minlength=len(model.features))
    nodes = sum(t["feature"].size for t in model.trees)
    lines = [f"real-bogus model {model.version}: random forest of {len(model.trees)} trees, {nodes} nodes",
             "  splits per feature:"]
    lines += [f"    {model.features[i]:<16} {splits[i]}" for i in np.argsort(-splits)]
    for key, value in model.training.items():
        lines.append(f"  training {key}: {value}")
    if model.calibration is None:
        lines.append("  calibration: none (rb is the trees' mean, not a probability)")
    else:
        lines.append("  calibration: " + ", ".join(f"{k} {v}" for k, v in model.calibration.items()))
    return "\n".join(lines)
