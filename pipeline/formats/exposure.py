"""Exposures: the 64 quadrants of one exposure as a multi-extension FITS file or a folder.

A multi-extension exposure has an empty primary HDU carrying the exposure's keywords and,
per quadrant, an image extension ``Qnn`` (nn = rcid, 00-63) with the quadrant's own header
(the input contract) and a mask extension ``Qnn_MASK``.  A folder exposure holds one
quadrant file per rcid (what ``skydiff simulate`` writes), or IPAC's ``sciimg``/``mskimg``
pairs (:mod:`pipeline.core.ipac`, ``skydiff simulate --layout ipac``); each form is accepted by
``skydiff quadrant``, ``skydiff exposure`` and ``skydiff submit``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, NamedTuple

from astropy.io import fits

from pipeline.core.exits import BadInputError
from pipeline.core.image import read_quadrant
from pipeline.formats.atomic import write_fits_atomic

__all__ = ["write_exposure_mef", "write_exposure_ipac", "exposure_rcids", "exposure_quadrants", "ExposureQuadrant",
           "EXPOSURE_KEYWORDS", "ExposureInputError"]

log = logging.getLogger("skydiff.exposure")

#: Keywords copied from the quadrants into the exposure's primary header.
EXPOSURE_KEYWORDS = ("EXPID", "FIELDID", "FILTER", "FILTERID", "OBSMJD", "EXPTIME", "PROGRMID", "TELRA",
                     "TELDEC", "AIRMASS")


class ExposureInputError(BadInputError):
    """An exposure that is neither a folder of quadrant files nor a readable multi-extension file."""


def write_exposure_mef(quadrant_files: Iterable[str | os.PathLike], path: str | os.PathLike) -> Path:
    """Combine quadrant files of one exposure into one multi-extension FITS file (atomically)."""
    images = sorted((read_quadrant(p) for p in quadrant_files), key=lambda q: q.meta.rcid)
    if not images:
        raise ValueError("an exposure needs at least one quadrant")
    expids = {q.meta.expid for q in images}
    if len(expids) != 1:
        raise ValueError(f"quadrants of several exposures given: {sorted(expids)}")
    primary = fits.PrimaryHDU()
    for key in EXPOSURE_KEYWORDS:
        if key in images[0].header:
            primary.header[key] = images[0].header[key]
    primary.header["NQUAD"] = (len(images), "quadrant extensions Qnn (nn = rcid)")
    hdus = [primary]
    for q in images:
        name = f"Q{q.meta.rcid:02d}"
        hdus.append(fits.ImageHDU(q.data, header=q.header, name=name))
        hdus.append(fits.ImageHDU(q.mask.astype("int16"), name=f"{name}_MASK"))
    return write_fits_atomic(fits.HDUList(hdus), path)


def write_exposure_ipac(quadrant_files: Iterable[str | os.PathLike], folder: str | os.PathLike,
                        compression: str = "none", remove: bool = False) -> list[Path]:
    """Write quadrant files of the contract as IPAC's ``sciimg``/``mskimg`` pairs in ``folder``
    (:func:`pipeline.core.ipac.write_ipac_quadrant`); with ``remove`` each quadrant file is
    deleted once its pair is written (a folder exposure then holds one layout).  Returns the
    science images written."""
    from pipeline.core.ipac import write_ipac_quadrant

    written = []
    for path in sorted(Path(p) for p in quadrant_files):
        science, _ = write_ipac_quadrant(read_quadrant(path), folder, compression)
        written.append(science)
        if remove and path.resolve() != science.resolve():
            path.unlink()
    return written


class ExposureQuadrant(NamedTuple):
    """Where one quadrant of an exposure is: its file and HDU (``None``: the file's own image,
    as :func:`pipeline.core.image.read_quadrant` picks it), and the header the scan read when
    it is the one :func:`pipeline.core.image.read_quadrant_header` gives for them (else
    ``None``: an IPAC science image, named by its file, or an unusual file layout)."""
    path: Path
    hdu: int | str | None
    header: fits.Header | None = None


def _image_header(hdu) -> fits.Header | None:
    """The HDU's header when it holds a two-dimensional image (a copy), else None."""
    header = hdu.header
    if hdu.is_image and hdu.name != "MASK" and header.get("NAXIS") == 2 \
            and header.get("NAXIS1", 0) > 0 and header.get("NAXIS2", 0) > 0:
        return header.copy()
    return None


def exposure_quadrants(exposure: str | os.PathLike, warn: bool = True) -> dict[int, ExposureQuadrant]:
    """rcid -> :class:`ExposureQuadrant` of every quadrant an exposure (MEF file or folder)
    holds, in one pass: a folder's quadrant files each opened once (IPAC's science images are
    named by their files and not opened), a multi-extension file opened once.

    Where several files of a folder carry one rcid, the first wins as
    :func:`pipeline.run.quadrant.locate_quadrant` finds it: IPAC's science images first, then
    the other ``*.fits`` files in name order.  A folder's file that is no readable quadrant
    is skipped with a warning naming it (``warn=False``: silently).

    Raises
    ------
    ExposureInputError
        A file exposure that does not exist or is not a readable multi-extension FITS file.
    """
    exposure = Path(exposure)
    quadrants: dict[int, ExposureQuadrant] = {}
    if exposure.is_dir():
        from pipeline.core.ipac import sciimg_files, sciimg_rcid
        for path in sciimg_files(exposure):
            quadrants.setdefault(sciimg_rcid(path), ExposureQuadrant(path, None))
        for path in sorted(exposure.glob("*.fits")):
            if path.name.endswith(("_sciimg.fits", "_mskimg.fits")):
                continue       # IPAC's layout: named above by the science images, masks aside
            try:
                with fits.open(path, memmap=True) as hdul:
                    primary = hdul[0]
                    holder = primary if "RCID" in primary.header else hdul[1]
                    rcid = int(holder.header["RCID"])
                    # read_quadrant_header's image is the primary's when it holds one.
                    header = _image_header(primary) if holder is primary else None
            except (OSError, IndexError, KeyError, ValueError) as exc:
                # Not a quadrant of this exposure (an empty or foreign file): say which.
                if warn:
                    log.warning("%s: skipped, not a readable quadrant image (%s)", path,
                                "no RCID keyword" if isinstance(exc, KeyError) else exc)
                continue
            quadrants.setdefault(rcid, ExposureQuadrant(path, None, header))
    else:
        try:
            with fits.open(exposure) as hdul:
                for hdu in hdul[1:]:
                    if hdu.name.startswith("Q") and not hdu.name.endswith("_MASK") and hdu.name[1:].isdigit():
                        rcid = int(hdu.name[1:])
                        name = f"Q{rcid:02d}"      # as locate_quadrant names it
                        quadrants.setdefault(rcid, ExposureQuadrant(
                            exposure, name, _image_header(hdu) if hdu.name == name else None))
        except FileNotFoundError:
            raise ExposureInputError(f"{exposure}: no such exposure file or folder") from None
        except (OSError, ValueError) as exc:
            raise ExposureInputError(f"{exposure}: not a readable multi-extension FITS exposure ({exc})") from None
    return quadrants


def exposure_rcids(exposure: str | os.PathLike) -> list[int]:
    """The rcids an exposure (MEF file or folder) holds (:func:`exposure_quadrants`)."""
    return sorted(exposure_quadrants(exposure))
