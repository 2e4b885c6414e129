"""Shared test set-up.

Every test runs with outbound sockets blocked except loopback (pytest-socket, configured
in pyproject.toml's addopts); ``import pipeline`` gives this process private astropy
directories and switches off every astropy download.
"""
from __future__ import annotations

import pytest

import pipeline  # noqa: F401  (process hygiene first)
from pipeline.core.config import load_config

pytest_plugins = ["pytester"]


@pytest.fixture(scope="session")
def cfg():
    """The embedded default configuration."""
    return load_config()


@pytest.fixture(scope="session")
def survey21(tmp_path_factory):
    """The simulated survey of quadrant 21 (tests/_survey.py), built once per session."""
    from _survey import build_survey
    return build_survey(tmp_path_factory.mktemp("survey21"))
