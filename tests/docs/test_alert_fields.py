"""docs/alert-fields.md lists every candidate field of the alert schema, once, and the
packet's null reasons and the candidates' flags it names exist."""
from __future__ import annotations

import re
from pathlib import Path

from alerts.packet import NULL_REASONS
from alerts.schema import schema_field_names
from pipeline.subtraction.candidates import CANDIDATE_FLAGS

ROOT = Path(__file__).resolve().parents[2]
TABLE = (ROOT / "docs" / "alert-fields.md").read_text()


def _rows() -> list[str]:
    return re.findall(r"^\| `([a-z0-9]+)` \|", TABLE, re.M)


def test_every_schema_candidate_field_is_in_the_table_once():
    rows = _rows()
    assert len(rows) == len(set(rows)), sorted({r for r in rows if rows.count(r) > 1})
    assert set(rows) == set(schema_field_names("candidate"))
    assert set(NULL_REASONS) <= set(rows)


def test_the_flags_the_table_names_exist():
    named = set(re.findall(r"flag `([A-Z_]+)`", TABLE)) | set(re.findall(r"\(`([A-Z_]+)`\)", TABLE))
    assert named and named <= set(CANDIDATE_FLAGS), named - set(CANDIDATE_FLAGS)


def test_the_readme_points_to_the_table():
    assert "docs/alert-fields.md" in (ROOT / "README.md").read_text()
