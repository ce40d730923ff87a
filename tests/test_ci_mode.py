"""CI mode (issue 9): no TTY or CI=true gives plain, parseable lines; --json documents; the example workflow.

- the switch: CI=true wins over a terminal, no terminal is plain on its own, a terminal without CI is not;
- `lorakit train --json` without a TTY: stdout is one JSON document, stderr plain `step=N/M loss=...` lines,
  no colour codes, no carriage returns, no spinner or bar characters;
- under a real pseudo-terminal, `CI=true` still prints no escape codes (and without it rich does);
- configs/ci/github-actions.yml: every command exists with the options it uses, its pins are the tested
  ones, and its data/validate/estimate steps run here as written.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import write_jsonl
from typer.testing import CliRunner

from lorakit.cli import app

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "configs" / "ci" / "github-actions.yml"
ANSI = re.compile(r"\x1b\[")
# carriage returns (redrawn lines), braille spinner frames, block/bar characters of rich and tqdm
REDRAWN = re.compile(r"[\r\u2800-\u28ff\u2580-\u259f\u2501\u2578-\u257f]")
STEP_LINE = re.compile(r"step=(\d+)/(\d+) loss=(\d+\.\d{4})(?: lr=\S+)? tok/s=(\d+|\?) eta=\S+")


def test_plain_output_switch(monkeypatch):
    from rich.console import Console

    from lorakit.train.progress import plain_output

    tty = Console(file=io.StringIO(), force_terminal=True)
    pipe = Console(file=io.StringIO(), force_terminal=False)
    monkeypatch.delenv("CI", raising=False)
    assert plain_output(tty) is False and plain_output(pipe) is True
    monkeypatch.setenv("CI", "true")
    assert plain_output(tty) is True and plain_output(pipe) is True
    monkeypatch.setenv("CI", "false")
    assert plain_output(tty) is False


@pytest.mark.parametrize("ci", ["true", None])
def test_progress_on_a_terminal(monkeypatch, tmp_path, ci):
    """On a terminal the progress is a rich bar, unless CI=true: then the same plain lines as in a pipe."""
    from rich.console import Console
    from transformers import TrainerControl, TrainerState

    from lorakit.train.progress import ProgressCallback

    if ci:
        monkeypatch.setenv("CI", ci)
    else:
        monkeypatch.delenv("CI", raising=False)
    buf = io.StringIO()
    cb = ProgressCallback(tmp_path / "m.jsonl", console=Console(file=buf, force_terminal=True, width=120))
    state = TrainerState(max_steps=2, global_step=0)
    cb.on_train_begin(None, state, TrainerControl())
    for step in (1, 2):
        state.global_step, state.num_input_tokens_seen = step, 100 * step
        cb.on_log(None, state, TrainerControl(), logs={"loss": 1.5, "learning_rate": 1e-4})
        cb.on_step_end(None, state, TrainerControl())
    cb.on_train_end(None, state, TrainerControl())
    out = buf.getvalue()
    if ci:
        assert not ANSI.search(out) and not REDRAWN.search(out), repr(out)
        assert [STEP_LINE.fullmatch(x) is not None for x in out.splitlines()] == [True, True]
    else:
        assert ANSI.search(out)  # the bar is drawn: the switch is what removes it


def test_train_json_without_a_tty_is_plain(tmp_path, monkeypatch, tiny_model_dir):
    """CliRunner's streams are not terminals and CI is unset: plain lines on stderr, one JSON on stdout."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.chdir(tmp_path)
    rows = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": str(i)}]}
            for i in range(8)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    doc = {"name": "ci", "base_model": str(tiny_model_dir), "quantization": {"bits": "none"},
           "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
           "data": {"path": "train.jsonl", "max_length": 32},
           "train": {"max_steps": 2, "batch_size": 2, "logging_steps": 1}, "output": {"dir": "runs/ci"}}
    (tmp_path / "ci.yaml").write_text(yaml.safe_dump(doc))
    r = CliRunner().invoke(app, ["train", "ci.yaml", "--json"])
    assert r.exit_code == 0, r.output[-3000:]
    summary = json.loads(r.stdout)  # exactly one document, nothing else on stdout
    assert summary["ok"] and summary["steps"] == 2 and summary["distributed"]["world_size"] == 1
    err = r.stderr
    assert not ANSI.search(err) and not REDRAWN.search(err), repr(err[-2000:])
    steps = [STEP_LINE.fullmatch(x) for x in err.splitlines() if x.startswith("step=")]
    assert [(m.group(1), m.group(2)) for m in steps] == [("1", "2"), ("2", "2")]
    assert all(float(m.group(3)) > 0 for m in steps)


def _under_pty(args: list[str], env: dict) -> str:
    """Run the console script with stdout and stderr on a pseudo-terminal; return what it wrote."""
    import pty

    out = bytearray()

    def read(fd):
        data = os.read(fd, 65536)
        out.extend(data)
        return data

    cmd = [sys.executable, "-m", "lorakit", *args]
    old = os.environ.copy()
    os.environ.clear()
    os.environ.update(env)
    try:
        status = pty.spawn(cmd, read)
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert os.waitstatus_to_exitcode(status) == 0, out.decode(errors="replace")[-2000:]
    return out.decode(errors="replace")


def test_ci_true_on_a_real_terminal_prints_no_escape_codes():
    recipe = str(ROOT / "recipes" / "qlora-llama-3.1-8b.yaml")
    base = {k: v for k, v in os.environ.items() if k not in ("CI", "NO_COLOR", "FORCE_COLOR", "TERM")}
    base["TERM"] = "xterm-256color"
    coloured = _under_pty(["estimate", recipe, "--gpu", "rtx4090"], base)
    plain = _under_pty(["estimate", recipe, "--gpu", "rtx4090"], {**base, "CI": "true"})
    assert ANSI.search(coloured)  # a terminal gets rich's styling...
    assert not ANSI.search(plain) and "fits on rtx4090" in plain  # ...unless CI=true


