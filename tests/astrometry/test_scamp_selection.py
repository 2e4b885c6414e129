"""The detections SCAMP is given (:func:`pipeline.astrometry.solve.scamp_selection`) on small
synthetic catalogues: unflagged, highest S/N, and every part of the image keeps its stars."""
from __future__ import annotations

import numpy as np
from astropy.table import Table

from astropy.wcs import WCS

from pipeline.astrometry.solve import scamp_reference_selection, scamp_selection
from pipeline.core.config import AstrometryConfig
from pipeline.measure.extract import FLAG_BITS

MASK = AstrometryConfig().flags_mask
SHAPE = (800, 800)          # (ny, nx)


def catalogue(x, y, snr, flags=None) -> Table:
    flags = np.zeros(len(x), np.int16) if flags is None else np.asarray(flags, np.int16)
    return Table({"XWIN_IMAGE": np.asarray(x, float), "YWIN_IMAGE": np.asarray(y, float),
                  "SNR_WIN": np.asarray(snr, np.float32), "FLAGS": flags})


def uniform(n, rng):
    return rng.uniform(0.5, SHAPE[1] + 0.5, n), rng.uniform(0.5, SHAPE[0] + 0.5, n), rng.lognormal(3.5, 1.0, n)


def test_zero_keeps_every_row_flagged_ones_included():
    rng = np.random.default_rng(1)
    x, y, snr = uniform(200, rng)
    table = catalogue(x, y, snr, np.where(np.arange(200) % 3 == 0, FLAG_BITS["BLENDED"], 0))
    np.testing.assert_array_equal(scamp_selection(table, SHAPE, 0, MASK), np.arange(200))


def test_flagged_and_unmeasured_detections_never_go_to_scamp():
    rng = np.random.default_rng(2)
    x, y, snr = uniform(300, rng)
    flags = np.zeros(300, np.int16)
    for i, bit in enumerate(FLAG_BITS.values()):          # every bit, the astrometric outlier's too
        flags[i] = bit
    snr[20], snr[21], x[22] = np.nan, 0.0, np.nan
    rows = scamp_selection(catalogue(x, y, snr, flags), SHAPE, 1000, MASK)
    assert set(rows) == set(range(300)) - set(range(len(FLAG_BITS))) - {20, 21, 22}
    assert list(rows) == sorted(rows)
    # A bit outside the mask does not exclude.
    rows = scamp_selection(catalogue(x, y, snr, flags), SHAPE, 1000, MASK & ~FLAG_BITS["BLENDED"])
    assert list(FLAG_BITS).index("BLENDED") in rows


def test_the_cap_keeps_the_highest_snr_of_a_uniform_sky():
    rng = np.random.default_rng(3)
    x, y, snr = uniform(5000, rng)
    rows = scamp_selection(catalogue(x, y, snr), SHAPE, 1000, MASK)
    assert len(rows) == 1000 and len(np.unique(rows)) == 1000
    # The per-cell quota barely changes a uniform sky's choice: nearly all of the 1000 brightest.
    brightest = np.argsort(-snr)[:1000]
    assert len(np.intersect1d(rows, brightest)) > 0.9 * 1000


def test_a_corner_of_faint_stars_keeps_its_stars():
    rng = np.random.default_rng(4)
    x, y, snr = uniform(4000, rng)
    corner = (x < 100.5) & (y < 100.5)                    # one cell of the 8 x 8 grid (1-based pixels)
    snr[corner] = rng.uniform(5.0, 10.0, corner.sum())     # fainter than every other star
    snr[~corner] = rng.uniform(20.0, 500.0, (~corner).sum())
    cap = 640                                             # 10 per cell
    assert corner.sum() > 10
    plain = np.argsort(-snr)[:cap]
    assert not corner[plain].any()                        # a plain S/N cut would leave it empty
    rows = scamp_selection(catalogue(x, y, snr), SHAPE, cap, MASK)
    assert len(rows) == cap
    assert corner[rows].sum() == 10
    chosen = np.flatnonzero(corner)[np.argsort(-snr[corner])[:10]]
    assert set(chosen) <= set(rows)                       # the corner's own brightest


def _tan_wcs():
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 30.0]
    wcs.wcs.crpix = [SHAPE[1] / 2 + 0.5, SHAPE[0] / 2 + 0.5]
    wcs.wcs.cdelt = [-1.0 / 3600, 1.0 / 3600]
    return wcs


def test_reference_rows_the_brightest_spread_over_the_image():
    rng = np.random.default_rng(4)
    wcs = _tan_wcs()
    x, y = rng.uniform(-20, SHAPE[1] + 20, 3000), rng.uniform(-20, SHAPE[0] + 20, 3000)
    mag = rng.uniform(12, 21, 3000)
    # the left third of the image holds only faint stars
    left = x < SHAPE[1] / 3
    mag[left] += 3.0
    mag[:40] = 99.0                                          # no G magnitude
    ra, dec = wcs.wcs_pix2world(x, y, 1)
    ref = Table({"X_WORLD": ra, "Y_WORLD": dec, "MAG": mag.astype(np.float32)})
    rows = scamp_reference_selection(ref, wcs, SHAPE, 640)
    assert len(rows) == 640 and np.all(np.diff(rows) > 0)
    assert not np.isin(np.arange(40), rows).any()            # rows without G come last
    assert left[rows].mean() > 0.15                         # the faint third keeps its share
    dropped = np.setdiff1d(np.arange(3000), rows)
    assert np.median(mag[rows]) < np.median(mag[dropped]) - 3.0   # the bright ones are kept
    np.testing.assert_array_equal(scamp_reference_selection(ref, wcs, SHAPE, 0), np.arange(3000))
    np.testing.assert_array_equal(scamp_reference_selection(ref, wcs, SHAPE, 5000), np.arange(3000))


def test_calibration_sources_are_the_brightest_detections_spread_over_the_image():
    from types import SimpleNamespace

    from pipeline.astrometry.solve import calibration_selection

    rng = np.random.default_rng(5)
    n = 5000
    objects = np.zeros(n, dtype=[("x", "f8"), ("y", "f8"), ("flux", "f4")])
    objects["x"], objects["y"] = rng.uniform(0, SHAPE[1] - 1, n), rng.uniform(0, SHAPE[0] - 1, n)   # 0-based
    objects["flux"] = rng.lognormal(6.0, 1.5, n)
    corner = (objects["x"] < 99.5) & (objects["y"] < 99.5)
    objects["flux"][corner] = rng.uniform(1.0, 2.0, corner.sum())      # the faintest of all
    objects["flux"][7] = np.nan                                         # never first
    detections = SimpleNamespace(objects=objects)
    rows = calibration_selection(detections, SHAPE, 640)
    assert len(rows) == 640 and np.all(np.diff(rows) > 0) and 7 not in rows
    assert corner[rows].sum() == 10                                     # its share of the 8 x 8 grid
    assert np.median(objects["flux"][rows]) > np.nanpercentile(objects["flux"], 80)
    assert calibration_selection(detections, SHAPE, 0) is None          # 0: every detection
    assert calibration_selection(detections, SHAPE, n) is None          # no more than the cap
