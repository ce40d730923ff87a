"""Reliability and safety (issue 8): a full disk, a signal then --resume, secrets, pickle, remote code,
shells, tracebacks, and fuzzing of the GRPO data path.

Disk-full tests raise the errors the libraries really raise on a full disk (measured on a small tmpfs):
an OSError(ENOSPC) from Python writes, SafetensorError("... No space left on device (os error 28)") from
safetensors, and RuntimeError("[enforce fail at inline_container.cc] . unexpected pos ...") from
torch.save. One test fills a real tmpfs where the machine allows mounting one (root), else it skips.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import chat_rows as _rows
from helpers import write_jsonl
from test_train import make_recipe

from lorakit.errors import LorakitError
from lorakit.runtime import atomic
from lorakit.runtime.atomic import atomic_write_json, disk_error
from lorakit.train.guards import complete_checkpoints, latest_complete_checkpoint
from lorakit.train.run_dir import RunDir

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "CI": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _hook_trainer(monkeypatch, method: str, step: int, action) -> list:
    """Call `action(trainer)` once, before Trainer.`method` runs at global step `step`."""
    from transformers import Trainer

    real = getattr(Trainer, method)
    fired: list = []

    def hooked(self, *args, **kwargs):
        if self.state.global_step == step and not fired:
            fired.append(step)
            action(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, method, hooked)
    return fired


def _signal_at_step(monkeypatch, step: int, sig: int) -> list:
    """Send `sig` to this process when step `step` begins (a real signal, through GracefulStop's handler)."""
    from transformers.trainer_callback import CallbackHandler

    real = CallbackHandler.on_step_begin
    fired: list = []

    def hooked(self, args, state, control):
        if state.global_step == step - 1 and not fired:
            fired.append(step)
            os.kill(os.getpid(), sig)
        return real(self, args, state, control)

    monkeypatch.setattr(CallbackHandler, "on_step_begin", hooked)
    return fired


# ----------------------------------------------------------------------------------------------
# A full disk: the translation, atomic files, staged directories
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left"), (errno.EDQUOT, "quota exceeded"),
                                        (errno.EROFS, "read-only")])
def test_atomic_write_on_a_full_disk_is_a_clean_error_and_keeps_the_old_file(tmp_path, monkeypatch, code, words):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"v": 1})

    def full(fd):  # delayed allocation: the error shows at fsync
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(LorakitError) as e:
        atomic_write_json(target, {"v": 2})
    assert e.value.exit_code == 1
    assert str(target) in e.value.message and words in e.value.message and e.value.hint
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left


def test_disk_errors_of_the_libraries_are_recognised(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    err = disk_error(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
                     tmp_path / "adapter")
    assert err is not None and err.exit_code == 1
    assert "no space left" in err.message and str(tmp_path / "adapter") in err.message
    assert "quota" in disk_error(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path).message
    temp = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".summary.json.x1.tmp"))
    assert disk_error(temp, tmp_path / "summary.json").message.startswith(f"writing {tmp_path / 'summary.json'} ")
    inner = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "checkpoint-4" / "optimizer.pt"))
    assert "checkpoint-4/optimizer.pt failed" in disk_error(inner, tmp_path / "checkpoint-4").message
    try:  # a library that wraps the OSError
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("could not save") from inner
    except RuntimeError as wrapped:
        assert disk_error(wrapped, tmp_path) is not None

    # torch.save on a full disk says only "unexpected pos": taken for a full disk when little space is left
    torch_full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(atomic, "free_bytes", lambda path: 4096)
    assert "no space left" in disk_error(torch_full, tmp_path, check_free=True).message
    assert disk_error(torch_full, tmp_path) is None
    monkeypatch.setattr(atomic, "free_bytes", lambda path: 10 ** 11)
    assert disk_error(torch_full, tmp_path, check_free=True) is None

    for other in (ValueError("bad value"), OSError(errno.EACCES, "Permission denied"), KeyboardInterrupt(),
                  LorakitError("already clean")):
        assert disk_error(other, tmp_path) is None


