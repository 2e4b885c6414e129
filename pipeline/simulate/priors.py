"""Matched star lists from the simulator's truth, and a prior built from them.

In production the matches come from solved images.  Here stars are drawn uniformly over
each quadrant, placed on the sky by the simulator's physical chain
(:func:`pipeline.simulate.optics.pixels_to_sky`: optics, refraction, the apparent frame),
and their detected positions get Gaussian centroid noise: the same lists a solved image
would give, without rendering or extracting an image.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
from astropy.table import Table, vstack

from pipeline.core.config import Config
from pipeline.core.focalplane import QuadrantGeometry, all_quadrants
from pipeline.simulate.exposure import ExposureSpec
from pipeline.simulate.optics import pixels_to_sky
from pipeline.simulate.plan import DEFAULT_FIELDS, Field, plan_night

from priors.fit import PriorFitSettings, fit_prior
from priors.model import Prior

__all__ = ["simulated_matches", "low_airmass_exposures", "build_prior_from_simulation"]


def _identity_geometry(cfg: Config) -> QuadrantGeometry:
    # x0 = y0 = 0.5 makes quadrant pixels equal global focal-plane pixels, so every
    # quadrant of an exposure goes through the (costly) sky transform in one call.
    return QuadrantGeometry(0, 0, 0.5, 0.5, cfg.instrument.quadrant_nx, cfg.instrument.quadrant_ny)


def simulated_matches(cfg: Config, specs: Iterable[ExposureSpec], rcids: Sequence[int] | None = None,
                      stars_per_quadrant: int = 40, centroid_noise_px: float = 0.05,
                      seed: int = 0) -> Table:
    """Truth-matched star lists (the :mod:`priors.matches` columns) for simulated exposures.

    Parameters
    ----------
    cfg : Config
    specs : iterable of ExposureSpec
    rcids : sequence of int, optional
        Quadrants to sample (default all).
    stars_per_quadrant : int
    centroid_noise_px : float
        RMS per axis of the detected positions, pixels.
    seed : int
    """
    quads = [q for q in all_quadrants(cfg.instrument) if rcids is None or q.rcid in set(rcids)]
    identity = _identity_geometry(cfg)
    tables = []
    for spec in specs:
        rng = np.random.default_rng(np.random.SeedSequence([seed, spec.expid]))
        n = stars_per_quadrant
        x = rng.uniform(0.5, cfg.instrument.quadrant_nx + 0.5, (len(quads), n))
        y = rng.uniform(0.5, cfg.instrument.quadrant_ny + 0.5, (len(quads), n))
        X, Y = zip(*(q.to_global(xq, yq) for q, xq, yq in zip(quads, x, y)))
        ra, dec = pixels_to_sky(spec, identity, np.concatenate(X), np.concatenate(Y), cfg)
        size = len(quads) * n
        tables.append(Table({
            "expid": np.full(size, spec.expid), "rcid": np.repeat([q.rcid for q in quads], n),
            "x": x.ravel() + rng.normal(0.0, centroid_noise_px, size),
            "y": y.ravel() + rng.normal(0.0, centroid_noise_px, size),
            "ra": ra, "dec": dec,
            "telra": np.full(size, spec.field_ra), "teldec": np.full(size, spec.field_dec),
            "obsmjd": np.full(size, spec.obsmjd), "airmass": np.full(size, spec.airmass),
            "filter": np.full(size, spec.filter), "pressure": np.full(size, spec.pressure_hpa),
            "temperature": np.full(size, spec.temperature_c),
        }))
    return vstack(tables)


def low_airmass_exposures(cfg: Config, fields: Sequence[Field] = DEFAULT_FIELDS, n_exposures: int = 16,
                          night: str = "2026-03-15", max_airmass: float = 1.3,
                          seed: int | None = None) -> list[ExposureSpec]:
    """``n_exposures`` exposures of ``fields`` in one night, spread in hour angle up to ``max_airmass``."""
    per_field = math.ceil(n_exposures / len(fields))
    # The plan's airmass is the field centre's at the exposure start; stay clear of the limit
    # so the mid-exposure airmass the fit cuts on is below it too.
    specs = plan_night(cfg, fields, night, epochs_per_night=per_field, max_airmass=max_airmass - 0.02,
                       seed=seed)
    keep = np.unique(np.round(np.linspace(0, len(specs) - 1, n_exposures)).astype(int))
    return [specs[i] for i in keep]


def build_prior_from_simulation(cfg: Config, fields: Sequence[Field] = DEFAULT_FIELDS, n_exposures: int = 16,
                                seed: int | None = None, rcids: Sequence[int] | None = None,
                                stars_per_quadrant: int = 40,
                                settings: PriorFitSettings | None = None) -> Prior:
    """A distortion prior for the simulated camera, fitted from truth-matched star lists.

    This is how the demo and the tests obtain a prior without running SCAMP on every
    exposure: low-airmass exposures are planned (:func:`low_airmass_exposures`), matched
    lists made from the simulator's truth (:func:`simulated_matches`), and fitted with
    :func:`priors.fit.fit_prior` exactly as production matches would be.
    """
    seed = cfg.simulation.seed if seed is None else seed
    settings = cfg.priors if settings is None else settings
    specs = low_airmass_exposures(cfg, fields, n_exposures, max_airmass=settings.max_airmass, seed=seed)
    matches = simulated_matches(cfg, specs, rcids=rcids, stars_per_quadrant=stars_per_quadrant, seed=seed)
    return fit_prior(matches, cfg, settings, source="<simulated matches>")
