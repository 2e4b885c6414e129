"""Configuration: one tree of frozen dataclasses with embedded ZTF-like defaults, loaded from TOML.

Every command takes ``--config FILE``; a TOML file only needs the values it changes:
anything unset falls back to the defaults below.  Unknown sections or keys, mistyped values
and values out of their range are an error naming them, so a typo never silently falls back
to a default.

The sections mirror the dataclasses: ``[instrument]`` (filters are a table of tables,
``[instrument.filters.ZTF_g]`` and so on), ``[site]``, ``[paths]``, ``[simulation]``, then one
per stage: ``[extraction]``, ``[characterize]`` (with ``[characterize.psf]``,
``[characterize.photometry]``, ``[characterize.photcal]``), ``[registration]``,
``[astrometry]``, ``[reference]``, ``[subtraction]`` (with ``[subtraction.zogy]``,
``[subtraction.candidates]``), ``[realbogus]``, ``[matchfile]``, ``[priors]``, and the
delivery: ``[history]`` (where the object history lives), ``[kafka]``, ``[slurm]``.  Each setting has exactly one default, the value
production uses; a stage receives its own section (``cfg.subtraction``, ``cfg.extraction``),
never the whole tree.  Extraction, characterisation and registration are shared: the
astrometry stage, the characterisation of every image, the reference build and the
subtraction measure with the one ``[extraction]``, ``[characterize]`` and
``[registration]`` (see :class:`Config`).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import tomli_w
from pipeline.core.exits import UsageError

__all__ = [
    "FilterConfig", "InstrumentConfig", "SiteConfig", "PathsConfig", "SimulationConfig", "SkyCounts", "SKY_PRESETS",
    "ExtractionConfig", "PSFConfig", "PhotometryConfig", "PhotCalConfig", "CharacterizeConfig",
    "RegistrationConfig", "REGISTRATION_ORDERS", "AstrometryConfig", "StackConfig", "ReferenceConfig",
    "ZogyConfig", "CandidateConfig", "SubtractionConfig", "RealBogusConfig", "ContextConfig", "PriorFitSettings",
    "MatchfileConfig", "SolarSystemConfig", "HistoryConfig", "KafkaConfig", "SlurmConfig", "Config", "ConfigError", "ConfigValueError",
    "load_config", "config_to_toml", "DEFAULT_CONFIG", "check_bootstrap_servers", "check_history_url",
    "redacted_url",
]


class ConfigError(UsageError):
    """A configuration file that cannot be read or holds an unknown or badly typed value."""


@dataclass(frozen=True)
class FilterConfig:
    """Photometric properties of one filter.

    ``zeropoint`` is the AB magnitude giving 1 e-/s above the atmosphere;
    the stellar magnitude in this band is ``G + color_offset + color_slope * (BP - RP)``.
    """

    filterid: int
    zeropoint: float
    extinction: float          # mag per airmass
    sky_mag: float             # dark-sky brightness, mag/arcsec^2
    color_offset: float
    color_slope: float
    wavelength_um: float       # effective wavelength, for refraction


def _default_filters() -> Mapping[str, FilterConfig]:
    return MappingProxyType({
        "ZTF_g": FilterConfig(1, 26.30, 0.20, 21.8, 0.35, 0.55, 0.48),
        "ZTF_r": FilterConfig(2, 26.15, 0.12, 21.0, -0.10, -0.05, 0.64),
        "ZTF_i": FilterConfig(3, 25.70, 0.06, 20.2, -0.45, -0.35, 0.79),
    })


@dataclass(frozen=True)
class InstrumentConfig:
    """The camera: a mosaic of CCDs, each read out as four quadrants.

    The focal-plane layout: CCD ``ccdid`` (1-16) sits in row ``(ccdid-1) // 4`` (0 = south)
    and column ``(ccdid-1) % 4`` (0 = east, i.e. left on the sky with north up).  Quadrant
    ``qid`` numbers the CCD's quarters like mathematical quadrants: 1 upper right,
    2 upper left, 3 lower left, 4 lower right.  Every quadrant image is stored with north
    up and east left; ``rcid = 4 * (ccdid - 1) + qid - 1`` (0-63).
    """

    name: str = "ZTF"
    n_ccd_x: int = 4
    n_ccd_y: int = 4
    quadrant_nx: int = 3072
    quadrant_ny: int = 3080
    pixel_scale_arcsec: float = 1.012
    ccd_gap_x_px: float = 700.0
    ccd_gap_y_px: float = 400.0
    gain: float = 6.2                  # e-/ADU
    read_noise: float = 8.0            # e-
    saturate_adu: float = 50000.0
    bias_adu: float = 0.0              # quadrant images arrive bias-subtracted, sky not subtracted
    exptime: float = 30.0
    filters: Mapping[str, FilterConfig] = field(default_factory=_default_filters)

    @property
    def n_quadrants(self) -> int:
        return 4 * self.n_ccd_x * self.n_ccd_y


@dataclass(frozen=True)
class SiteConfig:
    """The observatory: fixed geodetic coordinates (never looked up over the network)."""

    name: str = "Palomar"
    longitude_deg: float = -116.8597
    latitude_deg: float = 33.3563
    height_m: float = 1712.0
    pressure_hpa: float = 830.0
    temperature_c: float = 10.0
    relative_humidity: float = 0.3

    def __post_init__(self):
        # Physical ranges: a transposed or mistyped value would silently move the observatory.
        checks = [("latitude_deg", -90 <= self.latitude_deg <= 90, "must be in [-90, 90]"),
                  ("longitude_deg", -180 <= self.longitude_deg <= 360, "must be in [-180, 360]"),
                  ("height_m", -500 <= self.height_m <= 9000, "must be in [-500, 9000] m"),
                  ("pressure_hpa", 0 <= self.pressure_hpa <= 1100, "must be in [0, 1100] hPa"),
                  ("temperature_c", -90 <= self.temperature_c <= 60, "must be in [-90, 60] C"),
                  ("relative_humidity", 0 <= self.relative_humidity <= 1, "must be a fraction in [0, 1]")]
        for name, ok, rule in checks:
            if not ok:
                raise ConfigValueError(f"site.{name} {rule}, got {getattr(self, name)}")


@dataclass(frozen=True)
class PathsConfig:
    """Data roots; relative paths are taken relative to ``root``."""

    root: str = "."
    catalogs: str = "catalogs"
    ps1_catalogs: str = "catalogs-ps1"         # the PS1-like store of the alert context
    priors: str = "priors"
    references: str = "references"
    outputs: str = "outputs"
    matchfiles: str = "matchfiles"
    spool: str = "spool"
    history: str = "history/objects.sqlite"   # alert object history (SQLite, one machine; see [history])
    solar_system: str = "solarsystem"          # orbit store orbits.npz + nights/<YYYY-MM-DD>.h5
    fparchive: str = "fparchive"               # difference-image archive for forced photometry

    def resolve(self, name: str) -> Path:
        """Absolute path of the data root ``name`` (one of the fields above)."""
        value = Path(getattr(self, name))
        return value if value.is_absolute() or name == "root" else Path(self.root) / value


@dataclass(frozen=True)
class SkyCounts:
    """How many stars and galaxies the simulated sky holds, by magnitude.

    Stars follow a broken power law in G between ``SimulationConfig.g_min_mag`` and
    ``g_max_mag``: the cumulative count N(<G) grows as 10^(``slope_bright`` G) up to
    ``break_mag`` and as 10^(``slope_faint`` G) beyond it, with ``stars_per_deg2`` stars in
    all.  Galaxies: ``galaxies_per_deg2`` with r from 16 to 22 (slope 0.4).
    """

    stars_per_deg2: float
    slope_bright: float
    slope_faint: float
    break_mag: float
    galaxies_per_deg2: float


#: The named skies of ``[simulation] sky_preset`` (see :class:`SimulationConfig`).  Their shape
#: by magnitude is the sky-averaged one of two catalogues: the Tycho-2 + UCAC4 all-sky counts
#: (417, 955 and 2,155 stars per deg^2 brighter than 14, 15 and 16 mag: log N rises 0.36 per
#: magnitude) and Gaia DR3 (1,811,709,771 sources over 41,253 deg^2, 43,900 per deg^2 to its
#: limit near G = 21: from G = 16 to 21, log N rises (log 43,900 - log 2,155) / 5 = 0.26 per
#: magnitude).  Their totals to G = 21 bracket that sky average by Galactic latitude: 5,000
#: per deg^2 far from the plane (|b| > 50 deg), 20,000 at mid latitudes (|b| ~ 15-30 deg: a
#: ZTF quadrant at b = -15 deg holds ~12,000 detections) and 60,000 near the plane
#: (|b| < 10 deg, away from the bulge, where Gaia's counts reach 10^5-10^6 and crowding, not
#: the count, limits the detections).  These latitude totals and keeping the all-sky shape at
#: every latitude (the real high-latitude counts flatten more at the faint end, the halo's)
#: are this simulator's choices, not measurements.  Galaxies: the default sky's density, a
#: fifth of it in the plane preset for the extinction (A_r of order 1.5 mag at |b| < 10 deg).
SKY_PRESETS = MappingProxyType({
    "high-latitude": SkyCounts(5_000.0, 0.36, 0.26, 16.0, 1_500.0),
    "mid-latitude": SkyCounts(20_000.0, 0.36, 0.26, 16.0, 1_500.0),
    "plane": SkyCounts(60_000.0, 0.36, 0.26, 16.0, 300.0),
})


@dataclass(frozen=True)
class SimulationConfig:
    """Parameters of the sky simulator (``skydiff simulate``).

    The sky's density is set either by ``sky_preset``, one of :data:`SKY_PRESETS`
    (``"high-latitude"``, ``"mid-latitude"``, ``"plane"``), or, with ``sky_preset = "custom"``
    (the default), by ``star_density_per_deg2``, ``star_count_slope`` and
    ``galaxy_density_per_deg2``; setting a preset together with any of those three is an
    error.  :meth:`sky_counts` gives the counts in force.
    """

    seed: int = 20260315
    sky_preset: str = "custom"
    star_density_per_deg2: float = 5000.0     # Gaia-like stars to g_max_mag ("custom" sky)
    star_count_slope: float = 0.3             # N(<G) ~ 10^(slope G) ("custom" sky)
    galaxy_density_per_deg2: float = 1500.0   # ("custom" sky)
    g_min_mag: float = 9.0
    g_max_mag: float = 21.0
    two_parameter_fraction_faint: float = 0.3  # share of G > 19 stars without proper motion
    variable_fraction: float = 0.02
    transients_per_quadrant: int = 12
    asteroids_per_deg2: float = 8.0            # main-belt asteroids crossing a field each night
    neos_per_field: int = 3                    # near-Earth objects crossing a field each night
    asteroid_rmag_min: float = 16.5            # r magnitude range when placed (night's middle)
    asteroid_rmag_max: float = 20.5
    pointing_error_arcsec: float = 20.0        # rms per axis
    position_angle_error_deg: float = 0.005
    seeing_fwhm_arcsec: float = 2.0            # median of the night
    seeing_scatter: float = 0.15               # fractional rms between exposures
    moffat_beta: float = 3.0
    psf_variation: float = 0.04                # fractional FWHM change corner to corner
    distortion_k1: float = 4.0e-5              # radial distortion, deg^-2 (r in degrees)
    distortion_k2: float = 0.0                 # deg^-4
    distortion_tilt: float = 1.0e-5            # non-radial (decentering) term, deg^-1
    cosmic_ray_rate: float = 2.5               # per cm^2 per minute
    bad_columns_per_quadrant: int = 2
    hot_pixels_per_quadrant: int = 300
    first_guess_wcs_error_arcsec: float = 20.0

    def __post_init__(self):
        if self.sky_preset != "custom":
            if self.sky_preset not in SKY_PRESETS:
                raise ConfigValueError(f"simulation.sky_preset must be 'custom' or one of "
                                       f"{', '.join(SKY_PRESETS)}, got {self.sky_preset!r}")
            custom = [name for name in ("star_density_per_deg2", "star_count_slope", "galaxy_density_per_deg2")
                      if getattr(self, name) != type(self).__dataclass_fields__[name].default]
            if custom:
                raise ConfigValueError(f"simulation.sky_preset = {self.sky_preset!r} sets the sky's counts; "
                                       f"{', '.join('simulation.' + c for c in custom)} apply only with "
                                       f"sky_preset = 'custom'")
        for name in ("star_density_per_deg2", "galaxy_density_per_deg2"):
            if not getattr(self, name) >= 0:
                raise ConfigValueError(f"simulation.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.star_count_slope <= 1:
            raise ConfigValueError(f"simulation.star_count_slope must be in (0, 1], got {self.star_count_slope}")

    def sky_counts(self) -> SkyCounts:
        """The star and galaxy counts in force: the preset's, or the custom settings'."""
        if self.sky_preset != "custom":
            return SKY_PRESETS[self.sky_preset]
        return SkyCounts(self.star_density_per_deg2, self.star_count_slope, self.star_count_slope,
                         self.g_max_mag, self.galaxy_density_per_deg2)



# -- stage sections ---------------------------------------------------------------------------
# Every stage's settings, one default each: the value production uses.  A stage module
# re-exports its section's class (``pipeline.measure.extract.ExtractionConfig`` is this
# module's), and the stage receives its section, never the whole Config.


class ConfigValueError(ConfigError, ValueError):
    """A stage setting outside its allowed range (also a ValueError, for code that builds a
    section directly)."""


def _shared(section: str, factory):
    """A field of a stage section that, inside :class:`Config`, is the top-level section
    ``section`` (several stages measure with one extraction, one characterisation, one
    registration); it is set in that section, never in the stage's own table."""
    return field(default_factory=factory, metadata={"section": section})


