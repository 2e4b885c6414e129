"""ZTF's IPAC products (sciimg + mskimg) read as contract quadrant images: the file-name
convention, the mask bits of the explanatory supplement, the keyword mapping, the three
compressions, folder exposures of pairs, and bad input named."""
from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from pipeline.core.image import MASK_BITS, ImageContractError, QuadrantImage, quadrant_image, read_quadrant
from pipeline.core.ipac import (IPAC_TO_SKYDIFF, ipac_mask_to_skydiff, ipac_name, is_sciimg, mskimg_path,
                                sciimg_rcid, write_ipac_quadrant)
from pipeline.formats.exposure import exposure_rcids, write_exposure_ipac
from pipeline.run.quadrant import locate_quadrant

from core.test_image import contract_header

SHAPE = (120, 100)


def _image(ccdid: int = 6, qid: int = 2) -> QuadrantImage:
    """A small quadrant with a few stars, a bad column, a saturated star with a bleed and a NaN."""
    rng = np.random.default_rng(5)
    y, x = np.mgrid[:SHAPE[0], :SHAPE[1]]
    data = 500.0 + rng.normal(0, 5, SHAPE)
    for cx, cy, flux in [(20, 30, 5e4), (70, 80, 2e4), (50, 20, 1e4), (80, 40, 8e3)]:
        data += flux / (2 * np.pi * 2.0 ** 2) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 2.0 ** 2))
    mask = np.zeros(SHAPE, np.int16)
    mask[:, 7] |= MASK_BITS["BAD"]
    mask[60:63, 33] |= MASK_BITS["SATURATED"]
    mask[63:70, 33] |= MASK_BITS["BLEED"]
    data[5, 90] = np.nan
    header = contract_header()
    header["CCDID"], header["QID"], header["RCID"] = ccdid, qid, 4 * (ccdid - 1) + qid - 1
    return quadrant_image(data.astype(np.float32), header, mask, "<test>")


def test_names_follow_ipac_convention():
    header = contract_header()
    name = ipac_name(header)
    # OBSMJD 61114.3 is 2026-03-15 at 0.3 of the day; field 600, r, CCD 6, object image, quadrant 1.
    assert name == "ztf_20260315300000_000600_zr_c06_o_q1_sciimg.fits"
    assert is_sciimg(name) and is_sciimg(name + ".fz") and is_sciimg(name + ".gz")
    assert not is_sciimg(name.replace("sciimg", "mskimg")) and not is_sciimg("ztf_1_f600_ZTF_r_c06_q1.fits")
    assert sciimg_rcid(name) == 20


def test_every_ipac_bit_maps_as_documented():
    ipac = np.array([[1 << bit for bit in range(16)]], dtype=np.int32)
    mapped = ipac_mask_to_skydiff(ipac)[0]
    do_not_use = {0, 2, 3, 4, 5, 6, 7, 9, 12}
    for bit in range(16):
        if bit in do_not_use:
            assert mapped[bit] == MASK_BITS["BAD"], bit
        elif bit == 8:
            assert mapped[bit] == MASK_BITS["SATURATED"]
        elif bit == 10:
            assert mapped[bit] == MASK_BITS["NAN"]
        else:            # 1, 11: where sources are; 13-15 reserved
            assert mapped[bit] == 0, bit
    assert set(IPAC_TO_SKYDIFF) == set(range(13))
    # Bits combine: a saturated pixel inside a SExtractor source on a satellite track.
    assert ipac_mask_to_skydiff(np.array([(1 << 8) | (1 << 1) | 1]))[0] == MASK_BITS["SATURATED"] | MASK_BITS["BAD"]


