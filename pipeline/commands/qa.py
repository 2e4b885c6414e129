"""``skydiff qa scale-airmass``: quality-assurance plots over many solved images."""
from __future__ import annotations

from pipeline.core.exits import EXIT_OK


def register(subparsers, common) -> None:
    p = subparsers.add_parser("qa", parents=[common], help="QA plots over many solved images",
                              description="Quality-assurance figures over sets of solved images.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    scale = actions.add_parser(
        "scale-airmass", parents=[common], help="solved pixel scale against airmass, with the refraction model",
        description="Measure the pixel scale at the centre of each solved image, take annual aberration out "
                    "(the Earth's barycentric velocity changes the catalogue-frame scale by up to 2e-4 through "
                    "the year), refer each quadrant and filter to its lowest-airmass image and plot the change "
                    "against airmass with the refraction model.")
    scale.add_argument("images", nargs="+", metavar="IMAGE", help="solved quadrant images (skydiff astrometry's)")
    scale.add_argument("--out", required=True, metavar="FILE.png", help="the plot")
    scale.add_argument("--table", metavar="FILE.ecsv", help="also write the per-image figures as a table")
    scale.set_defaults(func=run_scale_airmass)


def run_scale_airmass(args) -> int:
    import numpy as np

    from pipeline.astrometry.plots import plot_scale_airmass
    from pipeline.astrometry.scale_airmass import scale_airmass_study
    from pipeline.formats.atomic import write_table_atomic

    table, models, measurements = scale_airmass_study(args.images, args.cfg)
    for row in table:
        print(f"expid {row['expid']} rcid {row['rcid']:2d} {row['filter']} airmass {row['airmass']:.3f} "
              f"beta.n {row['beta_n']:+.2e}: scale {row['scale_pct']:+.4f} % as solved, "
              f"{row['scale_pct_corrected']:+.4f} % aberration out, model {row['model_pct']:+.4f} %")
    raw = np.asarray(table["scale_pct"] - table["model_pct"])
    corrected = np.asarray(table["residual_pct"])
    print(f"{len(table)} usable of {len(measurements)} image(s); residual from the model, RMS: "
          f"{np.sqrt(np.mean(raw ** 2)):.4f} % as solved, {np.sqrt(np.mean(corrected ** 2)):.4f} % with aberration "
          f"taken out; plot {plot_scale_airmass(table, models, args.out)}")
    if args.table:
        write_table_atomic(table, args.table)
    return EXIT_OK
