"""The drb network's NumPy scoring: the same arithmetic as the JAX network it was trained
as, input normalised from the stamps alone, model files and the ``[realbogus]`` section."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.config import load_config
from pipeline.simulate.drb_training import init_weights, jax_logits
from pipeline.subtraction.drb import (DrbModel, DrbModelError, load_default_drb_model, load_drb_model,
                                      normalise_triplets, tiles_to_images)


def _triplets(n: int, seed: int = 1) -> list[np.ndarray]:
    """Noise stamps with a point source in some, a sky level, and NaN off an image edge."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:63, :63]
    psf = np.exp(-0.5 * ((xx - 31) ** 2 + (yy - 31) ** 2) / 1.5 ** 2)
    cubes = []
    for sky, noise in ((300.0, 12.0), (0.0, 4.0), (0.0, 1.0)):
        cube = sky + noise * rng.normal(size=(n, 63, 63)) + rng.uniform(0, 50, n)[:, None, None] * noise * psf
        cube[0, :, :20] = np.nan
        cubes.append(cube.astype(np.float32))
    return cubes


def test_numpy_forward_pass_equals_the_jax_network():
    import jax.numpy as jnp

    tiles = normalise_triplets(*_triplets(24))
    weights = init_weights(seed=5)
    numpy_logits = DrbModel("test", weights).logits(tiles)
    jax_values = np.asarray(jax_logits({k: jnp.asarray(v) for k, v in weights.items()}, jnp.asarray(tiles)))
    assert np.allclose(numpy_logits, jax_values, rtol=1e-4, atol=1e-4)
    assert np.ptp(numpy_logits) > 0.1     # not a constant network


def test_normalisation_needs_only_the_stamps():
    science, reference, difference = _triplets(6)
    tiles = normalise_triplets(science, reference, difference)
    assert tiles.shape == (6, 21, 21, 3, 3, 3) and tiles.dtype == np.float32 and np.isfinite(tiles).all()
    images = tiles_to_images(tiles)
    assert np.all(images[0, :, :, :20] == 0)       # off the image
    assert np.all(np.abs(images) < 8)
    # each stamp on its own: a sky level and a gain (ADU per unit) do not change the input
    again = normalise_triplets(3.0 * science + 1000.0, reference * 0.5, difference)
    assert np.allclose(again, tiles, atol=1e-4)
    with pytest.raises(DrbModelError, match=r"\(N, 63, 63\) cutout cubes"):
        normalise_triplets(science[:, :61, :61], reference[:, :61, :61], difference[:, :61, :61])


def test_model_files_and_the_section(tmp_path):
    shipped = load_default_drb_model()
    assert load_drb_model(load_config().realbogus).version == shipped.version
    assert 0 < shipped.threshold < 1 and shipped.training["training"]["real"] > 1000
    path = tmp_path / "drb.npz"
    path.write_bytes(DrbModel("retrained-1", shipped.weights, 0.4, {"source": "test"}).to_bytes())
    model = load_drb_model(load_config(overrides={"realbogus": {"drb_model": str(path)}}).realbogus)
    assert (model.version, model.threshold, model.training) == ("retrained-1", 0.4, {"source": "test"})
    cubes = dict(zip(("science", "reference", "difference"), _triplets(5)))
    assert np.array_equal(model.score(cubes), shipped.score(cubes))
    (tmp_path / "bad.npz").write_bytes(b"not a model")
    with pytest.raises(DrbModelError, match="bad.npz"):
        DrbModel.read(tmp_path / "bad.npz")
    with pytest.raises(DrbModelError, match="absent.npz"):
        DrbModel.read(tmp_path / "absent.npz")
    with pytest.raises(DrbModelError, match="lacks weights"):
        DrbModel("x", {k: v for k, v in shipped.weights.items() if k != "dense_w"})
