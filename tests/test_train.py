"""train.py / run_dir.py / progress.py on a tiny random model: artifacts, refusal to overwrite, output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from lorakit.errors import LorakitError
from lorakit.recipe.loader import load_recipe


def make_recipe(dir_: Path, base: Path, name: str = "tiny", **sections):
    doc = {
        "name": name, "base_model": str(base),
        "quantization": {"bits": "none"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
        "data": {"path": "train.jsonl", "eval": "eval.jsonl", "max_length": 64},
        "train": {"max_steps": 3, "lr": 1e-3, "warmup_ratio": 0.0, "batch_size": 4, "logging_steps": 1, "seed": 0},
        "evaluate": {"metrics": [{"fn": "json_match"}], "samples": 4, "max_new_tokens": 8},
        "output": {"dir": f"runs/{name}"},
    }
    for key, value in sections.items():
        doc[key] = {**doc[key], **value} if isinstance(value, dict) and isinstance(doc.get(key), dict) else value
    path = dir_ / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return load_recipe(path)


SUMMARY_KEYS = {"loss", "eval_loss", "task_metrics", "tokens", "tokens_per_s", "wall_seconds", "train_seconds",
                "peak_memory", "versions", "device", "params", "data", "steps", "state"}


def test_end_to_end_writes_every_artifact(workdir, tiny_model_dir):
    from lorakit.train.run import run_training

    recipe = make_recipe(workdir, tiny_model_dir)
    summary = run_training(recipe)
    run = workdir / "runs" / "tiny"

    # adapter: plain peft format, matching the recipe, with the tokenizer
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (4, 8, ["q_proj", "v_proj"])
    assert (run / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert (run / "adapter" / "tokenizer_config.json").is_file()
    assert not (run / "adapter.tmp").exists()

    # resolved recipe: every default written out, and it loads back to the same recipe
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["train"]["scheduler"] == "cosine" and resolved["lora"]["rslora"] is False
    assert load_recipe(run / "recipe.yaml").model_dump() == recipe.model_dump()

    # metrics.jsonl: one JSON object per log event, with the train loss of every step
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3]
    assert any("eval_loss" in x for x in lines)

    # summary
    on_disk = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(on_disk)
    assert on_disk["steps"] == 3 and on_disk["state"] == "finished"
    assert on_disk["loss"]["first"] > 0 and on_disk["eval_loss"]["before"] > 0 and on_disk["eval_loss"]["after"] > 0
    assert on_disk["tokens"] > 0 and on_disk["tokens_per_s"] > 0
    assert set(on_disk["task_metrics"]["after"]) == {"json_match"}
    assert on_disk["params"]["trainable"] == 2 * 4 * ((64 + 64) + (64 + 32))
    assert on_disk["versions"]["torch"] and on_disk["versions"]["peft"]
    assert summary["eval_loss"] == on_disk["eval_loss"]

    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = json.loads((run / "state.json").read_text())
    assert state["state"] == "finished" and state["finished"] >= state["started"]


def test_refuses_to_overwrite_and_overwrite_replaces(workdir, tiny_model_dir):
    from lorakit.train.run import run_training

    recipe = make_recipe(workdir, tiny_model_dir, train={"max_steps": 1}, evaluate={"metrics": []})
    run_training(recipe)
    run = workdir / "runs" / "tiny"
    first = (run / "summary.json").read_text()
    with pytest.raises(LorakitError, match="never overwritten") as e:
        run_training(recipe)
    assert "--overwrite" in e.value.hint
    assert (run / "summary.json").read_text() == first

    # --overwrite with an invalid recipe: the old run stays untouched
    bad = make_recipe(workdir, tiny_model_dir, lora={"targets": ["nope"]}, evaluate={"metrics": []})
    with pytest.raises(LorakitError, match="nope"):
        run_training(bad, overwrite=True)
    assert (run / "summary.json").read_text() == first

    summary = run_training(make_recipe(workdir, tiny_model_dir, train={"max_steps": 2}, evaluate={"metrics": []}),
                           overwrite=True)
    assert summary["steps"] == 2
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def test_four_bit_run(workdir, tiny_model_dir):
    from lorakit.train.run import run_training

    recipe = make_recipe(workdir, tiny_model_dir, name="q4", quantization={"bits": 4},
                         train={"max_steps": 2}, evaluate={"metrics": []})
    summary = run_training(recipe)
    assert summary["options"]["bits"] == 4 and summary["steps"] == 2
    assert (workdir / "runs" / "q4" / "adapter" / "adapter_model.safetensors").is_file()


def test_fp16_on_cpu_is_an_input_error(workdir, tiny_model_dir):
    from lorakit.train.run import run_training

    recipe = make_recipe(workdir, tiny_model_dir, train={"precision": "fp16"})
    with pytest.raises(LorakitError, match="CUDA") as e:
        run_training(recipe)
    assert e.value.exit_code == 2
    assert not (workdir / "runs" / "tiny").exists()


# ---- run_dir -------------------------------------------------------------------------------------


def test_staged_dir_is_atomic(tmp_path):
    from lorakit.train.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    with run.staged_dir(run.adapter_dir) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (run.adapter_dir / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with run.staged_dir(run.adapter_dir) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (run.adapter_dir / "a.txt").read_text() == "one"
    assert sorted(p.name for p in run.path.iterdir()) == ["adapter"]


def test_state_and_resume_rules(tmp_path):
    from lorakit.train.run_dir import FINISHED, INTERRUPTED, RunDir

    run = RunDir(tmp_path / "run")
    run.check_new(overwrite=False)  # nothing there yet
    run.begin("name: x\n")
    assert run.state == "running" and run.read_state()["pid"]
    run.set_state(INTERRUPTED, step=4)
    with pytest.raises(LorakitError, match="interrupted run") as e:
        run.check_new(overwrite=False)
    assert "--resume" in e.value.hint
    run.check_resumable()
    run.set_state(FINISHED)
    with pytest.raises(LorakitError, match="already finished"):
        run.check_resumable()
    run.check_new(overwrite=True)
    run.replace_old()
    assert not run.path.exists()


def test_truncate_metrics_for_resume(tmp_path):
    from lorakit.train.run_dir import RunDir

    run = RunDir(tmp_path)
    run.metrics_file.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5')
    run.truncate_metrics(2)
    assert [x["step"] for x in run.read_metrics()] == [1, 2]


# ---- progress ------------------------------------------------------------------------------------


@pytest.mark.parametrize("logs,pattern", [
    ({"loss": 1.2345, "learning_rate": 1.9e-4}, r"step=10/60 loss=1\.2345 lr=1\.90e-04 tok/s=\d+ eta=\S+"),
    # GRPO logs carry `reward` (the weighted mean over the step's completions): the plain line shows it
    ({"loss": 0.0123, "reward": -0.625, "learning_rate": 1e-5, "rewards/exact_answer/mean": 0.25},
     r"step=10/60 loss=0\.0123 reward=-0\.6250 lr=1\.00e-05 tok/s=\d+ eta=\S+"),
], ids=["sft", "grpo-reward"])
def test_plain_progress_lines(tmp_path, logs, pattern):
    import io

    from rich.console import Console
    from transformers import TrainerControl, TrainerState

    from lorakit.train.progress import ProgressCallback

    buf = io.StringIO()
    cb = ProgressCallback(tmp_path / "metrics.jsonl", console=Console(file=buf, width=200), plain=True)
    state = TrainerState(max_steps=60, global_step=0)
    cb.on_train_begin(None, state, TrainerControl())
    state.global_step, state.num_input_tokens_seen, state.epoch = 10, 8120, 0.5
    cb.on_log(None, state, TrainerControl(), logs=dict(logs))
    line = buf.getvalue().strip()
    assert re.fullmatch(pattern, line), line
    doc = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert doc["step"] == 10 and doc["loss"] == logs["loss"]


def test_resume_continues_to_the_same_adapter(workdir, tiny_model_dir):
    """A process killed hard (no signal handler runs) while writing checkpoint-4: resume ignores the
    half-written checkpoint, continues from checkpoint-2 and ends with the uninterrupted run's adapter.
    (Interruption by SIGINT/SIGTERM is tested in test_reliability.py.)"""
    import shutil

    from safetensors.torch import load_file

    from lorakit.train.run import run_training
    from lorakit.train.run_dir import INTERRUPTED, RunDir

    recipe = make_recipe(workdir, tiny_model_dir, train={"max_steps": 4, "save_steps": 2, "save_total_limit": 3},
                         evaluate={"metrics": []})
    run_training(recipe)
    run = RunDir(workdir / "runs" / "tiny")
    full = load_file(run.adapter_dir / "adapter_model.safetensors")
    full_losses = [x["loss"] for x in run.read_metrics() if "loss" in x]

    # make it look like the process died half-way through writing checkpoint-4
    shutil.rmtree(run.adapter_dir)
    half = run.checkpoints_dir / "checkpoint-4"
    (half / "lorakit-complete").unlink()
    (half / "optimizer.pt").write_bytes((half / "optimizer.pt").read_bytes()[:100])
    run.summary_file.unlink()
    run.set_state(INTERRUPTED, step=3)
    summary = run_training(recipe, resume=str(run.path))
    assert summary["resumed"] and summary["steps"] == 4
    resumed = load_file(run.adapter_dir / "adapter_model.safetensors")
    assert resumed.keys() == full.keys()
    assert max((resumed[k] - full[k]).abs().max().item() for k in full) < 1e-5
    losses = [x["loss"] for x in run.read_metrics() if "loss" in x]
    assert losses == pytest.approx(full_losses, rel=1e-5)
    assert run.state == "finished"
    with pytest.raises(LorakitError, match="already finished"):
        run_training(recipe, resume=True)


def test_save_both_writes_a_merged_checkpoint(workdir, tiny_model_dir):
    from lorakit.train.run import run_training

    recipe = make_recipe(workdir, tiny_model_dir, name="both", train={"max_steps": 1}, evaluate={"metrics": []},
                         output={"dir": "runs/both", "save": "both", "merged_dtype": "fp32"})
    summary = run_training(recipe)
    merged = workdir / "runs" / "both" / "merged"
    assert (merged / "config.json").is_file() and any(merged.glob("*.safetensors"))
    assert summary["merge"]["modules_merged"] == 4  # q_proj + v_proj in 2 layers
