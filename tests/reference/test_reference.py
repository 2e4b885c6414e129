"""Reference images: selection, stacking, photometry and noise against simulator truth,
the file format and the ``skydiff reference`` command.

The scene: six 1024 x 1024 exposures of one quadrant (simulated without cosmic rays, so
that the one injected is the only one): four good ones (seeing 1.8-2.4"), one at 3.5"
(too broad) and one whose astrometry is marked unusable.  The true WCS stands in for a
solved one.
"""
from __future__ import annotations

import functools
import math
from dataclasses import replace

import numpy as np
import pytest
from _cli import run_skydiff
from astropy.io import fits
from astropy.stats import sigma_clipped_stats
from astropy.table import Table
from scipy import ndimage
from scipy.spatial import cKDTree

from _phot_scene import isolated_stars
from pipeline.core.config import load_config
from pipeline.core.image import MASK_BITS, quadrant_image, read_quadrant, write_quadrant
from pipeline.reference.build import ReferenceConfig, build_reference, make_refid, reference_grid, select_frames
from pipeline.reference.stack import stack_frames
from pipeline.reference.files import read_reference, write_reference
from pipeline.reference.model import ReferenceError
from pipeline.simulate.plan import Field, exposure_at_airmass
from pipeline.simulate.run import simulate_quadrant
from pipeline.simulate.sky import make_sky
from pipeline.core.exits import EXIT_BAD_INPUT, EXIT_OK, EXIT_UNUSABLE
from pipeline.formats.scamp_head import apply_wcs_header

NPIX = 1024
RCID = 21
FIELD = Field(600, 150.0, 33.0)
SEEINGS = (1.8, 2.0, 2.2, 2.4, 3.5, 2.1)   # the fifth too broad, the sixth not solved
CR_FRAME, CR_VALUE, CR_LENGTH = 1, 3000.0, 4
MARGIN = ReferenceConfig().grid_margin_px      # the coadd's pixel = the grid frame's + MARGIN


@functools.lru_cache(maxsize=1)
def sky_of_scene():
    cfg = load_config(overrides={"instrument": {"quadrant_nx": NPIX, "quadrant_ny": NPIX},
                                 "simulation": {"cosmic_ray_rate": 0.0}})
    return cfg, make_sky(cfg, [(FIELD.fieldid, FIELD.ra, FIELD.dec)], rng_seed=11)


@functools.lru_cache(maxsize=1)
def scene():
    cfg, sky = sky_of_scene()
    frames, quadrants = [], []
    for k, seeing in enumerate(SEEINGS):
        spec = exposure_at_airmass(cfg, FIELD, 1.1 + 0.04 * k, expid=7000 + k, seeing_fwhm_arcsec=seeing)
        quadrant, _ = simulate_quadrant(spec, RCID, sky, cfg)
        header = apply_wcs_header(quadrant.header, quadrant.truth_header)
        header["ASTRUSE"] = k != 5
        frames.append(quadrant_image(quadrant.data, header, quadrant.mask, f"frame{k}.fits"))
        quadrants.append(quadrant)
    cr_x, cr_y = _empty_spot(quadrants[CR_FRAME].truth)
    frames[CR_FRAME].data[cr_y, cr_x:cr_x + CR_LENGTH] += CR_VALUE
    gaia = sky.gaia_catalogue()
    ref = build_reference(frames, gaia, cfg.instrument.filters["ZTF_r"])
    return cfg, frames, quadrants, gaia, ref, (cr_x, cr_y)


def _empty_spot(truth: Table) -> tuple[int, int]:
    """A 0-based pixel with no object within 20 px."""
    tree = cKDTree(np.column_stack([truth["x"] - 1, truth["y"] - 1]))
    for y in range(100, NPIX - 100, 37):
        for x in range(100, NPIX - 100, 41):
            if not tree.query_ball_point((x + 1.5, y), 20.0):
                return x, y
    raise AssertionError("no empty spot")


def _frame_row(ref, name):
    return ref.frames[list(ref.frames["path"]).index(name)]


