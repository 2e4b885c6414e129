"""Timing of the ZOGY step on a full quadrant-sized synthetic pair, pinned to one core."""
from __future__ import annotations

import math
import os
import time

import numpy as np
import scipy.fft as sfft

from pipeline.bench.cpu import pinned_to_one_core
from pipeline.subtraction.zogy import ZogyConfig, zogy_subtract, zogy_subtract_tiled

__all__ = ["bench_zogy"]


def _gaussian_stamp(sigma: float, size: int = 31) -> np.ndarray:
    r = np.arange(size) - size // 2
    stamp = np.exp(-(r[None, :] ** 2 + r[:, None] ** 2) / (2 * sigma**2))
    return stamp / stamp.sum()


def _synthetic_pair(shape: tuple[int, int], psf_new: np.ndarray, psf_ref: np.ndarray,
                    seed: int, n_stars: int = 5000):
    """Registered pair: stars (flux ratio 0.8), sky noise, a deeper reference."""
    rng = np.random.default_rng(seed)
    points = np.zeros(shape, dtype=np.float32)
    ys = rng.integers(0, shape[0], n_stars)
    xs = rng.integers(0, shape[1], n_stars)
    np.add.at(points, (ys, xs), (10 ** rng.uniform(2.5, 5.5, n_stars)).astype(np.float32))
    spectrum = sfft.rfft2(points)
    images = []
    for psf, scale, sigma in ((psf_new, 0.8, 22.0), (psf_ref, 1.0, 11.0)):
        pad = np.zeros(shape, dtype=np.float32)
        h = psf.shape[0] // 2
        pad[:psf.shape[0], :psf.shape[1]] = psf
        pad = np.roll(pad, (-h, -h), axis=(0, 1))
        image = sfft.irfft2(spectrum * sfft.rfft2(pad), s=shape) * scale
        image += rng.normal(0, sigma, shape).astype(np.float32)
        images.append(image.astype(np.float32))
    return images[0], images[1], 22.0, 11.0


def bench_zogy(shape: tuple[int, int] = (3080, 3072), repeats: int = 3, seed: int = 0,
               config: ZogyConfig = ZogyConfig(psf_error=0.0)) -> dict:
    """Time :func:`zogy_subtract` (one tile) and :func:`zogy_subtract_tiled` (constant
    PSF, ``config.tile`` tiles) on one core, with source and astrometric noise terms
    (pure ZOGY by default: no PSF-model error term, as the README's figure was measured).

    The process is pinned to one CPU (the least busy one) for the measurement and
    restored after; the best of ``repeats`` warm runs is kept for each variant, with
    its wall time per stage and its process CPU time (``total_cpu``: on a loaded
    machine the wall time includes waiting for the core).

    Returns
    -------
    dict
        ``{"shape", "cpu", "loadavg_before", "fft_floor": s,
        "whole": {stage: s, ..., "total": s}, "tiled": {...}, "tiles": n}``;
        ``fft_floor`` is the bare 4 forward + 4 inverse transforms at the padded size; stage names are those of
        :attr:`pipeline.subtraction.zogy.ZogyResult.timings`.
    """
    psf_new, psf_ref = _gaussian_stamp(2.0), _gaussian_stamp(1.5)
    new, ref, sigma_new, sigma_ref = _synthetic_pair(shape, psf_new, psf_ref, seed)
    args = dict(sigma_new=sigma_new, sigma_ref=sigma_ref, fz_new=0.8, fz_ref=1.0,
                astrometric_sigma=(0.05, 0.05), gain_new=1.0, gain_ref=4.0, config=config)
    with pinned_to_one_core() as cpu:
        report: dict = {"shape": tuple(shape), "cpu": cpu, "loadavg_before": os.getloadavg()}
        fft_shape = tuple(sfft.next_fast_len(n + 2 * config.overlap, real=True)
                          for n in shape)
        report["fft_floor"] = _fft_floor(np.resize(new, fft_shape), repeats)
        for label, run in (
                ("whole", lambda: zogy_subtract(new, ref, psf_new, psf_ref, **args)),
                ("tiled", lambda: zogy_subtract_tiled(new, ref, lambda x, y: psf_new,
                                                      lambda x, y: psf_ref, **args))):
            run()                                  # warm-up: FFT plans, page faults
            best = None
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                result = run()
                wall, cpu_time = time.perf_counter() - t0, time.process_time() - c0
                if best is None or wall < best["total"]:
                    best = dict(result.timings, total=wall, total_cpu=cpu_time)
            report[label] = best
            if label == "tiled":
                report["tiles"] = len(result.tiles)
    return report


def _fft_floor(image: np.ndarray, repeats: int) -> float:
    """Best time of the bare transforms ZOGY needs at this size (4 forward, 4 inverse)."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(4):
            spectrum = sfft.rfft2(image, workers=1)
        for _ in range(4):
            sfft.irfft2(spectrum, s=image.shape, workers=1)
        best = min(best, time.perf_counter() - t0)
    return best
