"""``skydiff solarsystem``: the orbit store (``ingest``) and the per-night ephemeris (``prepare``)."""
from __future__ import annotations

import argparse
import json

from pipeline.core.exits import EXIT_OK


def register(subparsers, common) -> None:
    parser = subparsers.add_parser(
        "solarsystem", help="known minor planets: orbit store and night ephemerides",
        description="Build the orbit store from an MPCORB-format file (ingest) and a night's ephemeris "
                    "file from it (prepare), both under paths.solar_system.")
    actions = parser.add_subparsers(dest="solarsystem_action", metavar="ACTION")
    actions.required = True
    ingest = actions.add_parser("ingest", parents=[common], help="orbit store from an MPCORB-format file",
                                description="Read MPCORB.DAT (the MPC's format, plain or gzip) into the "
                                            "orbit store <paths.solar_system>/orbits.npz.")
    ingest.add_argument("mpcorb", metavar="MPCORB", help="MPCORB-format file (.gz allowed)")
    ingest.set_defaults(func=run_ingest)
    prepare = actions.add_parser("prepare", parents=[common], help="one night's ephemeris file",
                                 description="Propagate every orbit of the store to the night's middle "
                                             "and write <paths.solar_system>/nights/<night>.h5.")
    prepare.add_argument("--night", required=True, metavar="YYYY-MM-DD", help="the night (its UT date)")
    prepare.set_defaults(func=run_prepare)


def run_ingest(args: argparse.Namespace) -> int:
    from solarsystem.store import ingest_mpcorb
    print(json.dumps(ingest_mpcorb(args.mpcorb, args.cfg.paths.resolve("solar_system")), indent=2))
    return EXIT_OK


def run_prepare(args: argparse.Namespace) -> int:
    import datetime

    from pipeline.core.exits import UsageError
    from solarsystem.night import night_path, prepare_night
    try:
        datetime.date.fromisoformat(args.night)
    except ValueError:
        raise UsageError(f"--night {args.night!r}: expected a date YYYY-MM-DD") from None
    from solarsystem.store import orbit_store_path
    root = args.cfg.paths.resolve("solar_system")
    summary = prepare_night(orbit_store_path(root), args.night, args.cfg.site, args.cfg.solar_system,
                            night_path(root, args.night))
    print(json.dumps(summary, indent=2))
    return EXIT_OK
