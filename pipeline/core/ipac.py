"""ZTF's own processed quadrant images (IPAC's ``sciimg.fits`` with its ``mskimg.fits``) read
as quadrant images of the input contract, and written (by the simulator) in that layout.

Source: *The ZTF Science Data System (ZSDS) Explanatory Supplement* (F. J. Masci et al.,
IPAC/Caltech), at IRSA: https://irsa.ipac.caltech.edu/data/ZTF/docs/ztf_explanatory_supplement.pdf
-- the file-naming convention of the single-exposure products, the science image's header
keywords, and its section "science-image bit-mask definitions" (the ``mskimg`` bits, also
listed as ``BITnn`` cards in every ``mskimg`` header).

What is read from where
-----------------------
- Pixels: the primary HDU of ``..._sciimg.fits`` (or the first image extension of a
  tile-compressed ``.fits.fz``, or a gzipped ``.fits.gz``): float DN, instrumentally
  calibrated, the sky not subtracted (the contract's pixels as they are).
- Mask: the sibling ``..._mskimg.fits`` (same name, ``sciimg`` -> ``mskimg``, any of the three
  compressions), mapped bit by bit through :data:`IPAC_TO_SKYDIFF`.  A ``sciimg`` without
  its ``mskimg`` is bad input: its saturated, dead and NaN pixels would go unmasked.
- Keywords: IPAC's header uses the contract's own names (``FIELDID``, ``CCDID``, ``QID``,
  ``FILTERID``, ``FILTER``, ``EXPID``, ``PROGRMID``, ``OBSMJD``, ``EXPTIME``, ``TELRA``,
  ``TELDEC``, ``AIRMASS``, ``GAIN``, ``READNOI``, ``SATURATE``, ``MAGZP``); mapped are only
  those a product may spell otherwise: ``FILTER`` given as ``g``/``zg``/``ZTF_g`` (or absent:
  from ``FILTERID``, 1 g, 2 r, 3 i), ``OBSMJD`` absent (from ``OBSJD`` - 2400000.5), ``RCID``
  (never needed: ``4 (CCDID - 1) + QID - 1``).  The field, CCD, filter and quadrant in the
  file name must agree with the header (a renamed file is refused, naming both).
  ``SEEING``, ``MAGZPUNC`` and the rest of IPAC's calibration keywords are kept in the header
  and not used: skydiff measures its own.  The header's WCS (IPAC's SCAMP solution) is the
  astrometric first guess, as any header WCS.

Why the layout is recognised by the file name and not by an option: a file named
``ztf_<filefracday>_<field>_<filter>_c<CC>_<imgtype>_q<Q>_sciimg.fits`` is IPAC's product by
IPAC's own convention, and its mask lives in another file whose bits mean something else
than skydiff's (bit 1 marks every SExtractor source, bit 3 a "high responsivity" pixel).
Reading it as a plain contract image would always be wrong, so there is no choice for an
option to make: the name decides, in :func:`pipeline.core.image.read_quadrant` (any command
reading a quadrant) and in folder exposures (:func:`sciimg_files`), where the ``mskimg``
files are the ``sciimg`` files' masks, not quadrants.
"""
from __future__ import annotations

import gzip
import math
import os
import re
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.time import Time

from pipeline.core.image import (FILTER_IDS, MASK_BITS, ImageContractError, QuadrantImage, fits_read_errors,
                                 quadrant_image)
from pipeline.formats.atomic import atomic_path

__all__ = ["IPAC_MASK_BITS", "IPAC_TO_SKYDIFF", "SKYDIFF_TO_IPAC", "IPAC_NAME", "is_sciimg", "sciimg_rcid",
           "mskimg_path", "read_ipac_quadrant", "ipac_mask_to_skydiff", "ipac_name", "write_ipac_quadrant",
           "sciimg_files", "COMPRESSIONS"]

#: The ``mskimg`` bits (bit number -> meaning), as the explanatory supplement defines them
#: for single-exposure science images (bits 13-15 reserved).
IPAC_MASK_BITS = {
    0: "aircraft/satellite track",
    1: "contains a SExtractor detection",
    2: "low responsivity",
    3: "high responsivity",
    4: "noisy",
    5: "ghost from a bright source",
    6: "possible ghost from charge spillage",
    7: "pixel spike (possible radiation hit)",
    8: "saturated",
    9: "dead (unresponsive)",
    10: "NaN (not a number)",
    11: "contains a PSF-extracted source position",
    12: "halo from a bright source",
}

