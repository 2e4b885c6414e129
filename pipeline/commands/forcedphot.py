"""``skydiff forcedphot``: forced PSF photometry at sky positions on the archived difference images."""
from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

from pipeline.core.exits import EXIT_OK, BadInputError, UsageError

log = logging.getLogger("skydiff.forcedphot")

#: Positions per request, as ZTF's service (Masci et al. 2023) takes at most 1,500.
MAX_POSITIONS = 100_000


def register(subparsers, common) -> None:
    p = subparsers.add_parser(
        "forcedphot", parents=[common], help="forced photometry at sky positions on the archived difference images",
        description="Forced PSF-fit photometry at fixed sky positions on every archived difference image "
                    "(paths.fparchive) covering them: one row per position and epoch, with the ZTF "
                    "forced-photometry service's columns, magnitudes above forcedphot.snr_detection and "
                    "upper limits below (README, 'Forced photometry').")
    p.add_argument("--pos", nargs=2, type=float, action="append", default=[], metavar=("RA", "DEC"),
                   help="a position (deg); repeat for several")
    p.add_argument("--positions", metavar="FILE",
                   help="table of positions with columns ra, dec (deg): CSV, ECSV or FITS")
    p.add_argument("--time", nargs=2, type=float, metavar=("MJDMIN", "MJDMAX"),
                   help="keep exposures starting at MJDMIN <= mjd <= MJDMAX")
    p.add_argument("--band", metavar="g,r,i", help="filters to keep (default all)")
    p.add_argument("--archive", metavar="DIR", help="archive root (default: paths.fparchive)")
    p.add_argument("--format", choices=["csv", "ecsv", "json"], default="csv", help="output format (csv)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the table here (default: stdout)")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the forced light curve(s) with upper limits")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr (there is none when stderr is not a terminal)")
    p.set_defaults(func=run_forcedphot)


def _read_positions(args):
    import numpy as np
    from astropy.table import Table

    ra = [r for r, _ in args.pos]
    dec = [d for _, d in args.pos]
    if args.positions:
        path = Path(args.positions)
        if not path.is_file():
            raise BadInputError(f"{path}: no such positions file")
        try:
            table = Table.read(path, format="ascii.ecsv" if path.suffix == ".ecsv" else
                               "fits" if path.suffix in (".fits", ".fit") else "ascii.csv")
        except (OSError, ValueError) as exc:
            raise BadInputError(f"{path}: unreadable positions table ({exc})") from None
        names = {n.lower(): n for n in table.colnames}
        if "ra" not in names or "dec" not in names:
            raise BadInputError(f"{path}: needs columns ra and dec (deg), has {', '.join(table.colnames)}")
        try:
            ra += np.asarray(table[names["ra"]], dtype=float).tolist()
            dec += np.asarray(table[names["dec"]], dtype=float).tolist()
        except (TypeError, ValueError):
            raise BadInputError(f"{path}: ra/dec are not numbers") from None
    if not ra:
        raise UsageError("give positions: --pos RA DEC (repeatable) or --positions FILE")
    if len(ra) > MAX_POSITIONS:
        raise UsageError(f"{len(ra)} positions: at most {MAX_POSITIONS} per run")
    for i, (r, d) in enumerate(zip(ra, dec)):
        if not (math.isfinite(r) and math.isfinite(d) and 0 <= r < 360 and -90 <= d <= 90):
            raise UsageError(f"position {i}: ({r}, {d}) is not 0 <= ra < 360, -90 <= dec <= 90 (deg)")
    return np.asarray(ra), np.asarray(dec)


def parse_bands(text: str | None) -> tuple[int, ...] | None:
    """Filter ids of a ``g,r,i`` list (None: all)."""
    from pipeline.matchfile.layout import fid_of_band

    if not text:
        return None
    fids = []
    for band in text.split(","):
        if band.strip().lower() not in ("g", "r", "i"):
            raise UsageError(f"--band: {band.strip()!r} is not g, r or i")
        fids.append(fid_of_band(band.strip().lower()))
    return tuple(sorted(set(fids)))


def run_forcedphot(args) -> int:
    from pipeline.forcedphot.archive import DifferenceArchive
    from pipeline.forcedphot.lightcurves import forced_photometry, plot_forced_lightcurve
    from pipeline.matchfile.lightcurves import serialise

    ra, dec = _read_positions(args)
    fids = parse_bands(args.band)
    jd_range = (-math.inf, math.inf)
    if args.time:
        low, high = args.time
        if not (math.isfinite(low) and math.isfinite(high)) or low > high:
            raise UsageError(f"--time: {low} {high} is not a finite MJDMIN <= MJDMAX")
        # jd < jd_max: the upper end is made inclusive by a microsecond's slack.
        jd_range = (low + 2400000.5, high + 2400000.5 + 1e-11 * 86400)
    archive = DifferenceArchive(args.archive or args.cfg.paths.resolve("fparchive"))
    bar = None
    progress = None
    if not args.no_progress:
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (logs, pipes).
        bar = tqdm(total=0, unit="epoch", desc="forced photometry", file=sys.stderr, leave=False, disable=None)

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
    try:
        table = forced_photometry(archive, ra, dec, jd_range, fids, args.cfg.forcedphot, progress)
    finally:
        if bar is not None:
            bar.close()
    body, _ = serialise(table, args.format)
    if args.output:
        from pipeline.formats.atomic import atomic_path

        with atomic_path(args.output) as temporary:
            temporary.write_bytes(body)
    else:
        sys.stdout.buffer.write(body)
        sys.stdout.flush()
    if args.plot:
        plot_forced_lightcurve(table, args.plot, title="forced photometry")
        log.info("plot written to %s", args.plot)
    log.info("%d row(s): %d position(s), %d epoch(s)", len(table), len(ra),
             len(set(table["pid"].tolist())) if len(table) else 0)
    return EXIT_OK
