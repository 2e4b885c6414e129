"""The Gaia tile store: round trips, footprint lookup, epoch propagation, SCAMP table, command."""
from __future__ import annotations

import argparse
import logging
import warnings

import numpy as np
import pytest
import astropy.units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS

import catalogs
from catalogs import (CatalogError, SkyBox, catalog_for_footprint, cone_region, field_region,
                      footprint_region, prefetch_from_table, propagate_to_epoch, read_store_info,
                      scamp_reference_table, write_scamp_reference)
from catalogs.store import tile_path
from pipeline import cli
from pipeline.commands import catalogs as catalogs_command
from pipeline.core.config import load_config
from pipeline.formats.ldac import read_ldac


def synthetic_gaia(n: int, ra_range, dec_range, seed: int = 1, two_parameter_fraction: float = 0.3) -> Table:
    """Gaia-like rows uniform on the sphere in an RA range (may wrap) and a Dec range."""
    rng = np.random.default_rng(seed)
    span = (ra_range[1] - ra_range[0]) % 360 or 360.0
    ra = (ra_range[0] + rng.uniform(0, span, n)) % 360
    sin_lo, sin_hi = np.sin(np.radians(dec_range))
    dec = np.degrees(np.arcsin(rng.uniform(sin_lo, sin_hi, n)))
    g = rng.uniform(12, 21, n).astype("f4")
    two = rng.uniform(size=n) < two_parameter_fraction
    pmra, pmdec = rng.normal(0, 8, n), rng.normal(-3, 8, n)
    pmra[two] = pmdec[two] = np.nan
    pm_error = np.where(two, np.nan, 0.02 * 10 ** (0.2 * (g - 15))).astype("f4")
    return Table({
        "source_id": np.arange(n, dtype="i8") * 7 + 11, "ra": ra, "dec": dec,
        "ra_error": (0.010 * 10 ** (0.2 * (g - 15))).astype("f4"),
        "dec_error": (0.012 * 10 ** (0.2 * (g - 15))).astype("f4"),
        "pmra": pmra, "pmdec": pmdec, "pmra_error": pm_error, "pmdec_error": pm_error,
        "ref_epoch": np.full(n, 2016.0), "phot_g_mean_mag": g,
        "phot_bp_mean_mag": g + 0.4, "phot_rp_mean_mag": g - 0.5})


