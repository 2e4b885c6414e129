"""Forced light curves from the difference-image archive: the ZTF service's rows and ``fp_hist``.

:func:`forced_photometry` measures, at every position, every archived difference image that
covers it within a time range (and filters): one row per (position, epoch) with the ZTF
forced-photometry service's columns.  :func:`fp_hist_records` turns rows into the alerts'
v4.02 ``fp_hist`` records.  :func:`plot_forced_lightcurve` draws them.

Conventions (documented in the README, "Forced photometry")
-----------------------------------------------------------
- ``forcediffimflux``/``forcediffimfluxunc`` are in DN of the science image, as ZTF's: the
  common-system flux of the difference times ``10**(0.4 (magzpsci - magzpref))``, so
  ``mag = zpdiff - 2.5 log10(forcediffimflux)`` with ``zpdiff = magzpsci``.
- ``forcediffimsnr = flux / unc``.  Above ``forcedphot.snr_detection`` (SNT, 3) ``mag`` and
  ``magerr = 1.0857 unc / flux`` are given; below, ``mag`` is -99999 and ``maglim =
  zpdiff - 2.5 log10(SNU * unc)`` (SNU = ``forcedphot.snr_upper_limit``, 5) is the upper
  limit.  ``maglim`` is given on every measured row.
- Missing values are -99999 (ZTF's convention in its forced-photometry tables and packets).
- ``procstatus``: comma-separated codes, :data:`PROCSTATUS`.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
from astropy.table import Table

from pipeline.core.config import ForcedPhotConfig
from pipeline.forcedphot.archive import DifferenceArchive, _unit
from pipeline.forcedphot.measure import FIT_STATUS, fit_half_size, forced_psf_fit
from pipeline.measure.psf import nearest_phase

__all__ = ["PROCSTATUS", "MISSING", "FORCED_COLUMNS", "forced_photometry", "fp_hist_records",
           "plot_forced_lightcurve"]

#: Missing numeric values (ZTF's convention).
MISSING = -99999.0

#: ``procstatus`` codes (numbers follow ZTF's forced-photometry service where the meaning matches).
PROCSTATUS = {
    "0": "no warnings",
    "56": "masked or flagged pixels (near bad pixels of either image) inside the fit box were left out",
    "57": "no reference-catalogue source within forcedphot.nearest_radius_arcsec (nearest-source fields -99999)",
    "58": "the reference's catalogue is not in the archive (nearest-source fields -99999)",
    "61": "the fit box runs off the image edge (measured on the pixels inside)",
    "255": "no measurement: less than half of the PSF's weight on usable pixels (flux fields -99999)",
}

#: Columns of :func:`forced_photometry`, in order.
FORCED_COLUMNS = ("index", "ra", "dec", "field", "ccdid", "qid", "rcid", "filter", "fid", "expid", "pid",
                  "jd", "mjd", "programid", "exptime", "sciinpseeing", "scibckgnd", "scisigpix",
                  "zpmaginpsci", "zpmaginpsciunc", "zpmaginpscirms", "clrcoeff", "clrcoeffunc", "ncalmatches",
                  "adpctdif1", "adpctdif2", "diffmaglim", "zpdiff", "rfid", "refjdstart", "refjdend",
                  "forcediffimflux", "forcediffimfluxunc", "forcediffimsnr", "forcediffimchisq",
                  "mag", "magerr", "maglim", "isdetection",
                  "dnearestrefsrc", "nearestrefra", "nearestrefdec", "nearestrefmag", "nearestrefmagunc",
                  "nearestrefchi", "nearestrefsharp", "procstatus")
_IMAGE_COLUMNS = {"field": "field", "ccdid": "ccdid", "qid": "qid", "rcid": "rcid", "filter": "filter",
                  "fid": "fid", "expid": "expid", "pid": "pid", "jd": "jd", "programid": "programid",
                  "exptime": "exptime", "sciinpseeing": "sciinpseeing", "scibckgnd": "scibckgnd",
                  "scisigpix": "scisigpix", "zpmaginpsci": "magzpsci", "zpmaginpsciunc": "magzpsciunc",
                  "zpmaginpscirms": "magzpscirms", "clrcoeff": "clrcoeff", "clrcoeffunc": "clrcounc",
                  "ncalmatches": "ncalmatches", "adpctdif1": "adpctdif1", "adpctdif2": "adpctdif2",
                  "diffmaglim": "diffmaglim", "zpdiff": "magzpsci", "rfid": "refid",
                  "refjdstart": "refjdstart", "refjdend": "refjdend"}
_INT_COLUMNS = {"index", "field", "ccdid", "qid", "rcid", "fid", "expid", "pid", "programid", "ncalmatches", "rfid"}
_STR_COLUMNS = {"filter", "procstatus"}
_NEAREST = ("dnearestrefsrc", "nearestrefra", "nearestrefdec", "nearestrefmag", "nearestrefmagunc",
            "nearestrefchi", "nearestrefsharp")
_MAG_PER_FLUX = 2.5 / math.log(10.0)


def _image_value(meta: dict, key: str):
    value = meta.get(key)
    return MISSING if value is None else value


def _procstatus(status: np.ndarray, nearest_code: np.ndarray) -> list[str]:
    codes = []
    for bits, near in zip(status.tolist(), nearest_code.tolist()):
        if bits & FIT_STATUS["NO_FIT"]:
            codes.append("255")
            continue
        parts = [c for c, bit in (("56", "BAD_PIXELS"), ("61", "EDGE")) if bits & FIT_STATUS[bit]]
        if near:
            parts.append(near)
        codes.append(",".join(sorted(parts, key=int)) or "0")
    return codes


def _nearest(archive: DifferenceArchive, refid: int, ra, dec, radius_arcsec: float):
    """Nearest reference source columns and the procstatus code where there is none."""
    n = len(ra)
    out = {name: np.full(n, MISSING) for name in _NEAREST}
    found = archive.reference_catalog(refid)
    if found is None:
        return out, np.full(n, "58", dtype=object)
    tree, table = found
    chord = 2.0 * math.sin(math.radians(radius_arcsec / 3600.0) / 2.0)
    distance, index = tree.query(_unit(ra, dec), distance_upper_bound=chord)
    hit = np.isfinite(distance)
    if hit.any():
        rows = index[hit]
        out["dnearestrefsrc"][hit] = np.degrees(2.0 * np.arcsin(distance[hit] / 2.0)) * 3600.0
        for name, column in (("nearestrefra", "ra"), ("nearestrefdec", "dec"), ("nearestrefmag", "mag"),
                             ("nearestrefmagunc", "magerr"), ("nearestrefchi", "chi"), ("nearestrefsharp", "sharp")):
            values = np.asarray(table[column], float)[rows]
            out[name][hit] = np.where(np.isfinite(values), values, MISSING)
    return out, np.where(hit, "", "57").astype(object)


def _measure_epoch(archive: DifferenceArchive, epoch, index: np.ndarray, ra: np.ndarray, dec: np.ndarray,
                   config: ForcedPhotConfig) -> dict | None:
    """Rows of one epoch for the positions on it (None when none is)."""
    x, y = epoch.pixels(ra, dec)
    on = epoch.on_image(x, y)
    if not on.any():
        return None
    index, ra, dec, x, y = index[on], ra[on], dec[on], x[on], y[on]
    arrays = epoch.arrays()
    col, row = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    tile = arrays.tile_of(col, row)
    tiles = arrays.tiles
    half = fit_half_size(float(np.nanmax(tiles["fwhm"][np.unique(tile)])), config.fit_radius_fwhm,
                         arrays.psf.shape[-1] // 2)
    stamps, inside = arrays.stamps(arrays.diff, col, row, half)
    meta = epoch.meta
    diff_rms = meta.get("diff_rms") or 1.0
    # P_D at the tabulated sub-pixel phase nearest to each position (read from the memory
    # map at that phase only), shifted by the remainder in the fit.
    phases = arrays.psf.shape[1]
    ix, dx = nearest_phase(x - col, phases)
    iy, dy = nearest_phase(y - row, phases)
    fit = forced_psf_fit(stamps, inside, arrays.psf[tile, iy, ix], tiles["f_d"][tile], tiles["f_s"][tile],
                         dx, dy, diff_rms, np.asarray(arrays.fluxunc[row, col], dtype=np.float64))
    scale = 10 ** (0.4 * (meta["magzpsci"] - meta["magzpref"]))
    flux, unc = fit["flux"] * scale, fit["fluxerr"] * scale
    measured = np.isfinite(flux) & np.isfinite(unc) & (unc > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = np.where(measured, flux / unc, MISSING)
        detected = measured & (snr > config.snr_detection)
        mag = np.where(detected, meta["magzpsci"] - 2.5 * np.log10(np.where(detected, flux, 1.0)), MISSING)
        magerr = np.where(detected, _MAG_PER_FLUX * unc / np.where(detected, flux, 1.0), MISSING)
        maglim = np.where(measured, meta["magzpsci"] - 2.5 * np.log10(config.snr_upper_limit *
                                                                        np.where(measured, unc, 1.0)), MISSING)
    nearest, near_code = _nearest(archive, int(meta["refid"]), ra, dec, config.nearest_radius_arcsec)
    n = len(index)
    columns = {"index": index, "ra": ra, "dec": dec,
               **{name: np.full(n, _image_value(meta, key), dtype=object if name in _STR_COLUMNS else None)
                  for name, key in _IMAGE_COLUMNS.items()},
               "mjd": np.full(n, meta["jd"] - 2400000.5),
               "forcediffimflux": np.where(measured, flux, MISSING),
               "forcediffimfluxunc": np.where(measured, unc, MISSING), "forcediffimsnr": snr,
               "forcediffimchisq": np.where(measured, fit["chi2"], MISSING),
               "mag": mag, "magerr": magerr, "maglim": maglim, "isdetection": detected, **nearest,
               "procstatus": np.array(_procstatus(fit["status"], near_code), dtype=object)}
    return columns


def _empty_table() -> Table:
    columns = {}
    for name in FORCED_COLUMNS:
        kind = int if name in _INT_COLUMNS else str if name in _STR_COLUMNS else bool if name == "isdetection" \
            else float
        columns[name] = np.zeros(0, dtype=kind)
    return Table(columns)


def forced_photometry(archive: DifferenceArchive, ra, dec, jd_range: tuple[float, float] = (-math.inf, math.inf),
                      fids: Sequence[int] | None = None, config: ForcedPhotConfig = ForcedPhotConfig(),
                      progress: Callable[[int, int], None] | None = None) -> Table:
    """Forced PSF photometry at sky positions on every archived difference image covering them.

    Parameters
    ----------
    archive : DifferenceArchive
    ra, dec : array_like
        Positions (deg); the ``index`` column is the position's index in them.
    jd_range : (float, float)
        ``jd_min <= jd < jd_max`` of the exposures' start.
    fids : sequence of int, optional
        Filters to keep (1 g, 2 r, 3 i); None keeps all.
    progress : callable, optional
        Called as ``progress(done, total)`` after each epoch.

    Returns
    -------
    Table
        :data:`FORCED_COLUMNS`, one row per (position, covering epoch), sorted by position then jd.
    """
    ra = np.atleast_1d(np.asarray(ra, dtype=np.float64))
    dec = np.atleast_1d(np.asarray(dec, dtype=np.float64))
    epochs = archive.epochs(ra, dec, jd_range[0], jd_range[1], fids)
    points = _unit(ra, dec)
    parts = []
    for k, epoch in enumerate(epochs):
        centre = _unit(epoch.row["ra_c"], epoch.row["dec_c"])
        near = np.flatnonzero(points @ centre >= math.cos(math.radians(epoch.row["radius"])))
        if near.size:
            part = _measure_epoch(archive, epoch, near, ra[near], dec[near], config)
            if part is not None:
                parts.append(part)
        if progress is not None:
            progress(k + 1, len(epochs))
    if not parts:
        return _empty_table()
    columns = {}
    for name in FORCED_COLUMNS:
        values = np.concatenate([p[name] for p in parts])
        if name in _INT_COLUMNS:
            values = values.astype(np.int64)
        elif name in _STR_COLUMNS:
            values = values.astype(str)
        elif name != "isdetection":
            values = values.astype(np.float64)
        columns[name] = values
    table = Table(columns)
    order = np.lexsort((table["expid"], table["jd"], table["index"]))
    table = table[order]
    for name in ("ra", "dec", "nearestrefra", "nearestrefdec"):
        table[name].unit = "deg"
    for name in ("mag", "magerr", "maglim", "zpdiff", "zpmaginpsci", "diffmaglim", "nearestrefmag"):
        table[name].unit = "mag"
    table.meta["procstatus"] = dict(PROCSTATUS)
    table.meta["missing"] = MISSING
    return table


_FP_HIST_FROM_TABLE = {"field": "field", "rcid": "rcid", "fid": "fid", "pid": "pid", "rfid": "rfid",
                       "sciinpseeing": "sciinpseeing", "scibckgnd": "scibckgnd", "scisigpix": "scisigpix",
                       "magzpsci": "zpmaginpsci", "magzpsciunc": "zpmaginpsciunc", "magzpscirms": "zpmaginpscirms",
                       "clrcoeff": "clrcoeff", "clrcounc": "clrcoeffunc", "exptime": "exptime",
                       "adpctdif1": "adpctdif1", "adpctdif2": "adpctdif2", "diffmaglim": "diffmaglim",
                       "programid": "programid", "jd": "jd", "forcediffimflux": "forcediffimflux",
                       "forcediffimfluxunc": "forcediffimfluxunc", "procstatus": "procstatus",
                       "distnr": "dnearestrefsrc", "ranr": "nearestrefra", "decnr": "nearestrefdec",
                       "magnr": "nearestrefmag", "sigmagnr": "nearestrefmagunc", "chinr": "nearestrefchi",
                       "sharpnr": "nearestrefsharp"}
#: Image-level fields the image may lack: null in fp_hist (the schema allows it), not -99999.
_NULL_WHEN_MISSING = ("magzpsciunc", "magzpscirms", "clrcoeff", "clrcounc", "adpctdif1", "adpctdif2",
                      "sciinpseeing", "scibckgnd", "scisigpix", "diffmaglim", "exptime")


def fp_hist_records(table: Table, n_positions: int) -> list[list[dict]]:
    """Per position (``index`` 0..n-1) the v4.02 ``fp_hist`` records of its rows, earliest first.

    Flux fields of an epoch without a measurement and nearest-source fields without a source
    are -99999 (ZTF's convention; ``procstatus`` says why); image-level fields the image lacks
    are null.
    """
    records: list[list[dict]] = [[] for _ in range(n_positions)]
    if len(table) == 0:
        return records
    columns = {target: table[source].tolist() for target, source in _FP_HIST_FROM_TABLE.items()}
    for name in _NULL_WHEN_MISSING:
        columns[name] = [None if v == MISSING else v for v in columns[name]]
    names = list(columns)
    for i, row in zip(table["index"].tolist(), zip(*(columns[n] for n in names))):
        records[i].append(dict(zip(names, row)))
    return records


#: Panels drawn by :func:`plot_forced_lightcurve` (the first positions of a longer table).
MAX_PLOT_POSITIONS = 12


def plot_forced_lightcurve(table: Table, path, title: str = ""):
    """Forced light curve(s): flux-derived magnitudes with errors where detected, upper
    limits (downward triangles) elsewhere, one colour per filter, one panel per position (the
    first :data:`MAX_PLOT_POSITIONS`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = sorted(set(table["index"].tolist())) or [0]
    if len(positions) > MAX_PLOT_POSITIONS:
        title = f"{title} (first {MAX_PLOT_POSITIONS} of {len(positions)} positions)".strip()
        positions = positions[:MAX_PLOT_POSITIONS]
    fig, axes = plt.subplots(len(positions), 1, figsize=(8, 2.6 * len(positions) + 0.6), squeeze=False,
                             sharex=True)
    colours = {1: "tab:green", 2: "tab:red", 3: "tab:brown"}
    names = {1: "g", 2: "r", 3: "i"}
    for ax, index in zip(axes[:, 0], positions):
        rows = table[table["index"] == index] if len(table) else table
        for fid in sorted(set(rows["fid"].tolist())):
            sel = rows[rows["fid"] == fid]
            det = np.asarray(sel["isdetection"], bool)
            lim = ~det & (np.asarray(sel["maglim"]) != MISSING)
            if det.any():
                ax.errorbar(np.asarray(sel["mjd"])[det], np.asarray(sel["mag"])[det],
                            yerr=np.asarray(sel["magerr"])[det], fmt="o", ms=4, color=colours.get(fid, "k"),
                            label=f"{names.get(fid, fid)} detections")
            if lim.any():
                ax.plot(np.asarray(sel["mjd"])[lim], np.asarray(sel["maglim"])[lim], "v", ms=5, mfc="none",
                        color=colours.get(fid, "k"), label=f"{names.get(fid, fid)} upper limits")
        if len(rows):
            unmeasured = int(np.count_nonzero(np.asarray(rows["maglim"]) == MISSING))
            note = f"; {unmeasured} epoch(s) without a measurement" if unmeasured else ""
            ax.set_title(f"position {index}: {rows['ra'][0]:.5f} {rows['dec'][0]:+.5f}{note}", fontsize=9)
        ax.invert_yaxis()
        ax.set_ylabel("mag")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("MJD")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