def test_staged_dir_on_a_full_disk_keeps_the_old_directory(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    with run.staged_dir(run.adapter_dir) as d:
        (d / "weights").write_text("old")

    with pytest.raises(LorakitError) as e:
        with run.staged_dir(run.adapter_dir) as d:
            (d / "weights").write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.exit_code == 1 and "no space left" in e.value.message and str(run.adapter_dir) in e.value.message
    assert (run.adapter_dir / "weights").read_text() == "old"
    assert sorted(p.name for p in run.path.iterdir()) == ["adapter"]

    real_replace = os.replace

    def read_only(src, dst):  # the final rename fails: the old directory is put back
        if str(src).endswith("adapter.tmp"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(LorakitError, match="read-only"):
        with run.staged_dir(run.adapter_dir) as d:
            (d / "weights").write_text("new")
    assert (run.adapter_dir / "weights").read_text() == "old"
    assert sorted(p.name for p in run.path.iterdir()) == ["adapter"]


# ----------------------------------------------------------------------------------------------
# A full disk during training: checkpoints, the adapter, the summary
# ----------------------------------------------------------------------------------------------


def test_full_disk_while_the_trainer_saves_a_checkpoint(workdir, tiny_model_dir, monkeypatch):
    """checkpoint-4 fails half-written (torch.save's real error): a clean exit-1 error, state failed,
    checkpoint-2 untouched and still the one to resume from, nothing named checkpoint-4 left."""
    import torch

    from lorakit.train.run import run_training

    recipe = make_recipe(workdir, tiny_model_dir, train={"max_steps": 6, "save_steps": 2, "save_total_limit": 5},
                         evaluate={"metrics": []})
    run = RunDir(workdir / "runs" / "tiny")
    seen: dict = {}
    _hook_trainer(monkeypatch, "_save_checkpoint", 4,
                  lambda trainer: seen.update(ckpt2=_tree_hash(run.checkpoints_dir / "checkpoint-2")))
    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            Path(f).write_bytes(b"PK\x03\x04 half a file")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(atomic, "free_bytes", lambda path: 0)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(LorakitError) as e:
        run_training(recipe)
    # training ended by an exception: GracefulStop's handlers are given back all the same
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert e.value.exit_code == 1 and "no space left" in e.value.message
    assert "writing runs/tiny/checkpoints/checkpoint-4 failed" in e.value.message and "--resume" in e.value.hint
    state = run.read_state()
    assert state["state"] == "failed" and "no space left" in state["error"]
    assert sorted(p.name for p in run.checkpoints_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    assert latest_complete_checkpoint(run.checkpoints_dir) == run.checkpoints_dir / "checkpoint-2"
    assert _tree_hash(run.checkpoints_dir / "checkpoint-2") == seen["ckpt2"]
    assert not run.adapter_dir.exists() and not run.summary_file.exists()

    monkeypatch.setattr(torch, "save", real_save)  # space again: the run continues from checkpoint-2
    monkeypatch.setattr(atomic, "free_bytes", lambda path: 10 ** 11)
    summary = run_training(recipe, resume=str(run.path))
    assert summary["resumed"] and summary["steps"] == 6 and run.state == "finished"


def test_full_disk_while_saving_the_final_adapter(workdir, tiny_model_dir, monkeypatch):
    """safetensors fails on adapter.tmp: no adapter/ or adapter.tmp/, state failed, the checkpoints intact,
    and --resume writes the adapter from the last checkpoint."""
    import safetensors.torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from lorakit.train.run import run_training

    recipe = make_recipe(workdir, tiny_model_dir, train={"max_steps": 4, "save_steps": 2, "save_total_limit": 5},
                         evaluate={"metrics": []})
    run = RunDir(workdir / "runs" / "tiny")
    real = safetensors.torch.serialize_file

    def full_disk(tensors, filename, *args, **kwargs):
        if "adapter.tmp" in str(filename):
            Path(filename).write_bytes(b"\x00" * 100)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "serialize_file", full_disk)
    with pytest.raises(LorakitError) as e:
        run_training(recipe)
    assert e.value.exit_code == 1
    assert e.value.message == "writing runs/tiny/adapter failed: no space left on the device"
    assert run.state == "failed" and "no space left" in run.read_state()["error"]
    assert not run.adapter_dir.exists() and not (run.path / "adapter.tmp").exists()
    assert not run.summary_file.exists()
    assert [p.name for p in complete_checkpoints(run.checkpoints_dir)] == ["checkpoint-2", "checkpoint-4"]

    monkeypatch.setattr(safetensors.torch, "serialize_file", real)
    summary = run_training(recipe, resume=str(run.path))
    assert summary["steps"] == 4 and run.state == "finished"
    final = load_file(run.adapter_dir / "adapter_model.safetensors")
    saved = load_file(run.checkpoints_dir / "checkpoint-4" / "adapter_model.safetensors")
    assert final.keys() == saved.keys() and all((final[k] == saved[k]).all() for k in final)


def test_full_disk_while_writing_the_summary_via_the_cli(workdir, tiny_model_dir, monkeypatch):
    """The CLI prints one clean message (exit 1, no traceback); the finished adapter stays whole."""
    from typer.testing import CliRunner

    from lorakit.cli import app

    make_recipe(workdir, tiny_model_dir, train={"max_steps": 1}, evaluate={"metrics": []})
    real_replace = os.replace

    def full(src, dst):
        if str(dst).endswith("summary.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full)
    result = CliRunner().invoke(app, ["train", "tiny.yaml"])
    run = RunDir(workdir / "runs" / "tiny")
    assert result.exit_code == 1, result.output
    assert "error:" in result.output and "no space left" in result.output and "summary.json" in result.output
    assert "Traceback" not in result.output
    assert run.state == "failed"
    assert (run.adapter_dir / "adapter_model.safetensors").is_file()
    assert not run.summary_file.exists() and not list(run.path.glob(".summary.json*"))


@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MiB tmpfs (needs root and permission to mount; skipped elsewhere)."""
    mount = shutil.which("mount")
    if os.name != "posix" or os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run([mount, "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True,
                          check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run([shutil.which("umount") or "umount", "-l", str(mnt)], capture_output=True, check=False)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


def test_a_really_full_disk_during_a_checkpoint(workdir, tiny_model_dir, small_disk, monkeypatch):
    """The disk really fills up just before checkpoint-4: the same clean outcome as the simulations."""
    from lorakit.train.run import run_training

    out = small_disk / "run"
    recipe = make_recipe(workdir, tiny_model_dir, train={"max_steps": 6, "save_steps": 2, "save_total_limit": 5},
                         evaluate={"metrics": []}, output={"dir": str(out)})
    filler: list[Path] = []
    _hook_trainer(monkeypatch, "_save_checkpoint", 4, lambda trainer: filler.append(_fill(small_disk)))
    with pytest.raises(LorakitError) as e:
        run_training(recipe)
    assert filler, "the disk was never filled"
    assert e.value.exit_code == 1 and "no space left" in e.value.message
    run = RunDir(out)
    assert run.state == "failed"
    assert sorted(p.name for p in run.checkpoints_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    assert latest_complete_checkpoint(run.checkpoints_dir).name == "checkpoint-2"

    filler[0].unlink()
    summary = run_training(recipe, resume=str(out))
    assert summary["steps"] == 6 and run.state == "finished"


# ----------------------------------------------------------------------------------------------
# A signal, then --resume: the same adapter and the same metrics as an uninterrupted run
# ----------------------------------------------------------------------------------------------

STEP_KEYS = ("loss", "grad_norm", "learning_rate", "eval_loss")


def _equivalence_recipe(folder: Path, base: Path, name: str):
    # 16 rows, 2 a micro-batch, 2 micro-batches a step: 4 steps an epoch, so the run crosses an epoch and
    # the resume must restore the data position, the RNG (dropout), the optimizer and the LR schedule.
    return make_recipe(folder, base, name=name, lora={"dropout": 0.1},
                       train={"max_steps": 7, "batch_size": 2, "grad_accum": 2, "eval_steps": 2,
                              "warmup_ratio": 0.2},
                       evaluate={"metrics": []}, output={"dir": str(folder / "runs" / name)})


def _per_step(run: RunDir) -> dict[tuple[int, str], float]:
    return {(m["step"], k): m[k] for m in run.read_metrics() for k in STEP_KEYS if k in m}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    from safetensors.torch import load_file

    from lorakit.train.run import run_training

    folder = tmp_path_factory.mktemp("uninterrupted")
    write_jsonl(folder / "train.jsonl", _rows(16))
    write_jsonl(folder / "eval.jsonl", _rows(4, offset=3))
    summary = run_training(_equivalence_recipe(folder, tiny_model_dir, "full"))
    run = RunDir(folder / "runs" / "full")
    return {"adapter": load_file(run.adapter_dir / "adapter_model.safetensors"), "metrics": _per_step(run),
            "summary": summary}


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_then_resume_gives_the_uninterrupted_adapter_and_metrics(workdir, tiny_model_dir, monkeypatch,
                                                                       uninterrupted, sig, code):
    from safetensors.torch import load_file

    from lorakit.errors import Interrupted
    from lorakit.train.run import run_training

    recipe = _equivalence_recipe(workdir, tiny_model_dir, "cut")
    run = RunDir(workdir / "runs" / "cut")
    fired = _signal_at_step(monkeypatch, 3, sig)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as e:
        run_training(recipe)
    assert fired == [3]
    assert e.value.exit_code == code and e.value.signal_name == signal.Signals(sig).name
    state = run.read_state()
    assert state["state"] == "interrupted" and state["step"] == 3
    assert e.value.checkpoint == state["checkpoint"] == str(run.checkpoints_dir / "checkpoint-3")
    assert not run.adapter_dir.exists() and not run.summary_file.exists()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # given back
    assert max(s for s, _ in _per_step(run)) == 3

    monkeypatch.undo()
    monkeypatch.chdir(workdir)
    summary = run_training(recipe, resume=str(run.path))
    assert summary["resumed"] and summary["steps"] == 7 and run.state == "finished"

    adapter, full = load_file(run.adapter_dir / "adapter_model.safetensors"), uninterrupted["adapter"]
    assert adapter.keys() == full.keys()
    assert max((adapter[k] - full[k]).abs().max().item() for k in full) < 1e-5
    metrics, want = _per_step(run), uninterrupted["metrics"]
    assert metrics.keys() == want.keys()
    assert {k for k in want if k[0] > 3 and k[1] == "loss"}, "metrics after the resume point are compared"
    for key, value in want.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert summary["eval_loss"]["after"] == pytest.approx(uninterrupted["summary"]["eval_loss"]["after"], rel=1e-5)
    assert summary["loss"] == pytest.approx(uninterrupted["summary"]["loss"], rel=1e-5)


def _write_cli_recipe(folder: Path, base: Path, steps: int, **train) -> Path:
    doc = {"name": "cli", "base_model": str(base), "quantization": {"bits": "none"},
           "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]},
           "data": {"path": "train.jsonl", "max_length": 64},
           "train": {"max_steps": steps, "lr": 1e-3, "batch_size": 2, "logging_steps": 1, "seed": 0, **train},
           "evaluate": {"metrics": []}, "output": {"dir": "runs/cli"}}
    write_jsonl(folder / "train.jsonl", _rows(16))
    path = folder / "cli.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


SECRET = "hf_lorakitTestSecret0123456789abcdefXYZ"
TOKEN_ENV = {"HF_TOKEN": SECRET, "HUGGING_FACE_HUB_TOKEN": SECRET, "HF_HUB_TOKEN": SECRET}


# `lorakit train` with SIGTERM sent to its own process as step STEP begins (a real signal through GracefulStop's
# handler, at a fixed step rather than after a wait). main() quiets the libraries before they load; the hook
# imports transformers first, so it does the same first.
_SIGTERM_AT_STEP = """import os, signal, sys
from lorakit.runtime.quiet import progress_bars_off, quiet_from_start
quiet_from_start(); progress_bars_off()
from transformers.trainer_callback import CallbackHandler
from lorakit.cli import main
real = CallbackHandler.on_step_begin
def at_step(self, args, state, control):
    if state.global_step == {step} - 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(self, args, state, control)
CallbackHandler.on_step_begin = at_step
main(sys.argv[1:])
"""


def test_cli_sigterm_mid_training_exits_143_and_resume_finishes(tmp_path, tiny_model_dir):
    """`lorakit train` in its own process gets SIGTERM while it trains (at step 3): exit 143, a checkpoint,
    how to resume; `--resume RUN_DIR` finishes. A hub token in the environment shows up nowhere."""
    _write_cli_recipe(tmp_path, tiny_model_dir, steps=8)
    env = {**ENV, **TOKEN_ENV}
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_AT_STEP.format(step=3), "train", "cli.yaml"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    out, err = proc.stdout, proc.stderr
    assert proc.returncode == 143, out + err
    assert "Traceback" not in out + err
    assert "stopped by SIGTERM" in out and "--resume" in out
    run = RunDir(tmp_path / "runs" / "cli")
    state = run.read_state()
    assert state["state"] == "interrupted" and state["signal"] == "SIGTERM"
    stopped_at = state["step"]
    assert stopped_at == 3
    assert latest_complete_checkpoint(run.checkpoints_dir).name == f"checkpoint-{stopped_at}"

    # resume (with two steps left to go, so the test stays short)
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", "cli.yaml", "--resume", str(run.path),
                           "--json", "--set", f"train.max_steps={stopped_at + 2}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["resumed"] and summary["steps"] == stopped_at + 2
    assert run.state == "finished" and (run.adapter_dir / "adapter_model.safetensors").is_file()

    # the token: not in any output, not in any file of the run (checkpoints' pickled training_args included)
    files = [p for p in run.path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"training_args.bin", "summary.json", "recipe.yaml", "metrics.jsonl", "state.json"} <= names
    assert [str(p.relative_to(run.path)) for p in files if SECRET.encode() in p.read_bytes()] == []
    assert SECRET not in out + err + done.stdout + done.stderr


@pytest.mark.parametrize("first,second,code", [(signal.SIGTERM, signal.SIGTERM, 143),
                                               (signal.SIGINT, signal.SIGINT, 130),
                                               (signal.SIGINT, signal.SIGTERM, 143)],
                         ids=["TERM-TERM", "INT-INT", "INT-TERM"])
def test_a_second_signal_while_the_checkpoint_saves_exits_with_its_own_code(workdir, tiny_model_dir, monkeypatch,
                                                                            first, second, code):
    """A second signal while the first one's checkpoint is being written stops at once; the exit code is
    the second signal's (TERM 143, INT 130), in the exit status, the JSON document and state.json."""
    from typer.testing import CliRunner

    from lorakit.cli import app

    make_recipe(workdir, tiny_model_dir, train={"max_steps": 6}, evaluate={"metrics": []})
    fired = _signal_at_step(monkeypatch, 2, first)
    saving = _hook_trainer(monkeypatch, "_save_checkpoint", 2, lambda trainer: os.kill(os.getpid(), second))
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(app, ["train", "tiny.yaml", "--json"])
    assert fired == [2] and saving == [2]
    name = signal.Signals(second).name
    assert result.exit_code == code, result.output[-2000:]
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["interrupted"] == name and doc["exit_code"] == code
    state = RunDir(workdir / "runs" / "tiny").read_state()
    assert state["state"] == "interrupted" and state["signal"] == name
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # given back


# ----------------------------------------------------------------------------------------------
# Safety
# ----------------------------------------------------------------------------------------------

def test_hub_tokens_never_reach_error_output(workdir, tiny_model_dir, monkeypatch):
    """Failing runs (a hub model that can't be fetched, bad data) print no token, in text or JSON."""
    from typer.testing import CliRunner

    from lorakit.cli import app

    for key, value in TOKEN_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make_recipe(workdir, tiny_model_dir, train={"max_steps": 1}, evaluate={"metrics": []})
    (workdir / "broken.jsonl").write_text("{not json\n")
    for args in (["train", "tiny.yaml", "--set", "base_model=someone/gated-model"],
                 ["train", "tiny.yaml", "--json", "--set", "base_model=someone/gated-model"],
                 ["--debug", "train", "tiny.yaml", "--set", "data.path=broken.jsonl"],
                 ["validate", "tiny.yaml", "--json", "--set", "base_model=someone/gated-model"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code in (1, 2), result.output
        assert SECRET not in result.output and "Traceback" not in result.output


def test_weights_load_from_safetensors_only_unless_allow_pickle(tmp_path, tiny_model_dir, monkeypatch):
    """A pickle file is never opened: not beside safetensors weights, not alone (refused, naming
    allow_pickle); with `model.allow_pickle: true` it is (the spy sees it, so it would see a leak)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorakit.model.load import load_for_training

    opened: list[str] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: opened.append(str(f)) or real_load(f, *a, **k))

    both = tmp_path / "both"
    shutil.copytree(tiny_model_dir, both)
    torch.save({"poison": torch.zeros(1)}, both / "pytorch_model.bin")
    load_for_training(make_recipe(tmp_path, both, name="both"), "cpu")
    assert opened == []

    only = tmp_path / "only-pickle"
    shutil.copytree(tiny_model_dir, only)
    state = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    for p in only.glob("*.safetensors"):
        p.unlink()
    torch.save(state, only / "pytorch_model.bin")
    with pytest.raises(LorakitError) as e:
        load_for_training(make_recipe(tmp_path, only, name="only"), "cpu")
    assert "pickle" in e.value.message and "allow_pickle" in e.value.hint
    assert opened == []

    load_for_training(make_recipe(tmp_path, only, name="allowed", model={"allow_pickle": True}), "cpu")
    assert any(o.endswith("pytorch_model.bin") for o in opened)


def test_inference_loads_safetensors_only_unless_allow_pickle(tmp_path, tiny_model_dir, monkeypatch):
    """load_for_inference (generate) refuses a pickle-only base, naming allow_pickle (exit 2 through the
    CLI), and never opens the pickle; with allow_pickle it loads it."""
    import torch
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from lorakit.cli import app
    from lorakit.model.load import load_for_inference

    only = tmp_path / "only-pickle"
    shutil.copytree(tiny_model_dir, only)
    for p in only.glob("*.safetensors"):
        p.unlink()
    torch.save(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict(), only / "pytorch_model.bin")
    opened: list[str] = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: opened.append(str(f)) or real_load(f, *a, **k))

    with pytest.raises(LorakitError) as e:
        load_for_inference(only)
    assert e.value.exit_code == 2 and "pickle" in e.value.message and "allow_pickle" in e.value.hint
    assert opened == []

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "recipe.yaml").write_text(yaml.safe_dump({"base_model": str(only), "data": {"path": "d.jsonl"}}))
    result = CliRunner().invoke(app, ["generate", str(run), "--prompt", "hi", "--base-only"])
    assert result.exit_code == 2 and "allow_pickle" in result.output, result.output
    assert opened == []

    model = load_for_inference(only, allow_pickle=True)
    assert model.config.vocab_size > 0 and any(o.endswith("pytorch_model.bin") for o in opened)


def test_trust_remote_code_is_off_by_default_and_named_when_on(tmp_path, tiny_model_dir, monkeypatch, caplog):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from lorakit.cli import app
    from lorakit.model.load import load_for_training

    seen: list[bool] = []
    for cls in (AutoModelForCausalLM, AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            seen.append(kwargs.get("trust_remote_code", False))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))

    with caplog.at_level("WARNING", logger="lorakit"):
        load_for_training(make_recipe(tmp_path, tiny_model_dir, name="off"), "cpu")
    assert seen and not any(seen)
    assert "trust_remote_code" not in caplog.text

    seen.clear()
    with caplog.at_level("WARNING", logger="lorakit"):
        load_for_training(make_recipe(tmp_path, tiny_model_dir, name="on", model={"trust_remote_code": True}), "cpu")
    assert seen and all(seen)
    assert "trust_remote_code is on" in caplog.text and str(tiny_model_dir) in caplog.text

    write_jsonl(tmp_path / "train.jsonl", _rows(2))
    write_jsonl(tmp_path / "eval.jsonl", _rows(2))
    monkeypatch.chdir(tmp_path)
    shown = CliRunner().invoke(app, ["validate", "on.yaml"])
    assert shown.exit_code == 0, shown.output
    assert "warning" in shown.output and "trust_remote_code" in shown.output and str(tiny_model_dir) in shown.output


def test_a_model_that_needs_its_own_code_is_refused_without_running_it(tmp_path):
    """A config with auto_map: validate names model.trust_remote_code; the repository's code never runs."""
    from lorakit.recipe.loader import load_recipe
    from lorakit.validate import validate_recipe

    model = tmp_path / "custom"
    model.mkdir()
    sentinel = tmp_path / "code-ran"
    (model / "config.json").write_text(json.dumps({
        "model_type": "customlm", "hidden_size": 64, "num_hidden_layers": 2,
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomModel"}}))
    for name in ("configuration_custom.py", "modeling_custom.py"):
        (model / name).write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n")
    write_jsonl(tmp_path / "d.jsonl", _rows(2))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"base_model": str(model), "data": {"path": "d.jsonl"}}))
    with pytest.raises(LorakitError) as e:
        validate_recipe(load_recipe(tmp_path / "r.yaml"))
    assert e.value.problems[0].field == "model.trust_remote_code"
    assert not sentinel.exists()


def test_reward_code_loads_only_from_the_file_the_recipe_names(tmp_path):
    from lorakit.recipe.schema import RewardSpec
    from lorakit.train.rewards import load_rewards

    sentinel = tmp_path / "imported"
    for name in ("rewards.py", "reward.py", "evil.py", "__init__.py", "conftest.py", "sitecustomize.py"):
        (tmp_path / name).write_text(f"open({str(sentinel)!r}, 'a').write({name!r})\n")
    (tmp_path / "mine.py").write_text("def score(completions, **kwargs):\n    return [1.0 for _ in completions]\n")
    path_before, modules_before = list(sys.path), set(sys.modules)
    [score] = load_rewards([RewardSpec(fn="mine.py:score")], tmp_path)
    assert score(["a", "b"], prompts=["p", "q"]) == [1.0, 1.0]
    assert not sentinel.exists()
    assert sys.path == path_before  # the recipe's directory is not made importable
    assert [m for m in set(sys.modules) - modules_before if "evil" in m or m in ("rewards", "reward")] == []


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_no_shell_is_ever_invoked():
    """No os.system/os.popen/shell=True/eval/exec anywhere in lorakit; subprocesses only in launch.py, as lists."""
    forbidden = {"os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput", "eval", "exec",
                 "pty.spawn", "commands.getoutput"}
    users: set[str] = set()
    for file in sorted((ROOT / "lorakit").rglob("*.py")):
        tree = ast.parse(file.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                name = _dotted(node.func)
                assert name not in forbidden and not name.startswith(("os.exec", "os.spawn")), f"{file.name}: {name}"
                for kw in node.keywords:
                    if kw.arg == "shell":
                        assert isinstance(kw.value, ast.Constant) and kw.value.value is False, f"{file.name}: shell="
                if name.startswith("subprocess."):
                    users.add(file.name)
    assert users <= {"launch.py"}

    from lorakit.runtime.launch import launch_command

    hostile = "recipe.yaml; touch /tmp/pwned $(id)"
    cmd = launch_command(2, ["train", hostile, "--gpus", "2"])
    assert isinstance(cmd, list) and cmd[-1] == hostile  # one argument, handed to no shell


# ----------------------------------------------------------------------------------------------
# Tracebacks only with --debug
# ----------------------------------------------------------------------------------------------


def test_debug_shows_a_traceback_and_its_absence_hides_it(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "d.jsonl", _rows(2))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"base_model": str(tiny_model_dir), "data": {"path": "d.jsonl"}}))
    code = ("import sys, lorakit.validate as v\n"
            "def boom(*a, **k):\n    raise RuntimeError('a bug in lorakit')\n"
            "v.validate_recipe = boom\n"
            "from lorakit.cli import main\nsys.argv = ['lorakit', *sys.argv[1:]]\nmain()\n")
    plain = subprocess.run([sys.executable, "-c", code, "validate", "r.yaml"], cwd=tmp_path, env=ENV,
                           capture_output=True, text=True, timeout=120)
    assert plain.returncode == 1
    assert "RuntimeError: a bug in lorakit" in plain.stderr and "--debug" in plain.stderr
    assert "Traceback" not in plain.stderr + plain.stdout
    debug = subprocess.run([sys.executable, "-c", code, "--debug", "validate", "r.yaml"], cwd=tmp_path, env=ENV,
                           capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "a bug in lorakit" in debug.stderr

    # a user error stays one clean message, with or without --debug
    (tmp_path / "bad.yaml").write_text("base_model: x\ndata: {path: d.jsonl}\nlora: {r: 0}\n")
    for args in (["validate", "bad.yaml"], ["--debug", "validate", "bad.yaml"]):
        p = subprocess.run([sys.executable, "-m", "lorakit", *args], cwd=tmp_path, env=ENV, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == 2 and "lora.r" in p.stderr and "Traceback" not in p.stderr + p.stdout


# ----------------------------------------------------------------------------------------------
# Fuzzing the GRPO data path (the SFT path is fuzzed in test_data.py)
# ----------------------------------------------------------------------------------------------


def test_fuzzed_grpo_rows_give_success_or_a_clean_error(tmp_path, tiny_model_dir):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from transformers import AutoTokenizer

    from lorakit.data import prepare as data
    from lorakit.recipe.loader import validate_data

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.sampled_from(["role", "content", "type", "text"]), c, max_size=3), max_leaves=6)
    keys = st.sampled_from(["prompt", "messages", "question", "answer", "solution", "instruction", "input",
                            "output", "completion", "text", "difficulty"])
    rows = st.lists(st.dictionaries(keys, values, max_size=4), min_size=1, max_size=4)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(rows=rows, fmt=st.sampled_from(["auto", "messages", "prompt", "prompt_completion", "alpaca"]))
    def check(rows, fmt):
        write_jsonl(tmp_path / "g.jsonl", rows)
        doc = {"base_model": "x", "method": "grpo", "data": {"path": str(tmp_path / "g.jsonl"), "format": fmt},
               "grpo": {"rewards": [{"fn": "exact_answer"}]}}
        try:
            recipe = validate_data(doc)
        except LorakitError:
            return
        recipe._source_dir = tmp_path
        try:
            prepared = data.prepare_grpo(recipe, tok)
        except LorakitError as e:
            assert e.message and e.exit_code in (1, 2)
            return
        assert len(prepared.train) >= 1 and "prompt" in prepared.train.column_names

    check()
