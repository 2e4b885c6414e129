"""``skydiff realbogus``: train the real-bogus model on simulated pairs, or show a model.

The model shipped in the package (``pipeline/subtraction/data/rb_model.json``) was made with
``skydiff realbogus train --out pipeline/subtraction/data/rb_model.json``; see :mod:`pipeline.simulate.realbogus_training`.
"""
from __future__ import annotations

import logging

from pipeline.core.exits import EXIT_OK

log = logging.getLogger("skydiff.realbogus")


def register(subparsers, common) -> None:
    p = subparsers.add_parser("realbogus", parents=[common], help="train or show the real-bogus model",
                              description="The real-bogus score of candidates: a logistic model over their "
                                          "features, trained on simulated pairs whose truth labels every "
                                          "candidate.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = sub.add_parser("train", parents=[common], help="simulate pairs, label their candidates, fit a model",
                           description="Simulates the training plan's pairs (two quadrants, four science "
                                       "images each, about 3-5 minutes on one core), fits the model and "
                                       "writes it as JSON.")
    train.add_argument("--out", required=True, metavar="FILE", help="model file to write (JSON)")
    train.add_argument("--version", default="skydiff-rb-1", help="version string stored in every candidate")
    train.set_defaults(func=run_train)
    show = sub.add_parser("show", parents=[common], help="print a model's coefficients and training record")
    show.add_argument("model", nargs="?", metavar="FILE",
                      help="model file (default: the one [realbogus] model names, else the shipped model)")
    show.set_defaults(func=run_show)


def run_train(args) -> int:
    from pipeline.formats.atomic import write_text_atomic
    from pipeline.subtraction.realbogus import model_summary
    from pipeline.simulate.realbogus_training import train_model

    model = train_model(args.cfg, args.version)
    write_text_atomic(model.to_json(), args.out)
    print(model_summary(model))
    return EXIT_OK


def run_show(args) -> int:
    from pipeline.subtraction.realbogus import RealBogusModel, load_model, model_summary
    model = RealBogusModel.read(args.model) if args.model else load_model(args.cfg.realbogus)
    print(model_summary(model))
    return EXIT_OK
