"""Configuration: frozen dataclasses with embedded ZTF-like defaults, loaded from TOML.

Every command takes ``--config FILE``; a TOML file only needs the values it changes:
anything unset falls back to the defaults below.  Unknown sections or keys are an
error naming them, so a typo never silently falls back to a default.

The sections mirror the dataclasses: ``[instrument]``, ``[site]``, ``[paths]``,
``[simulation]``, ``[astrometry]``, ``[matchfile]``, ``[kafka]``, ``[slurm]``.  Filters are a table of
tables, ``[instrument.filters.ZTF_g]`` and so on.
"""
from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import tomli_w
from pipeline.core.exits import UsageError

__all__ = [
    "FilterConfig", "InstrumentConfig", "SiteConfig", "PathsConfig", "SimulationConfig",
    "AstrometryConfig", "MatchfileConfig", "KafkaConfig", "SlurmConfig", "Config", "ConfigError",
    "load_config", "config_to_toml", "DEFAULT_CONFIG",
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


@dataclass(frozen=True)
class PathsConfig:
    """Data roots; relative paths are taken relative to ``root``."""

    root: str = "."
    catalogs: str = "catalogs"
    priors: str = "priors"
    references: str = "references"
    outputs: str = "outputs"
    matchfiles: str = "matchfiles"
    spool: str = "spool"
    history: str = "history/objects.sqlite"   # alert object history (SQLite, one machine)

    def resolve(self, name: str) -> Path:
        """Absolute path of the data root ``name`` (one of the fields above)."""
        value = Path(getattr(self, name))
        return value if value.is_absolute() or name == "root" else Path(self.root) / value


@dataclass(frozen=True)
class SimulationConfig:
    """Parameters of the sky simulator (``skydiff simulate``)."""

    seed: int = 20260315
    star_density_per_deg2: float = 5000.0     # Gaia-like stars to g_max_mag
    galaxy_density_per_deg2: float = 1500.0
    g_min_mag: float = 9.0
    g_max_mag: float = 21.0
    two_parameter_fraction_faint: float = 0.3  # share of G > 19 stars without proper motion
    variable_fraction: float = 0.02
    transients_per_quadrant: int = 12
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


@dataclass(frozen=True)
class AstrometryConfig:
    """Astrometric calibration settings (SCAMP and the verdict)."""

    scamp_binary: str = "scamp"
    scamp_timeout_s: float = 60.0
    scamp_threads: int = 1
    min_detections: int = 30
    min_matched: int = 30
    min_xy_contrast: float = 5.0
    max_sigma_arcsec: float = 0.3          # SCAMP's residual sigma per axis (pass verdicts)
    max_rms_mas: float = 150.0             # Gaia-match RMS per axis of the final solution
    max_cell_offset_mas: float = 25.0      # mean residual allowed in one 4 x 4 region ...
    max_cell_significance: float = 5.0     # ... when it is this many standard errors significant
    match_radius_arcsec: float = 1.5       # QA matching of detections to Gaia
    position_maxerr_arcmin: float = 1.5    # SCAMP pass 1 search radius around the prior
    match_resol_arcsec: float = 2.0        # SCAMP pass 1 pattern-matching resolution
    match_nmax: int = 500                  # SCAMP pass 1 matches with the brightest N detections
    astr_accuracy_px: float = 0.0          # SCAMP's error floor added to the centroid errors
    max_scale_diff_pct: float = 1.0
    catalog_margin_deg: float = 0.1


@dataclass(frozen=True)
class MatchfileConfig:
    """Matchfiles: one-to-one match radius, writer lock wait, pending epochs per fold."""

    match_radius_arcsec: float = 1.5
    lock_timeout_s: float = 120.0
    combine_threshold: int = 32            # pending epoch shards that trigger a fold


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


@dataclass(frozen=True)
class SlurmConfig:
    """Batch submission."""

    partition: str = ""
    time_limit: str = "00:10:00"
    max_retries: int = 2
    cpus_per_task: int = 1


@dataclass(frozen=True)
class Config:
    instrument: InstrumentConfig = field(default_factory=InstrumentConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    astrometry: AstrometryConfig = field(default_factory=AstrometryConfig)
    matchfile: MatchfileConfig = field(default_factory=MatchfileConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

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


DEFAULT_CONFIG = Config()


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a TOML value against a dataclass field type, converting ints to floats."""
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if type(value) is not annotation:
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported setting type {annotation!r}")


def _merge(default: Any, overrides: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(type(default))
    known = {f.name for f in dataclasses.fields(default)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        names = ", ".join(f"{where}.{key}" if where else key for key in unknown)
        raise ConfigError(f"unknown configuration key(s): {names}")
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
    return dataclasses.replace(default, **changes)


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
        The file cannot be read or parsed, or holds an unknown key or a mistyped value.
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
    config = _merge(DEFAULT_CONFIG, data, "")
    if overrides:
        config = _merge(config, overrides, "")
    return config


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


def config_to_toml(config: Config, hide_secrets: bool = True) -> str:
    """The full effective configuration as TOML text (passwords masked by default)."""
    plain = _to_plain(config)
    if hide_secrets and plain["kafka"]["sasl_password"]:
        plain["kafka"]["sasl_password"] = "***"
    return tomli_w.dumps(plain)
