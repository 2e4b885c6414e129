"""``skydiff priors``: build a focal-plane distortion prior, and write an image's ``.ahead`` from it."""
from __future__ import annotations

import logging
from dataclasses import replace


from pipeline.core.config import PriorFitSettings
from pipeline.core.exits import EXIT_OK

log = logging.getLogger("skydiff.priors")


def register(subparsers, common) -> None:
    p = subparsers.add_parser("priors", parents=[common], help="build a distortion prior, write .ahead files",
                              description="Focal-plane distortion priors (per-quadrant CRPIX, CD, TPV terms).")
    sub = p.add_subparsers(dest="priors_command", metavar="SUBCOMMAND")
    sub.required = True

    build = sub.add_parser("build", parents=[common], help="fit a prior from matched star lists",
                           description="Fit a prior from matched star tables (FITS or ECSV; columns "
                                       "expid rcid x y ra dec telra teldec obsmjd airmass).")
    build.add_argument("matches", nargs="+", metavar="MATCHES", help="matched star tables")
    build.add_argument("--out", metavar="PRIOR.fits",
                       help="prior file to write (default: paths.priors/prior.fits, where skydiff quadrant looks)")
    build.add_argument("--max-airmass", type=float,
                       help="drop exposures above this airmass (default: [priors] max_airmass, "
                            f"{PriorFitSettings.max_airmass})")
    build.add_argument("--degree", type=int,
                       help="degree of the focal-plane polynomial (default: [priors] degree, "
                            f"{PriorFitSettings.degree})")
    build.set_defaults(func=run_build)

    ahead = sub.add_parser("ahead", parents=[common], help="write the .ahead of a quadrant image",
                           description="Write the prior's TPV header for one quadrant image as a SCAMP .ahead.")
    ahead.add_argument("prior", metavar="PRIOR.fits")
    ahead.add_argument("image", metavar="IMAGE.fits")
    ahead.add_argument("--out", required=True, metavar="FILE.ahead")
    ahead.set_defaults(func=run_ahead)


def run_build(args) -> int:
    from priors.fit import fit_prior
    from priors.matches import read_matches
    from priors.store import write_prior
    matches = read_matches(args.matches)
    settings = args.cfg.priors
    if args.max_airmass is not None:
        settings = replace(settings, max_airmass=args.max_airmass)
    if args.degree is not None:
        settings = replace(settings, degree=args.degree)
    prior = fit_prior(matches, args.cfg, settings, source=", ".join(args.matches))
    if args.out is None:
        from priors.store import PRIOR_FILENAME
        args.out = str(args.cfg.paths.resolve("priors") / PRIOR_FILENAME)
    write_prior(args.out, prior)
    p = prior.provenance
    log.info("wrote %s: %d exposures (airmass %.2f-%.2f), %d stars, rms %.3f arcsec per axis",
             args.out, p.n_exposures, p.airmass_min, p.airmass_max, p.n_stars, p.rms_arcsec)
    return EXIT_OK


def run_ahead(args) -> int:
    from priors.ahead import prior_wcs_header, write_ahead
    from priors.store import read_prior
    from pipeline.core.image import read_quadrant
    image = read_quadrant(args.image)
    meta = image.meta
    prior = read_prior(args.prior)
    header = prior_wcs_header(prior, meta.rcid, meta.telra, meta.teldec, meta.obsmjd, image.shape,
                              pressure_hpa=meta.pressure, temperature_c=meta.temperature,
                              wavelength_um=args.cfg.instrument.filters[meta.filter].wavelength_um)
    write_ahead(args.out, header)
    log.info("wrote %s (rcid %d, prior %s)", args.out, meta.rcid, args.prior)
    return EXIT_OK
