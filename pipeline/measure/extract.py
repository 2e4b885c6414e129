r"""Source extraction with sep: the SExtractor-like catalogue SCAMP reads.

:func:`extract_sources` measures background, detects sources and computes the
SExtractor quantities the astrometry and photometry stages use (windowed centroids and
their error ellipses, Kron fluxes and, at the configured radii, aperture fluxes, sizes,
shapes, flags).
:func:`to_scamp_ldac` writes the result as a FITS_LDAC catalogue.

Conventions: every ``*_IMAGE`` position in the catalogue is 1-based (FITS, SExtractor,
SCAMP); sep works 0-based, so 1 is added on output.  Fluxes are in ADU of the
background-subtracted image; magnitudes are instrumental, ``-2.5 log10(flux / ADU)``.

Windowed position errors
------------------------
sep computes windowed centroids (``winpos``) but not their errors, so they are computed
here.  The windowed centroid :math:`\hat x` is the fixed point of

.. math:: F_a(\hat x, I) = \sum_i w_i I_i d_{a,i} = 0,\qquad
          d_i = x_i - \hat x,\quad w_i = \exp(-|d_i|^2 / 2\sigma^2).

Linearising in the pixel noise :math:`\delta I_i` (variance :math:`V_i`), the implicit
function theorem gives :math:`\delta\hat x = J^{-1} \sum_i w_i d_i \delta I_i` with
:math:`J_{ab} = T\delta_{ab} - M_{ab}/\sigma^2`, :math:`T = \sum w_i I_i`,
:math:`M_{ab} = \sum w_i I_i d_{a,i} d_{b,i}`; hence

.. math:: \mathrm{Cov}(\hat x) = J^{-1} C J^{-1},\qquad
          C_{ab} = \sum_i w_i^2 V_i d_{a,i} d_{b,i}.

SExtractor (``winpos.c``) uses :math:`J = T/2` (its ``WINPOS_FAC`` of 2), which is the
exact value when the window matches a Gaussian source (then :math:`M = T\sigma^2/2`);
the full Jacobian used here stays right when window and profile differ (Moffat wings,
faint sources whose window comes from a noisy half-light radius).  SExtractor also adds
``1/12`` to :math:`d^2` in :math:`C` for the finite pixel size, which is not part of the
noise propagation and is left out.  On pixel-integrated Moffat stars (beta 3, FWHM
2.2 px) the rms of residual/error per axis was 0.90-1.03 over S/N 10-1000 with this
formula, 0.85-0.96 with the 1/12 term, and 0.89-0.96 with SExtractor's :math:`J = T/2`.
:math:`V_i` is the background variance map plus the source's Poisson term
``max(I, 0) / gain``.  Masked pixels take no part, as in SExtractor.

FWHM
----
``FWHM_IMAGE`` is the FWHM of a circular Gaussian fitted to the core of the source: a
weighted linear fit of :math:`\ln I = c_0 + c_1 r^2` over the positive pixels within the
half-light radius of the windowed centre, with weights :math:`I^2` (the inverse
variance of :math:`\ln I` for background-limited noise), FWHM = 2.3548
:math:`\sqrt{-1/2c_1}`.  Within the core a Moffat profile is close to a Gaussian, so
this is nearly profile-independent (on noiseless pixel-integrated Moffat stars with
beta 2.5-4.5 and FWHM 2.2 px it gives 2.3-2.4 px, the profile broadened by the
pixels), while ``2 * FLUX_RADIUS`` and window-corrected second moments overestimate the
FWHM by 15-35 % depending on beta.  It is a linear fit per source, vectorised over the
stamps; where it fails (fewer than 3 pixels, no curvature) ``2 * FLUX_RADIUS`` is given.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import sep
from astropy import units as u
from astropy.io import fits
from astropy.stats import sigma_clipped_stats
from astropy.table import Table
from scipy.spatial import cKDTree

from pipeline.core.timing import StageClock
from pipeline.core.config import ExtractionConfig
from pipeline.core.exits import UnusableImageError
from pipeline.core.image import MASK_BITS
from pipeline.measure._kernels import window_sums
from pipeline.measure.cleaning import clean_detections
from pipeline.formats.ldac import write_ldac

__all__ = ["FLAG_BITS", "ExtractionConfig", "ExtractionResult", "ExtractionError", "Detections",
           "extract_sources", "detect_sources", "detect_again", "measure_detections", "half_light_radii", "to_scamp_ldac",
           "catalog_columns"]

#: Bits of the catalogue's ``FLAGS`` column; 1, 2, 4, 8 and 16 mean what they mean in
#: SExtractor, so SCAMP's default ``FLAGS_MASK`` (0x00f0) keeps its usual effect.
FLAG_BITS = {
    "NEAR_MASKED": 1,      # a masked pixel lies within ``mask_flag_radius`` of the centre
    "BLENDED": 2,          # deblended from a larger detection (sep OBJ_MERGED)
    "SATURATED": 4,        # a pixel of the object >= saturation, or carries SATURATED/BLEED
    "TRUNCATED": 8,        # the object touches the image boundary (sep OBJ_TRUNC)
    "APER_INCOMPLETE": 16,  # the AUTO aperture has masked or off-image pixels
    "WINDOW_FALLBACK": 32,  # windowed errors unusable: isophotal errors reported instead
    "NEAR_EDGE": 64,       # centre within ``edge_margin`` pixels of the image border
    "NOT_POINTLIKE": 128,  # measurably sharper (cosmic ray) or broader/elongated (blend, galaxy) than the PSF
    "ASTROMETRIC_OUTLIER": 256,  # set by the astrometry stage: off Gaia by far more than its errors
}

_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
_MAG_NONE = 99.0


class ExtractionError(UnusableImageError, ValueError):
    """Input that extraction cannot work on (wrong shapes, bad gain, sep failures): the image
    is unusable for this method (exit 4), the message says why."""


@dataclass(frozen=True)
class ExtractionResult:
    """What :func:`extract_sources` measured.

    Attributes
    ----------
    catalog : Table
        One row per source, SExtractor column names (see :func:`catalog_columns`).
    background_level, background_rms : float
        Median of the background map and of its RMS map, ADU.
    seeing_fwhm_px : float
        Median ``FWHM_IMAGE`` of bright, unflagged, round sources; NaN if fewer than 5.
    image_shape : tuple of int
        (ny, nx) of the image.
    n_detected : int
        Detections before duplicate removal.
    n_dropped_drift, n_dropped_close : int
        Detections dropped because their window drifted more than ``max_window_drift``,
        or because a brighter source lies within ``min_separation``.
    timings : dict
        Seconds per stage.
    background_map, rms_map : ndarray
        The sep background and its RMS (ADU, float32, read-noise floor applied), for the
        stages after extraction (PSF, photometry) that need them again.
    """

    catalog: Table
    background_level: float
    background_rms: float
    seeing_fwhm_px: float
    image_shape: tuple[int, int]
    n_detected: int
    n_dropped_drift: int
    n_dropped_close: int
    timings: dict[str, float] = field(default_factory=dict)
    background_map: np.ndarray | None = field(default=None, repr=False)
    rms_map: np.ndarray | None = field(default=None, repr=False)


def catalog_columns(n_aper: int) -> dict[str, tuple[np.dtype, tuple, object]]:
    """Column name -> (dtype, per-row shape, unit) of the extraction catalogue; ``FLUX_APER``
    and ``FLUXERR_APER`` (one value per radius) only with ``n_aper`` > 0 radii."""
    f4, f8, pix, adu = np.dtype("f4"), np.dtype("f8"), u.pix, u.adu
    columns = {
        "NUMBER": (np.dtype("i4"), (), None),
        "X_IMAGE": (f8, (), pix), "Y_IMAGE": (f8, (), pix),
        "XWIN_IMAGE": (f8, (), pix), "YWIN_IMAGE": (f8, (), pix),
        "ERRAWIN_IMAGE": (f4, (), pix), "ERRBWIN_IMAGE": (f4, (), pix),
        "ERRTHETAWIN_IMAGE": (f4, (), u.deg),
        "FLUX_AUTO": (f8, (), adu), "FLUXERR_AUTO": (f8, (), adu),
        "MAG_AUTO": (f4, (), u.mag), "MAGERR_AUTO": (f4, (), u.mag),
        "FLUX_APER": (f4, (n_aper,), adu), "FLUXERR_APER": (f4, (n_aper,), adu),
        "KRON_RADIUS": (f4, (), None),
        "FLUX_RADIUS": (f4, (), pix), "FWHM_IMAGE": (f4, (), pix),
        "A_IMAGE": (f4, (), pix), "B_IMAGE": (f4, (), pix), "THETA_IMAGE": (f4, (), u.deg),
        "ELONGATION": (f4, (), None),
        "SNR_WIN": (f4, (), None),
        "BACKGROUND": (f4, (), adu),
        "FLAGS": (np.dtype("i2"), (), None),
    }
    if n_aper == 0:
        del columns["FLUX_APER"], columns["FLUXERR_APER"]
    return columns


@dataclass
class Detections:
    """What :func:`detect_sources` found: every detection of one image, not yet measured.

    Holds the background-subtracted image and the maps the measurement needs, so that
    :func:`measure_detections` can measure any subset now and the rest later (the quadrant
    runner measures the brightest before the alerts and every detection after them) with
    the same results as one :func:`extract_sources` call.

    Attributes
    ----------
    objects : structured ndarray
        sep's detections after CLEAN (``x``, ``y`` 0-based, ``a``, ``b``, ``theta``,
        isophotal ``flux``, ...).
    segmap : ndarray of int32
        Segmentation map: detection ``k`` (0-based) owns the pixels labelled ``k + 1``.
    subtracted : ndarray of float32
        The image less its background, masked pixels 0.
    bad, saturated : ndarray of bool
        Pixels left out of every measurement, and saturated pixels.
    background_map, rms_map : ndarray of float32
        sep's background and its RMS (read-noise floor applied).
    background_level, background_rms : float
        Their medians.
    gain : float
    config : ExtractionConfig
    timings : dict
        Seconds per stage of the detection.
    """

    objects: np.ndarray = field(repr=False)
    segmap: np.ndarray = field(repr=False)
    subtracted: np.ndarray = field(repr=False)
    bad: np.ndarray = field(repr=False)
    saturated: np.ndarray = field(repr=False)
    background_map: np.ndarray = field(repr=False)
    rms_map: np.ndarray = field(repr=False)
    background_level: float
    background_rms: float
    gain: float
    config: ExtractionConfig
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.objects)


def extract_sources(data: np.ndarray, mask: np.ndarray | None, gain: float, saturate: float,
                    config: ExtractionConfig = ExtractionConfig(),
                    read_noise: float | None = None) -> ExtractionResult:
    """Detect and measure the sources of one image.

    Parameters
    ----------
    data : ndarray
        2-D image in ADU, sky not subtracted; NaN pixels are allowed (they are masked).
    mask : ndarray or None
        Integer bit mask of the same shape, 0 = good, bits of :data:`pipeline.core.image.MASK_BITS`.
    gain : float
        e-/ADU, for the Poisson part of the flux and position errors.
    saturate : float
        Saturation level, ADU.
    config : ExtractionConfig
    read_noise : float, optional
        e-; sets a floor ``read_noise / gain`` on the background RMS map.

    Returns
    -------
    ExtractionResult

    Raises
    ------
    ExtractionError
        Bad shapes or parameters, an image without a finite pixel, or a sep failure.
    """
    return measure_detections(detect_sources(data, mask, gain, saturate, config, read_noise))


def detect_sources(data: np.ndarray, mask: np.ndarray | None, gain: float, saturate: float,
                   config: ExtractionConfig = ExtractionConfig(),
                   read_noise: float | None = None) -> Detections:
    """The background and every detection of one image (the first half of :func:`extract_sources`).

    Parameters and errors as :func:`extract_sources`.
    """
    timings: dict[str, float] = {}
    lap = StageClock(timings).lap

    image, bad, saturated = _prepare(data, mask, gain, saturate)
    lap("prepare")

    try:
        background = sep.Background(image, mask=bad | saturated, bw=config.background_mesh,
                                    bh=config.background_mesh, fw=config.background_filter,
                                    fh=config.background_filter)
        rms = background.rms()
        sky = background.back()
    except Exception as exc:  # sep raises bare Exception subclasses
        raise ExtractionError(f"background estimation failed: {exc}") from None
    if read_noise is not None:
        np.maximum(rms, np.float32(read_noise / gain), out=rms)
    subtracted = np.subtract(image, sky, out=image)  # ``image`` is this function's own copy
    subtracted[bad] = 0.0
    lap("background")
    objects, segmap = _detect_and_clean(subtracted, rms, bad, gain, config, lap)
    return Detections(objects, segmap, subtracted, bad, saturated, sky, rms, _coarse_median(sky),
                      _coarse_median(rms), float(gain), config, timings)


def detect_again(detections: Detections, config: ExtractionConfig) -> Detections:
    """The detections of an image detected once already, at ``config``'s threshold and
    deblending: same background, same maps, new catalogue and segmentation map.

    The astrometry stage detects at a high threshold, which finds the bright stars it
    calibrates on in a fraction of the time on a crowded quadrant; every detection at the
    survey's threshold is found by this, after the alerts.  ``config`` must share the
    background settings of ``detections.config`` (they are not redone).

    Raises
    ------
    ExtractionError
        A sep failure.
    """
    timings: dict[str, float] = {}
    lap = StageClock(timings).lap
    objects, segmap = _detect_and_clean(detections.subtracted, detections.rms_map, detections.bad,
                                        detections.gain, config, lap)
    return replace(detections, objects=objects, segmap=segmap, config=config, timings=timings)


def _detect_and_clean(subtracted, rms, bad, gain, config, lap):
    """sep's detections of the background-subtracted image, after CLEAN, and their segment map."""
    sep.set_extract_pixstack(config.pixstack)
    sep.set_sub_object_limit(config.sub_object_limit)
    # "conv" thresholds the filtered image against the unfiltered RMS, as SExtractor does;
    # sep's "matched" default, at the same threshold, found 2.7 times as many (mostly noise)
    # detections on a quadrant and took ten times as long.
    # sep's own CLEAN compares every pair of detections (half of sep.extract's time on a
    # Galactic-plane quadrant); the same test over neighbour pairs is pipeline.measure.cleaning.
    try:
        objects, segmap = sep.extract(
            subtracted, config.detect_thresh, err=rms, gain=gain, mask=bad,
            minarea=config.minarea, deblend_nthresh=config.deblend_nthresh,
            deblend_cont=config.deblend_cont, clean=False, filter_type="conv",
            segmentation_map=True)
    except Exception as exc:
        hint = (f" (sep's pixel buffer, extraction.pixstack = {config.pixstack}, is too small for an image "
                "this saturated or crowded)") if "pixel buffer" in str(exc) else ""
        raise ExtractionError(f"sep.extract failed: {exc}{hint}") from None
    lap("detect")
    if config.clean:
        objects, segmap = clean_detections(objects, segmap, subtracted, rms, config.detect_thresh,
                                           config.minarea)
    lap("clean")
    return objects, segmap


