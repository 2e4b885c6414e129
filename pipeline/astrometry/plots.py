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

__all__ = ["plot_scale_vs_airmass", "plot_residual_map"]


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


def plot_residual_map(matches: Table, path: str | os.PathLike, shape=(3080, 3072), title: str = "",
                      bins: int = 12) -> Path:
    """Binned astrometric residuals (detection minus Gaia, mas) across the quadrant.

    ``matches`` is the table from :func:`pipeline.astrometry.qa.astrometric_qa` (x, y,
    dra_mas, ddec_mas).
    """
    fig, (ax_q, ax_h) = plt.subplots(1, 2, figsize=(11, 4.8), gridspec_kw={"width_ratios": [1.2, 1]})
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
    fig.colorbar(q, ax=ax_q, label="mean residual (mas)")
    ax_q.set_xlim(0, shape[1])
    ax_q.set_ylim(0, shape[0])
    ax_q.set_aspect("equal")
    ax_q.set_xlabel("x (pixel)")
    ax_q.set_ylabel("y (pixel)")
    ax_q.set_title(title or "Astrometric residuals")
    lim = np.nanpercentile(np.abs(np.concatenate([dra, ddec])), 99) if len(dra) else 1.0
    ax_h.hist(dra, bins=60, range=(-lim, lim), histtype="step", label="RA cos(Dec)")
    ax_h.hist(ddec, bins=60, range=(-lim, lim), histtype="step", label="Dec")
    ax_h.set_xlabel("residual (mas)")
    ax_h.legend(fontsize=8)
    return _save(fig, path)
