"""``skydiff lightcurve`` (a cone query printed or plotted) and ``skydiff serve-lightcurves``."""
from __future__ import annotations

import logging
import sys

from pipeline.core.exits import EXIT_FAILED, EXIT_OK, EXIT_USAGE, PipelineError

log = logging.getLogger("skydiff.lightcurve")


def register(subparsers, common) -> None:
    p = subparsers.add_parser(
        "lightcurve", parents=[common], help="light curves of the objects around a position",
        description="Light curves (all filters) of the reference objects within a radius of RA DEC, "
                    "read from the matchfiles under the matchfile root.")
    p.add_argument("ra", type=float, metavar="RA", help="right ascension (deg)")
    p.add_argument("dec", type=float, metavar="DEC", help="declination (deg)")
    p.add_argument("--radius", type=float, default=2.0, metavar="ARCSEC", help="cone radius (arcsec, 2)")
    p.add_argument("--root", metavar="DIR", help="matchfile root (default: paths.matchfiles)")
    p.add_argument("--format", choices=["csv", "tsv", "html", "votable", "ipac_table", "json", "ecsv"],
                   default="csv", help="output format on stdout (csv; the service's FORMATs and ecsv)")
    p.add_argument("--plot", metavar="FILE.png", help="also plot magnitude against MJD, with upper limits "
                   "and the reference magnitude")
    p.set_defaults(func=run_lightcurve)

    s = subparsers.add_parser(
        "serve-lightcurves", parents=[common], help="read-only HTTP light-curve service (IRSA API)",
        description="Serve light curves over HTTP with the query parameters of IRSA's ZTF light-curve "
                    "API at /cgi-bin/ZTF/nph_light_curves (help at /).")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: loopback only)")
    s.add_argument("--port", type=int, default=8080, metavar="N", help="port (8080)")
    s.add_argument("--root", metavar="DIR", help="matchfile root (default: paths.matchfiles)")
    s.add_argument("--archive", metavar="DIR",
                   help="difference-image archive served at /cgi-bin/ZTF/nph_forced_photometry "
                        "(default: paths.fparchive when it holds an archive)")
    s.set_defaults(func=run_serve)


def _root(args):
    return args.root or args.cfg.paths.resolve("matchfiles")


def run_lightcurve(args) -> int:
    from pipeline.matchfile.lightcurves import lightcurve, lightcurve_plot_context, plot_lightcurve, serialise

    try:
        table = lightcurve(args.ra, args.dec, args.radius, _root(args))
    except PipelineError:
        raise                  # a matchfile that breaks the layout: bad input (3)
    except ValueError as exc:  # a position or radius out of range
        log.error("%s", exc)
        return EXIT_USAGE
    body, _ = serialise(table, args.format)
    sys.stdout.buffer.write(body)
    sys.stdout.flush()
    if args.plot:
        references, upper_limits = lightcurve_plot_context(args.ra, args.dec, args.radius, _root(args))
        plot_lightcurve(table, args.plot, title=f"{args.ra:.5f} {args.dec:+.5f} r={args.radius:g}\"",
                        references=references, upper_limits=upper_limits)
        log.info("plot written to %s", args.plot)
    log.info("%d points of %d object(s)", len(table), len(set(table["oid"])) if len(table) else 0)
    return EXIT_OK


def run_serve(args) -> int:
    from pipeline.matchfile.service import serve

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("binding to %s: the service is reachable from other machines", args.host)
    from pipeline.forcedphot.archive import INDEX_NAME

    archive = args.archive or args.cfg.paths.resolve("fparchive")
    if not args.archive and not (archive / INDEX_NAME).is_file():
        archive = None
    try:
        serve(_root(args), args.host, args.port, archive=archive, forced_config=args.cfg.forcedphot)
    except OSError as exc:
        log.error("cannot serve on %s:%d: %s", args.host, args.port, exc.strerror or exc)
        return EXIT_FAILED
    return EXIT_OK