def measure_detections(detections: Detections, rows: np.ndarray | None = None) -> ExtractionResult:
    """Measure detections (the second half of :func:`extract_sources`): all, or some of them.

    Every quantity of a source is measured from its own pixels and segment, so a source
    measured among a subset gets exactly the values it gets among all detections; only
    what compares sources with each other (the duplicates dropped, the seeing and the
    ``NOT_POINTLIKE`` flags judged from it) is taken over the sources measured.

    Parameters
    ----------
    detections : Detections
    rows : ndarray of int, optional
        0-based indices into ``detections.objects``, in increasing order; None for all.

    Returns
    -------
    ExtractionResult
        ``n_detected`` counts every detection, measured or not; the timings are the
        detection's and this measurement's.
    """
    timings = dict(detections.timings)
    lap = StageClock(timings).lap

    config, gain = detections.config, detections.gain
    subtracted, bad, saturated = detections.subtracted, detections.bad, detections.saturated
    rms, sky, segmap = detections.rms_map, detections.background_map, detections.segmap
    n_detected = len(detections.objects)
    # seg_id: the segment of each measured detection, its index among all plus one
    seg_id = np.arange(1, n_detected + 1, dtype=np.int32)
    objects = detections.objects
    if rows is not None:
        rows = np.asarray(rows, dtype=np.intp)
        objects, seg_id = objects[rows], seg_id[rows]
    if len(objects) == 0:
        catalog = _empty_catalog(len(config.aperture_radii))
        return ExtractionResult(catalog, detections.background_level, detections.background_rms, math.nan,
                                subtracted.shape, n_detected, 0, 0, timings, background_map=sky, rms_map=rms)

    x, y = objects["x"], objects["y"]
    a, b = objects["a"], objects["b"]
    theta = np.clip(objects["theta"], -np.pi / 2, np.pi / 2)
    auto = _auto_photometry(subtracted, rms, bad, segmap, seg_id, x, y, a, b, theta, gain, config)
    lap("auto")

    half_light = half_light_radii(subtracted, x, y, a, bad, seg_id, segmap,
                                  normflux=np.where(auto["flux"] > 0, auto["flux"], 1.0))
    half_light = np.where(np.isfinite(half_light) & (auto["flux"] > 0), half_light, a)
    half_light = np.clip(half_light, 0.5, 6.0 * np.maximum(a, 0.5))
    # SExtractor's window (2 r_half / 2.35) aliases on undersampled images: at FWHM 1.7 px the
    # windowed centroid swings by +-0.03 px with the pixel phase (ten times the noise of a
    # bright star).  A floor of min_window_sigma px brings that to ~0.002 px for
    # pixel-integrated PSFs at a modest cost in noise; the errors below use the same window.
    window_sigma = np.maximum(2.0 * half_light / 2.35, config.min_window_sigma)
    # subpix=0: sep weighs the pixels cut by the window's 4-sigma edge by their exact overlap
    # with the circle, which SExtractor's 11 x 11 sub-sampling (subpix=11) approximates; on a
    # 33,000-source quadrant the sub-sampling was 60 % of winpos's time, and the positions
    # moved by 3e-6 px (median) and 1e-4 px (99th percentile) when it was dropped.
    xwin, ywin, _ = sep.winpos(subtracted, x, y, window_sigma, mask=bad, subpix=0)
    lap("winpos")

    keep, n_drift, n_close = _unique_sources(x, y, xwin, ywin, auto["flux"], subtracted.shape, config)
    sel = np.flatnonzero(keep)
    lap("duplicates")

    moments = _window_moments(subtracted, rms, bad, gain, xwin[sel], ywin[sel],
                              window_sigma[sel], half_light[sel], config.max_window_halfsize)
    lap("window_errors")

    radii = np.asarray(config.aperture_radii, dtype=np.float64)
    aper_flux = aper_err = None
    if len(radii):
        # sep 1.4 does not broadcast 2-D (objects x radii), so the grid is passed flattened.
        # subpix=0: each pixel the circle cuts counts by its exact overlap.  SExtractor's 5 x 5
        # sub-sampling, used before, took a quarter longer on a Galactic-plane quadrant and was
        # off the exact sum by up to 4 sigma (99th percentile) in the 2 px aperture of bright stars.
        grid = (len(sel), len(radii))
        aper_flux, aper_err, _ = sep.sum_circle(
            subtracted, np.repeat(xwin[sel], len(radii)), np.repeat(ywin[sel], len(radii)),
            np.tile(radii, len(sel)), err=rms, gain=gain, mask=bad, subpix=0)
        aper_flux, aper_err = aper_flux.reshape(grid), aper_err.reshape(grid)
    lap("apertures")

    flags = _flags(subtracted, objects[sel], auto["flag"][sel], moments["fallback"], xwin[sel],
                   ywin[sel], seg_id[sel], segmap, bad, saturated, config)
    fwhm = np.where(np.isfinite(moments["fwhm"]), moments["fwhm"], 2.0 * half_light[sel])
    iso_err = _error_ellipse(objects["errx2"][sel], objects["erry2"][sel], objects["errxy"][sel])
    win_err = tuple(np.where(moments["fallback"], iso, win)
                    for iso, win in zip(iso_err, moments["error_ellipse"]))
    flux, fluxerr = auto["flux"][sel], auto["fluxerr"][sel]
    positive = flux > 0
    columns = {
        "NUMBER": np.arange(1, len(sel) + 1),
        "X_IMAGE": x[sel] + 1.0, "Y_IMAGE": y[sel] + 1.0,
        "XWIN_IMAGE": xwin[sel] + 1.0, "YWIN_IMAGE": ywin[sel] + 1.0,
        "ERRAWIN_IMAGE": win_err[0], "ERRBWIN_IMAGE": win_err[1],
        "ERRTHETAWIN_IMAGE": win_err[2],
        "FLUX_AUTO": flux, "FLUXERR_AUTO": fluxerr,
        "MAG_AUTO": np.where(positive, -2.5 * np.log10(np.where(positive, flux, 1.0)), _MAG_NONE),
        "MAGERR_AUTO": np.where(positive, 1.0857362 * fluxerr / np.where(positive, flux, 1.0),
                                _MAG_NONE),
        "FLUX_APER": aper_flux, "FLUXERR_APER": aper_err,
        "KRON_RADIUS": auto["kron_radius"][sel],
        "FLUX_RADIUS": half_light[sel], "FWHM_IMAGE": fwhm,
        "A_IMAGE": a[sel], "B_IMAGE": b[sel], "THETA_IMAGE": np.degrees(theta[sel]),
        "ELONGATION": a[sel] / np.maximum(b[sel], 1e-6),
        "SNR_WIN": moments["snr"],
        "BACKGROUND": sky[np.clip(np.rint(ywin[sel]).astype(int), 0, subtracted.shape[0] - 1),
                          np.clip(np.rint(xwin[sel]).astype(int), 0, subtracted.shape[1] - 1)],
        "FLAGS": flags,
    }
    catalog = _build_table(columns, len(radii))
    seeing = _seeing(catalog, config)
    _flag_not_pointlike(catalog, seeing, config)
    lap("catalog")
    return ExtractionResult(catalog, detections.background_level, detections.background_rms, seeing,
                            subtracted.shape, n_detected, n_drift, n_close, timings,
                            background_map=sky, rms_map=rms)


