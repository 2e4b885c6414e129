"""Fitting the focal-plane distortion prior from matched stars of many exposures (pure functions).

The model
---------
Each Gaia star is turned into standard coordinates ``s = (xi, eta)`` (degrees) by the
idealized TAN projection with 1 degree per "pixel" about its exposure's commanded pointing,
made in the camera frame (:mod:`priors.frames`: observed hour angle and declination, so the
precession rotation since J2000, differential aberration and refraction, which all differ
between exposures, are taken out exactly).  Its detection, at quadrant pixel ``p`` of
channel ``c``, sits at global focal-plane pixel ``X = layout_c(p) + d_c + S_c (p - centre_c)``,
where ``layout_c`` is the nominal layout (:mod:`pipeline.core.focalplane`) and ``d_c``, ``S_c``
the channel's placement (an offset and a small linear term).  For star ``j`` of exposure ``e``::

    s_j = o_e + M_e X_j + a_c + P(X_j)

* ``o_e`` -- the exposure's offset: its pointing error.  The next pass projects the stars
  about the boresight so found, because north at the commanded pointing and at the
  boresight differ by the meridian convergence (~1e-4 rad for 20 arcsec);
* ``M_e`` -- the exposure's linear term: its position-angle error (and anything else
  linear that differs between exposures);
* ``a_c`` -- the channel's offset from its placement so far (added to ``d_c`` in pixels);
* ``P`` -- the focal-plane polynomial, degree 1 to ``degree`` (3: the optics are cubic),
  without a constant: the boresight is the origin of the layout, so the offsets are the
  pointing errors themselves rather than the pointing errors plus an arbitrary constant.

Gauges: ``sum_e M_e = 0`` (the prior is the mean exposure) and, for the channel placements,
zero mean offset and linear term over the channels (the mosaic as a whole defines the
boresight and the scale; a common shift of every channel cannot be told from the pointing
errors, a common linear term from ``P``).

The fit alternates two ordinary least-squares steps (statsmodels OLS), three times:

1. one OLS of all stars for ``o_e``, ``M_e``, ``a_c`` and ``P`` (both axes at once), then a
   refit without the stars beyond ``clip_sigma`` robust sigmas;
2. per channel, an OLS of the residuals on ``p - centre_c``: the channel's linear term in
   the tangent plane.  Both channel terms are turned into pixels with ``P``'s linear part
   and added to the channel's placement.  (In the joint fit, per-channel linear terms could
   mimic the polynomial's slope on each channel, leaving ``P`` to be found from curvature
   within single quadrants alone; fitting them to the residuals keeps ``P`` well determined.)

This is the design's method made well posed: the per-channel terms give each channel's
CRPIX (where ``X = 0`` falls in its pixels), the global polynomial gives each quadrant's
centre on the sky, a linear fit over each quadrant gives its CD matrix, and the remaining
curvature becomes the quadrant's TPV terms about the common boresight (SCAMP's convention).
Quadrants with fewer than ``min_stars_per_quadrant`` stars are left out of the fit and keep
the nominal layout (placement ``"layout"``), their distortion coming from ``P``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
from astropy.table import Table

from pipeline.core.config import Config, PriorFitSettings
from pipeline.core.focalplane import QuadrantGeometry, all_quadrants
from pipeline.formats.tpv import fit_tpv_wcs, tangent_to_sky

from priors.frames import CameraFrame, rotation_matrix
from priors.matches import validate_matches
from priors.model import (PLACEMENT_FITTED, PLACEMENT_LAYOUT, Prior, PriorError, PriorProvenance,
                    QuadrantPrior)

__all__ = ["PriorFitSettings", "FocalPlanePolynomial", "fit_prior", "quadrant_prior", "exposure_frames",
           "camera_tangent_coordinates"]

log = logging.getLogger("skydiff.priors")

# Global pixel coordinates are divided by this before taking powers, to keep the
# least-squares problems well conditioned (the focal plane spans about +-14000 pixels).
_PIXEL_NORM = 1.0e4


@dataclass(frozen=True)
class FocalPlanePolynomial:
    """``P(X, Y)``: global focal-plane pixels to standard coordinates (deg), no constant term."""

    degree: int
    coefficients: np.ndarray       # (n_terms, 2): xi and eta, on normalised coordinates

    @staticmethod
    def design(X, Y, degree: int) -> np.ndarray:
        u, v = np.asarray(X, float) / _PIXEL_NORM, np.asarray(Y, float) / _PIXEL_NORM
        return np.stack([u ** (d - j) * v ** j for d in range(1, degree + 1) for j in range(d + 1)], axis=-1)

    def __call__(self, X, Y) -> tuple[np.ndarray, np.ndarray]:
        s = self.design(X, Y, self.degree) @ self.coefficients
        return s[..., 0], s[..., 1]

    @property
    def linear(self) -> np.ndarray:
        """The linear part (2, 2) in deg per pixel: the mosaic's mean CD matrix."""
        return self.coefficients[:2].T / _PIXEL_NORM