@dataclass(frozen=True)
class ExtractionConfig:
    """``[extraction]``: settings of :func:`pipeline.measure.extract.extract_sources`
    (pixels unless stated), shared by the astrometry stage and every characterisation.

    Detection, deblending and AUTO photometry follow SExtractor's defaults
    (``default.sex``); the background mesh is coarser, as ZTF-like quadrants are flat.
    """

    detect_thresh: float = 1.5          # sigma of the background RMS map, per pixel
    minarea: int = 5
    deblend_nthresh: int = 32
    deblend_cont: float = 0.005
    clean: bool = True
    background_mesh: int = 128
    background_filter: int = 3
    # FLUX_APER radii, px.  Empty by default: nothing downstream reads aperture fluxes of the
    # extraction (SCAMP takes FLUX_AUTO, the photometry fits the PSF), and five radii were a
    # tenth of the stage's time on a Galactic-plane quadrant.
    aperture_radii: tuple[float, ...] = ()
    kron_factor: float = 2.5            # PHOT_AUTOPARAMS: k and the minimum k * r_Kron,
    kron_min_scale: float = 3.5         # both in units of A and B
    auto_min_radius: float = 1.75       # circular AUTO aperture when the ellipse is smaller
    max_window_drift: float = 2.0       # windowed vs isophotal position, beyond: dropped
    min_window_sigma: float = 1.4       # floor of the centroid window's sigma (undersampled PSFs)
    shape_min_snr: float = 20.0         # shapes judged (NOT_POINTLIKE) from this S/N up
    sharp_fwhm_ratio: float = 0.6       # FWHM below this times the seeing: cosmic ray, hot pixel
    broad_fwhm_ratio: float = 1.5       # FWHM above this times the seeing: blend or galaxy
    max_pointlike_elongation: float = 1.5
    min_separation: float = 1.0         # closer pairs: the fainter is dropped
    edge_margin: float = 3.0
    mask_flag_radius: float = 3.0
    max_window_halfsize: int = 24       # largest stamp half-size for windowed moments
    seeing_min_snr: float = 50.0
    seeing_max_elongation: float = 1.3
    pixstack: int = 3_000_000           # sep's pixel buffer; bright stars need room
    sub_object_limit: int = 4096

    def __post_init__(self):
        if self.detect_thresh <= 0 or self.minarea < 1:
            raise ConfigValueError("detect_thresh must be > 0 and minarea >= 1")
        if self.aperture_radii and min(self.aperture_radii) <= 0:
            raise ConfigValueError("aperture_radii must be positive radii (or none)")
        if self.background_mesh < 8 or self.background_filter < 1:
            raise ConfigValueError("background_mesh must be >= 8 and background_filter >= 1")


