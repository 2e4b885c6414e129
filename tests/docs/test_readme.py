"""The README stays true: its set-up commands, the keyword contract and the command list."""
from __future__ import annotations

import re
from pathlib import Path

from pipeline.cli import build_parser
from pipeline.core.image import MASK_BITS, OPTIONAL_KEYWORDS, REQUIRED_KEYWORDS

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
CI = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()


def test_contract_table_matches_the_code():
    rows = dict(re.findall(r"^\| `([A-Z0-9]+)` \| \w+ \| (required|optional) \|", README, re.M))
    assert {k for k, v in rows.items() if v == "required"} == set(REQUIRED_KEYWORDS)
    assert {k for k, v in rows.items() if v == "optional"} == set(OPTIONAL_KEYWORDS)
    for name, value in MASK_BITS.items():
        assert re.search(rf"^\| {name} \| {value} \|", README, re.M), name


def test_ci_runs_the_readme_test_command():
    assert "bash bootstrap.sh test" in README and "bash bootstrap.sh demo" in README
    assert "exec bash bootstrap.sh test" in CI


def test_every_command_is_documented():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in commands:
        assert f"`skydiff {name}" in README, name
