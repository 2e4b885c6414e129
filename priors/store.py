"""The prior file: one FITS file, written atomically.

Layout
------
* Primary HDU, no data; provenance keywords: ``PRIORVER`` (format version), ``FRAME``
  (``HADEC-OBSERVED``: the camera frame of :mod:`priors.frames`), ``DEGREE``, ``NEXP``,
  ``NSTARS``, ``NREJECT``, ``BUILT`` (UTC, ISO-8601), ``AIRMIN``/``AIRMAX``/``AIRMEAN``,
  ``MJDMIN``/``MJDMAX``, ``RMS`` (arcsec per axis), and the site and default conditions used
  to put refraction back at run time: ``SITELONG``, ``SITELAT``, ``SITEELEV``, ``HUMIDITY``,
  ``PRESSURE``, ``TEMPTURE``, ``WAVELEN``.
* ``QUADRANTS`` binary table, one row per readout channel: ``RCID``, ``NX``, ``NY``,
  ``CRPIX1``, ``CRPIX2``, ``CD1_1``, ``CD1_2``, ``CD2_1``, ``CD2_2`` (deg/pixel), ``PV1``
  and ``PV2`` (vectors over the TPV indices listed, comma separated, in the ``PVINDEX``
  keyword of this HDU), ``NSTARS``, ``PLACEMNT`` (``fitted`` or ``layout``), ``RMS`` (arcsec).
* ``EXPOSURES`` binary table: the fitted per-exposure terms (:class:`priors.model.Prior`).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table

from pipeline.formats.atomic import write_fits_atomic
from pipeline.formats.tpv import tpv_indices

from priors.model import Prior, PriorError, PriorProvenance, QuadrantPrior

__all__ = ["PRIOR_FORMAT_VERSION", "PRIOR_FILENAME", "write_prior", "read_prior"]

PRIOR_FORMAT_VERSION = 1
#: The survey's prior inside ``paths.priors``: the quadrant runner solves every quadrant from it.
PRIOR_FILENAME = "prior.fits"

# provenance field -> (keyword, comment)
_PROVENANCE_KEYS = {
    "n_exposures": ("NEXP", "exposures fitted"),
    "n_stars": ("NSTARS", "stars fitted"),
    "n_rejected": ("NREJECT", "outliers clipped"),
    "built": ("BUILT", "UTC time of the fit"),
    "airmass_min": ("AIRMIN", "lowest airmass used"),
    "airmass_max": ("AIRMAX", "highest airmass used"),
    "airmass_mean": ("AIRMEAN", "mean airmass of the exposures"),
    "mjd_min": ("MJDMIN", "first exposure, UTC MJD"),
    "mjd_max": ("MJDMAX", "last exposure, UTC MJD"),
    "rms_arcsec": ("RMS", "fit residual, arcsec per axis"),
    "degree": ("DEGREE", "degree of focal-plane polynomial, PV"),
    "frame": ("FRAME", "frame of the stored coordinates"),
    "site_longitude_deg": ("SITELONG", "site longitude, deg"),
    "site_latitude_deg": ("SITELAT", "site latitude, deg"),
    "site_height_m": ("SITEELEV", "site height, m"),
    "relative_humidity": ("HUMIDITY", "site relative humidity, 0-1"),
    "pressure_hpa": ("PRESSURE", "default pressure, hPa"),
    "temperature_c": ("TEMPTURE", "default temperature, deg C"),
    "wavelength_um": ("WAVELEN", "default wavelength, micron"),
}


def write_prior(path: str | os.PathLike, prior: Prior) -> Path:
    """Write a prior as one FITS file (temporary file, then rename)."""
    primary = fits.PrimaryHDU()
    primary.header["PRIORVER"] = (PRIOR_FORMAT_VERSION, "skydiff distortion-prior format")
    for name, (key, comment) in _PROVENANCE_KEYS.items():
        primary.header[key] = (getattr(prior.provenance, name), comment)
    indices = tpv_indices(prior.provenance.degree)
    entries = [prior.quadrants[r] for r in sorted(prior.quadrants)]
    quads = Table({
        "RCID": [q.rcid for q in entries],
        "NX": [q.shape[1] for q in entries], "NY": [q.shape[0] for q in entries],
        "CRPIX1": [q.crpix[0] for q in entries], "CRPIX2": [q.crpix[1] for q in entries],
        **{f"CD{i + 1}_{j + 1}": [q.cd[i, j] for q in entries] for i in range(2) for j in range(2)},
        "PV1": np.array([[q.pv1.get(k, 0.0) for k in indices] for q in entries]),
        "PV2": np.array([[q.pv2.get(k, 0.0) for k in indices] for q in entries]),
        "NSTARS": [q.n_stars for q in entries],
        "PLACEMNT": [q.placement for q in entries],
        "RMS": [q.rms_arcsec for q in entries],
    })
    quad_hdu = fits.BinTableHDU(quads, name="QUADRANTS")
    quad_hdu.header["PVINDEX"] = (",".join(map(str, indices)), "TPV index of each PV1/PV2 element")
    exposures = fits.BinTableHDU(prior.exposures, name="EXPOSURES")
    return write_fits_atomic(fits.HDUList([primary, quad_hdu, exposures]), path)


def read_prior(path: str | os.PathLike) -> Prior:
    """Read a prior file written by :func:`write_prior`.

    Raises
    ------
    PriorError
        Missing or unreadable file, wrong format version, or a missing HDU or keyword.
    """
    source = str(path)
    try:
        with fits.open(path, memmap=False) as hdul:
            header = hdul[0].header
            if header.get("PRIORVER") != PRIOR_FORMAT_VERSION:
                raise PriorError(source, f"not a skydiff prior of format {PRIOR_FORMAT_VERSION} "
                                         f"(PRIORVER = {header.get('PRIORVER')!r})")
            provenance = PriorProvenance(**{name: header[key] for name, (key, _) in _PROVENANCE_KEYS.items()})
            quads = Table(hdul["QUADRANTS"].data)
            indices = [int(k) for k in hdul["QUADRANTS"].header["PVINDEX"].split(",")]
            exposures = Table(hdul["EXPOSURES"].data)
    except PriorError:
        raise
    except FileNotFoundError:
        raise PriorError(source, "file not found") from None
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise PriorError(source, f"not a readable prior file ({exc})") from None
    quadrants = {}
    for row in quads:
        quadrants[int(row["RCID"])] = QuadrantPrior(
            rcid=int(row["RCID"]), shape=(int(row["NY"]), int(row["NX"])),
            crpix=(float(row["CRPIX1"]), float(row["CRPIX2"])),
            cd=np.array([[row["CD1_1"], row["CD1_2"]], [row["CD2_1"], row["CD2_2"]]], dtype=float),
            pv1=dict(zip(indices, map(float, row["PV1"]))), pv2=dict(zip(indices, map(float, row["PV2"]))),
            n_stars=int(row["NSTARS"]), placement=str(row["PLACEMNT"]).strip(), rms_arcsec=float(row["RMS"]))
    return Prior(quadrants=quadrants, provenance=provenance, exposures=exposures, source=source)
