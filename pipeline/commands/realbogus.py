"""``skydiff realbogus``: train, calibrate and show the real-bogus models.

Two scores per candidate: ``rb``, a random forest over the candidate's features, calibrated
into a probability (``train``, ``calibrate``; :mod:`pipeline.simulate.realbogus_training`), and
``drb``, a small convolutional network over its cutout triplet (``train-drb``;
:mod:`pipeline.simulate.drb_training`).  The shipped models
(``pipeline/subtraction/data/rb_model.json``, ``pipeline/subtraction/data/drb_model.npz``) were
made with these commands; ``show`` describes them and, with ``--roc``, measures both on
held-out simulated pairs.
"""
from __future__ import annotations

import logging

from pipeline.core.exits import EXIT_OK

log = logging.getLogger("skydiff.realbogus")


def register(subparsers, common) -> None:
    p = subparsers.add_parser("realbogus", parents=[common], help="train, calibrate or show the real-bogus models",
                              description="The real-bogus scores of candidates: rb, a random forest over their "
                                          "features calibrated into a probability, and drb, a convolutional "
                                          "network over their cutout triplet; both trained on simulated pairs "
                                          "whose truth labels every candidate.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    train = sub.add_parser("train", parents=[common], help="simulate pairs, label their candidates, fit rb",
                           description="Simulates the training plan's pairs (three quadrants, four science "
                                       "images each), fits the forest, calibrates it on the validation pairs "
                                       "(one more quadrant; about 5-8 minutes on one core in all) and writes "
                                       "it as JSON.")
    train.add_argument("--out", required=True, metavar="FILE", help="model file to write (JSON)")
    train.add_argument("--version", default="skydiff-rb-2", help="version string stored in every candidate")
    train.set_defaults(func=run_train)
    calibrate = sub.add_parser("calibrate", parents=[common], help="calibrate an rb model into a probability",
                               description="Scores the candidates of the validation pairs (simulated, about "
                                           "2 minutes) with the model's forest and fits Platt scaling to their "
                                           "truth labels; writes the model with its calibration.")
    calibrate.add_argument("model", nargs="?", metavar="FILE",
                           help="rb model file (default: the one [realbogus] model names, else the shipped one)")
    calibrate.add_argument("--out", required=True, metavar="FILE", help="calibrated model file to write (JSON)")
    calibrate.set_defaults(func=run_calibrate)
    drb = sub.add_parser("train-drb", parents=[common], help="train the drb network on labelled cutout triplets",
                         description="Trains the convolutional drb network on the cutout triplets of simulated "
                                     "pairs (default: five quadrants x six science images for training, one "
                                     "more quadrant for validation; about 10 minutes on one core) or of a "
                                     "folder of labelled cutouts (FOLDER/real/*.fits and FOLDER/bogus/*.fits, "
                                     "each with SCIENCE, REFERENCE and DIFFERENCE extensions of (N, 63, 63) "
                                     "cubes, as cutouts.fits). Needs the 'train' extra (JAX, optax).")
    drb.add_argument("--out", required=True, metavar="FILE", help="drb model file to write (.npz)")
    drb.add_argument("--version", default="skydiff-drb-1", help="drbversion stored in every candidate")
    drb.add_argument("--cutouts", metavar="FOLDER", help="train on this folder of labelled cutouts instead")
    drb.add_argument("--validation-fraction", type=float, default=0.2,
                     help="with --cutouts: fraction of the files held out for validation (default 0.2)")
    drb.add_argument("--epochs", type=int, default=40, help="training epochs (default 40)")
    drb.add_argument("--seed", type=int, default=0, help="seed of the initial weights and batches")
    drb.add_argument("--keep-triplets", metavar="FOLDER",
                     help="also write the simulated training triplets there as a labelled cutout folder")
    drb.set_defaults(func=run_train_drb)
    show = sub.add_parser("show", parents=[common], help="describe the models; --roc: measure them on held-out pairs",
                          description="Prints the rb and drb models' training records; with --roc simulates "
                                      "held-out pairs (two quadrants x four science images, about 3 minutes), "
                                      "draws the ROC curves of rb and drb as a PNG and prints purity and "
                                      "completeness at their thresholds for the candidates at S/N >= 5.")
    show.add_argument("model", nargs="?", metavar="FILE",
                      help="rb model file (default: the one [realbogus] model names, else the shipped model)")
    show.add_argument("--drb", metavar="FILE", help="drb model file (default: [realbogus] drb_model, else shipped)")
    show.add_argument("--roc", metavar="PNG", help="measure on held-out simulated pairs and draw the ROC curves")
    show.set_defaults(func=run_show)


