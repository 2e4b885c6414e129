"""Synthetic alert inputs (context, candidates table, cutouts) for tests and benchmarks.

They follow the packet module's input contract exactly, with plausible ZTF-like values,
so the same code path is exercised as with the subtraction stage's real output.
"""
from __future__ import annotations

import math

import numpy as np
from astropy.table import Table

from alerts.cutouts import CutoutTriplet
from alerts.packet import AlertContext

__all__ = ["synthetic_context", "synthetic_candidates", "synthetic_cutouts", "square_footprint"]

_PIXEL_DEG = 1.012 / 3600.0


def square_footprint(ra: float, dec: float, half_size_deg: float = 0.43) -> tuple[tuple[float, float], ...]:
    """Four corners of a square quadrant-sized field centred on (ra, dec), in edge order."""
    dra = half_size_deg / math.cos(math.radians(dec))
    return ((ra - dra, dec - half_size_deg), (ra + dra, dec - half_size_deg),
            (ra + dra, dec + half_size_deg), (ra - dra, dec + half_size_deg))


def synthetic_context(expid: int = 302100001, rcid: int = 21, jd: float = 2461120.75,
                      ra: float = 150.0, dec: float = 2.0, night: str = "20260315",
                      field: int = 600, fid: int = 2, programid: int = 1) -> AlertContext:
    """A quadrant image's metadata centred on (ra, dec), with a TAN WCS header."""
    wcs_header = {"CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN", "CRVAL1": ra, "CRVAL2": dec,
                  "CRPIX1": 1536.5, "CRPIX2": 1540.5, "CD1_1": -_PIXEL_DEG, "CD1_2": 0.0,
                  "CD2_1": 0.0, "CD2_2": _PIXEL_DEG, "RADESYS": "ICRS"}
    return AlertContext(
        jd=jd, fid=fid, expid=expid, rcid=rcid, field=field, programid=programid, night=night,
        rfid=field * 10000 + rcid * 100 + fid, jdstartref=2458200.5, jdendref=2458300.5, nframesref=25,
        footprint=square_footprint(ra, dec), diffmaglim=20.6, exptime=30.0, magzpsci=26.15,
        magzpsciunc=2e-5, magzpscirms=0.02, clrcoeff=-0.05, clrcounc=1e-5, nmatches=900,
        nid=expid // 100000, wcs_header=wcs_header, rbversion="skydiff_rb1")


def synthetic_candidates(n: int, ra: float = 150.0, dec: float = 2.0, seed: int = 1,
                         first_index: int = 0) -> Table:
    """``n`` candidates scattered over the quadrant around (ra, dec), every contract column set."""
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(40, 3030, n), rng.uniform(40, 3040, n)
    cand_ra = ra - (x - 1536.5) * _PIXEL_DEG / math.cos(math.radians(dec))
    cand_dec = dec + (y - 1540.5) * _PIXEL_DEG
    mag = rng.uniform(16.0, 20.5, n)
    fwhm = rng.uniform(1.8, 2.6, n)
    aimage, bimage = fwhm * 0.45, fwhm * 0.42
    magap = mag + rng.normal(0, 0.05, n)
    return Table({
        "cand_index": np.arange(first_index, first_index + n), "ra": cand_ra, "dec": cand_dec,
        "xpos": x, "ypos": y, "magpsf": mag, "sigmapsf": 0.02 + 0.1 * 10 ** (0.4 * (mag - 20.5)),
        "isdiffpos": rng.random(n) < 0.8, "scorr": rng.uniform(5, 50, n), "rb": rng.random(n),
        "rbversion": np.full(n, "skydiff_rb1"), "fwhm": fwhm, "elong": aimage / bimage, "aimage": aimage,
        "bimage": bimage, "aimagerat": aimage / fwhm, "bimagerat": bimage / fwhm,
        "nneg": rng.integers(0, 5, n), "nbad": np.zeros(n, int), "sumrat": rng.uniform(0.8, 1.0, n),
        "magdiff": magap - mag, "mindtoedge": np.minimum.reduce([x, y, 3072 - x, 3080 - y]),
        "magap": magap, "sigmagap": rng.uniform(0.02, 0.2, n), "distnr": rng.uniform(0.1, 10, n),
        "magnr": rng.uniform(14, 21, n), "sigmagnr": rng.uniform(0.01, 0.1, n),
        "sharpnr": rng.normal(0, 0.05, n), "chinr": rng.uniform(0.5, 2, n),
        "ranr": cand_ra + 1e-5, "decnr": cand_dec + 1e-5, "neargaia": rng.uniform(0.5, 60, n),
        "maggaia": rng.uniform(12, 20, n), "neargaiabright": rng.uniform(5, 90, n),
        "maggaiabright": rng.uniform(10, 14, n),
    })


def synthetic_cutouts(candidates: Table, size: int = 63, seed: int = 2) -> list[CutoutTriplet]:
    """Noisy 63 x 63 float32 stamps (sky ~150 DN, a point source in the science and difference)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] - size // 2
    star = (1000.0 * np.exp(-(xx**2 + yy**2) / (2 * 1.0**2))).astype(np.float32)
    triplets = []
    for x, y in zip(candidates["xpos"], candidates["ypos"]):
        sky = rng.normal(150.0, 12.0, (3, size, size)).astype(np.float32)
        triplets.append(CutoutTriplet(science=sky[0] + star, reference=sky[1],
                                      difference=sky[2] - 150.0 + star,
                                      origin=(int(round(x)) - size // 2, int(round(y)) - size // 2)))
    return triplets
