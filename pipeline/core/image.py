"""The quadrant image model and its FITS keyword contract.

A quadrant image is a FITS file whose primary HDU (or first image extension) holds
float32 data in ADU, bias-subtracted with the sky not subtracted, and an optional
``MASK`` image extension (integer bit mask, 0 = good; bits in :data:`MASK_BITS`).
The header must carry the keywords of :data:`REQUIRED_KEYWORDS`; those of
:data:`OPTIONAL_KEYWORDS` are used when present.  :func:`read_quadrant` validates all of
it and raises :class:`ImageContractError` naming the file and the keyword.
"""
from __future__ import annotations

import contextlib

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS, FITSFixedWarning
from pipeline.core.exits import BadInputError
from pipeline.formats.atomic import write_fits_atomic

__all__ = [
    "REQUIRED_KEYWORDS", "OPTIONAL_KEYWORDS", "FILTER_IDS", "MASK_BITS",
    "ImageContractError", "QuadrantMeta", "QuadrantImage",
    "validate_header", "read_quadrant", "read_quadrant_header", "fits_read_errors", "quadrant_image", "write_quadrant", "write_quadrant_image",
    "rcid_of", "footprint_corners",
]

FILTER_IDS = {"ZTF_g": 1, "ZTF_r": 2, "ZTF_i": 3}

#: Mask bits written by the simulator and honoured by every stage.
MASK_BITS = {"BAD": 1, "SATURATED": 2, "BLEED": 4, "EDGE": 8, "NAN": 16}

# keyword -> (python type, description); the README's contract table is generated from this.
REQUIRED_KEYWORDS: dict[str, tuple[type, str]] = {
    "FIELDID": (int, "survey field id"),
    "CCDID": (int, "CCD id, 1-16"),
    "QID": (int, "quadrant id within the CCD, 1-4"),
    "FILTER": (str, "filter name: ZTF_g, ZTF_r or ZTF_i"),
    "FILTERID": (int, "filter id: 1 (g), 2 (r), 3 (i), matching FILTER"),
    "OBSMJD": (float, "UTC MJD at exposure start"),
    "EXPTIME": (float, "exposure time, s (> 0)"),
    "EXPID": (int, "exposure id"),
    "PROGRMID": (int, "program id (1 public, 2 partnership, 3 Caltech)"),
    "TELRA": (float, "boresight right ascension, deg (0-360)"),
    "TELDEC": (float, "boresight declination, deg (-90-90)"),
    "AIRMASS": (float, "airmass reported by the telescope (>= 1)"),
    "GAIN": (float, "gain, e-/ADU (> 0)"),
    "READNOI": (float, "read noise, e- (>= 0)"),
    "SATURATE": (float, "saturation level, ADU (> 0)"),
}
OPTIONAL_KEYWORDS: dict[str, tuple[type, str]] = {
    "TEMPTURE": (float, "site air temperature, deg C"),
    "PRESSURE": (float, "site air pressure, hPa"),
    "MAGZP": (float, "photometric zero point, mag for 1 ADU"),
}


