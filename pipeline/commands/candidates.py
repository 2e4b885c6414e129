"""``skydiff candidates list|show``: look at a subtraction's candidates without building alerts."""
from __future__ import annotations

from pipeline.core.exits import EXIT_OK


def register(subparsers, common) -> None:
    p = subparsers.add_parser("candidates", parents=[common], help="list a subtraction's candidates or draw one",
                              description="The candidates of a `skydiff subtract` output folder (or a quadrant's "
                                          "subtraction/ folder): a table of them, or one candidate's "
                                          "science/reference/difference triplet as `alerts show --png` draws it.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    listing = actions.add_parser("list", parents=[common], help="print the candidates as a table")
    listing.add_argument("outdir", metavar="OUTDIR", help="a subtraction products folder")
    listing.add_argument("--rb-min", type=float, metavar="X", help="only candidates with rb >= X")
    listing.set_defaults(func=run_list)
    show = actions.add_parser("show", parents=[common], help="describe one candidate and draw its triplet")
    show.add_argument("outdir", metavar="OUTDIR", help="a subtraction products folder")
    show.add_argument("candidate_id", type=int, metavar="ID", help="its cand_index (or its alert candid)")
    show.add_argument("--png", metavar="FILE", help="write the annotated science/reference/difference triplet")
    show.set_defaults(func=run_show)


def run_list(args) -> int:
    from alerts.inspect import candidate_listing
    listing = candidate_listing(args.outdir, args.rb_min)
    if len(listing):
        listing.pprint_all()
    cut = "" if args.rb_min is None else f" with rb >= {args.rb_min:g}"
    print(f"{len(listing)} candidate(s){cut} in {args.outdir}")
    return EXIT_OK


def run_show(args) -> int:
    from alerts.inspect import candidate_triplet, save_triplet
    view = candidate_triplet(args.outdir, args.candidate_id)
    print(view.title)
    print(view.scores_line)
    if args.png:
        print(f"triplet written to {save_triplet(view, args.png)}")
    return EXIT_OK
