"""Signals, non-finite values and checkpoint markers, on a plain transformers Trainer with a tiny model."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from lorakit.train.guards import (
    COMPLETE_MARKER,
    CheckpointMarker,
    GracefulStop,
    NonFiniteGuard,
    complete_checkpoints,
    incomplete_checkpoints,
    latest_complete_checkpoint,
)


class Rows(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = torch.tensor([(i * 7 + k) % 300 + 10 for k in range(16)])
        return {"input_ids": ids, "labels": ids.clone()}


def make_trainer(model_dir, out, callbacks, max_steps=6, save_steps=100):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2,
                             learning_rate=1e-3, logging_steps=1, save_steps=save_steps, report_to=[],
                             disable_tqdm=True, use_cpu=True, seed=0)
    return Trainer(model=model, args=args, train_dataset=Rows(), callbacks=callbacks)


class At(TrainerCallback):
    """Run `action(trainer_state, model)` in `hook` at global step `step`."""

    def __init__(self, step, hook, action):
        self.step, self.hook, self.action = step, hook, action

    def __getattribute__(self, name):
        if name.startswith("on_") and name == object.__getattribute__(self, "hook"):
            def call(args, state, control, model=None, **kw):
                if state.global_step == object.__getattribute__(self, "step"):
                    object.__getattribute__(self, "action")(state, model)
                return control
            return call
        return object.__getattribute__(self, name)


def test_sigint_saves_a_marked_checkpoint_and_stops(tiny_model_dir, tmp_path):
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN when started in the background
    stop = GracefulStop()
    kill = At(2, "on_step_begin", lambda s, m: os.kill(os.getpid(), signal.SIGINT))
    trainer = make_trainer(tiny_model_dir, tmp_path, [kill, stop, CheckpointMarker()])
    trainer.train()
    assert stop.signal_name == "SIGINT" and stop.exit_code == 130
    assert trainer.state.global_step == 3  # the step in flight finished, nothing more
    assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    assert (tmp_path / "checkpoint-3" / "optimizer.pt").exists()
    assert signal.getsignal(signal.SIGINT) is before  # handler restored


def test_handlers_are_given_back_when_training_raises(tiny_model_dir, tmp_path):
    """on_train_end never runs when training raises: release_signals() puts the old handlers back."""
    from lorakit.train.guards import release_signals

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stop = GracefulStop()

    def crash(state, model):
        raise RuntimeError("crash mid-training")

    with pytest.raises(RuntimeError, match="crash mid-training"):
        make_trainer(tiny_model_dir, tmp_path, [stop, At(1, "on_step_begin", crash)]).train()
    assert signal.getsignal(signal.SIGINT) == stop._handle  # still ours: on_train_end did not run
    release_signals()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    release_signals()  # idempotent


def test_sigterm_exit_code(tiny_model_dir, tmp_path):
    stop = GracefulStop()
    kill = At(1, "on_step_begin", lambda s, m: os.kill(os.getpid(), signal.SIGTERM))
    make_trainer(tiny_model_dir, tmp_path, [kill, stop, CheckpointMarker()]).train()
    assert stop.signal_name == "SIGTERM" and stop.exit_code == 143


def _poison(state, model):
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(float("nan"))


def test_nan_stops_and_does_not_save_the_bad_state(tiny_model_dir, tmp_path):
    guard = NonFiniteGuard("stop")
    trainer = make_trainer(tiny_model_dir, tmp_path, [At(2, "on_step_begin", _poison), guard, CheckpointMarker()],
                           save_steps=1)
    trainer.train()
    assert guard.bad_step == 3
    assert trainer.state.global_step == 3
    # a save was due at the bad step: the last good checkpoint is the last one
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    assert not (tmp_path / "checkpoint-3").exists()


def test_stop_policy_reads_its_check_at_the_step_end():
    """The stop policy's check is queued before the optimizer and read after it (no wait for the GPU before
    the optimizer's work is launched); the skip policy decides before the update."""
    from transformers import TrainerControl

    model = torch.nn.Linear(3, 2)
    model.weight.grad = torch.full((2, 3), float("nan"))
    for policy in ("stop", "skip"):
        guard, control = NonFiniteGuard(policy), TrainerControl()
        guard.on_train_begin(None, None, control, model=model)
        guard.on_pre_optimizer_step(None, None, control)
        state = type("S", (), {"global_step": 5})()
        if policy == "stop":
            assert not control.should_training_stop and model.weight.grad is not None
            control.should_save = True  # the flow callback's save of this step
            guard.on_step_end(None, state, control)
            assert control.should_training_stop and not control.should_save and guard.bad_step == 5
        else:
            assert guard.skipped == 1 and model.weight.grad is None
            guard.on_step_end(None, state, control)
            assert not control.should_training_stop and guard.bad_step is None


def test_skip_policy_drops_the_step_and_counts_it(tiny_model_dir, tmp_path):
    guard = NonFiniteGuard("skip")
    snapshot = {}

    def nan_grad(state, model):
        snapshot["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")

    trainer = make_trainer(tiny_model_dir, tmp_path, [At(2, "on_pre_optimizer_step", nan_grad), guard], max_steps=4)
    after = {}
    trainer.add_callback(At(3, "on_step_begin", lambda s, m: after.update(
        {n: p.detach().clone() for n, p in m.named_parameters()})))
    trainer.train()
    assert guard.skipped == 1 and guard.bad_step is None
    assert all(torch.equal(snapshot["before"][n], after[n]) for n in after)  # step 3 changed nothing
    assert trainer.state.global_step == 4
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def _fake_checkpoint(folder, step, *, marked=True, whole=True):
    p = folder / f"checkpoint-{step}"
    p.mkdir()
    if whole:
        (p / "trainer_state.json").write_text("{}")
        (p / "adapter_model.safetensors").write_bytes(b"x")
    if marked:
        (p / COMPLETE_MARKER).write_text(f"{step}\n")
    return p


def test_unmarked_checkpoints_are_not_trusted(tmp_path):
    _fake_checkpoint(tmp_path, 4, marked=False)
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 12, whole=False)  # marked, then half-deleted (e.g. by rotation): not trusted
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-10"
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10"]
    assert [p.name for p in incomplete_checkpoints(tmp_path)] == ["checkpoint-4"]
    assert latest_complete_checkpoint(tmp_path / "missing") is None


def test_training_start_removes_half_written_checkpoints(tiny_model_dir, tmp_path):
    """An unmarked checkpoint (a crash mid-save) is deleted when training starts; marked ones stay."""
    _fake_checkpoint(tmp_path, 2)
    half = _fake_checkpoint(tmp_path, 40, marked=False)
    make_trainer(tiny_model_dir, tmp_path, [CheckpointMarker()], max_steps=1).train()
    assert not half.exists()
    assert (tmp_path / "checkpoint-2").is_dir()


@pytest.mark.parametrize("value,finite", [(1.0, True), (float("nan"), False), (float("inf"), False), ("x", True)])
def test_finite_helper(value, finite):
    from lorakit.train.guards import _finite

    assert _finite(value) is finite
