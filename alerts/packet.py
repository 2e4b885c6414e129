"""Alert packets (ZTF schema v4.02) from a quadrant's candidates.

Input contract (what the subtraction stage hands over)
------------------------------------------------------
* :class:`AlertContext`: image-level metadata of one quadrant image (see its fields).
* ``candidates``: an astropy Table, one row per candidate.  Required columns:
  ``cand_index`` (int, stable index of the candidate within the quadrant image, 0-999999),
  ``ra``, ``dec`` (deg), ``magpsf``, ``sigmapsf`` (mag), ``isdiffpos`` (bool, or "t"/"f"/"1"/"0"),
  ``ranr``, ``decnr`` (deg, nearest reference-catalogue source; NaN when there is none).
  Every other column whose name is a field of the v4.02 ``candidate`` record is copied into
  it -- in particular xpos, ypos (pixels), scorr, rb, rbversion, fwhm, elong, aimage, bimage,
  nneg, nbad, sumrat, magdiff, mindtoedge, magap, sigmagap, magapbig, sigmagapbig, chipsf,
  sky, dsnrms, ssnrms, dsdiff, seeratio, tblid, classtar, distnr (pixels, as the schema
  says), magnr, sigmagnr, sharpnr, chinr (-999 when the reference catalogue has no source
  within 30"), and the context stage's PS1, Gaia and solar-system columns (-999 where
  searched and nothing found).  A missing column, a masked value or NaN gives null in the
  packet.  Where each field comes from, and its convention when there is nothing to
  measure, is tabulated in ``docs/alert-fields.md``.
* ``cutouts``: per row a :class:`~alerts.cutouts.CutoutTriplet` (or None: null cutouts).

How each ``candidate`` field is filled
--------------------------------------
1. from the table column of that name; else 2. from the context attribute of that name
(image level: jd, fid, pid, diffmaglim, programid, nid, rcid, field, exptime, the
reference's rfid/jdstartref/jdendref/nframesref, the calibration's magzpsci, magzpsciunc,
magzpscirms, nmatches, clrcoeff, clrcounc, zpmed, clrmed, clrrms, zpclrcov, and
pdiffimfilename); else 3. derived: ``pid``/``candid`` (:mod:`alerts.ids`), ``isdiffpos``
"t"/"f", ``magdiff`` = magap - magpsf, ``magfromlim`` = diffmaglim - magap,
``aimagerat``/``bimagerat`` = aimage/fwhm, bimage/fwhm, ``elong`` = aimage/bimage; else 4.
from the object history (``ndethist``, ``ncovhist``, ``jdstarthist``, ``jdendhist``); else
null, for the reasons in :data:`NULL_REASONS`.  ``nmtchps`` is 0 unless the table has the
column (the context stage's PS1 search); ``drbversion`` is the table's column, else the
context's (empty: the cutouts were not scored).  ``fp_hists`` are the records handed to
:func:`make_alerts` (:func:`pipeline.forcedphot.lightcurves.fp_hist_records`: forced photometry
on the archived difference images of the days before), null when none are given (no archive).  ``jd`` is
the context's ``jd`` as given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

import numpy as np

from alerts.cutouts import STAMP_KINDS, CutoutTriplet, stamp_header_cards, stamp_record
from alerts.history import CandidateHistory, HistoryStore, ImageRecord
from alerts.ids import make_candid, make_pid, topic_name
from alerts.schema import SCHEMA_VERSION, schema_field_names
from pipeline.core.exits import BadInputError

__all__ = ["AlertContext", "REQUIRED_COLUMNS", "NULL_REASONS", "candidate_records",
           "upper_limit_record", "image_record", "cutout_fields", "assemble_alert", "make_alerts", "AlertInputError"]

REQUIRED_COLUMNS = ("cand_index", "ra", "dec", "magpsf", "sigmapsf", "isdiffpos", "ranr", "decnr")

#: Why a candidate field is null when neither the table nor the context provides it.  The
#: subtraction stage measures every other image-level and candidate-level field (see
#: docs/alert-fields.md); these are null only when their producer did not run.
NULL_REASONS = {
    **{name: "no solar-system ephemeris cross-match (the context stage did not run)"
       for name in ("ssdistnr", "ssmagnr", "ssnamenr")},
    **{f"{prefix}{i}": "no PS1-like catalogue cross-match (the context stage did not run)" for i in (1, 2, 3)
       for prefix in ("sgmag", "srmag", "simag", "szmag", "sgscore", "distpsnr", "objectidps")},
    **{name: "no Gaia cross-match (the context stage did not run)"
       for name in ("neargaia", "maggaia", "neargaiabright", "maggaiabright")},
    "drb": "the cutouts were not scored (candidates from elsewhere, or scoring switched off)",
    "programpi": "no registry of programme principal investigators: programid only",
    "pdiffimfilename": "alerts made in memory, without a products folder holding the difference image",
    **{name: "the science image was calibrated without Gaia (header MAGZP or the reference catalogue)"
       for name in ("zpmed", "clrmed", "clrrms")},
    "zpclrcov": "the zero point or the colour coefficient was not fitted (header MAGZP, fixed colour term)",
    **{name: "the nearest reference source has no PSF fit (saturated; magnr is its saturation bound)"
       for name in ("chinr", "sharpnr")},
    "classtar": "the subtraction stage did not run (candidates from elsewhere)",
}

_NON_NULL_FLOAT_COLUMNS = ("ra", "dec", "magpsf", "sigmapsf")
_DERIVED = {
    "magdiff": ("magap", "magpsf", lambda a, b: a - b),
    "magfromlim": ("diffmaglim", "magap", lambda a, b: a - b),
    "aimagerat": ("aimage", "fwhm", lambda a, b: a / b),
    "bimagerat": ("bimage", "fwhm", lambda a, b: a / b),
    "elong": ("aimage", "bimage", lambda a, b: a / b),
}


class AlertInputError(BadInputError):
    """Candidates or context that break the input contract (names the problem)."""


@dataclass(frozen=True)
class AlertContext:
    """Image-level metadata of one quadrant image, as the alert packets need it.

    ``footprint`` is the image's four sky corners (ra, dec deg, in order around the edge);
    ``wcs_header`` (optional) the image's WCS cards, copied into each cutout with CRPIX moved.
    ``night`` is the UT date YYYYMMDD naming the topic.  ``rbversion`` applies when the
    candidates table has no ``rbversion`` column.
    """

    jd: float
    fid: int
    expid: int
    rcid: int
    field: int
    programid: int
    night: str
    rfid: int
    jdstartref: float
    jdendref: float
    nframesref: int
    footprint: tuple[tuple[float, float], ...]
    diffmaglim: float | None = None
    exptime: float | None = None
    magzpsci: float | None = None
    magzpsciunc: float | None = None
    magzpscirms: float | None = None
    clrcoeff: float | None = None
    clrcounc: float | None = None
    zpmed: float | None = None
    clrmed: float | None = None
    clrrms: float | None = None
    zpclrcov: float | None = None
    pdiffimfilename: str | None = None
    nmatches: int = 0
    nid: int | None = None
    tooflag: int | None = 0
    survey: str = "ztf"
    rbversion: str = ""
    drbversion: str = ""
    wcs_header: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def pid(self) -> int:
        return make_pid(self.expid, self.rcid)

    @property
    def topic(self) -> str:
        return topic_name(self.survey, self.night, self.programid)


_CONTEXT_FIELDS = {f.name for f in fields(AlertContext)} | {"pid"}


def _column_values(column) -> list:
    """A column as a Python list, masked entries and NaN as None."""
    data = np.ma.asarray(column)
    values = data.filled(0).tolist() if data.dtype.kind not in "fc" else data.filled(np.nan).tolist()
    mask = np.ma.getmaskarray(data)
    if data.dtype.kind in "fc":
        return [None if m or v != v else v for v, m in zip(values, mask)]
    if mask.any():
        return [None if m else v for v, m in zip(values, mask)]
    return values


def _isdiffpos(value: Any) -> str:
    text = str(value).strip().lower()
    if text in ("true", "t", "1"):
        return "t"
    if text in ("false", "f", "0"):
        return "f"
    raise AlertInputError(f"isdiffpos must be a bool or t/f/1/0, got {value!r}")


def candidate_records(context: AlertContext, candidates) -> list[dict]:
    """The ``candidate`` records of a quadrant's candidates (history fields still unset)."""
    missing = [name for name in REQUIRED_COLUMNS if name not in candidates.colnames]
    if missing:
        raise AlertInputError(f"candidates table lacks required column(s): {', '.join(missing)}")
    names = schema_field_names("candidate")
    table_fields = [name for name in names if name in candidates.colnames and name not in ("pid", "candid")]
    base = {name: None for name in names}
    base.update({name: getattr(context, name) for name in names if name in _CONTEXT_FIELDS})
    base.update(nmtchps=0, drbversion=context.drbversion, rbversion=context.rbversion, ndethist=0, ncovhist=0)
    columns = {name: _column_values(candidates[name]) for name in table_fields}
    for name in _NON_NULL_FLOAT_COLUMNS:
        bad = [i for i, v in enumerate(columns[name]) if v is None]
        if bad:
            raise AlertInputError(f"candidates column {name!r} is NaN or masked in row(s) {bad[:10]}")
    for name in ("ranr", "decnr"):
        columns[name] = [math.nan if v is None else v for v in columns[name]]
    for version in ("rbversion", "drbversion"):
        if version in columns:
            columns[version] = [getattr(context, version) if v is None else str(v) for v in columns[version]]
    columns["isdiffpos"] = [_isdiffpos(v) for v in columns["isdiffpos"]]
    indices = _column_values(candidates["cand_index"])
    pid = context.pid
    records = []
    for row, cand_index in enumerate(indices):
        record = dict(base)
        for name, values in columns.items():
            record[name] = values[row]
        try:
            record["candid"] = make_candid(context.expid, context.rcid, cand_index)
        except ValueError as exc:
            raise AlertInputError(f"candidates row {row}: {exc}") from None
        record["pid"] = pid
        for target, (a, b, rule) in _DERIVED.items():
            if record[target] is None and record[a] is not None and record[b] not in (None, 0):
                record[target] = rule(record[a], record[b])
        records.append(record)
    return records