def test_selection_records_every_rejection():
    _, _, _, _, ref, _ = scene()
    assert ref.nframes == 4
    assert list(ref.frames["used"]) == [True, True, True, True, False, False]
    assert "seeing 3." in _frame_row(ref, "frame4.fits")["reason"]
    assert "1.6 x best" in _frame_row(ref, "frame4.fits")["reason"]
    assert "astrometry not usable" in _frame_row(ref, "frame5.fits")["reason"]
    assert all(r == "" for r in ref.frames["reason"][:4])


def test_selection_cuts_in_order():
    table = Table({"path": [f"f{i}" for i in range(7)],
                   "fwhm_arcsec": [2.0, 2.1, 4.2, 3.3, 2.2, 2.3, 2.4],
                   "limmag": [21.0, 21.1, 21.0, 21.0, 20.3, 21.2, 20.9],
                   "reason": ["", "", "", "", "", "", "no WCS in the header"]})
    chosen = select_frames(table, replace(ReferenceConfig(), max_frames=3))
    reasons = list(chosen["reason"])
    assert "max_fwhm_arcsec" in reasons[2] and "1.6 x best 2.00" in reasons[3]
    assert reasons[4].startswith("limiting mag 20.30 < median 21.05 - 0.5")
    assert reasons[6] == "no WCS in the header"
    # Of f0, f1, f5 (and f4 dropped), the three deepest stay: all of them.
    assert list(chosen["used"]) == [True, True, False, False, False, True, False]
    fewer = select_frames(table, replace(ReferenceConfig(), max_frames=2, min_frames=1))
    assert list(fewer["used"]) == [False, True, False, False, False, True, False]
    assert "not among the 2 deepest" in fewer["reason"][0]


def test_zero_points_scales_and_metadata():
    _, frames, quadrants, _, ref, _ = scene()
    used = ref.frames[ref.frames["used"]]
    true_zp = np.array([q.truth_header["TRUEZP"] for q in quadrants[:4]])
    assert np.all(np.abs(used["zp"] - true_zp) < 0.01)
    np.testing.assert_allclose(used["scale"], 10 ** (0.4 * (27.0 - used["zp"])), rtol=1e-12)
    assert ref.zeropoint == 27.0 and ref.header["MAGZP"] == 27.0
    assert abs(ref.header["MAGZPFIT"] - 27.0) < 0.01       # Gaia on the coadd agrees
    mjd = np.array([f.meta.obsmjd for f in frames[:4]])
    assert ref.jdstart == pytest.approx(mjd.min() + 2400000.5) and ref.jdend == pytest.approx(mjd.max() + 2400000.5)
    # The grid is the best-seeing frame's, grown by the margin.
    assert ref.wcs.wcs.crval[0] == pytest.approx(frames[0].wcs.wcs.crval[0])
    np.testing.assert_allclose(ref.wcs.wcs.crpix, frames[0].wcs.wcs.crpix + MARGIN)
    assert ref.shape == (NPIX + 2 * MARGIN, NPIX + 2 * MARGIN) and ref.header["GRIDMARG"] == MARGIN
    assert frames[0].header["CRPIX1"] == frames[0].wcs.wcs.crpix[0]      # the frame's own untouched
    # Effective gain: W^2 / sum(w^2 s / g).
    w, s = np.asarray(used["weight"]), np.asarray(used["scale"])
    assert ref.gain == pytest.approx(w.sum() ** 2 / np.sum(w ** 2 * s / 6.2))
    assert ref.saturate == pytest.approx(np.min(s * (50000.0 - used["bkg_level"])))
    assert ref.refid == make_refid(600, RCID, 2, [7000, 7001, 7002, 7003])
    assert ref.fwhm_arcsec < used["fwhm_arcsec"].max() and ref.limiting_mag > used["limmag"].max()


