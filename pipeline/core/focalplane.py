"""Focal-plane geometry: where each CCD quadrant sits relative to the boresight.

Global focal-plane pixel coordinates ``(X, Y)`` have the boresight at ``(0, 0)``, ``X``
growing west (right on the sky with north up) and ``Y`` growing north, in units of
pixels.  Quadrant pixel ``(x, y)`` (FITS convention, 1-based, pixel centres at integers)
sits at ``X = x0 + x - 0.5``, ``Y = y0 + y - 0.5`` where ``(x0, y0)`` is the quadrant's
lower-left corner.  The layout is described in :class:`pipeline.core.config.InstrumentConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

from pipeline.core.config import InstrumentConfig
from pipeline.core.exits import UsageError
from pipeline.core.image import rcid_of

__all__ = ["parse_quadrants", "QuadrantGeometry", "quadrant_geometry", "all_quadrants", "nominal_cd",
           "ccd_qid_of_rcid", "scale_check_grid"]


@dataclass(frozen=True)
class QuadrantGeometry:
    """Position of one quadrant in the focal plane."""

    ccdid: int
    qid: int
    x0: float            # global X of the quadrant's lower-left pixel corner
    y0: float
    nx: int
    ny: int

    @property
    def rcid(self) -> int:
        return rcid_of(self.ccdid, self.qid)

    @property
    def boresight_pixel(self) -> tuple[float, float]:
        """The boresight in this quadrant's 1-based pixel coordinates (its CRPIX)."""
        return 0.5 - self.x0, 0.5 - self.y0

    @property
    def centre_global(self) -> tuple[float, float]:
        """Global focal-plane position of the quadrant's centre, pixels."""
        return self.x0 + 0.5 * self.nx, self.y0 + 0.5 * self.ny

    def to_global(self, x, y):
        """Quadrant pixel (1-based) to global focal-plane pixels."""
        return np.asarray(x) + self.x0 - 0.5, np.asarray(y) + self.y0 - 0.5


def ccd_qid_of_rcid(rcid: int) -> tuple[int, int]:
    """(ccdid, qid) of a readout-channel id 0-63."""
    if not 0 <= rcid <= 63:
        raise ValueError(f"rcid must be 0-63, got {rcid}")
    return rcid // 4 + 1, rcid % 4 + 1


def quadrant_geometry(instrument: InstrumentConfig, ccdid: int, qid: int) -> QuadrantGeometry:
    """Geometry of quadrant ``qid`` of CCD ``ccdid`` in the configured layout."""
    n_ccd = instrument.n_ccd_x * instrument.n_ccd_y
    if not 1 <= ccdid <= n_ccd or not 1 <= qid <= 4:
        raise ValueError(f"no quadrant ccdid={ccdid} qid={qid} in a {n_ccd}-CCD camera")
    nx, ny = instrument.quadrant_nx, instrument.quadrant_ny
    row, col = divmod(ccdid - 1, instrument.n_ccd_x)
    ccd_w, ccd_h = 2 * nx, 2 * ny
    cx = (col - 0.5 * (instrument.n_ccd_x - 1)) * (ccd_w + instrument.ccd_gap_x_px)
    cy = (row - 0.5 * (instrument.n_ccd_y - 1)) * (ccd_h + instrument.ccd_gap_y_px)
    right = qid in (1, 4)
    upper = qid in (1, 2)
    x0 = cx if right else cx - nx
    y0 = cy if upper else cy - ny
    return QuadrantGeometry(ccdid, qid, float(x0), float(y0), nx, ny)


def all_quadrants(instrument: InstrumentConfig) -> list[QuadrantGeometry]:
    """Every quadrant of the camera, in rcid order."""
    n_ccd = instrument.n_ccd_x * instrument.n_ccd_y
    return [quadrant_geometry(instrument, c, q) for c in range(1, n_ccd + 1) for q in range(1, 5)]


def nominal_cd(instrument: InstrumentConfig, position_angle_deg: float = 0.0) -> np.ndarray:
    """The CD matrix (deg/pixel) of the ideal camera: north up, east left, rotated by PA."""
    s = instrument.pixel_scale_arcsec / 3600.0
    pa = np.deg2rad(position_angle_deg)
    c, n = np.cos(pa), np.sin(pa)
    return s * np.array([[-c, n], [n, c]])


def scale_check_grid() -> tuple[np.ndarray, np.ndarray]:
    """The detector grid of the pixel-scale check (x = 1..3074 step 128, y = 1..3082 step 140)."""
    x = np.arange(1, 3074, 128, dtype=float)
    y = np.arange(1, 3082, 140, dtype=float)
    return np.meshgrid(x, y)


class QuadrantListError(UsageError):
    """A ``--quadrants`` list that cannot be parsed or names no valid rcid (exit 2)."""


def parse_quadrants(quadrants: str | Iterable[int], n_quadrants: int = 64) -> list[int]:
    """Sorted unique rcids from ``'all'``, a list with inclusive ranges ``'0,5,10-12'``, or ints.

    The one parser behind every ``--quadrants`` option (simulate, exposure, submit, watch,
    bench).  Raises :class:`QuadrantListError` (a usage error, exit 2, and a ValueError),
    naming the input, for anything else, a reversed range or an rcid outside 0..n-1.
    """
    if isinstance(quadrants, str):
        text = quadrants.strip().lower()
        if text == "all":
            return list(range(n_quadrants))
        rcids = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            first, _, last = part.partition("-")
            try:
                low, high = int(first), int(last or first)
            except ValueError:
                raise QuadrantListError(f"--quadrants must be 'all' or rcids like 0,5,10-12, "
                                        f"got {quadrants!r}") from None
            if high < low:
                raise QuadrantListError(f"--quadrants: range {part!r} runs backwards (write {high}-{low})")
            rcids.extend(range(low, high + 1))
    else:
        rcids = [int(q) for q in quadrants]
    bad = [q for q in rcids if not 0 <= q < n_quadrants]
    if bad or not rcids:
        raise QuadrantListError(f"--quadrants must be rcids 0-{n_quadrants - 1}, got {quadrants!r}")
    return sorted(set(rcids))