@dataclass(frozen=True)
class PSFConfig:
    """``[characterize.psf]``: settings of :func:`pipeline.measure.psf.build_psf` (pixels
    unless stated)."""

    degree: int = 2                     # polynomial degree of the spatial variation
    min_stars: int = 10                 # fewer usable stars: PSFError
    stars_per_term: int = 10            # degree lowered until n_stars >= this * n_terms
    max_stars: int = 400                # the brightest usable stars are stacked
    min_snr: float = 50.0               # SNR_WIN of a PSF star
    max_elongation: float = 1.4
    fwhm_tolerance: float = 0.2         # |FWHM_IMAGE / median - 1| of a PSF star
    radius_fwhm: float = 6.0            # stamp half-size in FWHMs (light beyond: < 0.1 %)
    min_halfsize: int = 8
    max_halfsize: int = 32
    core_radius_fwhm: float = 3.0       # no other source, no masked pixel within
    residual_radius_fwhm: float = 3.0   # empirical residual table: full inside, tapered
                                        # to 0 over the next 1.5 FWHM (Moffat wings beyond)
    neighbour_flux_ratio: float = 0.01  # brighter neighbours within the stamp exclude a star
    clip_sigma: float = 5.0
    model_tolerance: float = 0.05       # relative model error allowed in the outlier test
    max_star_snr: float = 500.0         # weights stop growing beyond (systematics dominate)

    def __post_init__(self):
        if not 0 <= self.degree <= 3:
            raise ConfigValueError("degree must be 0-3")
        if self.min_stars < 3 or self.min_halfsize < 3 or self.max_halfsize < self.min_halfsize:
            raise ConfigValueError("min_stars >= 3 and 3 <= min_halfsize <= max_halfsize required")


@dataclass(frozen=True)
class PhotometryConfig:
    """``[characterize.photometry]``: settings of
    :func:`pipeline.measure.photometry.psf_photometry`."""

    fit_radius_fwhm: float = 2.0        # half-size of the fit box in FWHMs of the PSF
    min_fit_halfsize: int = 3
    min_good_fraction: float = 0.3      # of the fit box's PSF weight, else NO_FIT
    fit_background: bool = False        # fit a local constant sky with the flux
    position_iterations: int = 3
    max_position_shift: float = 1.5     # px from the input position, else POSITION_RESET

    def __post_init__(self):
        if self.fit_radius_fwhm <= 0 or self.min_fit_halfsize < 1:
            raise ConfigValueError("fit_radius_fwhm must be > 0 and min_fit_halfsize >= 1")
        if not 0 < self.min_good_fraction <= 1:
            raise ConfigValueError("min_good_fraction must be in (0, 1]")


@dataclass(frozen=True)
class PhotCalConfig:
    """``[characterize.photcal]``: settings of
    :func:`pipeline.measure.calibration.calibrate_zeropoint`."""

    match_radius_arcsec: float = 1.5
    isolation_arcsec: float = 6.0       # no other Gaia star within (blends)
    min_snr: float = 10.0
    max_mag_error: float = 0.1
    colour_range: tuple[float, float] = (-0.5, 4.0)   # BP - RP of usable stars
    min_stars: int = 5
    min_colour_spread: float = 0.2      # std of BP - RP needed to fit the colour term
    min_stars_colour: int = 20
    error_floor_mag: float = 0.005      # added in quadrature to each star's error
    clip_sigma: float = 3.0
    max_iterations: int = 10


@dataclass(frozen=True)
class CharacterizeConfig:
    """``[characterize]``: settings of every stage
    :func:`pipeline.measure.characterize.characterize_image` runs, shared by the subtraction
    (the science image), the reference build (its frames and the coadd) and the matchfile
    epochs; its extraction is ``[extraction]``."""

    extraction: ExtractionConfig = _shared("extraction", ExtractionConfig)
    psf: PSFConfig = field(default_factory=PSFConfig)
    photometry: PhotometryConfig = field(default_factory=PhotometryConfig)
    photcal: PhotCalConfig = field(default_factory=PhotCalConfig)
    limit_nsigma: float = 5.0           # significance of the limiting magnitude


#: Interpolation orders :func:`pipeline.measure.registration.register_image` implements.
REGISTRATION_ORDERS = (1, 3)


@dataclass(frozen=True)
class RegistrationConfig:
    """``[registration]``: settings of :func:`pipeline.measure.registration.register_image`,
    shared by the subtraction and the reference build.

    Attributes
    ----------
    grid_step : int
        Spacing (output pixels) of the grid on which the exact WCS mapping is evaluated.
    order : int
        Interpolation order: 3 (cubic B-spline, the default) or 1 (bilinear).
    mask_radius : int
        Half-width (px) of the input footprint whose flags an output pixel inherits; 2 is
        the cubic spline's support.
    max_mapping_error_px : float
        Largest tolerated error of the coarse-grid mapping (px); above it the WCSs vary
        too fast for the grid and :class:`pipeline.measure.registration.RegistrationError` is raised.
    """

    grid_step: int = 32
    order: int = 3
    mask_radius: int = 2
    max_mapping_error_px: float = 0.01

    def __post_init__(self):
        if self.grid_step < 2:
            raise ConfigValueError(f"grid_step must be at least 2, got {self.grid_step}")
        if self.order not in REGISTRATION_ORDERS:
            raise ConfigValueError(f"order must be one of {list(REGISTRATION_ORDERS)}, got {self.order}")
        if self.mask_radius < 0:
            raise ConfigValueError(f"mask_radius must be >= 0, got {self.mask_radius}")
        if not self.max_mapping_error_px > 0:
            raise ConfigValueError(f"max_mapping_error_px must be > 0, got {self.max_mapping_error_px}")


