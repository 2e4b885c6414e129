"""Looking at alert packets and the candidates they are made from: summaries and the cutout
triplet as a PNG.

Works on our v4.02 packets and on every historical ZTF packet (schemas 1.x-3.x, JPEG
cutouts, negative test candids, ``alertId`` instead of ``objectId``, numeric ``isdiffpos``).
One drawing, :func:`triplet_figure`, serves ``skydiff alerts show --png`` (from a packet:
:func:`alert_triplet`) and ``skydiff candidates show --png`` (from a subtraction's products
folder: :func:`candidate_triplet`), so both show the same things: science, reference and
difference stamps, the candidate's centre, north and east from the WCS (when the stamps have
one: ZTF's own stamps do not), ``rb``, ``drb`` ("drb n/a" when the packet or table has no such
field) and the sign (``isdiffpos``).
"""
from __future__ import annotations

from pathlib import Path
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from alerts.cutouts import STAMP_KINDS, read_stamp, read_stamp_wcs

__all__ = ["FILTER_NAMES", "TripletView", "alert_summary", "alert_line", "alert_triplet", "north_east",
           "plot_triplet", "save_triplet", "sign_label", "triplet_figure"]

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


def sign_label(isdiffpos: Any) -> str:
    """``isdiffpos`` as a reader expects it: "+" (brighter than the reference) or "-" (fainter).

    Accepts the table's bool and every packet spelling ("t"/"f", "1"/"0"); anything else is "?".
    """
    if isinstance(isdiffpos, (bool, np.bool_)):
        return "+" if isdiffpos else "-"
    text = str(isdiffpos).strip().lower()
    return {"t": "+", "1": "+", "true": "+", "f": "-", "0": "-", "false": "-"}.get(text, "?")


def north_east(wcs, x: float, y: float) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """Unit vectors (dx, dy) in pixel coordinates pointing north and east at pixel (x, y) (0-based).

    Found by offsetting the sky position 1 arcsec towards position angle 0 (north) and 90
    degrees (east) with astropy's ``directional_offset_by`` and mapping both back through the
    WCS, so any projection and distortion the WCS holds is respected. None without a
    celestial WCS.
    """
    import astropy.units as u
    from astropy.coordinates import Angle

    if wcs is None or not wcs.has_celestial:
        return None
    centre = wcs.pixel_to_world(x, y)
    vectors = []
    for angle in (0.0, 90.0):
        moved = centre.directional_offset_by(Angle(angle, u.deg), Angle(1.0, u.arcsec))
        px, py = wcs.world_to_pixel(moved)
        dx, dy = float(px) - x, float(py) - y
        norm = float(np.hypot(dx, dy))
        if not np.isfinite(norm) or norm == 0:
            return None
        vectors.append((dx / norm, dy / norm))
    return vectors[0], vectors[1]


@dataclass(frozen=True)
class TripletView:
    """What a triplet drawing shows of one candidate.

    Attributes
    ----------
    stamps : dict
        ``"science"``, ``"reference"``, ``"difference"``: 2-D arrays, or None for a missing stamp.
    title : str
        First title line (object or candidate id, band, magnitude).
    rb, drb : float or None
        Real-bogus scores; ``drb`` None reads "drb n/a" (the packet or table has no drb).
    isdiffpos : Any
        The candidate's sign as its source spells it (:func:`sign_label`).
    centre : (float, float) or None
        The candidate's position in stamp pixels (0-based x, y); None: the stamp centre.
    orientation : ((dx, dy), (dx, dy)) or None
        North and east unit vectors in stamp pixels (:func:`north_east`); None: unknown.
    """

    stamps: Mapping[str, np.ndarray | None]
    title: str
    rb: float | None
    drb: float | None
    isdiffpos: Any
    centre: tuple[float, float] | None = None
    orientation: tuple[tuple[float, float], tuple[float, float]] | None = None

    @property
    def scores_line(self) -> str:
        sign = sign_label(self.isdiffpos)
        sense = {"+": "brighter than the reference", "-": "fainter than the reference"}.get(sign, "sign unknown")
        drb = "drb n/a" if self.drb is None else f"drb {self.drb:.3f}"
        return f"rb {_fmt(self.rb, '.3f')}   {drb}   isdiffpos {sign} ({sense})"


def _draw_centre(axes, x: float, y: float, size: int) -> None:
    """Two short ticks on each side of the candidate (its pixels stay visible)."""
    gap, arm = max(2.0, size * 0.06), max(3.0, size * 0.1)
    for sx, sy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        axes.plot([x + sx * gap, x + sx * (gap + arm)], [y + sy * gap, y + sy * (gap + arm)],
                  color="red", linewidth=1.2, label="_centre")


