"""The catalogue context (PS1-like and Gaia neighbours) against hand-built catalogues and
against the simulated sky's truth."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table
from scipy.stats import mannwhitneyu

from catalogs import PS1, as_catalog_table
from pipeline.context.catalogs import CONTEXT_COLUMNS, catalog_context
from pipeline.core.config import Config, ContextConfig, ConfigValueError
from pipeline.simulate.run import PS1_SEED_OFFSET
from pipeline.simulate.sky import _offset_positions, make_sky

ARCSEC = 1.0 / 3600.0


def _ps1(rows) -> Table:
    names = ["objid", "ra", "dec", "gmag", "rmag", "imag", "zmag", "ps_score"]
    return as_catalog_table(Table(rows=rows, names=names), PS1, "test")


def _gaia(rows) -> Table:
    return Table(rows=rows, names=["ra", "dec", "phot_g_mean_mag"]) if rows else Table(
        {"ra": np.zeros(0), "dec": np.zeros(0), "phot_g_mean_mag": np.zeros(0)})


def test_three_nearest_with_ztf_conventions():
    ra0, dec0 = 120.0, 40.0
    ra, dec = _offset_positions(ra0, dec0, np.array([5.0, 1.0, 29.0, 31.0]) * ARCSEC, np.array([0, 90, 180, 270]))
    ps1 = _ps1([(11, ra[0], dec[0], 20.0, 19.5, 19.2, 19.1, 0.9),
                (12, ra[1], dec[1], np.nan, 21.0, -999.0, 20.5, np.nan),   # no g, i (PS1 -999), no score
                (13, ra[2], dec[2], 22.0, 21.5, 21.2, 21.0, 0.1),
                (14, ra[3], dec[3], 18.0, 17.5, 17.2, 17.0, 0.99)])        # beyond 30"
    g_ra, g_dec = _offset_positions(ra0, dec0, np.array([40.0, 80.0, 95.0]) * ARCSEC, np.array([0.0, 0.0, 0.0]))
    gaia = _gaia([(g_ra[0], g_dec[0], 17.0), (g_ra[1], g_dec[1], 13.0), (g_ra[2], g_dec[2], 9.0)])
    far_ra, far_dec = _offset_positions(ra0, dec0, 0.5, 45.0)      # 30' away: nothing near
    out = catalog_context([ra0, far_ra], [dec0, far_dec], ps1, gaia, ContextConfig())
    assert out.colnames == list(CONTEXT_COLUMNS)
    near, far = out[0], out[1]
    assert [near[f"objectidps{k}"] for k in (1, 2, 3)] == [12, 11, 13]
    assert np.allclose([near[f"distpsnr{k}"] for k in (1, 2, 3)], [1.0, 5.0, 29.0], atol=1e-3)
    assert near["sgmag1"] == -999 and near["simag1"] == -999 and near["srmag1"] == pytest.approx(21.0)
    assert near["sgscore1"] == pytest.approx(0.5) and near["sgscore2"] == pytest.approx(0.9)
    assert near["nmtchps"] == 3
    assert near["neargaia"] == pytest.approx(40.0, abs=1e-3) and near["maggaia"] == pytest.approx(17.0)
    assert near["neargaiabright"] == pytest.approx(80.0, abs=1e-3) and near["maggaiabright"] == pytest.approx(13.0)
    for name in CONTEXT_COLUMNS:
        assert far[name] == (0 if name == "nmtchps" else -999), name
    assert out["objectidps1"].dtype == np.int64 and out["nmtchps"].dtype == np.int32


def test_fewer_sources_than_slots_and_empty_catalogues():
    ps1 = _ps1([(7, 10.0, 0.0, 20.0, 20.0, 20.0, 20.0, 0.2)])
    out = catalog_context([10.0, 10.0 + 2 * ARCSEC], [0.0, 0.0], ps1, _gaia([]))
    assert list(out["objectidps1"]) == [7, 7] and list(out["objectidps2"]) == [-999, -999]
    assert list(out["neargaia"]) == [-999, -999] and list(out["nmtchps"]) == [1, 1]
    empty = catalog_context([10.0], [0.0], ps1[:0], _gaia([]))
    assert empty["objectidps1"][0] == -999 and empty["distpsnr1"][0] == -999 and empty["nmtchps"][0] == 0
    assert len(catalog_context([], [], ps1, _gaia([]))) == 0


def test_context_config_names_the_key():
    with pytest.raises(ConfigValueError, match="context.ps1_radius_arcsec"):
        ContextConfig(ps1_radius_arcsec=0.0)


@pytest.fixture(scope="module")
def sky_and_ps1():
    cfg = Config()
    sky = make_sky(cfg, [(700, 150.0, 30.0)], rng_seed=77, mjd_range=(61100.0, 61130.0))
    return sky, sky.ps1_catalogue(77 + PS1_SEED_OFFSET)


def _ps1_store_table(catalogue: Table) -> Table:
    return as_catalog_table(catalogue, PS1, "simulated")


def test_sgscore1_separates_simulated_stars_from_galaxies_brighter_than_r21(sky_and_ps1):
    sky, catalogue = sky_and_ps1
    rng = np.random.default_rng(1)
    bright = np.flatnonzero(catalogue["true_rmag"] < 21.0)
    # candidates on 4000 bright objects, at their catalogue positions plus 0.3" of scatter
    pick = rng.choice(bright, 4000, replace=False)
    ra, dec = _offset_positions(catalogue["ra"][pick], catalogue["dec"][pick],
                                np.abs(rng.normal(0, 0.3, pick.size)) * ARCSEC, rng.uniform(0, 360, pick.size))
    table = _ps1_store_table(catalogue)
    gaia = sky.gaia_catalogue()
    out = catalog_context(ra, dec, table, gaia)
    assert np.all(out["objectidps1"] == catalogue["objid"][pick])
    assert np.all(out["distpsnr1"] < 1.5)
    is_star = catalogue["sim_class"][pick] == 1
    score = np.asarray(out["sgscore1"])
    u_stat = mannwhitneyu(score[is_star], score[~is_star]).statistic
    auc = u_stat / (is_star.sum() * (~is_star).sum())
    print(f"sgscore1 ROC AUC, stars vs galaxies with r < 21: {auc:.4f} "
          f"({is_star.sum()} stars, {(~is_star).sum()} galaxies)")
    assert auc >= 0.95
    # fainter than r = 21 the score degrades, as the PS1 point-source catalogue's does
    faint = np.flatnonzero((catalogue["true_rmag"] > 21.5) & np.isfinite(catalogue["ps_score"]))
    faint_galaxy_scores = catalogue["ps_score"][faint][catalogue["sim_class"][faint] == 0]
    assert np.mean(faint_galaxy_scores > 0.5) > np.mean(score[~is_star] > 0.5)


def test_transients_in_galaxies_and_empty_sky_against_truth(sky_and_ps1):
    sky, catalogue = sky_and_ps1
    table = _ps1_store_table(catalogue)
    transients = sky.transients
    nuclear = transients[(transients["kind"] == "nuclear") & (transients["host_galaxy_id"] > 0)]
    host_row = np.asarray(nuclear["host_galaxy_id"]) - 1
    listed = (catalogue["sim_class"] == 0)
    objid_of_galaxy = dict(zip(np.asarray(catalogue["sim_row"][listed]), np.asarray(catalogue["objid"][listed])))
    in_catalogue = np.array([row in objid_of_galaxy for row in host_row])
    assert in_catalogue.sum() >= 10
    out = catalog_context(nuclear["ra"], nuclear["dec"], table, sky.gaia_catalogue())[in_catalogue]
    expected = [objid_of_galaxy[row] for row in host_row[in_catalogue]]
    # a nuclear transient sits on its host's centre: the host is PS1 neighbour 1 within 0.5"
    assert np.all(out["objectidps1"] == expected)
    assert np.all(out["distpsnr1"] < 0.5)

    # random positions: slots and counts against a brute-force search of the catalogue
    rng = np.random.default_rng(5)
    ra = 150.0 + rng.uniform(-1, 1, 120)
    dec = 30.0 + rng.uniform(-1, 1, 120)
    out = catalog_context(ra, dec, table, sky.gaia_catalogue())
    from astropy.coordinates import SkyCoord
    import astropy.units as u
    cat = SkyCoord(np.asarray(catalogue["ra"]) * u.deg, np.asarray(catalogue["dec"]) * u.deg)
    n_empty = 0
    for i in range(len(ra)):
        sep = cat.separation(SkyCoord(ra[i] * u.deg, dec[i] * u.deg)).arcsec
        within = np.sort(sep[sep <= 30.0])
        assert out["nmtchps"][i] == within.size
        if within.size == 0:
            n_empty += 1
            assert out["distpsnr1"][i] == -999 and out["objectidps1"][i] == -999 and out["sgscore1"][i] == -999
        else:
            assert out["distpsnr1"][i] == pytest.approx(within[0], abs=1e-3)
    assert n_empty > 0