def _prepare(data, mask, gain, saturate):
    """Native float32 copy with NaN filled, the pixels to ignore, and the saturated ones."""
    data = np.asarray(data)
    if data.ndim != 2 or data.size == 0:
        raise ExtractionError(f"image must be a non-empty 2-D array, got shape {data.shape}")
    if mask is not None and np.shape(mask) != data.shape:
        raise ExtractionError(f"mask shape {np.shape(mask)} differs from image shape {data.shape}")
    if not (gain > 0 and math.isfinite(gain)) or not (saturate > 0 and math.isfinite(saturate)):
        raise ExtractionError(f"gain and saturate must be positive and finite "
                              f"(got gain={gain}, saturate={saturate})")
    image = np.array(data, dtype=np.float32, order="C")  # a native-byte-order copy for sep
    finite = np.isfinite(image)
    if not finite.any():
        raise ExtractionError("image holds no finite pixel")
    bad = ~finite
    # Saturated pixels stay in the detection image (masking a saturated core would break the
    # star into a ring of fragments); they are only kept out of the background and flagged.
    with np.errstate(invalid="ignore"):
        saturated = image >= saturate
    if mask is not None:
        mask = np.asarray(mask)
        if not np.issubdtype(mask.dtype, np.integer):
            raise ExtractionError(f"mask must hold integers, got {mask.dtype}")
        bad |= (mask & (MASK_BITS["BAD"] | MASK_BITS["EDGE"] | MASK_BITS["NAN"])) != 0
        saturated |= (mask & (MASK_BITS["SATURATED"] | MASK_BITS["BLEED"])) != 0
    if not finite.all():
        image[~finite] = np.median(image[finite])
    return image, bad, saturated