def test_background_noise_matches_the_weights():
    _, _, quadrants, _, ref, _ = scene()
    used = ref.frames[ref.frames["used"]]
    full = ref.coverage == 4
    assert np.median(ref.rms[full]) == pytest.approx(1 / math.sqrt(np.sum(used["weight"])), rel=1e-5)
    truth = quadrants[0].truth
    occupied = np.zeros(ref.shape, bool)
    occupied[np.clip(np.rint(truth["y"] - 1).astype(int) + MARGIN, 0, ref.shape[0] - 1),
             np.clip(np.rint(truth["x"] - 1).astype(int) + MARGIN, 0, ref.shape[1] - 1)] = True
    sky = full & (ref.mask == 0) & ~ndimage.binary_dilation(occupied, iterations=10)
    # Sums over 6x6 boxes: resampling correlates neighbouring pixels but keeps the noise
    # at PSF scales, the one the weights predict.
    b, n = 6, min(ref.shape) // 6
    boxes = ref.data[:n * b, :n * b].reshape(n, b, n, b).sum(axis=(1, 3))
    box_sky = sky[:n * b, :n * b].reshape(n, b, n, b).all(axis=(1, 3))
    _, _, box_std = sigma_clipped_stats(boxes[box_sky], sigma=4.0)
    expected = b * np.median(ref.rms[sky])
    assert box_sky.sum() > 5000
    assert box_std / expected == pytest.approx(1.0, abs=0.1)
    _, _, pixel_std = sigma_clipped_stats(ref.data[sky], sigma=4.0)
    assert 0.8 < pixel_std / np.median(ref.rms[sky]) <= 1.02
    assert ref.header["PIXRMSF"] == pytest.approx(pixel_std / np.median(ref.rms[sky]), abs=0.03)


def test_catalogue_photometry_against_truth():
    _, _, quadrants, _, ref, _ = scene()
    truth = quadrants[0].truth          # the grid frame's pixel positions, MARGIN off the coadd's
    rows = isolated_stars(truth, npix=NPIX)
    cat = ref.catalog
    assert set(cat.colnames) >= {"id", "ra", "dec", "x", "y", "flux", "fluxerr", "mag", "magerr",
                                 "snr", "sharp", "chi", "flags"}
    distance, match = cKDTree(np.column_stack([cat["x"], cat["y"]])).query(
        np.column_stack([truth["x"][rows] + MARGIN, truth["y"][rows] + MARGIN]))
    good = (distance < 1.0) & (cat["flags"][match] == 0)
    matched, true_mag = cat[match[good]], np.asarray(truth["mag"])[rows][good]
    residual = np.asarray(matched["mag"]) - true_mag
    bright = matched["snr"] > 50
    assert bright.sum() > 50
    assert abs(np.median(residual[bright])) < 0.01
    moderate = (matched["snr"] > 20) & (matched["snr"] < 100)
    pull = residual[moderate] / matched["magerr"][moderate]
    robust_std = 1.4826 * np.median(np.abs(pull - np.median(pull)))
    assert moderate.sum() > 50 and 0.8 < robust_std < 1.3
    # ra/dec from the grid WCS
    ra, dec = ref.wcs.all_pix2world(cat["x"], cat["y"], 1)
    np.testing.assert_allclose(cat["ra"], ra)
    np.testing.assert_allclose(cat["dec"], dec)


def test_cosmic_ray_is_removed_and_nothing_else_clipped():
    _, frames, _, _, ref, (cr_x, cr_y) = scene()
    ra, dec = frames[CR_FRAME].wcs.all_pix2world(np.arange(cr_x, cr_x + CR_LENGTH), np.full(CR_LENGTH, cr_y), 0)
    x, y = ref.wcs.all_world2pix(ra, dec, 0)
    rows, cols = np.rint(y).astype(int), np.rint(x).astype(int)
    box = ref.data[rows.min() - 2:rows.max() + 3, cols.min() - 2:cols.max() + 3]
    rms = np.median(ref.rms[rows, cols])
    assert np.abs(box).max() < 5 * rms          # unclipped it would stand at ~100 rms
    n_clipped = np.asarray(ref.frames["n_clipped"])
    assert n_clipped[CR_FRAME] >= CR_LENGTH
    # The frames without cosmic rays lose at most a grown noise pixel or two: no star.
    assert np.all(np.delete(n_clipped[:4], CR_FRAME) <= 18)


