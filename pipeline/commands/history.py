"""``skydiff history migrate``: copy a SQLite object history into PostgreSQL."""
from __future__ import annotations

from pipeline.core.exits import EXIT_OK


def register(subparsers, common) -> None:
    p = subparsers.add_parser("history", parents=[common], help="the alert object history: copy SQLite into "
                              "PostgreSQL",
                              description="The alert object history (objects, detections, covering images, "
                                          "name counters).")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    migrate = actions.add_parser(
        "migrate", parents=[common], help="copy a SQLite history into PostgreSQL (idempotent)",
        description="Copy every object, detection, image and name counter of a SQLite history into a "
                    "PostgreSQL database (its schema created or upgraded first), in one transaction. Rows "
                    "already there are kept, so running it again adds nothing; names minted afterwards "
                    "continue the SQLite counters. The target must be empty or hold an earlier copy of the "
                    "same history.")
    migrate.add_argument("sqlite", metavar="SQLITE_FILE", help="the SQLite history (e.g. paths.history)")
    migrate.add_argument("--to", metavar="URL", help="postgresql://user:password@host:port/database "
                         "(default: history.url)")
    migrate.set_defaults(func=run_migrate)


def run_migrate(args) -> int:
    from alerts.history_postgres import migrate_sqlite
    from pipeline.core.config import check_history_url, redacted_url
    from pipeline.core.exits import UsageError

    url = check_history_url(args.to, "--to") if args.to else args.cfg.history.url
    if not url:
        raise UsageError("history migrate: no target: give --to postgresql://... or set history.url")
    report = migrate_sqlite(args.sqlite, url, connect_timeout_s=args.cfg.history.connect_timeout_s)
    print(f"{args.sqlite} -> {redacted_url(url)}: {report}")
    return EXIT_OK