def _coarse_median(values: np.ndarray) -> float:
    """Median of a smooth map from every 8th pixel: the maps vary on the mesh scale."""
    return float(np.median(values[::8, ::8]))


def _auto_photometry(subtracted, rms, bad, segmap, seg_id, x, y, a, b, theta, gain, config):
    """FLUX_AUTO as SExtractor (``photom.c``).

    The Kron radius is measured within 6 A; the ellipse is scaled by
    ``max(kron_factor * r_Kron, kron_min_scale)``, and a circle of ``auto_min_radius``
    replaces ellipses smaller than it.  Pixels of other objects are left out.
    """
    kron_radius, kron_flag = sep.kron_radius(subtracted, x, y, a, b, theta, 6.0, mask=bad,
                                             seg_id=seg_id, segmap=segmap)
    kron_radius = np.where(np.isfinite(kron_radius), kron_radius, 0.0)
    scale = np.maximum(config.kron_factor * kron_radius, config.kron_min_scale)
    circle = scale * np.sqrt(a * b) < config.auto_min_radius
    flux, fluxerr = np.zeros(len(x)), np.zeros(len(x))
    flag = np.zeros(len(x), dtype=np.int16)
    common = dict(err=rms, gain=gain, mask=bad, segmap=segmap, subpix=1)
    ellipse = ~circle
    if ellipse.any():
        flux[ellipse], fluxerr[ellipse], flag[ellipse] = sep.sum_ellipse(
            subtracted, x[ellipse], y[ellipse], a[ellipse], b[ellipse], theta[ellipse],
            scale[ellipse], seg_id=seg_id[ellipse], **common)
    if circle.any():
        flux[circle], fluxerr[circle], flag[circle] = sep.sum_circle(
            subtracted, x[circle], y[circle], config.auto_min_radius, seg_id=seg_id[circle],
            **common)
    return {"flux": flux, "fluxerr": fluxerr, "flag": flag | kron_flag,
            "kron_radius": scale}