#: IPAC bit -> skydiff mask value.  Every bit saying "do not use this pixel" becomes BAD,
#: except saturation (SATURATED: extraction and candidates treat it as such) and NaN (NAN);
#: bits 1 and 11 mark where sources are, not defects, and map to nothing (masking them
#: would mask every star); reserved bits 13-15 map to nothing.
IPAC_TO_SKYDIFF = {
    0: MASK_BITS["BAD"], 1: 0, 2: MASK_BITS["BAD"], 3: MASK_BITS["BAD"], 4: MASK_BITS["BAD"],
    5: MASK_BITS["BAD"], 6: MASK_BITS["BAD"], 7: MASK_BITS["BAD"], 8: MASK_BITS["SATURATED"],
    9: MASK_BITS["BAD"], 10: MASK_BITS["NAN"], 11: 0, 12: MASK_BITS["BAD"],
}

#: skydiff bit -> IPAC bit, for writing (the simulator's IPAC layout).  IPAC has no bleed-trail
#: bit: a bleed trail is saturated charge, written as bit 8 (read back as SATURATED, which
#: extraction, candidates and coadds treat as they treat BLEED); EDGE has no IPAC bit in a
#: single-exposure image and is written as bit 9 (dead), read back as BAD.
SKYDIFF_TO_IPAC = {"BAD": 9, "SATURATED": 8, "BLEED": 8, "EDGE": 9, "NAN": 10}

#: IPAC's single-exposure product name: filefracday (YYYYMMDD + 6 digits of the day's
#: fraction), field (6 digits), filter code, CCD (2 digits), image type code, quadrant.
IPAC_NAME = re.compile(r"^ztf_(?P<filefracday>\d{14})_(?P<field>\d{6})_(?P<fcode>z[gri])_c(?P<ccd>\d{2})_"
                       r"(?P<imgtype>[a-z])_q(?P<qid>[1-4])_sciimg\.fits(?P<compression>\.fz|\.gz)?$")

#: File-name suffixes of the three compressions: none, tile-compressed (fpack), gzip.
COMPRESSIONS = {"none": "", "fz": ".fz", "gz": ".gz"}

_FILTER_CODES = {"zg": "ZTF_g", "zr": "ZTF_r", "zi": "ZTF_i"}
_FILTER_NAMES = {**_FILTER_CODES, "g": "ZTF_g", "r": "ZTF_r", "i": "ZTF_i",
                 **{name: name for name in FILTER_IDS}}


def is_sciimg(path: str | os.PathLike) -> bool:
    """True when the file name is an IPAC science image's (any compression)."""
    return IPAC_NAME.match(Path(path).name) is not None


def sciimg_rcid(path: str | os.PathLike) -> int:
    """The rcid an IPAC science image's name gives (ValueError when it is not one)."""
    match = IPAC_NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path}: not an IPAC sciimg file name")
    return 4 * (int(match["ccd"]) - 1) + int(match["qid"]) - 1


