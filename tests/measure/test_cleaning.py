"""SExtractor's CLEAN over neighbour pairs (pipeline.measure.cleaning) against sep's own all-pairs CLEAN."""
from __future__ import annotations

import numpy as np
import pytest
import sep

from pipeline.core.config import ExtractionConfig
from pipeline.measure.cleaning import clean_survivors

SIZE = 700


def _moffat_field(rng, n_stars, n_bright):
    """A crowded field of Moffat stars (beta 2.5, FWHM 2.2 px) with a few very bright ones,
    whose wings break up into spurious detections; sky 100 ADU, Poisson noise (gain 1)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    fwhm, beta = 2.2, 2.5
    alpha = fwhm / (2 * np.sqrt(2 ** (1 / beta) - 1))
    flux = np.concatenate([200 * rng.pareto(1.2, n_stars) + 150, rng.uniform(3e5, 3e6, n_bright)])
    x, y = rng.uniform(5, SIZE - 5, (2, len(flux)))
    image = np.full((SIZE, SIZE), 100.0)
    norm = (beta - 1) / (np.pi * alpha ** 2)
    for xi, yi, fi in zip(x, y, flux):
        half = 60 if fi > 1e5 else 12
        x0, x1 = max(0, int(xi) - half), min(SIZE, int(xi) + half + 1)
        y0, y1 = max(0, int(yi) - half), min(SIZE, int(yi) + half + 1)
        r2 = (xx[y0:y1, x0:x1] - xi) ** 2 + (yy[y0:y1, x0:x1] - yi) ** 2
        image[y0:y1, x0:x1] += fi * norm * (1 + r2 / alpha ** 2) ** -beta
    return (rng.poisson(image) - 100.0).astype(np.float32)


@pytest.fixture(scope="module")
def crowded():
    image = _moffat_field(np.random.default_rng(5), 2500, 6)
    rms = np.full(image.shape, 10.0, dtype=np.float32)
    bad = np.zeros(image.shape, dtype=bool)
    config = ExtractionConfig()
    kwargs = dict(err=rms, mask=bad, minarea=config.minarea, deblend_nthresh=config.deblend_nthresh,
                  deblend_cont=config.deblend_cont, filter_type="conv", segmentation_map=True)
    raw, segmap = sep.extract(image, config.detect_thresh, clean=False, **kwargs)
    cleaned, _ = sep.extract(image, config.detect_thresh, clean=True, **kwargs)
    return image, rms, config, raw, segmap, cleaned


def test_the_same_detections_as_seps_clean(crowded):
    image, rms, config, raw, segmap, cleaned = crowded
    survives = clean_survivors(raw, segmap, image, rms, config.detect_thresh, config.minarea)
    removed_by_sep = len(raw) - len(cleaned)
    assert removed_by_sep >= 20                     # the field does need cleaning
    ours = set(zip(raw["x"][survives].tolist(), raw["y"][survives].tolist()))
    seps = set(zip(cleaned["x"].tolist(), cleaned["y"].tolist()))
    assert seps <= set(zip(raw["x"].tolist(), raw["y"].tolist()))  # CLEAN only removes
    # sep lists an object's pixels in its scan's merge order, the segmentation map only gives
    # raster order, which moves a few objects' mthresh (see the module): a few faint
    # detections in a hundred may be judged otherwise, never a bright one.
    differ = ours ^ seps
    assert len(differ) <= 0.015 * len(raw), (len(differ), len(raw), removed_by_sep)
    flux = dict(zip(zip(raw["x"].tolist(), raw["y"].tolist()), raw["cflux"].tolist()))
    assert max(flux[xy] for xy in differ) < 500


def test_spurious_wing_detections_go_and_isolated_stars_stay(crowded):
    image, rms, config, raw, segmap, _ = crowded
    survives = clean_survivors(raw, segmap, image, rms, config.detect_thresh, config.minarea)
    # what is removed lies near a much brighter detection; a bright detection is never removed
    bright = raw["cflux"] > 2e4
    assert survives[bright].all()
    gone = np.flatnonzero(~survives)
    xy = np.column_stack([raw["x"], raw["y"]])
    for k in gone:
        d = np.hypot(*(xy - xy[k]).T)
        eaters = (d <= 10.0 * (raw["a"] + raw["a"][k])) & (raw["cflux"] > raw["cflux"][k])
        assert eaters.any()


def test_trivial_catalogues():
    config = ExtractionConfig()
    empty = np.zeros(0, dtype=[("x", "f8")])
    assert clean_survivors(empty, np.zeros((4, 4), np.int32), np.zeros((4, 4), np.float32),
                           np.ones((4, 4), np.float32), config.detect_thresh, config.minarea).shape == (0,)


def test_isolated_detections_have_no_pairs_and_all_stay():
    """Two stars far apart: no pair within reach, nothing to clean (this once raised IndexError)."""
    config = ExtractionConfig()
    image = np.full((200, 200), 100.0, np.float32)
    yy, xx = np.mgrid[0:200, 0:200]
    for x, y in ((30, 40), (170, 160)):
        image += 5000 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 2.0).astype(np.float32)
    rms = np.full(image.shape, 10.0, np.float32)
    objects, segmap = sep.extract(image - 100.0, config.detect_thresh, err=rms, minarea=config.minarea,
                                  clean=False, segmentation_map=True)
    assert len(objects) == 2
    kept = clean_survivors(objects, segmap, image - 100.0, rms, config.detect_thresh, config.minarea)
    assert kept.tolist() == [True, True]


def test_inconsistent_inputs_are_refused(crowded):
    """The compiled pixel loop indexes without bounds checks: what does not fit is refused."""
    image, rms, config, raw, segmap, _ = crowded
    with pytest.raises(ValueError, match="minarea must be >= 1"):
        clean_survivors(raw, segmap, image, rms, config.detect_thresh, 0)
    with pytest.raises(ValueError, match="not one of the detections"):     # a subset of the catalogue
        clean_survivors(raw[:100], segmap, image, rms, config.detect_thresh, config.minarea)
    with pytest.raises(ValueError, match="not one of the detections"):     # background pixels listed
        clean_survivors(raw, segmap, image, rms, config.detect_thresh, config.minarea,
                        pixels=np.arange(segmap.size))
    with pytest.raises(ValueError, match="off the"):
        clean_survivors(raw, segmap, image, rms, config.detect_thresh, config.minarea,
                        pixels=np.array([segmap.size + 5]))
    with pytest.raises(ValueError, match="one shape"):
        clean_survivors(raw, segmap, image, rms[:100], config.detect_thresh, config.minarea)