def half_light_radii(subtracted: np.ndarray, x: np.ndarray, y: np.ndarray, a: np.ndarray,
                     bad: np.ndarray, seg_id: np.ndarray, segmap: np.ndarray,
                     normflux: np.ndarray | None = None) -> np.ndarray:
    """Half-light radii (``FLUX_RADIUS``, px) by sep, out to 4 semi-major axes, 6 where needed.

    sep integrates 64 annuli out to ``rmax`` with every pixel sub-sampled 5 x 5, so its cost
    grows as ``rmax**2``.  Out to ``4 a`` instead of SExtractor's customary ``6 a`` it took half
    the time on a Galactic-plane quadrant, and against ``6 a`` sub-sampled 15 x 15 the radii
    were as close (median 0.004 px, 99th percentile 0.019 px) as those out to ``6 a``; the few
    objects whose radius comes out beyond ``3 a`` (16 of 33,500 there: galaxies, blends) are
    measured again out to ``6 a``, so that none is cut short.  NaN where sep finds none.
    """
    radii, _ = sep.flux_radius(subtracted, x, y, 4.0 * a, 0.5, normflux=normflux, mask=bad,
                               seg_id=seg_id, segmap=segmap, subpix=5)
    wide = np.flatnonzero(~(radii <= 3.0 * a))
    if len(wide):
        radii[wide], _ = sep.flux_radius(subtracted, x[wide], y[wide], 6.0 * a[wide], 0.5,
                                         normflux=None if normflux is None else normflux[wide],
                                         mask=bad, seg_id=seg_id[wide], segmap=segmap, subpix=5)
    return radii


