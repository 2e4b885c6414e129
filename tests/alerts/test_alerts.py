"""Alert packets, ids, object history, spool and tools (no broker needed)."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import glob
import gzip
import io
import logging
import multiprocessing
import os
import pickle
import sqlite3
import zlib
from pathlib import Path

import fastavro
import fastavro.validation
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from alerts import history as history_module
from alerts.cutouts import fits_stamp, gzip_fits_stamp, stamp_header_cards
from alerts.history import SQLiteHistoryStore
from alerts.ids import MAX_EXPID, make_candid, make_pid, object_id, split_candid, topic_name
from alerts.packet import AlertInputError, make_alerts
from alerts.publish import AlertPublisher, PublishError, replay
from alerts.schema import (SYNC_MARKER, EncodedRecord, alert_schema, container_is_complete, encode_prv_candidate,
                           serialize_alert, serialize_alert_fastavro, validate_alert)
from alerts.spool import DAMAGED, DELIVERED, OVERSIZE, PENDING, Spool
from pipeline.simulate.alerts import synthetic_candidates, synthetic_context, synthetic_cutouts
from pipeline.commands import alerts as alerts_command
from pipeline.core.config import KafkaConfig, load_config

# Real ZTF packets, one per schema variant from 2016 to 2021 (tests/data/ztf-alerts/README.md).
SAMPLES = sorted(glob.glob(str(Path(__file__).resolve().parents[1] / "data" / "ztf-alerts" / "*.avro")))
PUBLISHER = "ZTF (skydiff)"


def _alerts(tmp_path, n=6, seed=1, context=None, store=None):
    context = context or synthetic_context()
    candidates = synthetic_candidates(n, seed=seed)
    store = store or SQLiteHistoryStore(tmp_path / "history.sqlite")
    return context, candidates, make_alerts(context, candidates, synthetic_cutouts(candidates), store, PUBLISHER)


def test_ids_follow_ztf_layout_and_fit_a_long():
    # ZTF sample 1661382530015060001: exposure 166138253, rcid 0, candidate 60001.
    assert make_pid(166138253, 0) == 1661382530015
    assert make_candid(166138253, 0, 60001) == 1661382530015060001
    assert split_candid(make_candid(302100001, 63, 999999)) == (302100001, 63, 999999)
    assert make_candid(MAX_EXPID, 99, 999999) <= 2**63 - 1
    with pytest.raises(ValueError, match="expid"):
        make_pid(MAX_EXPID + 1, 0)
    with pytest.raises(ValueError, match="cand_index"):
        make_candid(1, 1, 10**6)
    assert object_id("ztf", 2026, 0) == "ZTF26aaaaaaa"
    assert object_id("ztf", 2018, 26 * 26 + 27) == "ZTF18aaaabbb"
    assert topic_name("ztf", "20260315", 1) == "ztf_20260315_programid1"


def test_packets_validate_and_carry_the_inputs(tmp_path):
    context, candidates, alerts = _alerts(tmp_path)
    for alert, row in zip(alerts, candidates):
        fastavro.validation.validate(alert, alert_schema(), raise_errors=True)
        c = alert["candidate"]
        assert alert["candid"] == c["candid"] == make_candid(context.expid, context.rcid, row["cand_index"])
        assert c["pid"] == context.pid and c["isdiffpos"] == ("t" if row["isdiffpos"] else "f")
        assert c["magpsf"] == row["magpsf"] and c["ra"] == row["ra"] and c["rb"] == row["rb"]
        assert c["ndethist"] == 1 and c["ncovhist"] == 1 and alert["prv_candidates"] == []
        assert c["ssdistnr"] is None and c["sgscore1"] is None and alert["fp_hists"] is None
    # Byte-identical to fastavro's own container writer, readable by a plain reader.
    value = serialize_alert(alerts[0])
    buffer = io.BytesIO()
    fastavro.writer(buffer, alert_schema(), [alerts[0]], sync_marker=SYNC_MARKER)
    assert value == buffer.getvalue()
    decoded = next(fastavro.reader(io.BytesIO(value)))
    assert decoded["candidate"]["rbversion"] == "skydiff_rb1" and decoded["objectId"].startswith("ZTF26")


def test_cutouts_are_gzipped_fits_with_the_stamp_wcs(tmp_path):
    context, candidates, alerts = _alerts(tmp_path, n=2)
    triplet = synthetic_cutouts(candidates)[0]
    stamp = alerts[0]["cutoutDifference"]
    with fits.open(io.BytesIO(gzip.decompress(stamp["stampData"]))) as hdul:
        assert np.array_equal(hdul[0].data, triplet.difference)
        stamp_wcs = WCS(hdul[0].header)
    image_wcs = WCS(fits.Header(context.wcs_header))
    x0, y0 = triplet.origin
    ra, dec = stamp_wcs.pixel_to_world_values(31, 31)
    assert np.allclose((ra, dec), image_wcs.pixel_to_world_values(x0 + 31, y0 + 31), atol=1e-9)
    assert stamp["fileName"].endswith("_targ_scimref.fits.gz")


def test_missing_and_bad_columns(tmp_path):
    context = synthetic_context()
    store = SQLiteHistoryStore(tmp_path / "h.sqlite")
    table = synthetic_candidates(3)
    table.remove_columns(["sharpnr", "rbversion"])
    table["rb"][1] = np.nan
    alerts = make_alerts(context, table, None, store, PUBLISHER)
    assert alerts[0]["candidate"]["sharpnr"] is None and alerts[1]["candidate"]["rb"] is None
    assert alerts[0]["candidate"]["rbversion"] == context.rbversion and alerts[0]["cutoutScience"] is None
    fastavro.validation.validate(alerts[1], alert_schema(), raise_errors=True)
    with pytest.raises(AlertInputError, match="magpsf"):
        make_alerts(context, synthetic_candidates(2)[["cand_index", "ra", "dec"]], None, store, PUBLISHER)


def test_history_associates_counts_and_limits_across_epochs(tmp_path):
    store = SQLiteHistoryStore(tmp_path / "history.sqlite")
    first = synthetic_context()
    _, candidates, epoch1 = _alerts(tmp_path, n=4, context=first, store=store)
    # Two nights later, same field: candidate 0 moved 0.5", candidate 1 moved 3" (a new object);
    # candidates 2 and 3 are not detected (upper limits come from this image later).
    second = dataclasses.replace(first, expid=first.expid + 200000, jd=first.jd + 2.0)
    moved = candidates[:2].copy()
    moved["dec"] += np.array([0.5, 3.0]) / 3600.0
    epoch2 = make_alerts(second, moved, None, store, PUBLISHER)
    assert epoch2[0]["objectId"] == epoch1[0]["objectId"]
    assert epoch2[1]["objectId"] not in {a["objectId"] for a in epoch1}
    c = epoch2[0]["candidate"]
    assert (c["ndethist"], c["ncovhist"], c["jdstarthist"], c["jdendhist"]) == (2, 2, first.jd, second.jd)
    assert [p["candid"] for p in epoch2[0]["prv_candidates"]] == [epoch1[0]["candid"]]
    # Candidate 2 again on a third epoch: its history holds epoch 1's detection and epoch 2's limit.
    third = dataclasses.replace(first, expid=first.expid + 400000, jd=first.jd + 3.0, fid=1)
    epoch3 = make_alerts(third, candidates[2:3], None, store, PUBLISHER)
    prv = epoch3[0]["prv_candidates"]
    assert [(p["candid"], p["pid"]) for p in prv] == [(epoch1[2]["candid"], first.pid), (None, second.pid)]
    assert prv[1]["diffmaglim"] == second.diffmaglim and epoch3[0]["candidate"]["ncovhist"] == 3
    # Beyond 30 days the entries leave prv_candidates but still count in ndethist/ncovhist.
    late = dataclasses.replace(first, expid=first.expid + 4000000, jd=first.jd + 40.0)
    epoch4 = make_alerts(late, candidates[2:3], None, store, PUBLISHER)
    assert epoch4[0]["prv_candidates"] == [] and epoch4[0]["candidate"]["ndethist"] == 3
    # A rerun of epoch 3 adds no detection and gives the same names and history.
    again = make_alerts(third, candidates[2:3], None, store, PUBLISHER)
    assert again[0]["objectId"] == epoch3[0]["objectId"] and again[0]["candidate"]["ndethist"] == 2
    fastavro.validation.validate(epoch3[0], alert_schema(), raise_errors=True)


def _mint_in_process(path: str, worker: int, queue) -> None:
    store = SQLiteHistoryStore(path)
    names = []
    for image in range(4):
        context = synthetic_context(expid=302100000 + worker * 10 + image, ra=150.0 + worker, dec=2.0)
        table = synthetic_candidates(25, ra=150.0 + worker, seed=100 * worker + image)
        names += [a["objectId"] for a in make_alerts(context, table, None, store, PUBLISHER)]
    store.close()
    queue.put(names)


def test_concurrent_processes_mint_distinct_names(tmp_path):
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    path = str(tmp_path / "shared.sqlite")
    workers = [context.Process(target=_mint_in_process, args=(path, w, queue)) for w in range(2)]
    for w in workers:
        w.start()
    names = [queue.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    everything = names[0] + names[1]
    assert len(everything) == 200 and len(set(everything)) == 200   # distinct fields: all new objects


def test_spool_without_broker_oversize_and_rerun_guard(tmp_path):
    context, _, alerts = _alerts(tmp_path, n=3)
    spool = Spool(tmp_path / "spool")
    limit = len(serialize_alert(alerts[0])) - 1000
    with AlertPublisher(KafkaConfig(bootstrap_servers="", message_max_bytes=limit), spool) as publisher:
        report = publisher.publish_alerts(context.topic, alerts)
    assert report.oversize == 3 and spool.count(OVERSIZE) == 3 and spool.count(PENDING) == 0
    oversize_file = spool.path(context.topic, alerts[0]["candid"], OVERSIZE)
    assert next(fastavro.reader(open(oversize_file, "rb")))["candid"] == alerts[0]["candid"]
    with AlertPublisher(KafkaConfig(bootstrap_servers=""), spool) as publisher:
        assert replay(spool, publisher).held == 3
    assert spool.count(PENDING) == 3 and spool.count(OVERSIZE) == 0
    spool.mark_delivered(context.topic, alerts[0]["candid"], 0, 0)
    assert not spool.put(context.topic, alerts[0]["candid"], b"rerun")
    assert spool.state(context.topic, alerts[0]["candid"]) == DELIVERED


def test_no_credential_in_logs_or_errors(tmp_path, caplog):
    secret = "s3cr3t-Pa55word"
    kafka = KafkaConfig(bootstrap_servers="127.0.0.1:9", security_protocol="SASL_PLAINTEXT",
                        sasl_mechanism="PLAIN", sasl_username="alice", sasl_password=secret, flush_timeout_s=1.0)
    context, _, alerts = _alerts(tmp_path, n=2)
    caplog.set_level(logging.DEBUG)
    with AlertPublisher(kafka, Spool(tmp_path / "spool")) as publisher:
        report = publisher.publish_alerts(context.topic, alerts)
    assert report.failed == 2 and "not delivered" in caplog.text
    with pytest.raises(PublishError) as error:
        AlertPublisher(dataclasses.replace(kafka, sasl_mechanism="NOT-A-MECHANISM"), Spool(tmp_path / "s2"))
    assert secret not in caplog.text and secret not in str(error.value)


def _run_cli(argv):
    parser = argparse.ArgumentParser()
    alerts_command.register(parser.add_subparsers(), argparse.ArgumentParser(add_help=False))
    args = parser.parse_args(argv)
    args.cfg = load_config()
    return args.func(args)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.rsplit("/", 1)[-1])
def test_show_reads_every_ztf_sample(sample, tmp_path, capsys):
    png = tmp_path / "triplet.png"
    assert _run_cli(["alerts", "show", sample, "--png", str(png)]) == 0
    out = capsys.readouterr().out
    candid = next(fastavro.reader(open(sample, "rb")))["candid"]
    assert f"candid     {candid}" in out and png.stat().st_size > 5000


def test_show_reads_our_packet_and_rejects_garbage(tmp_path, capsys):
    _, _, alerts = _alerts(tmp_path, n=1)
    path = tmp_path / "ours.avro"
    path.write_bytes(serialize_alert(alerts[0]))
    assert _run_cli(["alerts", "show", str(path), "--png", str(tmp_path / "t.png")]) == 0
    assert alerts[0]["objectId"] in capsys.readouterr().out
    bad = tmp_path / "bad.avro"
    bad.write_bytes(b"not avro")
    assert _run_cli(["alerts", "show", str(bad)]) == 3


# -- the compiled serialiser, history encodings, cutout framing, grouped spool syncs -------

def _fastavro_container(alert) -> bytes:
    buffer = io.BytesIO()
    fastavro.writer(buffer, alert_schema(), [alert], sync_marker=SYNC_MARKER)
    return buffer.getvalue()


def _alerts_with_history(tmp_path):
    """Epoch 3 of a candidate seen on epoch 1 and missed on epoch 2: a detection and a limit."""
    store = SQLiteHistoryStore(tmp_path / "history.sqlite")
    first = synthetic_context()
    candidates = synthetic_candidates(5)
    make_alerts(first, candidates, None, store, PUBLISHER)
    second = dataclasses.replace(first, expid=first.expid + 100000, jd=first.jd + 1.0)
    make_alerts(second, candidates[3:], None, store, PUBLISHER)
    third = dataclasses.replace(first, expid=first.expid + 200000, jd=first.jd + 2.0)
    return make_alerts(third, candidates[:3], synthetic_cutouts(candidates[:3]), store, PUBLISHER), store


def test_fast_serialiser_writes_fastavros_bytes(tmp_path):
    alerts, store = _alerts_with_history(tmp_path)
    store.close()
    prv = alerts[0]["prv_candidates"]
    assert [p["candid"] is None for p in prv] == [False, True]
    assert all(isinstance(p, EncodedRecord) and p.avro == encode_prv_candidate(dict(p)) for p in prv)
    alerts[1]["candidate"]["ranr"] = float("nan")          # NaN and null both occur
    alerts[1]["candidate"].pop("sharpnr")                    # a missing optional field is null
    for alert in alerts:
        fast = serialize_alert(alert)
        assert fast == serialize_alert_fastavro(alert) == _fastavro_container(alert)
        validate_alert(next(fastavro.reader(io.BytesIO(fast))))
    without_nan = (alerts[0], alerts[2])
    assert ([next(fastavro.reader(io.BytesIO(serialize_alert(a)))) for a in without_nan]
            == [next(fastavro.reader(io.BytesIO(serialize_alert_fastavro(a)))) for a in without_nan])
    decoded = next(fastavro.reader(io.BytesIO(serialize_alert(alerts[1]))))
    assert np.isnan(decoded["candidate"]["ranr"]) and decoded["candidate"]["sharpnr"] is None
    assert [p["pid"] for p in decoded["prv_candidates"]] == [p["pid"] for p in alerts[1]["prv_candidates"]]


def test_every_process_writes_the_same_container_bytes():
    """Processes with different string-hash seeds (Slurm tasks, pool workers) write one header."""
    import subprocess
    import sys
    probe = "import hashlib, alerts.schema as s; print(hashlib.sha256(s._container_header()).hexdigest())"
    digests = {subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                              env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
               for seed in (0, 1, 2, 3)}
    assert len(digests) == 1


def test_values_outside_the_fast_subset_go_through_fastavro(tmp_path):
    alerts, store = _alerts_with_history(tmp_path)
    store.close()
    alert = alerts[0]
    alert["candidate"].update(magpsf=np.float32(18.5), nneg=np.int64(3))   # numpy scalars: fastavro writes them
    alert["prv_candidates"][0]["magpsf"] = np.float64(19.25)    # a changed entry is encoded afresh
    assert alert["prv_candidates"][0].avro is None
    assert serialize_alert(alert) == _fastavro_container(alert)
    decoded = next(fastavro.reader(io.BytesIO(serialize_alert(alert))))
    assert decoded["candidate"]["nneg"] == 3 and decoded["prv_candidates"][0]["magpsf"] == 19.25
    for field, bad in (("sgscore1", True), ("magpsf", "bright")):   # fastavro refuses them
        with pytest.raises(ValueError):
            serialize_alert({**alert, "candidate": {**alert["candidate"], field: bad}})
    unchecked = {**alert, "candidate": {**alert["candidate"], "fid": 2**40}}   # fastavro writes it unchecked
    assert serialize_alert(unchecked) == _fastavro_container(unchecked)
    entry = alerts[1]["prv_candidates"][0]
    assert pickle.loads(pickle.dumps(entry)).avro == entry.avro and copy.copy(entry) == entry


def test_history_store_from_before_the_encoding_column_is_migrated(tmp_path):
    path = tmp_path / "old.sqlite"
    old_tables = history_module._TABLES.replace(", avro BLOB", "").replace(", upper_limit_avro BLOB", "")
    with sqlite3.connect(path) as db:
        db.executescript(old_tables)
        db.execute("INSERT INTO images VALUES (1, 2461100.5, 600, 21, '[[0,0],[1,0],[1,1]]', '{}')")
    store = SQLiteHistoryStore(path)
    first = synthetic_context()
    candidates = synthetic_candidates(2)
    make_alerts(first, candidates, None, store, PUBLISHER)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE detections SET avro = NULL")       # rows written by the old code
    later = dataclasses.replace(first, expid=first.expid + 100000, jd=first.jd + 1.0)
    alerts = make_alerts(later, candidates, None, store, PUBLISHER)
    store.close()
    assert alerts[0]["prv_candidates"][0].avro is None
    assert serialize_alert(alerts[0]) == _fastavro_container(alerts[0])


@pytest.mark.parametrize("shape", [(63, 63), (5, 7), (200, 150), (0, 0)])
def test_gzip_stamp_framing_holds_the_plain_fits_bytes(shape):
    cards, crpix1, crpix2 = stamp_header_cards(synthetic_context().wcs_header)
    data = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    for wcs, crpix in ((cards, (crpix1 - 12, crpix2 + 0.25)), (b"", None), (cards, None)):
        packed = gzip_fits_stamp(data, wcs, crpix)
        stream = zlib.decompressobj(31)
        assert stream.decompress(packed) == fits_stamp(data, wcs, crpix)
        assert stream.eof and not stream.unused_data


def test_publisher_syncs_each_group_before_producing_it(tmp_path, monkeypatch):
    context, _, alerts = _alerts(tmp_path, n=5)
    spool = Spool(tmp_path / "spool")
    events = []
    real_sync = spool.sync

    def sync(paths):
        paths = list(paths)
        events.append(("sync", sorted(int(os.path.basename(p)[:-5]) for p in paths)))
        real_sync(paths)
    monkeypatch.setattr(spool, "sync", sync)
    with AlertPublisher(KafkaConfig(bootstrap_servers=""), spool, sync_batch=2) as publisher:
        real_produce = publisher.produce_spooled

        def produce_spooled(topic, candid, value):
            assert spool.path(topic, candid, PENDING).read_bytes() == value
            events.append(("produce", candid))
            return real_produce(topic, candid, value)
        monkeypatch.setattr(publisher, "produce_spooled", produce_spooled)
        states = [publisher.publish(context.topic, a["candid"], serialize_alert(a)) for a in alerts]
        assert states == [PENDING] * 5 and [e[0] for e in events] == ["sync", "produce", "produce"] * 2
        publisher.flush()
    candids = [a["candid"] for a in alerts]
    assert events == [("sync", candids[0:2]), ("produce", candids[0]), ("produce", candids[1]),
                      ("sync", candids[2:4]), ("produce", candids[2]), ("produce", candids[3]),
                      ("sync", candids[4:]), ("produce", candids[4])]
    assert publisher.report.held == 5 and spool.count(PENDING) == 5 and not spool._unsynced


def test_replay_sets_aside_packets_cut_short(tmp_path, caplog):
    # What a power cut between a group's write and its sync can leave (never produced).
    context, _, alerts = _alerts(tmp_path, n=3)
    spool = Spool(tmp_path / "spool")
    values = [serialize_alert(a) for a in alerts]
    for alert, value in zip(alerts, values):
        spool.put(context.topic, alert["candid"], value)
    spool.path(context.topic, alerts[1]["candid"]).write_bytes(values[1][:40000])
    spool.path(context.topic, alerts[2]["candid"]).write_bytes(b"")
    assert [container_is_complete(v) for v in (values[0], values[1][:-1], values[1] + b"x")] == [True, False, False]
    sample = open(SAMPLES[0], "rb").read()
    assert container_is_complete(sample) and not container_is_complete(sample[:-100])
    with AlertPublisher(KafkaConfig(bootstrap_servers=""), spool) as publisher:
        report = replay(spool, publisher)
    assert (report.damaged, report.held) == (2, 1) and spool.count(DAMAGED) == 2 and spool.count(PENDING) == 1
    assert "cut short" in caplog.text and str(alerts[2]["candid"]) in caplog.text


def _closed_port() -> int:
    """A loopback port nothing listens on."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tail_against_a_dead_broker_is_a_retry_not_success(cfg, caplog):
    """No broker answering is exit 75 (retry later), not an empty read with exit 0; a malformed
    --bootstrap is a usage error (2), on every alerts command that takes it."""
    from _cli import run_skydiff

    port = _closed_port()
    assert run_skydiff(["alerts", "tail", "--bootstrap", f"127.0.0.1:{port}", "--topic", "ztf_x",
                        "--timeout", "2"], cfg) == 75
    assert f"127.0.0.1:{port} did not answer" in caplog.text
    for action in (["tail", "--topic", "t"], ["replay"], ["publish", "nowhere"]):
        assert run_skydiff(["alerts", *action, "--bootstrap", "localhost"], cfg) == 2
    assert "--bootstrap: 'localhost' is not host:port" in caplog.text


