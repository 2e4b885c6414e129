"""The Earth-orientation table from the per-user cache is astropy's own, value for value, and
a fresh process reads it from there instead of parsing the bundled text."""
from __future__ import annotations

import json
import os
import subprocess
import sys

_PROBE = r"""
import json, sys
import numpy as np
from pipeline.core.earth_orientation import install_earth_orientation_table
source = install_earth_orientation_table(sys.argv[1]) if sys.argv[1] != "-" else "astropy"
from astropy.coordinates import AltAz, EarthLocation, SkyCoord
from astropy.time import Time
import astropy.units as u
times = Time(np.linspace(58000.0, 61500.0, 40), format="mjd")
site = EarthLocation.from_geodetic(-116.8599 * u.deg, 33.3563 * u.deg, 1712.0 * u.m)
altaz = SkyCoord(ra=np.linspace(0, 350, 40) * u.deg, dec=np.linspace(-30, 85, 40) * u.deg).transform_to(
    AltAz(obstime=times, location=site))
print(json.dumps({"source": source, "alt": altaz.alt.deg.tolist(), "az": altaz.az.deg.tolist(),
                  "ut1": (times.ut1.jd2).tolist()}))
"""


def _probe(cache, cwd) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, str(cache)], cwd=cwd, capture_output=True, text=True,
                         check=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_cached_table_gives_astropys_own_transformations(tmp_path):
    cache = tmp_path / "cache"
    plain = _probe("-", tmp_path)
    first, second = _probe(cache, tmp_path), _probe(cache, tmp_path)
    assert (first["source"], second["source"]) == ("parsed", "cache")
    assert len(list(cache.glob("iers-a-*.fits"))) == 1
    for key in ("alt", "az", "ut1"):
        assert first[key] == plain[key] and second[key] == plain[key]      # bit for bit


def test_a_damaged_or_foreign_cache_is_passed_over(tmp_path):
    cache = tmp_path / "cache"
    plain = _probe("-", tmp_path)
    _probe(cache, tmp_path)
    (table,) = cache.glob("iers-a-*.fits")
    table.write_bytes(b"not a FITS file")
    again = _probe(cache, tmp_path)
    assert again["source"] == "parsed" and again["alt"] == plain["alt"]
    assert _probe(cache, tmp_path)["source"] == "cache"                    # replaced
    cache.chmod(0o777)                                                     # others could write there
    assert _probe(cache, tmp_path)["source"] == "parsed"
