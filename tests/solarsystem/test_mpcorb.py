"""The MPCORB format: packed designations and epochs, a write/read round trip (through
skyfield's reader), errors naming the file."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.exits import BadInputError
from pipeline.simulate.asteroids import synthetic_orbits
from solarsystem.mpcorb import (pack_designation, pack_epoch, read_mpcorb, ssnamenr_of, unpack_designation,
                                unpack_epoch_jd, write_mpcorb)


@pytest.mark.parametrize("name, packed", [
    ("1", "00001"), ("97125", "97125"), ("100345", "A0345"), ("360017", "a0017"), ("620000", "~0000"),
    ("3140113", "~AZaz"), ("1995 XA", "J95X00A"), ("2019 VG102", "K19VA2G"), ("2007 TA418", "K07Tf8A"),
    ("2026 EK1", "K26E01K")])
def test_designations_pack_as_the_mpc_does(name, packed):
    assert pack_designation(name) == packed
    assert unpack_designation(packed) == name


def test_epochs_pack_and_unpack():
    # 2026-03-05 0h TT is JD 2461104.5; K2635 in the MPC's packed form.
    assert pack_epoch(2461104.5) == "K2635"
    assert unpack_epoch_jd(np.array(["K2635", "K243V", "J9811"])).tolist() == [2461104.5, 2460400.5, 2450814.5]
    assert ssnamenr_of("2019 VG102") == "2019VG102" and ssnamenr_of("97125") == "97125"


@pytest.mark.parametrize("name", ["MPCORB.DAT", "MPCORB.DAT.gz"])
def test_write_read_round_trip(tmp_path, name):
    elements = synthetic_orbits(np.random.default_rng(3), 400, 2461104.5)
    path = write_mpcorb(elements, tmp_path / name)
    lines = [line for line in path.read_bytes().splitlines()] if not name.endswith(".gz") else []
    assert all(len(line) == 202 for line in lines[2:])
    back = read_mpcorb(path)
    assert back.designation.tolist() == elements.designation.tolist()
    for field in ("H", "G", "epoch_jd", "mean_anomaly_deg", "peri_deg", "node_deg", "incl_deg", "e", "a_au"):
        np.testing.assert_allclose(getattr(back, field), getattr(elements, field), rtol=0, atol=1e-9, err_msg=field)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(BadInputError, match="nothing.dat"):
        read_mpcorb(tmp_path / "nothing.dat")
    bad = tmp_path / "short.dat"
    bad.write_text("00001  3.34  0.12 K2555  60.07881   73.42179   80.25496   10.58688  0.0789126\n")
    with pytest.raises(BadInputError, match="short.dat"):
        read_mpcorb(bad)


def test_reads_an_mpc_line_with_the_header(tmp_path):
    # Ceres as the MPC's own MPCORB.DAT lists it, after a header ending in a line of dashes.
    ceres = ("00001    3.34  0.12 K205V 162.68631   73.73161   80.28698   10.58862  0.0775571  0.21406009   "
             "2.7676569  0 MPO492748  6751 115 1801-2019 0.60 M-v 30h Williams   0000      (1) Ceres              "
             "20190915")
    path = tmp_path / "MPCORB.DAT"
    path.write_text("MINOR PLANET CENTER ORBIT DATABASE (MPCORB)\n\nDes'n     H     G   Epoch     M\n"
                    + "-" * 160 + "\n" + ceres + "\n\n")
    (back,) = [read_mpcorb(path)]
    assert back.designation.tolist() == ["1"] and back.epoch_jd[0] == 2459000.5
    assert (back.H[0], back.G[0], back.e[0], back.a_au[0], back.incl_deg[0]) == (3.34, 0.12, 0.0775571, 2.7676569, 10.58862)
