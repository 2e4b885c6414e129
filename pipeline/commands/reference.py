"""``skydiff reference``: build reference images (coadds) and show what one holds.

``reference build IMAGES... --refcat GAIA --out OUTDIR`` reads solved quadrant images
(files, or directories whose ``*.fits`` / ``*.fits.fz`` are read; tables such as the
astrometry stage's ``*_matches.fits`` and reference files there are skipped), groups them by
(field, CCD, quadrant, filter), builds one reference per group
(:func:`pipeline.reference.files.build_references`) and writes
``OUTDIR/ref_f<field>_c<ccd>_q<qid>_<filter>.fits``, printing per group the frames used and
rejected (with reasons) and the timings; ``--grid-margin`` sets how far the coadd's grid
extends beyond the best-seeing frame's.  ``reference import FILE [--out OUTDIR] [--refcat GAIA]``
characterises a coadd made elsewhere and stores it in the same layout under the same name
(:func:`pipeline.reference.files.import_reference`).  ``reference show REF.fits`` prints a
reference's metadata.

Exit status: 0 every group built (or the reference imported); 3 bad input (an unreadable
image or reference, no image found, a bad Gaia catalogue, a reference to import that lacks
an identifying keyword or cannot be characterised), nothing written; 4 some group could not
be built (too few usable frames: the reasons are printed), the others are written; 1 other
failures.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.config import ReferenceConfig
from pipeline.core.exits import EXIT_BAD_INPUT, EXIT_OK

__all__ = ["register", "bench_reference"]

log = logging.getLogger("skydiff.reference")


def register(subparsers, common) -> None:
    p = subparsers.add_parser("reference", parents=[common], help="build reference images (coadds), show one",
                              description="Reference images: outlier-rejecting weighted coadds of the good "
                                          "exposures of one field/CCD/quadrant/filter, with PSF and catalogue.")
    sub = p.add_subparsers(dest="reference_command", metavar="SUBCOMMAND")
    sub.required = True
    build = sub.add_parser("build", parents=[common], help="coadd solved quadrant images into references",
                           description="Group solved quadrant images by field, CCD, quadrant and filter and "
                                       "build one reference per group.")
    build.add_argument("images", nargs="+", metavar="IMAGES", help="solved quadrant FITS files or directories")
    build.add_argument("--refcat", metavar="GAIA",
                       help="Gaia tile store directory, or a FITS table with the Gaia archive's column names "
                            "(default: paths.catalogs)")
    build.add_argument("--out", metavar="OUTDIR",
                       help="output folder (default: paths.references, where skydiff quadrant looks)")
    build.add_argument("--max-frames", type=int, metavar="N",
                       help="coadd at most this many (the deepest) frames (default: [reference] max_frames, "
                            f"{ReferenceConfig.max_frames})")
    build.add_argument("--grid-margin", type=int, metavar="PX",
                       help="grow the coadd's grid by this many pixels on every side, so that science "
                            "images pointed off the grid frame stay covered (default: [reference] "
                            f"grid_margin_px, {ReferenceConfig.grid_margin_px})")
    build.set_defaults(func=run_build)
    imp = sub.add_parser("import", parents=[common], help="store a reference made elsewhere in skydiff's format",
                         description="Characterise a coadd made elsewhere (a WCS, the contract's keywords and "
                                     "MAGZP; no skydiff PSF or catalogue) as a built reference is, and write it "
                                     "in skydiff's reference layout under the name the quadrant runner looks up.")
    imp.add_argument("file", metavar="FILE", help="the coadd's FITS file")
    imp.add_argument("--out", metavar="OUTDIR", help="output folder (default: paths.references)")
    imp.add_argument("--refcat", metavar="GAIA",
                     help="Gaia tile store or table: fit the zero point to it (default: keep the header's MAGZP)")
    imp.set_defaults(func=run_import)
    show = sub.add_parser("show", parents=[common], help="print a reference's metadata",
                          description="Print the metadata, frame table and catalogue summary of a reference.")
    show.add_argument("reference", metavar="REF.fits")
    show.set_defaults(func=run_show)


def _print_summary(summary: dict) -> None:
    fieldid, ccdid, qid, filt = summary["group"]
    print(f"field {fieldid} CCD {ccdid} quadrant {qid} {filt}:")
    if summary["error"]:
        print(f"  NOT BUILT: {summary['error']}")
        return
    ref = summary["reference"]
    frames = ref.frames
    print(f"  wrote {summary['path']}: refid {ref.refid}, {ref.nframes} of {len(frames)} frames, "
          f"seeing {ref.fwhm_arcsec:.2f}\", limiting mag {ref.limiting_mag:.2f}, "
          f"{len(ref.catalog)} sources")
    for row in frames:
        state = "used" if row["used"] else f"rejected: {row['reason']}"
        print(f"    {row['path']} expid {row['expid']}: FWHM {row['fwhm_arcsec']:.2f}\" zp {row['zp']:.3f} "
              f"limmag {row['limmag']:.2f} - {state}")
    print("  timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in ref.timings.items()))


def run_build(args) -> int:
    """0 built, 4 a group could not be built; unreadable images or catalogue (3) propagate."""
    from pipeline.reference.files import build_references, collect_images, read_groups
    config = args.cfg.reference
    max_frames = config.max_frames if args.max_frames is None else args.max_frames
    grid_margin = config.grid_margin_px if args.grid_margin is None else args.grid_margin
    if max_frames < 1:
        log.error("--max-frames must be at least 1, got %d", max_frames)
        return EXIT_BAD_INPUT
    if grid_margin < 0:
        log.error("--grid-margin must be at least 0, got %d", grid_margin)
        return EXIT_BAD_INPUT
    config = replace(config, max_frames=max_frames, min_frames=min(config.min_frames, max_frames),
                     grid_margin_px=grid_margin)
    files = collect_images(args.images)
    groups = read_groups(files, explicit=[p for p in args.images if not Path(p).is_dir()])
    if not groups:
        log.error("bad input: no quadrant image in %s", " ".join(args.images))
        return EXIT_BAD_INPUT
    refcat = args.refcat or args.cfg.paths.resolve("catalogs")
    out = args.out or args.cfg.paths.resolve("references")
    status, summaries = build_references(groups, refcat, out, args.cfg, config)
    for summary in summaries:
        _print_summary(summary)
    return status


def run_import(args) -> int:
    """0 stored; a reference that cannot be read or characterised is bad input (3)."""
    from pipeline.reference.files import import_reference
    path, ref = import_reference(args.file, args.cfg, out=args.out, refcat=args.refcat)
    print(f"wrote {path}: refid {ref.refid}, zero point {ref.zeropoint:.3f} "
          f"({'Gaia' if args.refcat else 'MAGZP'}), seeing {ref.fwhm_arcsec:.2f}\", limiting mag "
          f"{ref.limiting_mag:.2f}, {len(ref.catalog)} sources, noise correlation "
          f"{ref.header.get('NOISECOR', 1.0):.2f}")
    return EXIT_OK


def run_show(args) -> int:
    from pipeline.reference.files import read_reference
    ref = read_reference(args.reference)
    print(f"{args.reference}: {ref.shape[1]} x {ref.shape[0]} px")
    for key in ("REFID", "FIELDID", "CCDID", "QID", "RCID", "FILTER", "MAGZP", "MAGZPFIT", "GAIN",
                "READNOI", "SATURATE", "NFRAMES", "JDSTART", "JDEND", "SEEING", "FWHM", "LIMMAG", "PIXRMSF",
                "GRIDMARG"):
        if key in ref.header:
            print(f"  {key:<8} = {ref.header[key]!r:<24} {ref.header.comments[key]}")
    if ref.coverage is not None:
        print(f"  coverage: {int(ref.coverage.min())}-{int(ref.coverage.max())} frames per pixel")
    print(f"  PSF: {'none' if ref.psf is None else f'{ref.psf.fwhm:.2f} px FWHM, {ref.psf.n_stars} stars'}")
    print(f"  catalogue: {'none' if ref.catalog is None else f'{len(ref.catalog)} sources'}")
    if ref.frames is not None:
        for row in ref.frames:
            state = f"used, scale {row['scale']:.4f}" if row["used"] else f"rejected: {row['reason']}"
            print(f"    {row['path']} expid {row['expid']}: {state}")
    return EXIT_OK


def bench_reference(n_frames: int = 20, cfg: Config | None = None, rcid: int = 21) -> dict:
    """Time a reference build from ``n_frames`` simulated full-size frames (true WCS as solved).

    Returns
    -------
    dict
        ``shape``, ``n_frames``, ``n_used``, seconds of ``simulate`` (not part of the build),
        ``characterize``, ``register``, ``stack``, ``coadd``, ``build_total``, ``write``,
        and ``per_frame`` (build seconds per input frame).
    """
    from pipeline.core.image import quadrant_image
    from pipeline.reference.build import build_reference
    from pipeline.reference.files import write_reference
    from pipeline.core.config import load_config
    from pipeline.simulate.plan import Field, exposure_at_airmass
    from pipeline.simulate.run import simulate_quadrant
    from pipeline.simulate.sky import make_sky
    from pipeline.formats.scamp_head import apply_wcs_header

    cfg = load_config() if cfg is None else cfg
    field = Field(600, 150.0, 33.0)
    sky = make_sky(cfg, [(field.fieldid, field.ra, field.dec)], rng_seed=7)
    t0 = time.perf_counter()
    frames = []
    for k in range(n_frames):
        spec = exposure_at_airmass(cfg, field, 1.05 + 0.5 * k / max(n_frames - 1, 1), expid=5000 + k)
        quadrant, _ = simulate_quadrant(spec, rcid, sky, cfg)
        header = apply_wcs_header(quadrant.header, quadrant.truth_header)
        header["ASTRUSE"] = True
        frames.append(quadrant_image(quadrant.data, header, quadrant.mask, f"sim{k}"))
    simulate_s = time.perf_counter() - t0
    band = cfg.instrument.filters[frames[0].meta.filter]
    ref = build_reference(frames, sky.gaia_catalogue(), band, cfg.reference)
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        write_reference(os.path.join(tmp, "ref.fits"), ref)
        write_s = time.perf_counter() - t1
    report = {"shape": list(ref.shape), "n_frames": n_frames, "n_used": ref.nframes,
              "simulate": simulate_s, **{k: v for k, v in ref.timings.items() if k != "total"},
              "build_total": ref.timings["total"], "write": write_s,
              "per_frame": ref.timings["total"] / n_frames}
    return {k: (round(v, 3) if isinstance(v, float) and math.isfinite(v) else v) for k, v in report.items()}
