"""ssdistnr / ssmagnr / ssnamenr: the nearest known object within the search radius, ZTF's
-999 / "null" otherwise."""
from __future__ import annotations

import numpy as np
from astropy.table import Table

from pipeline.context.solar_system import associate_solar_system


def test_nearest_within_the_radius(cfg):
    dra = 1 / 3600 / np.cos(np.radians(33.0))
    known = Table({"ssnamenr": ["97125", "2019VG102"], "ra": [150.0, 150.0 + 20 * dra], "dec": [33.0, 33.0],
                   "vmag": [19.4, 20.1]})
    candidates = Table({"ra": [150.0 + 2 * dra, 150.0 + 14 * dra, 150.0 + 51 * dra, 151.0],
                        "dec": [33.0, 33.0, 33.0, 33.0]})
    associate_solar_system(candidates, known, cfg.solar_system)
    assert list(candidates["ssnamenr"]) == ["97125", "2019VG102", "null", "null"]
    np.testing.assert_allclose(candidates["ssdistnr"], [2.0, 6.0, -999, -999], atol=0.05)
    assert list(candidates["ssmagnr"]) == [19.4, 20.1, -999, -999]


def test_no_known_objects_is_searched_nothing(cfg):
    candidates = Table({"ra": [10.0], "dec": [0.0]})
    known = Table({"ssnamenr": np.zeros(0, str), "ra": np.zeros(0), "dec": np.zeros(0), "vmag": np.zeros(0)})
    associate_solar_system(candidates, known, cfg.solar_system)
    assert candidates["ssdistnr"][0] == -999 and candidates["ssmagnr"][0] == -999 and candidates["ssnamenr"][0] == "null"
    empty = Table({"ra": np.zeros(0), "dec": np.zeros(0)})
    assert len(associate_solar_system(empty, known, cfg.solar_system)["ssnamenr"]) == 0
