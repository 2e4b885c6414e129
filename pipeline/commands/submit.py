"""``skydiff submit``: one exposure to Slurm as a job array plus its follow-up summary job and matchfile fold job."""
from __future__ import annotations

import logging

from pipeline.core.exits import EXIT_BAD_INPUT, EXIT_OK

log = logging.getLogger("skydiff.submit")


def register(subparsers, common) -> None:
    p = subparsers.add_parser(
        "submit", parents=[common], help="submit an exposure to Slurm (array of quadrants + summary + matchfile fold)",
        description="Submit one exposure to Slurm: a job array with one task per quadrant running "
                    "'skydiff quadrant' (time limit, partition and the retry cap on exit 75 from the "
                    "[slurm] section) and a follow-up job, started once every task has ended, running "
                    "'skydiff exposure-summary', and a matchfile fold job ('skydiff matchfile fold') after "
                    "the array, a Slurm singleton so that one fold runs at a time.  Prints the job ids.")
    p.add_argument("exposure", metavar="EXPOSURE", help="multi-extension FITS exposure or folder of quadrant files")
    p.add_argument("--quadrants", metavar="RCIDS", help="rcids to run, e.g. 0,5,10-12 (default: all it holds)")
    p.set_defaults(func=run)


def run(args) -> int:
    from slurm.submit import submit_exposure
    from pipeline.core.focalplane import parse_quadrants
    # A bad --quadrants list is a usage error (2), raised to pipeline.cli.run_command.
    quadrants = parse_quadrants(args.quadrants, args.cfg.instrument.n_quadrants) if args.quadrants else None
    try:
        result = submit_exposure(args.exposure, args.cfg, quadrants)
    except (ValueError, OSError) as exc:   # a missing or unreadable exposure
        log.error("%s", exc)
        return EXIT_BAD_INPUT
    # SlurmError (sbatch failed, 1) ends in pipeline.cli.run_command.
    print(f"array job {result.array_job_id} ({len(result.quadrants)} quadrants), "
          f"summary job {result.summary_job_id}, fold job {result.fold_job_id}; logs in {result.workdir / 'logs'}")
    return EXIT_OK
