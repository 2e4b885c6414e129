"""Alerts from real subtraction products, published to a real Kafka-protocol broker (Tansu)
on loopback and read back by a consumer group, as a broker downstream would.

Two science epochs of one simulated quadrant (nights 2026-03-15 and -16, the same injected
sources) are subtracted from a reference coadded from an earlier season and written as
``skydiff subtract`` writes them; ``skydiff alerts publish`` builds and publishes their alerts.
"""
from __future__ import annotations

import gzip
import io
import json
import shutil
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import fastavro
import fastavro.validation
import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from confluent_kafka import Consumer

from alerts.cutouts import read_stamp
from alerts.from_subtraction import (AlertProductsError, alertable, alerts_from_products, alerts_from_result,
                                     read_products)
from alerts.history import SQLiteHistoryStore
from alerts.ids import make_candid, split_candid
from alerts.schema import alert_schema
from pipeline.cli import main
from pipeline.core.config import load_config
from pipeline.core.image import write_quadrant
from pipeline.simulate.realbogus_training import subtract_pair
from pipeline.reference.build import build_reference
from pipeline.reference.files import write_reference
from pipeline.subtraction.products import write_subtraction
from pipeline.simulate.pairs import PairOptions, pair_sky, simulate_reference_frames, simulate_science

from kafka_broker import KafkaBroker

pytestmark = pytest.mark.timeout(240)

NIGHTS = ("2026-03-15", "2026-03-16")
CALIBRATION_FIELDS = ("magzpscirms", "clrcoeff", "clrcounc", "nmatches")   # not in qa.json


@pytest.fixture(scope="module")
def products(tmp_path_factory):
    """Reference and two subtracted science epochs on disk; the first epoch's in-memory alerts."""
    cfg = load_config()
    root = tmp_path_factory.mktemp("alerts_pipeline")
    options = PairOptions(n_inject=20, reference_seeing=(1.5, 1.6, 1.7))
    sky = pair_sky(cfg, options)
    frames = simulate_reference_frames(cfg, options, sky)
    reference = build_reference(frames, sky.gaia_catalogue(), cfg.instrument.filters[frames[0].meta.filter])
    reference_path = write_reference(root / "reference.fits", reference)
    outdirs, in_memory = [], None
    for night in NIGHTS:
        pair = simulate_science(cfg, replace(options, science_night=night), sky)
        result = subtract_pair(pair, reference)
        science = root / f"science_{night}.fits"
        write_quadrant(science, pair.science.data, pair.science.header, pair.science.mask)
        meta = pair.science.meta
        write_subtraction(result, pair.science.header, root / night, refid=reference.refid,
                          extra_qa={"science": str(science), "reference": str(reference_path), "expid": meta.expid,
                                    "rcid": meta.rcid, "refid": reference.refid})
        outdirs.append(root / night)
        if in_memory is None:
            with SQLiteHistoryStore(root / "in_memory.sqlite") as store:
                in_memory = alerts_from_result(result, pair.science.header, pair.science.wcs, reference, cfg,
                                               store)[1]
        del result, pair
    return {"cfg": cfg, "root": root, "outdirs": outdirs, "reference": reference_path,
            "nframes": reference.nframes, "refid": reference.refid, "in_memory": in_memory}


def _expected_candids(outdir) -> set[int]:
    qa = json.loads((outdir / "qa.json").read_text())
    table = Table.read(outdir / "candidates.ecsv")
    return {make_candid(qa["expid"], qa["rcid"], int(i)) for i in table["cand_index"][alertable(table)]}


