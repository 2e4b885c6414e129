"""The PS1-like catalogue kind in the tile machinery: prefetch from a table file (the
command) and from a fake MAST PS1 DR2 TAP service on 127.0.0.1, lookups, kind checks."""
from __future__ import annotations

import re

import numpy as np
import pytest
import astropy.units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

from catalogs import (GAIA, PS1, CatalogError, catalog_for_footprint, cone_region, prefetch_from_table,
                      prefetch_from_tap, read_store_info)
from catalogs.store import STORE_FORMAT
from test_catalogs import synthetic_gaia
from test_catalogs_tap import FakeGaiaArchive
from _cli import run_skydiff

_SELECT = re.compile(r"SELECT (.*) FROM (\S+) WHERE")
_CIRCLE = re.compile(r"CIRCLE\('ICRS',\s*([-\d.]+),\s*([-\d.]+),\s*([-\d.]+)\)")
_RLIM = re.compile(r"rMeanPSFMag\s*<=\s*([-\d.]+)")


def synthetic_ps1(n: int, ra_range, dec_range, seed: int = 3) -> Table:
    """PS1 rows in the stored names, ~10 % of g and z missing (NaN), some unscored."""
    rng = np.random.default_rng(seed)
    r = rng.uniform(14.0, 23.0, n)
    table = Table({"objid": np.arange(n, dtype=np.int64) + 10 ** 17,
                   "ra": rng.uniform(*ra_range, n), "dec": rng.uniform(*dec_range, n),
                   "gmag": np.where(rng.random(n) < 0.1, np.nan, r + 0.5), "rmag": r, "imag": r - 0.2,
                   "zmag": np.where(rng.random(n) < 0.1, np.nan, r - 0.3),
                   "ps_score": np.where(rng.random(n) < 0.05, np.nan, rng.random(n))})
    return table


class FakeMastPs1(FakeGaiaArchive):
    """Answers like MAST's PS1 DR2 TAP service: its own column names (``objID``,
    ``raMean`` .., -999 for a missing magnitude), honouring the query's ``AS`` renames."""

    def __init__(self, catalogue: Table, **kwargs):
        super().__init__(Table({"ra": catalogue["ra"], "dec": catalogue["dec"]}), **kwargs)
        mast = Table()
        for name, column in PS1.tap_columns.items():
            values = np.asarray(catalogue[name])
            mast[column] = np.where(np.isnan(values), -999.0, values) if values.dtype.kind == "f" else values
        self.mast = mast

    def answer(self, path: str, fields: dict):
        if self.mode != "ok":
            return super().answer(path, fields)
        query = fields["QUERY"]
        select, table = _SELECT.search(query).groups()
        assert table == "dbo.MeanObjectView" and "POINT('ICRS', raMean, decMean)" in query
        ra, dec, radius = map(float, _CIRCLE.search(query).groups())
        keep = self.stars.separation(SkyCoord(ra * u.deg, dec * u.deg)).deg <= radius
        limit = _RLIM.search(query)
        if limit:
            keep &= np.asarray(self.mast["rMeanPSFMag"]) <= float(limit.group(1))
        rows, served = self.mast[keep], Table()
        for item in select.split(", "):
            column, _, alias = item.partition(" AS ")
            served[alias or column] = rows[column]       # an unknown column fails here, as in ADQL
        return 200, self.votable(served, False)


def _in_cone(table: Table, ra: float, dec: float, radius: float) -> np.ndarray:
    coords = SkyCoord(np.asarray(table["ra"]) * u.deg, np.asarray(table["dec"]) * u.deg)
    return coords.separation(SkyCoord(ra * u.deg, dec * u.deg)).deg <= radius


@pytest.fixture(scope="module")
def ps1_sky():
    return synthetic_ps1(8000, (8.0, 12.0), (18.0, 22.0))


