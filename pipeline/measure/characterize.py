"""Characterise one image: sources, background, PSF, PSF photometry and zero point.

Every image the pipeline subtracts or coadds needs the same description of itself (as
LSST's ``CharacterizeImageTask`` + ``CalibrateTask``): where its sources are, its sky and
sky noise, its PSF, the PSF-fit fluxes of its sources and the zero point that turns them
into magnitudes.  :func:`characterize_image` chains the stages of :mod:`pipeline.measure.extract`,
:mod:`pipeline.measure.psf`, :mod:`pipeline.measure.photometry` and :mod:`pipeline.measure.calibration` over in-memory
arrays; it reads and writes nothing.

The zero point comes from Gaia when a catalogue is given (a header ``MAGZP`` then fixes it,
as :func:`pipeline.measure.calibration.calibrate_zeropoint` documents), from the header's ``MAGZP``
alone otherwise, and is absent (``photcal`` None) when there is neither.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
from astropy.table import Table

from pipeline.core.config import CharacterizeConfig, FilterConfig
from pipeline.measure.extract import ExtractionError, ExtractionResult, extract_sources
from pipeline.measure.calibration import PhotCalError, PhotCalResult, calibrate_zeropoint
from pipeline.measure.photometry import PhotometryError, psf_photometry
from pipeline.measure.psf import PSFError, PSFModel, build_psf

__all__ = ["CharacterizeConfig", "Characterization", "CharacterizeError", "add_calibrated_magnitudes",
           "catalog_photometry", "characterize_image", "point_source_limit", "with_full_catalog"]


class CharacterizeError(ValueError):
    """The image cannot be characterised (no sources, no PSF, bad inputs); says why."""


@dataclass(frozen=True)
class Characterization:
    """What :func:`characterize_image` learnt about one image.

    Attributes
    ----------
    extraction : ExtractionResult
        Sources (``catalog``), background and RMS maps, seeing.
    psf : PSFModel
    photometry : Table
        PSF-fit photometry of the extracted sources (:func:`pipeline.measure.photometry.psf_photometry`
        columns, x and y 1-based) with ``ra``, ``dec`` (deg) and, with a zero point,
        calibrated ``mag_cal`` (mag, colour term not applied: BP-RP = 0).
    photcal : PhotCalResult or None
        Zero point; None without Gaia catalogue and header MAGZP.
    limiting_mag : float
        ``limit_nsigma`` point-source limit at the image centre from the sky noise and the
        PSF (NaN without a zero point).
    timings : dict
        Seconds per stage.
    """

    extraction: ExtractionResult
    psf: PSFModel
    photometry: Table
    photcal: PhotCalResult | None
    limiting_mag: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def zeropoint(self) -> float:
        """The zero point (mag for 1 ADU), NaN without one."""
        return float("nan") if self.photcal is None else float(self.photcal.magzpsci)


def point_source_limit(psf: PSFModel, sky_rms: float, zeropoint: float, nsigma: float = 5.0) -> float:
    """Magnitude of a point source detected at ``nsigma`` by a PSF fit on sky noise alone.

    The PSF-fit flux error on a flat sky of rms ``sigma`` is ``sigma / sqrt(sum P^2)``.
    """
    stamp = psf.stamp(psf.x_origin, psf.y_origin)
    flux_err = sky_rms / math.sqrt(float(np.sum(stamp.astype(np.float64) ** 2)))
    return zeropoint - 2.5 * math.log10(nsigma * flux_err)


def _header_photcal(header) -> PhotCalResult | None:
    if header is None or "MAGZP" not in header:
        return None
    zp = float(header["MAGZP"])
    if not math.isfinite(zp):
        raise CharacterizeError(f"header MAGZP is not finite ({header['MAGZP']!r})")
    return PhotCalResult(magzpsci=zp, magzpsciunc=float(header.get("MAGZPUNC", math.nan)),
                         magzpscirms=float(header.get("MAGZPRMS", math.nan)),
                         clrcoeff=float(header.get("CLRCOEFF", math.nan)),
                         clrcounc=float(header.get("CLRCOUNC", math.nan)),
                         n_matched=0, n_used=0, zp_source="header", colour_fitted=False)


def catalog_photometry(data: np.ndarray, mask: np.ndarray | None, wcs, gain: float, saturate: float,
                       extraction: ExtractionResult, psf: PSFModel,
                       config: CharacterizeConfig = CharacterizeConfig()) -> Table:
    """PSF-fit photometry of every source of ``extraction`` with ``psf``, placed on the sky.

    Returns
    -------
    Table
        :func:`pipeline.measure.photometry.psf_photometry`'s columns (x and y 1-based)
        with ``ra`` and ``dec`` (deg) in front.

    Raises
    ------
    CharacterizeError
        The photometry failed (the message says why).
    """
    catalog = extraction.catalog
    try:
        photometry = psf_photometry(data, psf, catalog["XWIN_IMAGE"], catalog["YWIN_IMAGE"],
                                    variance=extraction.rms_map ** 2,
                                    background=extraction.background_map, gain=gain, mask=mask,
                                    saturate=saturate, config=config.photometry)
    except PhotometryError as exc:
        raise CharacterizeError(f"photometry: {exc}") from None
    ra, dec = wcs.all_pix2world(np.asarray(photometry["x"]), np.asarray(photometry["y"]), 1)
    photometry.add_column(ra, name="ra", index=0)
    photometry.add_column(dec, name="dec", index=1)
    photometry["ra"].unit = photometry["dec"].unit = "deg"
    return photometry


def add_calibrated_magnitudes(photometry: Table, photcal: PhotCalResult) -> None:
    """Add ``mag_cal`` (mag; NaN for a flux <= 0) to ``photometry`` from its ``flux`` and
    the zero point (colour term not applied: BP-RP = 0)."""
    zp = photcal.magzpsci
    flux = np.asarray(photometry["flux"], dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        photometry["mag_cal"] = np.where(flux > 0, zp - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)
    photometry["mag_cal"].unit = "mag"


def with_full_catalog(characterization: Characterization, data: np.ndarray, mask: np.ndarray | None, wcs,
                      gain: float, saturate: float, extraction: ExtractionResult,
                      config: CharacterizeConfig = CharacterizeConfig()) -> Characterization:
    """``characterization`` (made from a subset of the image's sources) with the sources of
    ``extraction`` (all of them) and their PSF photometry in its catalogue.

    The PSF, the zero point and the limiting magnitude are kept: they came from the
    brightest sources, which both catalogues hold.
    """
    t0 = time.perf_counter()
    photometry = catalog_photometry(data, mask, wcs, gain, saturate, extraction, characterization.psf, config)
    if characterization.photcal is not None:
        add_calibrated_magnitudes(photometry, characterization.photcal)
    timings = dict(characterization.timings, full_catalog_photometry=time.perf_counter() - t0)
    return replace(characterization, extraction=extraction, photometry=photometry, timings=timings)


def characterize_image(data: np.ndarray, mask: np.ndarray | None, wcs, gain: float, saturate: float,
                       band: FilterConfig, gaia: Table | None = None, header=None,
                       config: CharacterizeConfig = CharacterizeConfig(),
                       extraction: ExtractionResult | None = None,
                       read_noise: float | None = None) -> Characterization:
    """Extract, model the PSF, measure PSF fluxes and calibrate one image.

    Parameters
    ----------
    data : ndarray
        Image, ADU, sky not subtracted.
    mask : ndarray or None
        Bit mask (:data:`pipeline.core.image.MASK_BITS`), 0 = good.
    wcs : astropy.wcs.WCS
        The image's solved WCS (positions of the photometry, Gaia matching).
    gain, saturate : float
        e-/ADU and saturation level (ADU).
    band : FilterConfig
        The image's filter (colour term of the calibration).
    gaia : Table, optional
        Gaia catalogue at the image's epoch (ra, dec, phot_g/bp/rp_mean_mag).
    header : mapping, optional
        Image header: ``MAGZP`` fixes the zero point.
    config : CharacterizeConfig
    extraction : ExtractionResult, optional
        An extraction of this very image already made (the astrometry stage's): reused.
    read_noise : float, optional
        e-, floor of the background RMS map.

    Returns
    -------
    Characterization

    Raises
    ------
    CharacterizeError
        No usable extraction, too few PSF stars, photometry or calibration failure; the
        message names the stage.
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter
    t0 = clock()
    if extraction is None:
        try:
            extraction = extract_sources(data, mask, gain, saturate, config.extraction, read_noise)
        except ExtractionError as exc:
            raise CharacterizeError(f"extraction: {exc}") from None
        timings["extract"] = clock() - t0
    if extraction.background_map is None or extraction.rms_map is None:
        raise CharacterizeError("extraction: the result carries no background/RMS maps")
    if len(extraction.catalog) == 0:
        raise CharacterizeError("extraction: no source detected")

    t1 = clock()
    try:
        psf = build_psf(data, extraction.catalog, extraction.background_map, extraction.rms_map,
                        gain, mask=mask, config=config.psf)
    except PSFError as exc:
        raise CharacterizeError(f"PSF: {exc}") from None
    timings["psf"] = clock() - t1

    t2 = clock()
    photometry = catalog_photometry(data, mask, wcs, gain, saturate, extraction, psf, config)
    timings["photometry"] = clock() - t2

    t3 = clock()
    if gaia is not None:
        try:
            photcal = calibrate_zeropoint(photometry, wcs, gaia, band, header=header,
                                          config=config.photcal)
        except PhotCalError as exc:
            raise CharacterizeError(f"photometric calibration: {exc}") from None
    else:
        photcal = _header_photcal(header)
    limiting_mag = math.nan
    if photcal is not None:
        add_calibrated_magnitudes(photometry, photcal)
        limiting_mag = point_source_limit(psf, extraction.background_rms, photcal.magzpsci, config.limit_nsigma)
    timings["photcal"] = clock() - t3
    timings["total"] = clock() - t0
    return Characterization(extraction=extraction, psf=psf, photometry=photometry, photcal=photcal,
                            limiting_mag=limiting_mag, timings=timings)