@dataclass
class _Placement:
    """A channel's offset (pixels) and linear term relative to the nominal layout."""

    offset: np.ndarray
    linear: np.ndarray

    @classmethod
    def nominal(cls) -> "_Placement":
        return cls(np.zeros(2), np.zeros((2, 2)))

    def to_global(self, geom: QuadrantGeometry, x, y):
        X, Y = geom.to_global(x, y)
        u, v = np.asarray(x, float) - 0.5 * (geom.nx + 1), np.asarray(y, float) - 0.5 * (geom.ny + 1)
        return (X + self.offset[0] + self.linear[0, 0] * u + self.linear[0, 1] * v,
                Y + self.offset[1] + self.linear[1, 0] * u + self.linear[1, 1] * v)

    def boresight_pixel(self, geom: QuadrantGeometry) -> tuple[float, float]:
        """The 1-based quadrant pixel that lands on the focal-plane origin."""
        centre = np.array([0.5 * (geom.nx + 1), 0.5 * (geom.ny + 1)])
        centre_global = np.array(geom.to_global(*centre)) + self.offset
        shift = np.linalg.solve(np.eye(2) + self.linear, -centre_global)
        return float(centre[0] + shift[0]), float(centre[1] + shift[1])


def exposure_frames(matches: Table, cfg: Config, default_filter: str = "ZTF_r") -> dict[int, CameraFrame]:
    """The camera frame of every exposure of a validated match table, by expid."""
    frames = {}
    for group in matches.group_by("expid").groups:
        row = group[0]
        band = str(row["filter"]) if "filter" in group.colnames else default_filter
        if band not in cfg.instrument.filters:
            raise PriorError(f"exposure {row['expid']}", f"unknown filter {band!r}")
        frames[int(row["expid"])] = CameraFrame(
            obsmjd=float(row["obsmjd"]), site=cfg.site,
            pressure_hpa=float(row["pressure"]) if "pressure" in group.colnames else cfg.site.pressure_hpa,
            temperature_c=float(row["temperature"]) if "temperature" in group.colnames else cfg.site.temperature_c,
            wavelength_um=cfg.instrument.filters[band].wavelength_um)
    return frames


def camera_tangent_coordinates(matches: Table, frames: dict[int, CameraFrame],
                               centre_offsets: dict[int, tuple[float, float]] | None = None) -> np.ndarray:
    """Camera-frame standard coordinates (N, 2; deg) of every match.

    About each exposure's commanded pointing, or about the point ``centre_offsets[expid]``
    (deg) from it.
    """
    s = np.empty((len(matches), 2))
    expid = np.asarray(matches["expid"])
    for e, frame in frames.items():
        rows = np.flatnonzero(expid == e)
        first = rows[0]
        offset = (0.0, 0.0) if centre_offsets is None else centre_offsets[e]
        s[rows] = np.column_stack(frame.to_tangent(matches["ra"][rows], matches["dec"][rows],
                                                   float(matches["telra"][first]),
                                                   float(matches["teldec"][first]), offset))
    return s


