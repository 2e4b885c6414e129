"""LDAC files as SCAMP needs them: blank-padded header block, NAXIS present, clear errors."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from pipeline.formats.ldac import LDACError, read_ldac, write_ldac


def _header():
    h = fits.Header()
    h["NAXIS"], h["NAXIS1"], h["NAXIS2"] = 2, 3072, 3080
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    return h


def test_round_trip_and_blank_padded_header(tmp_path):
    table = Table({"XWIN_IMAGE": np.arange(5.0), "FLAGS": np.zeros(5, np.int16)})
    path = write_ldac(tmp_path / "c.ldac", table, _header())
    objects, header = read_ldac(path)
    assert np.array_equal(objects["XWIN_IMAGE"], np.arange(5.0))
    assert objects["FLAGS"].dtype.kind == "i" and objects["FLAGS"].dtype.itemsize == 2
    assert header["NAXIS1"] == 3072 and header["CTYPE2"] == "DEC--TAN"
    with fits.open(path) as hdul:
        block = bytes(hdul["LDAC_IMHEAD"].data.tobytes())
    assert b"\0" not in block and len(block) % 2880 == 0
    assert block.startswith(b"SIMPLE  =") and block[80:88] == b"BITPIX  "   # SCAMP needs a primary-like block
    end = block.index(b"END     ")
    assert end % 80 == 0 and block[end:].strip() == b"END"


def test_detection_header_needs_naxis(tmp_path):
    with pytest.raises(LDACError, match="NAXIS1"):
        write_ldac(tmp_path / "c.ldac", Table({"X": [1.0]}), fits.Header())


def test_truncated_and_foreign_files_are_named(tmp_path):
    path = write_ldac(tmp_path / "c.ldac", Table({"X": np.arange(2000.0)}), _header())
    cut = tmp_path / "cut.ldac"
    cut.write_bytes(path.read_bytes()[:-3000])
    with pytest.raises(LDACError, match="cut.ldac"):
        read_ldac(cut)
    plain = tmp_path / "plain.fits"
    fits.PrimaryHDU(np.zeros((2, 2))).writeto(plain)
    with pytest.raises(LDACError, match="no LDAC_OBJECTS"):
        read_ldac(plain)
