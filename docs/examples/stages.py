"""The pipeline's stages called one by one from Python, as a notebook would (``# %%`` cells).

Each stage is a function over arrays, tables and a WCS with its configuration section; nothing
is written between them.  The data come from a workspace (``skydiff init``, or the one
``skydiff demo`` leaves): its Gaia store (``paths.catalogs``), distortion prior
(``paths.priors/prior.fits``, when there) and references (``paths.references``).

Run::

    python docs/examples/stages.py --config WORKSPACE/skydiff.toml QUADRANT.fits [--truth TRUTH.fits]

``QUADRANT.fits`` is a quadrant image of the input contract or an IPAC ``sciimg`` (with its
``mskimg``); ``--truth`` (the simulator's truth file of that image) compares the candidates
with the simulated transients.  ``tests/docs/test_example.py`` runs it on the test survey.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", help="quadrant image (contract file or IPAC sciimg)")
    parser.add_argument("--config", required=True, help="the workspace's skydiff.toml")
    parser.add_argument("--truth", help="the simulator's truth file of the image")
    args = parser.parse_args(argv)

    # %% Configuration: the workspace's data roots over the embedded defaults.
    import pipeline  # noqa: F401  (private astropy directories, no downloads)
    from pipeline.core.config import load_config
    cfg = load_config(args.config)

    # %% 1. Read a quadrant: pixels, mask and the contract's keywords, validated.
    from pipeline.core.image import read_quadrant
    image = read_quadrant(args.image)
    meta = image.meta
    band = cfg.instrument.filters[meta.filter]
    print(f"read {Path(args.image).name}: field {meta.fieldid}, rcid {meta.rcid}, {meta.filter}, "
          f"expid {meta.expid}, airmass {meta.airmass:.2f}, {np.count_nonzero(image.mask)} masked pixels")

    # %% 2. Extract its sources (sep): windowed centroids, fluxes, shapes, flags.
    from pipeline.measure.extract import extract_sources
    extraction = extract_sources(image.data, image.mask, meta.gain, meta.saturate, cfg.extraction,
                                 read_noise=meta.readnoi)
    clean = int(np.count_nonzero(extraction.catalog["FLAGS"] == 0))
    print(f"extracted {len(extraction.catalog)} sources ({clean} unflagged), seeing "
          f"{extraction.seeing_fwhm_px:.2f} px, background {extraction.background_level:.1f} ADU")

    # %% 3. Astrometry: the prior (distortion prior, else the header's WCS), Gaia around its
    #       footprint from the store, then SCAMP's two passes and the QA verdict.
    from catalogs import catalog_for_footprint, catalog_for_image
    from pipeline.astrometry.files import load_prior
    from pipeline.astrometry.solve import solve_astrometry
    from pipeline.core.image import footprint_corners, quadrant_image
    from pipeline.formats.scamp_head import apply_wcs_header
    from priors.store import PRIOR_FILENAME

    prior_file = cfg.paths.resolve("priors") / PRIOR_FILENAME
    prior = load_prior(str(prior_file) if prior_file.exists() else None, image, cfg)
    store = cfg.paths.resolve("catalogs")
    gaia = catalog_for_footprint(store, footprint_corners(prior.wcs(image.shape), image.shape),
                                 cfg.astrometry.catalog_margin_deg)
    with tempfile.TemporaryDirectory() as work:
        astrometry = solve_astrometry(image, gaia, prior, work, cfg.astrometry, cfg.extraction, cfg.site, band)
    print(f"astrometry ({prior.source}): {'usable' if astrometry.usable else 'UNUSABLE'}, "
          f"{astrometry.qa.n_matched} Gaia matches, RMS {astrometry.qa.rms_ra_mas:.1f} / "
          f"{astrometry.qa.rms_dec_mas:.1f} mas")
    if not astrometry.usable:
        return {"usable": False, "reasons": list(astrometry.reasons)}
    solved = quadrant_image(image.data, apply_wcs_header(image.header, astrometry.wcs_header), image.mask,
                            image.path)

    # %% 4. Subtract the quadrant's reference (ZOGY) and make the candidates: the reference is
    #       registered onto the solved grid, the science image calibrated against Gaia at its
    #       epoch, candidates found on Scorr, measured and scored (rb, drb).  The astrometry
    #       stage's extraction of these pixels is reused.
    from pipeline.reference.files import read_reference, reference_filename
    from pipeline.subtraction.difference import subtract_images
    reference = read_reference(cfg.paths.resolve("references")
                               / reference_filename(meta.fieldid, meta.ccdid, meta.qid, meta.filter))
    result = subtract_images(solved.data, solved.mask, solved.header, solved.wcs, reference, band,
                             gain=meta.gain, saturate=meta.saturate,
                             pixel_scale_arcsec=cfg.instrument.pixel_scale_arcsec,
                             gaia=catalog_for_image(store, solved, cfg.astrometry.catalog_margin_deg),
                             extraction=astrometry.extraction, read_noise=meta.readnoi, config=cfg.subtraction)
    candidates = result.candidates
    good = candidates[candidates["rb"] >= 0.5]
    print(f"subtraction: zero point {result.zp_science:.3f} ({result.zp_source}), limit "
          f"{result.diffmaglim:.2f}; {len(candidates)} candidates, {len(good)} with rb >= 0.5")
    print(good["cand_index", "ra", "dec", "isdiffpos", "magpsf", "sigmapsf", "scorr", "rb"][:10])

    # %% 5. Against the simulator's truth (when given): the transients brighter than the limit.
    recovery = {}
    if args.truth:
        from astropy.table import Table
        truth = Table.read(args.truth, hdu="TRUTH")
        transients = truth[np.asarray(truth["transient"], bool) & (np.asarray(truth["mag"]) < result.diffmaglim)]
        hit = np.zeros(len(transients), bool)
        if len(transients) and len(candidates):
            distance = np.hypot(np.asarray(transients["x"])[:, None] - np.asarray(candidates["xpos"])[None, :],
                                np.asarray(transients["y"])[:, None] - np.asarray(candidates["ypos"])[None, :])
            hit = distance.min(axis=1) <= 2.0
        # At the 5-sigma limit a source is found about half the time; 0.75 mag brighter (S/N 10)
        # always.  The truth counts the simulated minor planets among the transients (kind "asteroid").
        bright = (np.asarray(transients["mag"]) < result.diffmaglim - 0.75) & (transients["kind"] == "transient")
        recovery = {"missed": [(str(t["kind"]), int(t["id"]), round(float(t["x"]), 1), round(float(t["y"]), 1),
                                round(float(t["mag"]), 2)) for t in transients[~hit]],
                    "transients_detectable": len(transients), "transients_found": int(hit.sum()),
                    "bright_transients": int(bright.sum()), "bright_found": int(hit[bright].sum())}
        print(f"truth: {recovery['transients_found']} of {recovery['transients_detectable']} transients above the "
              f"limit have a candidate within 2 px ({recovery['bright_found']} of {recovery['bright_transients']} "
              "at S/N >= 10, asteroids apart)")
    return {"usable": True, "n_sources": len(extraction.catalog), "rms_mas": (astrometry.qa.rms_ra_mas,
                                                                               astrometry.qa.rms_dec_mas),
            "n_candidates": len(candidates), "n_rb": len(good), "diffmaglim": result.diffmaglim, **recovery}


if __name__ == "__main__":
    main()
