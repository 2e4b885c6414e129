"""Alert packets from the subtraction stage's products, in memory or as written on disk.

Two entry points share one path (:func:`alert_context` + :func:`cutout_triplets` +
:func:`alerts.packet.make_alerts`):

* in memory, right after :func:`pipeline.subtraction.difference.subtract_images`:
  :func:`alerts_from_result` (a :class:`~pipeline.subtraction.difference.SubtractionResult`);
* from what ``skydiff subtract`` wrote (``candidates.ecsv``, ``cutouts.fits``, ``qa.json``) plus
  the solved science image's header and the reference's header: :func:`alerts_from_products`.

:func:`publish_subtraction` publishes one subtraction held in memory (the quadrant runner,
which never reads back what it wrote); :func:`publish_products` builds and publishes the
alerts of several subtraction output folders in exposure-time order (so a later image's alerts carry the earlier detections in
``prv_candidates``) through an :class:`~alerts.publish.AlertPublisher`.

Given the configuration, each alert's ``fp_hists`` come from the difference-image archive
(``paths.fparchive``, :func:`forced_photometry_history`): forced photometry at the candidate
on the archived images of the ``forcedphot.history_days`` before the exposure; null without
an archive.

Every candidate with a finite position and PSF magnitude becomes one alert whose ``candid``
follows from its ``cand_index`` (:func:`alerts.ids.make_candid`); the schema requires
``magpsf``, so a candidate without one (:func:`alertable`) gets none.

Where the image-level fields come from
--------------------------------------
``jd``: exposure start (``OBSMJD`` + 2400000.5), as the schema defines ``candidate.jd``;
``night`` (the topic's UT date) and ``nid`` (ZTF's night id, UT days since 2017-01-01, read
off the sample packets: ``nid = floor(MJD) - 57754``) from the same instant; ``fid``
``FILTERID``; ``expid``/``rcid`` give ``pid``/``candid`` (:mod:`alerts.ids`); ``field``
``FIELDID``; ``programid`` ``PROGRMID``; ``exptime`` ``EXPTIME``; ``rfid``, ``jdstartref``,
``jdendref``, ``nframesref`` the reference's ``REFID``, ``JDSTART``, ``JDEND``, ``NFRAMES``;
the footprint the science WCS's four pixel-edge corners; ``wcs_header`` the science
header's WCS cards as SCAMP wrote them (TPV included), so every cutout carries its WCS.

``magzpsci`` is the science image's zero point.  The candidates' ``magpsf`` are already
calibrated (fluxes of the difference are in the reference's system, ``zp_ref``), so
``10**(0.4 * (magzpsci - magpsf))`` is the flux in science-image ADU, as brokers use it.
``magzpsciunc``, ``magzpscirms``, ``clrcoeff``, ``clrcounc``, ``zpmed``, ``clrmed``,
``clrrms``, ``zpclrcov`` and ``nmatches`` (Gaia calibrators used, where ZTF counts PS1's;
the colours are Gaia BP - RP, where ZTF's are PS1 g - r or r - i) come from the science
image's photometric calibration (:class:`pipeline.measure.calibration.PhotCalResult`); from
files, from the QA record under those names (null, ``nmatches`` 0, where it lacks them).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time

from alerts.cutouts import CutoutTriplet
from alerts.packet import AlertContext, make_alerts
from alerts.schema import serialize_alert
from pipeline.core.exits import BadInputError
from pipeline.subtraction.products import CUTOUT_KINDS

__all__ = ["AlertProductsError", "ReferenceSummary", "SubtractionProducts", "ImageAlerts",
           "ZTF_NIGHT_EPOCH_MJD", "image_calibration", "alert_context", "cutout_triplets",
           "alertable", "forced_photometry_history", "alerts_from_result", "read_products", "alerts_from_products", "publish_products",
           "publish_subtraction"]

log = logging.getLogger("skydiff.alerts")

#: ZTF's night ids count UT days from MJD 57754 (2017-01-01).
ZTF_NIGHT_EPOCH_MJD = 57754


class AlertProductsError(BadInputError):
    """Subtraction products that cannot make alerts; the message names the file and problem."""


@dataclass(frozen=True)
class ReferenceSummary:
    """What the alerts need of a reference image (its primary header's identity keywords)."""

    refid: int
    jdstart: float
    jdend: float
    nframes: int

    @classmethod
    def checked(cls, refid: Any, jdstart: float, jdend: float, nframes: int,
                source: str = "<reference>") -> "ReferenceSummary":
        """A summary whose every field the alert schema requires is present."""
        if refid is None or isinstance(refid, bool) or not isinstance(refid, (int, np.integer)):
            raise AlertProductsError(f"{source}: reference has no integer REFID (alerts need rfid)")
        if not (math.isfinite(jdstart) and math.isfinite(jdend)):
            raise AlertProductsError(f"{source}: reference lacks JDSTART/JDEND (alerts need jdstartref, jdendref)")
        if int(nframes) < 1:
            raise AlertProductsError(f"{source}: reference has NFRAMES = {nframes} (alerts need nframesref >= 1)")
        return cls(int(refid), float(jdstart), float(jdend), int(nframes))

    @classmethod
    def of(cls, reference: Any, source: str = "<reference>") -> "ReferenceSummary":
        """From anything with ``refid``, ``jdstart``, ``jdend``, ``nframes`` (a ReferenceImage)."""
        return cls.checked(getattr(reference, "refid", None), float(getattr(reference, "jdstart", math.nan)),
                           float(getattr(reference, "jdend", math.nan)), int(getattr(reference, "nframes", 0)),
                           source)

    @classmethod
    def read(cls, path: str | os.PathLike) -> "ReferenceSummary":
        """From a reference file's primary header (the pixels are not read)."""
        try:
            header = fits.getheader(path, 0)
        except FileNotFoundError:
            raise AlertProductsError(f"{path}: reference file not found") from None
        except (OSError, ValueError) as exc:
            raise AlertProductsError(f"{path}: not a readable FITS reference ({exc})") from None

        def number(key: str) -> float:
            value = header.get(key)
            return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan

        nframes = number("NFRAMES")
        return cls.checked(header.get("REFID"), number("JDSTART"), number("JDEND"),
                           int(nframes) if math.isfinite(nframes) else 0, str(path))


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


#: The science image's photometric calibration fields (PhotCalResult / qa.json names).
_CALIBRATION_FIELDS = ("magzpsciunc", "magzpscirms", "clrcoeff", "clrcounc", "zpmed", "clrmed", "clrrms", "zpclrcov")


def image_calibration(result_or_qa: Any) -> dict[str, Any]:
    """Image-level photometric fields of the alerts from a SubtractionResult or its QA record.

    Returns a dict with ``diffmaglim``, ``magzpsci``, ``magzpsciunc``, ``magzpscirms``,
    ``clrcoeff``, ``clrcounc``, ``zpmed``, ``clrmed``, ``clrrms``, ``zpclrcov`` (float or None),
    ``nmatches`` (int), ``rbversion`` and ``drbversion`` (str).
    """
    if isinstance(result_or_qa, Mapping):
        qa = result_or_qa
        if "zp_science" not in qa or "diffmaglim" not in qa:
            raise AlertProductsError("QA record lacks zp_science or diffmaglim (not a subtraction qa.json?)")
        return {"diffmaglim": _finite_or_none(qa["diffmaglim"]), "magzpsci": _finite_or_none(qa["zp_science"]),
                **{name: _finite_or_none(qa.get(name)) for name in
                   _CALIBRATION_FIELDS},
                "nmatches": int(qa.get("nmatches") or 0), "rbversion": str(qa.get("rbversion") or ""),
                "drbversion": str(qa.get("drbversion") or "")}
    result = result_or_qa
    photcal = result.science.photcal
    values = {"diffmaglim": _finite_or_none(result.diffmaglim), "magzpsci": _finite_or_none(result.zp_science),
              **{name: None for name in _CALIBRATION_FIELDS}, "nmatches": 0,
              "rbversion": str(result.candidates.meta.get("rbversion") or ""),
              "drbversion": str(result.candidates.meta.get("drbversion") or "")}
    if photcal is not None:
        values.update({name: _finite_or_none(getattr(photcal, name))
                       for name in _CALIBRATION_FIELDS})
        values["nmatches"] = int(photcal.n_used)
    return values


def _wcs_cards(science_header: fits.Header, wcs) -> dict[str, Any]:
    from pipeline.formats.scamp_head import is_wcs_keyword

    if "CTYPE1" in science_header:
        return {card.keyword: card.value for card in science_header.cards if is_wcs_keyword(card.keyword)}
    return dict(wcs.to_header(relax=True)) if wcs is not None else {}


def alert_context(science_header: fits.Header, wcs, reference: Any, result_or_qa: Any, cfg,
                  shape: tuple[int, int] | None = None, outdir: str | os.PathLike | None = None) -> AlertContext:
    """The :class:`~alerts.packet.AlertContext` of one subtracted science image.

    Parameters
    ----------
    science_header : astropy.io.fits.Header
        The solved science image's header (the input contract's keywords and its WCS).
    wcs : astropy.wcs.WCS or None
        The science image's WCS (None: read from the header).
    reference : ReferenceImage or ReferenceSummary
        Anything with ``refid``, ``jdstart``, ``jdend``, ``nframes``.
    result_or_qa : SubtractionResult or mapping
        The subtraction's result, or its QA record (``qa.json``).
    cfg : pipeline.core.config.Config
        ``kafka.survey`` names the topics and object ids.
    shape : (int, int), optional
        The image's (ny, nx); default: the result's, else the header's NAXIS2/NAXIS1.
    outdir : path-like, optional
        The subtraction's products folder: ``pdiffimfilename`` is its ``diff.fits``, relative
        to ``paths.outputs`` when under it (null without one: an in-memory subtraction wrote no
        difference image).

    Raises
    ------
    AlertProductsError, pipeline.core.image.ImageContractError
    """
    from pipeline.core.image import footprint_corners, header_wcs, validate_header

    meta = validate_header(science_header, "science header")
    wcs = header_wcs(science_header) if wcs is None else wcs
    if wcs is None:
        raise AlertProductsError("science header has no WCS (alerts need the solved image)")
    if shape is None and not isinstance(result_or_qa, Mapping):
        shape = result_or_qa.zogy.diff.shape
    if shape is None:
        if "NAXIS1" not in science_header or "NAXIS2" not in science_header:
            raise AlertProductsError("science header lacks NAXIS1/NAXIS2 (the image shape)")
        shape = (int(science_header["NAXIS2"]), int(science_header["NAXIS1"]))
    calibration = image_calibration(result_or_qa)
    start = Time(meta.obsmjd, format="mjd", scale="utc")
    footprint = tuple((float(ra), float(dec)) for ra, dec in footprint_corners(wcs, shape))
    ref = reference if isinstance(reference, ReferenceSummary) else ReferenceSummary.of(reference)
    return AlertContext(
        jd=float(meta.obsmjd) + 2400000.5, fid=meta.filterid, expid=meta.expid, rcid=meta.rcid,
        field=meta.fieldid, programid=meta.progrmid, night=start.strftime("%Y%m%d"),
        rfid=ref.refid, jdstartref=ref.jdstart, jdendref=ref.jdend, nframesref=ref.nframes,
        footprint=footprint, exptime=float(meta.exptime), nid=int(math.floor(meta.obsmjd)) - ZTF_NIGHT_EPOCH_MJD,
        survey=cfg.kafka.survey, wcs_header=_wcs_cards(science_header, wcs),
        pdiffimfilename=_difference_image_name(outdir, cfg), **calibration)


def _difference_image_name(outdir, cfg) -> str | None:
    """``pdiffimfilename``: the products folder's ``diff.fits``, relative to ``paths.outputs``
    when it lies there (as ZTF names the file, not where one machine keeps it: the same image
    run by Slurm and by the local executor gives the same packet), else its absolute path."""
    if outdir is None:
        return None
    path = (Path(outdir) / "diff.fits").resolve()
    try:
        return str(path.relative_to(cfg.paths.resolve("outputs").resolve()))
    except ValueError:
        return str(path)


def cutout_triplets(cubes: Mapping[str, np.ndarray], candidates: Table) -> list[CutoutTriplet]:
    """Per candidate row the :class:`CutoutTriplet` of the (N, s, s) science/reference/difference cubes.

    The stamps' origin follows :func:`pipeline.subtraction.candidates.cutout_stamps`: the central pixel is
    0-based ``(floor(xpos - 0.5), floor(ypos - 0.5))``.
    """
    arrays = [np.asarray(cubes[name]) for name in CUTOUT_KINDS]
    n = len(candidates)
    for name, cube in zip(CUTOUT_KINDS, arrays):
        if cube.ndim != 3 or cube.shape[0] != n or cube.shape[1:] != arrays[0].shape[1:]:
            raise AlertProductsError(f"{name} cutouts have shape {cube.shape}, expected ({n}, s, s) "
                                     "aligned with the candidates")
    if n == 0:
        return []
    half_y, half_x = arrays[0].shape[1] // 2, arrays[0].shape[2] // 2
    col = np.floor(np.asarray(candidates["xpos"], float) - 0.5).astype(int) - half_x
    row = np.floor(np.asarray(candidates["ypos"], float) - 0.5).astype(int) - half_y
    return [CutoutTriplet(arrays[0][i], arrays[1][i], arrays[2][i], origin=(int(col[i]), int(row[i])))
            for i in range(n)]


def alertable(candidates: Table) -> np.ndarray:
    """Rows that can become alerts: finite position and PSF magnitude (the schema requires them).

    A candidate whose PSF-fit flux has the opposite sign of its Scorr peak (seen on weak
    negative peaks beside bright residuals) has no magnitude and gets no alert.
    """
    keep = np.ones(len(candidates), dtype=bool)
    for name in ("ra", "dec", "magpsf", "sigmapsf"):
        values = np.ma.asarray(candidates[name], dtype=float)
        keep &= ~np.ma.getmaskarray(values) & np.isfinite(values.filled(np.nan))
    return keep


def forced_photometry_history(context: AlertContext, candidates: Table, cfg) -> list[list[dict]] | None:
    """The ``fp_hists`` of candidates: forced photometry at their positions on the archived
    difference images (``paths.fparchive``) of the ``forcedphot.history_days`` before the
    exposure (the exposure itself excluded); None when there is no archive."""
    from pipeline.forcedphot.archive import INDEX_NAME, DifferenceArchive
    from pipeline.forcedphot.lightcurves import forced_photometry, fp_hist_records

    root = cfg.paths.resolve("fparchive")
    if not (root / INDEX_NAME).is_file():
        return None
    table = forced_photometry(DifferenceArchive(root), np.asarray(candidates["ra"], float),
                              np.asarray(candidates["dec"], float),
                              (context.jd - cfg.forcedphot.history_days, context.jd), config=cfg.forcedphot)
    return fp_hist_records(table, len(candidates))


def _make_alerts(context: AlertContext, candidates: Table, cubes: Mapping[str, np.ndarray], history_store,
                 publisher_name: str, cfg=None) -> list[dict]:
    """Alerts of the alertable rows, each with the cutouts of its own row (and, given ``cfg``,
    its forced-photometry history)."""
    triplets = cutout_triplets(cubes, candidates)
    keep = alertable(candidates)
    if not keep.all():
        log.info("pid %d: %d of %d candidates have no finite magpsf/position: no alert for them",
                 context.pid, int((~keep).sum()), len(keep))
    kept = candidates[keep]
    if history_store is not None and cfg is not None:
        # Earlier overlapping images announced to the history are archived before they are
        # recorded: once they are, fp_hists measure them as a sequential run would.
        history_store.wait_for_earlier_images(context.pid, context.jd, context.footprint)
    fp_hists = None if cfg is None else forced_photometry_history(context, kept, cfg)
    return make_alerts(context, kept, [t for t, k in zip(triplets, keep) if k], history_store,
                       publisher_name, fp_hists)


def alerts_from_result(result, science_header: fits.Header, wcs, reference: Any, cfg, history_store,
                       publisher_name: str | None = None) -> tuple[AlertContext, list[dict]]:
    """The context and alert packets of a subtraction held in memory (recorded in the history)."""
    context = alert_context(science_header, wcs, reference, result, cfg)
    alerts = _make_alerts(context, result.candidates, result.cutouts, history_store,
                          publisher_name or cfg.kafka.publisher, cfg)
    return context, alerts


@dataclass(frozen=True)
class SubtractionProducts:
    """What ``skydiff subtract`` wrote in one folder, plus the headers alerts need."""

    outdir: Path
    science_path: Path
    reference_path: Path
    science_header: fits.Header
    reference: ReferenceSummary
    qa: dict
    candidates: Table | None = None
    cutouts: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def jd(self) -> float:
        return float(self.science_header["OBSMJD"]) + 2400000.5


def _input_path(qa: Mapping, key: str, given, qa_path: Path) -> Path:
    if given is not None:
        return Path(given)
    if not qa.get(key):
        raise AlertProductsError(f"{qa_path}: no {key!r} path recorded; give the {key} image explicitly")
    return Path(qa[key])


def read_products(outdir: str | os.PathLike, science_path: str | os.PathLike | None = None,
                  reference_path: str | os.PathLike | None = None, tables: bool = True) -> SubtractionProducts:
    """Read a subtraction output folder (``tables=False``: headers and QA only, for ordering).

    ``science_path`` / ``reference_path`` default to those recorded in ``qa.json``.

    Raises
    ------
    AlertProductsError
        A missing or unreadable product, or products that disagree (candidates vs cutouts,
        QA's expid/rcid/refid vs the headers).
    """
    from pipeline.core.image import ImageContractError, validate_header

    from pipeline.subtraction.products import (SubtractionOutputError, read_candidates, read_cutouts,
                                               read_qa_record)

    outdir = Path(outdir)
    qa_path = outdir / "qa.json"
    try:
        qa = read_qa_record(outdir)
    except SubtractionOutputError as exc:
        raise AlertProductsError(str(exc)) from None
    science_path = _input_path(qa, "science", science_path, qa_path)
    reference_path = _input_path(qa, "reference", reference_path, qa_path)
    try:
        header = fits.getheader(science_path, 0)
        if "EXPID" not in header and header.get("NAXIS", 0) == 0:
            header = fits.getheader(science_path, 1)
    except FileNotFoundError:
        raise AlertProductsError(f"{science_path}: science image not found") from None
    except (OSError, ValueError, IndexError) as exc:
        raise AlertProductsError(f"{science_path}: not a readable FITS image ({exc})") from None
    try:
        meta = validate_header(header, science_path)
    except ImageContractError as exc:
        raise AlertProductsError(str(exc)) from None
    reference = ReferenceSummary.read(reference_path)
    for key, expected in (("expid", meta.expid), ("rcid", meta.rcid), ("refid", reference.refid)):
        if key in qa and qa[key] is not None and int(qa[key]) != expected:
            raise AlertProductsError(f"{qa_path}: {key} {qa[key]} differs from {expected} of "
                                     f"{reference_path if key == 'refid' else science_path}")
    products = SubtractionProducts(outdir, science_path, reference_path, header, reference, qa)
    if not tables:
        return products
    try:
        candidates = read_candidates(outdir)
        cubes = read_cutouts(outdir, len(candidates))
    except SubtractionOutputError as exc:
        raise AlertProductsError(str(exc)) from None
    return SubtractionProducts(outdir, science_path, reference_path, header, reference, qa, candidates, cubes)


def _products_alerts(products: SubtractionProducts, cfg, history_store, publisher_name: str | None
                     ) -> tuple[AlertContext, list[dict]]:
    context = alert_context(products.science_header, None, products.reference, products.qa, cfg,
                            outdir=products.outdir)
    alerts = _make_alerts(context, products.candidates, products.cutouts, history_store,
                          publisher_name or cfg.kafka.publisher, cfg)
    return context, alerts


def alerts_from_products(outdir: str | os.PathLike, science_path: str | os.PathLike | None,
                         reference_path: str | os.PathLike | None, cfg, history_store,
                         publisher_name: str | None = None) -> list[dict]:
    """The alert packets of a subtraction output folder (recorded in the history), in table order.

    ``science_path`` (the solved science image) and ``reference_path`` may be None: then the
    paths recorded in ``qa.json`` are used.
    """
    products = read_products(outdir, science_path, reference_path)
    return _products_alerts(products, cfg, history_store, publisher_name)[1]


@dataclass
class ImageAlerts:
    """The alerts of one subtraction output folder: counts and timings."""

    outdir: str
    expid: int
    rcid: int
    jd: float
    topic: str
    alerts: int = 0
    spooled: int = 0
    already_delivered: int = 0
    with_history: int = 0             # alerts whose prv_candidates hold an earlier detection
    candids: list[int] = field(default_factory=list, repr=False)
    read_s: float = 0.0
    build_s: float = 0.0
    publish_s: float = 0.0


def publish_products(outdirs: Iterable[str | os.PathLike], cfg, history_store, publisher,
                     publisher_name: str | None = None) -> list[ImageAlerts]:
    """Build and publish the alerts of subtraction output folders, earliest exposure first.

    Every packet goes through ``publisher`` (spool first, then the broker when one is
    configured); the caller flushes and closes it.  Returns one record per folder, in the
    order processed.
    """
    clock = time.perf_counter
    ordered = sorted((read_products(outdir, tables=False) for outdir in outdirs), key=lambda p: p.jd)
    records = []
    for head in ordered:
        t0 = clock()
        products = read_products(head.outdir, head.science_path, head.reference_path)
        t1 = clock()
        context, alerts = _products_alerts(products, cfg, history_store, publisher_name)
        records.append(_publish(context, alerts, publisher, head.outdir, read_s=t1 - t0, build_s=clock() - t1))
    return records


def publish_subtraction(outdir: str | os.PathLike, qa: Mapping, candidates: Table, cubes: Mapping[str, np.ndarray],
                        science_header: fits.Header, reference: Any, cfg, history_store, publisher,
                        publisher_name: str | None = None) -> ImageAlerts:
    """Build and publish the alerts of one subtraction held in memory (the quadrant runner's path).

    The same packets, byte for byte, as :func:`publish_products` builds from the folder
    ``outdir`` once the subtraction has written it: the image-level fields come from the QA
    record as written (``qa``), the cutouts as the float32 planes ``cutouts.fits`` holds, and
    ``science_header`` is the solved image's header as its file reads back
    (:func:`pipeline.core.image.write_quadrant_image`).  Nothing is read from disk.
    """
    clock = time.perf_counter
    t0 = clock()
    ref = reference if isinstance(reference, ReferenceSummary) else ReferenceSummary.of(reference, str(outdir))
    context = alert_context(science_header, None, ref, qa, cfg, outdir=outdir)
    stamps = {name: np.asarray(cubes[name], dtype=np.float32) for name in CUTOUT_KINDS}
    alerts = _make_alerts(context, candidates, stamps, history_store, publisher_name or cfg.kafka.publisher, cfg)
    return _publish(context, alerts, publisher, outdir, read_s=0.0, build_s=clock() - t0)


def _publish(context: AlertContext, alerts: list[dict], publisher, outdir, read_s: float,
             build_s: float) -> ImageAlerts:
    """Send one image's packets through ``publisher``; its :class:`ImageAlerts` record."""
    t0 = time.perf_counter()
    before = (publisher.report.spooled, publisher.report.already_delivered)
    for alert in alerts:
        publisher.publish(context.topic, alert["candid"], serialize_alert(alert))
    return ImageAlerts(
        outdir=str(outdir), expid=context.expid, rcid=context.rcid, jd=context.jd, topic=context.topic,
        alerts=len(alerts), spooled=publisher.report.spooled - before[0],
        already_delivered=publisher.report.already_delivered - before[1],
        with_history=sum(any(p["candid"] is not None for p in a["prv_candidates"] or ()) for a in alerts),
        candids=[a["candid"] for a in alerts], read_s=read_s, build_s=build_s,
        publish_s=time.perf_counter() - t0)
