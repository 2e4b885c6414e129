"""Point sources injected into simulated images with the simulator's own PSF (fakes).

Completeness is measured as ZTF measures it: point sources of known position and flux are
added to a science image, rendered exactly as the simulator renders stars (the same
pixel-integrated elliptical Moffat at that position of the quadrant) with their own photon
noise, and the pipeline is asked to find them.
"""
from __future__ import annotations

import numpy as np
from astropy.table import Table

from pipeline.core.config import Config
from pipeline.core.focalplane import ccd_qid_of_rcid, quadrant_geometry
from pipeline.simulate.exposure import ExposureSpec
from pipeline.simulate.render import _moffat_alpha2, _PsfField, _render_profiles, image_zeropoint, sky_electrons_per_pixel

__all__ = ["true_psf_field", "inject_point_sources"]


def true_psf_field(spec: ExposureSpec, rcid: int, cfg: Config) -> _PsfField:
    """The PSF field the renderer used for quadrant ``rcid`` of ``spec``.

    The renderer draws its PSF field first from the quadrant's random stream, so the same
    stream re-creates it.
    """
    geom = quadrant_geometry(cfg.instrument, *ccd_qid_of_rcid(rcid))
    return _PsfField(spec, geom, cfg, np.random.default_rng(np.random.SeedSequence([spec.seed, rcid])))


def inject_point_sources(data: np.ndarray, spec: ExposureSpec, rcid: int, cfg: Config, x, y, mag,
                         seed: int = 0) -> tuple[np.ndarray, Table]:
    """Add point sources with photon noise to a simulated quadrant image.

    Parameters
    ----------
    data : ndarray
        The quadrant's image (ADU), e.g. ``simulate_quadrant(...)[0].data``; not modified.
    spec, rcid, cfg
        The exposure, quadrant and configuration the image was simulated with.
    x, y : array_like
        1-based pixel positions.
    mag : array_like
        Magnitudes in the exposure's band (the image's true zero point converts them).
    seed : int
        Seed of the sources' photon noise.

    Returns
    -------
    data : ndarray
        A new float32 image with the sources.
    injected : Table
        x, y, mag, flux_adu (expected total flux) per source.
    """
    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    mag = np.broadcast_to(np.asarray(mag, dtype=np.float64), x.shape)
    inst = cfg.instrument
    zp = image_zeropoint(spec, cfg)
    flux_e = 10 ** (-0.4 * (mag - zp)) * inst.gain
    psf = true_psf_field(spec, rcid, cfg)
    shape = np.shape(data)
    flat = np.zeros(shape[0] * shape[1], dtype=np.float32)
    sky_sigma_e = np.sqrt(sky_electrons_per_pixel(spec, cfg) + inst.read_noise ** 2)
    alpha2 = _moffat_alpha2(psf.fwhm2_matrix(x, y), psf.beta)
    _render_profiles(flat, shape, x, y, flux_e, alpha2, psf.beta, sky_sigma_e)
    light = flat.reshape(shape)
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, rcid, seed, 4417]))
    # The sources' own photon noise (the sky's is already in the image).
    light += np.sqrt(np.maximum(light, 0)) * rng.standard_normal(shape, dtype=np.float32)
    out = np.asarray(data, dtype=np.float32) + light / np.float32(inst.gain)
    return out, Table({"x": x, "y": y, "mag": mag, "flux_adu": flux_e / inst.gain})
