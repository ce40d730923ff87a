"""The command line, through typer's runner and through a real subprocess."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorakit import __version__
from lorakit.cli import app
from lorakit.shipped import list_recipes

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
BAD = "base_model: smollm2-135m-instruct\nlora: {r: 0, rnak: 2}\ndata: {path: d.jsonl}\n"


def lorakit(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 120):
    """Run the real console entry point in a subprocess (as a user or a CI script would)."""
    full_env = {**os.environ, "CI": "true", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=full_env, timeout=timeout)


def test_version_and_help():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"lorakit {__version__}"
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for command in ("train", "merge", "estimate", "validate", "init", "schema", "recipes", "generate"):
        assert command in r.output


def test_bad_recipe_subprocess_exit_2_no_traceback(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(BAD)
    p = lorakit("validate", str(recipe))
    assert p.returncode == 2
    assert "Traceback" not in p.stderr + p.stdout
    assert f"{recipe}:2:8  lora.r: Input should be greater than 0 (got 0)" in p.stderr
    assert f"{recipe}:2:14  lora.rnak: unknown key 'rnak'" in p.stderr
    assert "\x1b[" not in p.stderr  # CI mode: no colour codes


def test_validate_json_error_document(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(BAD)
    r = runner.invoke(app, ["validate", str(recipe), "--json"])
    assert r.exit_code == 2
    doc = json.loads(r.stdout)
    assert doc["ok"] is False and doc["exit_code"] == 2
    assert {p["field"] for p in doc["problems"]} == {"lora.r", "lora.rnak"}
    assert all(p["line"] == 2 for p in doc["problems"])


def test_set_override_error_is_reported(tmp_path):
    recipe = tmp_path / "ok.yaml"
    recipe.write_text("base_model: smollm2-135m-instruct\ndata: {path: d.jsonl}\n")
    r = runner.invoke(app, ["validate", str(recipe), "--schema-only", "--set", "train.lr=fast"])
    assert r.exit_code == 2 and "--set train.lr=fast  train.lr:" in r.output
    r = runner.invoke(app, ["validate", str(recipe), "--schema-only", "--set", "lora.r=8"])
    assert r.exit_code == 0 and "valid" in r.output


def test_missing_recipe_file():
    r = runner.invoke(app, ["validate", "does/not/exist.yaml"])
    assert r.exit_code == 2 and "recipe file not found" in r.output


def test_init_writes_a_valid_starter_and_never_clobbers(tmp_path):
    target = tmp_path / "mine.yaml"
    r = runner.invoke(app, ["init", str(target), "--preset", "cpu-smoke"])
    assert r.exit_code == 0 and target.read_text() == (ROOT / "recipes" / "cpu-smoke.yaml").read_text()
    target.write_text("# my edits\n")
    r = runner.invoke(app, ["init", str(target), "--preset", "cpu-smoke"])
    assert r.exit_code == 2 and "already exists" in r.output
    assert target.read_text() == "# my edits\n"
    r = runner.invoke(app, ["init", str(target), "--preset", "cpu-smok", "--force"])
    assert r.exit_code == 2 and "did you mean 'cpu-smoke'" in r.output


def test_schema_command(tmp_path):
    r = runner.invoke(app, ["schema"])
    assert r.exit_code == 0
    schema = json.loads(r.stdout)
    assert "lora" in schema["properties"]
    out = tmp_path / "schema.json"
    assert runner.invoke(app, ["schema", "--out", str(out)]).exit_code == 0
    assert json.loads(out.read_text()) == schema


def test_recipes_lists_every_shipped_recipe_with_a_description():
    r = runner.invoke(app, ["recipes", "--json"])
    assert r.exit_code == 0
    items = json.loads(r.stdout)
    names = {i["name"] for i in items}
    assert names == {p.stem for p in (ROOT / "recipes").glob("*.yaml")}
    assert {"quickstart", "qlora-llama-3.1-8b"} <= names
    assert all(i["description"] for i in items)


@pytest.mark.parametrize("name", [p.stem for p in sorted((ROOT / "recipes").glob("*.yaml"))])
def test_shipped_recipes_pass_schema(name):
    r = runner.invoke(app, ["validate", "--schema-only", str(ROOT / "recipes" / f"{name}.yaml")])
    assert r.exit_code == 0, r.output


def test_cli_start_up_is_fast_and_imports_no_torch():
    """`lorakit --help` and a schema-only validate answer in < 0.5 s: no torch/transformers/trl at start-up."""
    code = ("import sys, lorakit.cli, lorakit.recipe, lorakit.validate; "
            "print(sorted(m for m in ('torch','transformers','peft','trl','datasets') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert p.stdout.strip() == "[]"
    # CPU seconds of the child (user + system) measure the work start-up does, and unlike wall time they do
    # not grow when other jobs share the machine's two cores; wall time gets a looser, load-tolerant bound.
    runs = [_timed([sys.executable, "-m", "lorakit", "--help"]) for _ in range(3)]
    cpu, wall = min(c for c, _ in runs), min(w for _, w in runs)
    assert cpu < 0.5, f"lorakit --help used {cpu:.2f} CPU seconds"
    assert wall < 2.0, f"lorakit --help took {wall:.2f}s"


def test_validate_on_a_schema_problem_is_fast(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: smollm2-135m-instruct\nlora: {r: 0}\n")
    runs = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "lorakit", "validate", str(bad)], capture_output=True, text=True,
                           env={**os.environ, "CI": "true"})
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        runs.append((after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall))
        assert p.returncode == 2 and "lora.r" in p.stderr and "Traceback" not in p.stderr
    assert min(c for c, _ in runs) < 0.5 and min(w for _, w in runs) < 2.0, runs


def _timed(cmd: list[str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one run of `cmd`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=True, env={**os.environ, "CI": "true"})
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def test_list_recipes_function_matches_files():
    assert [n for n, _, _ in list_recipes()] == sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
