"""The reference image in memory (:class:`ReferenceImage`): what building a reference
produces (:mod:`pipeline.reference.build`) and reading one returns
(:mod:`pipeline.reference.files`, its file format)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from pipeline.core.exits import BadInputError
from pipeline.core.image import rcid_of
from pipeline.measure.psf import PSFModel

__all__ = ["ReferenceError", "ReferenceImage", "CATALOG_COLUMNS"]

#: Columns of the reference's PSF-fit catalogue (x, y 1-based; mag calibrated to MAGZP).
CATALOG_COLUMNS = ("id", "ra", "dec", "x", "y", "flux", "fluxerr", "mag", "magerr", "snr",
                   "sharp", "chi", "flags")


class ReferenceError(BadInputError):
    """A reference that cannot be built or read; the message names the source and problem."""

    def __init__(self, source: str | os.PathLike, problem: str):
        self.source, self.problem = str(source), problem
        super().__init__(f"{self.source}: {problem}")


@dataclass
class ReferenceImage:
    """A reference image in memory (what :func:`pipeline.reference.build.build_reference` and
    :func:`read_reference` return).

    ``data`` is background-subtracted, in ADU at ``zeropoint``; ``rms`` the background noise
    map (None for a plain image), ``coverage`` frames per pixel (None for a plain image);
    ``psf``, ``catalog`` (:data:`CATALOG_COLUMNS`) and ``frames`` (one row per input frame:
    expid, path, obsmjd, airmass, fwhm_arcsec, zp, zp_unc, limmag, bkg_level, bkg_rms, scale, weight,
    n_clipped, used, reason) are None when absent.  Identifiers are None and numbers NaN
    when a plain image's header lacks them.  ``header`` is the primary header.
    """

    data: np.ndarray
    mask: np.ndarray
    wcs: WCS
    header: fits.Header
    zeropoint: float
    rms: np.ndarray | None = None
    coverage: np.ndarray | None = None
    psf: PSFModel | None = None
    catalog: Table | None = None
    frames: Table | None = None
    refid: int | None = None
    fieldid: int | None = None
    ccdid: int | None = None
    qid: int | None = None
    filter: str | None = None
    gain: float = math.nan
    saturate: float = math.nan
    nframes: int = 0
    jdstart: float = math.nan
    jdend: float = math.nan
    fwhm_arcsec: float = math.nan
    limiting_mag: float = math.nan
    path: str | None = None
    timings: dict = field(default_factory=dict)

    @property
    def rcid(self) -> int | None:
        return None if self.ccdid is None or self.qid is None else rcid_of(self.ccdid, self.qid)

    @property
    def shape(self) -> tuple[int, int]:
        return self.data.shape
