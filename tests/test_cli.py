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
from lorakit.recipe.shipped import list_recipes

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


_HEAVY = ("torch", "transformers", "peft", "trl", "datasets")


def _heavy_modules_after(args: list[str]) -> list[str]:
    """Run `lorakit ARGS` in a fresh interpreter and list the heavy libraries it imported."""
    code = (f"import sys\nfrom lorakit.cli import app\ntry:\n    app({args!r})\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY=' + ','.join(m for m in {_HEAVY!r} if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "CI": "true"})
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("HEAVY=")]
    assert line, p.stdout + p.stderr
    return [m for m in line[-1][6:].split(",") if m]


def _torch_import_cpu() -> float:
    """CPU seconds this machine needs to import torch alone: the yardstick for "start-up imports no torch"."""
    return min(_timed([sys.executable, "-c", "import torch"])[0] for _ in range(2))


def test_cli_start_up_is_fast_and_imports_no_torch():
    """`lorakit --help` imports none of torch/transformers/peft/trl/datasets, so it costs a fraction of
    `import torch` on the same machine (CPU seconds of the child: unlike wall time, other jobs sharing the
    cores do not inflate them; a fixed bound in seconds failed on a slower CI machine)."""
    assert _heavy_modules_after(["--help"]) == []
    runs = [_timed([sys.executable, "-m", "lorakit", "--help"]) for _ in range(3)]
    cpu, wall = min(c for c, _ in runs), min(w for _, w in runs)
    torch_cpu = _torch_import_cpu()
    assert cpu < 0.5 * torch_cpu, f"lorakit --help used {cpu:.2f} CPU s; import torch alone {torch_cpu:.2f}"
    assert wall < 5.0, f"lorakit --help took {wall:.2f}s"


def test_validate_on_a_schema_problem_is_fast(tmp_path):
    """A schema error is reported before any heavy library is imported (no torch, no transformers)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: smollm2-135m-instruct\nlora: {r: 0}\n")
    p = subprocess.run([sys.executable, "-m", "lorakit", "validate", str(bad)], capture_output=True, text=True,
                       env={**os.environ, "CI": "true"})
    assert p.returncode == 2 and "lora.r" in p.stderr and "Traceback" not in p.stderr
    assert _heavy_modules_after(["validate", str(bad)]) == []
    cpu = min(_timed([sys.executable, "-m", "lorakit", "validate", str(bad)], check=False)[0] for _ in range(3))
    torch_cpu = _torch_import_cpu()
    assert cpu < 0.5 * torch_cpu, f"validate used {cpu:.2f} CPU s; import torch alone {torch_cpu:.2f}"


def _timed(cmd: list[str], check: bool = True) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one run of `cmd`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, capture_output=True, check=check, env={**os.environ, "CI": "true"})
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), wall


def test_list_recipes_function_matches_files():
    assert [n for n, _, _ in list_recipes()] == sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


def test_errors_print_paths_verbatim(tmp_path):
    """A path or value in an error is the user's text: `:smile:` stays as typed, not an emoji."""
    r = lorakit("merge", "--adapter", "no:smile:", "--out", str(tmp_path / "m"), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no:smile:" in r.stderr, r.stderr