def test_dead_broker_counts_every_failed_delivery_and_logs_each_failure_once(tmp_path, caplog):
    """Broker down: the report counts every packet not acknowledged (failed deliveries, those
    in flight at the flush timeout), each connection failure is logged once (librdkafka's own
    FAIL line and its error event used to give two lines), and a delivery failure reason once."""
    caplog.set_level(logging.DEBUG, logger="skydiff")
    kafka = dataclasses.replace(load_config().kafka, bootstrap_servers=f"127.0.0.1:{_closed_port()}",
                                flush_timeout_s=1.0)
    _, _, alerts = _alerts(tmp_path, n=12)
    spool = Spool(tmp_path / "spool")
    with AlertPublisher(kafka, spool) as publisher:
        for alert in alerts:
            publisher.publish("ztf_test", alert["candid"], serialize_alert(alert))
        publisher.flush()
        assert publisher.report.not_acknowledged == 12
        assert publisher.report.failed + publisher.report.in_flight == 12
    report = publisher.report
    assert (report.failed, report.in_flight, report.not_acknowledged) == (12, 0, 12)
    assert "12 deliveries failed" in report.shortfall() and spool.count(PENDING) == 12
    refused = [r for r in caplog.records if "Connection refused" in r.getMessage()]
    shown = [r for r in refused if r.levelno >= logging.INFO]
    fail_lines = [r for r in refused if r.name == "skydiff.alerts.kafka"]
    events = [r for r in refused if r.name == "skydiff.alerts" and r.levelno == logging.DEBUG]
    # librdkafka's FAIL line is always demoted; of its error events the first is shown, the
    # repeats (one per reconnection attempt) counted and summarised at close.
    assert fail_lines and all(r.levelno == logging.DEBUG for r in fail_lines)
    assert len(shown) == 2 and all(r.name == "skydiff.alerts" for r in shown)
    assert f"({len(events) + 1} times in all)" in shown[1].getMessage()
    not_delivered = [r for r in caplog.records if "not delivered" in r.getMessage() and r.levelno >= logging.INFO]
    assert len(not_delivered) == 1
    assert "12 alert deliveries failed" in caplog.text
