"""``skydiff simulate``: simulate nights of survey images with their truth."""
from __future__ import annotations

import logging
from pathlib import Path


from pipeline.simulate.fields import DEFAULT_FIELDS, Field

log = logging.getLogger("skydiff.simulate")


def _field(text: str) -> Field:
    """A field as ``ID`` (one of the default fields) or ``ID:RA:DEC`` (degrees)."""
    parts = text.split(":")
    try:
        if len(parts) == 3:
            return Field(int(parts[0]), float(parts[1]), float(parts[2]))
        if len(parts) == 1:
            fieldid = int(parts[0])
            for known in DEFAULT_FIELDS:
                if known.fieldid == fieldid:
                    return known
            raise ValueError(f"field {fieldid} is not a default field "
                             f"({', '.join(str(f.fieldid) for f in DEFAULT_FIELDS)}); give ID:RA:DEC")
    except ValueError as exc:
        raise ValueError(f"--fields {text!r}: {exc}") from None
    raise ValueError(f"--fields {text!r}: expected ID or ID:RA:DEC")


def register(subparsers, common) -> None:
    p = subparsers.add_parser(
        "simulate", parents=[common], help="simulate survey images, a Gaia-like catalogue and the truth",
        description="Plan nights of observations, draw a sky (stars, galaxies, transients), render every "
                    "requested quadrant and write images, the Gaia-like catalogue and the truth under --out.")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--fields", nargs="+", metavar="FIELD",
                   help="fields as ID (a default field) or ID:RA:DEC; default: "
                        + " ".join(str(f.fieldid) for f in DEFAULT_FIELDS))
    p.add_argument("--nights", type=int, default=1, metavar="N", help="number of consecutive nights (1)")
    p.add_argument("--start-night", default="2026-03-15", metavar="YYYY-MM-DD", help="first UT night")
    p.add_argument("--filters", default="ZTF_g,ZTF_r", help="comma-separated bands (g,r,i or ZTF_g,...)")
    p.add_argument("--epochs-per-night", type=int, default=4, metavar="K")
    p.add_argument("--quadrants", default="all", help="comma-separated rcids 0-63, or 'all'")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: the configuration's)")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="worker processes")
    p.add_argument("--mef", action="store_true",
                   help="also write each exposure as one multi-extension file exposures/<night>/<expid>.fits")
    p.add_argument("--layout", choices=("native", "ipac"), default="native",
                   help="quadrant files: the input contract's (native, with a MASK extension), or ZTF's own "
                        "IPAC products, a ztf_<filefracday>_<field>_<filter>_c<CC>_o_q<Q>_sciimg.fits with its "
                        "_mskimg.fits per quadrant (IPAC's mask bits)")
    p.add_argument("--compress", choices=("none", "fz", "gz"), default="none",
                   help="with --layout ipac: write .fits.fz (lossless tile compression) or .fits.gz")
    p.add_argument("--reference-nights", type=int, default=0, metavar="N",
                   help="also simulate N nights of a season 120 days earlier (airmass <= 1.3) for references")
    p.set_defaults(func=run)


def _night(text: str):
    from astropy.time import Time
    try:
        return Time(text, format="iso", scale="utc")
    except ValueError:
        raise ValueError(f"--start-night {text!r}: expected YYYY-MM-DD") from None


def _nights(start: str, count: int, step: int = 1) -> list[str]:
    from astropy.time import TimeDelta
    first = _night(start)
    if count < 0 or (count < 1 and step == 1):
        raise ValueError("--nights must be at least 1")
    return [(first + TimeDelta(n * step, format="jd")).strftime("%Y-%m-%d") for n in range(count)]


def _days_before(night: str, days: int) -> str:
    from astropy.time import TimeDelta
    return (_night(night) - TimeDelta(days, format="jd")).strftime("%Y-%m-%d")


def _filters(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    return [name if name.startswith("ZTF_") else f"ZTF_{name}" for name in names]


def run(args) -> int:
    from pipeline.core.exits import EXIT_USAGE
    from pipeline.simulate.run import simulate_run
    try:
        fields = [_field(text) for text in args.fields] if args.fields else list(DEFAULT_FIELDS)
        nights = _nights(args.start_night, args.nights)
        if args.compress != "none" and args.layout != "ipac":
            raise ValueError("--compress applies to --layout ipac only")
        if args.mef and args.layout == "ipac":
            raise ValueError("--mef writes the native layout; it cannot be combined with --layout ipac")
        if args.epochs_per_night < 1 or args.jobs < 1:
            raise ValueError("--epochs-per-night and --jobs must be at least 1")
        reference_nights = _nights(_days_before(args.start_night, 120), args.reference_nights, step=3)
        summary = simulate_run(args.cfg, args.out, fields, nights, filters=_filters(args.filters),
                               epochs_per_night=args.epochs_per_night, quadrants=args.quadrants,
                               seed=args.seed, jobs=args.jobs, reference_nights=reference_nights)
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    timings = summary["timings_s"]
    print(f"simulated {summary['n_exposures']} exposure(s), {summary['n_quadrant_images']} quadrant image(s) "
          f"of field(s) {', '.join(str(f['fieldid']) for f in summary['fields'])} "
          f"over {len(summary['nights'])} night(s) in {timings['total']:.1f} s")
    print(f"sky: {summary['n_stars']} stars, {summary['n_galaxies']} galaxies, "
          f"{summary['n_transients']} transients; seed {summary['seed']}")
    if args.mef:
        from pipeline.formats.exposure import write_exposure_mef
        for folder in sorted(Path(args.out, "exposures").glob("*/*")):
            if folder.is_dir():
                write_exposure_mef(sorted(folder.glob("*.fits")), folder.parent / f"{folder.name}.fits")
        print("multi-extension exposures: exposures/<night>/<expid>.fits")
    if args.layout == "ipac":
        from pipeline.formats.exposure import write_exposure_ipac
        for folder in sorted(Path(args.out, "exposures").glob("*/*")):
            if folder.is_dir():
                write_exposure_ipac(sorted(folder.glob("*.fits")), folder, args.compress, remove=True)
        print("IPAC layout: exposures/<night>/<expid>/ztf_<filefracday>_<field>_<filter>_c<CC>_o_q<Q>_sciimg.fits"
              + {"none": "", "fz": ".fz", "gz": ".gz"}[args.compress] + " and _mskimg (truth files keep the "
              "native names)")
    print(f"written under {args.out}: exposures/, gaia/gaia_catalog.fits, truth/, simulation.json")
    return 0
