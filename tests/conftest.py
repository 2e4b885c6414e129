"""Shared test set-up.

Every test runs with outbound sockets blocked except loopback (pytest-socket, configured
in pyproject.toml's addopts); ``import pipeline`` gives this process private astropy
directories and switches off every astropy download.
"""
from __future__ import annotations

import pytest

import pipeline  # noqa: F401  (process hygiene first)
from pipeline.config import load_config

pytest_plugins = ["pytester"]


@pytest.fixture(scope="session")
def cfg():
    """The embedded default configuration."""
    return load_config()