@pytest.mark.slow
def test_first_demo_conversion_prints_no_progress_bar_in_ci(tmp_path):
    """The first use of the demo alias converts its GGUF (transformers draws a tqdm bar for that); in CI
    mode the CLI turns tqdm's own switch off, so stderr holds no bar. ~35 s: a fresh cache converts."""
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "recipe.yaml").write_text(yaml.safe_dump({"base_model": "smollm2-135m-instruct",
                                                     "data": {"path": "train.jsonl"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_") and k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    env.update(CI="true", HF_HUB_OFFLINE="1", LORAKIT_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-m", "lorakit", "generate", str(run), "--prompt", "hi", "--base-only",
                        "--max-new-tokens", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "cache" / "models" / "smollm2-135m-instruct" / "config.json").is_file()  # it converted
    assert "converting the demo model" in p.stderr
    assert "GGUF tensors" not in p.stderr and "it/s" not in p.stderr, p.stderr[-2000:]
    assert not REDRAWN.search(p.stderr) and not ANSI.search(p.stderr), repr(p.stderr[-2000:])


# ---------------------------------------------------------------------------------------------------
# The example CI workflow
# ---------------------------------------------------------------------------------------------------


def _steps() -> dict[str, str]:
    doc = yaml.safe_load(WORKFLOW.read_text())
    (job,) = doc["jobs"].values()
    assert job["env"]["CI"] == "true"
    return {s["name"]: s["run"] for s in job["steps"] if "run" in s}


def _commands(script: str) -> list[list[str]]:
    """The simple commands of a step (loops and `||` groups split apart), as argument lists."""
    text = script.replace("\\\n", " ")
    out = []
    for piece in re.split(r";|\|\||&&|\n|\{|\}|\bdo\b|\bdone\b", text):
        piece = piece.strip()
        if not piece or piece.startswith(("for ", "#")):
            continue
        words = shlex.split(piece.split(">")[0])
        if words and words[0] not in ("exit", "cat"):
            out.append(words)
    return out


def test_workflow_commands_exist_with_their_options():
    import typer.main

    click_app = typer.main.get_command(app)
    steps = _steps()
    assert {"validate recipes", "memory estimates", "two-step smoke training on CPU"} <= set(steps)
    seen = set()
    for script in steps.values():
        for words in _commands(script):
            if words[0] == "lorakit":
                cmd = click_app.commands[words[1]]  # KeyError: no such command
                opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
                for w in words[2:]:
                    if w.startswith("--"):
                        assert w.split("=")[0] in opts, f"lorakit {words[1]} has no option {w}"
                    elif w.endswith(".yaml") and "$" not in w:
                        assert (ROOT / w).is_file(), w
                seen.add(words[1])
            elif words[0] == "python":
                assert (ROOT / words[1]).is_file(), words
            elif words[0] == "pip":
                pins = [w for w in words if "==" in w]
                for pin in pins:  # the pins are those of the Makefile (and constraints.txt)
                    assert pin in (ROOT / "Makefile").read_text(), pin
                if "-c" in words:
                    assert (ROOT / words[words.index("-c") + 1]).is_file()
    assert {"validate", "estimate", "train"} <= seen
    assert all("--json" in steps[s] for s in ("validate recipes", "memory estimates", "two-step smoke training on CPU"))


def test_workflow_smoke_recipe_trains_two_steps_on_cpu_from_the_generated_data():
    from lorakit.recipe.loader import load_recipe

    steps = _steps()
    (train,) = [w for w in _commands(steps["two-step smoke training on CPU"]) if w[:2] == ["lorakit", "train"]]
    recipe = load_recipe(ROOT / train[2])
    assert recipe.train.max_steps == 2 and recipe.quantization.bits in ("none", None)
    generated = [w[w.index("--out") + 1] for w in _commands(steps["generate the recipes' local data"])]
    assert any(recipe.data.path.startswith(out + "/") for out in generated)


def test_workflow_data_validate_and_estimate_steps_run_here(tmp_path):
    """The steps as written, in bash, in a copy of the repository (the installed lorakit on PATH)."""
    for name in ("recipes", "scripts"):
        shutil.copytree(ROOT / name, tmp_path / name)
    steps = _steps()
    env = {**os.environ, "CI": "true", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for name in ("generate the recipes' local data", "validate recipes", "memory estimates"):
        p = subprocess.run(["bash", "-euo", "pipefail", "-c", steps[name]], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, f"{name}: {p.stdout[-2000:]}{p.stderr[-2000:]}"
    recipes = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    for r in recipes:
        assert json.loads((tmp_path / f"validate-{r}.json").read_text())["ok"] is True
        assert json.loads((tmp_path / f"estimate-{r}.json").read_text())["memory"]["peak_bytes"] > 0
    assert json.loads(p.stdout)["strategy"]["name"] == "fsdp"  # the per-GPU estimate printed last


def test_library_warnings_nobody_can_act_on_are_off():
    """bitsandbytes' missing-`kernels` warning (CPUs with AVX512-BF16) and liger-kernel's optional-backend
    lines are logged below ERROR once lorakit quiets the libraries; errors still get through."""
    import logging

    from lorakit.runtime.quiet import quiet_libraries

    quiet_libraries()
    for name in ("bitsandbytes.backends.cpu.ops", "liger_kernel.ops.backends"):
        log = logging.getLogger(name)
        assert not log.isEnabledFor(logging.WARNING) and log.isEnabledFor(logging.ERROR)