class ImageContractError(BadInputError):
    """An input image that breaks the contract; the message names the file and the problem."""

    def __init__(self, source: str | os.PathLike, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


def rcid_of(ccdid: int, qid: int) -> int:
    """Readout-channel id 0-63 of a (CCD, quadrant)."""
    return 4 * (ccdid - 1) + qid - 1


@dataclass(frozen=True)
class QuadrantMeta:
    """The validated contract keywords of one quadrant image."""

    fieldid: int
    ccdid: int
    qid: int
    filter: str
    filterid: int
    obsmjd: float
    exptime: float
    expid: int
    progrmid: int
    telra: float
    teldec: float
    airmass: float
    gain: float
    readnoi: float
    saturate: float
    temperature: float | None = None
    pressure: float | None = None
    magzp: float | None = None

    @property
    def rcid(self) -> int:
        return rcid_of(self.ccdid, self.qid)

    @property
    def obstime(self) -> Time:
        """Mid-exposure time (UTC)."""
        return Time(self.obsmjd + 0.5 * self.exptime / 86400.0, format="mjd", scale="utc")


def _keyword_value(header: fits.Header, key: str, kind: type, source: str) -> Any:
    value = header[key]
    if kind is str:
        if not isinstance(value, str) or not value.strip():
            raise ImageContractError(source, f"keyword {key} must be a non-empty string, got {value!r}")
        return value.strip()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ImageContractError(source, f"keyword {key} must be numeric, got {value!r}")
    if kind is int:
        if float(value) != int(value):
            raise ImageContractError(source, f"keyword {key} must be an integer, got {value!r}")
        return int(value)
    value = float(value)
    if not math.isfinite(value):
        raise ImageContractError(source, f"keyword {key} is not finite ({value!r})")
    return value


def validate_header(header: fits.Header, source: str | os.PathLike = "<header>") -> QuadrantMeta:
    """Check a header against the keyword contract.

    Raises
    ------
    ImageContractError
        Naming the first missing or bad keyword.
    """
    source = str(source)
    values: dict[str, Any] = {}
    for key, (kind, _) in REQUIRED_KEYWORDS.items():
        if key not in header:
            raise ImageContractError(source, f"missing required keyword {key}")
        values[key] = _keyword_value(header, key, kind, source)
    for key, (kind, _) in OPTIONAL_KEYWORDS.items():
        values[key] = _keyword_value(header, key, kind, source) if key in header else None

    checks = [
        ("CCDID", 1 <= values["CCDID"] <= 16, "must be 1-16"),
        ("QID", 1 <= values["QID"] <= 4, "must be 1-4"),
        ("FILTER", values["FILTER"] in FILTER_IDS, f"must be one of {', '.join(FILTER_IDS)}"),
        ("EXPTIME", values["EXPTIME"] > 0, "must be positive"),
        ("TELRA", 0 <= values["TELRA"] < 360, "must be in [0, 360)"),
        ("TELDEC", -90 <= values["TELDEC"] <= 90, "must be in [-90, 90]"),
        ("AIRMASS", values["AIRMASS"] >= 1.0, "must be >= 1"),
        ("GAIN", values["GAIN"] > 0, "must be positive"),
        ("READNOI", values["READNOI"] >= 0, "must not be negative"),
        ("SATURATE", values["SATURATE"] > 0, "must be positive"),
    ]
    for key, ok, rule in checks:
        if not ok:
            raise ImageContractError(source, f"keyword {key} = {values[key]!r} {rule}")
    if FILTER_IDS[values["FILTER"]] != values["FILTERID"]:
        raise ImageContractError(
            source, f"keyword FILTERID = {values['FILTERID']} does not match FILTER = {values['FILTER']}")
    return QuadrantMeta(
        fieldid=values["FIELDID"], ccdid=values["CCDID"], qid=values["QID"],
        filter=values["FILTER"], filterid=values["FILTERID"], obsmjd=values["OBSMJD"],
        exptime=values["EXPTIME"], expid=values["EXPID"], progrmid=values["PROGRMID"],
        telra=values["TELRA"], teldec=values["TELDEC"], airmass=values["AIRMASS"],
        gain=values["GAIN"], readnoi=values["READNOI"], saturate=values["SATURATE"],
        temperature=values["TEMPTURE"], pressure=values["PRESSURE"], magzp=values["MAGZP"],
    )


@dataclass
class QuadrantImage:
    """One quadrant image in memory: pixels, mask, header and validated metadata.

    ``mask`` always exists (zeros when the file has none); NaN pixels in ``data`` carry the
    ``NAN`` mask bit.  ``wcs`` is the header's first-guess WCS, or ``None``.
    """

    data: np.ndarray
    mask: np.ndarray
    header: fits.Header
    meta: QuadrantMeta
    wcs: WCS | None = None
    path: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape


def header_wcs(header: fits.Header) -> WCS | None:
    """The celestial WCS of a header, or ``None`` when it has none."""
    if "CTYPE1" not in header or "CTYPE2" not in header:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        wcs = WCS(header, naxis=2, relax=True)
    return wcs if wcs.has_celestial else None


@contextlib.contextmanager
def fits_read_errors(source: str | os.PathLike, what: str = "image"):
    """Errors of reading a FITS file inside become an :class:`ImageContractError` naming it:
    "file not found", or "not a readable FITS <what> (...)"; contract errors pass through."""
    try:
        yield
    except ImageContractError:
        raise
    except FileNotFoundError:
        raise ImageContractError(source, "file not found") from None
    except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise ImageContractError(source, f"not a readable FITS {what} ({exc})") from None


def read_quadrant_header(path: str | os.PathLike, hdu: int | str | None = None) -> fits.Header:
    """The header of the image :func:`read_quadrant` would read, without its pixels
    (not validated: :func:`validate_header` does that).

    Raises
    ------
    ImageContractError
        Unreadable or corrupt file, no 2-D image.
    """
    source = str(path)
    if hdu is None:
        from pipeline.core import ipac
        if ipac.is_sciimg(path):
            return ipac.read_ipac_header(path)
    with fits_read_errors(source), fits.open(path, memmap=True) as hdul:
        return _pick_image_hdu(hdul, hdu, source).header.copy()


def read_quadrant(path: str | os.PathLike, hdu: int | str | None = None) -> QuadrantImage:
    """Read and validate a quadrant image.

    Parameters
    ----------
    path : path-like
        The FITS file.
    hdu : int or str, optional
        The image HDU; default: the primary HDU if it has data, else the first image
        extension that is not ``MASK``.  Its mask is the extension ``<EXTNAME>_MASK`` when
        the file has one (a multi-extension exposure), else ``MASK``.  A file named as
        IPAC names a science image (``ztf_..._sciimg.fits``, also ``.fz``/``.gz``) is read
        with its ``mskimg`` sibling by :func:`pipeline.core.ipac.read_ipac_quadrant`.

    Raises
    ------
    ImageContractError
        Unreadable or corrupt file, no 2-D image, wrong data, a missing or bad keyword,
        a mask of the wrong shape, or an image that is entirely NaN.
    """
    source = str(path)
    if hdu is None:
        # ZTF's own products (IPAC's sciimg with its separate mskimg) are recognised by name.
        from pipeline.core import ipac
        if ipac.is_sciimg(path):
            return ipac.read_ipac_quadrant(path)
    with fits_read_errors(source), fits.open(path, memmap=False) as hdul:
        hdul.verify("silentfix")
        image_hdu = _pick_image_hdu(hdul, hdu, source)
        data = np.asarray(image_hdu.data, dtype=np.float32)
        header = image_hdu.header.copy()
        mask = None
        # In a multi-extension exposure each quadrant ``Qnn`` has its mask ``Qnn_MASK``.
        mask_name = f"{image_hdu.name}_MASK" if image_hdu.name and f"{image_hdu.name}_MASK" in hdul \
            else "MASK"
        if mask_name in hdul:
            mask_data = hdul[mask_name].data
            if mask_data is None or mask_data.shape != data.shape:
                raise ImageContractError(source, "MASK extension does not match the image shape")
            if not np.issubdtype(mask_data.dtype, np.integer):
                raise ImageContractError(source, "MASK extension must hold integers")
            mask = np.asarray(mask_data, dtype=np.int32)
    return quadrant_image(data, header, mask, source)


def quadrant_image(data: np.ndarray, header: fits.Header, mask: np.ndarray | None = None,
                   source: str = "<memory>") -> QuadrantImage:
    """Validate in-memory pixels and header into a :class:`QuadrantImage` (what reading does).

    Raises
    ------
    ImageContractError
        A bad keyword, a mask of the wrong shape, or no finite pixel.
    """
    data = np.asarray(data, dtype=np.float32)
    if data.ndim != 2:
        raise ImageContractError(source, "image is not two-dimensional")
    meta = validate_header(header, source)
    if mask is None:
        mask = np.zeros(data.shape, dtype=np.int32)
    elif mask.shape != data.shape:
        raise ImageContractError(source, "MASK does not match the image shape")
    else:
        mask = np.array(mask, dtype=np.int32)
    bad = ~np.isfinite(data)
    if bad.all():
        raise ImageContractError(source, "image holds no finite pixel")
    if bad.any():
        mask[bad] |= MASK_BITS["NAN"]
    return QuadrantImage(data=data, mask=mask, header=header, meta=meta,
                         wcs=header_wcs(header), path=source)


def _pick_image_hdu(hdul: fits.HDUList, hdu: int | str | None, source: str):
    if hdu is not None:
        chosen = hdul[hdu]
    else:
        candidates = [h for h in hdul if h.is_image and h.data is not None and h.name != "MASK"]
        if not candidates:
            raise ImageContractError(source, "no image data in the file")
        chosen = candidates[0]
    if chosen.data is None or chosen.data.ndim != 2:
        raise ImageContractError(source, "image HDU is not two-dimensional")
    if not np.issubdtype(chosen.data.dtype, np.number):
        raise ImageContractError(source, "image data are not numeric")
    return chosen


def write_quadrant(path: str | os.PathLike, data: np.ndarray, header: fits.Header,
                   mask: np.ndarray | None = None) -> Path:
    """Write a quadrant image (and its mask) atomically, as given (no validation)."""
    _write_quadrant_hdus(path, data, header, mask)
    return Path(path)


def write_quadrant_image(path: str | os.PathLike, data: np.ndarray, header: fits.Header,
                         mask: np.ndarray | None = None) -> QuadrantImage:
    """Write a quadrant image atomically and return it exactly as :func:`read_quadrant` would
    read it back (the header as its written cards parse, float32 pixels, int32 mask), without
    reading the file: a later stage of the same process works on what it wrote, bit for bit.
    """
    primary = _write_quadrant_hdus(path, data, header, mask)
    # Writing normalised the primary header in place (SIMPLE, BITPIX, NAXISn, EXTEND); its
    # text is what the file holds, so parsing it gives the values a reader sees (a float
    # formatted into a 20-character card is not always the float that was set).
    written = fits.Header.fromstring(primary.header.tostring())
    written_mask = None if mask is None else np.asarray(np.asarray(mask, dtype=np.int16), dtype=np.int32)
    return quadrant_image(primary.data, written, written_mask, str(path))


def _write_quadrant_hdus(path, data, header, mask) -> fits.PrimaryHDU:
    hdus = [fits.PrimaryHDU(np.asarray(data, dtype=np.float32), header=header)]
    if mask is not None:
        hdus.append(fits.ImageHDU(np.asarray(mask, dtype=np.int16), name="MASK"))
    write_fits_atomic(fits.HDUList(hdus), path)
    return hdus[0]


def footprint_corners(wcs: WCS, shape: tuple[int, int]) -> np.ndarray:
    """(4, 2) sky corners (deg) of an image's outer pixel edges, in order around it."""
    ny, nx = shape
    ra, dec = wcs.all_pix2world([0.5, nx + 0.5, nx + 0.5, 0.5], [0.5, 0.5, ny + 0.5, ny + 0.5], 1)
    return np.column_stack([ra, dec])
