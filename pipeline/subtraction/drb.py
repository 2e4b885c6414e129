"""Deep real-bogus score (``drb``): a small convolutional network over the candidate's cutout triplet.

ZTF's ``drb`` is braai (Duev et al. 2019), a VGG-style network over the 63 x 63 science,
reference and difference stamps.  This one is smaller and downsamples early (three 3 x 3
convolutions of stride 3, 2 and 2, a dense layer), so 200 candidates score in about 15 ms
on one core with NumPy alone (``skydiff bench drb``): the layers run as im2col + one matrix
product each, through reused scratch buffers.  Training needs a deep-learning framework
(JAX, the ``train`` extra; :mod:`pipeline.simulate.drb_training`); scoring needs only NumPy,
and the weights ship as a ``.npz`` file with the model's ``drbversion`` and its training record.

Input: the triplet exactly as the alert cutouts carry it (:func:`pipeline.subtraction.candidates.cutout_stamps`,
NaN off the image), each stamp normalised on its own by :func:`normalise_triplets`, so a
broker can score the cutouts of an alert packet as the pipeline did.
"""
from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Mapping

import numpy as np

from pipeline.core.exits import BadInputError

__all__ = ["DRB_STAMP", "DRB_LAYERS", "DRB_HIDDEN", "DrbModel", "DrbModelError", "normalise_triplets",
           "tiles_to_images",
           "load_default_drb_model", "load_drb_model", "DEFAULT_DRB_RESOURCE", "drb_summary"]

DEFAULT_DRB_RESOURCE = "data/drb_model.npz"
DRB_STAMP = 63
_SOFT_LIMIT = 8.0   # normalised pixels are compressed into (-8, 8)
_BORDER = 2   # width (px) of the stamp's frame whose quantiles set its zero and scale

#: The network: (output channels, stride) of each 3 x 3 'valid' convolution (ReLU after
#: each), then a dense layer of ``DRB_HIDDEN`` units (ReLU) and one logistic output.
#: 63 -> 21 -> 10 -> 4 pixels.  The first convolution tiles the stamp into 3 x 3 blocks
#: (stride 3), the central block centred on the candidate: the cheapest way to downsample
#: early while every pixel still reaches a learnt filter at full resolution.
DRB_LAYERS = ((16, 3), (24, 2), (32, 2))
DRB_HIDDEN = 32


#: Candidates scored at a time: bounds the scratch memory (about 30 MB) whatever the count.
_CHUNK = 256
_scratch = threading.local()