def _unique_sources(x, y, xwin, ywin, flux, shape, config):
    """Mask of detections to keep: windows that stayed put, and no pair closer than allowed."""
    drift = np.hypot(xwin - x, ywin - y)
    inside = (xwin > -0.5) & (xwin < shape[1] - 0.5) & (ywin > -0.5) & (ywin < shape[0] - 0.5)
    keep = np.isfinite(drift) & (drift <= config.max_window_drift) & inside
    n_drift = int(len(x) - keep.sum())
    candidates = np.flatnonzero(keep)
    pairs = cKDTree(np.column_stack([xwin[candidates], ywin[candidates]])).query_pairs(
        config.min_separation, output_type="ndarray")
    if len(pairs):
        i, j = candidates[pairs[:, 0]], candidates[pairs[:, 1]]
        keep[np.where(flux[i] >= flux[j], j, i)] = False
    return keep, n_drift, int(len(candidates) - keep.sum())


def _window_moments(subtracted, rms, bad, gain, xwin, ywin, sigma, half_light, max_half):
    """Windowed sums and core fits (the module docstring's formulas), per source.

    sep offers neither windowed moments nor FWHM, so the sums are taken here, by the
    compiled loop :func:`pipeline.measure._kernels.window_sums` over each source's stamp.
    (Vectorised over stamps gathered with fancy indexing they took 0.23 s on a
    Galactic-plane quadrant, 33,000 sources, and blocks to bound the temporaries; the loop
    takes a few hundredths of a second and no memory beyond its output.)
    """
    keys = ("T", "E", "Mxx", "Myy", "Mxy", "Cxx", "Cyy", "Cxy", "n", "S0", "S1", "S2", "Sy", "Sxy")
    sums = dict(zip(keys, window_sums(
        np.ascontiguousarray(subtracted, dtype=np.float32), np.ascontiguousarray(rms, dtype=np.float32),
        np.ascontiguousarray(bad, dtype=np.bool_).view(np.uint8), float(gain),
        *(np.ascontiguousarray(a, dtype=np.float64) for a in (xwin, ywin, sigma, half_light)),
        int(max_half))))
    s2 = sigma ** 2
    T = sums["T"]
    jxx, jyy, jxy = T - sums["Mxx"] / s2, T - sums["Myy"] / s2, -sums["Mxy"] / s2
    det = jxx * jyy - jxy * jxy
    with np.errstate(divide="ignore", invalid="ignore"):
        # inverse of the symmetric 2x2 Jacobian, then J^-1 C J^-1
        ixx, iyy, ixy = jyy / det, jxx / det, -jxy / det
        cxx, cyy, cxy = sums["Cxx"], sums["Cyy"], sums["Cxy"]
        vxx = ixx * (ixx * cxx + ixy * cxy) + ixy * (ixx * cxy + ixy * cyy)
        vyy = ixy * (ixy * cxx + iyy * cxy) + iyy * (ixy * cxy + iyy * cyy)
        vxy = ixx * (ixy * cxx + iyy * cxy) + ixy * (ixy * cxy + iyy * cyy)
        snr = T / np.sqrt(sums["E"])
        curvature = ((sums["S0"] * sums["Sxy"] - sums["S1"] * sums["Sy"])
                     / (sums["S0"] * sums["S2"] - sums["S1"] ** 2))
        fwhm = _FWHM_PER_SIGMA * np.sqrt(-0.5 / curvature)
    fallback = ~((T > 0) & (det > 0) & (jxx > 0) & np.isfinite(vxx) & np.isfinite(vyy)
                 & (vxx > 0) & (vyy > 0) & (vxx * vyy > vxy * vxy))
    fwhm = np.where((sums["n"] >= 3) & (curvature < 0), fwhm, np.nan)
    return {"error_ellipse": _error_ellipse(vxx, vyy, vxy), "fallback": fallback,
            "snr": np.where(np.isfinite(snr), snr, 0.0), "fwhm": fwhm}


