"""A second, independent maker of survey data: quadrants and a Gaia table as another tool
would hand them to skydiff.

Nothing here uses the project's simulator, focal-plane model, WCS or FITS writers: astropy
builds the true and first-guess WCSs (TPV through wcslib) and writes the files, astropy's
``SkyCoord.apply_space_motion`` moves the stars, numpy draws them with a Moffat PSF
(3 x 3 sub-pixel sampling), Poisson and read noise.  The Gaia table has the archive's
column names and units but no ``pmra_error``/``pmdec_error`` (optional in the catalogue
schema), a tenth of the faint stars as two-parameter sources (masked proper motion), as an
archive query returns them.

The truth of a quadrant is its TPV WCS (pixel -> ICRS at the exposure epoch); the header
carries a first guess: the same optics without the quadratic terms, pointed 15-20" off and
rotated by 0.005 deg.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import astropy.units as u
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.table import MaskedColumn, Table
from astropy.time import Time
from astropy.wcs import WCS

NX, NY = 3072, 3080
SCALE_DEG = 1.012 / 3600.0
PALOMAR_LON_DEG, PALOMAR_LAT_DEG = -116.8597, 33.3563
GAIA_EPOCH = 2016.0
# TPV of the invented optics, degrees of intermediate world coordinates: a radial cubic
# (~15" at 3 deg from the axis) and small quadratic terms.
RADIAL = {"PV1_7": 4e-5, "PV1_9": 4e-5, "PV2_7": 4e-5, "PV2_9": 4e-5}
QUADRATIC = {"PV1_4": 9e-5, "PV1_5": -4e-5, "PV1_6": 3e-5, "PV2_4": -6e-5, "PV2_5": 7e-5, "PV2_6": 2e-5}


@dataclass(frozen=True)
class ExternalQuadrant:
    """One quadrant file, its true WCS and where it sits."""

    path: Path
    true_header: fits.Header
    centre: tuple[float, float]          # (ra, dec) of the image centre, deg

    @property
    def true_wcs(self) -> WCS:
        wcs = WCS(self.true_header)
        wcs.pixel_shape = (NX, NY)
        return wcs


def transit_pointing(mjd: float, dec_deg: float) -> tuple[float, float]:
    """(ra, dec) on the meridian of Palomar at ``mjd`` (GMST from its standard polynomial)."""
    gmst = 280.46061837 + 360.98564736629 * (mjd + 2400000.5 - 2451545.0)
    return float(np.mod(gmst + PALOMAR_LON_DEG, 360.0)), float(dec_deg)


def tpv_header(crval, crpix, rotation_deg: float, terms: dict) -> fits.Header:
    """A TPV header: 1.012"/px, east left and north up rotated by ``rotation_deg``, PV ``terms``."""
    c, s = np.cos(np.radians(rotation_deg)), np.sin(np.radians(rotation_deg))
    cd = SCALE_DEG * np.array([[-c, s], [s, c]])          # east left, north up
    header = fits.Header()
    header["CTYPE1"], header["CTYPE2"] = "RA---TPV", "DEC--TPV"
    header["CRVAL1"], header["CRVAL2"] = crval
    header["CRPIX1"], header["CRPIX2"] = crpix
    for i in range(2):
        for j in range(2):
            header[f"CD{i + 1}_{j + 1}"] = float(cd[i, j])
    header["PV1_1"], header["PV2_1"] = 1.0, 1.0
    for key, value in terms.items():
        header[key] = value
    return header


