"""The hand-written corpus of bad recipes (tests/bad_inputs/recipes): each one is rejected by
`lorakit validate` with exit code 2, no traceback, and a problem naming the expected field, its line,
and a message containing the expected words (from the file's `# expect: FIELD | WORDS` header)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorakit.cli import app

CORPUS = sorted((Path(__file__).parent / "bad_inputs" / "recipes").glob("*.yaml"))


def expectation(path: Path) -> tuple[str, str]:
    first = path.read_text().splitlines()[0]
    field, _, words = first.removeprefix("# expect:").partition("|")
    return field.strip(), words.strip()


def test_corpus_is_large_enough():
    assert len(CORPUS) >= 40


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_bad_recipe_is_rejected_cleanly(path):
    field, words = expectation(path)
    result = CliRunner().invoke(app, ["validate", str(path), "--json"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is False
    problems = doc["problems"] or [{"field": doc.get("field") or "", "message": doc["error"], "line": None, "file": None}]
    matching = [p for p in problems if p["field"] == field]
    assert matching, f"no problem for field {field!r}: {problems}"
    assert any(words in p["message"] for p in matching), matching
    key = field.split(".")[-1]
    if field and not key.isdigit() and f"{key}:" in path.read_text():  # the field is written in the file
        assert all(p["line"] for p in matching if p["file"] == str(path)), matching
