"""Trainer callbacks that keep a run safe: signals, non-finite losses, and complete checkpoints.

- `GracefulStop`: SIGINT/SIGTERM during training ask the Trainer to save a checkpoint at the current
  step and stop; the caller then exits 130/143 and tells how to resume.
- `NonFiniteGuard`: a NaN/inf loss or gradient either stops the run (the last good checkpoint stays,
  the bad state is not saved) or, with `nan_policy: skip`, drops that optimizer step and counts it.
- `CheckpointMarker`: the Trainer writes checkpoint-N/ in place; once its save returns we add a
  `lorakit-complete` marker. Resume only trusts marked checkpoints, so a crash mid-write never leaves
  a directory that looks complete.
"""

from __future__ import annotations

import math
import signal
from pathlib import Path

from transformers import TrainerCallback

COMPLETE_MARKER = "lorakit-complete"


class GracefulStop(TrainerCallback):
    """Turn SIGINT/SIGTERM into 'save a checkpoint now and stop'. A second signal stops at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        if self.signal_name is not None:  # second signal: the user insists
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal_name:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def exit_code(self) -> int:
        return 143 if self.signal_name == "SIGTERM" else 130


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return True


class NonFiniteGuard(TrainerCallback):
    """Stop (policy 'stop') or skip the update (policy 'skip') when the loss or gradients are not finite."""

    def __init__(self, policy: str = "stop") -> None:
        self.policy = policy
        self.bad_step: int | None = None
        self.skipped = 0
        self._model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model = model

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        import torch

        params = [p for p in self._model.parameters() if p.grad is not None] if self._model is not None else []
        if not params or all(torch.isfinite(p.grad).all() for p in params):
            return control
        if self.policy == "skip":
            for p in params:  # optimizers skip parameters without a gradient: the step is dropped
                p.grad = None
            self.skipped += 1
        else:
            self._stop(state.global_step + 1, control)
            for p in params:
                p.grad = None
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "grad_norm"):
            if logs and key in logs and not _finite(logs[key]) and self.policy == "stop":
                self._stop(state.global_step, control)
        return control

    def _stop(self, step: int, control) -> None:
        if self.bad_step is None:
            self.bad_step = step
        control.should_training_stop = True
        control.should_save = False


class CheckpointMarker(TrainerCallback):
    """Mark checkpoint-N/ complete after the Trainer has finished writing it."""

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                from lorakit.atomic import atomic_write_text

                atomic_write_text(folder / COMPLETE_MARKER, f"{state.global_step}\n")
        return control


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """checkpoint-N directories under `folder` that carry the completion marker, oldest first."""
    folder = Path(folder)
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and (p / COMPLETE_MARKER).is_file()
             and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def latest_complete_checkpoint(folder: str | Path) -> Path | None:
    done = complete_checkpoints(folder)
    return done[-1] if done else None


def incomplete_checkpoints(folder: str | Path) -> list[Path]:
    """checkpoint-N directories without the marker: partial writes from a crash."""
    folder = Path(folder)
    return [p for p in folder.glob("checkpoint-*") if p.is_dir() and not (p / COMPLETE_MARKER).is_file()]
