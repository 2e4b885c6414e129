"""Forced photometry against the simulator's truth: the difference-image archive, fp_hists in
the alerts, ``skydiff forcedphot`` and the service's forced-photometry endpoint.

Two science epochs of the session's simulated survey (quadrant 21, its reference from the
earlier season) are subtracted through the stage's file edge with their true WCS and
archived; forced fluxes at the simulator's transients and at empty positions are compared
with the truth files (transients absent from the reference season: the true difference
flux is the transient's own; empty positions: zero).
"""
from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import fastavro
import numpy as np
import pytest
from astropy.table import Table
from scipy.spatial import cKDTree

from _survey import RCID
from alerts.from_subtraction import alerts_from_result
from alerts.history import SQLiteHistoryStore
from alerts.ids import make_pid
from alerts.schema import serialize_alert
from pipeline.cli import main
from pipeline.forcedphot.archive import DifferenceArchive, archive_subtraction
from pipeline.forcedphot.lightcurves import MISSING, PROCSTATUS, forced_photometry
from pipeline.reference.files import reference_filename
from pipeline.run.quadrant import locate_quadrant
from pipeline.simulate.pairs import coadd_true_mag, read_with_true_wcs
from pipeline.subtraction.files import subtract_quadrant

EPOCHS = 2
N_EMPTY = 300


@pytest.fixture(scope="module")
def archived(survey21, tmp_path_factory):
    """Two science epochs subtracted and archived; per epoch the run, the truth table and the
    science image's WCS."""
    run = tmp_path_factory.mktemp("forcedphot")
    cfg = survey21.cfg.replace(paths__fparchive=str(run / "archive"))
    sim = Path(cfg.paths.root) / "sim"
    epochs = []
    for expid in survey21.science[:EPOCHS]:
        image, _ = locate_quadrant(survey21.exposures[expid], RCID)
        truth_path = sim / "truth" / image.parent.name / f"{image.stem}_truth.fits"
        science = read_with_true_wcs(image, truth_path)
        meta = science.meta
        reference = cfg.paths.resolve("references") / reference_filename(meta.fieldid, meta.ccdid, meta.qid,
                                                                         meta.filter)
        subtraction = subtract_quadrant(science, reference, run / str(expid), cfg,
                                        refcat=cfg.paths.resolve("catalogs"))
        assert subtraction.status == 0
        archive_subtraction(cfg.paths.resolve("fparchive"), science.header, science.wcs, subtraction.result,
                            subtraction.reference, cfg.forcedphot)
        epochs.append({"expid": expid, "run": subtraction, "truth": Table.read(truth_path, "TRUTH"), "sim": sim,
                       "wcs": science.wcs, "shape": science.data.shape})
    return cfg, epochs


def _kind(truth) -> np.ndarray:
    return np.char.strip(np.asarray(truth["kind"]).astype(str))


def _mags(truth, kind: str) -> dict:
    own = _kind(truth) == kind
    return dict(zip(np.asarray(truth["id"])[own].tolist(), np.asarray(truth["mag"], float)[own].tolist()))


def _series(epochs, kind: str, variable_only: bool = False):
    """Sky positions of the first epoch's objects of ``kind`` (unsaturated; only the variable
    ones if asked) and their true difference flux per epoch in science DN.

    The true difference is the science flux less the reference's: the coadd's weighted mean
    of its frames' true fluxes (their truth files).  For a transient that is not nothing: the
    simulator's light curves are faint but finite months before their peak.
    """
    first = epochs[0]["truth"]
    chosen = (_kind(first) == kind) & ~np.asarray(first["saturated"], bool)
    if variable_only:
        chosen &= np.asarray(first["variable"], bool)
    ids = np.asarray(first["id"])[chosen]
    reference = epochs[0]["run"].reference
    frame_mags = {}
    for expid in np.asarray(reference.frames["expid"]).tolist():
        (truth_path,) = (epochs[0]["sim"] / "truth" / str(expid)).glob("*_truth.fits")
        frame_mags[expid] = _mags(Table.read(truth_path, "TRUTH"), kind)
    reference_mag = coadd_true_mag(reference.frames, frame_mags, ids)
    true_flux = []
    for epoch in epochs:
        t = epoch["truth"]
        own = _kind(t) == kind
        flux = dict(zip(np.asarray(t["id"])[own].tolist(), np.asarray(t["flux_adu"], float)[own].tolist()))
        zp = epoch["run"].result.zp_science           # forcediffimflux's scale: the measured zero point
        true_flux.append(np.array([flux.get(i, 0.0) for i in ids.tolist()]) - 10 ** (0.4 * (zp - reference_mag)))
    return np.asarray(first["ra"])[chosen], np.asarray(first["dec"])[chosen], true_flux


