"""Observing plans for the simulator: when each field is observed, in what conditions.

A night is named by its UT date (``YYYY-MM-DD``, as ZTF names nights and Kafka topics); the
site's night falls between about 02:00 and 14:00 UT of that date.  Epochs of a field are
spread in hour angle between rising and setting at ``max_airmass``, so one night samples the
whole airmass range the field reaches.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import astropy.units as u
from astropy.time import Time

from pipeline.core.config import Config
from pipeline.core.refraction import airmass_at
from pipeline.simulate.exposure import ExposureSpec
from pipeline.simulate.fields import DEFAULT_FIELDS, Field

__all__ = ["Field", "night_midpoint", "time_at_hour_angle", "time_at_airmass", "plan_night",
           "exposure_at_airmass", "DEFAULT_FIELDS"]

_SIDEREAL_PER_SOLAR = 1.00273790935




def night_midpoint(night: str, cfg: Config) -> Time:
    """Local midnight at the site's longitude, on the morning of the UT date ``night``."""
    midnight_ut_hours = (-cfg.site.longitude_deg / 15.0) % 24.0
    return Time(night, scale="utc") + midnight_ut_hours * u.hour


def time_at_hour_angle(ra_deg: float, hour_angle_deg: float, night: str, cfg: Config) -> Time:
    """UTC time during ``night`` at which a position has the given hour angle."""
    mid = night_midpoint(night, cfg)
    lst = mid.sidereal_time("apparent", longitude=cfg.site.longitude_deg * u.deg).to_value(u.deg)
    delta = ((ra_deg + hour_angle_deg - lst + 180.0) % 360.0) - 180.0
    return mid + (delta / 15.0 / _SIDEREAL_PER_SOLAR) * u.hour


def _hour_angle_of_airmass(dec_deg: float, airmass: float, cfg: Config) -> float:
    lat, dec = np.deg2rad(cfg.site.latitude_deg), np.deg2rad(dec_deg)
    cos_h = (1.0 / airmass - np.sin(lat) * np.sin(dec)) / (np.cos(lat) * np.cos(dec))
    if cos_h > 1.0:
        raise ValueError(f"a field at dec {dec_deg:.1f} never gets down to airmass {airmass:.2f} here")
    return float(np.rad2deg(np.arccos(max(cos_h, -1.0))))


def time_at_airmass(field: Field, airmass: float, night: str, cfg: Config, rising: bool = False) -> Time:
    """UTC time during ``night`` at which a field's centre reaches ``airmass``.

    Starts from the spherical-trigonometry hour angle, then refines with astropy's AltAz
    (precession and nutation move the field from its catalogue position) by a few secant steps.
    """
    sign = -1.0 if rising else 1.0
    hour_angle = sign * _hour_angle_of_airmass(field.dec, airmass, cfg)
    if abs(hour_angle) < 1e-6:
        return time_at_hour_angle(field.ra, 0.0, night, cfg)
    times = [time_at_hour_angle(field.ra, hour_angle, night, cfg)]
    times.append(times[0] + sign * 2 * u.min)
    values = [float(airmass_at(field.ra, field.dec, t, cfg.site)[0]) - airmass for t in times]
    for _ in range(6):
        (t0, t1), (f0, f1) = times[-2:], values[-2:]
        if abs(f1) < 1e-6 or f1 == f0:
            break
        t_new = t1 - (f1 * (t1 - t0).to(u.s) / (f1 - f0))
        times.append(t_new)
        values.append(float(airmass_at(field.ra, field.dec, t_new, cfg.site)[0]) - airmass)
    return times[-1]


def _expid(night: str, sequence: int) -> int:
    # ZTF-like: days since 2018-01-01 then a 5-digit running number within the night.
    days = int(Time(night, scale="utc").mjd - 58119)
    return days * 100000 + sequence


def _spec(field: Field, filt: str, time: Time, expid: int, cfg: Config, rng, seed: int,
          progrmid: int) -> ExposureSpec:
    sim, band = cfg.simulation, cfg.instrument.filters[filt]
    mid = time + 0.5 * cfg.instrument.exptime * u.s
    airmass = float(airmass_at(field.ra, field.dec, mid, cfg.site)[0])
    seeing = sim.seeing_fwhm_arcsec * float(np.exp(rng.normal(0.0, sim.seeing_scatter)))
    return ExposureSpec(
        expid=expid, fieldid=field.fieldid, field_ra=field.ra, field_dec=field.dec, filter=filt,
        obsmjd=float(time.mjd), exptime=cfg.instrument.exptime, progrmid=progrmid, airmass=airmass,
        pointing_offset_arcsec=tuple(float(v) for v in rng.normal(0.0, sim.pointing_error_arcsec, 2)),
        position_angle_deg=float(rng.normal(0.0, sim.position_angle_error_deg)),
        seeing_fwhm_arcsec=seeing * airmass ** 0.6,
        sky_mag=band.sky_mag + float(rng.normal(0.0, 0.15)),
        transparency_mag=float(abs(rng.normal(0.0, 0.03))),
        temperature_c=cfg.site.temperature_c + float(rng.normal(0.0, 1.0)),
        pressure_hpa=cfg.site.pressure_hpa + float(rng.normal(0.0, 1.5)),
        seed=int(np.random.SeedSequence([seed, expid]).generate_state(1)[0]),
    )


def plan_night(cfg: Config, fields, night: str, filters=("ZTF_g", "ZTF_r"), epochs_per_night: int = 4,
               max_airmass: float = 2.5, seed: int | None = None, progrmid: int = 1,
               first_sequence: int = 1) -> list[ExposureSpec]:
    """Exposures of one night: each field observed ``epochs_per_night`` times, filters alternating.

    Epochs are spread evenly in hour angle from rising to setting at ``max_airmass``
    (or the field's lowest airmass, if it never gets that high).
    """
    seed = cfg.simulation.seed if seed is None else seed
    rng = np.random.default_rng(np.random.SeedSequence([seed, int(Time(night).mjd)]))
    specs: list[ExposureSpec] = []
    sequence = first_sequence
    for field in fields:
        field = field if isinstance(field, Field) else Field(*field)
        h_max = _hour_angle_of_airmass(field.dec, max_airmass, cfg)
        hour_angles = np.linspace(-h_max, h_max, epochs_per_night) if epochs_per_night > 1 \
            else np.array([0.0])
        for k, ha in enumerate(hour_angles):
            filt = filters[k % len(filters)]
            time = time_at_hour_angle(field.ra, float(ha), night, cfg)
            specs.append(_spec(field, filt, time, _expid(night, sequence), cfg, rng, seed, progrmid))
            sequence += 1
    return sorted(specs, key=lambda s: s.obsmjd)


def exposure_at_airmass(cfg: Config, field: Field, airmass: float, night: str = "2026-03-15",
                        filt: str = "ZTF_r", expid: int | None = None, seed: int | None = None,
                        rising: bool = False, **overrides) -> ExposureSpec:
    """One exposure of ``field`` taken when its centre is at ``airmass`` (for tests and benches).

    ``overrides`` replace ExposureSpec fields (e.g. ``pointing_offset_arcsec``).
    """
    seed = cfg.simulation.seed if seed is None else seed
    time = time_at_airmass(field, airmass, night, cfg, rising=rising)
    expid = _expid(night, 90000 + int(round(airmass * 100))) if expid is None else expid
    rng = np.random.default_rng(np.random.SeedSequence([seed, expid]))
    spec = _spec(field, filt, time - 0.5 * cfg.instrument.exptime * u.s, expid, cfg, rng, seed, 1)
    return replace(spec, **overrides)



