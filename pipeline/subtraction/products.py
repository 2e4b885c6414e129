"""The subtraction's products folder: what :func:`write_subtraction` writes and how it is read back.

The format every later consumer reads (``skydiff alerts publish``, ``skydiff matchfile
append``), kept apart from the stage's file edge (:mod:`pipeline.subtraction.files`) so that
other wings depend on the format, never on the edge.

Products in OUTDIR (each written atomically; ``qa.json`` last, so its presence means the
rest is complete):

``diff.fits``
    ZOGY's proper difference D (unit background variance) on the science grid with the
    science WCS; ``FD`` (flux scaling of D: a point source of flux f in the reference's
    ADU has total f * FD in D), ``MAGZPREF`` (the common zero point), ``REFID``; extension
    ``PSFD`` (D's PSF at the image centre) and ``FLAGGED`` (pixels near bad ones).
``scorr.fits``
    The corrected score image (S/N of a point source at every pixel), same WCS.
``candidates.ecsv``
    One row per candidate (:func:`pipeline.subtraction.candidates.find_candidates` columns, ``rb``,
    ``rbversion``, ``drb``, ``drbversion``).
``cutouts.fits``
    ``SCIENCE``, ``REFERENCE``, ``DIFFERENCE``: (N, 63, 63) cubes, row i = candidate i.
``qa.json``
    Zero points, limits, counts, timings (:meth:`SubtractionResult.qa`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from astropy.io import fits

from pipeline.core.exits import BadInputError
from pipeline.formats.atomic import write_fits_atomic, write_json_atomic, write_table_atomic
from pipeline.subtraction.difference import SubtractionResult

__all__ = ["PRODUCT_FILES", "SubtractionOutputError", "read_qa_record", "write_subtraction"]

#: The files of a complete products folder (``qa.json`` is written last).
PRODUCT_FILES = ("diff.fits", "scorr.fits", "candidates.ecsv", "cutouts.fits", "qa.json")


class SubtractionOutputError(BadInputError):
    """A subtraction output folder without a readable ``qa.json``; names the file."""


def read_qa_record(outdir: str | os.PathLike) -> dict:
    """The ``qa.json`` of a subtraction output folder (written last: its presence means the
    folder is complete)."""
    qa = Path(outdir) / "qa.json"
    if not qa.is_file():
        raise SubtractionOutputError(f"{outdir}: no qa.json (not a complete `skydiff subtract` output folder)")
    try:
        return json.loads(qa.read_text())
    except (OSError, ValueError) as exc:
        raise SubtractionOutputError(f"{qa}: unreadable QA record ({exc})") from None


def _image_hdu(data: np.ndarray, header: fits.Header, cards: list[tuple]) -> fits.PrimaryHDU:
    hdu = fits.PrimaryHDU(np.asarray(data, dtype=np.float32), header=header.copy())
    for key, value, comment in cards:
        hdu.header[key] = (value, comment)
    return hdu


def write_subtraction(result: SubtractionResult, header: fits.Header, out: str | os.PathLike,
                      refid: int | None = None, extra_qa: dict | None = None) -> dict:
    """Write every product of :func:`pipeline.subtraction.difference.subtract_images` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    zogy = result.zogy
    centre = zogy.tile_at((zogy.diff.shape[1] - 1) / 2, (zogy.diff.shape[0] - 1) / 2)
    cards = [("MAGZPREF", result.zp_ref, "common zero point (reference), mag for 1 ADU"),
             ("MAGZPSCI", result.zp_science, "science zero point"),
             ("FD", float(centre.f_d), "flux scaling of D at the image centre"),
             ("DIFMGLIM", result.diffmaglim, "5-sigma limiting mag of the difference")]
    if refid is not None:
        cards.append(("REFID", int(refid), "reference image id"))
    diff = fits.HDUList([_image_hdu(zogy.diff, header, cards + [("BUNIT", "sigma", "D, unit noise")]),
                         fits.ImageHDU(np.asarray(zogy.psf_d, dtype=np.float32), name="PSFD"),
                         fits.ImageHDU(zogy.flagged.astype(np.uint8), name="FLAGGED")])
    write_fits_atomic(diff, out / "diff.fits")
    write_fits_atomic(fits.HDUList([_image_hdu(zogy.scorr, header, cards + [("BUNIT", "sigma", "Scorr")])]),
                      out / "scorr.fits")
    write_table_atomic(result.candidates, out / "candidates.ecsv")
    cubes = [fits.PrimaryHDU()] + [fits.ImageHDU(np.asarray(result.cutouts[k], dtype=np.float32), name=k.upper())
                                   for k in ("science", "reference", "difference")]
    write_fits_atomic(fits.HDUList(cubes), out / "cutouts.fits")
    record = {**result.qa(), **(extra_qa or {})}
    write_json_atomic(record, out / "qa.json")
    return record