def _ols(target: np.ndarray, design: np.ndarray) -> np.ndarray:
    """OLS coefficients (k, 2) for both axes at once."""
    # Imported here: statsmodels takes ~1.4 s to import, which every `skydiff` process paid.
    from statsmodels.regression.linear_model import OLS
    return np.asarray(OLS(target, design, hasconst=False).fit(method="pinv").params)


@dataclass
class _JointSolution:
    polynomial: FocalPlanePolynomial
    offsets: np.ndarray            # (E, 2) deg
    linear: np.ndarray             # (E, 2, 2) deg per pixel
    channel_offsets: np.ndarray    # (C, 2) deg
    residuals: np.ndarray          # (N, 2) deg, NaN where clipped
    kept: np.ndarray               # (N,) bool


def _sum_to_zero(index: np.ndarray, n: int) -> np.ndarray:
    """Sum-to-zero coding (N, n - 1) of a categorical index 0..n-1."""
    onehot = np.eye(n)[index]
    return onehot[:, :-1] - onehot[:, -1:]


def _fit_joint(s, X, Y, exposure: np.ndarray, n_exp: int, channel: np.ndarray, n_chan: int, degree: int,
               clip_sigma: float) -> _JointSolution:
    """Step 1: per-exposure offsets and linear terms, per-channel offsets, the focal-plane polynomial."""
    u, v = X / _PIXEL_NORM, Y / _PIXEL_NORM
    contrast = _sum_to_zero(exposure, n_exp)
    design = np.hstack([np.eye(n_exp)[exposure], contrast * u[:, None], contrast * v[:, None],
                        _sum_to_zero(channel, n_chan), FocalPlanePolynomial.design(X, Y, degree)])
    kept = np.ones(len(s), bool)
    for attempt in range(2):
        params = _ols(s[kept], design[kept])
        residuals = s - design @ params
        if attempt == 0:
            sigma = 1.4826 * np.median(np.abs(residuals - np.median(residuals, axis=0)), axis=0)
            kept = np.all(np.abs(residuals) <= clip_sigma * np.maximum(sigma, 1e-12), axis=1)
    offsets, lin_u, lin_v, chan, poly = np.split(
        params, np.cumsum([n_exp, n_exp - 1, n_exp - 1, n_chan - 1]))
    lin_u = np.vstack([lin_u, -lin_u.sum(axis=0)])
    lin_v = np.vstack([lin_v, -lin_v.sum(axis=0)])
    linear = np.stack([lin_u, lin_v], axis=-1) / _PIXEL_NORM      # (E, axis, X|Y)
    residuals[~kept] = np.nan
    return _JointSolution(FocalPlanePolynomial(degree, poly), offsets, linear,
                          np.vstack([chan, -chan.sum(axis=0)]), residuals, kept)


def _channel_linear_terms(residuals, x, y, channel, geoms) -> np.ndarray:
    """Step 2: per-channel linear terms (C, 2, 2; deg/px) of the residuals, mean over channels removed."""
    linear = np.zeros((len(geoms), 2, 2))
    for c, geom in enumerate(geoms):
        rows = (channel == c) & np.isfinite(residuals[:, 0])
        design = np.column_stack([x[rows] - 0.5 * (geom.nx + 1), y[rows] - 0.5 * (geom.ny + 1)])
        linear[c] = _ols(residuals[rows], design).T
    return linear - linear.mean(axis=0)


