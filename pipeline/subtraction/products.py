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
    ``rbversion``).
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

__all__ = ["CUTOUT_KINDS", "PRODUCT_FILES", "SubtractionOutputError", "read_candidates", "read_cutouts",
           "read_qa_record", "write_subtraction"]

#: The files of a complete products folder (``qa.json`` is written last).
PRODUCT_FILES = ("diff.fits", "scorr.fits", "candidates.ecsv", "cutouts.fits", "qa.json")
#: The cubes of ``cutouts.fits`` (extension names upper-cased), in ZTF's stamp order.
CUTOUT_KINDS = ("science", "reference", "difference")


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


def read_candidates(outdir: str | os.PathLike):
    """The ``candidates.ecsv`` table of a products folder (an astropy Table).

    Raises
    ------
    SubtractionOutputError
        The file is missing or unreadable (named).
    """
    from astropy.table import Table
    path = Path(outdir) / "candidates.ecsv"
    try:
        return Table.read(path, format="ascii.ecsv")
    except FileNotFoundError:
        raise SubtractionOutputError(f"{path}: not found") from None
    except (OSError, ValueError) as exc:
        raise SubtractionOutputError(f"{path}: unreadable candidates table ({exc})") from None


def read_cutouts(outdir: str | os.PathLike, n_candidates: int | None = None) -> dict[str, np.ndarray]:
    """The ``cutouts.fits`` cubes of a products folder: kind -> (N, s, s) float32 array.

    ``n_candidates``, when given, is checked against every cube's plane count.

    Raises
    ------
    SubtractionOutputError
        The file is missing, unreadable, lacks a cube or has the wrong number of planes (named).
    """
    path = Path(outdir) / "cutouts.fits"
    cubes = {}
    try:
        with fits.open(path, memmap=False) as hdul:
            for kind in CUTOUT_KINDS:
                if kind.upper() not in hdul:
                    raise SubtractionOutputError(f"{path}: no {kind.upper()} extension")
                data = hdul[kind.upper()].data
                # A zero-length cube (no candidates) is written without data.
                cubes[kind] = (np.zeros((0, 0, 0), dtype=np.float32) if data is None
                               else np.asarray(data, dtype=np.float32))
    except FileNotFoundError:
        raise SubtractionOutputError(f"{path}: not found") from None
    except (OSError, ValueError) as exc:
        raise SubtractionOutputError(f"{path}: unreadable cutouts ({exc})") from None
    if n_candidates is not None and any(len(cube) != n_candidates for cube in cubes.values()):
        raise SubtractionOutputError(f"{path}: {[len(c) for c in cubes.values()]} cutout planes for "
                                     f"{n_candidates} candidates in {Path(outdir) / 'candidates.ecsv'}")
    return cubes


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


