"""Looking at alert packets: a one-line summary and the cutout triplet as a PNG.

Works on our v4.02 packets and on every historical ZTF packet (schemas 1.x-3.x, JPEG
cutouts, negative test candids, ``alertId`` instead of ``objectId``, numeric ``isdiffpos``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from alerts.cutouts import STAMP_KINDS, read_stamp

__all__ = ["FILTER_NAMES", "alert_summary", "alert_line", "plot_triplet"]

FILTER_NAMES = {1: "g", 2: "r", 3: "i"}


def _fmt(value: Any, spec: str) -> str:
    return "null" if value is None else format(value, spec)


def _object_name(alert: Mapping[str, Any]) -> str:
    return str(alert.get("objectId") or alert.get("alertId") or "?")


def alert_summary(alert: Mapping[str, Any]) -> str:
    """A multi-line human summary of one alert packet."""
    c = alert["candidate"]
    prv = alert.get("prv_candidates") or []
    detections = sum(1 for p in prv if p.get("candid") is not None)
    band = FILTER_NAMES.get(c.get("fid"), str(c.get("fid")))
    cutouts = [kind for kind, _ in STAMP_KINDS if alert.get(kind)]
    return "\n".join([
        f"objectId   {_object_name(alert)}",
        f"candid     {alert.get('candid', c.get('candid'))}",
        f"schema     {alert.get('schemavsn', 'unversioned')}  publisher {alert.get('publisher', '?')}",
        f"jd         {_fmt(c.get('jd'), '.6f')}  (MJD {_fmt(c['jd'] - 2400000.5 if c.get('jd') else None, '.6f')})",
        f"filter     {band} (fid {c.get('fid')})  field {c.get('field')}  rcid {c.get('rcid')}  pid {c.get('pid')}",
        f"magpsf     {_fmt(c.get('magpsf'), '.3f')} +/- {_fmt(c.get('sigmapsf'), '.3f')}"
        f"  isdiffpos {c.get('isdiffpos')}  diffmaglim {_fmt(c.get('diffmaglim'), '.2f')}",
        f"ra, dec    {_fmt(c.get('ra'), '.6f')}, {_fmt(c.get('dec'), '.6f')} deg",
        f"rb         {_fmt(c.get('rb'), '.3f')} ({c.get('rbversion')})",
        f"history    {len(prv)} prv_candidates ({detections} detections, {len(prv) - detections} upper limits);"
        f" ndethist {c.get('ndethist')} ncovhist {c.get('ncovhist')}",
        f"cutouts    {', '.join(cutouts) if cutouts else 'none'}",
    ])


def alert_line(alert: Mapping[str, Any]) -> str:
    """One line per alert, for ``tail``."""
    c = alert["candidate"]
    return (f"{_object_name(alert)} candid={alert.get('candid', c.get('candid'))} jd={_fmt(c.get('jd'), '.5f')} "
            f"{FILTER_NAMES.get(c.get('fid'), c.get('fid'))} mag={_fmt(c.get('magpsf'), '.2f')}"
            f"+/-{_fmt(c.get('sigmapsf'), '.2f')} ra={_fmt(c.get('ra'), '.5f')} dec={_fmt(c.get('dec'), '.5f')}"
            f" rb={_fmt(c.get('rb'), '.2f')} nprv={len(alert.get('prv_candidates') or [])}")


def plot_triplet(alert: Mapping[str, Any], path: str | Path) -> Path:
    """Write the science / reference / difference cutouts side by side as a PNG (Agg)."""
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    figure = Figure(figsize=(9, 3.4))
    FigureCanvasAgg(figure)
    for i, (kind, label) in enumerate(STAMP_KINDS):
        axes = figure.add_subplot(1, 3, i + 1)
        axes.set_xticks([])
        axes.set_yticks([])
        stamp = alert.get(kind)
        if not stamp:
            axes.set_title(f"{label}: none")
            continue
        pixels = read_stamp(stamp["stampData"], f"{kind} of candid {alert.get('candid')}")
        finite = pixels[np.isfinite(pixels)]
        low, high = np.percentile(finite, [1, 99.5]) if finite.size else (0.0, 1.0)
        axes.imshow(pixels, origin="lower", cmap="gray", vmin=low, vmax=high if high > low else low + 1)
        axes.set_title(label)
    c = alert["candidate"]
    figure.suptitle(f"{_object_name(alert)}  candid {alert.get('candid', c.get('candid'))}  "
                    f"{FILTER_NAMES.get(c.get('fid'), c.get('fid'))} {_fmt(c.get('magpsf'), '.2f')}")
    path = Path(path)
    figure.savefig(path, dpi=90)
    return path
