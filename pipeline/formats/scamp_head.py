"""SCAMP header files: reading a ``.head``, applying it to an image, writing an ``.ahead``.

SCAMP writes its solution as a ``.head`` text file (80-character cards, one per line, no
NAXIS) and reads its prior from an ``.ahead`` file of the same form.  Three traps, each
seen with SCAMP 2.10, are handled here:

- a ``.head`` holds non-ASCII characters in a COMMENT, on which
  ``fits.Header.fromtextfile`` fails: they are dropped before parsing;
- a ``.head`` only overrides or adds keys, so stale WCS keys left in an image header (PV,
  PC/CDELT, SIP) silently change the solution (a stale PC/CDELT beat a new CD and moved
  positions by ~5e5 arcsec): every WCS keyword is stripped first;
- SCAMP reads a value without a decimal point as an integer (``5E-05`` becomes 5, seen
  here with SCAMP 2.10), so floats in an ``.ahead`` are always written with one.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning
from pipeline.core.exits import BadInputError
from pipeline.formats.atomic import write_text_atomic

__all__ = ["WcsHeaderError", "is_wcs_keyword", "strip_wcs_keywords", "strip_structure",
           "parse_head_text",
           "read_head", "apply_wcs_header", "wcs_from_header", "ahead_text", "write_ahead"]

# Every keyword that describes a world coordinate system, in any convention met in the
# field: FITS WCS papers I-III (with alternate-WCS letters), AIPS CROTA/EPOCH, TPV/TNX,
# old PROJP, SIP, Paper IV distortions and IRAF WAT cards.
_WCS_KEYWORD = re.compile(
    r"(WCSAXES|WCSNAME|RADESYS|RADECSYS|EQUINOX|LONPOLE|LATPOLE)[A-Z]?"
    r"|EPOCH"
    r"|(CTYPE|CRVAL|CRPIX|CDELT|CUNIT|CROTA|CNAME|CRDER|CSYER)\d+[A-Z]?"
    r"|(CD|PC|PV|PS)\d+_\d+[A-Z]?"
    r"|PROJP\d+"
    r"|(A|B|AP|BP)_(ORDER|DMAX|\d+_\d+)"
    r"|(CPDIS|CQDIS|CPERR|CQERR|DP|DQ)\d+"
    r"|D2IM(DIS|ERR|EXT)\d*"
    r"|WAT\d_\d{3}"
)
# Structure keywords of a FITS HDU: they describe the file, not the sky, and must never be
# carried by an .ahead (they would override the catalogue's own NAXISn).
_STRUCTURE_KEYWORD = re.compile(r"SIMPLE|BITPIX|NAXIS\d*|EXTEND|XTENSION|PCOUNT|GCOUNT|END")
_COMMENTARY = ("COMMENT", "HISTORY", "")
_FITS_FLOAT_WIDTH = 20


class WcsHeaderError(BadInputError):
    """A header or header file that does not hold a usable celestial WCS."""


def is_wcs_keyword(keyword: str) -> bool:
    """True if ``keyword`` belongs to a world coordinate system description."""
    return _WCS_KEYWORD.fullmatch(keyword.upper()) is not None


def strip_wcs_keywords(header: fits.Header) -> fits.Header:
    """A copy of ``header`` without any WCS keyword."""
    stripped = header.copy()
    for keyword in {card.keyword for card in header.cards if is_wcs_keyword(card.keyword)}:
        del stripped[keyword]
    return stripped


def parse_head_text(text: str, source: str = "<text>") -> fits.Header:
    """Parse the text of a SCAMP ``.head``/``.ahead`` file into a header.

    Non-ASCII characters (SCAMP's copyright COMMENT has accented letters) are dropped.
    """
    ascii_text = text.encode("ascii", errors="ignore").decode("ascii")
    lines = [line.rstrip("\r") for line in ascii_text.split("\n")]
    lines = [line for line in lines if line.strip()]
    try:
        header = fits.Header.fromstring("\n".join(lines), sep="\n")
    except (ValueError, fits.VerifyError) as exc:
        raise WcsHeaderError(f"{source}: not a FITS header text file ({exc})") from None
    if "CTYPE1" not in header or "CTYPE2" not in header:
        raise WcsHeaderError(f"{source}: no CTYPE1/CTYPE2, so no WCS to read")
    return header


def read_head(path: str | os.PathLike) -> fits.Header:
    """Read a SCAMP ``.head`` (or ``.ahead``) file into a header."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise WcsHeaderError(f"{path}: cannot read header file ({exc.strerror})") from None
    return parse_head_text(raw.decode("latin-1"), source=str(path))


def apply_wcs_header(image_header: fits.Header, wcs_header: fits.Header) -> fits.Header:
    """An image header carrying the WCS of ``wcs_header`` and no trace of its old one.

    Every WCS keyword of ``image_header`` is removed first; then the cards of
    ``wcs_header`` are added (its HISTORY too, for provenance; its COMMENTs and structure
    keywords are not).
    """
    result = strip_wcs_keywords(image_header)
    for card in wcs_header.cards:
        keyword = card.keyword
        if keyword == "HISTORY":
            result.add_history(card.value)
        elif keyword in _COMMENTARY or _STRUCTURE_KEYWORD.fullmatch(keyword):
            continue
        else:
            result[keyword] = (card.value, card.comment)
    return result


def wcs_from_header(header: fits.Header, shape: tuple[int, int]) -> WCS:
    """The celestial WCS of ``header`` for an image of numpy ``shape`` ``(ny, nx)``.

    A ``.head`` carries no NAXIS, so the image size is given explicitly and set as the
    WCS's ``pixel_shape``.  TPV headers come back with ``ctype`` ``RA---TAN`` and the PV
    terms held as astropy's distortion (wcslib's handling of TPV).
    """
    if len(shape) != 2 or min(shape) <= 0:
        raise WcsHeaderError(f"image shape must be (ny, nx) with positive sizes, got {shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(strip_structure(header), relax=True)
        except (ValueError, KeyError, MemoryError) as exc:
            raise WcsHeaderError(f"header holds no valid WCS ({exc})") from None
    if wcs.naxis != 2 or not wcs.has_celestial:
        raise WcsHeaderError("header WCS is not a 2-axis celestial WCS "
                             f"(ctype {list(wcs.wcs.ctype)})")
    wcs.pixel_shape = (int(shape[1]), int(shape[0]))
    return wcs


def strip_structure(header: fits.Header) -> fits.Header:
    """A copy of ``header`` without HDU structure keywords (SIMPLE, BITPIX, NAXISn, ...)."""
    stripped = fits.Header()
    for card in header.cards:
        if not _STRUCTURE_KEYWORD.fullmatch(card.keyword):
            stripped.append(card)
    return stripped


def _header_of(wcs_or_header: WCS | fits.Header) -> fits.Header:
    if isinstance(wcs_or_header, fits.Header):
        return strip_structure(wcs_or_header)
    if not isinstance(wcs_or_header, WCS):
        raise TypeError(f"expected a WCS or a Header, got {type(wcs_or_header).__name__}")
    wcs = wcs_or_header
    header = wcs.to_header(relax=True)
    # SCAMP's pass-1 prior is written the way SCAMP writes its own solutions: a CD matrix.
    cd = wcs.wcs.cd if wcs.wcs.has_cd() else wcs.wcs.get_pc() * wcs.wcs.cdelt[:, np.newaxis]
    for keyword in [k for k in header if re.fullmatch(r"(PC\d_\d|CDELT\d)", k)]:
        del header[keyword]
    for (i, j), value in np.ndenumerate(cd):
        header[f"CD{i + 1}_{j + 1}"] = float(value)
    return header


def _float_text(value: float, keyword: str) -> str:
    """A FITS float SCAMP parses as a float: always with a decimal point."""
    if not np.isfinite(value):
        raise WcsHeaderError(f"{keyword} = {value} cannot be written to an .ahead")
    text = repr(float(value)).upper()
    mantissa, _, exponent = text.partition("E")
    if "." not in mantissa:
        text = mantissa + ".0" + ("E" + exponent if exponent else "")
    if len(text) > _FITS_FLOAT_WIDTH:
        text = f"{value:.13E}"
    return text


def _card_image(card: fits.Card) -> str:
    value = card.value
    if (isinstance(value, (float, np.floating)) and not isinstance(value, bool)
            and len(card.keyword) <= 8 and card.keyword not in _COMMENTARY):
        image = f"{card.keyword:<8}= {_float_text(value, card.keyword):>{_FITS_FLOAT_WIDTH}}"
        if card.comment:
            image += f" / {card.comment}"
    else:
        image = card.image
    ascii_image = image.encode("ascii", errors="ignore").decode("ascii")
    return ascii_image[:80].ljust(80)


def ahead_text(wcs_or_header: WCS | fits.Header) -> str:
    """The ``.ahead`` text of a WCS or header: ASCII 80-character cards, one a line, END."""
    header = _header_of(wcs_or_header)
    lines = [_card_image(card) for card in header.cards]
    lines.append("END".ljust(80))
    return "\n".join(lines) + "\n"


def write_ahead(path: str | os.PathLike, wcs_or_header: WCS | fits.Header) -> Path:
    """Write an ``.ahead`` file for SCAMP atomically (temporary file, then rename)."""
    return write_text_atomic(ahead_text(wcs_or_header), path, encoding="ascii")