def sciimg_files(folder: str | os.PathLike) -> list[Path]:
    """The IPAC science images of a folder exposure, sorted (their masks are not quadrants)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and is_sciimg(p))


def mskimg_path(sciimg: str | os.PathLike) -> Path:
    """The science image's mask file: its sibling ``..._mskimg.fits`` in any compression
    (the science image's own first); raises :class:`ImageContractError` naming the file
    looked for when there is none."""
    sciimg = Path(sciimg)
    match = IPAC_NAME.match(sciimg.name)
    if match is None:
        raise ImageContractError(sciimg, "not an IPAC sciimg file name")
    stem = sciimg.name[:match.start("compression")] if match["compression"] else sciimg.name
    base = stem.replace("_sciimg.fits", "_mskimg.fits")
    suffixes = [match["compression"] or ""] + [s for s in COMPRESSIONS.values() if s != (match["compression"] or "")]
    for suffix in suffixes:
        candidate = sciimg.with_name(base + suffix)
        if candidate.exists():
            return candidate
    raise ImageContractError(sciimg, f"IPAC science image without its mask: {sciimg.with_name(base)} "
                                     "(or .fz, .gz) not found")


def ipac_mask_to_skydiff(mask: np.ndarray) -> np.ndarray:
    """An IPAC ``mskimg`` array as skydiff's mask (int32), bit by bit through
    :data:`IPAC_TO_SKYDIFF`."""
    mask = np.asarray(mask).astype(np.int64)
    out = np.zeros(mask.shape, dtype=np.int32)
    for bit, value in IPAC_TO_SKYDIFF.items():
        if value:
            out[(mask & (1 << bit)) != 0] |= value
    return out


def _image_hdu(hdul: fits.HDUList, source: Path) -> fits.ImageHDU | fits.PrimaryHDU | fits.CompImageHDU:
    for hdu in hdul:
        if hdu.is_image and hdu.data is not None and hdu.data.ndim == 2:
            return hdu
    raise ImageContractError(source, "no two-dimensional image in the file")


def _contract_header(header: fits.Header, source: Path, match: re.Match) -> fits.Header:
    """IPAC's header with the contract's keywords where IPAC may spell them otherwise, checked
    against the file name."""
    header = header.copy()
    for key in ("ZIMAGE", "ZBITPIX", "ZNAXIS", "ZNAXIS1", "ZNAXIS2", "ZTILE1", "ZTILE2", "ZCMPTYPE"):
        header.remove(key, ignore_missing=True)
    if "FILTER" in header and isinstance(header["FILTER"], str):
        name = header["FILTER"].strip()
        if name not in _FILTER_NAMES:
            raise ImageContractError(source, f"keyword FILTER = {name!r}: not a ZTF filter (g, r, i)")
        header["FILTER"] = _FILTER_NAMES[name]
    elif "FILTERID" in header:
        by_id = {v: k for k, v in FILTER_IDS.items()}
        if header["FILTERID"] not in by_id:
            raise ImageContractError(source, f"keyword FILTERID = {header['FILTERID']!r} must be 1, 2 or 3")
        header["FILTER"] = by_id[header["FILTERID"]]
    if "OBSMJD" not in header and "OBSJD" in header:
        obsjd = header["OBSJD"]
        if isinstance(obsjd, (int, float)) and not isinstance(obsjd, bool) and math.isfinite(obsjd):
            header["OBSMJD"] = (float(obsjd) - 2400000.5, "UTC MJD at exposure start (from OBSJD)")
    named = {"FIELDID": int(match["field"]), "CCDID": int(match["ccd"]), "QID": int(match["qid"]),
             "FILTER": _FILTER_CODES[match["fcode"]]}
    for key, value in named.items():
        if key in header and header[key] != value:
            raise ImageContractError(source, f"keyword {key} = {header[key]!r} but the file name says {value!r}")
    return header


def _read_hdu(path: Path) -> tuple[np.ndarray, fits.Header]:
    with fits.open(path, memmap=False) as hdul:
        hdul.verify("silentfix")
        hdu = _image_hdu(hdul, path)
        return np.asarray(hdu.data), hdu.header.copy()


def read_ipac_header(path: str | os.PathLike) -> fits.Header:
    """The contract header of an IPAC ``sciimg`` (no mask read; the pixels only where the file
    is compressed and the header must be found through them).

    Raises
    ------
    ImageContractError
        Not an IPAC name, an unreadable file, a header disagreeing with the name.
    """
    path = Path(path)
    match = IPAC_NAME.match(path.name)
    if match is None:
        raise ImageContractError(path, "not an IPAC sciimg file name")
    with fits_read_errors(path), fits.open(path, memmap=True) as hdul:
        header = _image_hdu(hdul, path).header.copy()
    return _contract_header(header, path, match)


def read_ipac_quadrant(path: str | os.PathLike) -> QuadrantImage:
    """Read an IPAC ``sciimg`` and its ``mskimg`` as a contract quadrant image.

    Raises
    ------
    ImageContractError
        Not an IPAC name, the mask missing or of another shape, an unreadable file, a header
        keyword missing or bad (as the contract names it), a header disagreeing with the name.
    """
    path = Path(path)
    match = IPAC_NAME.match(path.name)
    if match is None:
        raise ImageContractError(path, "not an IPAC sciimg file name (ztf_<filefracday>_<field>_<filter>_c<CC>_"
                                       "<type>_q<Q>_sciimg.fits[.fz|.gz])")
    mask_file = mskimg_path(path)
    with fits_read_errors(path):
        data, header = _read_hdu(path)
    with fits_read_errors(mask_file, "mask"):
        mask, _ = _read_hdu(mask_file)
    if mask.shape != data.shape:
        raise ImageContractError(mask_file, f"mask shape {mask.shape} does not match the science image's {data.shape}")
    if not np.issubdtype(mask.dtype, np.integer):
        raise ImageContractError(mask_file, "mask must hold integers")
    image = quadrant_image(data, _contract_header(header, path, match), ipac_mask_to_skydiff(mask), str(path))
    image.extras["mskimg"] = str(mask_file)
    return image


def ipac_name(header: fits.Header, imgtype: str = "o") -> str:
    """IPAC's ``sciimg`` file name for a contract header: filefracday from ``OBSMJD`` (the UT
    date and the day's fraction to six digits), the field, filter, CCD, image type, quadrant."""
    start = Time(float(header["OBSMJD"]), format="mjd", scale="utc")
    day = math.floor(float(header["OBSMJD"]))
    fraction = min(int(round((float(header["OBSMJD"]) - day) * 1e6)), 999999)
    code = {v: k for k, v in _FILTER_CODES.items()}[str(header["FILTER"]).strip()]
    return (f"ztf_{start.strftime('%Y%m%d')}{fraction:06d}_{int(header['FIELDID']):06d}_{code}_"
            f"c{int(header['CCDID']):02d}_{imgtype}_q{int(header['QID'])}_sciimg.fits")


def _skydiff_mask_to_ipac(mask: np.ndarray) -> np.ndarray:
    out = np.zeros(mask.shape, dtype=np.int16)
    for name, bit in SKYDIFF_TO_IPAC.items():
        out[(mask & MASK_BITS[name]) != 0] |= np.int16(1 << bit)
    return out


def _source_bits(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """IPAC's bits 1 (SExtractor detection) and 11 (PSF-extracted source position) on the
    pixels of the sources sep finds at 1.5 sigma, as IPAC's pipeline sets them."""
    import sep

    good = np.ascontiguousarray(np.where(np.isfinite(data), data, 0.0), dtype=np.float32)
    background = sep.Background(good, mask=mask != 0)
    residual = good - background.back()
    sep.set_extract_pixstack(5_000_000)
    sep.set_sub_object_limit(4096)
    objects, segmentation = sep.extract(residual, 1.5, err=background.globalrms, mask=mask != 0,
                                        minarea=5, segmentation_map=True)
    bits = np.where(segmentation > 0, np.int16(1 << 1), np.int16(0)).astype(np.int16)
    rows = np.clip(np.rint(objects["y"]).astype(int), 0, data.shape[0] - 1)
    cols = np.clip(np.rint(objects["x"]).astype(int), 0, data.shape[1] - 1)
    bits[rows, cols] |= np.int16(1 << 11)
    return bits


def _write(hdu, path: Path, compression: str) -> None:
    if compression == "fz":
        # Lossless tile compression (GZIP_2 without quantisation): the pixels read back exactly.
        compressed = fits.CompImageHDU(hdu.data, header=hdu.header, compression_type="GZIP_2",
                                       quantize_level=0.0) if hdu.data.dtype.kind == "f" else \
            fits.CompImageHDU(hdu.data, header=hdu.header, compression_type="RICE_1")
        hdus = fits.HDUList([fits.PrimaryHDU(), compressed])
    else:
        hdus = fits.HDUList([hdu])
    with atomic_path(path) as temporary:
        if compression == "gz":
            with gzip.open(temporary, "wb", compresslevel=5) as stream:
                hdus.writeto(stream)
        else:
            hdus.writeto(temporary, overwrite=True)


def write_ipac_quadrant(image: QuadrantImage, folder: str | os.PathLike, compression: str = "none",
                        source_bits: bool = True) -> tuple[Path, Path]:
    """Write a quadrant image in IPAC's layout: ``<folder>/<ipac_name>`` and its ``mskimg``.

    The header is the image's, as IPAC writes it: without ``RCID`` (IPAC's single-exposure
    header has none), with ``OBSJD`` beside ``OBSMJD``.  The mask is mapped through
    :data:`SKYDIFF_TO_IPAC`, and with ``source_bits`` IPAC's bits 1 and 11 are set on the
    sources' pixels (:func:`_source_bits`), which a reader must not take for defects.

    Parameters
    ----------
    compression : {"none", "fz", "gz"}
        Plain FITS, lossless tile compression (``.fits.fz``) or gzip (``.fits.gz``).

    Returns
    -------
    (sciimg path, mskimg path)
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression {compression!r}: expected one of {', '.join(COMPRESSIONS)}")
    folder = Path(folder)
    header = image.header.copy()
    header.remove("RCID", ignore_missing=True)
    header["OBSJD"] = (float(header["OBSMJD"]) + 2400000.5, "UTC JD at exposure start")
    name = ipac_name(header)
    science = folder / (name + COMPRESSIONS[compression])
    masked = folder / (name.replace("_sciimg.fits", "_mskimg.fits") + COMPRESSIONS[compression])
    mask = _skydiff_mask_to_ipac(image.mask)
    if source_bits:
        mask |= _source_bits(image.data, image.mask)
    mask_header = fits.Header()
    for bit, meaning in IPAC_MASK_BITS.items():
        mask_header[f"BIT{bit:02d}"] = (bit, meaning.upper()[:47])
    _write(fits.PrimaryHDU(np.asarray(image.data, dtype=np.float32), header=header), science, compression)
    _write(fits.PrimaryHDU(mask, header=mask_header), masked, compression)
    return science, masked
