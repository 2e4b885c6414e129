"""TAP prefetch against a local fake Gaia archive on 127.0.0.1 (never the real one)."""
from __future__ import annotations

import io
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import astropy.units as u
from astropy.coordinates import SkyCoord
from astropy.io.votable import from_table
from astropy.io.votable.tree import Info
from astropy.table import MaskedColumn, Table

from catalogs import TapError, catalog_for_footprint, cone_region, prefetch_from_tap, read_store_info
from catalogs.tap import tap_sync_query
from test_catalogs import synthetic_gaia

_CIRCLE = re.compile(r"CIRCLE\('ICRS',\s*([-\d.]+),\s*([-\d.]+),\s*([-\d.]+)\)")
_MAGLIM = re.compile(r"phot_g_mean_mag\s*<=\s*([-\d.]+)")
_UNITS = {"ra": "deg", "dec": "deg", "ra_error": "mas", "dec_error": "mas", "pmra": "mas.yr**-1",
          "pmdec": "mas.yr**-1", "pmra_error": "mas.yr**-1", "pmdec_error": "mas.yr**-1",
          "ref_epoch": "yr", "phot_g_mean_mag": "mag", "phot_bp_mean_mag": "mag", "phot_rp_mean_mag": "mag"}
_ERROR_DOC = b"""<?xml version="1.0" encoding="UTF-8"?>
<VOTABLE version="1.3" xmlns="http://www.ivoa.net/xml/VOTable/v1.3">
 <RESOURCE type="results">
  <INFO name="QUERY_STATUS" value="ERROR">Cannot parse query: unknown column 'phot_g_mean_mag'</INFO>
 </RESOURCE>
</VOTABLE>"""


class FakeGaiaArchive:
    """Answers ``/tap/sync`` like the Gaia archive: parses the cone and G limit of the ADQL
    and returns the matching synthetic rows as a VOTable (nulls for two-parameter motions),
    serialised as ``TABLEDATA`` (XML cells) or ``BINARY2`` (base64 with a null mask), the two
    forms TAP services answer in."""

    def __init__(self, catalogue: Table, mode: str = "ok", row_cap: int | None = None,
                 serialization: str = "tabledata"):
        self.catalogue, self.mode, self.row_cap = catalogue, mode, row_cap
        self.serialization = serialization
        self.stars = SkyCoord(catalogue["ra"] * u.deg, catalogue["dec"] * u.deg)
        self.requests: list[dict] = []
        self.release = threading.Event()
        archive = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                fields = {k: v[0] for k, v in urllib.parse.parse_qs(self.rfile.read(length).decode()).items()}
                archive.requests.append({"path": self.path, **fields})
                status, body = archive.answer(self.path, fields)
                if status is None:
                    return
                self.send_response(status)
                self.send_header("Content-Type", "text/xml" if body.startswith(b"<?xml") else "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/tap"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, path: str, fields: dict) -> tuple[int | None, bytes]:
        if self.mode == "silent":
            self.release.wait(10)
            return None, b""
        if self.mode == "http500":
            return 500, b"java.lang.NullPointerException at uk.ac.starlink..."
        if self.mode == "error-document":
            return 400, _ERROR_DOC
        if self.mode == "html":
            return 200, b"<html><body>Archive down for maintenance</body></html>"
        assert path == "/tap/sync"
        assert (fields["REQUEST"], fields["LANG"], fields["FORMAT"]) == ("doQuery", "ADQL", "votable")
        ra, dec, radius = map(float, _CIRCLE.search(fields["QUERY"]).groups())
        keep = self.stars.separation(SkyCoord(ra * u.deg, dec * u.deg)).deg <= radius
        limit = _MAGLIM.search(fields["QUERY"])
        if limit:
            keep &= np.asarray(self.catalogue["phot_g_mean_mag"]) <= float(limit.group(1))
        rows = self.catalogue[keep]
        overflow = self.row_cap is not None and len(rows) > self.row_cap
        return 200, self.votable(rows[: self.row_cap] if overflow else rows, overflow)

    def votable(self, rows: Table, overflow: bool) -> bytes:
        served = Table()
        for name in rows.colnames:
            values = np.asarray(rows[name])
            if values.dtype.kind == "f":
                served[name] = MaskedColumn(values, mask=~np.isfinite(values), unit=_UNITS.get(name))
            else:
                served[name] = values
        votable = from_table(served)
        resource = votable.resources[0]
        resource.infos.append(Info(name="QUERY_STATUS", value="OK"))
        if overflow:
            resource.infos.append(Info(name="QUERY_STATUS", value="OVERFLOW"))
        buffer = io.BytesIO()
        votable.to_xml(buffer, tabledata_format=self.serialization)
        return buffer.getvalue()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def sky():
    return synthetic_gaia(6000, (8.0, 12.0), (18.0, 22.0), seed=21)


def truth_in_cone(catalogue: Table, ra: float, dec: float, radius: float, mag_limit: float) -> set[int]:
    stars = SkyCoord(catalogue["ra"] * u.deg, catalogue["dec"] * u.deg)
    keep = (stars.separation(SkyCoord(ra * u.deg, dec * u.deg)).deg <= radius) & (
        np.asarray(catalogue["phot_g_mean_mag"]) <= mag_limit)
    return set(np.asarray(catalogue["source_id"][keep]).tolist())