@dataclass(frozen=True)
class AstrometryConfig:
    """``[astrometry]``: how SCAMP is run (:mod:`pipeline.astrometry.scamp`) and how the
    solution is judged (:func:`pipeline.astrometry.solve.solve_astrometry`).

    The SCAMP settings are those that solved simulated ZTF-like quadrants with SCAMP 2.10,
    as ZTF runs it: two passes.  ``scamp_timeout_s`` applies to each pass.  Angles follow
    SCAMP's own units: ``position_maxerr_arcmin`` in arcmin, cross-id radii and
    ``match_resol_arcsec`` in arcsec (0 lets SCAMP choose), ``posangle_maxerr_deg`` in
    degrees; ``pixscale_maxerr`` is a factor.
    """

    scamp_binary: str = "scamp"
    scamp_timeout_s: float = 60.0
    scamp_threads: int = 1                 # SCAMP's NTHREADS (0: SCAMP's automatic)
    min_detections: int = 30               # detections SCAMP is given at least
    min_matched: int = 30                  # SCAMP's reference matches and the Gaia-match QA's
    min_xy_contrast: float = 5.0           # SCAMP pass 1 pattern-matching contrast
    max_sigma_arcsec: float = 0.3          # SCAMP's residual sigma per axis (pass verdicts)
    max_rms_mas: float = 150.0             # Gaia-match RMS per axis of the final solution
    max_cell_offset_mas: float = 25.0      # mean residual allowed in one 4 x 4 region ...
    max_cell_significance: float = 5.0     # ... when it is this many standard errors significant
    match_radius_arcsec: float = 1.5       # QA matching of detections to Gaia
    max_scale_diff_pct: float = 1.0        # pixel-scale change against the prior
    catalog_margin_deg: float = 0.1        # Gaia looked up this far around the footprint
    # SCAMP pass 1: pattern matching around the prior.
    position_maxerr_arcmin: float = 1.5    # search radius around the prior
    posangle_maxerr_deg: float = 0.5
    pixscale_maxerr: float = 1.02
    focdistort_degree: int = 2
    pass1_crossid_radius_arcsec: float = 3.0
    match_resol_arcsec: float = 2.0        # pattern-matching resolution (0: SCAMP decides)
    # Pattern matching uses the brightest N detections (0 = SCAMP decides).  500 halved
    # pass 1 on a 4000-source quadrant with an identical solution.
    match_nmax: int = 500
    # SCAMP pass 2: the full distortion, no matching.
    distort_degree: int = 4
    pass2_crossid_radius_arcsec: float = 1.5
    sn_thresholds: tuple[float, float] = (10.0, 100.0)
    # SCAMP adds this floor (pixels) in quadrature to every detection's position error.  Its
    # default, 0.01 px, is twice the windowed error of a bright star here, so it flattened the
    # weights and left 30-50 mas at the quadrant corners; the extraction's errors match the
    # measured scatter (tests/measure/test_extract.py), so no floor is needed (on real data the
    # atmosphere may justify one).
    astr_accuracy_px: float = 0.0
    # Detections with any of these FLAGS bits stay out of the fit.  SCAMP's default (0x00f0)
    # lets saturated and blended stars in, whose centroids are off by far more than their
    # errors say; every bit the extraction sets marks such a detection.
    flags_mask: int = 0x1FF
    # SCAMP (both passes and the outlier refit) is given only this many detections: the
    # unflagged ones of highest SNR_WIN, spread over the quadrant (see
    # pipeline.astrometry.solve.scamp_selection).  Its time grows with its input while the
    # bright stars set the solution; the QA and the matches use the whole catalogue (the
    # calibration sources).  2000 solved the simulated quadrants of every sky preset to
    # 0.79-0.82 mas of the true WCS, as 4000 did.  0 = every detection.
    scamp_max_sources: int = 2000
    # The Gaia rows SCAMP is given: at most this many, the brightest spread over the image
    # (SCAMP's time follows them); the QA and the matches use every row.  0 = every row.
    scamp_max_reference: int = 15000
    # The astrometry stage (and the subtraction's PSF, photometric calibration and
    # registration, which reuse its extraction) measures only this many of a quadrant's
    # detections: the brightest by detection flux, spread over the quadrant
    # (best_per_cell).  A crowded quadrant (33,000 detections near the Galactic plane) then
    # reaches its alerts without measuring the faint majority, which only the matchfile
    # needs: the quadrant runner measures every detection after the alerts are out.  The
    # astrometric QA (and ASTRNMAT) are then taken over these sources.  As many as a
    # high-latitude quadrant has at calibration_detect_thresh (about 1,900), so that a
    # crowded quadrant does no more of this work than a sparse one.  0 = every detection.
    calibration_sources: int = 2000
    # The astrometry stage detects at this threshold (sigma per pixel, as the extraction's
    # detect_thresh), above the survey's: the stars it calibrates on are far brighter, and
    # sep's detection and CLEAN take their time over every faint detection (0.86 s at
    # 1.5 sigma, 0.47 s at 8 on a mid-latitude quadrant).  The quadrant runner detects again
    # at the survey's threshold after the alerts, on the same background.  0 (or a value not
    # above [extraction] detect_thresh) = one detection at the survey's threshold.
    calibration_detect_thresh: float = 8.0
    # Fewer detections than this at calibration_detect_thresh (a shallow or cloudy exposure)
    # and the stage detects at the survey's threshold instead, before the astrometry.
    calibration_min_detections: int = 500

    def __post_init__(self):
        if not self.scamp_timeout_s > 0:
            raise ConfigValueError(f"scamp_timeout_s must be positive, got {self.scamp_timeout_s}")
        if self.scamp_threads < 0:
            raise ConfigValueError(f"scamp_threads must be >= 0 (0 = SCAMP's automatic), got {self.scamp_threads}")
        if self.focdistort_degree < 2:
            # Degree 1 makes SCAMP 2.10 delete every PV term of the prior, the distortion
            # included (seen: a degenerate CD of ~1e-8, no matches).
            raise ConfigValueError("focdistort_degree must be >= 2: degree 1 wipes the prior's PV terms")
        if self.min_detections < 1 or self.min_matched < 1:
            raise ConfigValueError("min_detections and min_matched must be >= 1")
        for name in ("max_sigma_arcsec", "max_rms_mas", "max_cell_offset_mas", "max_cell_significance",
                     "match_radius_arcsec", "max_scale_diff_pct", "position_maxerr_arcmin", "posangle_maxerr_deg",
                     "pass1_crossid_radius_arcsec", "pass2_crossid_radius_arcsec"):
            # A limit of 0 or less would reject every solution (or, for SCAMP, mean "any").
            if not getattr(self, name) > 0:
                raise ConfigValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.catalog_margin_deg < 0 or self.match_resol_arcsec < 0 or self.astr_accuracy_px < 0:
            raise ConfigValueError("catalog_margin_deg, match_resol_arcsec and astr_accuracy_px must be >= 0")
        if not self.pixscale_maxerr > 1:
            raise ConfigValueError(f"pixscale_maxerr is a factor > 1, got {self.pixscale_maxerr}")
        if self.scamp_max_sources != 0 and self.scamp_max_sources < self.min_detections:
            # Fewer would make every quadrant fail SCAMP's "too few detections" check.
            raise ConfigValueError(f"scamp_max_sources must be 0 (every detection) or at least "
                                   f"min_detections ({self.min_detections}), got {self.scamp_max_sources}")
        if self.scamp_max_reference != 0 and self.scamp_max_reference < self.min_matched:
            # Fewer could not give the matches the verdict asks for.
            raise ConfigValueError(f"scamp_max_reference must be 0 (every Gaia row) or at least "
                                   f"min_matched ({self.min_matched}), got {self.scamp_max_reference}")
        if not self.calibration_detect_thresh >= 0 or not math.isfinite(self.calibration_detect_thresh):
            raise ConfigValueError(f"calibration_detect_thresh must be 0 (the extraction's threshold) or a "
                                   f"positive number of sigma, got {self.calibration_detect_thresh}")
        if self.calibration_min_detections < 0:
            raise ConfigValueError(f"calibration_min_detections must be >= 0, got {self.calibration_min_detections}")
        floor = max(self.min_detections, self.min_matched, self.scamp_max_sources)
        if self.calibration_sources != 0 and self.calibration_sources < floor:
            # Fewer would starve SCAMP (scamp_max_sources) or the verdict's match count.
            raise ConfigValueError(f"calibration_sources must be 0 (every detection) or at least {floor} "
                                   "(min_detections, min_matched and scamp_max_sources), "
                                   f"got {self.calibration_sources}")


