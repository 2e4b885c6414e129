"""Simulated science/reference pairs with truth, for the subtraction's tests, benchmark and
real-bogus training.

A pair is what the survey makes: a reference coadded (:func:`pipeline.reference.build.build_reference`)
from exposures of one field and quadrant taken a season earlier (so this season's
transients are absent), and a science exposure of the same quadrant with its own pointing
error (another pixel grid), seeing and PSF variation, into which point sources of known
flux are injected with the simulator's own PSF.  The science image's WCS is its true WCS
(the astrometry stage's job is tested elsewhere), optionally offset to mimic a
misregistration; artefacts the simulator does not mask (cosmic rays, and here optionally
unmasked hot pixels, unmasked bad-column segments and a glow along the readout edge) are
left for the subtraction and the real-bogus models to deal with.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from astropy.table import Table
import astropy.units as u
from astropy.time import Time
from astropy.wcs import WCS

from catalogs import propagate_to_epoch
from pipeline.core.config import Config
from pipeline.core.image import QuadrantImage, quadrant_image
from pipeline.reference.files import ReferenceImage
from pipeline.simulate.inject import inject_point_sources, true_psf_field
from pipeline.simulate.plan import DEFAULT_FIELDS, Field, exposure_at_airmass
from pipeline.simulate.render import image_zeropoint, sky_electrons_per_pixel, true_psf_stamp
from pipeline.simulate.run import simulate_quadrant
from pipeline.simulate.sky import SkyModel, make_sky

__all__ = ["PairOptions", "SimulatedPair", "pair_sky", "simulate_reference_frames", "simulated_reference",
           "simulate_science", "simulated_pair", "real_positions", "with_true_wcs", "read_with_true_wcs",
           "coadd_true_mag"]


@dataclass(frozen=True)
class PairOptions:
    """What :func:`simulated_pair` makes.

    Seeing values are FWHM in arcsec at zenith (the simulator scales them by airmass**0.6).
    ``snr_range`` bounds the injected sources' S/N on the science image's sky noise alone.
    """

    rcid: int = 21
    field: Field = DEFAULT_FIELDS[0]
    seed: int = 20260315
    science_night: str = "2026-03-15"
    science_seeing: float = 2.0
    science_airmass: float = 1.2
    reference_seeing: tuple[float, ...] = (1.5, 1.6, 1.7, 1.8, 1.9)
    reference_first_night: str = "2025-11-20"   # a season earlier: no current transients
    n_inject: int = 80
    snr_range: tuple[float, float] = (4.0, 40.0)
    edge_margin_px: float = 40.0
    misregister_px: tuple[float, float] = (0.0, 0.0)
    hot_pixels: int = 0
    bad_columns: int = 0                # unmasked hot or dead column segments on the science image
    edge_glow_sigma: float = 0.0        # peak of a glow along the readout edges, in sky-noise sigmas
    transients_window_days: float = 40.0


@dataclass(frozen=True)
class SimulatedPair:
    """A science image with truth and the frames (or the reference) it is subtracted from."""

    cfg: Config
    science: QuadrantImage          # wcs: the (possibly misregistered) solution
    true_wcs: WCS
    truth: Table                    # the simulator's truth of the science quadrant
    injected: Table                 # x, y (1-based), mag, flux_adu, snr_sky, flux_ref (ref ADU)
    hot_pixels: Table               # x, y (1-based) of unmasked hot pixels added
    zeropoint: float                # true zero point of the science image
    gaia: Table                     # at the science epoch
    sky: SkyModel
    spec: object
    reference_frames: list[QuadrantImage] = field(default_factory=list)
    # x, y0, y1 (1-based) of unmasked bad-column segments added
    bad_columns: Table = field(default_factory=lambda: Table({"x": np.zeros(0), "y0": np.zeros(0),
                                                               "y1": np.zeros(0)}))


def _solved(quadrant, usable: bool = True, shift_px: tuple[float, float] = (0.0, 0.0)) -> QuadrantImage:
    """The simulated quadrant with its true WCS in the header, as if the astrometry had solved it."""
    return with_true_wcs(quadrant.data, quadrant.header, quadrant.mask, quadrant.truth_header, usable, shift_px)


def with_true_wcs(data: np.ndarray, header, mask: np.ndarray | None, truth_header, usable: bool = True,
                  shift_px: tuple[float, float] = (0.0, 0.0)) -> QuadrantImage:
    """A simulated quadrant whose header carries the true WCS (of its truth file's primary
    header), shifted by ``shift_px``, flagged as solved as if by the astrometry stage."""
    header = header.copy()
    for key in [k for k in header if k.startswith(("CTYPE", "CRPIX", "CRVAL", "CD", "PV", "CUNIT",
                                                     "A_", "B_", "AP_", "BP_"))]:
        del header[key]
    for card in truth_header.cards:
        if card.keyword.startswith(("CTYPE", "CRPIX", "CRVAL", "CD", "PV", "CUNIT", "RADESYS", "EQUINOX")):
            header[card.keyword] = (card.value, card.comment)
    header["CRPIX1"] = header["CRPIX1"] + shift_px[0]
    header["CRPIX2"] = header["CRPIX2"] + shift_px[1]
    header["ASTRUSE"] = (usable, "astrometry usable")
    header["ASTRNMAT"] = (1000, "stars matched to Gaia")
    header["ASTRRMSA"] = (40.0, "[mas] Gaia-match RMS, RA")
    header["ASTRRMSD"] = (40.0, "[mas] Gaia-match RMS, Dec")
    return quadrant_image(data, header, mask, source="<simulated>")


def read_with_true_wcs(image_path, truth_path) -> QuadrantImage:
    """A simulated quadrant file (:func:`pipeline.simulate.run.simulate_run`'s) with the true WCS
    of its truth file, as if the astrometry stage had solved it."""
    from astropy.io import fits
    from pipeline.core.image import read_quadrant

    raw = read_quadrant(image_path)
    return with_true_wcs(raw.data, raw.header, raw.mask, fits.getheader(truth_path, 0))


def pair_sky(cfg: Config, options: PairOptions) -> SkyModel:
    mjd = Time(options.science_night).mjd
    f = options.field
    return make_sky(cfg, [(f.fieldid, f.ra, f.dec)], options.seed,
                    mjd_range=(mjd - options.transients_window_days, mjd + 0.5))


def simulate_reference_frames(cfg: Config, options: PairOptions, sky: SkyModel | None = None
                              ) -> list[QuadrantImage]:
    """Solved reference-season frames of the pair's quadrant, one per ``reference_seeing``."""
    sky = pair_sky(cfg, options) if sky is None else sky
    start = Time(options.reference_first_night)
    frames = []
    for k, seeing in enumerate(options.reference_seeing):
        night = (start + 3 * k * u.day).strftime("%Y-%m-%d")
        spec = exposure_at_airmass(cfg, options.field, 1.1 + 0.05 * k, night=night, seed=options.seed + k,
                                   seeing_fwhm_arcsec=seeing)
        quadrant, _ = simulate_quadrant(spec, options.rcid, sky, cfg)
        frames.append(_solved(quadrant))
    return frames


def simulated_reference(cfg: Config, options: PairOptions, sky: SkyModel | None = None,
                        frames: list[QuadrantImage] | None = None) -> ReferenceImage:
    """The pair's reference: ``frames`` (default: :func:`simulate_reference_frames`) coadded
    against the sky's Gaia catalogue in their filter."""
    from pipeline.reference.build import build_reference

    sky = pair_sky(cfg, options) if sky is None else sky
    frames = simulate_reference_frames(cfg, options, sky) if frames is None else frames
    return build_reference(frames, sky.gaia_catalogue(), cfg.instrument.filters[frames[0].meta.filter])


def _snr_flux_adu(spec, cfg: Config, rcid: int, x, y) -> np.ndarray:
    """ADU flux error of a PSF fit on the sky noise alone at (x, y): sigma / sqrt(sum P^2)."""
    psf = true_psf_field(spec, rcid, cfg)
    inst = cfg.instrument
    sky_sigma_adu = np.sqrt(sky_electrons_per_pixel(spec, cfg) + inst.read_noise ** 2) / inst.gain
    return np.array([sky_sigma_adu / np.sqrt(np.sum(true_psf_stamp(psf, xi, yi, 12) ** 2))
                     for xi, yi in zip(x, y)])


def _add_unmasked_bad_columns(data: np.ndarray, n: int, rng) -> Table:
    """``n`` column segments (30-400 rows) made hot (+100-2000 ADU) or dead (x 0.1), not masked:
    defects that appeared after the bad-pixel mask was made.  Returns their 1-based x, y0, y1."""
    ny, nx = data.shape
    col = rng.integers(10, nx - 10, n)
    length = rng.integers(30, 400, n)
    first = np.array([rng.integers(0, ny - k) for k in length], dtype=np.int64)
    for c, y0, k in zip(col, first, length):
        if rng.random() < 0.5:
            data[y0:y0 + k, c] += np.float32(rng.uniform(100, 2000))
        else:
            data[y0:y0 + k, c] *= np.float32(0.1)
    return Table({"x": col + 1.0, "y0": first + 1.0, "y1": (first + length).astype(float)})


def _add_edge_glow(data: np.ndarray, peak_adu: float, rng) -> None:
    """Amplifier glow along the first and last columns (the readout edges), unmasked: a few
    pixels deep and patchy along the edge, too sharp for the background mesh to follow."""
    ny, nx = data.shape
    depth = rng.uniform(2.0, 6.0)
    rows = np.arange(ny)
    for side in (0, 1):
        # Patches 20-80 rows long along the edge, so the glow makes compact residuals.
        centres = rng.uniform(0, ny, 25)
        widths = rng.uniform(10, 40, 25)
        strengths = rng.uniform(0.3, 1.0, 25)
        profile = (strengths[None, :] * np.exp(-0.5 * ((rows[:, None] - centres[None, :]) / widths[None, :]) ** 2)
                   ).sum(axis=1)
        across = np.exp(-np.arange(16) / depth)
        glow = (peak_adu * profile[:, None] * across[None, :]).astype(np.float32)
        if side == 0:
            data[:, :16] += glow
        else:
            data[:, -16:] += glow[:, ::-1]


def simulate_science(cfg: Config, options: PairOptions, sky: SkyModel | None = None) -> SimulatedPair:
    """The pair's science exposure with injected point sources (no reference yet)."""
    sky = pair_sky(cfg, options) if sky is None else sky
    spec = exposure_at_airmass(cfg, options.field, options.science_airmass, night=options.science_night,
                               seed=options.seed + 1000, seeing_fwhm_arcsec=options.science_seeing)
    quadrant, _ = simulate_quadrant(spec, options.rcid, sky, cfg)
    ny, nx = quadrant.data.shape
    rng = np.random.default_rng(np.random.SeedSequence([options.seed, 77]))
    m = options.edge_margin_px
    x = rng.uniform(m, nx - m, options.n_inject)
    y = rng.uniform(m, ny - m, options.n_inject)
    flux_err = _snr_flux_adu(spec, cfg, options.rcid, x, y)
    snr = np.exp(rng.uniform(*np.log(options.snr_range), options.n_inject))
    zp = image_zeropoint(spec, cfg)
    mag = zp - 2.5 * np.log10(snr * flux_err)
    data, injected = inject_point_sources(quadrant.data, spec, options.rcid, cfg, x, y, mag,
                                          seed=options.seed)
    injected["snr_sky"] = snr
    hot = Table({"x": np.zeros(0), "y": np.zeros(0)})
    if options.hot_pixels:
        col = rng.integers(10, nx - 10, options.hot_pixels)
        row = rng.integers(10, ny - 10, options.hot_pixels)
        data[row, col] += rng.uniform(200, 3000, options.hot_pixels).astype(np.float32)
        hot = Table({"x": col + 1.0, "y": row + 1.0})
    # Their own random stream, so pairs without them are drawn exactly as before.
    defects_rng = np.random.default_rng(np.random.SeedSequence([options.seed, 78]))
    bad_columns = _add_unmasked_bad_columns(data, options.bad_columns, defects_rng)
    if options.edge_glow_sigma > 0:
        sky_sigma_adu = float(np.sqrt(sky_electrons_per_pixel(spec, cfg) + cfg.instrument.read_noise ** 2)
                              / cfg.instrument.gain)
        _add_edge_glow(data, options.edge_glow_sigma * sky_sigma_adu, defects_rng)
    solved = _solved(replace(quadrant, data=data), shift_px=options.misregister_px)
    gaia = propagate_to_epoch(sky.gaia_catalogue(), Time(spec.obsmjd + 0.5 * spec.exptime / 86400,
                                                          format="mjd", scale="utc"))
    return SimulatedPair(cfg=cfg, science=solved, true_wcs=WCS(quadrant.truth_header), truth=quadrant.truth,
                         injected=injected, hot_pixels=hot, bad_columns=bad_columns, zeropoint=zp, gaia=gaia, sky=sky, spec=spec)


def simulated_pair(cfg: Config, options: PairOptions = PairOptions()) -> SimulatedPair:
    """Science image and reference frames of :class:`PairOptions` (the reference not yet built)."""
    sky = pair_sky(cfg, options)
    pair = simulate_science(cfg, options, sky)
    return replace(pair, reference_frames=simulate_reference_frames(cfg, options, sky))


def real_positions(pair: SimulatedPair) -> np.ndarray:
    """(N, 2) 1-based positions of everything real that can differ from the reference:
    injected sources, the simulator's transients and variable stars."""
    t = pair.truth
    real = np.asarray(t["transient"], bool) | np.asarray(t["variable"], bool)
    parts = [np.column_stack([np.asarray(t["x"])[real], np.asarray(t["y"])[real]]),
             np.column_stack([np.asarray(pair.injected["x"]), np.asarray(pair.injected["y"])])]
    return np.vstack(parts)


def coadd_true_mag(frames: Table, frame_mags: dict, ids) -> np.ndarray:
    """True magnitude of objects in a reference coadd: the coadd's weighted mean of their true
    fluxes over its used frames (for variable stars, and for transients: the simulator's Bazin
    light curves are faint but finite months before their peak, so a reference season can
    hold some of a transient's light).

    Parameters
    ----------
    frames : Table
        The reference's ``frames`` (``expid``, ``weight``, ``used``).
    frame_mags : dict
        expid -> {object id: true magnitude in that frame}; an object missing from a frame
        contributes no flux there.
    ids : array_like
        Object ids (of one kind: ids are per kind in the truth tables).

    Returns
    -------
    ndarray
        Magnitudes on the frames' scale (inf where no frame holds light of the object).
    """
    used = np.asarray(frames["used"], bool)
    weights = np.asarray(frames["weight"], float)[used]
    expids = np.asarray(frames["expid"])[used]
    ids = np.asarray(ids).tolist()
    flux = np.zeros(len(ids))
    for weight, expid in zip(weights, expids.tolist()):
        mags = frame_mags.get(expid, {})
        flux += weight * np.array([10 ** (-0.4 * mags[i]) if i in mags else 0.0 for i in ids])
    flux /= weights.sum()
    with np.errstate(divide="ignore"):
        return -2.5 * np.log10(flux)
