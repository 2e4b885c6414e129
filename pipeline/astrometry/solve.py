"""Astrometric calibration of one quadrant: extraction, two-pass SCAMP, QA and the verdict.

The stage takes in-memory inputs (the image, the Gaia rows around it, the prior WCS) and
returns an :class:`AstrometryResult`; SCAMP is the one external program, run in a work
directory by :mod:`pipeline.astrometry.scamp`.  The verdict is ``usable`` only when every check passes;
each failed check adds a reason.  Nothing is accepted on SCAMP's exit code alone.

Checks, in order (a failed early check skips the later ones):

1. enough detections for SCAMP (``min_detections``) and reference stars in the footprint;
2. SCAMP's own verdict (pattern-matching contrast, matches, residual sigma, timeout, crash);
3. Gaia-match QA with the solved WCS: at least ``min_matched`` stars, RMS per axis below
   ``max_rms_mas``, and no region (of a 4 x 4 grid) whose mean residual exceeds
   ``max_cell_offset_mas`` at more than ``max_cell_significance`` sigma;
4. the pixel-scale check against the prior over the detector grid (``max_scale_diff_pct``),
   with the airmass recomputed at the quadrant's centre and the refraction model's
   expectation reported beside it.

Only the calibration sources are detected and measured here: the image is detected at
``calibration_detect_thresh`` (8 sigma per pixel, above the survey's 1.5) and at most
``calibration_sources`` of those detections are measured (:func:`calibration_selection`),
the brightest spread over the image.  They are what SCAMP, the QA, the PSF and the zero
point use; detecting and measuring the faint majority (tens of thousands near the Galactic
plane) would delay the alerts by seconds.  :meth:`AstrometryResult.full_extraction` detects
and measures every source at the survey's threshold when the science catalogue (the
matchfile) needs them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from pipeline.astrometry.qa import AstrometricQA, astrometric_outliers, astrometric_qa
from pipeline.core.config import AstrometryConfig, ExtractionConfig, FilterConfig, SiteConfig
from pipeline.measure.extract import (FLAG_BITS, Detections, ExtractionResult, detect_again, detect_sources,
                                      measure_detections, to_scamp_ldac)
from pipeline.core.image import QuadrantImage
from pipeline.core.timing import StageClock
from pipeline.astrometry.scale_check import ScaleCheck, scale_check
from pipeline.astrometry.scamp import ScampResult, run_scamp_pass, solve_with_scamp
from pipeline.formats.scamp_head import strip_wcs_keywords, wcs_from_header

__all__ = ["AstrometricPrior", "AstrometryResult", "prior_from_image_header",
           "solve_astrometry", "astrometric_matches", "best_per_cell", "calibration_extraction",
           "calibration_selection", "scamp_selection", "scamp_reference_selection"]

log = logging.getLogger("skydiff.astrometry")


@dataclass(frozen=True)
class AstrometricPrior:
    """The WCS SCAMP starts from, and the airmass it describes (for the scale check).

    ``source`` says where it came from ("distortion prior FILE" or "image header").
    """

    header: fits.Header
    airmass: float
    source: str

    def wcs(self, shape: tuple[int, int]) -> WCS:
        return wcs_from_header(self.header, shape)


def _as_tpv(header: fits.Header) -> fits.Header:
    """A TAN header as the equivalent TPV (identity PV terms): SCAMP's PRE-DISTORTED mode wants TPV."""
    out = header.copy()
    if str(out.get("CTYPE1", "")).endswith("-TAN"):
        out["CTYPE1"], out["CTYPE2"] = "RA---TPV", "DEC--TPV"
        out["PV1_1"], out["PV2_1"] = 1.0, 1.0
    return out


def prior_from_image_header(image: QuadrantImage) -> AstrometricPrior:
    """The image's own first-guess WCS as the prior (when no distortion prior is given).

    Its airmass is the image's: a header WCS describes the exposure as taken.

    Raises
    ------
    ValueError
        The header has no celestial WCS.
    """
    if image.wcs is None:
        raise ValueError(f"{image.path}: no first-guess WCS in the header and no distortion prior given")
    keys = ("CTYPE1", "CTYPE2", "CUNIT1", "CUNIT2", "RADESYS", "EQUINOX", "CRVAL1", "CRVAL2",
            "CRPIX1", "CRPIX2", "CD1_1", "CD1_2", "CD2_1", "CD2_2")
    header = fits.Header()
    for key in keys:
        if key in image.header:
            header[key] = image.header[key]
    for key in image.header:
        if key.startswith(("PV1_", "PV2_")):
            header[key] = image.header[key]
    return AstrometricPrior(_as_tpv(header), image.meta.airmass, "image header")


