"""QA plots a survey scientist expects: scale against airmass, astrometric residual maps.

Matplotlib with the Agg backend (no display); every function writes one PNG atomically.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from astropy.table import Table  # noqa: E402

from pipeline.core.refraction import RefractionModel  # noqa: E402
from pipeline.formats.atomic import atomic_path  # noqa: E402

__all__ = ["plot_scale_vs_airmass", "plot_residual_map", "residual_map_figure", "scale_airmass_figure",
           "plot_scale_airmass"]


def _save(fig, path: str | os.PathLike) -> Path:
    try:
        with atomic_path(path) as temporary:
            fig.savefig(temporary, dpi=110, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def plot_scale_vs_airmass(records: Iterable[Mapping], model: RefractionModel, reference_airmass: float,
                          path: str | os.PathLike, title: str = "",
                          ylabel: str = "pixel scale change vs prior (%)") -> Path:
    """Percent pixel-scale change (solution vs prior) against the quadrant's airmass.

    Parameters
    ----------
    records : iterable of mappings
        Astrometry QA records with ``airmass_quadrant``, ``scale_diff_pct_mean`` and ``usable``.
    model : RefractionModel
        The refraction model whose curve is drawn.
    reference_airmass : float
        The prior's airmass (where the curve is zero).
    """
    rows = [r for r in records if r.get("scale_diff_pct_mean") is not None
            and np.isfinite(r.get("airmass_quadrant", np.nan))]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if rows:
        am = np.array([r["airmass_quadrant"] for r in rows])
        ds = np.array([r["scale_diff_pct_mean"] for r in rows])
        ok = np.array([bool(r.get("usable")) for r in rows])
        ax.scatter(am[ok], ds[ok], s=12, c="tab:blue", label="usable quadrants")
        if (~ok).any():
            ax.scatter(am[~ok], ds[~ok], s=18, marker="x", c="tab:red", label="unusable")
        grid = np.linspace(1.0, max(2.6, am.max() + 0.1), 200)
    else:
        grid = np.linspace(1.0, 2.6, 200)
    ax.plot(grid, model.scale_change_pct(grid, reference_airmass), "k-",
            label=f"refraction model ({model.pressure_hpa:.0f} hPa, {model.temperature_c:.0f} C)")
    ax.set_xlabel("airmass at the quadrant centre")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "Pixel scale against airmass")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def _key_length(amplitudes: np.ndarray) -> float:
    """A round arrow-key length (1, 2 or 5 x 10^n mas) near the typical binned residual."""
    finite = amplitudes[np.isfinite(amplitudes) & (amplitudes > 0)]
    typical = float(np.percentile(finite, 75)) if finite.size else 1.0
    exponent = np.floor(np.log10(typical))
    mantissa = typical / 10 ** exponent
    return float(min((1.0, 2.0, 5.0, 10.0), key=lambda m: abs(np.log(m / mantissa))) * 10 ** exponent)


def residual_map_figure(matches: Table, shape=(3080, 3072), title: str = "", bins: int = 12):
    """Binned astrometric residuals (detection minus Gaia, mas) across the quadrant (a Figure).

    ``matches`` is the table from :func:`pipeline.astrometry.qa.astrometric_qa` (x, y,
    dra_mas, ddec_mas). Left: the mean residual per cell as arrows coloured by their length,
    with an arrow key; right: the residual distributions. The title is the figure's, above
    both panels, so it never meets the colour bar.
    """
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(11, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_q, ax_h = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    x, y = np.asarray(matches["x"]), np.asarray(matches["y"])
    dra, ddec = np.asarray(matches["dra_mas"]), np.asarray(matches["ddec_mas"])
    xe = np.linspace(0.5, shape[1] + 0.5, bins + 1)
    ye = np.linspace(0.5, shape[0] + 0.5, bins + 1)
    count, _, _ = np.histogram2d(x, y, [xe, ye])
    sum_ra, _, _ = np.histogram2d(x, y, [xe, ye], weights=dra)
    sum_dec, _, _ = np.histogram2d(x, y, [xe, ye], weights=ddec)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_ra, mean_dec = sum_ra / count, sum_dec / count
    xc, yc = np.meshgrid(0.5 * (xe[1:] + xe[:-1]), 0.5 * (ye[1:] + ye[:-1]), indexing="ij")
    amplitude = np.hypot(mean_ra, mean_dec)
    q = ax_q.quiver(xc, yc, mean_ra, mean_dec, amplitude, angles="xy", cmap="viridis")
    key = _key_length(amplitude)
    ax_q.quiverkey(q, X=0.8, Y=1.035, U=key, label=f"{key:g} mas", labelpos="E", coordinates="axes")
    fig.colorbar(q, ax=ax_q, label="mean residual per cell (mas)")
    ax_q.set_xlim(0, shape[1])
    ax_q.set_ylim(0, shape[0])
    ax_q.set_aspect("equal")
    ax_q.set_xlabel("x (pixel)")
    ax_q.set_ylabel("y (pixel)")
    # Padded so that the arrow key, beside the title, stays below the figure title.
    ax_q.set_title(f"mean residual, {bins} x {bins} cells", loc="left", fontsize=10, pad=12)
    lim = np.nanpercentile(np.abs(np.concatenate([dra, ddec])), 99) if len(dra) else 1.0
    ax_h.hist(dra, bins=60, range=(-lim, lim), histtype="step", label="RA cos(Dec)")
    ax_h.hist(ddec, bins=60, range=(-lim, lim), histtype="step", label="Dec")
    ax_h.set_xlabel("residual (mas)")
    ax_h.set_ylabel("matched stars")
    ax_h.set_title(f"{len(dra)} stars matched to Gaia", fontsize=10)
    ax_h.legend(fontsize=8)
    fig.suptitle(title or "Astrometric residuals (detection - Gaia)")
    return fig


def _save_figure(fig, path: str | os.PathLike) -> Path:
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=110, format="png")
    return Path(path)


def plot_residual_map(matches: Table, path: str | os.PathLike, shape=(3080, 3072), title: str = "",
                      bins: int = 12) -> Path:
    """Write :func:`residual_map_figure` as a PNG (atomically)."""
    return _save_figure(residual_map_figure(matches, shape, title, bins), path)


_FILTER_COLOURS = {"ZTF_g": "tab:green", "ZTF_r": "tab:red", "ZTF_i": "tab:brown"}


def scale_airmass_figure(table: Table, models: Mapping, title: str = ""):
    """Solved pixel scale against airmass with the refraction model (a Figure).

    ``table`` is :func:`pipeline.astrometry.scale_airmass.scale_airmass_table`'s: filled
    circles with annual aberration taken out, small grey crosses as solved; one model curve
    per filter (``models``: filter name to RefractionModel), all referred to airmass 1.
    """
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    airmass = np.asarray(table["airmass"], float) if len(table) else np.zeros(0)
    grid = np.linspace(1.0, max(2.6, float(airmass.max()) + 0.1) if airmass.size else 2.6, 200)
    if len(table):
        ax.plot(airmass, table["scale_pct"], linestyle="none", marker="x", ms=4, color="0.6",
                label="as solved (catalogue frame)")
    for name in sorted(models):
        rows = table[table["filter"] == name] if len(table) else table
        colour = _FILTER_COLOURS.get(name)
        if len(rows):
            ax.plot(rows["airmass"], rows["scale_pct_corrected"], linestyle="none", marker="o", ms=4,
                    color=colour, label=f"{name}: annual aberration taken out ({len(rows)} images)")
        model = models[name]
        ax.plot(grid, model.scale_change_pct(grid, 1.0), "-", color=colour or "k", linewidth=1,
                label=f"{name} refraction model ({model.pressure_hpa:.0f} hPa, {model.temperature_c:.0f} C)")
    ax.set_xlabel("airmass at the image centre")
    ax.set_ylabel("pixel scale change from airmass 1 (%)")
    ax.set_title(title or "Solved pixel scale against airmass")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=7)
    return fig


def plot_scale_airmass(table: Table, models: Mapping, path: str | os.PathLike, title: str = "") -> Path:
    """Write :func:`scale_airmass_figure` as a PNG (atomically)."""
    return _save_figure(scale_airmass_figure(table, models, title), path)
