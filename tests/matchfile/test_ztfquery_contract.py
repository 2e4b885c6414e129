"""ztfquery, the client most ZTF users call, as a contract client of the light-curve service.

``ztfquery.lightcurve.LCQuery`` (the release pinned in pyproject.toml's test extra) is
pointed at a running service the way a user would point it at skydiff instead of IRSA: its
module constant ``BASEURL`` set to the service's light-curve URL, and ``cookies={}`` so it
does not log in to IRSA (it would read ``~/.ztfquery`` and contact IRSA otherwise).  It asks
for CSV and reads it with pandas; every IRSA column must arrive, in IRSA's order, typed as
IRSA types it (integers, floats, the filter code as text), by position, with a band and by
object id.
"""
from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from astropy.io.votable import parse

from pipeline.core.refraction import site_location
from pipeline.matchfile.lightcurves import LightcurveReader
from pipeline.matchfile.service import LIGHTCURVE_PATH, make_server
from pipeline.matchfile.store import ReferenceMeta, append_epoch, create_matchfile
from pipeline.simulate.matchfile_truth import synthetic_epoch, synthetic_sky

#: IRSA's light-curve columns, in its order, with the VOTable datatypes it declares.
IRSA_COLUMNS = {
    "oid": "long", "expid": "long", "hjd": "double", "mjd": "double", "mag": "float", "magerr": "float",
    "catflags": "int", "filtercode": "char", "ra": "double", "dec": "double", "chi": "float", "sharp": "float",
    "filefracday": "long", "field": "int", "ccdid": "int", "qid": "int", "limitmag": "float", "magzp": "float",
    "magzprms": "float", "clrcoeff": "float", "clrcounc": "float", "exptime": "float", "airmass": "float",
    "programid": "int"}
EPOCHS = 3


@pytest.fixture(scope="module")
def service(tmp_path_factory, cfg):
    """One quadrant's g and r matchfiles of the same stars, served on a free loopback port."""
    root = tmp_path_factory.mktemp("irsa")
    location = site_location(cfg.site)
    skies = {}
    for fid in (1, 2):
        meta = ReferenceMeta(620, 6, 2, fid, 7000 + fid, 2459000.5, 2459100.5, 20)
        sky = synthetic_sky(300, 150.0, 33.0, seed=6, meta=meta, half_width_deg=0.2)
        path = create_matchfile(root, sky.reference, meta)
        for k in range(EPOCHS):
            append_epoch(path, *synthetic_epoch(sky, 10 * fid + k, 60000.1 + k + 0.01 * fid), location)
        skies[fid] = sky
    server = make_server(root, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, skies[2]
    server.shutdown()
    server.server_close()


@pytest.fixture
def lcquery(service, monkeypatch):
    try:
        import ztfquery.lightcurve as ztf_lightcurve
    except ImportError:
        pytest.fail("ztfquery is not installed: run `bash bootstrap.sh setup` (it is in the test extra)")
    monkeypatch.setattr(ztf_lightcurve, "BASEURL", f"{service[0]}{LIGHTCURVE_PATH}?")
    return ztf_lightcurve.LCQuery


def _brightest(sky) -> tuple[float, float]:
    i = int(np.argmin(sky.true_mag))
    return float(sky.reference["ra"][i]), float(sky.reference["dec"][i])


def _check_irsa_columns(data) -> None:
    from pandas.api import types

    assert list(data.columns) == list(IRSA_COLUMNS)
    for name, irsa_type in IRSA_COLUMNS.items():
        kind = {"long": types.is_integer_dtype, "int": types.is_integer_dtype, "double": types.is_float_dtype,
                "float": types.is_float_dtype, "char": types.is_string_dtype}[irsa_type]
        assert kind(data[name]), f"{name}: pandas read {data[name].dtype}, IRSA types it {irsa_type}"
    assert data[["chi", "sharp", "clrcoeff", "clrcounc", "limitmag", "magzp"]].notna().all().all()
    assert data["filefracday"].between(2e13, 3e13).all()


def test_by_position_band_and_id(lcquery, service):
    base, root, sky = service
    ra, dec = _brightest(sky)
    both = lcquery.from_position(ra, dec, 2.0, cookies={}).data
    _check_irsa_columns(both)
    assert sorted(set(both["filtercode"])) == ["zg", "zr"] and len(both) == 2 * EPOCHS
    ours = LightcurveReader(root).cone(ra, dec, 2.0 / 3600)
    assert np.array_equal(both["oid"], ours["oid"]) and np.array_equal(both["filefracday"], ours["filefracday"])
    for name in ("hjd", "mjd", "ra", "dec"):
        assert np.array_equal(both[name].to_numpy(), np.asarray(ours[name]))
    for name in ("mag", "chi", "sharp", "clrcoeff", "limitmag"):
        assert np.array_equal(both[name].to_numpy(np.float32), np.asarray(ours[name]))

    g = lcquery.from_position(ra, dec, 2.0, bandname="g", cookies={}).data
    _check_irsa_columns(g)
    assert set(g["filtercode"]) == {"zg"} and len(g) == EPOCHS

    oid = int(both["oid"][both["filtercode"] == "zr"].iloc[0])
    one = lcquery.from_id(str(oid), cookies={})     # ztfquery joins ids as text
    _check_irsa_columns(one.data)
    assert set(one.data["oid"]) == {oid} and len(one.data) == EPOCHS
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    one.show()                                    # draws the curve, as a user's notebook would
    assert plt.gcf().axes[0].get_ylabel() == "mag"
    plt.close("all")


def test_votable_declares_irsas_types(service):
    """The service's VOTable (its default format) declares every column with IRSA's datatype."""
    import urllib.request
    from urllib.parse import quote

    base, _, sky = service
    ra, dec = _brightest(sky)
    url = f"{base}{LIGHTCURVE_PATH}?POS=" + quote(f"CIRCLE {ra} {dec} 0.0006")
    with urllib.request.urlopen(url, timeout=10) as response:
        table = parse(io.BytesIO(response.read())).get_first_table()
    assert {field.name: field.datatype for field in table.fields} == IRSA_COLUMNS