def _draw_compass(axes, orientation, shape: tuple[int, int]) -> None:
    """North and east arrows, labelled N and E, from the corner of the stamp they point away from."""
    ny, nx = shape
    length = 0.2 * min(nx, ny)
    (north_x, north_y), (east_x, east_y) = orientation
    base_x = (0.15 if north_x + east_x >= 0 else 0.85) * nx
    base_y = (0.15 if north_y + east_y >= 0 else 0.85) * ny
    for (dx, dy), name in zip(orientation, ("N", "E")):
        axes.annotate("", xy=(base_x + dx * length, base_y + dy * length), xytext=(base_x, base_y),
                      arrowprops={"arrowstyle": "->", "color": "yellow", "linewidth": 1.3})
        axes.text(base_x + dx * length * 1.3, base_y + dy * length * 1.3, name, color="yellow",
                  ha="center", va="center", fontsize=9, fontweight="bold")


def triplet_figure(view: TripletView):
    """The science / reference / difference stamps side by side, annotated (a matplotlib Figure, Agg).

    Each stamp is shown in its own 1-99.5 percentile stretch with the candidate's centre marked;
    the science stamp carries the north/east arrows (or says the orientation is unknown); the
    title gives the scores and the sign.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.7))
    FigureCanvasAgg(figure)
    for i, (_, label) in enumerate(STAMP_KINDS):
        axes = figure.add_subplot(1, 3, i + 1)
        axes.set_xticks([])
        axes.set_yticks([])
        pixels = view.stamps.get(label)
        if pixels is None:
            axes.set_title(f"{label}: none")
            continue
        finite = pixels[np.isfinite(pixels)]
        low, high = np.percentile(finite, [1, 99.5]) if finite.size else (0.0, 1.0)
        axes.imshow(pixels, origin="lower", cmap="gray", vmin=low, vmax=high if high > low else low + 1)
        axes.set_title(label)
        ny, nx = pixels.shape
        cx, cy = view.centre if view.centre is not None else ((nx - 1) / 2, (ny - 1) / 2)
        _draw_centre(axes, cx, cy, min(nx, ny))
        if i == 0:
            if view.orientation is not None:
                _draw_compass(axes, view.orientation, pixels.shape)
            else:
                axes.text(0.03, 0.03, "orientation unknown (no WCS)", color="yellow", fontsize=7,
                          transform=axes.transAxes)
        axes.set_xlim(-0.5, nx - 0.5)
        axes.set_ylim(-0.5, ny - 0.5)
    figure.suptitle(f"{view.title}\n{view.scores_line}", fontsize=10)
    figure.subplots_adjust(left=0.02, right=0.98, bottom=0.03, top=0.8, wspace=0.05)
    return figure


def save_triplet(view: TripletView, path: str | Path) -> Path:
    """Draw :func:`triplet_figure` into a PNG file; returns its path."""
    path = Path(path)
    triplet_figure(view).savefig(path, dpi=90)
    return path


def _optional_score(value: Any) -> float | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def alert_triplet(alert: Mapping[str, Any]) -> TripletView:
    """The :class:`TripletView` of an alert packet: its stamps, scores, sign and, from the
    science stamp's WCS, its centre (the candidate's ra, dec) and orientation."""
    import astropy.units as u
    from astropy.coordinates import SkyCoord

    c = alert["candidate"]
    stamps, wcs = {}, None
    for kind, label in STAMP_KINDS:
        stamp = alert.get(kind)
        if not stamp:
            stamps[label] = None
            continue
        source = f"{kind} of candid {alert.get('candid')}"
        stamps[label] = read_stamp(stamp["stampData"], source)
        if kind == "cutoutScience":
            wcs = read_stamp_wcs(stamp["stampData"])
    centre = orientation = None
    if wcs is not None and c.get("ra") is not None and c.get("dec") is not None:
        x, y = wcs.world_to_pixel(SkyCoord(c["ra"] * u.deg, c["dec"] * u.deg))
        centre = (float(x), float(y))
        orientation = north_east(wcs, *centre)
    title = (f"{_object_name(alert)}  candid {alert.get('candid', c.get('candid'))}  "
             f"{FILTER_NAMES.get(c.get('fid'), c.get('fid'))} {_fmt(c.get('magpsf'), '.2f')}")
    return TripletView(stamps, title, _optional_score(c.get("rb")), _optional_score(c.get("drb")),
                       c.get("isdiffpos"), centre, orientation)


def plot_triplet(alert: Mapping[str, Any], path: str | Path) -> Path:
    """Write an alert's annotated cutout triplet (:func:`triplet_figure`) as a PNG."""
    return save_triplet(alert_triplet(alert), path)


# -- a subtraction's candidates (``skydiff candidates list|show``) ---------------------------

#: Columns of the candidate listing, in order, with their formats (``drb`` only when present).
LIST_COLUMNS = (("cand_index", "d"), ("ra", ".6f"), ("dec", ".6f"), ("isdiffpos", ""), ("magpsf", ".3f"),
                ("sigmapsf", ".3f"), ("scorr", ".1f"), ("rb", ".3f"), ("drb", ".3f"), ("flagged", "d"),
                ("xpos", ".2f"), ("ypos", ".2f"))