def _error_ellipse(vxx, vyy, vxy):
    """(A, B, THETA in degrees) of a 2-D covariance, as SExtractor's ERRA/ERRB/ERRTHETA."""
    half_diff = 0.5 * (vxx - vyy)
    root = np.sqrt(half_diff ** 2 + vxy ** 2)
    mean = 0.5 * (vxx + vyy)
    theta = np.degrees(0.5 * np.arctan2(2.0 * vxy, vxx - vyy))
    with np.errstate(invalid="ignore"):
        return np.sqrt(mean + root), np.sqrt(np.maximum(mean - root, 0.0)), theta


def _flags(subtracted, objects, auto_flag, window_fallback, xwin, ywin, seg_id, segmap, bad,
           saturated, config):
    """FLAGS column (see :data:`FLAG_BITS`)."""
    ny, nx = subtracted.shape
    flags = np.zeros(len(objects), dtype=np.int16)
    flags[(objects["flag"] & sep.OBJ_MERGED) != 0] |= FLAG_BITS["BLENDED"]
    flags[(objects["flag"] & sep.OBJ_TRUNC) != 0] |= FLAG_BITS["TRUNCATED"]
    flags[(auto_flag & (sep.APER_TRUNC | sep.APER_HASMASKED)) != 0] |= FLAG_BITS["APER_INCOMPLETE"]
    flags[window_fallback] |= FLAG_BITS["WINDOW_FALLBACK"]
    margin = config.edge_margin
    near_edge = (xwin < margin) | (ywin < margin) | (xwin > nx - 1 - margin) | (ywin > ny - 1 - margin)
    flags[near_edge] |= FLAG_BITS["NEAR_EDGE"]
    # Saturated objects: look up the segment of every saturated pixel (few) rather than
    # scanning every segment; the centre is checked too for saturated cores outside it.
    sat_ids = np.unique(segmap[saturated])
    is_sat = np.isin(seg_id, sat_ids[sat_ids > 0])
    # sep flags an aperture holding a masked pixel: with the bad and saturated maps as
    # masks, that tells which sources have one near their centre (the sums are unused).
    _, _, near_bad = sep.sum_circle(subtracted, xwin, ywin, config.mask_flag_radius, mask=bad,
                                    subpix=1)
    _, _, near_sat = sep.sum_circle(subtracted, xwin, ywin, 1.5, mask=saturated, subpix=1)
    flags[is_sat | ((near_sat & sep.APER_HASMASKED) != 0)] |= FLAG_BITS["SATURATED"]
    flags[(near_bad & sep.APER_HASMASKED) != 0] |= FLAG_BITS["NEAR_MASKED"]
    return flags