def make_gaia_table(centre: tuple[float, float], half_size_deg: float, rng: np.random.Generator,
                    density_per_deg2: float = 3000.0) -> tuple[Table, Table]:
    """A Gaia archive-like table (no pm errors) around ``centre`` and its truth.

    Returns
    -------
    catalogue : Table
        ``source_id, ra, dec, ra_error, dec_error, pmra, pmdec, ref_epoch, phot_g_mean_mag,
        phot_bp_mean_mag, phot_rp_mean_mag`` in the archive's units; ``pmra``/``pmdec`` masked
        for two-parameter sources.
    truth : Table
        ``ra, dec`` (true at J2016), ``pmra, pmdec`` (true), ``g``.
    """
    ra0, dec0 = centre
    area = (2 * half_size_deg) ** 2
    n = rng.poisson(density_per_deg2 * area)
    dec = dec0 + rng.uniform(-half_size_deg, half_size_deg, n)
    ra = ra0 + rng.uniform(-half_size_deg, half_size_deg, n) / np.cos(np.radians(dec))
    # number counts rising as 10^(0.3 G) between G = 12 and 20.8
    lo, hi, slope = 12.0, 20.8, 0.3 * np.log(10)
    g = lo + np.log1p(rng.random(n) * np.expm1(slope * (hi - lo))) / slope
    pmra, pmdec = rng.normal(-2.0, 6.0, n), rng.normal(-3.0, 6.0, n)
    pos_err = np.clip(0.02 * 10 ** (0.2 * (g - 15.0)), 0.01, 2.0)      # mas
    two_param = (g > 19.0) & (rng.random(n) < 0.1)
    pos_err[two_param] *= 4.0
    pm_err = 1.3 * pos_err
    cat = Table()
    cat["source_id"] = np.arange(n, dtype=np.int64) * 131 + 4_000_000_000_000
    cat["ra"] = ra + rng.normal(0, pos_err) / 3.6e6 / np.cos(np.radians(dec))
    cat["dec"] = dec + rng.normal(0, pos_err) / 3.6e6
    cat["ra_error"] = pos_err.astype(np.float32)
    cat["dec_error"] = pos_err.astype(np.float32)
    cat["pmra"] = MaskedColumn(pmra + rng.normal(0, pm_err), mask=two_param)
    cat["pmdec"] = MaskedColumn(pmdec + rng.normal(0, pm_err), mask=two_param)
    cat["ref_epoch"] = np.full(n, GAIA_EPOCH)
    cat["phot_g_mean_mag"] = g.astype(np.float32)
    bp_rp = rng.uniform(0.5, 1.8, n)
    cat["phot_bp_mean_mag"] = (g + 0.4 * bp_rp).astype(np.float32)
    cat["phot_rp_mean_mag"] = (g - 0.6 * bp_rp).astype(np.float32)
    for name, unit in (("ra", u.deg), ("dec", u.deg), ("ra_error", u.mas), ("dec_error", u.mas),
                       ("pmra", u.mas / u.yr), ("pmdec", u.mas / u.yr), ("ref_epoch", u.yr),
                       ("phot_g_mean_mag", u.mag), ("phot_bp_mean_mag", u.mag), ("phot_rp_mean_mag", u.mag)):
        cat[name].unit = unit
    truth = Table({"ra": ra, "dec": dec, "pmra": pmra, "pmdec": pmdec, "g": g})
    return cat, truth


def _moffat_image(shape, x, y, flux, fwhm_px: float, beta: float = 3.0) -> np.ndarray:
    """Stars (0-based pixel positions) drawn with a Moffat profile, 3 x 3 sub-pixel sampled."""
    alpha = fwhm_px / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    norm = (beta - 1.0) / (np.pi * alpha ** 2)
    image = np.zeros(shape, np.float64)
    sub = (np.arange(3) - 1.0) / 3.0
    for xi, yi, fi in zip(x, y, flux):
        r = int(np.clip(4 * fwhm_px + 2.0 * np.log10(max(fi, 1.0)), 8, 40))
        ix, iy = int(round(xi)), int(round(yi))
        x0, x1, y0, y1 = max(ix - r, 0), min(ix + r + 1, shape[1]), max(iy - r, 0), min(iy + r + 1, shape[0])
        if x0 >= x1 or y0 >= y1:
            continue
        gx = np.arange(x0, x1)[None, :, None, None] + sub[None, None, None, :] - xi
        gy = np.arange(y0, y1)[:, None, None, None] + sub[None, None, :, None] - yi
        profile = norm * (1.0 + (gx ** 2 + gy ** 2) / alpha ** 2) ** (-beta)
        image[y0:y1, x0:x1] += fi * profile.mean(axis=(2, 3))
    return image


