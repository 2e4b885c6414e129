"""``skydiff subtract``: ZOGY subtraction of a reference from a solved science quadrant.

See :mod:`pipeline.subtraction.products` for the products and :mod:`pipeline.subtraction.difference` for the method.
"""
from __future__ import annotations



def register(subparsers, common) -> None:
    p = subparsers.add_parser(
        "subtract", parents=[common], help="subtract a reference from a science quadrant (ZOGY) and find candidates",
        description="Characterise the science image (PSF, zero point), resample the reference onto its grid, "
                    "run ZOGY (D, S, Scorr with source and registration noise), detect candidates on "
                    "|Scorr| >= 5 with ZTF's features and a real-bogus score, and write diff.fits, "
                    "scorr.fits, candidates.ecsv, cutouts.fits and qa.json.")
    p.add_argument("science", metavar="SCIENCE", help="solved science quadrant (output of skydiff astrometry)")
    p.add_argument("reference", metavar="REFERENCE", help="reference image (skydiff reference build), or any "
                   "image with a WCS, MAGZP and PSF extension")
    p.add_argument("--out", required=True, metavar="OUTDIR", help="output folder")
    p.add_argument("--refcat", metavar="CATALOG", help="Gaia tile store or FITS table for the science zero point; "
                   "default: the header's MAGZP, else the reference catalogue")
    p.add_argument("--ps1cat", metavar="CATALOG", help="PS1-like tile store (skydiff catalogs prefetch --catalog "
                   "ps1) or FITS table: adds the catalogue context (distpsnr1, sgscore1, neargaia, ...) to "
                   "the candidates; needs --refcat for the Gaia neighbours (default: no context columns)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.subtraction.files import run_subtraction
    status, _ = run_subtraction(args.science, args.reference, args.out, args.cfg, refcat=args.refcat,
                                ps1cat=args.ps1cat)
    return status