def _positions(epochs, seed: int = 5):
    """Transients (sky positions, true difference flux per epoch in science DN, see
    :func:`_series`) and empty positions."""
    first = epochs[0]["truth"]
    rng = np.random.default_rng(seed)
    ny, nx = epochs[0]["shape"]
    x, y = rng.uniform(40, nx - 40, 4 * N_EMPTY), rng.uniform(40, ny - 40, 4 * N_EMPTY)
    # Empty: nothing varying within 10 px, no source brighter than mag 20 within 8 px.
    varying = np.asarray(first["variable"], bool) | np.asarray(first["transient"], bool)
    bright = np.asarray(first["mag"], float) < 20.0
    points = np.column_stack([x, y])
    far = np.ones(len(x), bool)
    for sel, radius in ((varying, 10.0), (bright, 8.0)):
        tree = cKDTree(np.column_stack([np.asarray(first["x"])[sel], np.asarray(first["y"])[sel]]))
        far &= ~np.isfinite(tree.query(points, distance_upper_bound=radius)[0])
    ra, dec = epochs[0]["wcs"].all_pix2world(x[far][:N_EMPTY], y[far][:N_EMPTY], 1)
    return _series(epochs, "transient"), (ra, dec)


def _pulls(table, true_flux_per_epoch, expids):
    measured = table[table["forcediffimflux"] != MISSING]
    pulls = []
    for expid, truth in zip(expids, true_flux_per_epoch):
        rows = measured[measured["expid"] == expid]
        pulls.append((np.asarray(rows["forcediffimflux"]) - truth[np.asarray(rows["index"])])
                     / np.asarray(rows["forcediffimfluxunc"]))
    return np.concatenate(pulls)


def test_forced_fluxes_are_unbiased_with_honest_errors(archived):
    cfg, epochs = archived
    archive = DifferenceArchive(cfg.paths.resolve("fparchive"))
    (t_ra, t_dec, t_flux), (e_ra, e_dec) = _positions(epochs)
    expids = [e["expid"] for e in epochs]
    transients = forced_photometry(archive, t_ra, t_dec, config=cfg.forcedphot)
    # Each epoch measures each transient on it once (one may fall off an epoch's edge).
    assert len(set(zip(transients["index"].tolist(), transients["expid"].tolist()))) == len(transients)
    assert len(transients) >= EPOCHS * len(t_ra) - 2
    pulls = _pulls(transients, t_flux, expids)
    assert len(pulls) >= EPOCHS * len(t_ra) - 2
    print("transient pulls", np.median(pulls), np.std(pulls))
    assert abs(np.median(pulls)) < 0.5 and 0.6 < np.std(pulls) < 1.6, pulls
    detected = transients[transients["isdetection"]]
    assert len(detected) and np.all(np.abs(detected["mag"] - (detected["zpdiff"] - 2.5 * np.log10(
        detected["forcediffimflux"]))) < 1e-9)
    empty = forced_photometry(archive, e_ra, e_dec, config=cfg.forcedphot)
    pulls = _pulls(empty, [np.zeros(len(e_ra))] * EPOCHS, expids)
    assert len(pulls) >= 0.95 * EPOCHS * len(e_ra)
    print("empty pulls", np.median(pulls), np.std(pulls))
    # The epochs share the reference's noise, so the pulls of one position are correlated.
    assert abs(np.median(pulls)) < 0.2 and 0.85 < np.std(pulls) < 1.25
    # Upper limits where nothing is detected: SNU sigma of the flux error at zpdiff.
    limits = empty[~empty["isdetection"] & (empty["forcediffimflux"] != MISSING)]
    assert np.allclose(limits["maglim"], limits["zpdiff"] - 2.5 * np.log10(5.0 * limits["forcediffimfluxunc"]))
    assert set(",".join(empty["procstatus"]).split(",")) <= set(PROCSTATUS)


