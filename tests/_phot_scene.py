"""A simulated quadrant (default densities, 2048 x 2048 pixels) with its extraction,
background, PSF and truth, shared by the PSF, photometry and calibration tests.

The simulator's PSF varies by ``psf_variation`` corner to corner whatever the quadrant's
size, so the smaller image keeps the spatial variation the tests check.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS
from scipy.spatial import cKDTree

from pipeline.core.config import Config, load_config
from pipeline.measure.extract import extract_sources
from pipeline.core.focalplane import ccd_qid_of_rcid, quadrant_geometry
from pipeline.measure.photometry import estimate_background
from pipeline.measure.psf import PSFModel, build_psf
from pipeline.simulate.plan import Field, exposure_at_airmass
from pipeline.simulate.render import _PsfField
from pipeline.simulate.run import simulate_quadrant
from pipeline.simulate.sky import make_sky

NPIX = 2048
RCID = 21
FIELD = Field(600, 150.0, 33.0)


@dataclass(frozen=True)
class Scene:
    cfg: Config
    data: np.ndarray
    mask: np.ndarray
    truth: Table
    truth_header: object
    catalog: Table
    background: np.ndarray
    rms: np.ndarray
    psf: PSFModel
    true_psf: _PsfField
    wcs: WCS
    gaia: Table


@functools.lru_cache(maxsize=2)
def scene(seeing_arcsec: float = 2.0) -> Scene:
    cfg = load_config(overrides={"instrument": {"quadrant_nx": NPIX, "quadrant_ny": NPIX}})
    spec = exposure_at_airmass(cfg, FIELD, 1.2, seeing_fwhm_arcsec=seeing_arcsec)
    sky = make_sky(cfg, [(FIELD.fieldid, FIELD.ra, FIELD.dec)], rng_seed=11)
    quadrant, _ = simulate_quadrant(spec, RCID, sky, cfg)
    inst = cfg.instrument
    extraction = extract_sources(quadrant.data, quadrant.mask, inst.gain, inst.saturate_adu,
                                 read_noise=inst.read_noise)
    background, rms = estimate_background(quadrant.data, quadrant.mask)
    psf = build_psf(quadrant.data, extraction.catalog, background, rms, inst.gain, quadrant.mask)
    geom = quadrant_geometry(inst, *ccd_qid_of_rcid(RCID))
    # The renderer draws its PSF field first from this stream: the same field, re-created.
    true_psf = _PsfField(spec, geom, cfg, np.random.default_rng(np.random.SeedSequence([spec.seed, RCID])))
    return Scene(cfg, quadrant.data, quadrant.mask, quadrant.truth, quadrant.truth_header,
                 extraction.catalog, background, rms, psf, true_psf, WCS(quadrant.truth_header),
                 sky.gaia_catalogue())


def isolated_stars(truth: Table, edge: float = 20.0, radius: float = 15.0,
                   npix: int = NPIX) -> np.ndarray:
    """Rows of unsaturated, non-variable stars with no object brighter than 0.1 % of their
    flux within ``radius`` px and none at all within 6 px."""
    x, y = np.asarray(truth["x"]), np.asarray(truth["y"])
    flux = np.asarray(truth["flux_adu"])
    tree = cKDTree(np.column_stack([x, y]))
    rows = []
    candidates = ((np.asarray(truth["kind"]) == "star") & ~np.asarray(truth["saturated"])
                  & ~np.asarray(truth["variable"]) & (x > edge) & (x < npix - edge)
                  & (y > edge) & (y < npix - edge))
    for i in np.flatnonzero(candidates):
        near = [j for j in tree.query_ball_point((x[i], y[i]), radius) if j != i]
        if all(flux[j] < 1e-3 * flux[i] and np.hypot(x[j] - x[i], y[j] - y[i]) > 6 for j in near):
            rows.append(i)
    return np.asarray(rows, dtype=int)


def true_moffat_stamp(true_psf: _PsfField, x: float, y: float, halfsize: int,
                      dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """The simulator's PSF at (x, y) as rendered (pixel-integrated), centred at (dx, dy)."""
    from pipeline.simulate.render import true_psf_stamp
    return true_psf_stamp(true_psf, x, y, halfsize, dx, dy)