@dataclass(frozen=True)
class StackConfig:
    """The rejection settings of :func:`pipeline.reference.stack.stack_frames` (see that
    module's docstring); :class:`ReferenceConfig` extends it."""

    clip_sigma: float = 5.0
    clip_flux_fraction: float = 0.05
    clip_psf_factor: float = 1.5
    clip_grow: int = 1
    block_rows: int = 512               # rows per block of the median (bounds memory)

    def __post_init__(self):
        if self.clip_sigma <= 0 or self.clip_grow < 0 or self.block_rows < 1:
            raise ConfigValueError("clip_sigma > 0, clip_grow >= 0 and block_rows >= 1 required")


@dataclass(frozen=True)
class ReferenceConfig(StackConfig):
    """``[reference]``: settings of :func:`pipeline.reference.build.build_reference` (see
    that module's docstring for their meaning); the rejection's (``clip_*``,
    ``block_rows``) are :class:`StackConfig`'s.  Its characterisation and registration are
    ``[characterize]`` and ``[registration]``."""

    max_frames: int = 40
    min_frames: int = 3
    max_seeing_ratio: float = 1.6       # FWHM / best frame's FWHM
    max_fwhm_arcsec: float = 4.0
    max_depth_loss_mag: float = 0.5     # limiting mag below the median: dropped
    zeropoint: float = 27.0             # common zero point of the coadd, mag for 1 ADU
    grid_margin_px: int = 64            # the grid extends this far beyond the grid frame
    gaia_margin_deg: float = 0.05       # Gaia looked up this far around the footprint
    characterize: CharacterizeConfig = _shared("characterize", CharacterizeConfig)
    registration: RegistrationConfig = _shared("registration", RegistrationConfig)

    def __post_init__(self):
        super().__post_init__()
        if not 1 <= self.min_frames <= self.max_frames:
            raise ConfigValueError("1 <= min_frames <= max_frames required")
        if self.max_seeing_ratio < 1 or self.max_fwhm_arcsec <= 0 or self.max_depth_loss_mag < 0:
            raise ConfigValueError("max_seeing_ratio >= 1, max_fwhm_arcsec > 0, max_depth_loss_mag >= 0 required")
        if self.grid_margin_px < 0:
            raise ConfigValueError("grid_margin_px >= 0 required")


@dataclass(frozen=True)
class ZogyConfig:
    """``[subtraction.zogy]``: settings of the ZOGY subtraction
    (:func:`pipeline.subtraction.zogy.zogy_subtract_tiled`).

    Attributes
    ----------
    tile : int
        Target inner size of a tile (pixels); the image is cut into ``round(size / tile)``
        equal tiles per axis.
    overlap : int
        Margin (pixels) of image around each tile's inner part, and of background
        padding beyond the image: it must exceed the kernels' reach, about the sum of
        the two PSFs' half-widths, so PSF stamps may be at most ``overlap + 1`` wide.
        The real-space kernels are computed on a ``2 * overlap`` grid.
    mask_grow : int or None
        Radius (pixels) flagged around bad pixels; None (unset in the TOML file): the PSF
        stamp's half-width, which :func:`pipeline.subtraction.difference.subtract_images`
        replaces by ``mask_grow_fwhm`` FWHMs.
    workers : int
        Threads given to scipy.fft (the pipeline runs one quadrant per core).
    psf_error : float
        Fractional error of the PSF models.  Not in the ZOGY paper: a PSF model wrong by
        a fraction e leaves a residual of about e times each star's matched-filter
        response in S, so ``(e * S_r)**2`` (S_r the reference's part of S) is added to
        S's variance; 0 is pure ZOGY.  It lowers Scorr only on top of reference sources.
        The default, 2 %: our empirical PSFs reproduce bright stars to about that, and
        without it every bright star leaves a residual candidate.
    psf_d_phases : int
        Sub-pixel phases per axis at which each tile's P_D is tabulated from the new
        image's PSF evaluated at that phase (PSF fits on D take the nearest and shift it
        by at most ``0.5 / psf_d_phases`` px; a Fourier shift of the centred P_D by up to
        half a pixel aliases a near-Nyquist PSF and loses 0.2-2 % of the flux); 1: the
        centred P_D only.
    """

    tile: int = 1024
    overlap: int = 64
    mask_grow: int | None = None
    workers: int = 1
    psf_error: float = 0.02
    psf_d_phases: int = 5

    def __post_init__(self):
        if not 0.0 <= self.psf_error < 1.0:
            raise ConfigValueError(f"psf_error ({self.psf_error}) must be in [0, 1)")
        if self.tile < 16 or self.overlap < 8:
            raise ConfigValueError(f"tile ({self.tile}) must be >= 16 and overlap ({self.overlap}) >= 8")
        if not 1 <= self.psf_d_phases <= 9:
            raise ConfigValueError(f"psf_d_phases ({self.psf_d_phases}) must be 1-9")


