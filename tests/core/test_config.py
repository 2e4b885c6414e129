"""Configuration: embedded defaults, TOML overrides, errors that name the key."""
from __future__ import annotations

import pytest

from pipeline.core.config import ConfigError, config_to_toml, load_config


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
