"""The input keyword contract: every required keyword checked, errors that name file and keyword."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from pipeline.core.image import (MASK_BITS, REQUIRED_KEYWORDS, ImageContractError, read_quadrant,
                            validate_header, write_quadrant)


def contract_header() -> fits.Header:
    h = fits.Header()
    values = dict(FIELDID=600, CCDID=6, QID=1, FILTER="ZTF_r", FILTERID=2, OBSMJD=61114.3,
                  EXPTIME=30.0, EXPID=299500001, PROGRMID=1, TELRA=150.0, TELDEC=33.0,
                  AIRMASS=1.02, GAIN=6.2, READNOI=8.0, SATURATE=50000.0, TEMPTURE=10.0,
                  PRESSURE=830.0)
    for key, value in values.items():
        h[key] = value
    return h


def write_image(path, header, data=None, mask=None):
    data = np.full((40, 50), 100.0, np.float32) if data is None else data
    return write_quadrant(path, data, header, mask)


def test_valid_image_reads_back(tmp_path):
    mask = np.zeros((40, 50), np.int16)
    mask[3, 4] = MASK_BITS["BAD"]
    path = write_image(tmp_path / "q.fits", contract_header(), mask=mask)
    img = read_quadrant(path)
    assert img.meta.rcid == 20 and img.meta.filter == "ZTF_r" and img.meta.temperature == 10.0
    assert img.meta.magzp is None
    assert img.data.dtype == np.float32 and img.mask[3, 4] == MASK_BITS["BAD"]
    assert abs(img.meta.obstime.mjd - (61114.3 + 15 / 86400)) < 1e-9


@pytest.mark.parametrize("keyword", sorted(REQUIRED_KEYWORDS))
def test_each_missing_keyword_is_named(tmp_path, keyword):
    header = contract_header()
    del header[keyword]
    path = write_image(tmp_path / f"missing_{keyword}.fits", header)
    with pytest.raises(ImageContractError) as info:
        read_quadrant(path)
    assert str(path) in str(info.value) and keyword in str(info.value)


@pytest.mark.parametrize("keyword, value", [
    ("CCDID", 17), ("QID", 0), ("FILTER", "ZTF_z"), ("FILTERID", 1), ("EXPTIME", 0.0),
    ("TELRA", 361.0), ("TELDEC", -91.0), ("AIRMASS", 0.9), ("GAIN", -1.0), ("EXPID", "abc"),
    ("SATURATE", 0.0), ("OBSMJD", "yesterday"),
])
def test_bad_values_are_named(keyword, value):
    header = contract_header()
    header[keyword] = value
    with pytest.raises(ImageContractError, match=keyword):
        validate_header(header, "x.fits")


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "corrupt.fits"
    path.write_bytes(b"SIMPLE  =                    T" + b"\0" * 100)
    with pytest.raises(ImageContractError, match="corrupt.fits: not a readable FITS image"):
        read_quadrant(path)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = write_image(tmp_path / "full.fits", contract_header())
    cut = tmp_path / "cut.fits"
    cut.write_bytes(path.read_bytes()[:4000])
    with pytest.raises(ImageContractError, match="cut.fits"):
        read_quadrant(cut)


def test_missing_file(tmp_path):
    with pytest.raises(ImageContractError, match="file not found"):
        read_quadrant(tmp_path / "nope.fits")


def test_nan_pixels_are_masked_and_all_nan_rejected(tmp_path):
    data = np.full((40, 50), 100.0, np.float32)
    data[5, 5] = np.nan
    img = read_quadrant(write_image(tmp_path / "some_nan.fits", contract_header(), data))
    assert img.mask[5, 5] & MASK_BITS["NAN"] and img.mask.sum() == MASK_BITS["NAN"]
    with pytest.raises(ImageContractError, match="no finite pixel"):
        read_quadrant(write_image(tmp_path / "all_nan.fits", contract_header(),
                                  np.full((40, 50), np.nan, np.float32)))


def test_mask_of_wrong_shape_is_rejected(tmp_path):
    path = write_image(tmp_path / "m.fits", contract_header(), mask=np.zeros((10, 10), np.int16))
    with pytest.raises(ImageContractError, match="MASK"):
        read_quadrant(path)


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = write_image(tmp_path / "keep.fits", contract_header())
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(fits.HDUList, "writeto", boom)
    with pytest.raises(OSError):
        write_image(path, contract_header(), np.zeros((40, 50), np.float32))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.fits"]
