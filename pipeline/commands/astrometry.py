"""``skydiff astrometry``: solve one quadrant image against Gaia and judge the solution.

See :mod:`pipeline.astrometry.files` for the products and the exit statuses.
"""
from __future__ import annotations



def register(subparsers, common) -> None:
    p = subparsers.add_parser(
        "astrometry", parents=[common], help="solve one quadrant's astrometry with SCAMP and judge it",
        description="Extract sources, solve the WCS in two SCAMP passes against Gaia (propagated to the "
                    "exposure epoch), check it against Gaia and the pixel-scale/airmass model, and write "
                    "the solved image and a QA record.")
    p.add_argument("image", metavar="IMAGE", help="quadrant image following the input contract")
    p.add_argument("--refcat", required=True, metavar="CATALOG",
                   help="Gaia tile store directory, or a FITS table with the Gaia archive's column names")
    p.add_argument("--prior", metavar="PRIOR", help="distortion prior (skydiff priors build); "
                   "default: the image header's first-guess WCS")
    p.add_argument("--out", required=True, metavar="OUTDIR", help="output folder")
    p.add_argument("--plots", action="store_true", help="also write the residual map PNG")
    p.add_argument("--keep-workdir", action="store_true", help="keep SCAMP's run directories")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.astrometry.files import run_astrometry
    status, _ = run_astrometry(args.image, args.refcat, args.prior, args.out, args.cfg,
                               plots=args.plots, keep_workdir=args.keep_workdir)
    return status
