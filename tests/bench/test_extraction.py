"""The extraction benchmark's bare sep calls are the stage's own."""
from __future__ import annotations

import numpy as np

from pipeline.bench.extraction import bare_sep_extraction
from pipeline.core.config import ExtractionConfig
from pipeline.measure.extract import extract_sources


def test_bare_calls_detect_what_the_stage_detects():
    rng = np.random.default_rng(8)
    yy, xx = np.mgrid[0:300, 0:300]
    image = np.full((300, 300), 600.0)
    for x, y, flux in zip(rng.uniform(10, 290, 150), rng.uniform(10, 290, 150), rng.uniform(2e3, 2e5, 150)):
        image += flux / (2 * np.pi * 1.2 ** 2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 1.2 ** 2))
    image = rng.poisson(image * 6.2) / 6.2
    config = ExtractionConfig()
    stage = extract_sources(image, None, 6.2, 50000.0, config)
    bad = np.zeros(image.shape, bool)
    n_bare = bare_sep_extraction(np.array(image, dtype=np.float32), bad, image >= 50000.0, 6.2, config)
    assert n_bare == stage.n_detected > 100
