"""Shared test set-up.

Every test runs with outbound sockets blocked except loopback (pytest-socket, configured
in pyproject.toml's addopts); ``import pipeline`` gives this process private astropy
directories and switches off every astropy download.  Tests of the PostgreSQL history share
one real server on loopback per session (the ``postgres`` fixture, pipeline/bench/postgres.py).

The fake TAP services (tests/catalogs) write VOTables with astropy, whose C TABLEDATA
writer (``astropy.io.votable.tablewriter``) writes its row terminator one byte past its
buffer whenever a row's text ends exactly at the buffer's power-of-two size (astropy issue
20419, open for astropy 8.0).  The byte lands in the next heap block and the process dies
much later, in whatever code next walks that memory (the cycle collector, most often): the
suite's rare segmentation faults.  Every test process therefore writes TABLEDATA through
astropy's own Python writer.  skydiff itself never writes VOTables with astropy (the
light-curve service's VOTABLE answer has its own writer).
"""
from __future__ import annotations

import pytest

import pipeline  # noqa: F401  (process hygiene first)
from astropy.io.votable import tree as _votable_tree
from pipeline.core.config import load_config

if not hasattr(_votable_tree, "_has_c_tabledata_writer"):
    raise RuntimeError("astropy.io.votable.tree no longer has _has_c_tabledata_writer: check whether its C "
                       "TABLEDATA writer's off-by-one (astropy issue 20419) is fixed and update tests/conftest.py")
_votable_tree._has_c_tabledata_writer = False

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


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server on loopback (pipeline/bench/postgres.py), shared by the session and
    stopped at its end; ``postgres.new_database()`` gives a test an empty database's URL."""
    from pipeline.bench.postgres import PostgresServer
    server = PostgresServer().start()
    yield server
    server.stop()