@dataclass(frozen=True)
class AstrometryResult:
    """Everything the astrometry stage found about one quadrant."""

    usable: bool
    reasons: tuple[str, ...]
    wcs: WCS | None
    wcs_header: fits.Header | None
    prior: AstrometricPrior
    extraction: ExtractionResult
    reference: Table | None
    scamp: ScampResult | None
    qa: AstrometricQA | None
    scale: ScaleCheck | None
    matches: Table | None
    timings: dict[str, float] = field(default_factory=dict)
    n_outliers: int = 0
    # The quadrant's detections at the calibration threshold (``calibration_detect_thresh``,
    # or the survey's) and, when ``extraction`` measured only the calibration sources among
    # them (``calibration_sources``), which ones (0-based; None: all).
    detections: Detections | None = field(default=None, repr=False)
    calibration_rows: np.ndarray | None = field(default=None, repr=False)
    # The survey's [extraction] settings, at whose threshold the full catalogue is detected.
    extraction_config: ExtractionConfig | None = field(default=None, repr=False)

    @property
    def _detected_as_survey(self) -> bool:
        """Whether ``detections`` were made with the survey's settings (not a calibration threshold)."""
        return self.detections is None or self.extraction_config is None \
            or self.detections.config == self.extraction_config

    @property
    def measured_all(self) -> bool:
        """Whether ``extraction`` holds every detection at the survey's threshold."""
        return self.calibration_rows is None and self._detected_as_survey

    def full_extraction(self) -> ExtractionResult:
        """The extraction of every detection at the survey's threshold: ``extraction`` itself
        when it is that, otherwise the image detected again at that threshold (on the same
        background, :func:`~pipeline.measure.extract.detect_again`) where the calibration
        detection was made at a higher one, and every detection measured now.

        The calibration sources are measured again with the rest rather than merged in: the
        duplicates dropped and the seeing are judged over the sources measured together.
        """
        if self.measured_all:
            return self.extraction
        detections = self.detections if self._detected_as_survey else detect_again(self.detections,
                                                                                  self.extraction_config)
        return measure_detections(detections)

    def summary(self) -> dict:
        """The QA record (``qa.json``): verdict, figures, timings."""
        record: dict = {
            "usable": self.usable, "reasons": list(self.reasons), "prior": self.prior.source,
            "n_detections": len(self.extraction.catalog),
            "n_detected": self.extraction.n_detected,
            "detect_thresh": None if self.detections is None else self.detections.config.detect_thresh,
            "n_reference": 0 if self.reference is None else len(self.reference),
            "seeing_fwhm_px": _finite(self.extraction.seeing_fwhm_px),
            "background_adu": _finite(self.extraction.background_level),
            "rms_ra_mas": None, "rms_dec_mas": None, "n_matched": 0, "chi2": None,
            "scale_diff_pct_max": None, "airmass_quadrant": None,
            "n_astrometric_outliers": self.n_outliers,
        }
        if self.scamp is not None:
            record["n_scamp_detections"] = self.scamp.n_detections
        if self.scamp is not None and self.scamp.pass1 is not None:
            record["scamp_xy_contrast"] = _finite(self.scamp.pass1.xy_contrast)
            sigma = self.scamp.pass1.astrom_sigma_reference_arcsec
            record["scamp_pass1_sigma_arcsec"] = [_finite(s) for s in sigma]
        if self.scamp is not None and self.scamp.pass2 is not None:
            record["scamp_pass2_sigma_arcsec"] = [_finite(s) for s in self.scamp.pass2.astrom_sigma_reference_arcsec]
            record["scamp_chi2"] = _finite(self.scamp.pass2.astrom_chi2_reference)
        if self.qa is not None:
            record.update({k: _finite(v) if isinstance(v, float) else v for k, v in self.qa.as_dict().items()})
        if self.scale is not None:
            record.update({k: _finite(v) for k, v in self.scale.summary().items()})
        record["timings_s"] = {k: round(v, 4) for k, v in self.timings.items()}
        record["seconds"] = round(sum(self.timings.values()), 4)
        return record