@dataclass(frozen=True)
class CandidateConfig:
    """``[subtraction.candidates]``: settings of
    :func:`pipeline.subtraction.candidates.find_candidates` (pixels unless stated).

    Attributes
    ----------
    threshold : float
        ``|Scorr|`` a peak must reach.
    min_separation_px : float
        Same-sign peaks closer than this: only the higher ``|Scorr|`` is kept.
    max_candidates : int
        Beyond this many peaks the highest ``|Scorr|`` are kept and ``meta["truncated"]``
        is True (with ``n_peaks_total`` and a logged warning: a bogus flood shows).
    box : int
        Side of the odd box of ``nneg``, ``nbad``, ``sumrat`` (ZTF: 5).
    aperture_radius_px : float
        Radius of ``magap`` (ZTF: 14 px diameter).
    aperture_big_radius_px : float
        Radius of ``magapbig`` (ZTF: 18 px diameter).
    sky_annulus_px : (float, float)
        Inner and outer radius of the annulus whose median of D is ``sky``.
    classtar_inner_fwhm, classtar_outer_fwhm : float
        Aperture radii (in PSF FWHMs) of the concentration behind ``classtar``
        (:func:`pipeline.measure.stargalaxy.star_probability`).
    classtar_galaxy_broadening : float
        Width, relative to the PSF, of the smallest galaxy ``classtar`` calls a galaxy (> 1).
    classtar_psf_error : float
        Fractional error of the PSF model's concentration.
    nearest_radius_arcsec : float
        Search radius of the nearest reference-catalogue source.
    cutout_size : int
        Side of the stamps the pipeline asks
        :func:`pipeline.subtraction.candidates.cutout_stamps` for (odd; ZTF: 63).
    edge_margin_px : int
        Peaks on pixels closer than this to the image edge are dropped: the 3 x 3
        position fit needs the neighbours (>= 1); the default keeps the box on the image.
    position_max_shift_px : int
        A candidate is measured where S (the matched filter of D with P_D, whose maximum
        is the source's most likely position) peaks, reached by climbing S from Scorr's
        peak pixel by at most this many pixels per axis; 0 measures at Scorr's peak.
        Scorr's own peak is pushed off the source wherever its variance changes across
        it: away from a bright neighbour's source noise, and to the edge of a region
        flagged around bad pixels (Scorr is 0 there).
    """

    threshold: float = 5.0
    min_separation_px: float = 4.0
    max_candidates: int = 2000
    box: int = 5
    aperture_radius_px: float = 7.0
    aperture_big_radius_px: float = 9.0
    sky_annulus_px: tuple[float, float] = (12.0, 20.0)
    classtar_inner_fwhm: float = 0.6
    classtar_outer_fwhm: float = 2.0
    classtar_galaxy_broadening: float = 1.3
    classtar_psf_error: float = 0.01
    nearest_radius_arcsec: float = 30.0
    cutout_size: int = 63
    edge_margin_px: int = 2
    position_max_shift_px: int = 3

    def __post_init__(self):
        problems = []
        if self.position_max_shift_px < 0:
            problems.append(f"position_max_shift_px must be >= 0, got {self.position_max_shift_px}")
        if not self.threshold > 0:
            problems.append(f"threshold must be > 0, got {self.threshold}")
        if not self.min_separation_px >= 0:
            problems.append(f"min_separation_px must be >= 0, got {self.min_separation_px}")
        if self.max_candidates < 1:
            problems.append(f"max_candidates must be >= 1, got {self.max_candidates}")
        for name in ("box", "cutout_size"):
            value = getattr(self, name)
            if value < 1 or value % 2 == 0:
                problems.append(f"{name} must be odd and >= 1, got {value}")
        if not self.aperture_radius_px > 0 or not self.nearest_radius_arcsec > 0:
            problems.append("aperture_radius_px and nearest_radius_arcsec must be > 0")
        if not self.aperture_big_radius_px > 0:
            problems.append(f"aperture_big_radius_px must be > 0, got {self.aperture_big_radius_px}")
        if len(self.sky_annulus_px) != 2 or not 0 <= self.sky_annulus_px[0] < self.sky_annulus_px[1]:
            problems.append(f"sky_annulus_px must be (inner, outer) with 0 <= inner < outer, got {self.sky_annulus_px}")
        if not 0 < self.classtar_inner_fwhm < self.classtar_outer_fwhm:
            problems.append("classtar_inner_fwhm and classtar_outer_fwhm must satisfy 0 < inner < outer, got "
                            f"{self.classtar_inner_fwhm}, {self.classtar_outer_fwhm}")
        if not self.classtar_galaxy_broadening > 1:
            problems.append(f"classtar_galaxy_broadening must be > 1, got {self.classtar_galaxy_broadening}")
        if not self.classtar_psf_error >= 0:
            problems.append(f"classtar_psf_error must be >= 0, got {self.classtar_psf_error}")
        if self.edge_margin_px < 1:
            problems.append(f"edge_margin_px must be >= 1, got {self.edge_margin_px}")
        if problems:
            raise ConfigValueError("; ".join(problems))


@dataclass(frozen=True)
class SubtractionConfig:
    """``[subtraction]``: settings of every step of
    :func:`pipeline.subtraction.difference.subtract_images`; ``[subtraction.zogy]`` and
    ``[subtraction.candidates]`` are its own, its characterisation of the science image
    and its registration of the reference are ``[characterize]`` and ``[registration]``."""

    characterize: CharacterizeConfig = _shared("characterize", CharacterizeConfig)
    registration: RegistrationConfig = _shared("registration", RegistrationConfig)
    zogy: ZogyConfig = field(default_factory=ZogyConfig)
    candidates: CandidateConfig = field(default_factory=CandidateConfig)
    # Registration noise floor: what the Gaia-match statistics cannot show (PSF-centroid
    # systematics between the epochs, the reference's own WCS); 0.01 px = 10 mas.
    astrometric_sigma_floor_px: float = 0.01
    # Scorr is zeroed this many FWHMs around bad pixels (ZOGY's default, the PSF stamp's
    # half-width, flagged 12 % of a quadrant around bad columns and saturated stars; within
    # 2 FWHM a masked pixel's influence on S is below the noise).
    mask_grow_fwhm: float = 2.0
    min_relative_zp_stars: int = 10
    # The science image's background noise given to ZOGY: "poisson", the sky level's photon
    # noise plus the read noise, sqrt(sky / gain + (read_noise / gain)**2) (ADU), or
    # "measured", sep's background-rms map.  In a crowded field the measured rms also holds
    # the confusion of faint unresolved stars, which are static (absent from the
    # difference) and whose photon noise the source variance image / gain already counts:
    # at the plane preset (60,000 stars per deg2) it is 15 % above the sky's noise and
    # Scorr's std falls to 0.87.  "measured" suits images whose sky noise exceeds the
    # photon noise (no read noise known: "measured" is used whatever this says).
    background_noise: str = "poisson"

    def __post_init__(self):
        if self.background_noise not in ("poisson", "measured"):
            raise ConfigValueError(f"subtraction.background_noise must be 'poisson' or 'measured', "
                                   f"got {self.background_noise!r}")


@dataclass(frozen=True)
class RealBogusConfig:
    """``[realbogus]``: the models that score the candidates
    (:func:`pipeline.subtraction.realbogus.load_model`, :func:`pipeline.subtraction.drb.load_drb_model`)."""

    model: str = ""                     # a model file (``skydiff realbogus train``); "": the shipped model
    drb_model: str = ""                 # a drb network (``skydiff realbogus train-drb``); "": the shipped one


@dataclass(frozen=True)
class ContextConfig:
    """``[context]``: catalogue context of the candidates
    (:func:`pipeline.context.catalogs.catalog_context`), with ZTF's radii and limits
    (alert schema v4.02: PS1 within 30", Gaia within 90", "bright" Gaia G < 14)."""

    ps1_radius_arcsec: float = 30.0     # distpsnr1..3 and nmtchps
    gaia_radius_arcsec: float = 90.0    # neargaia, neargaiabright
    gaia_bright_mag: float = 14.0       # neargaiabright: G brighter than this

    def __post_init__(self):
        for name in ("ps1_radius_arcsec", "gaia_radius_arcsec"):
            value = getattr(self, name)
            if not 0 < value <= 600:
                raise ConfigValueError(f"context.{name} must be in (0, 600] arcsec, got {value}")
        if not -5 < self.gaia_bright_mag < 25:
            raise ConfigValueError(f"context.gaia_bright_mag must be a G magnitude in (-5, 25), "
                                   f"got {self.gaia_bright_mag}")


