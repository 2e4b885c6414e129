"""FITS_LDAC catalogues, the format SCAMP reads and writes.

An LDAC file is a FITS file whose extensions come in pairs: ``LDAC_IMHEAD``, a binary
table with one row whose ``Field Header Card`` column holds an image header as one
string of 80-character cards, followed by ``LDAC_OBJECTS``, the catalogue itself.

Two SCAMP traps (seen with SCAMP 2.10) are handled here: astropy pads strings with NUL
bytes, on which SCAMP never finds ``END`` and crashes (signal 11), so the header block is
padded with blanks to a whole number of 2880-byte records; and the header must carry
NAXIS1/NAXIS2, else SCAMP stops on an "incoherent FITS header".
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.io.fits.verify import VerifyWarning
from astropy.utils.exceptions import AstropyUserWarning

from pipeline.formats.atomic import write_fits_atomic
from pipeline.core.exits import BadInputError

__all__ = ["LDACError", "header_card_block", "ldac_hdulist", "write_ldac", "read_ldac"]


class LDACError(BadInputError):
    """A file that is not a readable LDAC catalogue."""


_LEADING = ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2")


def _primary_like(header: fits.Header) -> fits.Header:
    """The header opening with SIMPLE, BITPIX, NAXIS, NAXIS1, NAXIS2 (SCAMP: "Corrupted FITS header")."""
    out = fits.Header()
    out["SIMPLE"] = True
    out["BITPIX"] = header.get("BITPIX", -32)
    out["NAXIS"] = 2
    out["NAXIS1"] = header["NAXIS1"]
    out["NAXIS2"] = header["NAXIS2"]
    for card in header.cards:
        if card.keyword not in _LEADING and card.keyword not in ("XTENSION", "PCOUNT", "GCOUNT", "END"):
            out.append(card, end=True)
    return out


def header_card_block(header: fits.Header) -> str:
    """The header as 80-character cards ending in END, blank-padded to 2880-byte records.

    A header with NAXIS1/NAXIS2 is reordered to open like a primary image header, which is
    what SCAMP expects of an LDAC_IMHEAD.
    """
    if "NAXIS1" in header and "NAXIS2" in header:
        header = _primary_like(header)
    cards = "".join(str(card).ljust(80)[:80] for card in header.cards
                    if card.keyword not in ("", "END") or card.comment)
    block = cards + "END".ljust(80)
    return block.ljust(-(-len(block) // 2880) * 2880)


def _imhead_hdu(block: str) -> fits.BinTableHDU:
    cards = len(block) // 80
    column = fits.Column(name="Field Header Card", format=f"{len(block)}A", dim=f"(80, {cards})",
                         array=np.array([[block[i * 80:(i + 1) * 80] for i in range(cards)]]))
    return fits.BinTableHDU.from_columns([column], name="LDAC_IMHEAD")


def _restore_blanks(block: str):
    """A file patch putting the header block back byte for byte.

    astropy strips trailing blanks from string cells and pads them with NULs when writing;
    SCAMP then never finds END and crashes, so the cell is rewritten in the file itself.
    """
    def patch(path: Path) -> None:
        with fits.open(path) as hdul:
            offset = hdul["LDAC_IMHEAD"].fileinfo()["datLoc"]
        with open(path, "r+b") as handle:
            handle.seek(offset)
            handle.write(block.encode("ascii"))
    return patch


def ldac_hdulist(objects: Table, image_header: fits.Header | None = None) -> fits.HDUList:
    """Build an LDAC HDU list for one catalogue (write it with :func:`write_ldac`, which keeps
    the header block blank-padded).

    Parameters
    ----------
    objects : Table
        The catalogue; column units are kept.
    image_header : Header, optional
        The image header to embed (must carry NAXIS1/NAXIS2 for a detection catalogue).
        Without it only ``LDAC_OBJECTS`` is written, which is what SCAMP accepts for a
        reference catalogue.
    """
    hdus: list = [fits.PrimaryHDU()]
    if image_header is not None:
        if "NAXIS1" not in image_header or "NAXIS2" not in image_header:
            raise LDACError("LDAC image header needs NAXIS1 and NAXIS2 (SCAMP: incoherent FITS header)")
        hdus.append(_imhead_hdu(header_card_block(image_header)))
    table_hdu = fits.table_to_hdu(Table(objects, copy=False))
    table_hdu.name = "LDAC_OBJECTS"
    hdus.append(table_hdu)
    return fits.HDUList(hdus)


def write_ldac(path: str | os.PathLike, objects: Table,
               image_header: fits.Header | None = None) -> Path:
    """Write an LDAC catalogue atomically (see :func:`ldac_hdulist`)."""
    hdul = ldac_hdulist(objects, image_header)
    finalize = None if image_header is None else _restore_blanks(header_card_block(image_header))
    return write_fits_atomic(hdul, path, finalize=finalize)


def read_ldac(path: str | os.PathLike) -> tuple[Table, fits.Header | None]:
    """Read the first ``LDAC_OBJECTS`` table and its ``LDAC_IMHEAD`` header, if any."""
    try:
        with warnings.catch_warnings():
            # A truncated file only warns in astropy; here it is an error naming the file.
            warnings.simplefilter("error", AstropyUserWarning)
            warnings.simplefilter("error", VerifyWarning)
            objects, header = _read_ldac_hdus(path)
    except LDACError:
        raise
    except (OSError, ValueError, KeyError, IndexError, TypeError, AstropyUserWarning, VerifyWarning) as exc:
        raise LDACError(f"{path}: not a readable LDAC catalogue ({exc})") from None
    return objects, header


def _read_ldac_hdus(path):
    with fits.open(path) as hdul:
        names = [h.name for h in hdul]
        if "LDAC_OBJECTS" not in names:
            raise LDACError(f"{path}: no LDAC_OBJECTS extension")
        objects = Table(hdul["LDAC_OBJECTS"].data.copy())
        header = None
        if "LDAC_IMHEAD" in names:
            raw = hdul["LDAC_IMHEAD"].data["Field Header Card"][0]
            text = raw if isinstance(raw, str) else "".join(np.asarray(raw).ravel().astype(str))
            header = fits.Header.fromstring(text.replace("\x00", " "))
        return objects, header