def _moffat_scene(fwhms, n=192, seed=3):
    """Frames of the same stars under Moffat PSFs of the given FWHMs, sky noise and the
    stars' Poisson noise (gain 6.2 e-/ADU), on one grid."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n]
    stars = np.column_stack([rng.uniform(12, n - 12, 40), rng.uniform(12, n - 12, 40),
                             10 ** rng.uniform(3, 6.3, 40)])
    sky_rms, images = 9.5, []
    for fwhm in fwhms:
        alpha = fwhm / (2 * math.sqrt(2 ** (1 / 3.0) - 1))
        clean = sum(f * 2 / (math.pi * alpha ** 2) * (1 + ((xx - x) ** 2 + (yy - y) ** 2) / alpha ** 2) ** -3.0
                    for x, y, f in stars)
        noise = rng.standard_normal((n, n)) * np.sqrt(sky_rms ** 2 + clean / 6.2)
        images.append((clean + noise).astype(np.float32))
    return images, stars, sky_rms


def test_stack_keeps_star_cores_across_a_seeing_range_and_drops_a_cosmic_ray():
    fwhms = np.array([2.0, 2.4, 2.8, 3.2])            # the largest ratio the cuts allow
    images, stars, sky_rms = _moffat_scene(fwhms)
    n = images[0].shape[0]
    yy, xx = np.mgrid[0:n, 0:n]
    distance = np.min(np.hypot(xx[..., None] - stars[:, 0], yy[..., None] - stars[:, 1]), axis=-1)
    far = np.argwhere(distance > 15)
    cr_y, cr_x = far[len(far) // 2]
    images[2][cr_y, cr_x] += 800.0
    masks = [np.zeros((n, n), np.int16) for _ in images]
    args = (masks, np.ones(4), np.full(4, sky_rms), np.full(4, 6.2), fwhms)
    stacked = stack_frames(images, *args)
    plain = stack_frames(images, *args, replace(ReferenceConfig(), clip_sigma=1e9))
    core = distance < 5
    np.testing.assert_array_equal(stacked.data[core], plain.data[core])
    assert plain.data[cr_y, cr_x] > 150 and abs(stacked.data[cr_y, cr_x]) < 5 * stacked.rms[cr_y, cr_x]
    assert stacked.n_clipped[2] >= 1 and stacked.gain == pytest.approx(4 * 6.2)
    # Without the PSF-mismatch term, the sharpest frame's bright cores would be clipped.
    naive = stack_frames(images, *args, replace(ReferenceConfig(), clip_psf_factor=0.0, clip_flux_fraction=0.0))
    assert np.any(naive.data[core] != plain.data[core])


def test_stack_mask_and_coverage():
    images, _, sky_rms = _moffat_scene([2.0, 2.2, 2.4], n=64)
    masks = [np.zeros((64, 64), np.int16) for _ in images]
    for m in masks:
        m[:, :5] = MASK_BITS["EDGE"]                   # no frame covers these columns
        m[10, 10] = MASK_BITS["BAD"]                   # masked in every frame
    masks[0][20, 20] = MASK_BITS["SATURATED"]
    images[1][30, 30] = np.nan
    result = stack_frames(images, masks, np.ones(3), np.full(3, sky_rms), np.full(3, 6.2), np.array([2.0, 2.2, 2.4]))
    assert np.all(result.mask[:, :5] == MASK_BITS["EDGE"]) and np.all(result.coverage[:, :5] == 0)
    assert result.mask[10, 10] == MASK_BITS["BAD"] and result.data[10, 10] == 0 and np.isnan(result.rms[10, 10])
    assert result.mask[20, 20] == MASK_BITS["SATURATED"] and result.coverage[20, 20] == 2
    assert result.coverage[30, 30] == 2 and result.rms[30, 30] == pytest.approx(sky_rms / math.sqrt(2), rel=1e-5)


def test_write_read_round_trip(tmp_path):
    _, _, _, _, ref, _ = scene()
    path = write_reference(tmp_path / "ref.fits", ref)
    back = read_reference(path)
    np.testing.assert_array_equal(back.data, ref.data)
    np.testing.assert_array_equal(back.mask, ref.mask)
    np.testing.assert_array_equal(back.rms, ref.rms)
    np.testing.assert_array_equal(back.coverage, ref.coverage)
    np.testing.assert_array_equal(back.psf.coefficients, ref.psf.coefficients)
    assert back.psf.moffat == pytest.approx(ref.psf.moffat)
    for name in ref.catalog.colnames:
        np.testing.assert_array_equal(back.catalog[name], ref.catalog[name])
    assert list(back.frames["reason"]) == list(ref.frames["reason"])
    assert not back.frames.masked and np.isnan(back.frames["scale"][4])   # NaN stays NaN
    for name in ("refid", "fieldid", "ccdid", "qid", "filter", "zeropoint", "gain", "saturate", "nframes",
                 "jdstart", "jdend", "fwhm_arcsec", "limiting_mag"):
        assert getattr(back, name) == getattr(ref, name), name
    x = np.array([1.0, 512.0, 1024.0])
    np.testing.assert_allclose(back.wcs.all_pix2world(x, x, 1), ref.wcs.all_pix2world(x, x, 1), rtol=0, atol=1e-10)
    # The input contract holds: the reference reads as a quadrant image too.
    quadrant = read_quadrant(path)
    assert quadrant.meta.magzp == 27.0 and quadrant.meta.gain == pytest.approx(ref.gain)


def test_frames_pointed_off_the_grid_frame_fill_the_margin(tmp_path):
    """Two frames pointed 30 px off the grid frame (north-east) cover the margin on their
    side; the margin nobody covers stays EDGE; the grown grid survives the file."""
    _, frames, _, gaia, _, _ = scene()
    cfg, sky = sky_of_scene()
    grid_spec = exposure_at_airmass(cfg, FIELD, 1.1, expid=7000, seeing_fwhm_arcsec=SEEINGS[0])
    scale = 3600.0 * math.sqrt(abs(np.linalg.det(frames[0].wcs.pixel_scale_matrix)))
    east, north = (v + 30.0 * scale for v in grid_spec.pointing_offset_arcsec)
    offset = []
    for k, seeing in enumerate((2.0, 2.2)):
        spec = exposure_at_airmass(cfg, FIELD, 1.15 + 0.04 * k, expid=7100 + k, seeing_fwhm_arcsec=seeing,
                                   pointing_offset_arcsec=(east, north))
        quadrant, _ = simulate_quadrant(spec, RCID, sky, cfg)
        header = apply_wcs_header(quadrant.header, quadrant.truth_header)
        header["ASTRUSE"] = True
        offset.append(quadrant_image(quadrant.data, header, quadrant.mask, f"offset{k}.fits"))
    ref = build_reference([frames[0], *offset], gaia, cfg.instrument.filters["ZTF_r"])
    assert ref.nframes == 3 and ref.shape == (NPIX + 2 * MARGIN, NPIX + 2 * MARGIN)

    # Where the offset frames' footprint lands on the coadd's grid (0-based).
    edge = np.array([0, NPIX - 1, NPIX - 1, 0]), np.array([0, 0, NPIX - 1, NPIX - 1])
    x, y = ref.wcs.all_world2pix(*offset[0].wcs.all_pix2world(*edge, 0), 0)
    assert 25 < max(abs(MARGIN - x.min()), abs(MARGIN - y.min())) < 35      # 30 px off the grid frame
    yy, xx = np.mgrid[0:ref.shape[0], 0:ref.shape[1]]
    margin = (xx < MARGIN) | (yy < MARGIN) | (xx >= MARGIN + NPIX) | (yy >= MARGIN + NPIX)
    # 3 px inside the footprint: the spline's support at the frames' own edges is masked.
    inside = (xx > x.min() + 3) & (xx < x.max() - 3) & (yy > y.min() + 3) & (yy < y.max() - 3)
    filled = margin & inside
    assert filled.sum() > 20 * NPIX
    # Covered but for the pixels both offset frames mask (the same detector defects): not EDGE.
    assert np.mean(ref.coverage[filled] == 2) > 0.97
    assert not np.any(ref.mask[filled] & MASK_BITS["EDGE"])
    assert np.all(np.isfinite(ref.rms[filled & (ref.coverage > 0)]))
    outside = margin & ~((xx >= x.min() - 1) & (xx <= x.max() + 1) & (yy >= y.min() - 1) & (yy <= y.max() + 1))
    assert outside.sum() > 20 * NPIX
    assert np.all(ref.coverage[outside] == 0) and np.all(ref.mask[outside] & MASK_BITS["EDGE"])
    # Stars in the margin are catalogued, on the right sky position.
    in_margin = margin[np.rint(ref.catalog["y"] - 1).astype(int), np.rint(ref.catalog["x"] - 1).astype(int)]
    assert in_margin.sum() > 5

    path = write_reference(tmp_path / "ref.fits", ref)
    back = read_reference(path)
    assert back.shape == ref.shape and back.header["GRIDMARG"] == MARGIN
    np.testing.assert_allclose(back.wcs.wcs.crpix, frames[0].wcs.wcs.crpix + MARGIN)
    p = np.array([0.0, 500.0, NPIX - 1.0])
    for wcs in (back.wcs, read_quadrant(path).wcs):
        np.testing.assert_allclose(wcs.all_pix2world(p + MARGIN, p + MARGIN, 0),
                                   frames[0].wcs.all_pix2world(p, p, 0), rtol=0, atol=1e-10)
    header, wcs, shape = reference_grid(frames[0], 0)
    assert shape == frames[0].shape and header["CRPIX1"] == frames[0].header["CRPIX1"]
    np.testing.assert_allclose(wcs.all_pix2world(p, p, 0), frames[0].wcs.all_pix2world(p, p, 0),
                               rtol=0, atol=1e-12)


def test_read_reference_accepts_a_plain_image_and_rejects_bad_files(tmp_path):
    _, frames, _, _, _, _ = scene()
    header = frames[0].header.copy()
    header["MAGZP"] = 27.7
    plain = tmp_path / "plain.fits"
    write_quadrant(plain, frames[0].data, header, frames[0].mask)
    ref = read_reference(plain)
    assert ref.psf is None and ref.catalog is None and ref.rms is None and ref.zeropoint == 27.7
    assert ref.fieldid == 600 and ref.mask.shape == ref.data.shape

    del header["MAGZP"]
    write_quadrant(tmp_path / "nozp.fits", frames[0].data, header)
    with pytest.raises(ReferenceError, match="nozp.fits: missing keyword MAGZP"):
        read_reference(tmp_path / "nozp.fits")
    nowcs = fits.Header({"MAGZP": 27.0})
    fits.PrimaryHDU(np.zeros((8, 8), np.float32), nowcs).writeto(tmp_path / "nowcs.fits")
    with pytest.raises(ReferenceError, match="nowcs.fits: no celestial WCS"):
        read_reference(tmp_path / "nowcs.fits")
    (tmp_path / "junk.fits").write_bytes(b"not a FITS file at all" * 200)
    with pytest.raises(ReferenceError, match="junk.fits: not a readable FITS"):
        read_reference(tmp_path / "junk.fits")
    with pytest.raises(ReferenceError, match="missing.fits: file not found"):
        read_reference(tmp_path / "missing.fits")
    header["MAGZP"] = 27.0
    fits.HDUList([fits.PrimaryHDU(np.zeros((8, 8), np.float32), header),
                  fits.ImageHDU(np.zeros((4, 4), np.int16), name="MASK")]).writeto(tmp_path / "badmask.fits")
    with pytest.raises(ReferenceError, match="MASK extension does not match"):
        read_reference(tmp_path / "badmask.fits")
    fits.PrimaryHDU(np.full((8, 8), np.nan, np.float32), header).writeto(tmp_path / "allnan.fits")
    with pytest.raises(ReferenceError, match="allnan.fits: primary image has no finite pixel"):
        read_reference(tmp_path / "allnan.fits")


def test_bad_inputs_raise_clear_errors():
    cfg, frames, _, gaia, _, _ = scene()
    band = cfg.instrument.filters["ZTF_r"]
    with pytest.raises(ReferenceError, match="no frames given"):
        build_reference([], gaia, band)
    with pytest.raises(ReferenceError, match=r"1 usable frame\(s\), at least 3 needed.*frame4.fits: seeing"):
        build_reference([frames[0], frames[4], frames[5]], gaia, band,
                        replace(ReferenceConfig(), max_seeing_ratio=1.2))
    other = quadrant_image(frames[0].data, frames[0].header.copy(), frames[0].mask, "other.fits")
    other.header["QID"] = 3
    other = quadrant_image(other.data, other.header, other.mask, "other.fits")
    with pytest.raises(ReferenceError, match="several field/CCD/quadrant/filter groups"):
        build_reference([frames[0], other], gaia, band)
    with pytest.raises(ValueError, match="min_frames"):
        ReferenceConfig(min_frames=5, max_frames=4)


def test_refid_is_deterministic_and_decodable():
    a = make_refid(600, 21, 2, [3, 1, 2])
    assert a == make_refid(600, 21, 2, [1, 2, 3]) != make_refid(600, 21, 2, [1, 2, 4])
    assert a >> 40 == 600 and (a >> 34) & 63 == 21 and (a >> 32) & 3 == 2
    assert make_refid(2 ** 23 - 1, 63, 3, [1]) < 2 ** 63
    with pytest.raises(ValueError):
        make_refid(2 ** 23, 0, 1, [1])


def _command(argv, cfg):
    return run_skydiff(argv, cfg)


def test_command_builds_shows_and_fails_cleanly(tmp_path, capsys):
    cfg, frames, _, gaia, _, _ = scene()
    images = tmp_path / "images"
    for frame in frames[:4]:
        write_quadrant(images / frame.path, frame.data, frame.header, frame.mask)
    Table({"a": [1]}).write(images / "frame0_matches.fits")      # skipped: a table
    ra, dec = frames[0].wcs.all_pix2world([1, NPIX], [1, NPIX], 1)
    near = ((gaia["ra"] > ra.min() - 0.2) & (gaia["ra"] < ra.max() + 0.2)
            & (gaia["dec"] > dec.min() - 0.2) & (gaia["dec"] < dec.max() + 0.2))
    gaia[near].write(tmp_path / "gaia.fits")
    out = tmp_path / "refs"
    status = _command(["reference", "build", str(images), "--refcat", str(tmp_path / "gaia.fits"),
                       "--out", str(out), "--grid-margin", "16"], cfg)
    printed = capsys.readouterr().out
    assert status == EXIT_OK
    path = out / "ref_f000600_c06_q2_ZTF_r.fits"
    assert path.exists() and "4 of 4 frames" in printed and "timings" in printed
    built = read_reference(path)
    assert built.nframes == 4 and built.shape == (NPIX + 32, NPIX + 32) and built.header["GRIDMARG"] == 16

    assert _command(["reference", "show", str(path)], cfg) == EXIT_OK
    shown = capsys.readouterr().out
    assert "REFID" in shown and "NFRAMES  = 4" in shown

    # Too few frames: the group is not built, the reasons are printed.
    status = _command(["reference", "build", *(str(images / f.path) for f in frames[:2]), "--refcat",
                       str(tmp_path / "gaia.fits"), "--out", str(tmp_path / "few")], cfg)
    assert status == EXIT_UNUSABLE and "NOT BUILT" in capsys.readouterr().out
    assert not (tmp_path / "few" / path.name).exists()
    # Bad input: an explicit file that is not an image, a missing file, a bad catalogue.
    assert _command(["reference", "build", str(images / "frame0_matches.fits"), "--refcat",
                     str(tmp_path / "gaia.fits"), "--out", str(out)], cfg) == EXIT_BAD_INPUT
    assert _command(["reference", "build", str(tmp_path / "nothere.fits"), "--refcat", "x", "--out",
                     str(out)], cfg) == EXIT_BAD_INPUT
    assert _command(["reference", "build", str(images), "--refcat", str(tmp_path / "nocat.fits"),
                     "--out", str(out)], cfg) == EXIT_BAD_INPUT
    assert _command(["reference", "show", str(tmp_path / "gaia.fits")], cfg) == EXIT_BAD_INPUT