def _consume(bootstrap: str, topics: list[str], expected: int, group: str, timeout_s: float = 60.0,
             linger_s: float = 2.0) -> list[dict]:
    """Every alert a fresh consumer group reads, decoded with a plain fastavro.reader."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
                         "session.timeout.ms": 6000, "receive.message.max.bytes": 64 * 1024 * 1024})
    consumer.subscribe(topics)
    alerts, deadline, done_at = [], time.monotonic() + timeout_s, None
    try:
        while time.monotonic() < deadline:
            if done_at is not None and time.monotonic() - done_at > linger_s:
                break                       # lingering catches any duplicate
            msg = consumer.poll(0.2)
            if msg is None or msg.error():
                continue
            alerts.append(next(fastavro.reader(io.BytesIO(msg.value()))))
            if len(alerts) >= expected and done_at is None:
                done_at = time.monotonic()
    finally:
        consumer.close()
    return alerts


def test_publish_products_to_broker_consume_validate_and_rerun(products, tmp_path):
    outdirs = products["outdirs"]
    expected = set().union(*(_expected_candids(d) for d in outdirs))
    topics = [f"ztf_{night.replace('-', '')}_programid1" for night in NIGHTS]
    broker = KafkaBroker(tmp_path).start()
    try:
        args = ["alerts", "publish", *map(str, reversed(outdirs)), "--bootstrap", broker.bootstrap,
                "--spool", str(tmp_path / "spool"), "--history", str(tmp_path / "history.sqlite")]
        assert main(args) == 0
        assert main(args) == 0          # rerun of the same quadrants: nothing new is produced
        log = [line.split() for line in (tmp_path / "spool" / "delivered.log").read_text().splitlines()]
        assert Counter(int(fields[2]) for fields in log) == Counter(expected)
        alerts = _consume(broker.bootstrap, topics, len(expected), "downstream-broker")
    finally:
        broker.kill()

    candids = Counter(a["candid"] for a in alerts)
    assert set(candids) == expected and set(candids.values()) == {1}     # each exactly once
    schema = alert_schema()
    for alert in alerts:
        fastavro.validation.validate(alert, schema, raise_errors=True)
    ref_header = fits.getheader(products["reference"])
    cubes = {d.name: {k: fits.getdata(d / "cutouts.fits", k) for k in ("SCIENCE", "REFERENCE", "DIFFERENCE")}
             for d in outdirs}
    qas = {d.name: json.loads((d / "qa.json").read_text()) for d in outdirs}
    expids = {qa["expid"]: name for name, qa in qas.items()}
    for alert in alerts:
        c = alert["candidate"]
        expid, rcid, cand_index = split_candid(alert["candid"])
        night = expids[expid]
        assert c["rfid"] == products["refid"] == ref_header["REFID"] and c["nframesref"] == products["nframes"] == 3
        assert c["jdstartref"] == ref_header["JDSTART"] and c["jdendref"] == ref_header["JDEND"]
        assert c["magzpsci"] == pytest.approx(qas[night]["zp_science"], abs=1e-5)
        assert c["diffmaglim"] == pytest.approx(qas[night]["diffmaglim"], abs=1e-5)
        assert alert["objectId"].startswith("ZTF26") and c["pid"] == alert["candid"] // 10**6
        for field, cube in (("cutoutScience", "SCIENCE"), ("cutoutTemplate", "REFERENCE"),
                            ("cutoutDifference", "DIFFERENCE")):
            stamp = read_stamp(alert[field]["stampData"])
            np.testing.assert_array_equal(stamp, cubes[night][cube][cand_index])
    # The stamps carry the science WCS: the candidate's position maps back to its ra/dec.
    for alert in alerts[:10]:
        c = alert["candidate"]
        header = fits.getheader(io.BytesIO(gzip.decompress(alert["cutoutScience"]["stampData"])))
        x0, y0 = np.floor(c["xpos"] - 0.5) - 31, np.floor(c["ypos"] - 0.5) - 31
        ra, dec = WCS(header).all_pix2world(c["xpos"] - 1 - x0, c["ypos"] - 1 - y0, 0)
        assert abs(float(ra) - c["ra"]) * 3600 < 0.01 and abs(float(dec) - c["dec"]) * 3600 < 0.01
    # The second night's alerts of the injected sources carry the first night's detections.
    first_expid = qas[NIGHTS[0]]["expid"]
    later = [a for a in alerts if split_candid(a["candid"])[0] == qas[NIGHTS[1]]["expid"]]
    with_history = [a for a in later if any(p["candid"] is not None for p in a["prv_candidates"] or ())]
    assert len(with_history) >= 10
    for alert in with_history:
        (previous,) = [p for p in alert["prv_candidates"] if p["candid"] is not None]
        assert split_candid(previous["candid"])[0] == first_expid
        assert previous["jd"] < alert["candidate"]["jd"]
    # Inside the first image's footprint (all but a pointing-offset strip at the edge) a later
    # alert has at least the first image's upper limit.
    assert sum(bool(a["prv_candidates"]) for a in later) >= 0.9 * len(later)


def test_in_memory_and_file_alerts_agree(products, tmp_path):
    first = products["outdirs"][0]
    with SQLiteHistoryStore(tmp_path / "history.sqlite") as store:
        from_files = alerts_from_products(first, None, None, products["cfg"], store)
    in_memory = products["in_memory"]
    assert [a["candid"] for a in from_files] == [a["candid"] for a in in_memory]
    assert {a["candid"] for a in from_files} == _expected_candids(first)
    for a, b in zip(from_files, in_memory):
        for kind in ("cutoutScience", "cutoutTemplate", "cutoutDifference"):
            # Pixels agree exactly; the WCS cards' last digits went through the science file.
            assert a[kind]["fileName"] == b[kind]["fileName"]
            np.testing.assert_array_equal(read_stamp(a[kind]["stampData"]), read_stamp(b[kind]["stampData"]))
        for name, value in a["candidate"].items():
            if name in CALIBRATION_FIELDS:
                continue
            if name == "pdiffimfilename":   # the products folder's difference image; none in memory
                assert value == str(Path(first) / "diff.fits") and b["candidate"][name] is None
                continue
            other = b["candidate"][name]
            if isinstance(value, float) and name in ("diffmaglim", "magfromlim", "magzpsci", "magzpsciunc",
                                                          "zpmed", "clrmed", "clrrms", "zpclrcov"):
                assert other == pytest.approx(value, abs=1e-3), name     # qa.json rounds them
            else:
                assert other == value or (other != other and value != value), name    # NaN ranr/decnr
        assert b["candidate"]["nmatches"] > 0 and b["candidate"]["magzpscirms"] is not None


def test_bad_products_are_named(products, tmp_path):
    first = products["outdirs"][0]
    broken = tmp_path / "broken"
    shutil.copytree(first, broken, ignore=shutil.ignore_patterns("diff.fits", "scorr.fits"))
    with fits.open(broken / "cutouts.fits") as hdul:
        hdul["SCIENCE"].data = hdul["SCIENCE"].data[:-1]
        hdul.writeto(broken / "short.fits")
    (broken / "short.fits").replace(broken / "cutouts.fits")
    with pytest.raises(AlertProductsError, match="cutouts.fits"):
        read_products(broken)
    (broken / "qa.json").unlink()
    with pytest.raises(AlertProductsError, match="no qa.json"):
        read_products(broken)
    assert main(["alerts", "publish", str(broken), "--spool", str(tmp_path / "spool"),
                 "--history", str(tmp_path / "h.sqlite")]) == 3
