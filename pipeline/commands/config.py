"""``skydiff config``: print the effective configuration."""
from __future__ import annotations



def register(subparsers, common) -> None:
    p = subparsers.add_parser("config", parents=[common], help="print the effective configuration as TOML",
                              description="Print the effective configuration (defaults plus --config) as TOML.")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.core.config import config_to_toml
    print(config_to_toml(args.cfg), end="")
    return 0
