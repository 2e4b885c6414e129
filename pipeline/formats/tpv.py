"""The TPV projection: tangent-plane coordinates, TPV polynomials, and fitting a TPV WCS.

TPV (the convention SCAMP writes) maps pixels to sky in three steps: intermediate
coordinates ``(x, y) = CD @ (p - CRPIX)`` in degrees; a polynomial distortion
``xi = sum PV1_k t_k(x, y)``, ``eta = sum PV2_k t_k(y, x)`` (note the swapped arguments for
``eta``); and the gnomonic projection of the standard coordinates ``(xi, eta)`` about CRVAL.
astropy/wcslib evaluate it; this module builds and fits it, which neither does.

Standard coordinates are in degrees with ``xi`` growing east and ``eta`` north: the
"idealized WCS with 1 degree per pixel" of the distortion-prior method.
"""
from __future__ import annotations

import warnings

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

__all__ = ["TPV_TERMS", "tpv_indices", "tpv_design", "tangent_wcs", "sky_to_tangent", "tangent_to_sky",
           "tpv_header", "fit_tpv_wcs", "tpv_wcs"]


def _term_table(max_degree: int = 7) -> list[tuple[int, int, bool]]:
    """(power of x, power of y, radial) for TPV term k = 0, 1, ...; odd degrees end with r^d."""
    terms: list[tuple[int, int, bool]] = []
    for degree in range(max_degree + 1):
        for j in range(degree + 1):
            terms.append((degree - j, j, False))
        if degree % 2 == 1:
            terms.append((0, 0, True))
    return terms


#: TPV term k -> (x power, y power, is the radial term r^degree).
TPV_TERMS = _term_table()


def tpv_indices(degree: int) -> list[int]:
    """TPV indices of the non-radial terms up to ``degree``.

    The radial terms (r, r^3, ...) are left out: in a fit they are redundant with the
    monomials, and SCAMP does not write them either.
    """
    n = len(_term_table(degree))
    return [k for k in range(n) if not TPV_TERMS[k][2]]


def tpv_design(a: np.ndarray, b: np.ndarray, degree: int) -> np.ndarray:
    """Design matrix (n, n_terms) of the TPV monomials ``a^i b^j`` in :func:`tpv_indices` order.

    For ``xi`` pass ``(x, y)``; for ``eta`` pass ``(y, x)`` (TPV swaps them).
    """
    return np.stack([a ** TPV_TERMS[k][0] * b ** TPV_TERMS[k][1] for k in tpv_indices(degree)], axis=-1)


def tangent_wcs(ra0: float, dec0: float) -> WCS:
    """The idealized TAN WCS with 1 degree per pixel about (ra0, dec0), CRPIX at pixel (0, 0)."""
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [0.0, 0.0]
    w.wcs.cd = np.eye(2)
    return w


def sky_to_tangent(ra, dec, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Standard coordinates (xi east, eta north; degrees) of (ra, dec) about (ra0, dec0)."""
    # wcs pixel coordinates with origin=1 are FITS pixels, so CRPIX (0, 0) makes them the
    # intermediate coordinates themselves.
    return tangent_wcs(ra0, dec0).wcs_world2pix(np.asarray(ra, float), np.asarray(dec, float), 1)


def tangent_to_sky(xi, eta, ra0: float, dec0: float) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`sky_to_tangent`."""
    return tangent_wcs(ra0, dec0).wcs_pix2world(np.asarray(xi, float), np.asarray(eta, float), 1)


def tpv_header(crval, crpix, cd, pv1: dict[int, float], pv2: dict[int, float],
               shape: tuple[int, int] | None = None) -> fits.Header:
    """A FITS header for a TPV WCS (RADESYS ICRS)."""
    h = fits.Header()
    h["WCSAXES"] = 2
    h["CTYPE1"], h["CTYPE2"] = "RA---TPV", "DEC--TPV"
    h["CUNIT1"], h["CUNIT2"] = "deg", "deg"
    h["RADESYS"] = "ICRS"
    h["CRVAL1"], h["CRVAL2"] = float(crval[0]), float(crval[1])
    h["CRPIX1"], h["CRPIX2"] = float(crpix[0]), float(crpix[1])
    cd = np.asarray(cd, dtype=float)
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = cd[0, 0], cd[0, 1], cd[1, 0], cd[1, 1]
    for axis, pv in ((1, pv1), (2, pv2)):
        for k in sorted(pv):
            h[f"PV{axis}_{k}"] = float(pv[k])
    if shape is not None:
        h["NAXIS"] = 2
        h["NAXIS1"], h["NAXIS2"] = shape[1], shape[0]
    return h


def tpv_wcs(header: fits.Header) -> WCS:
    """An astropy WCS from a TPV header, without the FITSFixedWarning chatter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        w = WCS(header, relax=True)
    if "NAXIS1" in header:
        w.pixel_shape = (header["NAXIS1"], header["NAXIS2"])
    return w


def fit_tpv_wcs(x, y, ra, dec, crval, crpix, cd, degree: int = 3,
                shape: tuple[int, int] | None = None) -> tuple[WCS, fits.Header, np.ndarray]:
    """Least-squares TPV polynomial mapping pixels (x, y; 1-based) to (ra, dec).

    CRVAL, CRPIX and CD are held fixed; the PV terms (up to ``degree``, including the
    constant and linear ones, so CD need only be approximate) absorb everything else.

    Returns
    -------
    wcs : WCS
    header : Header
    residual_mas : ndarray
        Per-point on-sky residual of the fit, milliarcseconds.
    """
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    ra, dec = np.asarray(ra, float).ravel(), np.asarray(dec, float).ravel()
    cd = np.asarray(cd, float)
    u = cd[0, 0] * (x - crpix[0]) + cd[0, 1] * (y - crpix[1])
    v = cd[1, 0] * (x - crpix[0]) + cd[1, 1] * (y - crpix[1])
    xi, eta = sky_to_tangent(ra, dec, crval[0], crval[1])
    indices = tpv_indices(degree)
    # Scale the monomials to order unity so the least-squares problem stays well conditioned.
    scale = max(np.max(np.abs(u)), np.max(np.abs(v)), 1e-6)
    pv = []
    for target, (a, b) in ((xi, (u, v)), (eta, (v, u))):
        coef, *_ = np.linalg.lstsq(tpv_design(a / scale, b / scale, degree), target, rcond=None)
        powers = np.array([TPV_TERMS[k][0] + TPV_TERMS[k][1] for k in indices])
        pv.append(dict(zip(indices, coef / scale ** powers)))
    header = tpv_header(crval, crpix, cd, pv[0], pv[1], shape)
    wcs = tpv_wcs(header)
    fit_ra, fit_dec = wcs.all_pix2world(x, y, 1)
    dra = (fit_ra - ra + 180.0) % 360.0 - 180.0
    residual = np.hypot(dra * np.cos(np.deg2rad(dec)), fit_dec - dec) * 3.6e6
    return wcs, header, residual
