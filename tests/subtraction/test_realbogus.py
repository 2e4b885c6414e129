"""The ``[realbogus]`` section picks the model the subtraction scores with."""
from __future__ import annotations

import pytest

from pipeline.core.config import RealBogusConfig, load_config
from pipeline.subtraction.realbogus import RealBogusError, load_default_model, load_model


def test_the_section_names_the_model_and_defaults_to_the_shipped_one(tmp_path):
    shipped = load_default_model()
    assert load_model(load_config().realbogus).to_json() == shipped.to_json()
    path = tmp_path / "rb.json"
    path.write_text(shipped.to_json().replace(shipped.version, "retrained-1"))
    cfg = load_config(overrides={"realbogus": {"model": str(path)}})
    assert load_model(cfg.realbogus).version == "retrained-1"
    with pytest.raises(RealBogusError, match="absent.json"):
        load_model(RealBogusConfig(model=str(tmp_path / "absent.json")))
