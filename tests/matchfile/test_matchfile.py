"""Matchfiles: truth-consistent light curves, replacement, layout, errors and the fold's lock."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from astropy.table import Table

from pipeline.matchfile.lightcurves import LightcurveReader, MatchfileSnapshot
from pipeline.matchfile.store import (EpochMeta, MatchfileConfig, MatchfileError, MatchfileLockTimeout, append_epoch,
                                combine, create_matchfile, match_epoch, matchfile_lock, pending_shards)
from pipeline.matchfile.layout import LAYOUT_VERSION, LayoutError, TABLES, UNCOMPRESSED, make_oid, split_oid
from pipeline.simulate.matchfile_truth import synthetic_epoch, synthetic_sky
from pipeline.core.refraction import site_location

MJDS = [60000.0 + night + 0.04 * k for night in range(4) for k in range(4)]   # 4 nights x 4 epochs


@pytest.fixture(scope="module")
def survey(tmp_path_factory, cfg):
    """A matchfile filled with 16 epochs of a 1500-star sky (half folded, half pending)."""
    root = tmp_path_factory.mktemp("matchfiles")
    sky = synthetic_sky(1500, 359.9, 20.0, seed=3, variable_fraction=0.15, transient_mjd=(60001.0, 60002.5))
    path = create_matchfile(root, sky.reference, sky.meta)
    location = site_location(cfg.site)
    for i, mjd in enumerate(MJDS):
        meta, table = synthetic_epoch(sky, 5000 + i, mjd)
        append_epoch(path, meta, table, location)
        if i == 7:
            assert combine(path) == 8
    return root, path, sky


def test_light_curves_match_truth(survey):
    root, path, sky = survey
    snap = MatchfileSnapshot(path)
    assert len(snap.exposures["expid"]) == len(MJDS) and len(pending_shards(path)) == 8
    table = snap.lightcurve_table(np.arange(len(snap.ids)))
    local = np.asarray(table["oid"]) % 10**8
    row = np.searchsorted(np.asarray(sky.reference["id"]), local)
    truth = sky.true_mag[row] + sky.amplitude[row] * np.sin(2 * np.pi * np.asarray(table["mjd"]) / sky.period_d[row]
                                                            + sky.phase[row])
    pull = (np.asarray(table["mag"]) - truth) / np.asarray(table["magerr"])
    bright = np.asarray(table["magerr"]) < 0.1           # Gaussian regime of the magnitude error
    variable = sky.amplitude[row] > 0
    assert 0.8 < np.std(pull[bright & variable]) < 1.25
    assert 0.8 < np.std(pull[bright & ~variable]) < 1.25
    # Constant stars repeat to their photon-noise limit: scatter / quoted error ~ 1.
    ratios = []
    for oid in np.unique(np.asarray(table["oid"])[~variable & bright]):
        rows = table[table["oid"] == oid]
        if len(rows) >= 12:
            ratios.append(np.std(rows["mag"], ddof=1) / np.median(rows["magerr"]))
    assert len(ratios) > 200 and 0.85 < np.median(ratios) < 1.15
    # HJD per row differs from mid-exposure JD by the light-travel time (|ltt| < 8.4 min).
    ltt = (np.asarray(table["hjd"]) - (np.asarray(table["mjd"]) + 2400000.5 + 15 / 86400)) * 86400
    assert np.all(np.abs(ltt) < 505) and np.ptp(ltt) > 10


def test_transient_lands_in_unmatched_table(survey):
    root, path, sky = survey
    found = LightcurveReader(root).unmatched(sky.transient_ra, sky.transient_dec, 1.5 / 3600)
    active = [5000 + i for i, mjd in enumerate(MJDS) if sky.transient_mjd[0] <= mjd <= sky.transient_mjd[1]]
    assert sorted(found["expid"]) == active
    pull = (np.asarray(found["mag"]) - sky.transient_mag) / np.asarray(found["magerr"])
    assert np.all(np.abs(pull) < 5)


def test_layout_is_documented_in_the_file(survey):
    _, path, sky = survey
    with h5py.File(path, "r") as h5:
        assert h5.attrs["layout_version"] == LAYOUT_VERSION and h5.attrs["kind"] == "matchfile"
        for table, (_, specs) in TABLES.items():
            for spec in specs:
                ds = h5[table][spec.name]
                assert ds.compression == (None if spec.name in UNCOMPRESSED else "gzip")
                assert ds.maxshape == (None,) and ds.chunks is not None
                assert ds.attrs["description"]
        assert h5["sources"]["id"].shape[0] == len(sky.reference)
        counts = h5["sources"]["phot_count"][...]
        assert counts.sum() == h5["photometry"]["objid"].shape[0]


def test_reappending_an_epoch_replaces_it(tmp_path, cfg):
    sky = synthetic_sky(300, 120.0, 40.0, seed=5)
    path = create_matchfile(tmp_path, sky.reference, sky.meta)
    assert create_matchfile(tmp_path, sky.reference, sky.meta) == path          # idempotent seeding
    location = site_location(cfg.site)
    meta, table = synthetic_epoch(sky, 77, 60000.1)
    append_epoch(path, meta, table, location)
    combine(path)
    for attempt in range(2):                                 # once over the folded copy, once over a shard
        shifted = table.copy()
        shifted["mag"] += 0.5 + attempt
        append_epoch(path, meta, shifted, location)
        snap = MatchfileSnapshot(path)
        lc = snap.lightcurve_table(np.arange(len(snap.ids)))
        assert list(snap.exposures["expid"]) == [77] and len(lc) == len(table)
        assert np.allclose(np.sort(lc["mag"]), np.sort(table["mag"] + 0.5 + attempt), atol=1e-4)
    combine(path)
    snap = MatchfileSnapshot(path)
    assert len(snap.lightcurve_table(np.arange(len(snap.ids)))) == len(table) and not pending_shards(path)


def test_match_is_one_to_one():
    match = match_epoch([10.0, 10.001], [0.0, 0.0], [10.0, 10.0 + 0.1 / 3600, 10.001, 20.0], [0, 0, 0, 0], 1.5)
    assert list(match.detection) == [0, 2] and list(match.source) == [0, 1]
    assert list(match.unmatched) == [1, 3]


def test_oid_round_trip():
    oid = int(make_oid(600, 21, 2, 1234))
    assert oid == 600212_00001234 and split_oid(oid) == (600, 21, 2, 1234)


def test_bad_inputs_name_the_problem(tmp_path, cfg):
    sky = synthetic_sky(50, 10.0, 10.0, seed=2)
    bad = sky.reference.copy()
    bad["id"][1] = bad["id"][0]
    with pytest.raises(LayoutError, match="duplicate ids"):
        create_matchfile(tmp_path, bad, sky.meta)
    with pytest.raises(LayoutError, match="missing column 'magerr'"):
        create_matchfile(tmp_path, sky.reference[["id", "ra", "dec", "mag"]], sky.meta)
    path = create_matchfile(tmp_path, sky.reference, sky.meta)
    with pytest.raises(MatchfileError, match="seeded from reference"):
        create_matchfile(tmp_path, sky.reference, sky.meta.__class__(**{**sky.meta.__dict__, "refid": 1}))
    meta, table = synthetic_epoch(sky, 3, 60000.0)
    table["dec"][0] = np.nan
    with pytest.raises(LayoutError, match="expid 3"):
        append_epoch(path, meta, table, site_location(cfg.site))
    with pytest.raises(MatchfileError, match="no such matchfile"):
        append_epoch(tmp_path / "none.h5", meta, table, site_location(cfg.site))


def test_appends_take_no_lock_and_a_fold_waiting_names_the_holder(tmp_path, cfg):
    """Appending and seeding never wait on the lock (it is not dependable across nodes); the
    fold step takes it as an extra guard and, timing out, names who held it."""
    sky = synthetic_sky(50, 10.0, 10.0, seed=2)
    path = create_matchfile(tmp_path, sky.reference, sky.meta)
    meta, table = synthetic_epoch(sky, 4, 60000.0)
    with matchfile_lock(path, 1.0):
        assert create_matchfile(tmp_path, sky.reference, sky.meta) == path
        assert append_epoch(path, meta, table, site_location(cfg.site)).nmatched > 0
        with pytest.raises(MatchfileLockTimeout, match=r"held .* for more than 0.2 s \(holder: pid \d+"):
            combine(path, MatchfileConfig(lock_timeout_s=0.2))
    assert combine(path) == 1 and not pending_shards(path)


def test_chi_sharp_filefracday_and_colour_term_reach_the_file(tmp_path, cfg):
    """Layout 2: the detections' chi and sharp, the exposure's filefracday and colour term."""
    from pipeline.simulate.matchfile_truth import CLRCOEFF, CLRCOUNC

    sky = synthetic_sky(200, 45.0, 10.0, seed=8, transient_mjd=(60000.0, 60001.0))
    path = create_matchfile(tmp_path, sky.reference, sky.meta)
    meta, table = synthetic_epoch(sky, 12, 60000.467847)      # 2023-02-25 11:13:41.98 UTC
    append_epoch(path, meta, table, site_location(cfg.site))
    combine(path)
    with h5py.File(path, "r") as h5:
        exposures = {name: h5["exposures"][name][...] for name in ("filefracday", "clrcoeff", "clrcounc")}
        phot = {name: h5["photometry"][name][...] for name in ("chi", "sharp")}
        lone = {name: h5["unmatched"][name][...] for name in ("chi", "sharp")}
    assert list(exposures["filefracday"]) == [20230225467847]
    assert exposures["clrcoeff"][0] == pytest.approx(CLRCOEFF) and exposures["clrcounc"][0] == pytest.approx(CLRCOUNC)
    assert np.allclose(np.sort(np.concatenate([phot["chi"], lone["chi"]])), np.sort(table["chi"]), atol=1e-6)
    assert np.allclose(np.sort(np.concatenate([phot["sharp"], lone["sharp"]])), np.sort(table["sharp"]), atol=1e-6)
    del table["sharp"]
    with pytest.raises(LayoutError, match="missing column 'sharp'"):
        append_epoch(path, meta, table, site_location(cfg.site))


def test_filefracday_is_the_utc_date_and_truncated_day_fraction():
    from pipeline.matchfile.layout import filefracday

    # 0.1 d is stored as 58000.09999999999...: still 100000; 0.9999996 d truncates, never
    # rounding into the next day.
    assert list(filefracday([58000.1, 58000.25, 58000.9999996, 51544.0])) == [
        20170904100000, 20170904250000, 20170904999999, 20000101000000]


def test_an_older_layout_is_refused_naming_the_file(tmp_path, cfg):
    """A version-1 matchfile (no chi/sharp) cannot be migrated: every reader and writer names it."""
    from pipeline.commands import lightcurve as lightcurve_command
    import argparse

    sky = synthetic_sky(50, 10.0, 10.0, seed=2)
    path = create_matchfile(tmp_path, sky.reference, sky.meta)
    with h5py.File(path, "a") as h5:
        h5.attrs["layout_version"] = 1
    meta, table = synthetic_epoch(sky, 3, 60000.0)
    for attempt in (lambda: append_epoch(path, meta, table, site_location(cfg.site)),
                    lambda: create_matchfile(tmp_path, sky.reference, sky.meta),
                    lambda: MatchfileSnapshot(path),
                    lambda: LightcurveReader(tmp_path).cone(10.0, 10.0, 0.1)):
        with pytest.raises(LayoutError, match=f"{path}: matchfile layout version 1.*rebuild it"):
            attempt()
    parser = argparse.ArgumentParser()
    lightcurve_command.register(parser.add_subparsers(dest="command"), argparse.ArgumentParser(add_help=False))
    args = parser.parse_args(["lightcurve", "10", "10", "--radius", "300", "--root", str(tmp_path)])
    args.cfg = cfg
    with pytest.raises(LayoutError) as raised:
        args.func(args)
    assert raised.value.exit_status == 3
