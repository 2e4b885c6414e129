"""``skydiff quadrant``, ``skydiff exposure`` and ``skydiff exposure-summary``: run one quadrant,
every quadrant of an exposure on this machine, or summarise an exposure's quadrants.

See :mod:`pipeline.run.quadrant` (stages, status record, idempotence, exit codes) and
:mod:`pipeline.run.exposure` (local executor, summary).
"""
from __future__ import annotations

import json
import logging

from pipeline.core.exits import EXIT_FAILED, EXIT_OK

log = logging.getLogger("skydiff.quadrant")


def _quadrants(text: str | None, n_quadrants: int) -> list[int] | None:
    from pipeline.core.focalplane import parse_quadrants
    return parse_quadrants(text, n_quadrants) if text else None


def register(subparsers, common) -> None:
    q = subparsers.add_parser("quadrant", parents=[common], help="run one quadrant of an exposure through every stage",
                              description="Astrometry, subtraction against the quadrant's reference, alerts and the "
                                          "matchfile epoch for one quadrant, with a status record; a finished "
                                          "quadrant is not rerun unless --force.")
    q.add_argument("exposure", metavar="EXPOSURE", help="multi-extension exposure file or folder of quadrant files")
    q.add_argument("--quadrant", required=True, type=int, metavar="RCID", help="readout channel id 0-63")
    q.add_argument("--force", action="store_true", help="rerun a finished quadrant")
    q.set_defaults(func=run_one)
    e = subparsers.add_parser("exposure", parents=[common], help="run every quadrant of an exposure on this machine",
                              description="The local executor: a process pool (one quadrant per core) over the "
                                          "exposure's quadrants, a progress bar, then the exposure summary.")
    e.add_argument("exposure", metavar="EXPOSURE")
    e.add_argument("--jobs", type=int, metavar="N", help="worker processes (default: the cores available)")
    e.add_argument("--quadrants", metavar="LIST", help="rcids, e.g. 0,5,10-12 (default: all in the exposure)")
    e.add_argument("--force", action="store_true", help="rerun finished quadrants")
    e.add_argument("--json", action="store_true", help="print the summary as JSON")
    e.set_defaults(func=run_all)
    s = subparsers.add_parser("exposure-summary", parents=[common], help="summarise an exposure's quadrants",
                              description="Reads every quadrant's status record, writes <outputs>/<expid>/"
                                          "summary.json and lists the quadrants to reprocess.")
    s.add_argument("exposure", metavar="EXPOSURE")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_summary)


def run_one(args) -> int:
    from pipeline.run.exposure import quadrant_task
    _, code, reason = quadrant_task(args.exposure, args.quadrant, args.cfg, force=args.force)
    if reason and code != EXIT_OK:
        log.error("rcid %d: %s", args.quadrant, reason)
    return code


def _print(summary: dict, as_json: bool) -> None:
    from pipeline.run.exposure import format_exposure_summary
    print(json.dumps(summary, indent=2) if as_json else format_exposure_summary(summary))


def run_all(args) -> int:
    from pipeline.run.exposure import run_exposure
    # A bad --quadrants list is a usage error (2), raised to pipeline.cli.run_command.
    quadrants = _quadrants(args.quadrants, args.cfg.instrument.n_quadrants)
    summary = run_exposure(args.exposure, args.cfg, jobs=args.jobs, quadrants=quadrants, force=args.force)
    _print(summary, args.json)
    # Unusable quadrants are a verdict, not a failure; anything left to reprocess is.
    return EXIT_OK if not summary["reprocess"] else EXIT_FAILED


def run_summary(args) -> int:
    from pipeline.core.exits import PipelineError
    from pipeline.run.exposure import exposure_summary, withdraw_exposure
    summary = exposure_summary(args.exposure, args.cfg)
    try:
        # After every task has ended: an announcement left now belongs to a quadrant that will
        # not be recorded, and later overlapping images must not wait for it.
        withdraw_exposure(args.exposure, args.cfg, [q["rcid"] for q in summary["quadrants"]])
    except PipelineError as exc:
        # The later images' bounded wait (history.order_wait_s) covers what is left.
        logging.getLogger("skydiff.exposure").warning("announcements not withdrawn: %s", exc)
    _print(summary, args.json)
    return EXIT_OK