def run_train(args) -> int:
    from pipeline.formats.atomic import write_text_atomic
    from pipeline.simulate.drb_training import DRB_VALIDATION_PLAN, simulated_triplets
    from pipeline.simulate.realbogus_training import train_model
    from pipeline.subtraction.realbogus import calibrate_model, model_summary

    model = train_model(args.cfg, args.version)
    validation = simulated_triplets(args.cfg, DRB_VALIDATION_PLAN)
    model = calibrate_model(model, model.forest_fraction(validation.features), validation.label,
                            "validation pairs " + str([list(q) for q in DRB_VALIDATION_PLAN.quadrants]))
    write_text_atomic(model.to_json(), args.out)
    print(model_summary(model))
    return EXIT_OK


def run_calibrate(args) -> int:
    from pipeline.formats.atomic import write_text_atomic
    from pipeline.simulate.drb_training import DRB_VALIDATION_PLAN, simulated_triplets
    from pipeline.subtraction.realbogus import RealBogusModel, calibrate_model, load_model, model_summary

    model = RealBogusModel.read(args.model) if args.model else load_model(args.cfg.realbogus)
    validation = simulated_triplets(args.cfg, DRB_VALIDATION_PLAN)
    model = calibrate_model(model, model.forest_fraction(validation.features), validation.label,
                            "validation pairs " + str([list(q) for q in DRB_VALIDATION_PLAN.quadrants]))
    write_text_atomic(model.to_json(), args.out)
    print(model_summary(model))
    return EXIT_OK


def _write_drb(model, path) -> None:
    from pipeline.formats.atomic import atomic_path

    with atomic_path(path) as temporary:
        temporary.write_bytes(model.to_bytes())


def run_train_drb(args) -> int:
    from pipeline.core.exits import UsageError
    from pipeline.subtraction.drb import drb_summary
    from pipeline.simulate.drb_training import (DRB_TRAINING_PLAN, DRB_VALIDATION_PLAN, folder_triplets,
                                                require_training_framework, simulated_triplets,
                                                split_validation, train_drb, write_folder_triplets)

    require_training_framework()   # fail before minutes of simulation when JAX is missing
    if args.cutouts:
        if not 0 < args.validation_fraction < 1:
            raise UsageError(f"--validation-fraction must be in (0, 1), got {args.validation_fraction}")
        train, validation = split_validation(folder_triplets(args.cutouts), args.validation_fraction, args.seed)
        source = f"labelled cutouts in {args.cutouts}"
    else:
        train = simulated_triplets(args.cfg, DRB_TRAINING_PLAN)
        validation = simulated_triplets(args.cfg, DRB_VALIDATION_PLAN)
        source = ("simulated pairs: training " + str([list(q) for q in DRB_TRAINING_PLAN.quadrants])
                  + ", validation " + str([list(q) for q in DRB_VALIDATION_PLAN.quadrants]))
        if args.keep_triplets:
            write_folder_triplets(train, args.keep_triplets)
    model = train_drb(train, validation, args.version, epochs=args.epochs, seed=args.seed, source=source)
    _write_drb(model, args.out)
    print(drb_summary(model))
    return EXIT_OK


def run_show(args) -> int:
    from pipeline.subtraction.drb import DrbModel, drb_summary, load_drb_model
    from pipeline.subtraction.realbogus import RealBogusModel, load_model, model_summary

    rb_model = RealBogusModel.read(args.model) if args.model else load_model(args.cfg.realbogus)
    drb_model = DrbModel.read(args.drb) if args.drb else load_drb_model(args.cfg.realbogus)
    print(model_summary(rb_model))
    print(drb_summary(drb_model))
    if args.roc:
        from pipeline.bench.drb import RB_THRESHOLD, held_out_figures, plot_roc, score_held_out
        from pipeline.simulate.drb_training import DRB_HELD_OUT_PLAN, simulated_triplets

        held_out = simulated_triplets(args.cfg, DRB_HELD_OUT_PLAN)
        scores = score_held_out(held_out, rb_model, drb_model)
        figures = held_out_figures(held_out, scores, RB_THRESHOLD, drb_model.threshold)
        print(f"held-out simulated pairs {[list(q) for q in DRB_HELD_OUT_PLAN.quadrants]}, candidates at "
              f"S/N >= 5: {figures['real']} real, {figures['bogus']} bogus")
        for name in ("rb", "drb"):
            print(f"  {name:>3} >= {figures[f'{name}_threshold']:.2f}: purity {figures[f'{name}_purity']:.4f}, "
                  f"completeness {figures[f'{name}_completeness']:.4f}, ROC area {figures[f'{name}_roc_auc']:.4f}")
        plot_roc(held_out, scores, {"rb": RB_THRESHOLD, "drb": drb_model.threshold}, args.roc)
        print(f"ROC curves: {args.roc}")
    return EXIT_OK