def _buffer(name: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """A per-thread scratch array reused between calls.  Fresh memory costs a page fault per
    4 kB on first touch, which for these few-megabyte intermediates took as long as all the
    arithmetic of the scoring (14 ms instead of 7 for 200 triplets' normalisation)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    size = int(np.prod(shape))
    buffer = buffers.get(name)
    if buffer is None or buffer.size < size or buffer.dtype != dtype:
        buffer = buffers[name] = np.empty(size, dtype=dtype)
    return buffer[:size].reshape(shape)


class DrbModelError(BadInputError):
    """A drb model file that cannot be read, or stamps the model cannot score."""


def _frame(stamps: np.ndarray) -> np.ndarray:
    """The pixels of each stamp's outer frame, (N, n_frame): far from the candidate."""
    b = _BORDER
    n = stamps.shape[0]
    # Every other pixel along the frame: 244 of its 488 pixels give the quantiles to a few
    # percent at half the cost of the partial sort.
    return np.concatenate([stamps[:, :b, ::2].reshape(n, -1), stamps[:, -b:, ::2].reshape(n, -1),
                           stamps[:, b:-b:2, :b].reshape(n, -1), stamps[:, b:-b:2, -b:].reshape(n, -1)], axis=1)


def _frame_zero_scale(stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median and robust sigma (interquartile range / 1.349) of each stamp's frame.

    The frames are sorted (NaN last: pixels off the image) and read at each one's own count
    of finite pixels; NumPy's vectorised sort of all rows at once is ten times faster than
    a partition for three quantiles.  A stamp with fewer than 10 finite frame pixels gets
    zero 0 and scale 1.
    """
    ordered = np.sort(_frame(stamps), axis=1)
    count = ordered.shape[1] - np.isnan(ordered).sum(axis=1)
    rows = np.arange(ordered.shape[0])
    q25, q50, q75 = (ordered[rows, np.clip(np.round(q * (count - 1)).astype(np.int64), 0, None)]
                     for q in (0.25, 0.5, 0.75))
    usable = count >= 10
    scale = np.where(usable, (q75 - q25) / np.float32(1.349), 1.0)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0).astype(np.float32)
    zero = np.where(usable & np.isfinite(q50), q50, 0.0).astype(np.float32)
    return zero, scale


def normalise_triplets(science, reference, difference, out: np.ndarray | None = None) -> np.ndarray:
    """Network input of N triplets of stamps (science, reference, difference), as 3 x 3 tiles.

    Each stamp on its own: the median of its outer frame (2 px wide) is subtracted and the
    result divided by the frame's robust sigma (interquartile range / 1.349), then compressed
    by ``z / (1 + |z| / 8)`` (linear for the noise, bright and saturated stars within +-8; a
    third of the cost of ``arcsinh``); pixels off the image (NaN) become 0.  Only the stamps
    are needed, so the cutouts of an alert packet normalise exactly as the pipeline's do.

    Returns
    -------
    ndarray
        float32 (N, 21, 21, 3, 3, 3): [n, i, j, kh, kw, c] is stamp c's pixel
        (row 3 i + kh, column 3 j + kw).  The first layer of the network tiles the stamps
        in 3 x 3 blocks, and gathering the blocks while the stamps are copied anyway saves
        the most expensive copy of the scoring (:func:`tiles_to_images` undoes it).
        Written into ``out`` when given.
    """
    cubes = [np.asarray(a, dtype=np.float32) for a in (science, reference, difference)]
    if len({c.shape for c in cubes}) != 1 or cubes[0].ndim != 3 or cubes[0].shape[1:] != (DRB_STAMP, DRB_STAMP):
        raise DrbModelError(f"drb needs three aligned (N, {DRB_STAMP}, {DRB_STAMP}) cutout cubes, got shapes "
                            f"{[c.shape for c in cubes]}")
    n, side = cubes[0].shape[0], DRB_STAMP // 3
    out = np.empty((n, side, side, 3, 3, 3), dtype=np.float32) if out is None else out
    z, soft = _buffer("z", cubes[0].shape), _buffer("soft", cubes[0].shape)
    nan = _buffer("nan", cubes[0].shape, np.bool_)
    for channel, cube in enumerate(cubes):
        zero, scale = _frame_zero_scale(cube)
        np.subtract(cube, zero[:, None, None], out=z)
        z /= scale[:, None, None]
        np.abs(z, out=soft)
        soft *= np.float32(1.0 / _SOFT_LIMIT)
        soft += np.float32(1.0)
        z /= soft
        np.isnan(z, out=nan)
        z[nan] = 0.0
        np.copyto(out[..., channel], z.reshape(n, side, 3, side, 3).transpose(0, 1, 3, 2, 4))
    return out


def tiles_to_images(tiles: np.ndarray) -> np.ndarray:
    """(N, 3, 63, 63) stamps of :func:`normalise_triplets`' tiles (for plots and checks)."""
    n, side = tiles.shape[0], tiles.shape[1]
    return np.ascontiguousarray(tiles.transpose(0, 5, 1, 3, 2, 4).reshape(n, 3, 3 * side, 3 * side))


def _conv_valid(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray, stride: int, name: str) -> np.ndarray:
    """3 x 3 'valid' convolution of NHWC ``x`` + bias, ReLU, as im2col + one matrix product.

    ``kernel`` is (3, 3, C_in, C_out) (JAX's HWIO); the patches are gathered as (kh, kw, C)
    to match, into scratch buffers named after ``name``.  NumPy has no convolution that runs
    as fast on a batch of small images (scipy.signal convolves one 2-D plane at a time), hence this.
    """
    n, h, w, c = x.shape
    kh, kw = kernel.shape[:2]
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    s0, s1, s2, s3 = x.strides
    patches = np.lib.stride_tricks.as_strided(x, shape=(n, ho, wo, kh, kw, c),
                                              strides=(s0, s1 * stride, s2 * stride, s1, s2, s3), writeable=False)
    columns = _buffer(name + "_columns", (n * ho * wo, kh * kw * c))
    np.copyto(columns.reshape(n, ho, wo, kh, kw, c), patches)
    out = np.matmul(columns, kernel.reshape(kh * kw * c, -1), out=_buffer(name, (n * ho * wo, kernel.shape[3])))
    out += bias
    np.maximum(out, 0.0, out=out)
    return out.reshape(n, ho, wo, -1)


@dataclass(frozen=True)
class DrbModel:
    """A trained drb network: its weights (``conv{i}_w`` HWIO, ``conv{i}_b``, ``dense_w``,
    ``dense_b``, ``out_w``, ``out_b``), ``version`` (the alerts' ``drbversion``), the
    ``threshold`` at which it was benchmarked and its ``training`` record."""

    version: str
    weights: Mapping[str, np.ndarray]
    threshold: float = 0.5
    training: dict = field(default_factory=dict)

    def __post_init__(self):
        expected = {f"conv{i}_{p}" for i in range(len(DRB_LAYERS)) for p in "wb"} | {
            "dense_w", "dense_b", "out_w", "out_b"}
        missing = expected - set(self.weights)
        if missing:
            raise DrbModelError(f"drb model {self.version} lacks weights {sorted(missing)}")
        c_in = 3
        for i, (c_out, _) in enumerate(DRB_LAYERS):
            if self.weights[f"conv{i}_w"].shape != (3, 3, c_in, c_out):
                raise DrbModelError(f"drb model {self.version}: conv{i}_w has shape "
                                    f"{self.weights[f'conv{i}_w'].shape}, expected {(3, 3, c_in, c_out)}")
            c_in = c_out
        if DRB_LAYERS[0][1] != 3 or DRB_STAMP % 3:
            raise DrbModelError("the first drb layer must tile the stamp in 3 x 3 blocks")
        if not 0 < self.threshold < 1:
            raise DrbModelError(f"drb model {self.version}: threshold {self.threshold} is not in (0, 1)")

    def logits(self, tiles: np.ndarray) -> np.ndarray:
        """Network output before the logistic function, for :func:`normalise_triplets`' tiles."""
        if len(tiles) > _CHUNK:
            return np.concatenate([self.logits(tiles[i:i + _CHUNK]) for i in range(0, len(tiles), _CHUNK)])
        tiles = np.ascontiguousarray(tiles, dtype=np.float32)
        n, side = tiles.shape[0], tiles.shape[1]
        # The first layer (3 x 3, stride 3) is one product of the tiles, gathered as
        # (kh, kw, C) like the HWIO kernel; NHWC from here on.
        w0 = self.weights["conv0_w"].reshape(27, -1)
        x = np.matmul(tiles.reshape(n * side * side, 27), w0, out=_buffer("conv0", (n * side * side, w0.shape[1])))
        x += self.weights["conv0_b"]
        np.maximum(x, 0.0, out=x)
        x = x.reshape(n, side, side, -1)
        for i, (_, stride) in enumerate(DRB_LAYERS[1:], start=1):
            x = _conv_valid(x, self.weights[f"conv{i}_w"], self.weights[f"conv{i}_b"], stride, f"conv{i}")
        hidden = np.maximum(x.reshape(x.shape[0], -1) @ self.weights["dense_w"] + self.weights["dense_b"], 0.0)
        return (hidden @ self.weights["out_w"] + self.weights["out_b"])[:, 0]

    def score_input(self, x: np.ndarray) -> np.ndarray:
        """drb in (0, 1) of :func:`normalise_triplets`' tiles (1: real)."""
        if len(x) == 0:
            return np.zeros(0)
        return (1.0 / (1.0 + np.exp(-self.logits(x).astype(np.float64))))

    def score(self, cutouts: Mapping[str, np.ndarray]) -> np.ndarray:
        """drb of every candidate's triplet (``science``, ``reference``, ``difference`` cubes, (N, 63, 63)),
        in chunks of 256 candidates through scratch buffers."""
        try:
            cubes = [cutouts[name] for name in ("science", "reference", "difference")]
        except KeyError as exc:
            raise DrbModelError(f"drb needs science, reference and difference cutouts; {exc} is missing") from None
        n = len(cubes[0])
        scores = [np.zeros(0)]
        side = DRB_STAMP // 3
        for start in range(0, n, _CHUNK):
            part = [np.asarray(c[start:start + _CHUNK]) for c in cubes]
            tiles = _buffer("tiles", (len(part[0]), side, side, 3, 3, 3))
            scores.append(self.score_input(normalise_triplets(*part, out=tiles)))
        return np.concatenate(scores)

    def to_bytes(self) -> bytes:
        """The model as an ``.npz`` archive: weights, and a JSON ``meta`` (version, threshold, training)."""
        meta = json.dumps({"version": self.version, "threshold": self.threshold, "layers": DRB_LAYERS,
                           "hidden": DRB_HIDDEN, "training": self.training})
        buffer = io.BytesIO()
        np.savez_compressed(buffer, meta=np.array(meta),
                            **{k: np.asarray(v, dtype=np.float32) for k, v in self.weights.items()})
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<drb model>") -> "DrbModel":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                meta = json.loads(str(archive["meta"]))
                weights = {k: np.ascontiguousarray(archive[k], dtype=np.float32) for k in archive.files if k != "meta"}
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise DrbModelError(f"{source}: not a drb model file ({exc})") from None
        if [tuple(layer) for layer in meta.get("layers", ())] != list(DRB_LAYERS) or meta.get("hidden") != DRB_HIDDEN:
            raise DrbModelError(f"{source}: drb model has layers {meta.get('layers')} / hidden {meta.get('hidden')}, "
                                f"this code runs {list(DRB_LAYERS)} / {DRB_HIDDEN}")
        return cls(version=str(meta["version"]), weights=weights, threshold=float(meta["threshold"]),
                   training=dict(meta.get("training", {})))

    @classmethod
    def read(cls, path: str | Path) -> "DrbModel":
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise DrbModelError(f"{path}: cannot read the drb model ({exc.strerror})") from None
        return cls.from_bytes(data, str(path))


def load_default_drb_model() -> DrbModel:
    """The drb model shipped with the package (``pipeline/subtraction/data/drb_model.npz``)."""
    resource = resources.files("pipeline.subtraction").joinpath(DEFAULT_DRB_RESOURCE)
    try:
        data = resource.read_bytes()
    except (FileNotFoundError, OSError):
        raise DrbModelError(f"the shipped drb model {DEFAULT_DRB_RESOURCE} is missing from the installation; "
                            "train one with `skydiff realbogus train-drb`") from None
    return DrbModel.from_bytes(data, DEFAULT_DRB_RESOURCE)


def load_drb_model(config) -> DrbModel:
    """The model ``[realbogus] drb_model`` names, or the shipped one when that is empty."""
    return DrbModel.read(config.drb_model) if config.drb_model else load_default_drb_model()


def drb_summary(model: DrbModel) -> str:
    """Human-readable description: layers, parameter count, threshold, the training record."""
    n_params = sum(int(np.asarray(w).size) for w in model.weights.values())
    layers = ", ".join(f"conv3x3/{s} {c}" for c, s in DRB_LAYERS)
    lines = [f"drb model {model.version}: {layers}, dense {DRB_HIDDEN}; {n_params} parameters; "
             f"threshold {model.threshold:.3f}"]
    for key, value in model.training.items():
        lines.append(f"  training {key}: {value}")
    return "\n".join(lines)
