"""The extraction stage against the bare sep calls it is built on (``skydiff bench extraction``).

One simulated full quadrant (the configuration's sky: ``--density`` picks a preset) is
extracted by :func:`pipeline.measure.extract.extract_sources` and, in the same process and
alternately, by the four sep calls the stage is built on, with the stage's own settings:
the background and its RMS (the map subtracted), the detection (``sep.extract``, segmentation
map included, without sep's all-pairs CLEAN: the stage cleans over neighbour pairs,
:mod:`pipeline.measure.cleaning`, which counts as the stage's own work), the half-light
radii (``sep.flux_radius`` as :func:`pipeline.measure.extract.half_light_radii` calls it) and
the windowed positions (``sep.winpos``, the stage's window).  The bare calls get their float32 image and masks
ready-made, outside the clock; the stage's time is the whole call.  Alternating the two (and
which goes first) makes their ratio hold on a machine shared with other work, whose load
moves both alike.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from pipeline.core.config import Config, ExtractionConfig
from pipeline.core.image import MASK_BITS

__all__ = ["bare_sep_extraction", "bench_extraction"]


def bare_sep_extraction(data: np.ndarray, bad: np.ndarray, saturated: np.ndarray, gain: float,
                        config: ExtractionConfig) -> int:
    """The sep calls of the extraction stage alone, with its settings; returns the detections.

    Parameters
    ----------
    data : ndarray
        float32, C-ordered image (a copy: the background is subtracted in place).
    bad, saturated : ndarray of bool
        Pixels left out of everything, and saturated pixels (left out of the background).
    gain : float
        e-/ADU.
    config : ExtractionConfig
    """
    import sep

    from pipeline.measure.extract import half_light_radii

    sep.set_extract_pixstack(config.pixstack)
    sep.set_sub_object_limit(config.sub_object_limit)
    background = sep.Background(data, mask=bad | saturated, bw=config.background_mesh,
                                bh=config.background_mesh, fw=config.background_filter,
                                fh=config.background_filter)
    rms = background.rms()
    data -= background.back()
    objects, segmap = sep.extract(data, config.detect_thresh, err=rms, gain=gain, mask=bad,
                                  minarea=config.minarea, deblend_nthresh=config.deblend_nthresh,
                                  deblend_cont=config.deblend_cont, clean=False,
                                  filter_type="conv", segmentation_map=True)
    x, y, a = objects["x"], objects["y"], objects["a"]
    seg_id = np.arange(1, len(objects) + 1, dtype=np.int32)
    half_light = half_light_radii(data, x, y, a, bad, seg_id, segmap)
    half_light = np.where(np.isfinite(half_light), half_light, a)
    sigma = np.maximum(2.0 * half_light / 2.35, config.min_window_sigma)
    sep.winpos(data, x, y, sigma, mask=bad, subpix=0)
    return len(objects)


def bench_extraction(cfg: Config, rcid: int = 60, repeats: int = 4) -> dict:
    """Median seconds of the stage and of the bare sep calls on one quadrant, and their ratio.

    The image is simulated once (not timed); then stage and bare calls alternate
    ``repeats`` times, which of the two goes first alternating as well.  ``ratio_median`` is the median of the per-round ratios.
    """
    from pipeline.bench.astrometry import _simulated_image
    from pipeline.measure.extract import extract_sources
    from pipeline.simulate.plan import DEFAULT_FIELDS, exposure_at_airmass
    from pipeline.simulate.sky import make_sky

    field = DEFAULT_FIELDS[0]
    spec = exposure_at_airmass(cfg, field, 1.5)
    sky = make_sky(cfg, [(field.fieldid, field.ra, field.dec)], cfg.simulation.seed)
    image, _ = _simulated_image(cfg, sky, spec, rcid)
    meta, ecfg = image.meta, cfg.extraction
    mask = np.asarray(image.mask)
    finite = np.isfinite(image.data)
    bad = ~finite | ((mask & (MASK_BITS["BAD"] | MASK_BITS["EDGE"] | MASK_BITS["NAN"])) != 0)
    with np.errstate(invalid="ignore"):
        saturated = (image.data >= meta.saturate) | ((mask & (MASK_BITS["SATURATED"] | MASK_BITS["BLEED"])) != 0)
    fill = np.median(image.data[finite])
    stage_s, bare_s, ratios, steps = [], [], [], {}

    def stage():
        t0 = time.perf_counter()
        result = extract_sources(image.data, image.mask, meta.gain, meta.saturate, ecfg, read_noise=meta.readnoi)
        stage_s.append(time.perf_counter() - t0)
        for name, value in result.timings.items():
            steps.setdefault(name, []).append(value)
        return result

    def bare():
        data = np.array(np.where(finite, image.data, fill), dtype=np.float32, order="C")
        t0 = time.perf_counter()
        n = bare_sep_extraction(data, bad, saturated, meta.gain, ecfg)
        bare_s.append(time.perf_counter() - t0)
        return n

    for k in range(max(1, repeats)):
        # the order alternates too, so that neither side always runs on the other's warm caches
        if k % 2 == 0:
            result, n_bare = stage(), bare()
        else:
            n_bare, result = bare(), stage()
        ratios.append(stage_s[-1] / bare_s[-1])
    figures = {"stage_s": statistics.median(stage_s), "bare_sep_s": statistics.median(bare_s),
               "ratio_median": statistics.median(ratios), "ratio_worst": max(ratios)}
    figures.update({f"stage_{k}_s": statistics.median(v) for k, v in steps.items()})
    figures.update({"sky": cfg.simulation.sky_preset, "n_detected": result.n_detected,
                    "n_catalogue": len(result.catalog), "n_detected_bare": n_bare})
    return figures
