"""The detections SCAMP is given (:func:`pipeline.astrometry.solve.scamp_selection`) on small
synthetic catalogues: unflagged, highest S/N, and every part of the image keeps its stars."""
from __future__ import annotations

import numpy as np
from astropy.table import Table

from pipeline.astrometry.solve import scamp_selection
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