def test_variable_stars_forced_fluxes_follow_truth(archived):
    cfg, epochs = archived
    ra, dec, true_flux = _series(epochs, "star", variable_only=True)
    table = forced_photometry(DifferenceArchive(cfg.paths.resolve("fparchive")), ra, dec, config=cfg.forcedphot)
    pulls = _pulls(table, true_flux, [e["expid"] for e in epochs])
    print("variable-star pulls", len(pulls), np.median(pulls), np.std(pulls))
    assert len(pulls) >= 20
    assert abs(np.median(pulls)) < 0.5 and 0.6 < 1.4826 * np.median(np.abs(pulls - np.median(pulls))) < 1.6


def test_alerts_carry_fp_hists_of_the_earlier_epoch(archived, tmp_path):
    cfg, epochs = archived
    later = epochs[1]
    run = later["run"]
    with SQLiteHistoryStore(tmp_path / "history.sqlite") as store:
        context, alerts = alerts_from_result(run.result, run.science.header, run.science.wcs, run.reference, cfg,
                                             store)
    assert alerts
    first_jd = epochs[0]["run"].science.meta.obsmjd + 2400000.5
    # One entry each, of the earlier epoch, never of this one (a candidate at the edge of this
    # image may lie off the earlier one's).
    assert sum(len(a["fp_hists"]) == 1 for a in alerts) >= 0.9 * len(alerts)
    for alert in alerts:
        hists = alert["fp_hists"]
        assert [h["jd"] for h in hists] == pytest.approx([first_jd] * len(hists))
        if not hists:
            continue
        h = hists[0]
        assert h["pid"] == make_pid(epochs[0]["expid"], RCID)
        assert h["field"] == context.field and h["rcid"] == RCID and h["fid"] == context.fid
        assert h["rfid"] == context.rfid and h["magzpsci"] > 20 and h["sciinpseeing"] > 0
        assert h["procstatus"] in PROCSTATUS or set(h["procstatus"].split(",")) <= set(PROCSTATUS)
    # The v4.02 schema accepts the records, and they read back as written.
    packet = fastavro.reader(io.BytesIO(serialize_alert(alerts[0])))
    assert next(iter(packet))["fp_hists"][0]["procstatus"] == alerts[0]["fp_hists"][0]["procstatus"]
    # Bright positive candidates of the later epoch that are transients: the earlier forced
    # flux agrees with the truth of the earlier epoch.
    (t_ra, t_dec, t_flux), _ = _positions(epochs)
    tree = cKDTree(np.column_stack([t_ra, t_dec]))
    pulls = []
    for alert in alerts:
        c = alert["candidate"]
        d, i = tree.query([c["ra"], c["dec"]], distance_upper_bound=1.5 / 3600)
        if np.isfinite(d) and c["isdiffpos"] == "t" and alert["fp_hists"]:
            h = alert["fp_hists"][0]
            pulls.append((h["forcediffimflux"] - t_flux[0][i]) / h["forcediffimfluxunc"])
    # Nuclear transients carry their host's subtraction residual (no part of the error model).
    assert len(pulls) >= 3 and abs(np.median(pulls)) < 1.0 and np.all(np.abs(pulls) < 8), pulls


