"""``skydiff matchfile``: seed matchfiles from references, append science images to them, fold them.

``matchfile seed REF.fits...`` seeds the matchfile of each reference's field, CCD, quadrant
and filter from its PSF catalogue (kept as it is when already seeded from that reference).
``matchfile append SOURCE... [--reference REF.fits] [--refcat GAIA]`` appends each SOURCE, a
``skydiff subtract`` output folder or a solved science image, as one epoch (appending an
exposure again replaces it); see :mod:`pipeline.matchfile.epochs` for how the epoch is built.
A folder's science image, reference and zero point are those its ``qa.json`` names; for an
image, ``--reference`` seeds the matchfile and, when the image has neither MAGZP nor
``--refcat``, calibrates it.  ``--root`` defaults to ``paths.matchfiles``.  Appending (and
seeding) takes no lock and never folds: several processes on several nodes may append at once.

``matchfile fold [MATCHFILE...] [--root DIR] [--all]`` is the dedicated fold step: it folds
the pending epoch shards of every matchfile under the root (or of the MATCHFILEs named)
that has at least ``[matchfile] combine_threshold`` of them, or claimed shards a killed fold
left (every one with ``--all``), and puts back footprint-index entries seeders lost.  Run
one fold at a time per matchfile root (the Slurm fold job is a singleton; see
:mod:`pipeline.matchfile.store`).

Exit status: 0 every source appended (every matchfile folded); 3 bad input (the message
names the file and the problem; the other sources are still appended); 1 other failures.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from pipeline.core.exits import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK

__all__ = ["register"]

log = logging.getLogger("skydiff.matchfile")


def register(subparsers, common) -> None:
    p = subparsers.add_parser("matchfile", parents=[common], help="seed matchfiles, append science epochs",
                              description="HDF5 matchfiles (one per field, CCD, quadrant and filter): seed them "
                                          "from reference catalogues, append the PSF photometry of science images.")
    sub = p.add_subparsers(dest="matchfile_command", metavar="SUBCOMMAND")
    sub.required = True
    seed = sub.add_parser("seed", parents=[common], help="seed matchfiles from reference images",
                          description="Seed the matchfile of each reference from its PSF catalogue (idempotent).")
    seed.add_argument("references", nargs="+", metavar="REF.fits", help="reference images (skydiff reference build)")
    seed.add_argument("--root", metavar="DIR", help="matchfile root (default: paths.matchfiles)")
    seed.set_defaults(func=run_seed)

    append = sub.add_parser("append", parents=[common], help="append science images' photometry as epochs",
                            description="Append each SOURCE (a skydiff subtract output folder, or a solved "
                                        "science image) to its matchfile; re-appending an exposure replaces it.")
    append.add_argument("sources", nargs="+", metavar="SOURCE", help="subtraction output folder or solved image")
    append.add_argument("--reference", metavar="REF.fits", help="reference image: seeds the matchfile (default for "
                        "a folder: the reference its qa.json names)")
    append.add_argument("--refcat", metavar="GAIA", help="Gaia tile store or FITS table to fit a solved image's zero "
                        "point (a folder uses the subtraction's)")
    append.add_argument("--root", metavar="DIR", help="matchfile root (default: paths.matchfiles)")
    append.set_defaults(func=run_append)

    fold = sub.add_parser("fold", parents=[common], help="fold matchfiles' pending epoch shards into their main files",
                          description="The dedicated fold step: fold the pending epoch shards of every matchfile "
                                      "under the root (or of the MATCHFILEs given) that has at least [matchfile] "
                                      "combine_threshold of them or shards a killed fold claimed (all with --all), "
                                      "and repair the footprint index.  Run one at a time per root.")
    fold.add_argument("matchfiles", nargs="*", metavar="MATCHFILE", help="matchfiles to fold (default: all under "
                      "the root)")
    fold.add_argument("--root", metavar="DIR", help="matchfile root (default: paths.matchfiles)")
    fold.add_argument("--all", action="store_true", help="fold every pending shard, whatever the threshold")
    fold.set_defaults(func=run_fold)


def _root(args) -> Path:
    return Path(args.root or args.cfg.paths.resolve("matchfiles"))


def run_seed(args) -> int:
    from pipeline.matchfile.store import MatchfileError
    from pipeline.matchfile.epochs import BAD_INPUT_ERRORS, seed_matchfile_from_reference
    from pipeline.reference.files import read_reference
    from pipeline.reference.model import ReferenceError

    status = EXIT_OK
    for path in args.references:
        try:
            target = seed_matchfile_from_reference(_root(args), read_reference(path), args.cfg)
        except (ReferenceError, MatchfileError, *BAD_INPUT_ERRORS) as exc:
            log.error("bad input: %s", exc)
            status = EXIT_BAD_INPUT
            continue
        print(f"{path}: {target}")
    return status


def run_append(args) -> int:
    from pipeline.matchfile.store import MatchfileError
    from pipeline.matchfile.epochs import BAD_INPUT_ERRORS, append_from_files

    status = EXIT_OK
    for source in args.sources:
        start = time.perf_counter()
        try:
            result = append_from_files(_root(args), source, args.cfg, reference_path=args.reference,
                                       refcat=args.refcat)
        except BAD_INPUT_ERRORS as exc:
            log.error("bad input: %s", exc)
            status = max(status, EXIT_BAD_INPUT)
            continue
        except MatchfileError as exc:
            log.error("%s: %s", source, exc)
            status = EXIT_FAILED if status == EXIT_OK else status
            continue
        print(f"{source}: expid {result.expid}: {result.nmatched} matched, {result.nunmatched} unmatched "
              f"({time.perf_counter() - start:.1f} s)")
    return status


def run_fold(args) -> int:
    from pipeline.matchfile.store import fold_root

    root = _root(args)
    if not root.is_dir():
        if args.root:
            log.error("bad input: matchfile root %s: no such directory", root)
            return EXIT_BAD_INPUT
        # The configured root not made yet: no matchfile seeded, nothing to fold (a fold job
        # after an exposure whose quadrants all stopped before the matchfile stage).
        print(f"no matchfile root {root} yet: nothing to fold")
        return EXIT_OK
    missing = [p for p in args.matchfiles if not Path(p).is_file()]
    if missing:
        log.error("bad input: no such matchfile: %s", ", ".join(missing))
        return EXIT_BAD_INPUT
    start = time.perf_counter()
    report = fold_root(root, args.cfg.matchfile, paths=args.matchfiles or None, everything=args.all)
    for path, count in sorted(report.folded.items()):
        print(f"{path}: folded {count} epoch shard(s)")
    print(f"folded {sum(report.folded.values())} shard(s) into {len(report.folded)} matchfile(s)"
          f"{f', {len(report.failed)} failed' if report.failed else ''}"
          f"{f', {report.indexed} index entries restored' if report.indexed else ''}"
          f" ({time.perf_counter() - start:.1f} s)")
    return EXIT_FAILED if report.failed else EXIT_OK
