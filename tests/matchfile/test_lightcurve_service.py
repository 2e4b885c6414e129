"""The HTTP light-curve service answers IRSA-style queries and rejects bad input with 400."""
from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request
from urllib.parse import quote

import numpy as np
import pytest
from astropy.io.votable import parse_single_table
from astropy.table import Table

from pipeline.matchfile.service import LIGHTCURVE_PATH, QueryError, make_server, parse_query
from pipeline.matchfile.store import append_epoch, create_matchfile
from pipeline.simulate.matchfile_truth import synthetic_epoch, synthetic_sky
from pipeline.core.refraction import site_location


@pytest.fixture(scope="module")
def service(tmp_path_factory, cfg):
    root = tmp_path_factory.mktemp("service")
    sky = synthetic_sky(300, 250.0, 45.0, seed=4)
    path = create_matchfile(root, sky.reference, sky.meta)
    for k in range(4):
        append_epoch(path, *synthetic_epoch(sky, 10 + k, 60000.0 + k), site_location(cfg.site))
    server = make_server(root, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", sky
    server.shutdown()
    server.server_close()


def get(base, query="", path=LIGHTCURVE_PATH):
    url = f"{base}{path}?{query}" if query else f"{base}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def star(sky):
    i = int(np.argmin(sky.true_mag))
    return float(sky.reference["ra"][i]), float(sky.reference["dec"][i])


def test_irsa_queries_in_every_format(service):
    base, sky = service
    ra, dec = star(sky)
    pos = "POS=" + quote(f"CIRCLE {ra} {dec} 0.0003")
    status, kind, body = get(base, pos)                               # VOTable by default
    assert status == 200 and "votable" in kind
    table = parse_single_table(io.BytesIO(body)).to_table()
    assert len(table) == 4 and len(set(table["oid"])) == 1
    status, _, body = get(base, pos + "&FORMAT=CSV&BANDNAME=r&TIME=" + quote("60000.5 60003.5"))
    csv = Table.read(body.decode(), format="ascii.csv")
    assert status == 200 and list(csv["expid"]) == [11, 12, 13]
    status, _, body = get(base, f"ID={table['oid'][0]}&FORMAT=json&NOBS_MIN=4&COLLECTION=ztf_dr23")
    payload = json.loads(body)
    assert status == 200 and len(payload["data"]) == 4
    hjd = payload["data"][0][[c["name"] for c in payload["columns"]].index("hjd")]
    assert abs(hjd - table["hjd"][0]) < 1e-9
    status, _, body = get(base, f"ID={table['oid'][0]}&FORMAT=IPAC_TABLE&MAG=" + quote("0 1"))
    assert status == 200 and len(Table.read(body.decode(), format="ascii.ipac")) == 0
    status, _, body = get(base, f"id={table['oid'][0]}&format=csv&bad_catflags_mask=0")
    assert status == 200 and len(Table.read(body.decode(), format="ascii.csv")) == 4
    status, kind, body = get(base, f"ID={table['oid'][0]}&FORMAT=TSV")
    tsv = Table.read(body.decode(), format="ascii.basic", delimiter="\t")
    assert status == 200 and kind == "text/tab-separated-values" and len(tsv) == 4
    assert tsv.colnames == table.colnames and len(tsv.colnames) == 24
    status, kind, body = get(base, pos + "&FORMAT=html")
    assert status == 200 and kind.startswith("text/html") and body.count(b"<tr><td>") == 4
    assert all(f">{name}</th>".encode() in body for name in table.colnames)


@pytest.mark.parametrize("query,message", [
    ("POS=" + quote("CIRCLE 361 10 0.001"), "ra 361"),
    ("POS=" + quote("CIRCLE 10 -91 0.001"), "dec -91"),
    ("POS=" + quote("CIRCLE 10 10 -1"), "radius"),
    ("POS=" + quote("CIRCLE 10 10 5"), "exceeds the maximum"),
    ("POS=" + quote("BOX 10 10 1"), "CIRCLE"),
    ("POS=" + quote("CIRCLE ten 10 1"), "not 3 numbers"),
    ("POS=" + quote("CIRCLE nan 10 0.01"), "finite"),
    ("ID=abc", "not an object id"),
    ("ID=1&POS=" + quote("CIRCLE 10 10 0.001"), "either ID or POS"),
    ("", "either ID or POS"),
    ("ID=1&BANDNAME=u", "not g, r or i"),
    ("ID=1&MAG=" + quote("20 10"), "exceeds"),
    ("ID=1&FORMAT=FITS", "FORMAT"),
    ("ID=1&NOBS_MIN=-2", "negative"),
    ("ID=1&FOO=2", "unknown parameter"),
    ("ID=1&FORMAT=CSV&FORMAT=JSON", "once"),
    ("ID=1&BAD_CATFLAGS_MASK=99999999999999999999999", "longer than any allowed value"),
    ("ID=1&BAD_CATFLAGS_MASK=4294967296", "exceeds the maximum"),
    ("ID=1&NOBS_MIN=" + "9" * 5000, "longer than any allowed value"),
])
def test_bad_input_is_a_400_with_a_message(service, query, message):
    base, _ = service
    status, kind, body = get(base, query)
    assert status == 400 and kind.startswith("text/plain")
    assert message in body.decode() and "Traceback" not in body.decode()


def test_help_and_unknown_paths(service):
    base, _ = service
    status, _, body = get(base, path="/")
    assert status == 200 and b"POS=CIRCLE" in body
    assert get(base, path="/nothing")[0] == 404


def test_a_half_sent_request_does_not_hold_a_thread(tmp_path):
    """A client that sends part of a request line and stops is cut off after the timeout."""
    import socket
    import time

    server = make_server(tmp_path, "127.0.0.1", 0, request_timeout_s=0.5)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with socket.create_connection(server.server_address[:2], timeout=10) as sock:
            sock.sendall(b"GET /cgi-bin/ZTF/nph_light_curves?ID=1 HTTP/1.1\r\nHost: x")
            t0 = time.monotonic()
            assert sock.recv(1024) == b""            # the server closed the connection
            assert time.monotonic() - t0 < 5.0
    finally:
        server.shutdown()
        server.server_close()


def test_a_missing_root_is_an_error_naming_it(tmp_path):
    from pipeline.matchfile.layout import LayoutError

    with pytest.raises(LayoutError, match="nowhere: no such directory"):
        make_server(tmp_path / "nowhere", "127.0.0.1", 0)


def test_parse_query_defaults():
    query = parse_query({"POS": ["CIRCLE 10 20 0.01"]})
    assert query.cone == (10.0, 20.0, 0.01) and query.format == "votable" and query.fids == ()
    with pytest.raises(QueryError):
        parse_query({"ID": ["1"], "TIME": ["1"]})
