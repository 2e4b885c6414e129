"""``skydiff watch``: submit every exposure that appears in a folder, exactly once."""
from __future__ import annotations

import logging

from pipeline.core.exits import EXIT_BAD_INPUT, EXIT_OK, EXIT_USAGE

log = logging.getLogger("skydiff.watch")


def register(subparsers, common) -> None:
    p = subparsers.add_parser(
        "watch", parents=[common], help="submit each new exposure of a folder to Slurm, exactly once",
        description="Watch INCOMING and submit every complete exposure (FITS file or folder) with "
                    "'skydiff submit' semantics, exactly once across restarts: a ledger (SQLite) and "
                    "held jobs named after the exposure make a watcher killed at any point resume "
                    "without a double or a lost submission.  An exposure is complete when its marker "
                    "file exists (--marker) or when it stays unchanged for --settle seconds.")
    p.add_argument("incoming", metavar="INCOMING", help="folder where exposures arrive")
    p.add_argument("--once", action="store_true", help="submit what is complete now, then exit")
    p.add_argument("--interval", type=float, default=2.0, metavar="S", help="seconds between scans (2)")
    p.add_argument("--settle", type=float, default=2.0, metavar="S",
                   help="seconds an exposure must stay unchanged to count as complete (2)")
    p.add_argument("--marker", default="", metavar="SUFFIX",
                   help="only take EXPOSURE once EXPOSURE+SUFFIX exists (e.g. .done)")
    p.add_argument("--quadrants", metavar="RCIDS", help="rcids to run, e.g. 0-3 (default: all each holds)")
    p.add_argument("--ledger", metavar="FILE",
                   help="submission ledger (default: <paths.outputs>/slurm/watch-ledger.sqlite)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from slurm.watch import ExposureWatcher, SubmissionLedger, WatcherBusyError, WatchSettings
    from pipeline.core.focalplane import parse_quadrants
    try:
        quadrants = tuple(parse_quadrants(args.quadrants, args.cfg.instrument.n_quadrants)) if args.quadrants else None
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    ledger_path = Path(args.ledger) if args.ledger else args.cfg.paths.resolve("outputs") / "slurm" / "watch-ledger.sqlite"
    settings = WatchSettings(settle_s=args.settle, marker_suffix=args.marker, quadrants=quadrants)
    try:
        with SubmissionLedger(ledger_path) as ledger:
            watcher = ExposureWatcher(args.incoming, args.cfg, ledger, settings)
            log.info("watching %s (ledger %s)", watcher.incoming, ledger_path)
            submitted = watcher.run(args.interval, once=args.once)
    except (WatcherBusyError, NotADirectoryError) as exc:
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    # SlurmError (sbatch failed, 1) ends in pipeline.cli.run_command.
    print(f"watch: {submitted} exposure(s) submitted")
    return EXIT_OK