def quadrant_prior(geom: QuadrantGeometry, placement: _Placement, polynomial: FocalPlanePolynomial,
                   grid: int, n_stars: int, kind: str, rms_arcsec: float) -> QuadrantPrior:
    """Turn the focal-plane model into one quadrant's CRPIX, CD and TPV terms (camera frame)."""
    gx = np.linspace(0.5, geom.nx + 0.5, grid)
    gy = np.linspace(0.5, geom.ny + 0.5, grid)
    x, y = (a.ravel() for a in np.meshgrid(gx, gy))
    xi, eta = polynomial(*placement.to_global(geom, x, y))
    crpix = placement.boresight_pixel(geom)
    offsets = np.column_stack([x - crpix[0], y - crpix[1], np.ones_like(x)])
    cd = np.linalg.lstsq(offsets, np.column_stack([xi, eta]), rcond=None)[0][:2].T
    # fit_tpv_wcs works from sky positions: project the standard coordinates about (0, 0).
    ra, dec = tangent_to_sky(xi, eta, 0.0, 0.0)
    _, header, residual_mas = fit_tpv_wcs(x, y, ra, dec, (0.0, 0.0), crpix, cd,
                                          degree=polynomial.degree, shape=(geom.ny, geom.nx))
    if residual_mas.max() > 1.0:
        raise PriorError(f"rcid {geom.rcid}", f"TPV terms reproduce the focal-plane model only to "
                                               f"{residual_mas.max():.1f} mas")
    pv = [{int(k.split("_")[1]): float(header[k]) for k in header if k.startswith(f"PV{a}_")}
          for a in (1, 2)]
    return QuadrantPrior(rcid=geom.rcid, shape=(geom.ny, geom.nx), crpix=crpix, cd=cd, pv1=pv[0],
                         pv2=pv[1], n_stars=n_stars, placement=kind, rms_arcsec=rms_arcsec)


def _select(matches: Table, settings: PriorFitSettings, source: str):
    table = validate_matches(matches, source)
    low = table[table["airmass"] <= settings.max_airmass]
    if len(low) == 0:
        raise PriorError(source, f"no exposure at airmass <= {settings.max_airmass} "
                                 f"(lowest is {np.min(table['airmass']):.2f})")
    rcids, counts = np.unique(low["rcid"], return_counts=True)
    sparse = {int(r): int(n) for r, n in zip(rcids, counts) if n < settings.min_stars_per_quadrant}
    if sparse:
        log.warning("%s: quadrants with fewer than %d stars left to the nominal layout: %s", source,
                    settings.min_stars_per_quadrant, ", ".join(f"rcid {r} ({n})" for r, n in sparse.items()))
    used = low[~np.isin(low["rcid"], list(sparse))]
    if len(used) == 0:
        raise PriorError(source, f"no quadrant has {settings.min_stars_per_quadrant} or more stars")
    n_params = 3 * len(np.unique(used["expid"])) + 3 * len(rcids) + 10
    if len(used) < 2 * n_params:
        raise PriorError(source, f"{len(used)} stars cannot constrain a fit of {n_params} parameters per axis")
    return used, sparse


