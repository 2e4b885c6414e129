"""The ``skydiff`` command line: one subcommand per capability.

Each command lives in its own module exposing ``register(subparsers)``, which adds an
``argparse`` sub-parser whose ``func`` default takes the parsed arguments and returns the
exit status.  This module only assembles them, so stages never depend on it.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline import __version__
from pipeline.core.config import load_config
from pipeline.core.exits import PipelineError, describe, exit_status_of
from pipeline.core.runtime import setup_logging

# Modules providing commands, in the order ``skydiff --help`` lists them.
COMMAND_MODULES = [
    "pipeline.commands.init",
    "pipeline.commands.demo",
    "pipeline.commands.simulate",
    "pipeline.commands.astrometry",
    "pipeline.commands.reference",
    "pipeline.commands.subtract",
    "pipeline.commands.realbogus",
    "pipeline.commands.quadrant",
    "pipeline.commands.submit",
    "pipeline.commands.watch",
    "pipeline.commands.catalogs",
    "pipeline.commands.solarsystem",
    "pipeline.commands.candidates",
    "pipeline.commands.alerts",
    "pipeline.commands.history",
    "pipeline.commands.matchfile",
    "pipeline.commands.lightcurve",
    "pipeline.commands.forcedphot",
    "pipeline.commands.priors",
    "pipeline.commands.qa",
    "pipeline.commands.config",
    "pipeline.commands.bench",
]


log = logging.getLogger("skydiff")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skydiff", description="Real-time transient-survey image differencing (ZTF-like).")
    parser.add_argument("--version", action="version", version=f"skydiff {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="TOML configuration (defaults are embedded)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers, common)
    return parser


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command and return its exit status.

    The configuration is loaded from ``--config`` unless ``args.cfg`` is already set.  This
    is the one place a recognised failure becomes an exit status: commands let any
    :class:`~pipeline.core.exits.PipelineError` propagate, and it ends here as one log line
    (:func:`~pipeline.core.exits.describe`) and its status
    (:func:`~pipeline.core.exits.exit_status_of`).
    """
    try:
        if getattr(args, "cfg", None) is None:
            args.cfg = load_config(getattr(args, "config", None))
        return int(args.func(args) or 0)
    except PipelineError as exc:
        log.error("%s", describe(exc))
        return exit_status_of(exc)
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    return run_command(args)


if __name__ == "__main__":
    sys.exit(main())
