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


def _commands_table() -> list[str]:
    """The first cell of every row of the README's commands table."""
    section = README.split("\n## Commands\n", 1)[1].split("\n### Exit statuses", 1)[0]
    return re.findall(r"^\| `(skydiff [^`]+)` \|", section, re.M)


def _sub_commands(parser) -> dict:
    """Every leaf command of the parser, ``"alerts show"`` etc., with its (sub)parser."""
    import argparse
    leaves = {}
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in commands.items():
        actions = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        if actions:
            for action, leaf in actions[0].choices.items():
                leaves[f"{name} {action}"] = leaf
        else:
            leaves[name] = sub
    return leaves


def test_commands_table_lists_every_command_with_real_options():
    """The commands table against the parser: every command and sub-command has its row, every
    row names a real command, and every option a row shows exists (so the table cannot drift)."""
    leaves = _sub_commands(build_parser())
    rows = _commands_table()
    documented = {}
    for row in rows:
        words = row.split()
        key = " ".join(words[1:3]) if " ".join(words[1:3]) in leaves else words[1]
        assert key in leaves, f"README row `{row}` names no command of the parser"
        documented[key] = row
    assert set(leaves) == set(documented), f"missing from the README's commands table: {set(leaves) - set(documented)}"
    for key, row in documented.items():
        options = {o for a in leaves[key]._actions for o in a.option_strings}
        for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", row):
            assert option in options, f"README row `{row}`: {option} is not an option of skydiff {key}"


def test_readme_names_references_as_the_code_does():
    from pipeline.reference.files import reference_filename
    example = reference_filename(600, 6, 2, "ZTF_r")
    assert example in README and "ref_f<field:06d>_c<ccd:02d>_q<qid>_<filter>.fits" in README
    assert "land later" not in README


def test_catalogs_command_choices_are_the_catalogue_kinds():
    """The catalogs command lists its choices without loading the catalogue package (fast --help)."""
    from catalogs import CATALOG_KINDS, DEFAULT_NSIDE, GAIA, PS1
    from pipeline.commands.catalogs import STORE_PATH_KEY
    assert sorted(STORE_PATH_KEY) == sorted(CATALOG_KINDS) and DEFAULT_NSIDE == 64
    assert (GAIA.tap_table, PS1.tap_table) == ("gaiadr3.gaia_source", "dbo.MeanObjectView")


def test_readme_describes_the_shipped_real_bogus_model():
    """One description of the real-bogus model, the one its training record gives."""
    from pipeline.subtraction.realbogus import load_default_model
    model = load_default_model()
    training = model.training
    words = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
    assert f"**Real-bogus.** A random forest ({training['n_trees']} trees) over {len(model.features)} features" in README
    assert (f"trained with scikit-learn on {training['images']} simulated pairs "
            f"({words[len(training['plan']['quadrants'])]} quadrants") in " ".join(README.split())
    assert "logistic regression" not in README.lower()


def test_survey_walk_is_real_commands():
    """Every command of the README's walk from a survey's images to nightly running parses with
    the command-line parser (its options and arguments exist), and the walk covers the steps."""
    import shlex
    section = README.split("\n## From a survey's own images to nightly running\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    parser = build_parser()
    seen = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if not words or words[0] != "skydiff":
            continue
        args = parser.parse_args(words[1:])      # argparse exits (a failed test) on a bad line
        seen.append(" ".join(words[1:3]) if hasattr(args, f"{words[1]}_command") or words[1] in
                    ("catalogs", "solarsystem", "priors", "reference", "matchfile", "alerts") else words[1])
    for step in ("init", "catalogs prefetch", "solarsystem ingest", "exposure", "priors build", "reference build",
                 "matchfile seed", "solarsystem prepare", "watch", "submit", "lightcurve"):
        assert step in seen, step