def square_footprint(ra0: float, dec0: float, half_deg: float) -> tuple[np.ndarray, WCS]:
    """Corners of a north-up square in the tangent plane at (ra0, dec0), and that plane's WCS."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [ra0, dec0]
    wcs.wcs.crpix = [1.0, 1.0]        # FITS 1-based: 0-based (0, 0) is the centre
    wcs.wcs.cdelt = [1.0, 1.0]          # one degree per "pixel": pixel = standard coordinate
    corners = np.array([(half_deg, half_deg), (-half_deg, half_deg), (-half_deg, -half_deg),
                        (half_deg, -half_deg)])
    return np.column_stack(wcs.wcs_pix2world(corners[:, 0], corners[:, 1], 0)), wcs


def inside_square(table: Table, wcs: WCS, half_deg: float) -> np.ndarray:
    """Independent truth: great-circle edges are straight lines in the gnomonic plane."""
    x, y = wcs.wcs_world2pix(np.asarray(table["ra"]), np.asarray(table["dec"]), 0)
    return (np.abs(x) <= half_deg) & (np.abs(y) <= half_deg)


@pytest.fixture(scope="module")
def ra0_catalogue():
    return synthetic_gaia(40000, (356.0, 4.0), (-2.5, 2.5), seed=3)


@pytest.fixture(scope="module")
def ra0_store(tmp_path_factory, ra0_catalogue):
    store = tmp_path_factory.mktemp("store-ra0")
    result = prefetch_from_table(ra0_catalogue, store, SkyBox(356.0, 4.0, -2.5, 2.5))
    assert result.rows == len(ra0_catalogue)
    return store


def ids(table) -> set[int]:
    return set(np.asarray(table["source_id"]).tolist())


def test_store_index_and_tiles_hold_every_row_once(ra0_store, ra0_catalogue):
    info = read_store_info(ra0_store)
    assert info.nside == catalogs.DEFAULT_NSIDE and info.order == "nested"
    assert info.total_rows == len(ra0_catalogue)
    pixels = catalogs.sky.pixels_of(info.nside, ra0_catalogue["ra"], ra0_catalogue["dec"])
    for pixel, entry in info.tiles.items():
        assert entry.rows == np.count_nonzero(pixels == pixel)
        assert entry.source == "table" and entry.written
    objects, _ = read_ldac(tile_path(ra0_store, info.nside, int(pixels[0])))
    assert int(pixels[0]) in info.tiles and len(objects) == info.tiles[int(pixels[0])].rows


def test_footprint_across_ra0_gives_exactly_the_rows_inside(ra0_store, ra0_catalogue):
    corners, wcs = square_footprint(0.1, 0.3, 0.45)
    assert corners[:, 0].max() > 359 and corners[:, 0].min() < 1   # straddles RA = 0
    found = catalog_for_footprint(ra0_store, corners, 0.0)
    truth = ra0_catalogue[inside_square(ra0_catalogue, wcs, 0.45)]
    assert len(truth) > 500 and ids(found) == ids(truth)
    found.sort("source_id")
    truth.sort("source_id")
    for name in ("ra", "dec", "pmra", "ra_error", "phot_g_mean_mag"):
        np.testing.assert_array_equal(np.asarray(found[name]), np.asarray(truth[name], dtype=found[name].dtype))
    assert found["ra"].unit == u.deg and found["pmra"].unit == u.mas / u.yr


def test_margin_keeps_rows_within_the_margin_and_no_others(ra0_store, ra0_catalogue):
    corners, wcs = square_footprint(0.1, 0.3, 0.45)
    found = catalog_for_footprint(ra0_store, corners, 0.1)
    x, y = wcs.wcs_world2pix(np.asarray(ra0_catalogue["ra"]), np.asarray(ra0_catalogue["dec"]), 0)
    # Independent bounds: beside an edge the margin is a band (the gnomonic scale differs from
    # 1 by < 1e-4 this close to the centre), beside a corner a circle round the corner.
    near_edge = (((np.abs(x) <= 0.45 + 0.0999) & (np.abs(y) <= 0.45))
                 | ((np.abs(x) <= 0.45) & (np.abs(y) <= 0.45 + 0.0999)))
    stars = SkyCoord(ra0_catalogue["ra"] * u.deg, ra0_catalogue["dec"] * u.deg)
    near_corner = np.zeros(len(stars), dtype=bool)
    for ra, dec in corners:
        near_corner |= stars.separation(SkyCoord(ra * u.deg, dec * u.deg)).deg <= 0.0999
    beyond = (np.abs(x) > 0.45 + 0.1001) | (np.abs(y) > 0.45 + 0.1001)
    assert ids(ra0_catalogue[near_edge | near_corner]) <= ids(found)
    assert not ids(found) & ids(ra0_catalogue[beyond])
    assert ids(found) == ids(ra0_catalogue[footprint_region(corners, 0.1).contains(
        ra0_catalogue["ra"], ra0_catalogue["dec"])])


def test_cone_lookup_near_the_pole_matches_skycoord_separation(tmp_path):
    catalogue = synthetic_gaia(20000, (0.0, 360.0), (86.5, 90.0), seed=5)
    prefetch_from_table(catalogue, tmp_path, cone_region(0.0, 90.0, 3.5))
    centre = SkyCoord(200.0 * u.deg, 89.4 * u.deg)
    found = catalog_for_footprint(tmp_path, [(200.0, 89.4)], 1.2)
    separation = centre.separation(SkyCoord(catalogue["ra"] * u.deg, catalogue["dec"] * u.deg)).deg
    assert ids(found) == ids(catalogue[separation <= 1.2]) and len(found) > 1000
    corners, wcs = square_footprint(45.0, 89.7, 0.5)        # a quadrant over the pole
    found = catalog_for_footprint(tmp_path, corners, 0.0)
    assert ids(found) == ids(catalogue[inside_square(catalogue, wcs, 0.5)])


def test_field_prefetch_covers_its_corner_quadrant(tmp_path):
    catalogue = synthetic_gaia(12000, (24.0, 36.0), (29.0, 41.0), seed=7, two_parameter_fraction=0.0)
    result = prefetch_from_table(catalogue, tmp_path, field_region(30.0, 35.0))
    assert 70 <= len(result.written) <= 130
    _, field_wcs = square_footprint(30.0, 35.0, 0.0)
    x0, x1, y0, y1 = 3.75 - 0.87, 3.75, -3.65, -3.65 + 0.87     # the south-east corner quadrant
    ra, dec = field_wcs.wcs_pix2world([x0, x1, x1, x0], [y0, y0, y1, y1], 0)
    corners = np.column_stack([ra, dec])
    found = catalog_for_footprint(tmp_path, corners, 0.1)
    truth = footprint_region(corners, 0.1).contains(catalogue["ra"], catalogue["dec"])
    assert ids(found) == ids(catalogue[truth]) and len(found) > 50


def test_uncovered_footprint_and_bad_input_are_clear_errors(ra0_store, tmp_path):
    with pytest.raises(CatalogError, match="not covered by the store.*prefetch"):
        catalog_for_footprint(ra0_store, [(10.0, 0.0)], 0.5)
    with pytest.raises(CatalogError, match="convex"):
        catalog_for_footprint(ra0_store, [(0, 0), (1, 1), (1, 0), (0, 1)], 0.1)
    with pytest.raises(CatalogError, match="no such catalogue"):
        catalog_for_footprint(tmp_path / "nowhere", [(0.0, 0.0)], 0.1)
    with pytest.raises(CatalogError, match="missing Gaia column.*pmra"):
        prefetch_from_table(Table({"ra": [1.0], "dec": [2.0]}), tmp_path / "s", cone_region(1, 2, 1))


def test_corrupt_tile_is_named(tmp_path, ra0_catalogue):
    prefetch_from_table(ra0_catalogue, tmp_path, cone_region(0.0, 0.0, 0.5))
    info = read_store_info(tmp_path)
    pixel = int(catalogs.sky.pixels_of(info.nside, [0.0], [0.0])[0])
    path = tile_path(tmp_path, info.nside, pixel)
    path.write_bytes(path.read_bytes()[:4000])            # truncated mid-table
    with pytest.raises(CatalogError, match=f"{path.name}"):
        catalog_for_footprint(tmp_path, [(0.0, 0.0)], 0.3)
    path.write_bytes(b"not a FITS file at all")
    with pytest.raises(CatalogError, match=f"corrupt tile .*{path.name}"):
        catalog_for_footprint(tmp_path, [(0.0, 0.0)], 0.3)


def test_single_fits_table_is_accepted_as_refcat(tmp_path, ra0_catalogue, ra0_store):
    path = tmp_path / "gaia.fits"
    ra0_catalogue.write(path)
    corners, _ = square_footprint(359.8, -0.2, 0.4)
    assert ids(catalog_for_footprint(path, corners, 0.1)) == ids(catalog_for_footprint(ra0_store, corners, 0.1))


# ---- epoch propagation --------------------------------------------------------------

def propagation_sample() -> Table:
    table = synthetic_gaia(300, (0.0, 360.0), (-89.0, 89.9), seed=11, two_parameter_fraction=0.2)
    # Barnard's star, and fast movers at the pole and at RA = 0
    extra = [(269.452, 4.6934, -801.551, 10362.394), (10.0, 89.99, 4000.0, -3000.0), (0.0001, -30.0, -5000.0, 200.0)]
    for i, (ra, dec, pmra, pmdec) in enumerate(extra):
        table["ra"][i], table["dec"][i], table["pmra"][i], table["pmdec"][i] = ra, dec, pmra, pmdec
        table["pmra_error"][i] = table["pmdec_error"][i] = 0.05
    return table


def test_propagation_matches_apply_space_motion_to_01_mas():
    table = propagation_sample()
    epoch = Time("2026-01-01T00:00:00", scale="utc")
    moved = propagate_to_epoch(table, epoch)
    has_pm = np.isfinite(table["pmra"])
    start = SkyCoord(ra=table["ra"][has_pm] * u.deg, dec=table["dec"][has_pm] * u.deg,
                     pm_ra_cosdec=table["pmra"][has_pm] * u.mas / u.yr, pm_dec=table["pmdec"][has_pm] * u.mas / u.yr,
                     distance=1e6 * u.pc, radial_velocity=0 * u.km / u.s,
                     obstime=Time(2016.0, format="jyear", scale="tcb"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = start.apply_space_motion(new_obstime=epoch)
    got = SkyCoord(np.asarray(moved["ra"])[has_pm] * u.deg, np.asarray(moved["dec"])[has_pm] * u.deg)
    offset = got.separation(SkyCoord(expected.ra, expected.dec)).to_value(u.mas)
    assert offset.max() < 0.1
    travelled = SkyCoord(table["ra"][0] * u.deg, table["dec"][0] * u.deg).separation(got[0]).arcsec
    assert travelled == pytest.approx(10.393 * 10.0, rel=1e-3)       # Barnard's star, ~10 yr
    np.testing.assert_array_equal(moved["ra"][~has_pm], table["ra"][~has_pm])
    np.testing.assert_array_equal(moved["dec"][~has_pm], table["dec"][~has_pm])


def test_propagation_inflates_errors_in_quadrature():
    table = propagation_sample()
    table["pmra_error"][5] = np.nan           # measured motion, unknown error
    epoch = Time(2026.0, format="jyear", scale="tcb")
    moved = propagate_to_epoch(table, epoch, pm_dispersion_mas_yr=5.0)
    dt = 10.0
    has_pm = np.isfinite(table["pmra"]) & np.isfinite(table["pmra_error"])
    expected_ra = np.hypot(table["ra_error"], np.where(has_pm, table["pmra_error"], 5.0) * dt)
    np.testing.assert_allclose(moved["ra_error"], expected_ra, rtol=1e-6)
    expected_dec = np.hypot(table["dec_error"], np.where(np.isfinite(table["pmra"]), table["pmdec_error"], 5.0) * dt)
    np.testing.assert_allclose(moved["dec_error"], expected_dec, rtol=1e-6)
    assert moved["ra"][5] != table["ra"][5]                       # still moved by its motion
    np.testing.assert_allclose(moved["ref_epoch"], 2026.0)
    again = propagate_to_epoch(moved, epoch)
    np.testing.assert_array_equal(again["ra_error"], moved["ra_error"])


def test_scamp_reference_table_and_file(tmp_path):
    table = propagation_sample()
    table["phot_g_mean_mag"][7] = np.nan
    epoch = Time("2024-07-01T06:00:00", scale="utc")
    ref = scamp_reference_table(table, epoch)
    moved = propagate_to_epoch(table, epoch)
    np.testing.assert_array_equal(ref["X_WORLD"], moved["ra"])
    np.testing.assert_allclose(ref["ERRA_WORLD"], moved["ra_error"] / 3.6e6, rtol=1e-6)
    np.testing.assert_allclose(ref["ERRB_WORLD"], moved["dec_error"] / 3.6e6, rtol=1e-6)
    np.testing.assert_allclose(ref["OBSDATE"], epoch.tcb.jyear)
    assert ref["MAG"][7] == 99.0 and ref["MODEL"][7] & catalogs.epoch.MODEL_NO_MAGNITUDE
    two = ~np.isfinite(table["pmra"])
    assert np.all(ref["MODEL"][two] & catalogs.epoch.MODEL_NO_PROPER_MOTION)
    assert not np.any(ref["FLAGS"]) and len(ref) == len(table) and ref.meta["NLEFTOUT"] == 0
    assert ref["FLAGS"].dtype == np.int16 and ref["X_WORLD"].unit == u.deg
    path = write_scamp_reference(tmp_path / "ref.ldac", ref)
    back, header = read_ldac(path)
    assert header is None and len(back) == len(ref)
    from astropy.io import fits
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "LDAC_OBJECTS"]
        assert hdul["LDAC_OBJECTS"].header["TUNIT1"] == "deg"
    with pytest.raises(CatalogError, match="no reference stars"):
        write_scamp_reference(tmp_path / "empty.ldac", ref[:0])


def test_a_table_without_optional_columns_flags_no_row():
    """pmra_error/pmdec_error absent (or proper motion, G missing) change only the errors:
    SCAMP applies FLAGS_MASK to the references too, so no row may carry a FLAGS bit."""
    full = propagation_sample()
    full["phot_g_mean_mag"][3] = np.nan
    lean = full.copy()
    del lean["pmra_error"], lean["pmdec_error"]
    epoch = Time("2024-07-01T06:00:00", scale="utc")
    with_errors, without = scamp_reference_table(full, epoch), scamp_reference_table(lean, epoch)
    assert len(without) == len(with_errors) == len(full)
    assert not np.any(without["FLAGS"]) and not np.any(with_errors["FLAGS"])
    np.testing.assert_array_equal(without["X_WORLD"], with_errors["X_WORLD"])
    moving = np.isfinite(full["pmra"])
    assert np.all(without["MODEL"][moving] & catalogs.epoch.MODEL_NO_PM_ERROR)
    # the error model: the assumed 5 mas/yr dispersion instead of the measured pm error
    dt = epoch.tcb.jyear - 2016.0
    expected = np.hypot(np.asarray(full["ra_error"], float), 5.0 * dt) / 3.6e6
    np.testing.assert_allclose(without["ERRA_WORLD"], expected, rtol=1e-5)
    assert np.all(without["ERRA_WORLD"][moving] >= with_errors["ERRA_WORLD"][moving])


def test_rows_scamp_cannot_weigh_are_left_out_and_counted():
    table = propagation_sample()
    table["ra_error"][[4, 9]] = np.nan
    table["dec_error"][11] = np.nan
    ref = scamp_reference_table(table, Time("2024-07-01T06:00:00", scale="utc"))
    assert len(ref) == len(table) - 3 and ref.meta["NLEFTOUT"] == 3 and ref.meta["NINPUT"] == len(table)
    assert np.all(np.isfinite(ref["ERRA_WORLD"])) and np.all(ref["ERRB_WORLD"] > 0)
    table["ra_error"][:] = np.nan
    assert len(scamp_reference_table(table, Time(2024.5, format="jyear"))) == 0


# ---- command --------------------------------------------------------------------------

def run_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="skydiff")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config")
    common.add_argument("-v", "--verbose", action="store_true")
    catalogs_command.register(parser.add_subparsers(dest="command"), common)
    args = parser.parse_args(argv)
    args.cfg = load_config(args.config)
    return cli.run_command(args)    # as skydiff runs it: a propagated failure becomes its status


def test_command_prefetch_from_table_and_info(tmp_path, ra0_catalogue, capsys, caplog):
    table_path = tmp_path / "sim_gaia.fits"
    ra0_catalogue.write(table_path)
    store = tmp_path / "store"
    with caplog.at_level(logging.INFO, logger="skydiff.catalogs"):
        status = run_command(["catalogs", "prefetch", "--from-table", str(table_path), "--field", "0.5", "0.0",
                              "--field-size", "1.5", "1.5", "--store", str(store), "--mag-limit", "19"])
    assert status == 0
    assert any("tile(s) written" in record.getMessage() for record in caplog.records)
    info = read_store_info(store)
    assert info.total_rows > 0 and all(e.mag_limit == 19.0 for e in info.tiles.values())
    assert run_command(["catalogs", "info", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert f"tiles   {len(info.tiles)}" in out and str(min(info.tiles)) in out


def test_command_errors_exit_nonzero_with_a_message(tmp_path, caplog):
    bad = tmp_path / "bad.fits"
    bad.write_text("garbage")
    with caplog.at_level(logging.ERROR, logger="skydiff.catalogs"):
        assert run_command(["catalogs", "prefetch", "--from-table", str(bad), "--box", "0", "1", "0", "1",
                            "--store", str(tmp_path / "s")]) == 3
        assert run_command(["catalogs", "prefetch", "--from-table", str(bad), "--store", str(tmp_path)]) == 2
        assert run_command(["catalogs", "info", "--store", str(tmp_path / "none")]) == 3
    text = caplog.text
    assert "bad.fits" in text and "give a region" in text and "not a catalogue store" in text


def test_prefetch_logs_one_summary_line_not_one_per_tile(tmp_path, ra0_catalogue, caplog):
    """A field is dozens of tiles: one INFO summary, the per-tile lines at DEBUG."""
    caplog.set_level(logging.DEBUG, logger="skydiff")
    result = prefetch_from_table(ra0_catalogue, tmp_path, cone_region(0.0, 0.0, 1.5))
    assert len(result.written) > 5
    mine = [r for r in caplog.records if r.name == "skydiff.catalogs"]
    info = [r for r in mine if r.levelno >= logging.INFO]
    assert len(info) == 1 and f"{len(result.written)} tile(s) written" in info[0].getMessage()
    assert sum("tile " in r.getMessage() and r.levelno == logging.DEBUG for r in mine) == len(result.written)
