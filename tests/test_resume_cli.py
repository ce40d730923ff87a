"""`lorakit train RECIPE --resume [RUN_DIR]` in every form a user writes (issue 24), and what a resumed run may
change in its recipe. The forms are parsed in-process (lorakit.cli.main with training replaced by a spy); the
documented ones run for real in a subprocess, one of them extending a finished run to more steps, which must give
the uninterrupted run of that length."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import chat_rows, write_jsonl
from safetensors.torch import load_file
from test_quiet_cli import noise

from lorakit.recipe.loader import load_recipe
from lorakit.train.run_dir import INTERRUPTED, RunDir

ENV = {**os.environ, "CI": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _recipe_doc(base: Path, steps: int) -> dict:
    # a constant learning rate: a run extended from 4 to 6 steps then equals a 6-step run (lorakit.train.resume)
    return {"name": "r", "base_model": str(base), "quantization": {"bits": "none"},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
            "data": {"path": "train.jsonl", "max_length": 64},
            "train": {"max_steps": steps, "lr": 1e-3, "scheduler": "constant", "warmup_ratio": 0.0, "batch_size": 2,
                      "logging_steps": 1, "save_steps": 2, "seed": 0},
            "evaluate": {"metrics": []}, "output": {"dir": "runs/r"}}


def _folder(path: Path, base: Path, steps: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    write_jsonl(path / "train.jsonl", chat_rows(16))
    (path / "r.yaml").write_text(yaml.safe_dump(_recipe_doc(base, steps)))
    return path


def _train_in_process(folder: Path) -> RunDir:
    from lorakit.train.run import run_training

    cwd = os.getcwd()
    os.chdir(folder)
    try:
        run_training(load_recipe(folder / "r.yaml"))
    finally:
        os.chdir(cwd)
    return RunDir(folder / "runs" / "r")


def _losses(run: RunDir) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in run.read_metrics() if "loss" in m}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """A 6-step run, and a 4-step run of the same recipe (finished, with checkpoint-4)."""
    root = tmp_path_factory.mktemp("resume")
    six = _train_in_process(_folder(root / "six", tiny_model_dir, 6))
    four = _train_in_process(_folder(root / "four", tiny_model_dir, 4))
    assert (four.checkpoints_dir / "checkpoint-4").is_dir()
    return {"six": six, "four": root / "four", "base": tiny_model_dir}


def _copy(src: Path, dst: Path, *, interrupted: bool = False) -> Path:
    shutil.copytree(src, dst)
    if interrupted:  # as if stopped after checkpoint-4 of a 6-step run
        run = RunDir(dst / "runs" / "r")
        shutil.rmtree(run.adapter_dir)
        run.summary_file.unlink()
        run.set_state(INTERRUPTED, step=4)
        (dst / "r.yaml").write_text(yaml.safe_dump(_recipe_doc(yaml.safe_load((dst / "r.yaml").read_text())
                                                               ["base_model"], 6)))
    return dst


def _cli(folder: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "lorakit", *args], cwd=folder, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert not noise(done.stderr), noise(done.stderr)  # no library's log line, resumed or refused
    return done


# ---- the forms, parsed ------------------------------------------------------------------------------------

FORMS = [  # argv after `lorakit`, and what train gets as --resume (None: not resuming)
    (["train", "r.yaml", "--resume"], "latest"),
    (["train", "r.yaml", "--resume", "RUN"], "RUN"),
    (["train", "r.yaml", "--resume=RUN"], "RUN"),
    (["train", "--resume", "r.yaml"], "latest"),
    (["train", "--resume", "RUN", "r.yaml"], "RUN"),
    (["train", "r.yaml", "--resume", "--set", "train.max_steps=8"], "latest"),
    (["train", "r.yaml", "--set", "train.max_steps=8", "--resume"], "latest"),
    (["train", "r.yaml", "-s", "train.max_steps=8", "--resume", "RUN", "--json"], "RUN"),
    (["train", "r.yaml", "--resume", "--overwrite"], "latest"),
    (["train", "r.yaml", "--resume", "--json"], "latest"),
    (["--debug", "train", "r.yaml", "--resume"], "latest"),
    (["train", "r.yaml"], None),
]


@pytest.mark.parametrize("argv,want", FORMS, ids=[" ".join(a) for a, _ in FORMS])
def test_every_form_of_resume_parses(argv, want, tmp_path, monkeypatch):
    import lorakit.train.run
    from lorakit.cli import main

    (tmp_path / "RUN").mkdir()
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"base_model": "x", "data": {"path": "d.jsonl"}}))
    monkeypatch.chdir(tmp_path)
    seen = {}

    def spy(recipe, *, overwrite=False, resume=None, console=None, json_mode=False):
        seen.update(resume=resume, overwrite=overwrite, max_steps=recipe.train.max_steps, json=json_mode)
        return {}

    monkeypatch.setattr(lorakit.train.run, "run_training", spy)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert seen["resume"] == want
    assert seen["overwrite"] == ("--overwrite" in argv)
    assert seen["max_steps"] == (8 if any("max_steps=8" in a for a in argv) else None)


# ---- the forms, for real ----------------------------------------------------------------------------------


def test_extending_a_finished_run_equals_the_longer_run(runs, tmp_path):
    folder = _copy(runs["four"], tmp_path / "f")
    done = _cli(folder, "train", "r.yaml", "--resume", "--set", "train.max_steps=6", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["resumed"] and summary["steps"] == 6
    run, six = RunDir(folder / "runs" / "r"), runs["six"]
    assert run.state == "finished"
    got, want = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (run, six))
    assert got.keys() == want.keys()
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 1e-5
    assert _losses(run).keys() == _losses(six).keys() == set(range(1, 7))
    assert list(_losses(run).values()) == pytest.approx(list(_losses(six).values()), rel=1e-5)

    again = _cli(folder, "train", "r.yaml", "--resume", "--set", "train.max_steps=6")  # nothing left to do
    assert again.returncode == 2 and "already finished (6 steps" in again.stderr
    assert "--resume --set train.max_steps=12" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.parametrize("args", [["r.yaml", "--set", "train.logging_steps=2", "--resume"],
                                  ["--resume", "runs/r", "r.yaml"]], ids=["bare-after-set", "run-dir-first"])
def test_an_interrupted_run_resumes_from_the_shell(runs, tmp_path, args):
    folder = _copy(runs["four"], tmp_path / "i", interrupted=True)
    done = _cli(folder, "train", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout and "checkpoint-4" in done.stdout
    run = RunDir(folder / "runs" / "r")
    assert run.state == "finished" and json.loads(run.summary_file.read_text())["steps"] == 6


# ---- what a resumed run may change -------------------------------------------------------------------------


@pytest.mark.parametrize("override,field", [
    ("lora.r=8", "lora.r"), ("data.max_length=32", "data.max_length"), ("train.lr=0.01", "train.lr"),
    ("quantization.bits=8", "quantization.bits"), ("train.batch_size=4", "train.batch_size"),
])
def test_a_resume_that_changes_the_model_adapter_or_data_is_refused(runs, tmp_path, monkeypatch, override, field):
    from lorakit.cli import main

    folder = _copy(runs["four"], tmp_path / "c", interrupted=True)
    before = sorted(p.name for p in (folder / "runs" / "r").rglob("*"))
    monkeypatch.chdir(folder)
    with pytest.raises(SystemExit) as e:
        main(["train", "r.yaml", "--resume", "--set", override, "--json"])
    assert e.value.code == 2
    assert sorted(p.name for p in (folder / "runs" / "r").rglob("*")) == before  # nothing written


def test_resume_refusal_names_the_field(runs, tmp_path, monkeypatch, capsys):
    from lorakit.cli import main

    folder = _copy(runs["four"], tmp_path / "n", interrupted=True)
    monkeypatch.chdir(folder)
    with pytest.raises(SystemExit) as e:
        main(["train", "r.yaml", "--resume", "--set", "lora.r=8", "--set", "train.epochs=3", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert e.value.code == 2 and doc["field"] == "lora.r"
    problem = doc["problems"][0]
    assert problem["field"] == "lora.r"
    assert "lora.r: 4 -> 8" in problem["message"] and "epochs" not in problem["message"]  # epochs may change
    assert "train.max_steps" in doc["hint"]


def test_resume_with_overwrite_is_refused(runs, tmp_path):
    folder = _copy(runs["four"], tmp_path / "o", interrupted=True)
    done = _cli(folder, "train", "r.yaml", "--resume", "--overwrite")
    assert done.returncode == 2 and "pass one of them" in done.stderr and "Traceback" not in done.stderr
    assert RunDir(folder / "runs" / "r").state == INTERRUPTED