def upper_limit_record(context: AlertContext) -> dict:
    """The ``prv_candidate`` entry (candid null) this image gives positions it did not detect."""
    record = {name: None for name in schema_field_names("prv_candidate")}
    for name in ("jd", "fid", "pid", "diffmaglim", "programid", "nid", "rcid", "field", "magzpsci",
                 "magzpsciunc", "magzpscirms", "clrcoeff", "clrcounc", "rbversion"):
        record[name] = getattr(context, name)
    return record


def image_record(context: AlertContext) -> ImageRecord:
    """What the history store keeps of this image."""
    return ImageRecord(pid=context.pid, jd=context.jd, field=context.field, rcid=context.rcid,
                       footprint=tuple(context.footprint), upper_limit=upper_limit_record(context))


def cutout_fields(triplet: CutoutTriplet | None, candid: int, pid: int, wcs) -> dict:
    """The three cutout records of one alert; ``wcs`` is :func:`stamp_header_cards` of the image."""
    if triplet is None:
        return {kind: None for kind, _ in STAMP_KINDS}
    cards, crpix1, crpix2 = wcs
    crpix = None if triplet.origin is None or not cards else (crpix1 - triplet.origin[0], crpix2 - triplet.origin[1])
    names = {"science": f"candid{candid}_pid{pid}_targ_sci.fits.gz",
             "reference": f"candid{candid}_ref.fits.gz",
             "difference": f"candid{candid}_pid{pid}_targ_scimref.fits.gz"}
    return {kind: stamp_record(getattr(triplet, attr), names[attr], cards, crpix) for kind, attr in STAMP_KINDS}