def fit_prior(matches: Table, cfg: Config, settings: PriorFitSettings | None = None,
              source: str = "<matches>") -> Prior:
    """Fit the distortion prior (see the module docstring for the model).

    Parameters
    ----------
    matches : Table
        Matched stars (:mod:`priors.matches`), any airmass: rows above ``max_airmass`` are dropped.
    cfg : Config
        The camera layout, the site and the filters' wavelengths.
    settings : PriorFitSettings, optional
        Default: ``cfg.priors`` (the ``[priors]`` section).
    source : str
        Named in error messages.

    Raises
    ------
    PriorError
        No usable star, exposure or quadrant, or too few stars for the parameters.
    """
    settings = cfg.priors if settings is None else settings
    table, _ = _select(matches, settings, source)
    frames = exposure_frames(table, cfg, settings.default_filter)
    geoms_by_rcid = {g.rcid: g for g in all_quadrants(cfg.instrument)}
    expids, exposure = np.unique(table["expid"], return_inverse=True)
    rcids, channel = np.unique(table["rcid"], return_inverse=True)
    geoms = [geoms_by_rcid[int(r)] for r in rcids]
    x, y = np.asarray(table["x"]), np.asarray(table["y"])
    pointing = {int(e): (float(table["telra"][exposure == i][0]), float(table["teldec"][exposure == i][0]))
                for i, e in enumerate(expids)}
    centre_offsets = {int(e): (0.0, 0.0) for e in expids}

    placements = [_Placement.nominal() for _ in rcids]
    X, Y = np.empty(len(table)), np.empty(len(table))
    for _ in range(settings.passes):
        # Each pass projects about the boresight found by the previous one (see CameraFrame.to_tangent).
        s = camera_tangent_coordinates(table, frames, centre_offsets)
        for c, (geom, placement) in enumerate(zip(geoms, placements)):
            rows = channel == c
            X[rows], Y[rows] = placement.to_global(geom, x[rows], y[rows])
        joint = _fit_joint(s, X, Y, exposure, len(expids), channel, len(rcids), settings.degree,
                           settings.clip_sigma)
        to_pixels = np.linalg.inv(joint.polynomial.linear)
        chan_linear = _channel_linear_terms(joint.residuals, x, y, channel, geoms)
        for c, placement in enumerate(placements):
            placement.offset = placement.offset + to_pixels @ joint.channel_offsets[c]
            placement.linear = placement.linear + to_pixels @ chan_linear[c]
        for i, e in enumerate(expids):
            centre_offsets[int(e)] = frames[int(e)].centre_offset(*joint.offsets[i], *pointing[int(e)],
                                                                 centre_offsets[int(e)])

    residual_arcsec = joint.residuals * 3600.0
    quadrants = {}
    for geom in all_quadrants(cfg.instrument):
        if geom.rcid in rcids:
            c = int(np.searchsorted(rcids, geom.rcid))
            rows = (channel == c) & joint.kept
            rms = float(np.sqrt(np.mean(residual_arcsec[rows] ** 2)))
            quadrants[geom.rcid] = quadrant_prior(geom, placements[c], joint.polynomial, settings.grid,
                                                  int(rows.sum()), PLACEMENT_FITTED, rms)
        else:
            quadrants[geom.rcid] = quadrant_prior(geom, _Placement.nominal(), joint.polynomial,
                                                  settings.grid, 0, PLACEMENT_LAYOUT, float("nan"))

    exposures = _exposure_table(table, expids, exposure, joint, frames, centre_offsets)
    site = cfg.site
    provenance = PriorProvenance(
        n_exposures=len(expids), n_stars=int(joint.kept.sum()),
        built=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        airmass_min=float(np.min(exposures["airmass"])), airmass_max=float(np.max(exposures["airmass"])),
        airmass_mean=float(np.mean(exposures["airmass"])),
        mjd_min=float(np.min(exposures["obsmjd"])), mjd_max=float(np.max(exposures["obsmjd"])),
        rms_arcsec=float(np.sqrt(np.nanmean(residual_arcsec ** 2))), degree=settings.degree,
        n_rejected=int((~joint.kept).sum()), site_longitude_deg=site.longitude_deg,
        site_latitude_deg=site.latitude_deg, site_height_m=site.height_m,
        relative_humidity=site.relative_humidity, pressure_hpa=site.pressure_hpa,
        temperature_c=site.temperature_c,
        wavelength_um=cfg.instrument.filters[settings.default_filter].wavelength_um)
    log.info("prior from %d exposures, %d stars (%d clipped): rms %.3f arcsec per axis",
             provenance.n_exposures, provenance.n_stars, provenance.n_rejected, provenance.rms_arcsec)
    return Prior(quadrants=quadrants, provenance=provenance, exposures=exposures, source=source)


def _exposure_table(table: Table, expids, exposure, joint: _JointSolution, frames, centre_offsets) -> Table:
    first = np.array([np.flatnonzero(exposure == e)[0] for e in range(len(expids))])
    out = Table({name: np.asarray(table[name])[first]
                 for name in ("expid", "telra", "teldec", "obsmjd", "airmass")})
    out["n_stars"] = np.bincount(exposure[joint.kept], minlength=len(expids))
    offsets = [rotation_matrix(frames[int(row["expid"])].rotation_deg(row["telra"], row["teldec"]))
               @ centre_offsets[int(row["expid"])] * 3600.0 for row in out]
    out["offset_east_arcsec"], out["offset_north_arcsec"] = np.array(offsets).T
    out["lin"] = joint.linear @ np.linalg.inv(joint.polynomial.linear)
    out["rms_arcsec"] = [np.sqrt(np.nanmean((joint.residuals[exposure == e] * 3600.0) ** 2))
                         for e in range(len(expids))]
    return out
