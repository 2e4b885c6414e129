"""``skydiff catalogs``: build the offline catalogue tile stores (Gaia, PS1-like) and list
what they hold.  One code path for both: ``--catalog`` picks the kind, its default store
(``paths.catalogs`` / ``paths.ps1_catalogs``), TAP service and table."""
from __future__ import annotations

import argparse
import logging


from pipeline.core.exits import EXIT_OK, EXIT_USAGE

log = logging.getLogger("skydiff.catalogs")


#: The data root (a :class:`pipeline.core.config.PathsConfig` field) of each catalogue's store (also the
#: ``--catalog`` choices: the catalogue package is loaded only when a command runs).
STORE_PATH_KEY = {"gaia": "catalogs", "ps1": "ps1_catalogs"}


def register(subparsers, common) -> None:
    parser = subparsers.add_parser(
        "catalogs", help="catalogue stores (Gaia, PS1-like): prefetch tiles, list them",
        description="Build the offline Gaia or PS1-like tile store (prefetch) and list its tiles (info).")
    actions = parser.add_subparsers(dest="catalogs_action", metavar="ACTION")
    actions.required = True

    prefetch = actions.add_parser(
        "prefetch", parents=[common], help="write the tiles covering fields or a sky box",
        description="Write one LDAC tile per HEALPix pixel overlapping the region, from a local "
                    "table in the catalogue's column names (Gaia archive names; for ps1: objid, ra, "
                    "dec, gmag, rmag, imag, zmag, ps_score) or from a TAP service (the only step "
                    "that uses the network).")
    prefetch.add_argument("--catalog", choices=sorted(STORE_PATH_KEY), default="gaia",
                          help="which catalogue (default gaia; ps1: the PS1-like store of the alert context)")
    source = prefetch.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-table", metavar="FILE", help="FITS table in the catalogue's column names")
    source.add_argument("--tap-url", metavar="URL", nargs="?", const="",
                        help="TAP service (without a value: the catalogue's own, ESA's Gaia archive or MAST's "
                             "PS1 DR2)")
    prefetch.add_argument("--field", nargs=2, type=float, action="append", metavar=("RA", "DEC"),
                          help="a survey field centre in degrees (repeatable)")
    prefetch.add_argument("--field-size", nargs=2, type=float, default=(7.5, 7.3),
                          metavar=("WIDTH", "HEIGHT"), help="field box in degrees (default 7.5 7.3)")
    prefetch.add_argument("--field-radius", type=float, metavar="DEG",
                          help="use a cone of this radius per field instead of the box")
    prefetch.add_argument("--margin", type=float, default=0.25, metavar="DEG",
                          help="added around each field box (default 0.25)")
    prefetch.add_argument("--box", nargs=4, type=float, metavar=("RAMIN", "RAMAX", "DECMIN", "DECMAX"),
                          help="a sky box in degrees (RAMIN > RAMAX wraps through 0)")
    prefetch.add_argument("--store", metavar="DIR",
                          help="store directory (default: paths.catalogs, for ps1 paths.ps1_catalogs)")
    prefetch.add_argument("--mag-limit", type=float, metavar="MAG",
                          help="keep phot_g_mean_mag (ps1: rmag) <= MAG")
    prefetch.add_argument("--nside", type=int, help="HEALPix nside (default: catalogs.store.DEFAULT_NSIDE, 64)")
    prefetch.add_argument("--timeout", type=float, default=120.0, metavar="S", help="per TAP query (default 120)")
    prefetch.add_argument("--tap-table", "--gaia-table", dest="tap_table", metavar="TABLE",
                          help="TAP table (default: the catalogue's, gaiadr3.gaia_source or dbo.MeanObjectView)")
    prefetch.add_argument("--max-rows", type=int, metavar="N", help="MAXREC per TAP query")
    prefetch.add_argument("--overwrite", action="store_true", help="refetch tiles already stored from TAP")
    prefetch.set_defaults(func=run_prefetch)

    info = actions.add_parser("info", parents=[common], help="list the tiles of a store",
                              description="Print a store's nside, tile count, rows and one line per tile.")
    info.add_argument("--catalog", choices=sorted(STORE_PATH_KEY), default="gaia",
                      help="whose default store to list (default gaia)")
    info.add_argument("--store", metavar="DIR",
                      help="store directory (default: paths.catalogs, for ps1 paths.ps1_catalogs)")
    info.set_defaults(func=run_info)




def _store_dir(args):
    return args.store or args.cfg.paths.resolve(STORE_PATH_KEY[args.catalog])


def _regions(args) -> list:
    from catalogs import SkyBox, cone_region, field_region
    regions = []
    for ra, dec in args.field or []:
        if args.field_radius is not None:
            regions.append(cone_region(ra, dec, args.field_radius))
        else:
            regions.append(field_region(ra, dec, *args.field_size, margin_deg=args.margin))
    if args.box:
        regions.append(SkyBox(*args.box))
    return regions


def run_prefetch(args: argparse.Namespace) -> int:
    """0 done, 2 no region; a bad table or store (3) and an archive failure (1) propagate."""
    from catalogs import DEFAULT_NSIDE, catalog_kind, prefetch_from_table, prefetch_from_tap
    nside = DEFAULT_NSIDE if args.nside is None else args.nside
    store = _store_dir(args)
    regions = _regions(args)
    if not regions:
        log.error("catalogs prefetch: give a region, --field RA DEC (repeatable) or --box")
        return EXIT_USAGE
    kind = catalog_kind(args.catalog)
    if args.from_table:
        prefetch_from_table(args.from_table, store, regions, nside=nside,
                                     mag_limit=args.mag_limit, kind=kind)
    else:
        prefetch_from_tap(args.tap_url or None, store, regions, mag_limit=args.mag_limit,
                                   timeout_s=args.timeout, nside=nside,
                                   gaia_table=args.tap_table, max_rows=args.max_rows,
                                   overwrite=args.overwrite, kind=kind)
    return EXIT_OK


def run_info(args: argparse.Namespace) -> int:
    from catalogs import read_store_info
    info = read_store_info(_store_dir(args))
    print(f"store   {info.path}")
    print(f"kind    {info.kind.name} ({info.kind.store_format})")
    print(f"nside   {info.nside} ({info.order})")
    print(f"tiles   {len(info.tiles)}")
    print(f"rows    {info.total_rows}")
    print(f"{'tile':>8} {'rows':>8} {'maglim':>7}  {'written':<25} source")
    for pixel in sorted(info.tiles):
        entry = info.tiles[pixel]
        maglim = "-" if entry.mag_limit is None else f"{entry.mag_limit:.2f}"
        print(f"{pixel:>8} {entry.rows:>8} {maglim:>7}  {entry.written:<25} {entry.source}")
    return EXIT_OK
