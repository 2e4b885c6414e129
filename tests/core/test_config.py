"""Configuration: embedded defaults, TOML overrides, errors that name the key."""
from __future__ import annotations

import dataclasses
import re
from tomllib import loads as tomllib_loads

import pytest

from pipeline.core.config import (CharacterizeConfig, Config, ConfigError, ExtractionConfig, PriorFitSettings,
                                  ReferenceConfig, RegistrationConfig, SubtractionConfig, ZogyConfig,
                                  config_to_toml, load_config)


def test_defaults_describe_a_ztf_like_camera(cfg):
    inst = cfg.instrument
    assert (inst.n_ccd_x * inst.n_ccd_y, inst.n_quadrants) == (16, 64)
    assert (inst.quadrant_nx, inst.quadrant_ny) == (3072, 3080)
    assert 1.0 < inst.pixel_scale_arcsec < 1.02
    assert set(inst.filters) == {"ZTF_g", "ZTF_r", "ZTF_i"}
    assert cfg.site.name == "Palomar" and abs(cfg.site.latitude_deg - 33.36) < 0.01
    assert cfg.kafka.bootstrap_servers == ""   # spool by default


def test_file_overrides_only_what_it_sets(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[site]\npressure_hpa = 800\n[instrument.filters.ZTF_g]\nzeropoint = 26.0\n'
                    '[paths]\nroot = "/data"\n')
    cfg = load_config(path)
    assert cfg.site.pressure_hpa == 800.0 and isinstance(cfg.site.pressure_hpa, float)
    assert cfg.site.temperature_c == load_config().site.temperature_c
    assert cfg.instrument.filters["ZTF_g"].zeropoint == 26.0
    assert cfg.instrument.filters["ZTF_r"] == load_config().instrument.filters["ZTF_r"]
    assert str(cfg.paths.resolve("spool")) == "/data/spool"