def assemble_alert(record: dict, history: CandidateHistory, cutouts: Mapping[str, Any], publisher: str,
                   fp_hists: list[dict] | None = None) -> dict:
    """One v4.02 alert from its candidate record, history, cutout records and forced photometry."""
    record.update(ndethist=history.ndethist, ncovhist=history.ncovhist,
                  jdstarthist=history.jdstarthist, jdendhist=history.jdendhist)
    return {"schemavsn": SCHEMA_VERSION, "publisher": publisher, "objectId": history.object_id,
            "candid": record["candid"], "candidate": record, "prv_candidates": history.prv_candidates,
            "fp_hists": fp_hists, **cutouts}


def make_alerts(context: AlertContext, candidates, cutouts: Sequence[CutoutTriplet | None] | None,
                store: HistoryStore, publisher: str, fp_hists: Sequence[list[dict]] | None = None) -> list[dict]:
    """Alerts for every candidate of one quadrant image, recording them in the history.

    Parameters
    ----------
    context : AlertContext
        The image's metadata.
    candidates : astropy.table.Table
        One row per candidate (see the module's input contract).
    cutouts : sequence of CutoutTriplet or None
        Aligned with the table's rows; None for no cutouts at all.
    store : HistoryStore
        Object history; the image and its detections are recorded (idempotently).
    publisher : str
        The ``publisher`` field, survey name first (e.g. "ZTF (skydiff)").
    fp_hists : sequence of list of dict, optional
        Aligned with the table's rows: each candidate's ``fp_hist`` records; None: null.

    Returns
    -------
    list of dict
        v4.02 alert records, in table order.
    """
    records = candidate_records(context, candidates)
    if cutouts is not None and len(cutouts) != len(records):
        raise AlertInputError(f"{len(cutouts)} cutout triplets for {len(records)} candidates")
    if fp_hists is not None and len(fp_hists) != len(records):
        raise AlertInputError(f"{len(fp_hists)} fp_hists lists for {len(records)} candidates")
    prv_names = schema_field_names("prv_candidate")
    detections = [{name: record[name] for name in prv_names} for record in records]
    histories = store.record_image(image_record(context), detections)
    wcs = stamp_header_cards(context.wcs_header)
    pid = context.pid
    return [assemble_alert(record, history,
                           cutout_fields(None if cutouts is None else cutouts[i], record["candid"], pid, wcs),
                           publisher, None if fp_hists is None else fp_hists[i])
            for i, (record, history) in enumerate(zip(records, histories))]
