"""``skydiff demo``: the main job on its embedded defaults (simulated data, no network)."""
from __future__ import annotations


def register(subparsers, common) -> None:
    p = subparsers.add_parser("demo", parents=[common], help="simulate a small survey and run every stage on it",
                              description="Simulate a small survey (one field, two filters, two nights and an "
                                          "earlier season for the references) into a working directory, run "
                                          "every quadrant through the quadrant runner (astrometry, subtraction, "
                                          "alerts, matchfiles) and print a summary with timings.  The working "
                                          "directory's skydiff.toml is the configuration it ran with.")
    p.add_argument("--workdir", default="demo-run", metavar="DIR", help="working directory (demo-run)")
    p.add_argument("--jobs", type=int, default=2, metavar="N",
                   help="worker processes: simulation, quadrants of an exposure, references (2)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pipeline.demo.survey import DemoOptions, format_summary, run_demo   # heavy: imported only when run
    summary = run_demo(args.cfg, args.workdir, DemoOptions(jobs=args.jobs))
    print(format_summary(summary))
    return 0