def _finite(value):
    if value is None:
        return None
    value = float(value)
    return value if np.isfinite(value) else None


def best_per_cell(x: np.ndarray, y: np.ndarray, score: np.ndarray, shape: tuple[int, int],
                  max_rows: int, grid: int = 8) -> np.ndarray:
    """At most ``max_rows`` of the given points, the best-scoring ones spread over the image.

    Each cell of a ``grid`` x ``grid`` division of the image first keeps up to
    ``max_rows // grid**2`` of its own highest-scoring points, so that no part of the
    quadrant is left without stars; the rest of the quota goes to the highest scores among
    the points not yet taken, wherever they are.  Points off the image count in the nearest
    edge cell.

    Parameters
    ----------
    x, y : ndarray
        1-based pixel positions (finite).
    score : ndarray
        Higher is better (finite).
    shape : tuple of int
        Image shape ``(ny, nx)``.
    max_rows : int
        The quota; every point is kept when there are no more.
    grid : int
        Cells per image side.

    Returns
    -------
    ndarray of int
        Indices of the kept points, in their given order.
    """
    n = len(x)
    if n <= max_rows:
        return np.arange(n)
    ny, nx = shape
    cx = np.clip(((x - 0.5) * grid / nx).astype(np.int64), 0, grid - 1)
    cy = np.clip(((y - 0.5) * grid / ny).astype(np.int64), 0, grid - 1)
    cell = cy * grid + cx
    # Rank within each cell by score, best first (stable: ties keep the given order).
    order = np.lexsort((-score, cell))
    first_of_cell = np.searchsorted(cell[order], cell[order], side="left")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n) - first_of_cell
    taken = rank < max_rows // grid ** 2
    rest = np.flatnonzero(~taken)
    fill = rest[np.argsort(-score[rest], kind="stable")[:max_rows - int(taken.sum())]]
    taken[fill] = True
    return np.flatnonzero(taken)


def scamp_selection(catalog: Table, shape: tuple[int, int], max_sources: int, flags_mask: int,
                    grid: int = 8) -> np.ndarray:
    """The rows of an extraction catalogue SCAMP is given: the best N for astrometry.

    Only unflagged detections (no bit of ``flags_mask``: SCAMP would reject them anyway) with
    finite windowed positions and a positive ``SNR_WIN`` are kept; of those at most
    ``max_sources``, the highest S/N spread over the image (:func:`best_per_cell`).

    Parameters
    ----------
    catalog : Table
        Extraction catalogue with ``XWIN_IMAGE``, ``YWIN_IMAGE`` (1-based pixels), ``FLAGS``
        and ``SNR_WIN``.
    shape : tuple of int
        Image shape ``(ny, nx)``.
    max_sources : int
        At most this many rows; 0 selects every row, flagged ones included (the whole
        catalogue, as before the cap).
    flags_mask : int
        ``FLAGS`` bits that exclude a detection (SCAMP's ``FLAGS_MASK``).
    grid : int
        Cells per image side for the spatial quota.

    Returns
    -------
    ndarray of int
        Indices of the selected rows, in catalogue order.
    """
    n = len(catalog)
    if max_sources == 0:
        return np.arange(n)
    x = np.asarray(catalog["XWIN_IMAGE"], dtype=float)
    y = np.asarray(catalog["YWIN_IMAGE"], dtype=float)
    snr = np.asarray(catalog["SNR_WIN"], dtype=float)
    eligible = ((np.asarray(catalog["FLAGS"]).astype(np.int64) & flags_mask) == 0) \
        & np.isfinite(x) & np.isfinite(y) & np.isfinite(snr) & (snr > 0)
    rows = np.flatnonzero(eligible)
    return rows[best_per_cell(x[rows], y[rows], snr[rows], shape, max_sources, grid)]


