"""skydiff quadrant / exposure end to end on a simulated field with real SCAMP: a reference
season solved and coadded, then science exposures (a folder and a multi-extension file)
through astrometry, subtraction, alerts (spool) and the matchfile, with status records,
idempotence and bad-input handling."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from astropy.table import Table
from scipy.spatial import cKDTree

from catalogs.sky import radec_to_xyz
from pipeline.context.catalogs import CONTEXT_COLUMNS

from _survey import RCID
from pipeline.cli import main
from pipeline.core.image import read_quadrant


@pytest.fixture(scope="module")
def world(survey21):
    s = survey21
    return s.cfg, s.config, s.exposures[s.science[0]], s.mef, s.science


def _status(cfg, expid) -> dict:
    return json.loads((cfg.paths.resolve("outputs") / str(expid) / f"{RCID:02d}" / "status.json").read_text())


def _spooled(cfg) -> int:
    return sum(1 for p in cfg.paths.resolve("spool").rglob("*.avro"))


def test_quadrant_runs_every_stage_and_is_idempotent(world):
    cfg, config, folder, _, science = world
    assert main(["quadrant", "--config", str(config), str(folder), "--quadrant", str(RCID)]) == 0
    status = _status(cfg, science[0])
    assert status["state"] == "finished" and status["exit_code"] == 0 and status["attempt"] == 1
    assert {"astrometry", "subtraction", "alerts", "matchfile", "total"} <= set(status["timings_s"])
    assert status["astrometry"]["usable"] and status["subtraction"]["n_candidates"] > 0
    assert status["alerts"]["built"] == status["alerts"]["spooled"] > 0
    assert status["matchfile"]["matched"] > 1000
    _check_catalog_context(cfg, science[0])
    spooled = _spooled(cfg)
    # A finished quadrant is left alone; a forced rerun publishes nothing new and replaces its epoch.
    assert main(["quadrant", "--config", str(config), str(folder), "--quadrant", str(RCID)]) == 0
    assert _status(cfg, science[0])["attempt"] == 1
    assert main(["quadrant", "--config", str(config), str(folder), "--quadrant", str(RCID), "--force"]) == 0
    again = _status(cfg, science[0])
    # Without a broker the packets wait in the spool: rewritten under the same candids, none added.
    assert again["attempt"] == 2 and again["alerts"]["built"] == status["alerts"]["built"]
    assert _spooled(cfg) == spooled
    from pipeline.matchfile.lightcurves import lightcurve
    solved = read_quadrant(next(p for p in (cfg.paths.resolve("outputs") / str(science[0]) / f"{RCID:02d}"
                                            / "astrometry").glob("*.fits") if not p.name.endswith("_matches.fits")))
    ra, dec = solved.wcs.all_pix2world([1536.0], [1540.0], 1)
    table = lightcurve(float(ra[0]), float(dec[0]), 120.0, cfg.paths.resolve("matchfiles"))
    assert len(table) > 20
    pairs = {(int(o), float(m)) for o, m in zip(table["oid"], table["mjd"])}
    assert len(pairs) == len(table)    # one row per object and epoch after the forced rerun
    # The epoch carries the subtraction's calibration colour term and each fit's chi and sharp.
    qa = json.loads((cfg.paths.resolve("outputs") / str(science[0]) / f"{RCID:02d}" / "subtraction"
                     / "qa.json").read_text())
    epoch = table[table["expid"] == science[0]]
    assert len(epoch) > 20 and qa["clrcoeff"] is not None
    assert np.allclose(epoch["clrcoeff"], qa["clrcoeff"], rtol=0, atol=1e-6)
    assert np.all(np.isfinite(epoch["chi"])) and np.all(np.isfinite(epoch["sharp"]))


def test_a_bad_copy_of_a_finished_quadrant_changes_nothing(world, tmp_path, caplog):
    """Another, unreadable copy of a finished quadrant (same EXPID and RCID, all NaN) neither
    reruns it nor overwrites its record; forced, it fails and the finished record is kept
    inside the failure record."""
    import numpy as np
    from astropy.io import fits

    cfg, config, folder, _, science = world
    assert main(["quadrant", "--config", str(config), str(folder), "--quadrant", str(RCID)]) == 0
    finished = _status(cfg, science[0])
    assert finished["state"] == "finished"
    original = next(p for p in sorted(folder.glob("*.fits")) if fits.getheader(p).get("RCID") == RCID)
    copy = tmp_path / "copy"
    copy.mkdir()
    with fits.open(original) as hdul:
        hdul[0].data = np.full(hdul[0].data.shape, np.nan, dtype=np.float32)
        hdul.writeto(copy / original.name)
    (copy / "empty.fits").write_bytes(b"")
    assert main(["quadrant", "--config", str(config), str(copy), "--quadrant", str(RCID)]) == 0
    assert main(["exposure", "--config", str(config), str(copy), "--jobs", "1"]) == 0
    assert _status(cfg, science[0]) == finished
    assert "empty.fits: skipped" in caplog.text
    code = main(["quadrant", "--config", str(config), str(copy), "--quadrant", str(RCID), "--force"])
    assert code in (3, 4)
    failed = _status(cfg, science[0])
    assert failed["state"] in ("failed", "unusable") and failed["exit_code"] == code
    if failed["state"] == "failed":
        assert failed["stage"] == "read" and failed["previous"] == finished
    # Put the finished state back for the tests that follow.
    assert main(["quadrant", "--config", str(config), str(folder), "--quadrant", str(RCID), "--force"]) == 0


def _check_catalog_context(cfg, expid: int) -> None:
    """The candidates carry the PS1/Gaia context; hosted simulated transients get their host."""
    cands = Table.read(cfg.paths.resolve("outputs") / str(expid) / f"{RCID:02d}" / "subtraction" / "candidates.ecsv")
    assert set(CONTEXT_COLUMNS) <= set(cands.colnames)
    for name in CONTEXT_COLUMNS:
        assert np.all(np.isfinite(np.asarray(cands[name], dtype=float))), name
    sim = cfg.paths.resolve("root") / "sim"
    transients = Table.read(sim / "truth" / "transients.ecsv")
    ps1_truth = Table.read(sim / "truth" / "ps1_objects.fits")
    galaxy_objid = {int(row): int(objid) for row, objid, klass in
                    zip(ps1_truth["sim_row"], ps1_truth["objid"], ps1_truth["sim_class"]) if klass == 0}
    hosted = transients[(transients["host_galaxy_id"] > 0)]
    tree = cKDTree(radec_to_xyz(np.asarray(cands["ra"]), np.asarray(cands["dec"])))
    dist, nearest = tree.query(radec_to_xyz(np.asarray(hosted["ra"]), np.asarray(hosted["dec"])))
    matched = np.degrees(dist) * 3600 < 1.5
    checked = 0
    for transient, cand in zip(hosted[matched], cands[nearest[matched]]):
        host = galaxy_objid.get(int(transient["host_galaxy_id"]) - 1)
        if host is None:                   # host fainter than the PS1 catalogue
            continue
        checked += 1
        assert host in {int(cand[f"objectidps{k}"]) for k in (1, 2, 3)}
        if transient["kind"] == "nuclear":
            assert int(cand["objectidps1"]) == host and cand["distpsnr1"] < 1.0
    assert checked >= 1


def test_exposure_runs_a_multi_extension_file(world, capsys):
    cfg, config, _, mef, science = world
    assert main(["exposure", "--config", str(config), str(mef), "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert f"exposure {science[1]}" in out and "1 finished" in out
    summary = json.loads((cfg.paths.resolve("outputs") / str(science[1]) / "summary.json").read_text())
    assert summary["counts"] == {"finished": 1} and summary["reprocess"] == [] and summary["alerts"] > 0


def test_bad_inputs_are_named_and_recorded(world, tmp_path):
    cfg, config, folder, mef, science = world
    assert main(["quadrant", "--config", str(config), str(folder), "--quadrant", "5"]) == 3
    assert main(["quadrant", "--config", str(config), str(tmp_path / "nothing"), "--quadrant", "5"]) == 3
    broken = tmp_path / "broken.fits"
    broken.write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    assert main(["quadrant", "--config", str(config), str(broken), "--quadrant", str(RCID)]) == 3


def test_products_made_from_relative_paths_publish_from_anywhere(world, tmp_path, monkeypatch):
    """``skydiff subtract`` given relative paths records absolute ones in qa.json, so
    ``skydiff alerts publish`` works from another working directory."""
    cfg, config, folder, _, science = world
    assert main(["quadrant", "--config", str(config), str(folder), "--quadrant", str(RCID)]) == 0
    astrometry = cfg.paths.resolve("outputs") / str(science[0]) / f"{RCID:02d}" / "astrometry"
    solved = next(p for p in astrometry.glob("*.fits") if not p.name.endswith("_matches.fits"))
    reference = next(cfg.paths.resolve("references").glob("*.fits"))
    monkeypatch.chdir(solved.parent)
    out = tmp_path / "sub"
    assert main(["subtract", "--config", str(config), solved.name, os.path.relpath(reference, solved.parent),
                 "--out", str(out)]) == 0
    qa = json.loads((out / "qa.json").read_text())
    assert qa["science"] == str(solved.resolve()) and qa["reference"] == str(reference.resolve())
    monkeypatch.chdir(tmp_path)
    assert main(["alerts", "publish", "--config", str(config), str(out), "--spool", str(tmp_path / "spool"),
                 "--history", str(tmp_path / "history.sqlite")]) == 0


def test_a_reference_made_elsewhere_is_imported_and_serves_the_quadrant_runner(survey21, tmp_path):
    """The session survey's reference stripped to a plain coadd (tests/_external_data.py),
    stored by ``skydiff reference import`` into ``paths.references`` (found by the runner's
    own lookup), then a science quadrant through every stage: the simulated transients on it
    are found with their true magnitudes, and alerts are built."""
    from astropy.io import fits
    from _cli import run_skydiff
    from _external_data import plain_coadd
    from pipeline.reference.files import read_reference
    from pipeline.run.quadrant import run_quadrant

    native_path = next(survey21.cfg.paths.resolve("references").glob("ref_*.fits"))
    plain = plain_coadd(read_reference(native_path), tmp_path / "coadd.fits")
    cfg = survey21.cfg.replace(paths__references=str(tmp_path / "refs"), paths__outputs=str(tmp_path / "outputs"),
                               paths__spool=str(tmp_path / "spool"), paths__history=str(tmp_path / "history.sqlite"),
                               paths__matchfiles=str(tmp_path / "matchfiles"))
    assert run_skydiff(["reference", "import", str(plain), "--refcat", str(cfg.paths.resolve("catalogs"))], cfg) == 0
    assert (tmp_path / "refs" / native_path.name).exists()
    expid = survey21.science[0]
    code, record = run_quadrant(survey21.exposures[expid], RCID, cfg)
    assert code == 0, record
    assert record["alerts"]["built"] == record["alerts"]["spooled"] > 0
    candidates = Table.read(tmp_path / "outputs" / str(expid) / f"{RCID:02d}" / "subtraction" / "candidates.ecsv")
    (truth_path,) = (survey21.cfg.paths.resolve("root") / "sim" / "truth" / str(expid)).glob("*_truth.fits")
    with fits.open(truth_path) as hdul:
        truth = Table(hdul["TRUTH"].data)
    transients = truth[(truth["kind"] == "transient") & (truth["mag"] < 20.0)]
    tree = cKDTree(np.column_stack([candidates["xpos"], candidates["ypos"]]))
    dist, index = tree.query(np.column_stack([transients["x"], transients["y"]]))
    found = (dist <= 2.0) & np.asarray(candidates["isdiffpos"])[index]
    delta = np.asarray(candidates["magpsf"])[index[found]] - np.asarray(transients["mag"])[found]
    print(f"\nimported reference, quadrant runner: {found.sum()} of {len(transients)} simulated transients "
          f"(r < 20) found; magpsf - true mag: median {np.median(delta):+.3f}, max |.| {np.max(np.abs(delta)):.3f}")
    assert len(transients) >= 3 and found.mean() >= 0.9
    assert abs(np.median(delta)) < 0.05


def _announced_quadrants(folder):
    """An exposure folder of three quadrant files with a raw WCS, one without a WCS and one
    file that is no FITS image; returns their rcids (with WCS, without) and the folder."""
    from astropy.io import fits

    from pipeline.core.image import rcid_of, write_quadrant

    folder.mkdir()
    contract = dict(FIELDID=600, FILTER="ZTF_r", FILTERID=2, OBSMJD=61114.3, EXPTIME=30.0, EXPID=299500001,
                    PROGRMID=1, TELRA=150.0, TELDEC=33.0, AIRMASS=1.02, GAIN=6.2, READNOI=8.0, SATURATE=50000.0)
    wcs = dict(CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRVAL1=150.0, CRVAL2=33.0, CRPIX1=8.0, CRPIX2=6.0,
               CDELT1=-0.000281, CDELT2=0.000281)
    rcids = []
    for ccdid, qid, with_wcs in [(6, 1, True), (6, 2, True), (16, 4, True), (7, 3, False)]:
        header = fits.Header({**contract, "CCDID": ccdid, "QID": qid, "RCID": rcid_of(ccdid, qid),
                              **(wcs if with_wcs else {})})
        write_quadrant(folder / f"q{ccdid:02d}_{qid}.fits", np.ones((12, 16), np.float32), header,
                       np.zeros((12, 16), np.int16))
        rcids.append(rcid_of(ccdid, qid))
    (folder / "notes.fits").write_text("not a FITS file\n")
    return rcids[:3], rcids[3]


def test_pending_images_read_each_quadrant_file_once(tmp_path, monkeypatch, caplog):
    """``skydiff submit`` announces an exposure's quadrants from their headers in one pass:
    each file of a folder exposure opened once, a multi-extension exposure opened once (not a
    scan of the folder per rcid), with the same warnings for quadrants it cannot announce."""
    from collections import Counter
    from pathlib import Path

    from astropy.io import fits

    from alerts.ids import make_pid
    from pipeline.formats.exposure import write_exposure_mef
    from pipeline.run.exposure import pending_images

    folder = tmp_path / "exposure"
    good, no_wcs = _announced_quadrants(folder)
    mef = write_exposure_mef(sorted(p for p in folder.glob("q*.fits")), tmp_path / "exposure.fits")
    opened = Counter()
    fromfile = fits.HDUList.fromfile.__func__

    def counted(cls, fileobj, *args, **kwargs):
        opened[Path(fileobj).name] += 1
        return fromfile(cls, fileobj, *args, **kwargs)

    monkeypatch.setattr(fits.HDUList, "fromfile", classmethod(counted))
    for exposure, files in [(folder, sorted(p.name for p in folder.iterdir())), (mef, [mef.name])]:
        opened.clear()
        caplog.clear()
        images = pending_images(exposure)
        assert sorted(image.pid for image in images) == sorted(make_pid(299500001, rcid) for rcid in good)
        assert all(len(image.footprint) == 4 for image in images)
        assert opened == Counter(files), exposure
        assert f"rcid {no_wcs}: not announced to the object history" in caplog.text
        assert "no WCS in the header" in caplog.text
        assert ("notes.fits: skipped" in caplog.text) == (exposure == folder)
    # A quadrant asked for that the exposure lacks: named as before, the others announced.
    for exposure, missing in [(folder, "no quadrant file with RCID = 40"), (mef, "no extension Q40")]:
        caplog.clear()
        assert len(pending_images(exposure, [good[0], 40])) == 1
        assert f"rcid 40: not announced to the object history" in caplog.text and missing in caplog.text


def test_a_crowded_quadrant_measures_its_faint_sources_after_the_alerts(world, tmp_path):
    """Astrometry and subtraction detect at the calibration threshold and measure the
    brightest of those detections (fewer calibration sources than detections, as on a
    crowded quadrant), the alerts go out, and only then is every detection at the survey's
    threshold found and measured for the matchfile: the epoch holds as many sources as a run
    that detected and measured them all up front, at the same magnitudes."""
    from dataclasses import replace

    from pipeline.run.quadrant import run_quadrant

    cfg, config, folder, _, science = world

    def own_paths(base):
        folders = {name: str(base / name) for name in ("outputs", "matchfiles", "spool", "fparchive")}
        return replace(cfg.paths, history=str(base / "history" / "objects.sqlite"), **folders)

    paths = own_paths(tmp_path)
    # the reference run: one detection at the survey's threshold, every source measured
    full_cfg = replace(cfg, paths=own_paths(tmp_path / "full"),
                       astrometry=replace(cfg.astrometry, calibration_detect_thresh=0.0, calibration_sources=0))
    code, full = run_quadrant(folder, RCID, full_cfg)
    assert code == 0 and "catalog" not in full["timings_s"]
    crowded = replace(cfg, paths=paths, astrometry=replace(cfg.astrometry, scamp_max_sources=1000,
                                                           calibration_sources=1000))
    code, record = run_quadrant(folder, RCID, crowded)
    assert code == 0, record.get("reason")
    assert record["astrometry"]["usable"]
    assert record["timings_s"]["to_alerts"] < record["timings_s"]["total"] and "catalog" in record["timings_s"]
    qa = json.loads((tmp_path / "outputs" / str(science[0]) / f"{RCID:02d}" / "astrometry" / "qa.json").read_text())
    full_qa = json.loads((tmp_path / "full" / "outputs" / str(science[0]) / f"{RCID:02d}" / "astrometry"
                          / "qa.json").read_text())
    assert qa["detect_thresh"] == cfg.astrometry.calibration_detect_thresh > cfg.extraction.detect_thresh
    assert 950 <= qa["n_detections"] <= 1000 < qa["n_detected"] < 0.7 * full_qa["n_detected"]   # duplicates dropped
    assert record["catalog"]["n_detected"] == full_qa["n_detected"]
    assert record["catalog"]["n_sources"] == full_qa["n_detections"]
    assert record["alerts"]["built"] == record["alerts"]["spooled"] > 0
    assert abs(record["alerts"]["built"] - full["alerts"]["built"]) <= 0.05 * full["alerts"]["built"]
    rows = record["matchfile"]["matched"] + record["matchfile"]["unmatched"]
    assert abs(rows - (full["matchfile"]["matched"] + full["matchfile"]["unmatched"])) <= 0.01 * rows

    from pipeline.matchfile.lightcurves import lightcurve
    solved = read_quadrant(next(p for p in (tmp_path / "full" / "outputs" / str(science[0]) / f"{RCID:02d}"
                                            / "astrometry").glob("*.fits") if not p.name.endswith("_matches.fits")))
    ra, dec = solved.wcs.all_pix2world([1536.0], [1540.0], 1)
    ours = lightcurve(float(ra[0]), float(dec[0]), 120.0, tmp_path / "matchfiles")
    theirs = lightcurve(float(ra[0]), float(dec[0]), 120.0, tmp_path / "full" / "matchfiles")
    ours, theirs = ours[ours["expid"] == science[0]], theirs[theirs["expid"] == science[0]]
    assert len(ours) > 20 and abs(len(ours) - len(theirs)) <= 0.02 * len(theirs)
    tree = cKDTree(radec_to_xyz(np.asarray(theirs["ra"]), np.asarray(theirs["dec"])))
    dist, index = tree.query(radec_to_xyz(np.asarray(ours["ra"]), np.asarray(ours["dec"])))
    close = dist < np.radians(0.2 / 3600.0)
    assert close.mean() > 0.97
    dmag = np.asarray(ours["mag"])[close] - np.asarray(theirs["mag"])[index[close]]
    assert abs(np.nanmedian(dmag)) < 0.01
