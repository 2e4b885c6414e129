"""Run-time use of a prior: one exposure's TPV header for a quadrant, written as SCAMP's ``.ahead``.

The prior is stored in the camera frame (:mod:`priors.frames`).  For an exposure, the
quadrant's prior is evaluated on a grid over the quadrant, placed about the commanded
pointing in that exposure's camera frame (its time, weather and filter), carried to ICRS,
and refitted as an ICRS TPV WCS: CRVAL = the commanded pointing, CRPIX = the boresight,
CD = the prior's CD turned by the angle between the camera frame's north and ICRS north
there (0.1-0.2 degrees: precession and nutation since J2000, plus refraction's share), and
PV terms that absorb the rest (differential aberration and refraction).  The header then
differs from the truth only by the exposure's pointing and position-angle errors, which
SCAMP's first pass solves for.  Because it includes the exposure's own refraction, the
scale check's reference airmass for it is the image's own airmass.  ``write_ahead`` is
:func:`pipeline.formats.scamp_head.write_ahead` (ASCII 80-character cards, END, no NAXIS keys).
"""
from __future__ import annotations

import numpy as np
from astropy.io import fits

from pipeline.formats.tpv import fit_tpv_wcs, sky_to_tangent, tpv_wcs
from pipeline.formats.scamp_head import write_ahead  # the project's one .ahead writer (re-exported)

from priors.frames import rotation_matrix
from priors.model import Prior, PriorError

__all__ = ["prior_wcs_header", "write_ahead", "AHEAD_FIT_TOLERANCE_MAS"]

#: Largest refit residual accepted over the quadrant (the refit is normally < 0.1 mas).
AHEAD_FIT_TOLERANCE_MAS = 2.0
_GRID = 11


def prior_wcs_header(prior: Prior, rcid: int, telra: float, teldec: float, obsmjd: float,
                     shape: tuple[int, int], *, pressure_hpa: float | None = None,
                     temperature_c: float | None = None, wavelength_um: float | None = None) -> fits.Header:
    """The prior's ICRS TPV WCS of one quadrant for one exposure.

    Parameters
    ----------
    prior : Prior
    rcid : int
        Readout channel 0-63.
    telra, teldec : float
        Commanded pointing (the header's TELRA/TELDEC), ICRS degrees.
    obsmjd : float
        UTC MJD of the exposure.
    shape : (int, int)
        The image shape (ny, nx); must be the quadrant's.
    pressure_hpa, temperature_c, wavelength_um : float, optional
        The exposure's weather (header PRESSURE, TEMPTURE) and its filter's wavelength;
        default: the conditions stored with the prior (the site's).

    Returns
    -------
    Header
        ``RA---TPV``/``DEC--TPV`` with CRVAL, CRPIX, CD, PV1_*, PV2_*, NAXIS1/2.

    Raises
    ------
    PriorError
        No entry for ``rcid``, a shape other than the prior's, or a frame this code does not know.
    """
    entry = prior.quadrant(rcid)
    if tuple(int(n) for n in shape) != tuple(entry.shape):
        raise PriorError(prior.source, f"rcid {rcid}: image shape {tuple(shape)} differs from the "
                                       f"prior's {entry.shape}")
    if prior.provenance.frame != "HADEC-OBSERVED":
        raise PriorError(prior.source, f"unknown prior frame {prior.provenance.frame!r}")
    ny, nx = entry.shape
    gx, gy = np.meshgrid(np.linspace(-8.0, nx + 9.0, _GRID), np.linspace(-8.0, ny + 9.0, _GRID))
    x, y = gx.ravel(), gy.ravel()
    # With CRVAL at the origin the stored TPV gives standard coordinates directly.
    lon, lat = tpv_wcs(entry.camera_header(0.0, 0.0)).all_pix2world(x, y, 1)
    xi, eta = sky_to_tangent(lon, lat, 0.0, 0.0)
    frame = prior.camera_frame(obsmjd, pressure_hpa, temperature_c, wavelength_um)
    ra, dec = frame.to_icrs(xi, eta, telra, teldec)
    to_icrs = rotation_matrix(frame.rotation_deg(telra, teldec))
    _, header, residual_mas = fit_tpv_wcs(x, y, ra, dec, (telra, teldec), entry.crpix, to_icrs @ entry.cd,
                                          degree=prior.provenance.degree, shape=entry.shape)
    if residual_mas.max() > AHEAD_FIT_TOLERANCE_MAS:
        raise PriorError(prior.source, f"rcid {rcid}: ICRS refit of the prior is off by "
                                       f"{residual_mas.max():.1f} mas")
    return header

