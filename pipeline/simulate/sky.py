"""The simulated sky: stars (with a Gaia-like catalogue of them), galaxies and transients,
and a Pan-STARRS1-like catalogue of its stars and galaxies (:meth:`SkyModel.ps1_catalogue`).

The density is ``[simulation] sky_preset`` (high-latitude, mid-latitude, plane: star counts
by magnitude as a broken power law, see :data:`pipeline.core.config.SKY_PRESETS`) or the
custom settings.  Objects are drawn uniformly on the sphere over the union of the fields'
footprints (7.5 x 7.3 degrees in the tangent plane about each field centre, plus a margin), so the
density is right where fields overlap and across RA = 0.  Stars carry their *true*
position at epoch J2016.0 and true proper motion; the Gaia-like catalogue is the truth
plus Gaia-like errors, with a share of faint stars published as two-parameter solutions
(no proper motion).  Magnitudes in the survey bands are functions of (band, MJD),
vectorised over objects: variable stars and transients follow known light curves.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from pipeline.core.config import Config, FilterConfig, SkyCounts
from pipeline.formats.tpv import sky_to_tangent

__all__ = ["SkyModel", "make_sky", "propagate_positions", "julian_epoch", "FOOTPRINT_DEG", "PS1_MAG_LIMIT",
           "GAIA_COLUMNS", "VARIABLE_SINE", "VARIABLE_SAWTOOTH"]

#: Width and height (deg) of a field's footprint in its tangent plane.
FOOTPRINT_DEG = (7.5, 7.3)
#: Extra sky around each footprint: pointing errors (~20") and rotation must never uncover it.
FOOTPRINT_MARGIN_DEG = 0.25
GAIA_REF_EPOCH = 2016.0
GAIA_COLUMNS = ["source_id", "ra", "dec", "ra_error", "dec_error", "pmra", "pmdec",
                "pmra_error", "pmdec_error", "ref_epoch",
                "phot_g_mean_mag", "phot_bp_mean_mag", "phot_rp_mean_mag"]
VARIABLE_SINE, VARIABLE_SAWTOOTH = 1, 2
#: The PS1-like catalogue (:meth:`SkyModel.ps1_catalogue`): its magnitude limit (true r),
#: mean epoch, 5-sigma depths of the mean PSF magnitudes, effective wavelengths (um) for
#: galaxy colours, stellar colour terms (mag = G + offset + slope (BP - RP), the ZTF-like
#: filters' for g, r, i) and the PSF-magnitude deficit of galaxies.
PS1_MAG_LIMIT = 23.0
PS1_MEAN_EPOCH = 2012.0
_PS1_DEPTH = {"gmag": 23.3, "rmag": 23.2, "imag": 23.1, "zmag": 22.3}
_PS1_BAND_UM = {"gmag": 0.48, "rmag": 0.62, "imag": 0.75, "zmag": 0.87}
_PS1_STAR_COLOUR = {"gmag": (0.35, 0.55), "rmag": (-0.10, -0.05), "imag": (-0.45, -0.35), "zmag": (-0.60, -0.50)}
_GALAXY_PSF_LOSS_MAG_PER_ARCSEC = 0.3
TRANSIENT_KINDS = ("supernova", "nuclear", "hostless")
_MAS_PER_DEG = 3.6e6
# Effective wavelengths (um) at which galaxy and transient colours g-r and r-i are defined.
_G_UM, _R_UM, _I_UM = 0.48, 0.64, 0.79


def julian_epoch(mjd) -> np.ndarray:
    """Julian epoch (years) of an MJD; UTC vs TDB (~1 minute) is irrelevant at mas/yr."""
    return 2000.0 + (np.asarray(mjd, float) - 51544.5) / 365.25


def propagate_positions(ra, dec, pmra, pmdec, dt_years):
    """Move positions (deg) by proper motions (mas/yr; pmra includes cos dec) over ``dt_years``.

    Linear motion along the local east/north directions, renormalised onto the sphere
    (the Gaia-style propagation without parallax or radial velocity).  NaN motions
    (two-parameter solutions) leave positions unchanged.
    """
    ra_r, dec_r = np.deg2rad(ra), np.deg2rad(dec)
    cra, sra, cdec, sdec = np.cos(ra_r), np.sin(ra_r), np.cos(dec_r), np.sin(dec_r)
    scale = np.deg2rad(np.asarray(dt_years, float) / _MAS_PER_DEG)
    de = np.nan_to_num(np.asarray(pmra, float)) * scale
    dn = np.nan_to_num(np.asarray(pmdec, float)) * scale
    x = cdec * cra - de * sra - dn * sdec * cra
    y = cdec * sra + de * cra - dn * sdec * sra
    z = sdec + dn * cdec
    ra_new = np.rad2deg(np.arctan2(y, x)) % 360.0
    dec_new = np.rad2deg(np.arctan2(z, np.hypot(x, y)))
    return ra_new, dec_new


def _unit_vectors(ra, dec) -> np.ndarray:
    ra_r, dec_r = np.deg2rad(ra), np.deg2rad(dec)
    return np.column_stack([np.cos(dec_r) * np.cos(ra_r), np.cos(dec_r) * np.sin(ra_r), np.sin(dec_r)])


def _offset_positions(ra0, dec0, rho_deg, pa_deg):
    """Positions at angular distance ``rho`` and position angle ``pa`` (east of north) from a centre."""
    d0, rho, pa = np.deg2rad(dec0), np.deg2rad(rho_deg), np.deg2rad(pa_deg)
    sin_dec = np.sin(d0) * np.cos(rho) + np.cos(d0) * np.sin(rho) * np.cos(pa)
    dec = np.arcsin(np.clip(sin_dec, -1, 1))
    dra = np.arctan2(np.sin(pa) * np.sin(rho) * np.cos(d0), np.cos(rho) - np.sin(d0) * sin_dec)
    return (ra0 + np.rad2deg(dra)) % 360.0, np.rad2deg(dec)


def _half_size_deg() -> tuple[float, float]:
    return FOOTPRINT_DEG[0] / 2 + FOOTPRINT_MARGIN_DEG, FOOTPRINT_DEG[1] / 2 + FOOTPRINT_MARGIN_DEG


def _in_footprint(ra, dec, ra0: float, dec0: float) -> np.ndarray:
    hx, hy = _half_size_deg()
    xi, eta = sky_to_tangent(ra, dec, ra0, dec0)
    with np.errstate(invalid="ignore"):
        return (np.abs(xi) <= hx) & (np.abs(eta) <= hy)


def _uniform_over_fields(rng: np.random.Generator, fields, density_per_deg2: float):
    """Poisson-uniform positions over the union of the field footprints.

    Each field draws in the spherical cap enclosing its footprint and keeps what falls in
    its footprint but in no earlier field's, so overlaps are not populated twice.

    Returns ra, dec (deg) and the index of the field each position was drawn for.
    """
    hx, hy = _half_size_deg()
    cap = np.rad2deg(np.arctan(np.deg2rad(np.hypot(hx, hy)))) + 0.01
    cap_area = 2 * np.pi * (1 - np.cos(np.deg2rad(cap))) * (180 / np.pi) ** 2
    out_ra, out_dec, out_field = [], [], []
    for i, (_, ra0, dec0) in enumerate(fields):
        n = rng.poisson(density_per_deg2 * cap_area)
        rho = np.rad2deg(np.arccos(1 - rng.random(n) * (1 - np.cos(np.deg2rad(cap)))))
        ra, dec = _offset_positions(ra0, dec0, rho, rng.random(n) * 360.0)
        keep = _in_footprint(ra, dec, ra0, dec0)
        for _, ra1, dec1 in fields[:i]:
            keep &= ~_in_footprint(ra, dec, ra1, dec1)
        out_ra.append(ra[keep])
        out_dec.append(dec[keep])
        out_field.append(np.full(keep.sum(), i))
    return np.concatenate(out_ra), np.concatenate(out_dec), np.concatenate(out_field)


def _power_law_mags(rng, n: int, m_min: float, m_max: float, slope: float) -> np.ndarray:
    """Magnitudes with N(<m) proportional to 10^(slope m) between m_min and m_max."""
    lo, hi = 10 ** (slope * m_min), 10 ** (slope * m_max)
    return np.log10(lo + rng.random(n) * (hi - lo)) / slope


def _star_mags(rng, n: int, m_min: float, m_max: float, counts: SkyCounts) -> np.ndarray:
    """Magnitudes with the cumulative count N(<m) of :class:`SkyCounts` between m_min and m_max.

    A single power law (the "custom" sky) draws exactly as :func:`_power_law_mags`; a broken one
    inverts N(<m) = 10^(slope_bright (m - break)) below the break and 10^(slope_faint (m - break))
    above it (continuous at the break, where N = 1), from one uniform draw per star.
    """
    mb, sb, sf = counts.break_mag, counts.slope_bright, counts.slope_faint
    if mb >= m_max or mb <= m_min or sb == sf:
        return _power_law_mags(rng, n, m_min, m_max, sf if mb <= m_min else sb)
    lo, hi = 10 ** (sb * (m_min - mb)), 10 ** (sf * (m_max - mb))
    cumulative = lo + rng.random(n) * (hi - lo)
    return mb + np.log10(cumulative) / np.where(cumulative <= 1.0, sb, sf)


def _gaia_position_error_mas(g: np.ndarray) -> np.ndarray:
    """Gaia DR3-like per-axis position error at J2016 versus G (0.02 mas bright, 1.5 mas at G=21)."""
    knots_g = [12.0, 15.0, 17.0, 19.0, 20.0, 21.0, 22.0]
    knots_err = [0.02, 0.02, 0.07, 0.25, 0.5, 1.5, 4.0]
    return 10 ** np.interp(g, knots_g, np.log10(knots_err))


def _band_offset_from_colours(wavelength_um: float, g_r, r_i):
    """Magnitude in a band minus the r magnitude, interpolating g-r and r-i in wavelength."""
    if wavelength_um <= _R_UM:
        return np.asarray(g_r) * (_R_UM - wavelength_um) / (_R_UM - _G_UM)
    return -np.asarray(r_i) * (wavelength_um - _R_UM) / (_I_UM - _R_UM)


def _ps1_snr(mag: np.ndarray, depth_5sigma: float) -> np.ndarray:
    """Signal-to-noise of a PS1 mean PSF magnitude, 5 at the band's depth."""
    return 5.0 * 10 ** (-0.4 * (np.asarray(mag, float) - depth_5sigma))