def test_tap_prefetch_of_the_ps1_kind(tmp_path, ps1_sky):
    region = cone_region(10.0, 20.0, 0.6)
    with FakeMastPs1(ps1_sky) as service:
        result = prefetch_from_tap(service.url, tmp_path, region, mag_limit=22.0, timeout_s=10, kind=PS1)
    assert result.rows > 0 and result.queries == len(service.requests)
    assert "objID AS objid, raMean AS ra" in service.requests[0]["QUERY"]
    info = read_store_info(tmp_path)
    assert info.kind is PS1 and all(e.source.endswith("dbo.MeanObjectView") for e in info.tiles.values())
    found = catalog_for_footprint(tmp_path, [(10.0, 20.0)], 0.5, kind=PS1)
    truth = ps1_sky[_in_cone(ps1_sky, 10.0, 20.0, 0.5) & (np.asarray(ps1_sky["rmag"]) <= 22.0)]
    assert set(np.asarray(found["objid"]).tolist()) == set(np.asarray(truth["objid"]).tolist())
    found.sort("objid")
    truth.sort("objid")
    # PS1's -999 became NaN, the rest survived; the service has no PSC score: all NaN
    assert np.array_equal(np.isnan(np.asarray(found["gmag"])), np.isnan(np.asarray(truth["gmag"])))
    assert np.allclose(np.asarray(found["rmag"]), np.asarray(truth["rmag"]), atol=1e-5)
    assert np.all(np.isnan(np.asarray(found["ps_score"])))


def test_table_prefetch_command_for_ps1_and_kind_checks(tmp_path, ps1_sky, cfg, capsys):
    table_path = tmp_path / "ps1.fits"
    ps1_sky.write(table_path)
    run_cfg = cfg.replace(paths__root=str(tmp_path))
    assert run_skydiff(["catalogs", "prefetch", "--catalog", "ps1", "--from-table", str(table_path),
                        "--field", "10", "20", "--field-size", "1", "1", "--margin", "0"], run_cfg) == 0
    store = tmp_path / "catalogs-ps1"                       # paths.ps1_catalogs
    info = read_store_info(store)
    assert info.kind is PS1 and info.total_rows > 0
    assert run_skydiff(["catalogs", "info", "--catalog", "ps1"], run_cfg) == 0
    assert "kind    ps1 (skydiff-ps1-tiles)" in capsys.readouterr().out
    found = catalog_for_footprint(store, [(10.0, 20.0)], 0.3, kind=PS1)
    truth = ps1_sky[_in_cone(ps1_sky, 10.0, 20.0, 0.3)]
    assert len(found) == len(truth)
    found.sort("objid")
    truth.sort("objid")
    assert np.array_equal(np.isnan(np.asarray(found["ps_score"])), np.isnan(np.asarray(truth["ps_score"])))
    # one kind per store: a Gaia lookup or Gaia tiles in the PS1 store are errors naming it
    with pytest.raises(CatalogError, match="holds the ps1 catalogue, not gaia"):
        catalog_for_footprint(store, [(10.0, 20.0)], 0.3)
    with pytest.raises(CatalogError, match="holds the ps1 catalogue"):
        prefetch_from_table(synthetic_gaia(100, (9.5, 10.5), (19.5, 20.5)), store, cone_region(10, 20, 0.2))
    with pytest.raises(CatalogError, match="ps_score outside 0..1"):
        bad = ps1_sky[:10].copy()
        bad["ps_score"][0] = 1.5
        prefetch_from_table(bad, tmp_path / "bad", cone_region(10, 20, 0.2), kind=PS1)


def test_gaia_stores_keep_their_format(tmp_path):
    prefetch_from_table(synthetic_gaia(200, (9.5, 10.5), (19.5, 20.5)), tmp_path, cone_region(10, 20, 0.2))
    import json
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["format"] == STORE_FORMAT == "skydiff-gaia-tiles" and index["kind"] == "gaia"
    del index["kind"]                                        # a store written before kinds existed
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert read_store_info(tmp_path).kind is GAIA
    assert len(catalog_for_footprint(tmp_path, [(10.0, 20.0)], 0.1)) > 0