def calibration_selection(detections: Detections, shape: tuple[int, int], max_sources: int,
                          grid: int = 8) -> np.ndarray | None:
    """The detections the astrometry stage measures: at most ``max_sources``, the brightest
    by detection flux spread over the image (:func:`best_per_cell`); None (every detection)
    when there are no more or ``max_sources`` is 0.

    The detection flux (sep's isophotal sum) is all there is before measuring; the
    saturated stars it ranks first are a few hundred at most, which the later selections
    (SCAMP's FLAGS mask, the PSF stars) drop.

    Returns
    -------
    ndarray of int or None
        0-based indices into ``detections.objects``, increasing.
    """
    objects = detections.objects
    if max_sources == 0 or len(objects) <= max_sources:
        return None
    flux = np.asarray(objects["flux"], dtype=float)
    flux = np.where(np.isfinite(flux), flux, -np.inf)
    return best_per_cell(np.asarray(objects["x"], dtype=float) + 1.0, np.asarray(objects["y"], dtype=float) + 1.0,
                         flux, shape, max_sources, grid)


def calibration_extraction(image: QuadrantImage, config: ExtractionConfig, max_sources: int,
                           detect_thresh: float = 0.0, min_detections: int = 0
                           ) -> tuple[Detections, np.ndarray | None, ExtractionResult]:
    """The detections of ``image`` the astrometry stage calibrates on, and their measurement.

    Parameters
    ----------
    image : QuadrantImage
    config : ExtractionConfig
        The survey's extraction settings.
    max_sources : int
        At most this many are measured (:func:`calibration_selection`); 0 = every detection.
    detect_thresh : float
        The calibration threshold (sigma per pixel): when above ``config.detect_thresh``
        the image is detected at it, and again at the survey's threshold, on the same
        background, when that finds fewer than ``min_detections``.  0 = the survey's.
    min_detections : int

    Returns
    -------
    detections : Detections
        At the threshold used (``detections.config.detect_thresh``).
    rows : ndarray of int or None
        The calibration sources among them (:func:`calibration_selection`), None for all.
    extraction : ExtractionResult
        Those sources measured.
    """
    meta = image.meta
    high = detect_thresh > config.detect_thresh
    first = replace(config, detect_thresh=detect_thresh) if high else config
    detections = detect_sources(image.data, image.mask, meta.gain, meta.saturate, first, read_noise=meta.readnoi)
    if high and len(detections.objects) < min_detections:
        detections = detect_again(detections, config)
    rows = calibration_selection(detections, image.shape, max_sources)
    return detections, rows, measure_detections(detections, rows)


def scamp_reference_selection(reference: Table, wcs: WCS, shape: tuple[int, int], max_rows: int,
                              grid: int = 8) -> np.ndarray:
    """The rows of the Gaia reference table SCAMP is given: at most ``max_rows``, the
    brightest in G spread over the image (:func:`best_per_cell`, placed by ``wcs``, the
    prior's); 0 = every row.

    SCAMP's time follows its reference rows, not its detections: at the ``plane`` preset
    (67,093 Gaia rows around a quadrant) pass 2 took 0.72 s with all of them and 0.10 s with
    the brightest 8,000, and the faint rows, mostly without a detection to match, add no
    accuracy.  Rows without a G magnitude (``MAG`` 99) come last.
    """
    n = len(reference)
    if max_rows == 0 or n <= max_rows:
        return np.arange(n)
    x, y = wcs.wcs_world2pix(np.asarray(reference["X_WORLD"], dtype=float),
                             np.asarray(reference["Y_WORLD"], dtype=float), 1)
    placed = np.isfinite(x) & np.isfinite(y)
    x, y = np.where(placed, x, 0.0), np.where(placed, y, 0.0)
    brightness = -np.asarray(reference["MAG"], dtype=float)
    brightness = np.where(np.isfinite(brightness), brightness, -np.inf)
    return best_per_cell(x, y, np.where(placed, brightness, -np.inf), shape, max_rows, grid)