@pytest.mark.parametrize("compression", ["none", "fz", "gz"])
def test_pair_reads_back_as_the_contract_image(tmp_path, compression):
    image = _image()
    science, masked = write_ipac_quadrant(image, tmp_path, compression)
    assert science.name.endswith("_sciimg.fits" + {"none": "", "fz": ".fz", "gz": ".gz"}[compression])
    assert mskimg_path(science) == masked
    with fits.open(masked) as hdul:
        raw_mask = next(h for h in hdul if h.data is not None).data
    assert np.any(raw_mask & (1 << 1)) and np.any(raw_mask & (1 << 11))      # IPAC's source bits written
    assert "RCID" not in fits.getheader(science, 1 if compression == "fz" else 0)

    back = read_quadrant(science)
    assert back.meta == image.meta and back.meta.rcid == 21
    np.testing.assert_array_equal(np.isnan(back.data), np.isnan(image.data))
    np.testing.assert_array_equal(np.nan_to_num(back.data), np.nan_to_num(image.data))     # lossless
    # The source bits became nothing; BLEED came back as SATURATED (IPAC has no bleed bit).
    expected = image.mask.copy()
    bleed = (expected & MASK_BITS["BLEED"]) != 0
    expected[bleed] = (expected[bleed] & ~MASK_BITS["BLEED"]) | MASK_BITS["SATURATED"]
    np.testing.assert_array_equal(back.mask, expected)
    assert back.wcs is None and back.extras["mskimg"] == str(masked)


def test_keywords_ipac_may_spell_otherwise(tmp_path):
    science, _ = write_ipac_quadrant(_image(), tmp_path)
    with fits.open(science, mode="update") as hdul:
        del hdul[0].header["FILTER"]
        del hdul[0].header["OBSMJD"]
    back = read_quadrant(science)
    assert back.meta.filter == "ZTF_r" and abs(back.meta.obsmjd - 61114.3) < 1e-8
    with fits.open(science, mode="update") as hdul:
        hdul[0].header["FILTER"] = "zr"
    assert read_quadrant(science).meta.filter == "ZTF_r"


def test_bad_input_is_named(tmp_path):
    science, masked = write_ipac_quadrant(_image(), tmp_path)
    with fits.open(science, mode="update") as hdul:
        hdul[0].header["CCDID"] = 7
    with pytest.raises(ImageContractError, match="CCDID = 7 but the file name says 6"):
        read_quadrant(science)
    science, masked = write_ipac_quadrant(_image(ccdid=3), tmp_path)
    masked.unlink()
    with pytest.raises(ImageContractError) as info:
        read_quadrant(science)
    assert str(science) in str(info.value) and masked.name in str(info.value) and "without its mask" in str(info.value)


def test_folder_exposure_of_pairs(tmp_path):
    native = []
    for ccdid, qid in [(6, 1), (6, 2), (16, 4)]:
        image = _image(ccdid, qid)
        path = tmp_path / "native" / f"q{ccdid}_{qid}.fits"
        path.parent.mkdir(exist_ok=True)
        from pipeline.core.image import write_quadrant
        write_quadrant(path, image.data, image.header, image.mask)
        native.append(path)
    folder = tmp_path / "ipac"
    written = write_exposure_ipac(native, folder, "fz")
    assert len(written) == 3 and len(list(folder.iterdir())) == 6
    assert exposure_rcids(folder) == [20, 21, 63]
    path, hdu = locate_quadrant(folder, 63)
    assert hdu is None and path.name.endswith("_c16_o_q4_sciimg.fits.fz")
    assert read_quadrant(path).meta.rcid == 63


def test_watcher_sees_a_folder_of_gzipped_pairs(tmp_path):
    """``skydiff watch`` takes a folder exposure of .fits.gz pairs (no FITS block structure)."""
    from slurm.watch import exposure_signature

    science, masked = write_ipac_quadrant(_image(), tmp_path / "exp", "gz")
    signature = exposure_signature(tmp_path / "exp")
    assert signature is not None and {name for name, *_ in signature} == {science.name, masked.name}
    (tmp_path / "exp" / "partial.fits").write_bytes(b"x" * 100)       # a plain FITS still being written
    assert exposure_signature(tmp_path / "exp") is None
