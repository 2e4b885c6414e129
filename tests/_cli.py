"""Running one ``skydiff`` command in-process with a given configuration object."""
from __future__ import annotations

from pipeline import cli


def run_skydiff(argv: list[str], cfg) -> int:
    """Parse ``argv`` with the real command line and run it on ``cfg``, as ``skydiff`` does
    (a propagated failure becomes its exit status)."""
    args = cli.build_parser().parse_args(argv)
    args.cfg = cfg
    return cli.run_command(args)