def solve_astrometry(image: QuadrantImage, gaia: Table, prior: AstrometricPrior, workdir: str | Path,
                     config: AstrometryConfig, extraction_config: ExtractionConfig, site: SiteConfig,
                     band: FilterConfig) -> AstrometryResult:
    """Solve and judge the astrometry of one quadrant image.

    Parameters
    ----------
    image : QuadrantImage
    gaia : Table
        Gaia rows (archive column names) around the footprint, at the catalogue epoch;
        they are propagated to the exposure here.
    prior : AstrometricPrior
        The starting WCS (a distortion prior's ``.ahead`` or the image header's WCS).
    workdir : path
        Where SCAMP's catalogues and run directories go.
    config : AstrometryConfig
        The ``[astrometry]`` section: SCAMP's settings and the verdict's thresholds.
    extraction_config : ExtractionConfig
        The ``[extraction]`` section.
    site : SiteConfig
        The observatory, for the refraction expected in the scale check.
    band : FilterConfig
        The image's filter (its effective wavelength, for the same).

    Returns
    -------
    AstrometryResult
    """
    from catalogs import scamp_reference_table, write_scamp_reference
    from catalogs.epoch import NO_USABLE_REFERENCE
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    clock = StageClock(timings)
    meta = image.meta
    shape = image.shape

    detections, rows, extraction = calibration_extraction(
        image, extraction_config, config.calibration_sources, config.calibration_detect_thresh,
        config.calibration_min_detections)
    clock.lap("extract")
    reference = scamp_reference_table(gaia, meta.obstime) if len(gaia) else None
    partial = dict(prior=prior, extraction=extraction, reference=reference, timings=timings,
                   detections=detections, calibration_rows=rows, extraction_config=extraction_config)

    reasons: list[str] = []
    if len(extraction.catalog) < config.min_detections:
        reasons.append(f"only {len(extraction.catalog)} detections (at least {config.min_detections} needed)")
    if reference is None:
        reasons.append("no Gaia reference stars around the footprint")
    elif len(reference) == 0:
        reasons.append(f"{NO_USABLE_REFERENCE}: all {reference.meta['NINPUT']} Gaia rows around the footprint "
                       "lack a finite position error (ra_error, dec_error)")
    if reasons:
        return AstrometryResult(False, tuple(reasons), None, None, scamp=None, qa=None, scale=None,
                                matches=None, **partial)

    det_path = _write_scamp_detections(extraction, image, config, workdir / "quadrant.ldac")
    scamp_reference = reference[scamp_reference_selection(reference, prior.wcs(shape), shape,
                                                          config.scamp_max_reference)]
    ref_path = write_scamp_reference(workdir / "refcat.ldac", scamp_reference)
    clock.lap("write_catalogs")
    scamp = solve_with_scamp(det_path, ref_path, prior.header, shape, config, workdir)
    timings["scamp_pass1"] = scamp.seconds_pass1 or 0.0
    timings["scamp_pass2"] = scamp.seconds_pass2 or 0.0
    clock.lap("scamp_overhead")
    timings["scamp_overhead"] = max(0.0, timings["scamp_overhead"] - timings["scamp_pass1"] - timings["scamp_pass2"])
    if not scamp.ok:
        return AstrometryResult(False, (f"SCAMP: {scamp.reason}",), None, None, scamp=scamp, qa=None,
                                scale=None, matches=None, **partial)

    scamp, n_outliers = _refit_without_outliers(scamp, extraction, image, reference, ref_path, config,
                                                workdir, config.match_radius_arcsec)
    clock.lap("outlier_refit")
    solved = wcs_from_header(scamp.wcs_header, shape)
    qa, matches = astrometric_qa(extraction.catalog, solved, reference, radius_arcsec=config.match_radius_arcsec)
    clock.lap("qa")
    check = scale_check(solved, prior.wcs(shape), meta.obstime, site, band.wavelength_um, prior.airmass,
                        pressure_hpa=meta.pressure, temperature_c=meta.temperature,
                        max_diff_pct=config.max_scale_diff_pct, shape=shape)
    clock.lap("scale_check")

    if qa.n_matched < config.min_matched:
        reasons.append(f"only {qa.n_matched} Gaia matches (at least {config.min_matched} needed)")
    worst = max(qa.rms_ra_mas, qa.rms_dec_mas) if qa.n_matched else float("inf")
    if not worst <= config.max_rms_mas:
        reasons.append(f"Gaia-match RMS {worst:.0f} mas per axis exceeds {config.max_rms_mas:.0f} mas")
    if qa.max_cell_offset_mas > config.max_cell_offset_mas and qa.max_cell_significance > config.max_cell_significance:
        reasons.append(f"residuals off by {qa.max_cell_offset_mas:.0f} mas ({qa.max_cell_significance:.1f} sigma) "
                       f"in one region of the quadrant (limit {config.max_cell_offset_mas:.0f} mas)")
    if not check.usable:
        reasons.append(check.reason)
    return AstrometryResult(not reasons, tuple(reasons), solved, scamp.wcs_header, scamp=scamp, qa=qa,
                            scale=check, matches=matches, n_outliers=n_outliers, **partial)