@dataclass(frozen=True)
class PriorFitSettings:
    """``[priors]``: settings of :func:`priors.fit.fit_prior` (``skydiff priors build``)."""

    max_airmass: float = 1.3
    degree: int = 3
    min_stars_per_quadrant: int = 20
    clip_sigma: float = 5.0
    passes: int = 3
    grid: int = 9                  # samples per axis when turning the model into TPV terms
    default_filter: str = "ZTF_r"  # for matches without a filter column


@dataclass(frozen=True)
class MatchfileConfig:
    """Matchfiles: one-to-one match radius, the fold's lock wait, pending epochs per fold.

    Appends and seeding take no lock; only the fold step (``skydiff matchfile fold``) takes
    ``<matchfile>.lock``, as an extra guard on top of running one fold at a time.
    """

    match_radius_arcsec: float = 1.5
    lock_timeout_s: float = 120.0          # a fold's wait for another fold of the same file
    combine_threshold: int = 32            # pending epoch shards from which the fold step folds a file

    def __post_init__(self):
        if self.combine_threshold < 1 or not self.lock_timeout_s > 0:
            raise ConfigValueError("matchfile.combine_threshold must be >= 1 and matchfile.lock_timeout_s > 0")


@dataclass(frozen=True)
class ForcedPhotConfig:
    """``[forcedphot]``: the difference-image archive and forced PSF photometry on it
    (:mod:`pipeline.forcedphot`: ``fp_hists`` in the alerts, ``skydiff forcedphot``, the
    service's forced-photometry endpoint)."""

    archive: bool = True                   # the quadrant runner archives every difference image
    retention_days: float = 60.0           # archived epochs older than this (before the newest) are removed
    history_days: float = 30.0             # fp_hists: the difference images of this many days before
    fit_radius_fwhm: float = 1.5           # PSF-fit box half-size in FWHMs of P_D (at least 5 px)
    nearest_radius_arcsec: float = 5.0     # nearest reference source searched within (ZTF: 5")
    snr_detection: float = 3.0             # SNT: above it a magnitude, below it an upper limit
    snr_upper_limit: float = 5.0           # SNU: upper limits at this many sigma
    lock_timeout_s: float = 120.0          # wait for another writer of the archive index

    def __post_init__(self):
        if not self.retention_days > 0 or not self.history_days > 0:
            raise ConfigValueError("forcedphot.retention_days and forcedphot.history_days must be > 0")
        if not 0.5 <= self.fit_radius_fwhm <= 5:
            raise ConfigValueError("forcedphot.fit_radius_fwhm must be in [0.5, 5]")
        if not 0 < self.nearest_radius_arcsec <= 60:
            raise ConfigValueError("forcedphot.nearest_radius_arcsec must be in (0, 60]")
        if not (self.snr_detection > 0 and self.snr_upper_limit > 0):
            raise ConfigValueError("forcedphot.snr_detection and forcedphot.snr_upper_limit must be > 0")
        if self.lock_timeout_s <= 0:
            raise ConfigValueError("forcedphot.lock_timeout_s must be > 0")


@dataclass(frozen=True)
class SolarSystemConfig:
    """``[solar_system]``: known minor planets near the candidates (``ssnamenr``, ``ssdistnr``,
    ``ssmagnr``; :mod:`solarsystem`, :mod:`pipeline.context.solar_system`)."""

    search_radius_arcsec: float = 30.0      # ZTF's: the nearest known object within it
    healpix_nside: int = 32                 # sky index of a night file (NESTED, ~1.8 deg pixels)
    fast_rate_deg_per_day: float = 1.0      # faster movers are checked for every quadrant
    coarse_margin_deg: float = 0.05         # the coarse track's error (parallax is added per object)
    night_half_window_hours: float = 12.0   # a night file serves exposures this close to local midnight
    prepare_missing_night: bool = True      # a quadrant prepares a missing night file (under a lock)
    lock_timeout_s: float = 1800.0          # wait for another process preparing the same night

    def __post_init__(self):
        if not 0 < self.search_radius_arcsec <= 600:
            raise ConfigValueError("solar_system.search_radius_arcsec must be in (0, 600]")
        if self.healpix_nside < 1 or self.healpix_nside & (self.healpix_nside - 1):
            raise ConfigValueError("solar_system.healpix_nside must be a power of 2")
        if self.fast_rate_deg_per_day <= 0 or self.coarse_margin_deg < 0:
            raise ConfigValueError("solar_system.fast_rate_deg_per_day must be > 0 and coarse_margin_deg >= 0")
        if not 0 < self.night_half_window_hours <= 24 or self.lock_timeout_s <= 0:
            raise ConfigValueError("solar_system.night_half_window_hours must be in (0, 24], lock_timeout_s > 0")


#: URL schemes of the PostgreSQL history store (libpq's connection URIs).
HISTORY_URL_SCHEMES = ("postgresql", "postgres")