def make_quadrant(path: Path, catalogue_truth: Table, pointing: tuple[float, float], crpix: tuple[float, float],
                  obsmjd: float, rng: np.random.Generator, *, expid: int, ccdid: int, qid: int,
                  fwhm_arcsec: float = 2.1, zero_point: float = 26.3, exptime: float = 30.0) -> ExternalQuadrant:
    """Render one contract-conforming quadrant file with a TPV first-guess WCS.

    ``pointing`` is the optical axis (CRVAL), ``crpix`` where it falls in this quadrant's
    1-based pixel frame.  Returns the file and its true WCS.
    """
    true_header = tpv_header(pointing, crpix, 0.0, {**RADIAL, **QUADRATIC})
    true_wcs = WCS(true_header)
    epoch = Time(obsmjd + 0.5 * exptime / 86400.0, format="mjd", scale="utc")
    stars = SkyCoord(ra=catalogue_truth["ra"] * u.deg, dec=catalogue_truth["dec"] * u.deg,
                     pm_ra_cosdec=catalogue_truth["pmra"] * u.mas / u.yr,
                     pm_dec=catalogue_truth["pmdec"] * u.mas / u.yr, distance=10 * u.kpc,
                     radial_velocity=0 * u.km / u.s, obstime=Time(GAIA_EPOCH, format="jyear", scale="tcb"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        now = stars.apply_space_motion(new_obstime=epoch)
    x, y = true_wcs.world_to_pixel(SkyCoord(now.ra, now.dec))
    on = (x > -30) & (x < NX + 30) & (y > -30) & (y < NY + 30)
    flux = 10 ** (-0.4 * (np.asarray(catalogue_truth["g"])[on] - zero_point)) * exptime
    gain, read_noise, saturate, sky = 6.2, 8.0, 50000.0, 320.0
    fwhm_px = fwhm_arcsec / 1.012
    signal = _moffat_image((NY, NX), x[on], y[on], flux, fwhm_px)
    # a gentle sky gradient, Poisson in electrons, read noise
    yy, xx = np.mgrid[0:NY, 0:NX]
    sky_map = sky * (1.0 + 0.03 * (xx / NX - 0.5) - 0.02 * (yy / NY - 0.5))
    electrons = rng.poisson((signal + sky_map) * gain).astype(np.float64)
    data = (electrons + rng.normal(0.0, read_noise, electrons.shape)) / gain
    mask = np.zeros((NY, NX), np.int16)
    saturated = data >= saturate
    data[saturated] = saturate
    mask[saturated] |= 2
    alt = _altitude(pointing, epoch)
    header = tpv_header((pointing[0] + 15.0 / 3600.0 / np.cos(np.radians(pointing[1])), pointing[1] - 18.0 / 3600.0),
                  crpix, 0.005, RADIAL)
    for key, value in dict(FIELDID=1701, CCDID=ccdid, QID=qid, FILTER="ZTF_r", FILTERID=2, OBSMJD=obsmjd,
                           EXPTIME=exptime, EXPID=expid, PROGRMID=1, TELRA=pointing[0], TELDEC=pointing[1],
                           AIRMASS=round(1.0 / np.sin(np.radians(alt)), 4), GAIN=gain, READNOI=read_noise,
                           SATURATE=saturate).items():
        header[key] = value
    hdul = fits.HDUList([fits.PrimaryHDU(data.astype(np.float32), header=header),
                         fits.ImageHDU(mask, name="MASK")])
    hdul.writeto(path, overwrite=True)
    centre = true_wcs.pixel_to_world_values((NX - 1) / 2.0, (NY - 1) / 2.0)
    return ExternalQuadrant(Path(path), true_header, (float(centre[0]), float(centre[1])))


def _altitude(radec, time: Time) -> float:
    """Altitude (deg) at Palomar from the hour angle (no refraction, no IERS)."""
    lst = transit_pointing(time.mjd, 0.0)[0]
    ha = np.radians(lst - radec[0])
    lat, dec = np.radians(PALOMAR_LAT_DEG), np.radians(radec[1])
    return float(np.degrees(np.arcsin(np.sin(lat) * np.sin(dec) + np.cos(lat) * np.cos(dec) * np.cos(ha))))


def wcs_grid_rms_mas(solved: WCS, truth: WCS, n: int = 16) -> tuple[float, float]:
    """RMS and maximum angular difference (mas) of two WCSs on an n x n pixel grid."""
    gx, gy = np.meshgrid(np.linspace(0, NX - 1, n), np.linspace(0, NY - 1, n))
    a = solved.pixel_to_world(gx.ravel(), gy.ravel())
    b = truth.pixel_to_world(gx.ravel(), gy.ravel())
    sep = a.separation(b).to_value(u.mas)
    return float(np.sqrt(np.mean(sep ** 2))), float(sep.max())


def plain_coadd(reference, path: Path, sky_level: float = 150.0) -> Path:
    """A skydiff reference as another tool would hand it over: the coadd with a sky level
    added, NaN where no frame covered it, its WCS, the contract's keywords and ``MAGZP``,
    written with astropy alone: no MASK, RMS, PSF or CATALOG extension, no REFID, JDSTART,
    JDEND or NFRAMES."""
    header = fits.Header()
    for key in ("FIELDID", "CCDID", "QID", "FILTER", "FILTERID", "OBSMJD", "EXPTIME", "EXPID", "PROGRMID", "TELRA",
                "TELDEC", "AIRMASS", "GAIN", "READNOI", "SATURATE", "MAGZP"):
        header[key] = reference.header[key]
    header.update(reference.wcs.to_header(relax=True))
    data = np.where(reference.coverage > 0, reference.data + sky_level, np.nan).astype(np.float32)
    fits.PrimaryHDU(data, header).writeto(path)
    return Path(path)
