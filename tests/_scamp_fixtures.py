"""A synthetic but realistic quadrant for SCAMP tests: true TPV WCS, detections, Gaia-like stars.

The truth is a TPV WCS (TAN with a radial cubic and small quadratic PV terms) placed where a
quadrant of the 7-degree ZTF-like camera sits, so CRPIX is the boresight in the quadrant's
pixel frame (near a corner for an inner quadrant, ~3 degrees off for an outer one).  Stars
with Gaia-like G magnitudes are placed uniformly on the sky over the quadrant plus a margin;
detections are their true 1-based pixel positions plus centroid noise whose size follows the
S/N of a 2-arcsec-FWHM star on a sky-limited 30 s exposure, with errors that say so.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from pipeline.core.config import InstrumentConfig
from pipeline.core.focalplane import nominal_cd, quadrant_geometry
from pipeline.formats.ldac import write_ldac

# TPV coefficients of the true optics (degrees of intermediate world coordinates).
# Radial cubic xi' = xi (1 + k r^2): ~20 arcsec at the field corner.
RADIAL_CUBIC = {"PV1_7": 5e-5, "PV1_9": 5e-5, "PV2_7": 5e-5, "PV2_9": 5e-5}
QUADRATIC = {"PV1_4": 1.2e-4, "PV1_5": -6e-5, "PV1_6": 4e-5,
             "PV2_4": -8e-5, "PV2_5": 5e-5, "PV2_6": 3e-5}

ZERO_POINT_ADU = 27.5         # G magnitude giving 1 ADU in the exposure
GAIN = 6.2                    # e-/ADU
SKY_SIGMA_ADU = 15.0          # per pixel
APERTURE_PIXELS = 28.0        # ~pi (1.5 FWHM)^2 for FWHM 2 px
PSF_SIGMA_PX = 2.0 / 2.355


@dataclass(frozen=True)
class SyntheticQuadrant:
    """Everything a SCAMP test needs, in memory."""

    true_header: fits.Header       # the truth (TPV)
    ahead: fits.Header             # the prior: pointing off, quadratic terms missing
    image_header: fits.Header      # what the extraction writes into LDAC_IMHEAD
    detections: Table
    reference: Table
    shape: tuple[int, int]         # numpy order (ny, nx)

    @property
    def true_wcs(self) -> WCS:
        wcs = WCS(self.true_header)
        wcs.pixel_shape = self.shape[::-1]
        return wcs


def tpv_header(crval: tuple[float, float], crpix: tuple[float, float], cd: np.ndarray,
               pv: dict[str, float]) -> fits.Header:
    """A TPV WCS header with identity linear terms plus the given PV coefficients."""
    header = fits.Header()
    header["CTYPE1"], header["CTYPE2"] = "RA---TPV", "DEC--TPV"
    header["CRVAL1"], header["CRVAL2"] = crval
    header["CRPIX1"], header["CRPIX2"] = crpix
    for (i, j), value in np.ndenumerate(cd):
        header[f"CD{i + 1}_{j + 1}"] = float(value)
    terms = {"PV1_0": 0.0, "PV1_1": 1.0, "PV1_2": 0.0, "PV2_0": 0.0, "PV2_1": 1.0, "PV2_2": 0.0}
    terms.update(pv)
    for key, value in terms.items():
        header[key] = value
    return header


def _sample_magnitudes(rng: np.random.Generator, n: int, bright=14.0, faint=20.0) -> np.ndarray:
    # Star counts rise as 10^(0.3 m): sample that cumulative law by inversion.
    lo, hi = 10 ** (0.3 * bright), 10 ** (0.3 * faint)
    return np.log10(lo + rng.uniform(size=n) * (hi - lo)) / 0.3


def make_quadrant(seed: int = 1, ccdid: int = 6, qid: int = 1, n_stars: int = 2500,
                  field_centre=(210.0, 35.0), pointing_error_arcsec=(15.0, -13.0),
                  margin_px: float = 250.0) -> SyntheticQuadrant:
    """Build a synthetic quadrant; ``ccdid=6, qid=1`` is inner, ``ccdid=16, qid=1`` outer."""
    rng = np.random.default_rng(seed)
    instrument = InstrumentConfig()
    geometry = quadrant_geometry(instrument, ccdid, qid)
    nx, ny = geometry.nx, geometry.ny
    cd = nominal_cd(instrument)
    true_header = tpv_header(field_centre, geometry.boresight_pixel, cd,
                             {**RADIAL_CUBIC, **QUADRATIC})
    true_wcs = WCS(true_header)

    area_factor = (nx + 2 * margin_px) * (ny + 2 * margin_px) / (nx * ny)
    n_total = int(round(n_stars * area_factor))
    x = rng.uniform(0.5 - margin_px, nx + 0.5 + margin_px, n_total)
    y = rng.uniform(0.5 - margin_px, ny + 0.5 + margin_px, n_total)
    ra, dec = true_wcs.all_pix2world(x, y, 1)
    mag = _sample_magnitudes(rng, n_total)
    pos_err_mas = 0.02 + 0.5 * 10 ** (0.2 * (mag - 20.0))
    reference = Table({
        "X_WORLD": ra, "Y_WORLD": dec,
        "ERRA_WORLD": pos_err_mas / 3.6e6, "ERRB_WORLD": pos_err_mas / 3.6e6,
        "MAG": mag.astype(np.float32), "MAGERR": np.full(n_total, 0.003, np.float32),
    })

    inside = (x > 0.5) & (x < nx + 0.5) & (y > 0.5) & (y < ny + 0.5)
    detected = inside & (rng.uniform(size=n_total) > 0.03)
    flux = 10 ** (-0.4 * (mag[detected] - ZERO_POINT_ADU))
    flux_err = np.sqrt(flux / GAIN + APERTURE_PIXELS * SKY_SIGMA_ADU ** 2)
    # Centroid error of a Gaussian star: sigma_psf / S/N per axis, floored by flat-field noise.
    pos_err_px = np.hypot(PSF_SIGMA_PX * flux_err / flux, 0.003)
    n_det = int(detected.sum())
    det_x = x[detected] + rng.normal(0.0, pos_err_px)
    det_y = y[detected] + rng.normal(0.0, pos_err_px)
    n_spurious = n_det // 100
    spurious_flux = rng.uniform(300.0, 3000.0, n_spurious)
    detections = Table({
        "XWIN_IMAGE": np.concatenate([det_x, rng.uniform(0.5, nx + 0.5, n_spurious)]),
        "YWIN_IMAGE": np.concatenate([det_y, rng.uniform(0.5, ny + 0.5, n_spurious)]),
        "ERRAWIN_IMAGE": np.concatenate([pos_err_px, np.full(n_spurious, 0.05)]),
        "ERRBWIN_IMAGE": np.concatenate([pos_err_px, np.full(n_spurious, 0.05)]),
        "ERRTHETAWIN_IMAGE": np.zeros(n_det + n_spurious, np.float32),
        "FLUX_AUTO": np.concatenate([flux + rng.normal(0.0, flux_err), spurious_flux]),
        "FLUXERR_AUTO": np.concatenate(
            [flux_err, np.sqrt(spurious_flux / GAIN + APERTURE_PIXELS * SKY_SIGMA_ADU ** 2)]),
        "FLAGS": np.zeros(n_det + n_spurious, np.int16),
    })

    dx, dy = pointing_error_arcsec
    prior_crval = (field_centre[0] + dx / 3600.0 / np.cos(np.deg2rad(field_centre[1])),
                   field_centre[1] + dy / 3600.0)
    ahead = tpv_header(prior_crval, geometry.boresight_pixel, cd, RADIAL_CUBIC)

    # A stale telescope WCS in the image header (PC/CDELT form and a stray PV term):
    # the runner must keep it from leaking into SCAMP's prior.
    image_header = fits.Header()
    image_header["NAXIS"] = 2
    image_header["NAXIS1"], image_header["NAXIS2"] = nx, ny
    image_header["FILTER"] = "ZTF_r"
    image_header["EXPTIME"] = 30.0
    image_header["CTYPE1"], image_header["CTYPE2"] = "RA---TAN", "DEC--TAN"
    image_header["CRVAL1"], image_header["CRVAL2"] = field_centre[0] + 0.3, field_centre[1] - 0.2
    image_header["CRPIX1"], image_header["CRPIX2"] = nx / 2, ny / 2
    image_header["CDELT1"], image_header["CDELT2"] = -1.0 / 3600, 1.0 / 3600
    image_header["PC1_1"], image_header["PC2_2"] = 1.0, 1.0
    image_header["PV1_5"] = 0.01
    return SyntheticQuadrant(true_header, ahead, image_header, detections, reference, (ny, nx))


def shifted_prior(quadrant: SyntheticQuadrant, arcsec: tuple[float, float]) -> SyntheticQuadrant:
    """The same quadrant with the prior pointing moved by a further (dRA cos dec, dDec)."""
    ahead = quadrant.ahead.copy()
    ahead["CRVAL1"] += arcsec[0] / 3600.0 / np.cos(np.deg2rad(ahead["CRVAL2"]))
    ahead["CRVAL2"] += arcsec[1] / 3600.0
    return replace(quadrant, ahead=ahead)


def write_catalogues(quadrant: SyntheticQuadrant, folder: Path,
                     detections: Table | None = None,
                     reference: Table | None = None) -> tuple[Path, Path]:
    """Write the detection and reference LDAC files (optionally replacing either table)."""
    det_path = write_ldac(folder / "detections.ldac",
                          quadrant.detections if detections is None else detections,
                          quadrant.image_header)
    ref_path = write_ldac(folder / "gaia.ldac",
                          quadrant.reference if reference is None else reference)
    return det_path, ref_path