def redacted_url(url: str) -> str:
    """``url`` with the password of its user part replaced by ``***`` (safe to log or print)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    name = user.split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{name}:***@{host}"))


def check_history_url(text: str, name: str = "url") -> str:
    """``text`` if it is empty (the SQLite file ``paths.history``) or a PostgreSQL URL.

    A malformed URL would otherwise surface only when the first quadrant reaches its alerts.
    """
    if not text:
        return text
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port                              # a non-numeric or out-of-range port raises
    except ValueError as exc:
        raise ConfigValueError(f"{name}: {redacted_url(text)!r} is not a URL: {exc}") from None
    if parts.scheme not in HISTORY_URL_SCHEMES:
        raise ConfigValueError(f"{name}: {redacted_url(text)!r} is not a postgresql:// URL (leave it empty "
                               f"for the SQLite file paths.history)")
    return text


@dataclass(frozen=True)
class HistoryConfig:
    """``[history]``: where the alert object history lives.

    An empty ``url`` keeps it in the SQLite file ``paths.history``, safe for the processes
    of one machine; a ``postgresql://user:password@host:port/database`` URL puts it in
    PostgreSQL, for quadrant tasks on several nodes.  ``connect_timeout_s`` bounds each
    connection attempt; ``lock_timeout_s`` how long an image waits for the images
    overlapping it (beyond: a retry, exit 75); ``order_wait_s`` how long an image waits for
    earlier overlapping images that ``skydiff submit`` announced (beyond: they are declared
    abandoned and it goes on; :mod:`alerts.history`).
    """

    url: str = ""
    connect_timeout_s: float = 10.0
    lock_timeout_s: float = 120.0
    order_wait_s: float = 600.0

    def __post_init__(self):
        check_history_url(self.url)
        if not self.connect_timeout_s > 0 or not self.lock_timeout_s > 0 or not self.order_wait_s > 0:
            raise ConfigValueError("history.connect_timeout_s, history.lock_timeout_s and history.order_wait_s "
                                   "must be positive")


@dataclass(frozen=True)
class KafkaConfig:
    """Alert publishing.  An empty ``bootstrap_servers`` keeps alerts in the spool."""

    bootstrap_servers: str = ""
    survey: str = "ztf"
    publisher: str = "ZTF (skydiff)"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = ""
    ssl_ca_location: str = ""
    message_max_bytes: int = 1000000
    flush_timeout_s: float = 30.0

    def __post_init__(self):
        check_bootstrap_servers(self.bootstrap_servers)
        if self.message_max_bytes < 1000 or not self.flush_timeout_s > 0:
            raise ConfigValueError("message_max_bytes must be >= 1000 and flush_timeout_s positive")


def check_bootstrap_servers(text: str, name: str = "bootstrap_servers") -> str:
    """``text`` if it is empty or a comma-separated list of ``host:port`` (port 1-65535).

    A malformed list would otherwise surface only as a broker that never answers (exit 75,
    "retry later"), when it is a usage error that no retry mends.
    """
    for entry in filter(None, (part.strip() for part in text.split(","))):
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigValueError(f"{name}: {entry!r} is not host:port (port 1-65535)")
    return text


@dataclass(frozen=True)
class SlurmConfig:
    """Batch submission."""

    partition: str = ""
    time_limit: str = "00:10:00"
    max_retries: int = 2
    cpus_per_task: int = 1


@dataclass(frozen=True)
class Config:
    """The whole configuration tree: one section per concern, each setting with one default.

    A stage section's field marked shared (``subtraction.characterize``,
    ``reference.registration``, ``characterize.extraction``, ...) is, in a Config, the
    top-level section of that name: it is set there, and :meth:`replace` or a TOML file
    changing that section changes it for every stage that measures with it.  Sections
    another one shares are declared before it.
    """

    instrument: InstrumentConfig = field(default_factory=InstrumentConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    extraction: ExtractionConfig = field(default_factory=ExtractionConfig)
    characterize: CharacterizeConfig = field(default_factory=CharacterizeConfig)
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    astrometry: AstrometryConfig = field(default_factory=AstrometryConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    subtraction: SubtractionConfig = field(default_factory=SubtractionConfig)
    realbogus: RealBogusConfig = field(default_factory=RealBogusConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    matchfile: MatchfileConfig = field(default_factory=MatchfileConfig)
    priors: PriorFitSettings = field(default_factory=PriorFitSettings)
    solar_system: SolarSystemConfig = field(default_factory=SolarSystemConfig)
    forcedphot: ForcedPhotConfig = field(default_factory=ForcedPhotConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            wired = _wire_shared(section, self)
            if wired is not section:
                object.__setattr__(self, f.name, wired)

    def replace(self, **sections: Any) -> "Config":
        """A copy with whole sections or ``section__key=value`` entries replaced."""
        updates: dict[str, Any] = {}
        for key, value in sections.items():
            if "__" in key:
                section, name = key.split("__", 1)
                base = updates.get(section, getattr(self, section))
                updates[section] = dataclasses.replace(base, **{name: value})
            else:
                updates[key] = value
        return dataclasses.replace(self, **updates)


def _shared_section(f: dataclasses.Field) -> str | None:
    return f.metadata.get("section")


def _wire_shared(section: Any, config: Config) -> Any:
    """``section`` with every shared field (at any depth) set to ``config``'s section."""
    if not dataclasses.is_dataclass(section):
        return section
    changes = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        name = _shared_section(f)
        target = getattr(config, name) if name is not None else _wire_shared(value, config)
        if target is not value:
            changes[f.name] = target
    return dataclasses.replace(section, **changes) if changes else section


DEFAULT_CONFIG = Config()


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a TOML value against a dataclass field type, converting ints to floats and
    arrays to tuples."""
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if type(value) is not annotation:
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
        return value
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected an array, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            kinds = (args[0],) * len(value)
        elif len(value) != len(args):
            raise ConfigError(f"{where}: expected an array of {len(args)} values, got {value!r}")
        else:
            kinds = args
        return tuple(_coerce(item, kind, f"{where}[{i}]") for i, (item, kind) in enumerate(zip(value, kinds)))
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        # Optional settings: None is their default and is written by leaving the key out.
        (kind,) = [a for a in args if a is not type(None)]
        return _coerce(value, kind, where)
    raise ConfigError(f"{where}: unsupported setting type {annotation!r}")


def _merge(default: Any, overrides: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(type(default))
    fields = dataclasses.fields(default)
    shared = {f.name: _shared_section(f) for f in fields if _shared_section(f) is not None}
    known = {f.name for f in fields} - set(shared)
    wrongly_placed = sorted(set(overrides) & set(shared))
    if wrongly_placed:
        names = ", ".join(f"{where}.{key} (set in [{shared[key]}])" for key in wrongly_placed)
        raise ConfigError(f"shared section(s) set in the wrong place: {names}")
    unknown = sorted(set(overrides) - known)
    if unknown:
        def named(key: str) -> str:
            guess = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            full = f"{where}.{key}" if where else key
            return f"{full} (did you mean {guess[0]!r}?)" if guess else full
        raise ConfigError(f"unknown configuration key(s): {', '.join(named(key) for key in unknown)}")
    changes: dict[str, Any] = {}
    for name, value in overrides.items():
        current = getattr(default, name)
        here = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{here}: expected a table")
            changes[name] = _merge(current, value, here)
        elif name == "filters":
            changes[name] = _merge_filters(current, value, here)
        else:
            changes[name] = _coerce(value, hints[name], here)
    try:
        return dataclasses.replace(default, **changes)
    except ConfigValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _merge_filters(current: Mapping[str, FilterConfig], value: Any, where: str):
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table of filters")
    merged = dict(current)
    for band, table in value.items():
        if band in merged:
            merged[band] = _merge(merged[band], table, f"{where}.{band}")
        else:
            try:
                merged[band] = FilterConfig(**table)
            except TypeError as exc:
                raise ConfigError(f"{where}.{band}: {exc}") from None
    return MappingProxyType(merged)


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read a TOML configuration file over the embedded defaults.

    Parameters
    ----------
    path : str or Path, optional
        A TOML file; ``None`` gives the defaults.
    overrides : mapping, optional
        Nested values applied after the file (same shape as the TOML).

    Raises
    ------
    ConfigError
        The file cannot be read or parsed, or holds an unknown key, a mistyped value, a
        value out of its range or a shared section set inside a stage's table.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read configuration: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        config = _merge(DEFAULT_CONFIG, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if overrides:
        config = _merge(config, overrides, "")
    return config


def _to_plain(obj: Any) -> Any:
    """Nested dicts and lists for TOML: shared fields are left to their own section, and
    unset optional settings (None, which TOML cannot hold) are left out."""
    if dataclasses.is_dataclass(obj):
        plain = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if _shared_section(f) is None and value is not None:
                plain[f.name] = _to_plain(value)
        return plain
    if isinstance(obj, Mapping):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


def config_to_toml(config: Config, hide_secrets: bool = True) -> str:
    """The full effective configuration as TOML text (passwords masked by default)."""
    plain = _to_plain(config)
    if hide_secrets and plain["kafka"]["sasl_password"]:
        plain["kafka"]["sasl_password"] = "***"
    if hide_secrets:
        plain["history"]["url"] = redacted_url(plain["history"]["url"])
    return tomli_w.dumps(plain)