@pytest.mark.parametrize("text, words", [
    ("[site]\npresure_hpa = 800\n", "site.presure_hpa"),
    ("[nosuch]\nx = 1\n", "nosuch"),
    ("[site]\npressure_hpa = 'high'\n", "site.pressure_hpa"),
    ("[site\n", "not valid TOML"),
])
def test_bad_files_name_the_problem(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        load_config(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_effective_config_round_trips(tmp_path, cfg):
    path = tmp_path / "full.toml"
    path.write_text(config_to_toml(cfg))
    assert load_config(path) == cfg


def test_password_never_printed():
    cfg = load_config(overrides={"kafka": {"sasl_password": "s3cret"}})
    assert "s3cret" not in config_to_toml(cfg)


def test_every_stage_section_is_in_the_tree_and_printed(cfg):
    printed = tomllib_loads(config_to_toml(cfg))
    assert set(printed) == {f.name for f in dataclasses.fields(Config)}
    for section in ("extraction", "characterize", "registration", "astrometry", "reference",
                    "subtraction", "realbogus", "priors"):
        assert section in printed
    assert {"psf", "photometry", "photcal"} <= set(printed["characterize"])
    assert {"zogy", "candidates"} <= set(printed["subtraction"])
    # Shared sections are printed once, in their own place.
    assert "extraction" not in printed["characterize"]
    assert "characterize" not in printed["subtraction"] and "registration" not in printed["reference"]


def test_section_defaults_are_the_stages_defaults(cfg):
    """One default per setting: the tree's sections equal the stage classes' own defaults,
    the values production used before the tree held them."""
    assert cfg.extraction == ExtractionConfig() and cfg.characterize == CharacterizeConfig()
    assert cfg.registration == RegistrationConfig() and cfg.reference == ReferenceConfig()
    assert cfg.subtraction == SubtractionConfig() and cfg.priors == PriorFitSettings()
    assert cfg.subtraction.zogy.psf_error == 0.02 == ZogyConfig().psf_error
    # SCAMP as the quadrant runner ran it: the [astrometry] values, SCAMP's own defaults beside.
    acfg = cfg.astrometry
    assert (acfg.match_nmax, acfg.match_resol_arcsec, acfg.position_maxerr_arcmin) == (500, 2.0, 1.5)
    assert (acfg.posangle_maxerr_deg, acfg.pixscale_maxerr, acfg.distort_degree, acfg.flags_mask) == \
        (0.5, 1.02, 4, 0x1FF)
    assert acfg.scamp_max_sources == 2000
    assert acfg.scamp_max_reference == 15000
    assert acfg.calibration_sources == 2000
    assert acfg.calibration_detect_thresh == 8.0 and acfg.calibration_min_detections == 500
    assert cfg.realbogus.model == ""


def test_shared_sections_reach_every_stage(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[extraction]\ndetect_thresh = 3\naperture_radii = [2, 5]\n"
                    "[characterize.psf]\nmax_stars = 100\n[registration]\norder = 1\n"
                    "[subtraction.zogy]\nmask_grow = 6\n[subtraction.candidates]\nthreshold = 6.5\n")
    cfg = load_config(path)
    assert cfg.extraction.aperture_radii == (2.0, 5.0)
    for characterize in (cfg.characterize, cfg.subtraction.characterize, cfg.reference.characterize):
        assert characterize.extraction.detect_thresh == 3.0 and characterize.psf.max_stars == 100
    assert cfg.subtraction.registration.order == 1 == cfg.reference.registration.order
    assert cfg.subtraction.zogy.mask_grow == 6 and cfg.subtraction.candidates.threshold == 6.5
    assert load_config(overrides=tomllib_loads(config_to_toml(cfg))) == cfg
    changed = cfg.replace(extraction__detect_thresh=4.0)
    assert changed.subtraction.characterize.extraction.detect_thresh == 4.0
    assert changed.reference.characterize.extraction.detect_thresh == 4.0


@pytest.mark.parametrize("text, words", [
    ("[subtraction.candidates]\nbox = 4\n", "subtraction.candidates: box must be odd"),
    ("[subtraction.zogy]\npsf_error = 1.5\n", "subtraction.zogy: psf_error"),
    ("[reference]\nmin_frames = 50\n", "reference: 1 <= min_frames <= max_frames"),
    ("[astrometry]\nfocdistort_degree = 1\n", "astrometry: focdistort_degree"),
    ("[extraction]\naperture_radii = 3.0\n", "extraction.aperture_radii: expected an array"),
    ("[extraction]\naperture_radii = [2, 'x']\n", "extraction.aperture_radii[1]: expected float"),
    ("[astrometry]\nsn_thresholds = [10]\n", "astrometry.sn_thresholds: expected an array of 2"),
    ("[subtraction.zogy]\nmask_grow = 2.5\n", "subtraction.zogy.mask_grow: expected int"),
    ("[subtraction.characterize.psf]\nmax_stars = 5\n", "subtraction.characterize (set in [characterize])"),
    ("[characterize.extraction]\nminarea = 3\n", "characterize.extraction (set in [extraction])"),
    ("[subtraction]\ntreshold = 5\n", "subtraction.treshold"),
    ("[astrometry]\nmax_rms_mas = -5\n", "astrometry: max_rms_mas must be positive, got -5.0"),
    ("[astrometry]\npixscale_maxerr = 0.9\n", "pixscale_maxerr is a factor > 1"),
    ("[astrometry]\nscamp_max_sources = 10\n",
     "astrometry: scamp_max_sources must be 0 (every detection) or at least min_detections (30), got 10"),
    ("[astrometry]\nscamp_max_sources = -1\n", "astrometry: scamp_max_sources must be 0"),
    ("[astrometry]\nscamp_max_reference = 10\n",
     "astrometry: scamp_max_reference must be 0 (every Gaia row) or at least min_matched (30), got 10"),
    ("[astrometry]\ncalibration_sources = 1500\n",
     "astrometry: calibration_sources must be 0 (every detection) or at least 2000 (min_detections, "
     "min_matched and scamp_max_sources), got 1500"),
    ("[astrometry]\ncalibration_detect_thresh = -1.0\n",
     "astrometry: calibration_detect_thresh must be 0 (the extraction's threshold) or a positive number of sigma"),
    ("[astrometry]\ncalibration_min_detections = -5\n", "astrometry: calibration_min_detections must be >= 0"),
    ("[astrometry]\nscamp_max_sources = 3000.5\n", "astrometry.scamp_max_sources: expected int"),
    ("[kafka]\nbootstrap_servers = 'localhost'\n", "bootstrap_servers: 'localhost' is not host:port"),
    ("[kafka]\nbootstrap_servers = 'a:1,b:99999'\n", "'b:99999' is not host:port"),
])
def test_bad_stage_settings_name_the_key(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(path)


def test_unknown_keys_name_the_file_and_the_likely_key(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text("[astrometry]\nmax_rms_mass = 100\n[site]\nzzz = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: unknown configuration key(s): astrometry.max_rms_mass")
    assert "did you mean 'max_rms_mas'?" in message
    path.write_text("[site]\nzzz = 1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: unknown configuration key(s): site.zzz")) as info:
        load_config(path)
    assert "did you mean" not in str(info.value)


def test_sky_presets_set_the_counts_and_refuse_custom_densities_beside_them():
    plane = load_config(overrides={"simulation": {"sky_preset": "plane"}}).simulation
    assert plane.sky_counts().stars_per_deg2 == 60_000.0
    custom = load_config().simulation.sky_counts()
    assert (custom.stars_per_deg2, custom.slope_bright, custom.slope_faint) == (5000.0, 0.3, 0.3)
    with pytest.raises(ConfigError, match=r"simulation\.star_density_per_deg2"):
        load_config(overrides={"simulation": {"sky_preset": "plane", "star_density_per_deg2": 100.0}})
    with pytest.raises(ConfigError, match="high-latitude, mid-latitude, plane"):
        load_config(overrides={"simulation": {"sky_preset": "galactic-plane"}})
