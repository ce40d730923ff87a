"""The hand-written corpus of bad inputs (tests/bad_inputs/): recipes, data files, model directories and
reward functions. Each recipe in tests/bad_inputs/recipes is rejected by the CLI with its exit code, no
traceback, and a problem naming the expected field (with its line when the field is written in the
file) and a message containing the expected words.

A case says what it expects in its leading comment lines:

    # expect: FIELD | WORDS     the field the problem is about ('' for none) and words of its message
    # run: train                the command (default: validate); train cases load the model and data
    # exit: 1                   the exit code (default: 2, bad input)
    # base: tiny                train on the tiny test model (base_model is replaced through --set)
    # xfail: REASON             a known gap, not fixed yet (strict: the case fails once it is fixed)

Paths in the cases are relative to tests/bad_inputs/recipes (the harness runs there); a train case
writes its run directory under a temporary directory.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorakit.cli import app

HERE = Path(__file__).parent / "bad_inputs" / "recipes"
CORPUS = sorted(HERE.glob("*.yaml"))


def header(path: Path) -> dict[str, str]:
    """The `# key: value` lines at the top of a case."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.startswith("#"):
            break
        key, sep, value = line[1:].partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def expectation(path: Path) -> tuple[str, str]:
    field, _, words = header(path)["expect"].partition("|")
    return field.strip(), words.strip()


def test_corpus_is_large_enough_and_covers_every_kind_of_input():
    assert len(CORPUS) >= 40
    kinds = {}
    for p in CORPUS:
        stem = p.stem.split("-", 1)[1]
        kind = stem.split("-")[0] if stem.split("-")[0] in ("data", "model", "reward", "metric") else "recipe"
        kinds[kind] = kinds.get(kind, 0) + 1
    assert kinds["recipe"] >= 30 and kinds["data"] >= 10 and kinds["model"] >= 6
    assert kinds["reward"] + kinds["metric"] >= 8
    runs = {header(p).get("run", "validate") for p in CORPUS}
    assert runs == {"validate", "train"}  # both the offline checks and the real loaders are exercised
    assert any(header(p).get("exit") == "1" for p in CORPUS)  # runtime failures of user code too


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_bad_input_is_rejected_cleanly(path, request, tmp_path, monkeypatch):
    h = header(path)
    if "xfail" in h:
        request.applymarker(pytest.mark.xfail(reason=h["xfail"], strict=True))
    field, words = expectation(path)
    command = h.get("run", "validate")
    code = int(h.get("exit", "2"))
    args = [command, str(path), "--json"]
    if h.get("base") == "tiny":
        args += ["--set", f"base_model={request.getfixturevalue('tiny_model_dir')}"]
    run_dir = tmp_path / "run"
    if command == "train":
        args += ["--set", f"output.dir={run_dir}"]
    monkeypatch.chdir(HERE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(app, args)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # nothing left behind
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["exit_code"] == code
    problems = doc["problems"] or [{"field": doc.get("field") or "", "message": doc["error"], "line": None,
                                    "file": None}]
    matching = [p for p in problems if (p["field"] or "") == field]
    assert matching, f"no problem for field {field!r}: {problems}"
    assert any(words in p["message"] for p in matching), matching
    key = field.split(".")[-1]
    if field and not key.isdigit() and f"{key}:" in path.read_text():  # the field is written in the file
        assert all(p["line"] for p in matching if p["file"] == str(path)), matching

    if command == "train" and code == 2:  # bad input is caught before a run directory is written
        assert not run_dir.exists(), sorted(p.name for p in run_dir.iterdir())
    elif command == "train":  # a runtime failure leaves a run marked failed, with the reason
        state = json.loads((run_dir / "state.json").read_text())
        assert state["state"] == "failed" and words in state["error"]
        assert not (run_dir / "adapter").exists() and not (run_dir / "summary.json").exists()
