"""``skydiff init DIR``: make a workspace, a folder whose ``skydiff.toml`` names every data root."""
from __future__ import annotations

import shlex


def register(subparsers, common) -> None:
    p = subparsers.add_parser(
        "init", parents=[common], help="make a workspace: DIR/skydiff.toml naming every data root",
        description="Create DIR and write DIR/skydiff.toml: paths.root is DIR's absolute path and every "
                    "data root (catalogs, priors, references, outputs, matchfiles, spool, history, "
                    "solar_system, fparchive) its default name under it, so that every command given "
                    "--config DIR/skydiff.toml finds what the others wrote, from any working directory.")
    p.add_argument("directory", metavar="DIR", help="the workspace folder (created if missing)")
    p.add_argument("--force", action="store_true", help="replace an existing DIR/skydiff.toml")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.core.config import load_config
    from pipeline.core.workspace import init_workspace

    config = init_workspace(args.directory, force=args.force)
    paths = load_config(config).paths
    print(f"wrote {config}")
    for name in ("catalogs", "ps1_catalogs", "priors", "references", "outputs", "matchfiles", "spool",
                 "history", "solar_system", "fparchive"):
        print(f"  paths.{name:<13} {paths.resolve(name)}")
    print(f"every command takes it: skydiff COMMAND --config {shlex.quote(str(config))} ...  "
          "(the README's \"From a survey's own images to nightly running\" walks the steps)")
    return 0