def candidate_listing(outdir: str | Path, rb_min: float | None = None):
    """The candidates of a products folder as a listing Table (``skydiff candidates list``).

    Rows in table order, those with ``rb >= rb_min`` when given (a NaN rb fails the cut);
    ``isdiffpos`` as "+"/"-"; ``drb`` kept only when the table has it.

    Raises
    ------
    pipeline.subtraction.products.SubtractionOutputError
        An incomplete folder (no ``qa.json``) or an unreadable ``candidates.ecsv`` (named).
    """
    from astropy.table import Table

    from pipeline.subtraction.products import read_candidates, read_qa_record

    read_qa_record(outdir)    # written last: a folder without it is incomplete
    candidates = read_candidates(outdir)
    if rb_min is not None and "rb" in candidates.colnames:
        rb = np.asarray(candidates["rb"], dtype=float)
        candidates = candidates[np.isfinite(rb) & (rb >= rb_min)]
    elif rb_min is not None:
        candidates = candidates[:0]
    listing = Table()
    for name, spec in LIST_COLUMNS:
        if name not in candidates.colnames:
            continue
        column = candidates[name]
        listing[name] = [sign_label(v) for v in column] if name == "isdiffpos" else column
        if spec and name != "isdiffpos":
            listing[name].format = "{:" + spec + "}"
    return listing


def candidate_triplet(outdir: str | Path, candidate_id: int) -> TripletView:
    """The :class:`TripletView` of one candidate of a products folder.

    ``candidate_id`` is its ``cand_index`` or its alert ``candid`` (whose exposure and
    quadrant must be the folder's). The orientation comes from ``diff.fits``'s WCS (the
    science image's) at the candidate's position; the centre is its sub-pixel position in
    the stamp.

    Raises
    ------
    pipeline.subtraction.products.SubtractionOutputError
        An incomplete or unreadable folder, or no such candidate (named).
    """
    import warnings

    from astropy.io import fits
    from astropy.wcs import WCS, FITSFixedWarning

    from alerts.ids import split_candid
    from pipeline.subtraction.products import (SubtractionOutputError, read_candidates, read_cutouts,
                                               read_qa_record)

    outdir = Path(outdir)
    qa = read_qa_record(outdir)
    candidates = read_candidates(outdir)
    index = int(candidate_id)
    if index >= 10**6:
        try:
            expid, rcid, index = split_candid(index)
        except ValueError as exc:
            raise SubtractionOutputError(f"candidate {candidate_id}: neither a cand_index nor a candid ({exc})"
                                         ) from None
        if (qa.get("expid") is not None and int(qa["expid"]) != expid) or \
                (qa.get("rcid") is not None and int(qa["rcid"]) != rcid):
            raise SubtractionOutputError(f"candidate {candidate_id}: candid of expid {expid} rcid {rcid}, but "
                                         f"{outdir} holds expid {qa.get('expid')} rcid {qa.get('rcid')}")
    rows = np.flatnonzero(np.asarray(candidates["cand_index"]) == index)
    if rows.size == 0:
        raise SubtractionOutputError(f"candidate {candidate_id}: no such cand_index in "
                                     f"{outdir / 'candidates.ecsv'} ({len(candidates)} candidates)")
    row = candidates[int(rows[0])]
    cubes = read_cutouts(outdir, len(candidates))
    stamps = {kind: cubes[kind][int(rows[0])] for kind in cubes}
    size_y, size_x = stamps["science"].shape
    # pipeline.subtraction.candidates.cutout_stamps centres the stamp on pixel floor(pos - 0.5) (0-based).
    x, y = float(row["xpos"]) - 1.0, float(row["ypos"]) - 1.0
    centre = (x - np.floor(x + 0.5) + size_x // 2, y - np.floor(y + 0.5) + size_y // 2)
    diff_path = outdir / "diff.fits"
    try:
        header = fits.getheader(diff_path, 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            orientation = north_east(WCS(header), x, y)
    except FileNotFoundError:
        raise SubtractionOutputError(f"{diff_path}: not found") from None
    except (OSError, ValueError) as exc:
        raise SubtractionOutputError(f"{diff_path}: unreadable header or WCS ({exc})") from None
    band = {"ZTF_g": "g", "ZTF_r": "r", "ZTF_i": "i"}.get(str(header.get("FILTER")), header.get("FILTER"))
    title = (f"expid {qa.get('expid')} rcid {qa.get('rcid')}  cand_index {index}"
             + (f"  {band}" if band else "") + f"  {_fmt(_optional_score(row['magpsf']), '.2f')}")
    drb = _optional_score(row["drb"]) if "drb" in row.colnames else None
    rb = _optional_score(row["rb"]) if "rb" in row.colnames else None
    return TripletView(stamps, title, rb, drb, bool(row["isdiffpos"]), centre, orientation)