def _build_table(columns: dict[str, np.ndarray], n_aper: int) -> Table:
    spec = catalog_columns(n_aper)
    table = Table()
    for name, (dtype, _, unit) in spec.items():
        table[name] = np.asarray(columns[name]).astype(dtype)
        if unit is not None:
            table[name].unit = unit
    return table


def _empty_catalog(n_aper: int) -> Table:
    spec = catalog_columns(n_aper)
    return _build_table({name: np.zeros((0,) + shape, dtype) for name, (dtype, shape, _)
                         in spec.items()}, n_aper)


def _flag_not_pointlike(catalog: Table, seeing: float, config: ExtractionConfig) -> None:
    """Set NOT_POINTLIKE on sources whose shape the PSF cannot explain.

    Cosmic rays (unmasked, and bright) come out far sharper than the seeing; unresolved
    blends and galaxies broader or elongated.  Matched to a nearby Gaia star, either pulls an
    astrometric fit with a tiny centroid error, so they are kept in the catalogue but flagged.
    Only sources bright enough for their shape to be measured are judged.
    """
    if not math.isfinite(seeing) or len(catalog) == 0:
        return
    fwhm = np.asarray(catalog["FWHM_IMAGE"], dtype=float)
    measurable = np.asarray(catalog["SNR_WIN"], dtype=float) >= config.shape_min_snr
    odd = measurable & ((fwhm < config.sharp_fwhm_ratio * seeing) | (fwhm > config.broad_fwhm_ratio * seeing)
                        | (np.asarray(catalog["ELONGATION"], dtype=float) > config.max_pointlike_elongation))
    catalog["FLAGS"][odd] |= FLAG_BITS["NOT_POINTLIKE"]


def _seeing(catalog: Table, config: ExtractionConfig) -> float:
    """Median FWHM of bright, unflagged, round sources, sigma-clipped against galaxies."""
    good = ((catalog["FLAGS"] == 0) & (catalog["SNR_WIN"] >= config.seeing_min_snr)
            & (catalog["ELONGATION"] <= config.seeing_max_elongation)
            & np.isfinite(catalog["FWHM_IMAGE"]) & (catalog["FWHM_IMAGE"] > 0))
    if good.sum() < 5:
        return math.nan
    _, median, _ = sigma_clipped_stats(np.asarray(catalog["FWHM_IMAGE"][good], dtype=float),
                                       sigma=3.0)
    return float(median)



def to_scamp_ldac(result: ExtractionResult, image_header: fits.Header,
                  path: str | os.PathLike) -> Path:
    """Write the catalogue as the FITS_LDAC SCAMP reads.

    Parameters
    ----------
    result : ExtractionResult
    image_header : Header
        The image's header (WCS, date, etc.), primary or extension.  The embedded header
        is rebuilt to open with ``SIMPLE``, ``BITPIX``, ``NAXIS``, ``NAXIS1``, ``NAXIS2``
        as a primary image header does: SCAMP 2.10 rejects a block without ``SIMPLE``
        ("Corrupted FITS header", seen here).
    path : path-like
        Output file, written atomically.

    Raises
    ------
    ExtractionError
        If the header's NAXIS1/NAXIS2 disagree with the extracted image.
    """
    ny, nx = result.image_shape
    for key, size in (("NAXIS1", nx), ("NAXIS2", ny)):
        if key in image_header and int(image_header[key]) != size:
            raise ExtractionError(f"{path}: header {key} = {image_header[key]} but the extracted "
                                  f"image has {size} pixels on that axis")
    header = image_header.copy()
    header["NAXIS1"], header["NAXIS2"] = nx, ny     # write_ldac puts the structural cards first
    return write_ldac(path, result.catalog, image_header=header)
