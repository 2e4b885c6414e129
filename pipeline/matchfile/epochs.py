"""Matchfiles from the pipeline's own products: seeded from a reference image, filled with the
PSF photometry of every science image.

:mod:`pipeline.matchfile.store` defines what a matchfile takes (a reference catalogue with
:class:`~pipeline.matchfile.store.ReferenceMeta`; an epoch as :class:`~pipeline.matchfile.store.EpochMeta`
plus a photometry table).  This module builds those inputs from the products of the
reference and subtraction stages:

- :func:`reference_meta` / :func:`seed_matchfile_from_reference`: a
  :class:`~pipeline.reference.files.ReferenceImage`'s PSF catalogue (magnitudes at its
  ``MAGZP``) seeds the matchfile of its (field, CCD, quadrant, filter); seeding again from
  the same reference keeps the file.
- :func:`calibration_of`, :func:`science_epoch` / :func:`append_science_epoch`: a science
  image's solved header and its characterisation (or the whole subtraction result) become
  one epoch: the image's PSF photometry with ``mag = magzp - 2.5 log10(flux)`` on the
  image's own zero point, the exposure's metadata, seeing (PSF FWHM on the solved pixel
  scale), 5-sigma limit at that zero point, the calibration's colour coefficient
  (``clrcoeff``, ``clrcounc``), each detection's PSF-fit ``chi`` and ``sharp``, and QA flags (:data:`ASTROMETRY_QA_BITS` from
  ``ASTRUSE``, :data:`PHOTOMETRY_QA_BITS` from where the zero point came from).  Appending
  an exposure again replaces it.
- :func:`epoch_from_files` / :func:`append_from_files` at the file edge.  A subtraction's
  output folder holds no photometry of the science image (``diff.fits``, ``scorr.fits``,
  candidates, cutouts, ``qa.json``), so the solved science image ``qa.json`` names is
  characterised again (:func:`pipeline.measure.characterize.characterize_image`, the stage the
  subtraction ran) and the zero point the subtraction used (``qa.json``'s
  ``zp_science``, ``magzpsciunc``, ``zp_source``) calibrates it, so the matchfile and the
  alerts share one zero point.

Detections with a non-positive or unmeasured PSF flux have no magnitude and are not
appended (a matchfile row is a detection's magnitude).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table

from pipeline.measure.characterize import Characterization, CharacterizeError, characterize_image, point_source_limit
from pipeline.core.config import Config
from pipeline.core.image import ImageContractError, QuadrantImage, header_wcs, read_quadrant, validate_header
from pipeline.matchfile.store import AppendResult, EpochMeta, ReferenceMeta, append_epoch, create_matchfile
from pipeline.matchfile.layout import LayoutError, fid_of_band, matchfile_path
from pipeline.measure.photometry import flux_to_mag
from pipeline.core.refraction import site_location
from pipeline.subtraction.difference import SubtractionError, SubtractionResult, relative_zeropoint
from pipeline.core.exits import BadInputError

__all__ = ["MatchfileRunError", "ASTROMETRY_QA_BITS", "PHOTOMETRY_QA_BITS", "EpochCalibration", "ScienceEpoch",
           "reference_meta", "seed_matchfile_from_reference", "calibration_of", "science_epoch", "commit_epoch",
           "append_science_epoch", "characterize_solved", "epoch_from_files", "append_from_files",
           "BAD_INPUT_ERRORS"]

#: ``astrometry_qa`` bits: the astrometry judged the image unusable (``ASTRUSE = F``); the
#: header carries no verdict (not solved by ``skydiff astrometry``).
ASTROMETRY_QA_BITS = {"UNUSABLE": 1, "NOT_CHECKED": 2}
#: ``photometry_qa`` bits: the zero point was not fitted to Gaia on this image (taken from
#: the header's MAGZP or from the reference catalogue); its uncertainty is unknown or above
#: :data:`MAX_ZP_UNCERTAINTY_MAG`.
PHOTOMETRY_QA_BITS = {"ZP_NOT_FITTED": 1, "ZP_UNCERTAIN": 2}
MAX_ZP_UNCERTAINTY_MAG = 0.05


class MatchfileRunError(BadInputError):
    """Products that cannot fill a matchfile; the message names the source and the problem."""


@dataclass(frozen=True)
class EpochCalibration:
    """The zero point an epoch's magnitudes are on (mag for 1 ADU) and where it came from:
    ``gaia`` (fitted on the image), ``header`` (its MAGZP) or ``reference`` (its reference
    catalogue's stars); the calibration's colour coefficient on Gaia BP - RP and its
    uncertainty (NaN when unknown: no Gaia calibration; ``clrcounc`` NaN when the
    coefficient was fixed rather than fitted)."""

    magzp: float
    magzpunc: float
    source: str
    clrcoeff: float = math.nan
    clrcounc: float = math.nan


@dataclass(frozen=True)
class ScienceEpoch:
    """One science image as a matchfile epoch: its matchfile's keys, metadata and photometry."""

    field: int
    ccdid: int
    qid: int
    fid: int
    meta: EpochMeta
    photometry: Table
    source: str = "<science image>"

    def matchfile(self, root: str | os.PathLike) -> Path:
        """Where this epoch's matchfile lives under ``root``."""
        return matchfile_path(Path(root), self.field, self.ccdid, self.qid, self.fid)


def reference_meta(reference) -> ReferenceMeta:
    """The matchfile's :class:`ReferenceMeta` of a :class:`~pipeline.reference.files.ReferenceImage`.

    Raises
    ------
    MatchfileRunError
        The reference lacks an identifier (a plain image rather than a built reference).
    """
    where = reference.path or f"reference {reference.refid}"
    missing = [name for name in ("refid", "fieldid", "ccdid", "qid", "filter") if getattr(reference, name) is None]
    if missing:
        raise MatchfileRunError(f"{where}: no {', '.join(missing)} (not a reference built by skydiff "
                                "reference build): cannot seed a matchfile")
    return ReferenceMeta(field=int(reference.fieldid), ccdid=int(reference.ccdid), qid=int(reference.qid),
                         fid=fid_of_band(reference.filter), refid=int(reference.refid),
                         jd_start=float(reference.jdstart), jd_end=float(reference.jdend),
                         nframes=int(reference.nframes))


def seed_matchfile_from_reference(root: str | os.PathLike, reference, cfg: Config) -> Path:
    """Seed the matchfile of a reference's (field, CCD, quadrant, filter) from its PSF catalogue.

    Idempotent: an existing matchfile seeded from the same ``refid`` is kept as it is.

    Raises
    ------
    MatchfileRunError
        No catalogue or identifiers in the reference.
    pipeline.matchfile.store.MatchfileError
        The matchfile exists, seeded from another reference.
    """
    meta = reference_meta(reference)
    if reference.catalog is None or len(reference.catalog) == 0:
        raise MatchfileRunError(f"{reference.path or f'reference {meta.refid}'}: no PSF catalogue to seed "
                                "a matchfile from")
    catalog = reference.catalog
    table = Table({name: np.asarray(catalog[name]) for name in ("id", "ra", "dec", "mag", "magerr", "flags")})
    return create_matchfile(root, table, meta, cfg.matchfile)


def calibration_of(result: Characterization | SubtractionResult, reference=None) -> EpochCalibration:
    """The zero point of a science image's photometry.

    A subtraction result's ``zp_science`` (what its candidates and alerts use); else the
    characterisation's own (Gaia fit or header MAGZP); else, as the subtraction does, the
    reference catalogue's stars (:func:`pipeline.subtraction.difference.relative_zeropoint`).

    Raises
    ------
    MatchfileRunError
        No zero point from any of them.
    """
    if isinstance(result, SubtractionResult):
        photcal = result.science.photcal
        unc = photcal.magzpsciunc if photcal is not None and result.zp_source != "reference" else math.nan
        return EpochCalibration(float(result.zp_science), float(unc), result.zp_source,
                                *_colour_term(photcal))
    if result.photcal is not None:
        return EpochCalibration(float(result.photcal.magzpsci), float(result.photcal.magzpsciunc),
                                "gaia" if result.photcal.zp_source == "fit" else "header",
                                *_colour_term(result.photcal))
    if reference is not None and reference.catalog is not None:
        try:
            zp, unc, _ = relative_zeropoint(result.photometry, reference.catalog)
        except SubtractionError as exc:
            raise MatchfileRunError(f"science image: {exc}") from None
        return EpochCalibration(zp, unc, "reference")
    raise MatchfileRunError("science image: no zero point (no Gaia fit, no MAGZP and no reference catalogue)")


def _colour_term(photcal) -> tuple[float, float]:
    """(clrcoeff, clrcounc) of a calibration, NaN without one."""
    if photcal is None:
        return math.nan, math.nan
    return float(photcal.clrcoeff), float(photcal.clrcounc)


def _pixel_scale_arcsec(header, fallback: float) -> float:
    wcs = header_wcs(header)
    if wcs is None:
        return fallback
    return 3600.0 * math.sqrt(abs(float(np.linalg.det(wcs.celestial.pixel_scale_matrix))))


def _astrometry_qa(header) -> int:
    if "ASTRUSE" not in header:
        return ASTROMETRY_QA_BITS["NOT_CHECKED"]
    return 0 if bool(header["ASTRUSE"]) else ASTROMETRY_QA_BITS["UNUSABLE"]


def _photometry_qa(calibration: EpochCalibration) -> int:
    flags = 0 if calibration.source == "gaia" else PHOTOMETRY_QA_BITS["ZP_NOT_FITTED"]
    if not (calibration.magzpunc <= MAX_ZP_UNCERTAINTY_MAG):     # NaN (unknown) included
        flags |= PHOTOMETRY_QA_BITS["ZP_UNCERTAIN"]
    return flags


def _limiting_mag(science: Characterization, zp: float) -> float:
    if science.photcal is not None and math.isfinite(science.limiting_mag):
        return float(science.limiting_mag + zp - science.photcal.magzpsci)
    return float(point_source_limit(science.psf, science.extraction.background_rms, zp))


def science_epoch(header, result: Characterization | SubtractionResult, cfg: Config,
                  calibration: EpochCalibration | None = None, reference=None,
                  source: str = "<science header>") -> ScienceEpoch:
    """One science image as a matchfile epoch (pure: reads and writes nothing).

    Parameters
    ----------
    header : astropy.io.fits.Header
        The solved science image's header (the input contract's keywords, its WCS, ASTRUSE).
    result : Characterization or SubtractionResult
        The image's characterisation (``.science`` of a subtraction result).
    cfg : Config
    calibration : EpochCalibration, optional
        The zero point; default :func:`calibration_of` ``(result, reference)``.
    reference : ReferenceImage, optional
        For the zero point from the reference catalogue when the image has none.
    source : str
        Names the image in error messages.

    Raises
    ------
    MatchfileRunError
        No zero point, or no detection with a positive flux.
    pipeline.core.image.ImageContractError
        The header breaks the input contract.
    """
    meta = validate_header(header, source)
    science = result.science if isinstance(result, SubtractionResult) else result
    calibration = calibration_of(result, reference) if calibration is None else calibration
    if not math.isfinite(calibration.magzp):
        raise MatchfileRunError(f"{source}: zero point is not finite ({calibration.magzp})")
    phot = science.photometry
    flux = np.asarray(phot["flux"], dtype=np.float64)
    fluxerr = np.asarray(phot["fluxerr"], dtype=np.float64)
    measured = (np.isfinite(flux) & (flux > 0) & np.isfinite(fluxerr) & (fluxerr > 0)
                & np.isfinite(np.asarray(phot["ra"], float)) & np.isfinite(np.asarray(phot["dec"], float)))
    if not measured.any():
        raise MatchfileRunError(f"{source}: no detection with a positive PSF flux")
    mag, magerr = flux_to_mag(flux[measured], fluxerr[measured], calibration.magzp)
    photometry = Table({"ra": np.asarray(phot["ra"], float)[measured], "dec": np.asarray(phot["dec"], float)[measured],
                        "flux": flux[measured], "fluxerr": fluxerr[measured], "mag": mag, "magerr": magerr,
                        "flags": np.asarray(phot["flags"], np.int64)[measured],
                        "chi": np.asarray(phot["chi2"], float)[measured],
                        "sharp": np.asarray(phot["sharpness"], float)[measured]})
    scale = _pixel_scale_arcsec(header, cfg.instrument.pixel_scale_arcsec)
    epoch = EpochMeta(expid=meta.expid, obsmjd=meta.obsmjd, exptime=meta.exptime, airmass=meta.airmass,
                      magzp=calibration.magzp, magzpunc=calibration.magzpunc,
                      seeing=float(science.psf.fwhm) * scale, limmag=_limiting_mag(science, calibration.magzp),
                      field_ra=meta.telra, field_dec=meta.teldec, astrometry_qa=_astrometry_qa(header),
                      photometry_qa=_photometry_qa(calibration), programid=meta.progrmid,
                      clrcoeff=calibration.clrcoeff, clrcounc=calibration.clrcounc)
    return ScienceEpoch(meta.fieldid, meta.ccdid, meta.qid, fid_of_band(meta.filter), epoch, photometry, source)


def commit_epoch(root: str | os.PathLike, epoch: ScienceEpoch, cfg: Config) -> AppendResult:
    """Append (or replace) an epoch in its matchfile under ``root``, which must be seeded."""
    return append_epoch(epoch.matchfile(root), epoch.meta, epoch.photometry, site_location(cfg.site), cfg.matchfile)


def append_science_epoch(root: str | os.PathLike, science_header, result: Characterization | SubtractionResult,
                         cfg: Config, calibration: EpochCalibration | None = None,
                         reference=None) -> AppendResult:
    """:func:`science_epoch` then :func:`commit_epoch`: the image's photometry into its matchfile."""
    return commit_epoch(root, science_epoch(science_header, result, cfg, calibration, reference), cfg)


# -- file edge -------------------------------------------------------------------------------

def _subtraction_record(outdir: Path) -> dict:
    from pipeline.subtraction.products import SubtractionOutputError, read_qa_record

    qa = outdir / "qa.json"
    try:
        record = read_qa_record(outdir)
    except SubtractionOutputError as exc:
        raise MatchfileRunError(str(exc)) from None
    if not record.get("science") or record.get("zp_science") is None:
        raise MatchfileRunError(f"{qa}: names no science image or zero point (written before subtract "
                                "recorded them?)")
    return record


def _qa_float(record: dict, name: str) -> float:
    """A number of a QA record (None or absent: NaN)."""
    value = record.get(name)
    return math.nan if value is None else float(value)


def characterize_solved(image: QuadrantImage, cfg: Config, gaia: Table | None = None) -> Characterization:
    """Characterise a solved science quadrant as the subtraction stage does."""
    meta = image.meta
    try:
        band = cfg.instrument.filters[meta.filter]
    except KeyError:
        raise MatchfileRunError(f"{image.path}: filter {meta.filter} is not configured") from None
    try:
        return characterize_image(image.data, image.mask, image.wcs, meta.gain, meta.saturate, band, gaia=gaia,
                                  header=image.header, read_noise=meta.readnoi, config=cfg.characterize)
    except CharacterizeError as exc:
        raise MatchfileRunError(f"{image.path}: {exc}") from None


def epoch_from_files(source: str | os.PathLike, cfg: Config, reference=None,
                     refcat: str | os.PathLike | None = None) -> tuple[ScienceEpoch, str | None]:
    """The epoch of a subtraction output folder or of a solved science image.

    A folder: the science image its ``qa.json`` names, characterised again, on the
    subtraction's zero point.  An image: characterised with Gaia from ``refcat`` if given,
    else its MAGZP, else the ``reference``'s catalogue.  Returns the epoch and the
    reference path the subtraction used (None for an image).

    Raises
    ------
    MatchfileRunError, pipeline.core.image.ImageContractError
    """
    source = Path(source)
    calibration, reference_path = None, None
    if source.is_dir():
        record = _subtraction_record(source)
        calibration = EpochCalibration(float(record["zp_science"]), _qa_float(record, "magzpsciunc"),
                                       str(record.get("zp_source", "gaia")), _qa_float(record, "clrcoeff"),
                                       _qa_float(record, "clrcounc"))
        reference_path, source = record.get("reference"), Path(record["science"])
    elif not source.is_file():
        raise MatchfileRunError(f"{source}: no such file or folder")
    image = read_quadrant(source)
    if image.wcs is None:
        raise MatchfileRunError(f"{source}: no WCS (run `skydiff astrometry` first)")
    gaia = None
    if refcat is not None and calibration is None:
        from catalogs import CatalogError, catalog_for_image
        try:
            gaia = catalog_for_image(refcat, image, cfg.astrometry.catalog_margin_deg)
        except (CatalogError, ValueError) as exc:
            raise MatchfileRunError(f"{refcat}: {exc}") from None
    science = characterize_solved(image, cfg, gaia)
    return science_epoch(image.header, science, cfg, calibration, reference, str(source)), reference_path


def append_from_files(root: str | os.PathLike, source: str | os.PathLike, cfg: Config,
                      reference_path: str | os.PathLike | None = None,
                      refcat: str | os.PathLike | None = None) -> AppendResult:
    """Append a subtraction output folder's or a solved image's epoch to its matchfile.

    The matchfile is seeded first from ``reference_path`` (default: the reference a
    subtraction folder's ``qa.json`` names) when one is known; without one it must exist.
    """
    from pipeline.reference.files import read_reference
    from pipeline.reference.model import ReferenceError

    reference = None
    if reference_path is None and Path(source).is_dir():
        reference_path = _subtraction_record(Path(source)).get("reference")
    if reference_path is not None:
        try:
            reference = read_reference(reference_path)
        except ReferenceError as exc:
            raise MatchfileRunError(str(exc)) from None
        seed_matchfile_from_reference(root, reference, cfg)
    epoch, _ = epoch_from_files(source, cfg, reference, refcat)
    return commit_epoch(root, epoch, cfg)


#: The errors that mean bad input (the message names the file and the problem).
BAD_INPUT_ERRORS = (MatchfileRunError, ImageContractError, LayoutError)