def _ps1_mag_error(mag: np.ndarray, depth_5sigma: float) -> np.ndarray:
    """PS1-like magnitude error: photon noise plus a 0.01 mag calibration floor."""
    return np.hypot(0.01, 1.0857 / _ps1_snr(mag, depth_5sigma))


def _ps1_score_separation(rmag: np.ndarray) -> np.ndarray:
    """Half the distance between the star and galaxy means of the score's latent feature
    (unit noise) versus r: the classes overlap more towards faint magnitudes, as the PS1
    point-source catalogue's ROC curves degrade beyond r ~ 21 (Tachibana & Miller 2018)."""
    return np.interp(rmag, [17.0, 19.0, 20.0, 21.0, 22.0, 23.0], [3.5, 3.0, 2.2, 1.5, 0.75, 0.35])


def _ps1_style_ids(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """PS1-style 64-bit ids from positions: 30" declination zone, RA in micro-degrees
    times 10, and a last digit that makes coincident ones unique."""
    zone = np.floor((np.asarray(dec) + 90.0) * 120.0).astype(np.int64)
    ids = zone * np.int64(10) ** 13 + np.floor(np.asarray(ra) * 1e6).astype(np.int64) * 10
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    # rank of each id within its run of equal ids, added as the last digit
    run_start = np.r_[0, np.flatnonzero(np.diff(sorted_ids)) + 1]
    rank = np.arange(ids.size) - np.repeat(run_start, np.diff(np.r_[run_start, ids.size]))
    ids[order] = sorted_ids + rank
    return ids


def _make_stars(rng, cfg: Config, fields) -> Table:
    sim = cfg.simulation
    counts = sim.sky_counts()
    ra, dec, field_index = _uniform_over_fields(rng, fields, counts.stars_per_deg2)
    n = ra.size
    g = _star_mags(rng, n, sim.g_min_mag, sim.g_max_mag, counts)
    bp_rp = rng.uniform(0.5, 2.5, n)
    # Proper motions: most stars 1-10 mas/yr (log-normal), 3 % in a tail to a few hundred.
    pm_total = 10 ** rng.normal(0.55, 0.3, n)
    tail = rng.random(n) < 0.03
    pm_total[tail] = 10 ** rng.uniform(1.0, 2.6, tail.sum())
    pm_angle = rng.uniform(0, 2 * np.pi, n)
    pmra, pmdec = pm_total * np.sin(pm_angle), pm_total * np.cos(pm_angle)

    two_param = (g > 19.0) & (rng.random(n) < sim.two_parameter_fraction_faint)
    pos_err = _gaia_position_error_mas(g) * rng.uniform(0.8, 1.25, n)
    # Without a proper-motion solution the J2016 position absorbs the unmodelled motion.
    pos_err[two_param] *= 4.0
    pm_err = _gaia_position_error_mas(g) * 1.1 * rng.uniform(0.8, 1.25, n)
    dra_mas, ddec_mas = rng.normal(0, pos_err), rng.normal(0, pos_err)
    cat_ra = (ra + dra_mas / _MAS_PER_DEG / np.cos(np.deg2rad(dec))) % 360.0
    cat_dec = dec + ddec_mas / _MAS_PER_DEG
    cat_pmra = np.where(two_param, np.nan, pmra + rng.normal(0, pm_err))
    cat_pmdec = np.where(two_param, np.nan, pmdec + rng.normal(0, pm_err))

    var_kind = np.zeros(n, dtype=np.int8)
    is_var = rng.random(n) < sim.variable_fraction
    var_kind[is_var] = rng.choice([VARIABLE_SINE, VARIABLE_SAWTOOTH], is_var.sum())
    amplitude = np.where(is_var, rng.uniform(0.1, 1.0, n), 0.0)
    period = np.where(is_var, 10 ** rng.uniform(np.log10(0.05), np.log10(20.0), n), 1.0)
    phase = np.where(is_var, rng.random(n), 0.0)
    # Unique, Gaia-looking 64-bit ids: a field-sized stride plus a random low part.
    source_id = (np.int64(10) ** 15 + np.arange(n, dtype=np.int64) * 1000
                 + rng.integers(0, 1000, n, dtype=np.int64))
    return Table({
        "source_id": source_id, "field_index": field_index.astype(np.int16),
        "ra": ra, "dec": dec, "pmra": pmra, "pmdec": pmdec, "gmag": g, "bp_rp": bp_rp,
        "cat_ra": cat_ra, "cat_dec": cat_dec, "ra_error": pos_err, "dec_error": pos_err * rng.uniform(0.9, 1.1, n),
        "cat_pmra": cat_pmra, "cat_pmdec": cat_pmdec, "pm_error": np.where(two_param, np.nan, pm_err),
        "two_parameter": two_param, "var_kind": var_kind, "var_amplitude": amplitude,
        "var_period": period, "var_phase": phase,
    })


def _make_galaxies(rng, cfg: Config, fields) -> Table:
    ra, dec, field_index = _uniform_over_fields(rng, fields, cfg.simulation.sky_counts().galaxies_per_deg2)
    n = ra.size
    return Table({
        "galaxy_id": np.arange(n, dtype=np.int64) + 1, "field_index": field_index.astype(np.int16),
        "ra": ra, "dec": dec, "rmag": _power_law_mags(rng, n, 16.0, 22.0, 0.4),
        "g_r": rng.uniform(0.3, 1.0, n), "r_i": rng.uniform(0.15, 0.5, n),
        "r_half_arcsec": rng.uniform(1.0, 4.0, n), "axis_ratio": rng.uniform(0.3, 1.0, n),
        "pa_deg": rng.uniform(0, 180, n),
    })


def _make_transients(rng, cfg: Config, fields, galaxies: Table, mjd_range) -> Table:
    inst = cfg.instrument
    quadrant_area = inst.quadrant_nx * inst.quadrant_ny * (inst.pixel_scale_arcsec / 3600) ** 2
    ra, dec, field_index = _uniform_over_fields(
        rng, fields, cfg.simulation.transients_per_quadrant / quadrant_area)
    n = ra.size
    kind = rng.choice(len(TRANSIENT_KINDS), n, p=[0.6, 0.2, 0.2])
    host = np.full(n, -1, dtype=np.int64)
    if len(galaxies) and n:
        # The nearest galaxy within two arcminutes of the drawn spot hosts the event.
        tree = cKDTree(_unit_vectors(galaxies["ra"], galaxies["dec"]))
        dist, nearest = tree.query(_unit_vectors(ra, dec))
        hosted = (kind != TRANSIENT_KINDS.index("hostless")) & (dist < np.deg2rad(2 / 60))
        host[hosted] = nearest[hosted]
    kind[host < 0] = TRANSIENT_KINDS.index("hostless")
    has_host = host >= 0
    hg = galaxies[host[has_host]] if has_host.any() else None
    if hg is not None:
        # Supernovae sit in the disc (exponential profile in the galaxy's ellipse).
        r_scale = hg["r_half_arcsec"].data / 1.678
        radius = rng.gamma(2.0, r_scale) * (kind[has_host] == TRANSIENT_KINDS.index("supernova"))
        ang = rng.uniform(0, 2 * np.pi, radius.size)
        a, b = radius * np.cos(ang), radius * np.sin(ang) * hg["axis_ratio"].data
        pa = np.deg2rad(hg["pa_deg"].data)
        east, north = a * np.sin(pa) + b * np.cos(pa), a * np.cos(pa) - b * np.sin(pa)
        ra[has_host], dec[has_host] = _offset_positions(
            hg["ra"].data, hg["dec"].data, np.hypot(east, north) / 3600, np.rad2deg(np.arctan2(east, north)))
    start, end = mjd_range
    return Table({
        "transient_id": np.arange(n, dtype=np.int64) + 1, "field_index": field_index.astype(np.int16),
        "kind": np.array(TRANSIENT_KINDS)[kind], "host_galaxy_id": np.where(has_host, host + 1, 0),
        "ra": ra, "dec": dec, "t_peak": rng.uniform(start, end, n),
        "tau_rise": rng.uniform(5, 15, n), "tau_fall": rng.uniform(20, 50, n),
        "peak_rmag": rng.uniform(17.5, 20.5, n),
        "g_r_peak": rng.uniform(-0.2, 0.1, n), "g_r_slope": rng.uniform(0.01, 0.03, n),
        "r_i_peak": rng.uniform(-0.2, 0.1, n), "r_i_slope": rng.uniform(0.005, 0.015, n),
    })


@dataclass
class SkyModel:
    """Every simulated object, with light curves and a spatial index.

    Attributes
    ----------
    stars, galaxies, transients : Table
        Truth tables (one row per object; see :func:`make_sky`).
    fields : list of (fieldid, ra, dec)
    filters : mapping of band name to FilterConfig
    """

    stars: Table
    galaxies: Table
    transients: Table
    fields: list
    filters: dict
    asteroids: Table = field(default_factory=Table)
    _trees: dict = field(default_factory=dict, repr=False)

    # -- magnitudes -----------------------------------------------------------------------
    def star_mag(self, band: str, mjd: float, rows=slice(None)) -> np.ndarray:
        """True magnitude of stars ``rows`` in ``band`` at ``mjd`` (variables included)."""
        f: FilterConfig = self.filters[band]
        s = self.stars
        mag = s["gmag"].data[rows] + f.color_offset + f.color_slope * s["bp_rp"].data[rows]
        kind, amp = s["var_kind"].data[rows], s["var_amplitude"].data[rows]
        phase = (mjd / s["var_period"].data[rows] + s["var_phase"].data[rows]) % 1.0
        sine = 0.5 * amp * np.sin(2 * np.pi * phase)
        # Sawtooth (RR Lyrae-like): slow fading over 85 % of the cycle, fast rise.
        saw = amp * np.where(phase < 0.85, phase / 0.85 - 0.5, 0.5 - (phase - 0.85) / 0.15)
        return mag + np.where(kind == VARIABLE_SINE, sine, 0.0) + np.where(kind == VARIABLE_SAWTOOTH, saw, 0.0)

    def galaxy_mag(self, band: str, rows=slice(None)) -> np.ndarray:
        """Total magnitude of galaxies ``rows`` in ``band``."""
        g = self.galaxies
        offset = _band_offset_from_colours(self.filters[band].wavelength_um,
                                           g["g_r"].data[rows], g["r_i"].data[rows])
        return g["rmag"].data[rows] + offset

    def transient_mag(self, band: str, mjd: float, rows=slice(None)) -> np.ndarray:
        """True magnitude of transients ``rows`` at ``mjd`` (Bazin light curve; faint but finite early)."""
        t = self.transients
        t_peak, tr, tf = t["t_peak"].data[rows], t["tau_rise"].data[rows], t["tau_fall"].data[rows]
        # Bazin: f = exp(-(t-t0)/tau_fall) / (1 + exp(-(t-t0)/tau_rise)), peaking at t_peak.
        t0 = t_peak - tr * np.log(np.maximum(tf / tr - 1.0, 1e-3))

        def log_flux(time):
            return -(time - t0) / tf - np.logaddexp(0.0, -(time - t0) / tr)
        dmag = -2.5 / np.log(10) * (log_flux(mjd) - log_flux(t_peak))
        age = np.clip(mjd - t_peak, -10.0, 60.0)
        g_r = t["g_r_peak"].data[rows] + t["g_r_slope"].data[rows] * age
        r_i = t["r_i_peak"].data[rows] + t["r_i_slope"].data[rows] * age
        offset = _band_offset_from_colours(self.filters[band].wavelength_um, g_r, r_i)
        return t["peak_rmag"].data[rows] + dmag + offset

    # -- catalogue and lookup --------------------------------------------------------------
    def gaia_catalogue(self) -> Table:
        """The Gaia-like catalogue, with the Gaia archive's column names and units."""
        s = self.stars
        bp_rp = s["bp_rp"].data
        cat = Table({
            "source_id": s["source_id"].data, "ra": s["cat_ra"].data, "dec": s["cat_dec"].data,
            "ra_error": s["ra_error"].data, "dec_error": s["dec_error"].data,
            "pmra": s["cat_pmra"].data, "pmdec": s["cat_pmdec"].data,
            "pmra_error": s["pm_error"].data, "pmdec_error": s["pm_error"].data,
            "ref_epoch": np.full(len(s), GAIA_REF_EPOCH),
            "phot_g_mean_mag": s["gmag"].data,
            "phot_bp_mean_mag": s["gmag"].data + 0.4 * bp_rp,
            "phot_rp_mean_mag": s["gmag"].data - 0.6 * bp_rp,
        })
        units = {"ra": "deg", "dec": "deg", "ra_error": "mas", "dec_error": "mas", "pmra": "mas / yr",
                 "pmdec": "mas / yr", "pmra_error": "mas / yr", "pmdec_error": "mas / yr", "ref_epoch": "yr", "phot_g_mean_mag": "mag",
                 "phot_bp_mean_mag": "mag", "phot_rp_mean_mag": "mag"}
        for name, unit in units.items():
            cat[name].unit = unit
        return cat

    def ps1_catalogue(self, rng_seed: int, mag_limit: float = PS1_MAG_LIMIT) -> Table:
        """A Pan-STARRS1-like catalogue of the simulated stars and galaxies.

        Only objects of this sky are listed (stars and galaxies whose true r magnitude is
        at most ``mag_limit``), as PS1 DR2 mean objects with the PS1 point-source score:

        - ``gmag, rmag, imag, zmag``: PSF magnitudes with PS1-like errors
          (:func:`_ps1_mag_error`: 0.01 mag bright, ~0.07 at r = 22, ~0.2 at the band's
          depth); a band where the source is below 3 sigma is NaN (PS1's -999).  A
          galaxy's PSF magnitude misses the light outside the PSF: it is fainter than its
          total magnitude by :data:`_GALAXY_PSF_LOSS_MAG_PER_ARCSEC` per arcsec of
          half-light radius.
        - ``ps_score``: in the manner of Tachibana & Miller (2018), a logistic of a noisy
          latent feature whose star/galaxy separation shrinks towards faint r
          (:func:`_ps1_score_separation`), so the classes are well apart brighter than
          r = 21 and blend fainter; NaN (unclassified) where ``rmag`` is missing.
        - positions: stars at PS1's mean epoch (:data:`PS1_MEAN_EPOCH`, their proper motion
          applied back from J2016) with 10-80 mas errors; galaxies with 20-120 mas.
        - ``objid``: PS1-style, the 30" declination zone times 10^13 plus the RA in
          micro-degrees (made unique).

        The truth columns ``sim_class`` (1 star, 0 galaxy), ``sim_row`` (row of
        :attr:`stars` or :attr:`galaxies`) and ``true_rmag`` follow the catalogue's.
        """
        rng = np.random.default_rng(rng_seed)
        s, gx = self.stars, self.galaxies
        bp_rp, g_star = s["bp_rp"].data, s["gmag"].data
        star_mags = {band: g_star + off + slope * bp_rp for band, (off, slope) in _PS1_STAR_COLOUR.items()}
        gal_total = {band: gx["rmag"].data + _band_offset_from_colours(um, gx["g_r"].data, gx["r_i"].data)
                     for band, um in _PS1_BAND_UM.items()}
        loss = _GALAXY_PSF_LOSS_MAG_PER_ARCSEC * gx["r_half_arcsec"].data
        star_ra, star_dec = propagate_positions(s["ra"].data, s["dec"].data, s["pmra"].data, s["pmdec"].data,
                                                PS1_MEAN_EPOCH - GAIA_REF_EPOCH)
        is_star = np.concatenate([np.ones(len(s), bool), np.zeros(len(gx), bool)])
        true_r = np.concatenate([star_mags["rmag"], gal_total["rmag"]])
        keep = true_r <= mag_limit
        ra = np.concatenate([star_ra, gx["ra"].data])
        dec = np.concatenate([star_dec, gx["dec"].data])
        pos_err = np.where(is_star, np.interp(true_r, [14.0, 21.0, 23.0], [0.01, 0.05, 0.08]),
                           rng.uniform(0.02, 0.12, true_r.size)) / 3600.0
        ra = (ra + rng.normal(0.0, pos_err) / np.cos(np.deg2rad(dec))) % 360.0
        dec = np.clip(dec + rng.normal(0.0, pos_err), -90.0, 90.0)
        cat = Table()
        cat["objid"] = np.zeros(true_r.size, dtype=np.int64)
        cat["ra"], cat["dec"] = ra, dec
        for band in _PS1_BAND_UM:
            true_psf = np.concatenate([star_mags[band], gal_total[band] + loss])
            sigma = _ps1_mag_error(true_psf, _PS1_DEPTH[band])
            measured = true_psf + rng.normal(0.0, sigma)
            detected = _ps1_snr(true_psf, _PS1_DEPTH[band]) + rng.normal(0.0, 1.0, true_r.size) >= 3.0
            cat[band] = np.where(detected, measured, np.nan).astype(np.float32)
        latent = _ps1_score_separation(true_r) * np.where(is_star, 1.0, -1.0) + rng.normal(0.0, 1.0, true_r.size)
        score = 1.0 / (1.0 + np.exp(-1.5 * latent))
        cat["ps_score"] = np.where(np.isfinite(cat["rmag"]), score, np.nan).astype(np.float32)
        cat["sim_class"] = is_star.astype(np.int8)
        cat["sim_row"] = np.concatenate([np.arange(len(s)), np.arange(len(gx))])
        cat["true_rmag"] = true_r
        cat = cat[keep]
        cat["objid"] = _ps1_style_ids(cat["ra"].data, cat["dec"].data)
        for name in ("ra", "dec"):
            cat[name].unit = "deg"
        for band in _PS1_BAND_UM:
            cat[band].unit = "mag"
        return cat

    def _tree(self, kind: str) -> cKDTree:
        if kind not in self._trees:
            table = getattr(self, kind)
            self._trees[kind] = cKDTree(_unit_vectors(table["ra"].data, table["dec"].data))
        return self._trees[kind]

    def in_footprint(self, kind: str, wcs: WCS, shape: tuple[int, int], margin_px: float = 50.0):
        """Rows of ``kind`` ('stars', 'galaxies', 'transients') on an image, with a margin.

        A cone around the image centre reaching past its corners is looked up in a k-d
        tree, then the candidates are kept if their pixel position (true J2016 position
        for stars; the margin covers proper motion) is within ``margin_px`` of the image.
        """
        table = getattr(self, kind)
        if len(table) == 0:
            return np.zeros(0, dtype=np.intp)
        ny, nx = shape
        px = np.array([0.5 - margin_px, nx + 0.5 + margin_px, (nx + 1) / 2])
        py = np.array([0.5 - margin_px, ny + 0.5 + margin_px, (ny + 1) / 2])
        cx, cy = np.meshgrid(px, py)
        ra, dec = wcs.all_pix2world(cx.ravel(), cy.ravel(), 1)
        vec = _unit_vectors(ra, dec)
        centre = vec[-1]
        radius = np.max(np.linalg.norm(vec - centre, axis=1)) * 1.01
        rows = np.asarray(self._tree(kind).query_ball_point(centre, radius), dtype=np.intp)
        rows.sort()
        if rows.size == 0:
            return rows
        x, y = wcs.all_world2pix(table["ra"].data[rows], table["dec"].data[rows], 1)
        inside = ((x > 0.5 - margin_px) & (x < nx + 0.5 + margin_px)
                  & (y > 0.5 - margin_px) & (y < ny + 0.5 + margin_px))
        return rows[inside]

    def __getstate__(self):
        # The k-d trees are rebuilt on demand: cheaper than pickling them to worker processes.
        state = dict(self.__dict__)
        state["_trees"] = {}
        return state


def make_sky(cfg: Config, fields: Sequence[tuple[int, float, float]], rng_seed: int,
             mjd_range: tuple[float, float] | None = None, asteroid_nights: Sequence[float] = ()) -> SkyModel:
    """Draw the simulated sky over the given fields.

    Parameters
    ----------
    cfg : Config
        ``cfg.simulation`` gives densities and magnitude ranges; ``cfg.instrument`` the bands.
    fields : sequence of (fieldid, ra_deg, dec_deg)
        Field centres; each covers 7.5 x 7.3 degrees plus a margin.
    rng_seed : int
        Seed of every random draw (stars, galaxies, transients and asteroids use independent
        streams).
    mjd_range : (float, float), optional
        Transients peak uniformly within it (the simulated nights).  Without it the sky has
        no transients.
    asteroid_nights : sequence of float, optional
        UTC MJDs (night middles) at which minor planets are placed inside each field
        (:mod:`pipeline.simulate.asteroids`); none by default.

    Returns
    -------
    SkyModel
    """
    if not fields:
        raise ValueError("make_sky needs at least one field")
    fields = [(int(f), float(ra) % 360.0, float(dec)) for f, ra, dec in fields]
    for fid, _, dec in fields:
        if not -90 <= dec <= 90:
            raise ValueError(f"field {fid}: declination {dec} out of range")
    star_ss, galaxy_ss, transient_ss = np.random.SeedSequence([rng_seed, 7301]).spawn(3)
    stars = _make_stars(np.random.default_rng(star_ss), cfg, fields)
    galaxies = _make_galaxies(np.random.default_rng(galaxy_ss), cfg, fields)
    if mjd_range is None:
        transients = _make_transients(np.random.default_rng(transient_ss),
                                      cfg.replace(simulation__transients_per_quadrant=0),
                                      fields, galaxies, (0.0, 0.0))
    else:
        transients = _make_transients(np.random.default_rng(transient_ss), cfg, fields, galaxies,
                                      (float(mjd_range[0]), float(mjd_range[1])))
    asteroids = Table()
    if len(asteroid_nights):
        from pipeline.simulate.asteroids import make_asteroids
        sim = cfg.simulation
        asteroids = make_asteroids(np.random.default_rng(np.random.SeedSequence([rng_seed, 7301, 4])), fields,
                                   list(asteroid_nights), sim.asteroids_per_deg2, sim.neos_per_field,
                                   (sim.asteroid_rmag_min, sim.asteroid_rmag_max),
                                   (FOOTPRINT_DEG[0] / 2, FOOTPRINT_DEG[1] / 2))
    return SkyModel(stars=stars, galaxies=galaxies, transients=transients, fields=fields,
                    filters=dict(cfg.instrument.filters), asteroids=asteroids)