def _write_scamp_detections(extraction: ExtractionResult, image: QuadrantImage, config: AstrometryConfig,
                            path: Path) -> Path:
    """SCAMP's detection LDAC: the :func:`scamp_selection` of the catalogue, WCS keywords removed."""
    rows = scamp_selection(extraction.catalog, image.shape, config.scamp_max_sources, config.flags_mask)
    if len(rows) < len(extraction.catalog):
        extraction = replace(extraction, catalog=extraction.catalog[rows])
    return to_scamp_ldac(extraction, strip_wcs_keywords(image.header), path)


def _refit_without_outliers(scamp: ScampResult, extraction: ExtractionResult, image: QuadrantImage,
                            reference: Table, ref_path: Path, settings: AstrometryConfig, workdir: Path,
                            radius_arcsec: float) -> tuple[ScampResult, int]:
    """Rerun pass 2 with the astrometric outliers of the first solution flagged out.

    SCAMP does not clip a bright unresolved blend whose formal error is a few mas: it bends
    the polynomial toward it, by up to 200 mas in the nearest corner.  Such detections are
    found against Gaia with the first solution, flagged ``ASTROMETRIC_OUTLIER`` and left out
    of a second pass 2 started from the first.  The refit is kept only if SCAMP accepts it.
    """
    first = wcs_from_header(scamp.wcs_header, image.shape)
    outliers = astrometric_outliers(extraction.catalog, first, reference, radius_arcsec)
    if len(outliers) == 0:
        return scamp, 0
    catalog = extraction.catalog.copy()
    catalog["FLAGS"][outliers] |= FLAG_BITS["ASTROMETRIC_OUTLIER"]
    refit_dir = workdir / "refit"
    refit_dir.mkdir(exist_ok=True)
    det_path = _write_scamp_detections(replace(extraction, catalog=catalog), image, settings,
                                       refit_dir / "quadrant.ldac")
    refit = run_scamp_pass(2, det_path, ref_path, scamp.wcs_header, settings, refit_dir, image.shape)
    if not refit.ok:
        log.warning("%s: pass 2 without %d outliers failed (%s); keeping the first solution",
                    image.path, len(outliers), refit.reason)
        return scamp, 0
    return replace(scamp, wcs_header=refit.head, pass2=refit.qa,
                   seconds_pass2=(scamp.seconds_pass2 or 0.0) + (refit.seconds or 0.0)), len(outliers)


def astrometric_matches(result: AstrometryResult, image: QuadrantImage) -> Table:
    """The matched (pixel, Gaia) pairs of a solved image in the layout the prior build reads."""
    if result.matches is None or result.reference is None:
        return Table()
    m, ref, meta = result.matches, result.reference, image.meta
    table = Table({
        "expid": np.full(len(m), meta.expid), "rcid": np.full(len(m), meta.rcid),
        "x": m["x"], "y": m["y"],
        "ra": np.asarray(ref["X_WORLD"])[m["ref_index"]], "dec": np.asarray(ref["Y_WORLD"])[m["ref_index"]],
        "dra_mas": m["dra_mas"], "ddec_mas": m["ddec_mas"], "snr": m["snr"],
    })
    table.meta.update({"TELRA": meta.telra, "TELDEC": meta.teldec, "OBSMJD": meta.obsmjd,
                       "AIRMASS": meta.airmass, "FILTER": meta.filter})
    # Conditions as columns: "temperature" is too long for a FITS keyword.
    for name, value in (("pressure", meta.pressure), ("temperature", meta.temperature)):
        if value is not None:
            table[name] = np.full(len(m), value)
    return table