def test_tap_prefetch_builds_a_store_with_every_source(tmp_path, sky):
    region = cone_region(10.0, 20.0, 1.0)
    with FakeGaiaArchive(sky) as archive:
        result = prefetch_from_tap(archive.url, tmp_path, region, mag_limit=20.0, timeout_s=10)
    assert result.queries == len(result.written) == len(archive.requests) and result.rows > 0
    info = read_store_info(tmp_path)
    assert all(e.mag_limit == 20.0 and e.source.endswith("gaiadr3.gaia_source") for e in info.tiles.values())
    found = catalog_for_footprint(tmp_path, [(10.0, 20.0)], 0.9)
    assert set(np.asarray(found["source_id"]).tolist()) == truth_in_cone(sky, 10.0, 20.0, 0.9, 20.0)
    two_parameter = ~np.isfinite(np.asarray(found["pmra"]))
    assert 0 < two_parameter.sum() < len(found)                   # VOTable nulls became NaN
    assert np.all(np.isnan(np.asarray(found["pmra_error"])[two_parameter]))
    assert "FROM gaiadr3.gaia_source" in archive.requests[0]["QUERY"]


def test_binary2_answers_are_read_as_tabledata_ones(tmp_path, sky):
    region = cone_region(10.0, 20.0, 0.3)
    stores = {}
    for serialization in ("tabledata", "binary2"):
        with FakeGaiaArchive(sky, serialization=serialization) as archive:
            prefetch_from_tap(archive.url, tmp_path / serialization, region, mag_limit=20.0, timeout_s=10)
        stores[serialization] = catalog_for_footprint(tmp_path / serialization, [(10.0, 20.0)], 0.25)
    text, binary = stores["tabledata"], stores["binary2"]
    assert set(np.asarray(binary["source_id"]).tolist()) == truth_in_cone(sky, 10.0, 20.0, 0.25, 20.0)
    text.sort("source_id")
    binary.sort("source_id")
    for name in text.colnames:
        assert np.array_equal(np.asarray(text[name]), np.asarray(binary[name]), equal_nan=True), name
    assert np.isnan(np.asarray(binary["pmra"])).any()                # BINARY2 nulls became NaN too


def test_tap_prefetch_resumes_and_overwrites_on_request(tmp_path, sky):
    region = cone_region(10.0, 20.0, 0.4)
    with FakeGaiaArchive(sky) as archive:
        first = prefetch_from_tap(archive.url, tmp_path, region, timeout_s=10)
        again = prefetch_from_tap(archive.url, tmp_path, region, timeout_s=10)
        fainter = prefetch_from_tap(archive.url, tmp_path, region, timeout_s=10, mag_limit=19.0)
        forced = prefetch_from_tap(archive.url, tmp_path, region, timeout_s=10, mag_limit=19.0, overwrite=True)
    assert again.queries == 0 and again.skipped == first.written
    assert fainter.written == first.written and forced.queries == len(first.written)


def test_truncated_answers_are_split_until_complete(tmp_path, sky):
    region = cone_region(10.3, 20.2, 0.1)
    with FakeGaiaArchive(sky, row_cap=150) as archive:
        result = prefetch_from_tap(archive.url, tmp_path, region, timeout_s=10)
    assert result.queries > len(result.written)                  # some tiles needed their children
    info = read_store_info(tmp_path)
    assert max(e.rows for e in info.tiles.values()) > 150
    found = catalog_for_footprint(tmp_path, [(10.3, 20.2)], 0.1)
    assert set(np.asarray(found["source_id"]).tolist()) == truth_in_cone(sky, 10.3, 20.2, 0.1, 99.0)


@pytest.mark.parametrize("mode, message", [
    ("error-document", r"HTTP 400.*Cannot parse query: unknown column"),
    ("http500", r"HTTP 500.*NullPointerException"),
    ("html", r"not a VOTable.*maintenance"),
])
def test_service_errors_are_clear(tmp_path, sky, mode, message):
    with FakeGaiaArchive(sky, mode=mode) as archive:
        with pytest.raises(TapError, match=message):
            prefetch_from_tap(archive.url, tmp_path, cone_region(10.0, 20.0, 0.3), timeout_s=10)


def test_error_document_with_http_200_is_an_error(sky):
    with FakeGaiaArchive(sky) as archive:
        archive.answer = lambda path, fields: (200, _ERROR_DOC)
        with pytest.raises(TapError, match="TAP service error: Cannot parse query"):
            tap_sync_query(archive.url, "SELECT 1", timeout_s=10)


def test_silent_service_times_out(tmp_path, sky):
    with FakeGaiaArchive(sky, mode="silent") as archive:
        with pytest.raises(TapError, match=r"no answer within 0.5 s"):
            prefetch_from_tap(archive.url, tmp_path, cone_region(10.0, 20.0, 0.3), timeout_s=0.5)
    assert not any((tmp_path / "tiles").glob("*.fits")) if (tmp_path / "tiles").exists() else True


def test_unreachable_service_is_clear(tmp_path):
    with pytest.raises(TapError, match="cannot reach TAP service"):
        prefetch_from_tap("http://127.0.0.1:9/tap", tmp_path, cone_region(10.0, 20.0, 0.3), timeout_s=2)
