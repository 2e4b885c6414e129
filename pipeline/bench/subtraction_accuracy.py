"""The subtraction's accuracy against truth on fresh simulated quadrants
(``skydiff bench subtract-accuracy``): the figures issue 4 asks for.

For each quadrant a reference is coadded from five frames of an earlier season, and three
science images are subtracted from it: seeing worse than the reference (with a 0.2 px WCS
misregistration and 40 unmasked hot pixels), better than it, and about equal.  150 point
sources of S/N 3-60 are injected into each with the simulator's PSF.  Seeds differ from
those the shipped real-bogus model was trained on.  The science image's PSF, zero point and
registration come, as in the quadrant runner, from its calibration sources alone (detected
at ``[astrometry] calibration_detect_thresh``, at most ``calibration_sources`` of them
measured, the brightest).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
from scipy.spatial import cKDTree

from pipeline.core.config import Config, load_config

__all__ = ["CASES", "QUADRANTS", "validate_subtraction"]

QUADRANTS = ((42, 909), (0, 4242))
CASES = {"science_broader": dict(science_seeing=2.6, misregister_px=(0.2, -0.1), hot_pixels=40),
         "science_sharper": dict(science_seeing=1.55),
         "science_equal": dict(science_seeing=1.8)}


def _figures(pair, reference, result) -> dict:
    from pipeline.simulate.realbogus_training import label_candidates
    from pipeline.subtraction.zogy import measure_flux

    c, inj = result.candidates, pair.injected
    true_flux = np.asarray(inj["flux_adu"]) * 10 ** (-0.4 * (pair.zeropoint - result.zp_ref))
    _, flux_err = measure_flux(result.zogy, np.asarray(inj["x"]) - 1, np.asarray(inj["y"]) - 1)
    snr = true_flux / flux_err
    dist, idx = cKDTree(np.column_stack([c["xpos"], c["ypos"]])).query(np.column_stack([inj["x"], inj["y"]]))
    found = (dist <= 2) & np.asarray(c["isdiffpos"])[idx]
    bright, faint = snr >= 8, (snr >= 4.5) & (snr < 6)
    real = label_candidates(c, pair).astype(bool)
    rb = np.asarray(c["rb"])
    use = found & (snr >= 10)
    delta = np.asarray(c["magpsf"])[idx[use]] - (result.zp_ref - 2.5 * np.log10(true_flux[use]))
    pull = delta / np.asarray(c["sigmapsf"])[idx[use]]
    scorr = result.zogy.scorr
    rows, cols = np.mgrid[0:scorr.shape[0]:5, 0:scorr.shape[1]:5]
    grid = np.column_stack([cols.ravel(), rows.ravel()])
    truth = pair.truth
    d_truth, _ = cKDTree(np.column_stack([np.asarray(truth["x"]) - 1, np.asarray(truth["y"]) - 1])).query(grid)
    d_inj, _ = cKDTree(np.column_stack([np.asarray(inj["x"]) - 1, np.asarray(inj["y"]) - 1])).query(grid)
    free = (d_truth > 15) & (d_inj > 15) & ~result.zogy.flagged[rows, cols].ravel()
    values = scorr[rows, cols].ravel()[free]
    return {
        "science_fwhm_px": round(float(result.science.psf.fwhm), 2),
        "reference_fwhm_px": round(float(reference.psf.fwhm), 2),
        "found_snr8": f"{int(found[bright].sum())}/{int(bright.sum())}",
        "found_snr4.5-6": f"{int(found[faint].sum())}/{int(faint.sum())}",
        "false_rb05": int(((~real) & (rb >= 0.5)).sum()), "bogus": int((~real).sum()),
        "scorr_std": round(float(values[np.abs(values) < 5].std()), 4),
        "magpsf_bias": round(float(np.median(delta)), 4), "pull_std": round(float(pull.std()), 3),
        "zp_error": round(float(result.zp_science - pair.zeropoint), 4),
    }


def validate_subtraction(cfg: Config | None = None, quadrants=QUADRANTS, cases=None) -> dict:
    """Figures per quadrant and case (see the module docstring)."""
    from pipeline.astrometry.solve import calibration_extraction
    from pipeline.simulate.realbogus_training import subtract_pair
    from pipeline.simulate.pairs import PairOptions, pair_sky, simulate_science, simulated_reference

    cfg = load_config() if cfg is None else cfg
    cases = CASES if cases is None else cases
    report = {}
    for rcid, seed in quadrants:
        base = PairOptions(rcid=rcid, seed=seed, n_inject=150, snr_range=(3.0, 60.0))
        sky = pair_sky(cfg, base)
        reference = simulated_reference(cfg, base, sky)
        for name, options in cases.items():
            pair = simulate_science(cfg, replace(base, **options), sky)
            a = cfg.astrometry
            _, _, extraction = calibration_extraction(pair.science, cfg.extraction, a.calibration_sources,
                                                      a.calibration_detect_thresh, a.calibration_min_detections)
            result = subtract_pair(pair, reference, extraction=extraction)
            report[f"rcid{rcid}_{name}"] = _figures(pair, reference, result)
    return report
