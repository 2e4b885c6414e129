"""Synthetic reference catalogues and epochs with known truth, for matchfile tests and benchmarks.

Stars sit uniformly over a quadrant-sized box (in the offset frame of a centre, so fields
across RA = 0 or near the pole are as easy as any); a share of them are sinusoidal
variables, and one transient, absent from the reference, brightens during a window.  An
epoch draws each source's flux with Gaussian noise from the photon and sky noise (ADU, on
the epoch's zero point) and reports the magnitude errors that noise implies, so pulls
against the truth have unit spread.  Each detection's PSF-fit ``chi`` is drawn as a reduced
chi-square of ``CHI_DOF`` degrees of freedom and its ``sharp`` as a point source's (mean 0,
spread falling with S/N); the exposure's colour coefficient is ``CLRCOEFF``.
"""
from __future__ import annotations

from dataclasses import dataclass

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord, SkyOffsetFrame
from astropy.table import Table

from pipeline.matchfile.hjd import field_centre
from pipeline.matchfile.store import EpochMeta, ReferenceMeta

__all__ = ["SyntheticSky", "synthetic_sky", "synthetic_epoch"]

GAIN = 6.2                  # e-/ADU
SKY_SIGMA_PSF_ADU = 60.0    # sky + read noise summed over a PSF footprint
DETECTION_SNR = 5.0
POSITION_JITTER_ARCSEC = 0.15
CHI_DOF = 120               # pixels of a PSF fit box less the fitted parameters
SHARP_SPREAD_AT_SNR_1 = 3.0  # sharp's standard deviation x S/N for a point source
CLRCOEFF, CLRCOUNC = -0.05, 0.004


@dataclass(frozen=True)
class SyntheticSky:
    reference: Table            # the reference catalogue (input contract)
    meta: ReferenceMeta
    true_mag: np.ndarray        # mean magnitude per reference row
    amplitude: np.ndarray       # sinusoid semi-amplitude (0 for constant stars)
    period_d: np.ndarray
    phase: np.ndarray
    transient_ra: float
    transient_dec: float
    transient_mag: float
    transient_mjd: tuple[float, float]   # active window

    def mag_at(self, mjd: float) -> np.ndarray:
        return self.true_mag + self.amplitude * np.sin(2 * np.pi * mjd / self.period_d + self.phase)


def synthetic_sky(n_sources: int, centre_ra: float, centre_dec: float, seed: int = 1,
                  half_width_deg: float = 0.45, variable_fraction: float = 0.1,
                  meta: ReferenceMeta | None = None, transient_mjd=(60001.0, 60004.0)) -> SyntheticSky:
    """A reference catalogue of ``n_sources`` stars over a (2 half_width)^2 box around a centre."""
    rng = np.random.default_rng(seed)
    frame = SkyOffsetFrame(origin=SkyCoord(centre_ra * u.deg, centre_dec * u.deg))
    offsets = rng.uniform(-half_width_deg, half_width_deg, (n_sources + 1, 2))
    sky = SkyCoord(lon=offsets[:, 0] * u.deg, lat=offsets[:, 1] * u.deg, frame=frame).icrs
    mag = rng.uniform(14.0, 20.0, n_sources)
    variable = rng.random(n_sources) < variable_fraction
    amplitude = np.where(variable, rng.uniform(0.2, 0.8, n_sources), 0.0)
    ref_err = 1.0857 * np.sqrt(10 ** (-0.4 * (mag - 26.0)) / GAIN + (SKY_SIGMA_PSF_ADU / 3) ** 2) \
        / 10 ** (-0.4 * (mag - 26.0))
    reference = Table({"id": np.arange(1, n_sources + 1, dtype=np.int64), "ra": sky.ra.deg[:-1],
                       "dec": sky.dec.deg[:-1], "mag": mag + rng.normal(0, ref_err),
                       "magerr": ref_err, "flags": np.zeros(n_sources, np.int32)})
    meta = meta or ReferenceMeta(field=600, ccdid=6, qid=2, fid=2, refid=9001, jd_start=2459000.5,
                                 jd_end=2459100.5, nframes=20)
    return SyntheticSky(reference, meta, mag, amplitude, rng.uniform(0.3, 5.0, n_sources),
                        rng.uniform(0, 2 * np.pi, n_sources), float(sky.ra.deg[-1]), float(sky.dec.deg[-1]),
                        17.5, tuple(transient_mjd))


def synthetic_epoch(sky: SyntheticSky, expid: int, mjd: float, seed: int | None = None,
                    magzp: float = 26.0) -> tuple[EpochMeta, Table]:
    """One epoch's metadata and PSF photometry (detections above 5 sigma) of a synthetic sky."""
    rng = np.random.default_rng(expid if seed is None else seed)
    ra, dec = np.asarray(sky.reference["ra"]), np.asarray(sky.reference["dec"])
    mag = sky.mag_at(mjd)
    if sky.transient_mjd[0] <= mjd <= sky.transient_mjd[1]:
        ra, dec = np.append(ra, sky.transient_ra), np.append(dec, sky.transient_dec)
        mag = np.append(mag, sky.transient_mag)
    flux = 10 ** (-0.4 * (mag - magzp))
    fluxerr = np.sqrt(flux / GAIN + SKY_SIGMA_PSF_ADU ** 2)
    observed = flux + rng.normal(0.0, fluxerr)
    detected = observed > DETECTION_SNR * fluxerr
    jitter = rng.normal(0.0, POSITION_JITTER_ARCSEC / 3600.0, (2, len(ra)))
    cosdec = np.maximum(np.cos(np.deg2rad(dec)), 1e-6)
    table = Table({
        "ra": ((ra + jitter[0] / cosdec) % 360.0)[detected], "dec": (dec + jitter[1])[detected],
        "flux": observed[detected], "fluxerr": fluxerr[detected],
        "mag": magzp - 2.5 * np.log10(observed[detected]),
        "magerr": (1.0857 * fluxerr / observed)[detected],
        "flags": np.zeros(int(detected.sum()), np.int32),
        "chi": rng.chisquare(CHI_DOF, int(detected.sum())) / CHI_DOF,
        "sharp": rng.normal(0.0, SHARP_SPREAD_AT_SNR_1 / (observed / fluxerr)[detected])})
    centre_ra, centre_dec = field_centre(ra, dec)
    meta = EpochMeta(expid=expid, obsmjd=mjd, exptime=30.0, airmass=1.2, magzp=magzp, magzpunc=0.01,
                     seeing=2.0, limmag=20.5, field_ra=centre_ra, field_dec=centre_dec,
                     programid=1, clrcoeff=CLRCOEFF, clrcounc=CLRCOUNC)
    return meta, table