def test_rerun_replaces_and_retention_prunes(archived, tmp_path):
    cfg, epochs = archived
    root = tmp_path / "archive"
    run = epochs[0]["run"]
    first = archive_subtraction(root, run.science.header, run.science.wcs, run.result, run.reference, cfg.forcedphot)
    again = archive_subtraction(root, run.science.header, run.science.wcs, run.result, run.reference, cfg.forcedphot)
    assert not first["replaced"] and again["replaced"]
    later = epochs[1]["run"]
    short = cfg.forcedphot.__class__(retention_days=1e-4)     # the first epoch falls out
    pruned = archive_subtraction(root, later.science.header, later.science.wcs, later.result, later.reference, short)
    assert pruned["pruned"] == 1 and not Path(first["path"]).exists()
    ra, dec = later.science.wcs.all_pix2world([1500.0], [1500.0], 1)
    assert [e.row["expid"] for e in DifferenceArchive(root).epochs(ra, dec)] == [epochs[1]["expid"]]


def test_forcedphot_command_formats_and_plot(archived, tmp_path, capsys):
    cfg, epochs = archived
    (t_ra, t_dec, _), _ = _positions(epochs)
    positions = tmp_path / "positions.csv"
    Table({"ra": t_ra[:3], "dec": t_dec[:3]}).write(positions, format="ascii.csv")
    config = tmp_path / "skydiff.toml"
    config.write_text(f'[paths]\nroot = "{cfg.paths.root}"\nfparchive = "{cfg.paths.fparchive}"\n')
    out = tmp_path / "fp.ecsv"
    assert main(["forcedphot", "--config", str(config), "--positions", str(positions), "--format", "ecsv",
                 "-o", str(out), "--plot", str(tmp_path / "fp.png"), "--no-progress"]) == 0
    table = Table.read(out, format="ascii.ecsv")
    assert len(table) == 3 * EPOCHS and (tmp_path / "fp.png").stat().st_size > 0
    assert main(["forcedphot", "--config", str(config), "--pos", str(t_ra[0]), str(t_dec[0]), "--format", "json",
                 "--band", "r", "--no-progress"]) == 0
    payload = json.loads(capsys.readouterr().out)
    names = [c["name"] for c in payload["columns"]]
    assert len(payload["data"]) == EPOCHS and {row[names.index("fid")] for row in payload["data"]} == {2}
    assert main(["forcedphot", "--config", str(config), "--pos", str(t_ra[0]), str(t_dec[0]), "--format", "csv",
                 "--band", "g", "--no-progress"]) == 0
    assert len(Table.read(capsys.readouterr().out, format="ascii.csv")) == 0
    assert main(["forcedphot", "--config", str(config), "--pos", "400", "0"]) == 2
    assert main(["forcedphot", "--config", str(config), "--positions", str(tmp_path / "missing.csv")]) == 3


@pytest.fixture(scope="module")
def service(archived, tmp_path_factory):
    from pipeline.matchfile.service import make_server

    cfg, epochs = archived
    matchfiles = tmp_path_factory.mktemp("fp_matchfiles")
    server = make_server(matchfiles, "127.0.0.1", 0, archive=cfg.paths.resolve("fparchive"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", epochs
    server.shutdown()
    server.server_close()


def _get(base, query):
    from pipeline.matchfile.service import FORCED_PATH

    try:
        with urllib.request.urlopen(f"{base}{FORCED_PATH}?{query}", timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_service_forced_photometry_endpoint(service):
    base, epochs = service
    (t_ra, t_dec, _), _ = _positions(epochs)
    pos = "&".join("POS=" + quote(f"{r} {d}") for r, d in zip(t_ra[:4], t_dec[:4]))
    status, body = _get(base, pos + "&FORMAT=CSV")
    assert status == 200
    table = Table.read(body.decode(), format="ascii.csv")
    assert len(table) == 4 * EPOCHS and sorted(set(table["index"])) == [0, 1, 2, 3]
    status, body = _get(base, pos + "&FORMAT=JSON&BANDNAME=g")
    assert status == 200 and json.loads(body)["data"] == []
    for bad in ("POS=" + quote("400 0"), "POS=" + quote("1 2 3"), pos + "&TIME=" + quote("5 1"),
                pos + "&FORMAT=XLS", "BANDNAME=r", pos + "&COLOUR=red"):
        status, body = _get(base, bad)
        assert status == 400 and body.startswith(b"ERROR: "), (bad, body)
