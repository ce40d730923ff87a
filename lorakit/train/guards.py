"""Trainer callbacks that keep a run safe: signals, non-finite losses, and complete checkpoints.

- `GracefulStop`: SIGINT/SIGTERM during training ask the Trainer to save a checkpoint at the current
  step and stop; the caller then exits 130/143 and tells how to resume.
- `NonFiniteGuard`: a NaN/inf loss or gradient either stops the run (the last good checkpoint stays,
  the bad state is not saved) or, with `nan_policy: skip`, drops that optimizer step and counts it.
  The stop policy reads its check at the step's end, so the host does not wait for the GPU before the
  optimizer's work is queued (lorakit.train.sft_trainer says why that matters).
- `CheckpointMarker`: the Trainer writes checkpoint-N/ in place; once its save returns we add a
  `lorakit-complete` marker. Resume only trusts marked checkpoints, so a crash mid-write never leaves
  a directory that looks complete.
"""

from __future__ import annotations

import math
import shutil
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback

from lorakit.errors import Stopped, signal_exit_code
from lorakit.runtime.atomic import atomic_write_text, disk_error

COMPLETE_MARKER = "lorakit-complete"


_INSTALLED: list[GracefulStop] = []  # GracefulStops whose signal handlers are in place


class GracefulStop(TrainerCallback):
    """Turn SIGINT/SIGTERM into 'save a checkpoint now and stop'. A second signal stops at once.

    The handlers are installed when training begins and given back when it ends; when training ends
    with an exception instead (on_train_end never runs), `release_signals()` gives them back.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        name = signal.Signals(signum).name
        if self.signal_name is not None:  # second signal: the user insists; it sets the exit code
            raise Stopped(name)
        self.signal_name = name

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        if self._previous:
            _INSTALLED.append(self)

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal_name:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.release()

    def release(self) -> None:
        """Put back the handlers that were there before training (idempotent)."""
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, TypeError):
                pass
        self._previous.clear()
        if self in _INSTALLED:
            _INSTALLED.remove(self)

    @property
    def exit_code(self) -> int:
        return signal_exit_code(self.signal_name)


def release_signals() -> None:
    """Give back the signal handlers of every GracefulStop still installed (newest first)."""
    for stop in reversed(list(_INSTALLED)):
        stop.release()


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
        self._finite = None  # policy stop: the step's gradient check, read at the step's end

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model = model

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        params = [p for p in self._model.parameters() if p.grad is not None] if self._model is not None else []
        if not params:
            return control
        # one fused norm over every gradient (a per-tensor isfinite().all() would read each of the hundreds of
        # LoRA tensors back from the GPU)
        finite = torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params]))
        if self.policy == "stop":
            # read at the step's end, after the optimizer's work is queued: reading it here would make the host
            # wait for the backward pass and leave the GPU idle while the optimizer's updates are launched.
            # The bad update is applied in memory, never saved: the run stops before any save of this step.
            self._finite = finite
            return control
        if not bool(finite):  # skip: the decision has to come before the update
            for p in params:  # optimizers skip parameters without a gradient: the step is dropped
                p.grad = None
            self.skipped += 1
        return control

    def on_step_end(self, args, state, control, **kwargs):
        finite, self._finite = self._finite, None
        if finite is not None and not bool(finite):
            self._stop(state.global_step, control)
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
    """Mark checkpoint-N/ complete after the Trainer has finished writing it.

    At the start of training, unmarked checkpoint directories (half-written by a crash or a full disk)
    are removed: they are never resumed from, and the Trainer's rotation (save_total_limit) would
    otherwise count them and could delete a complete checkpoint in their place.
    """

    def on_train_begin(self, args, state, control, **kwargs):
        if args.should_save:
            remove_incomplete_checkpoints(args.output_dir)
        return control

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                atomic_write_text(folder / COMPLETE_MARKER, f"{state.global_step}\n")
        return control


def _step(p: Path) -> int | None:
    tail = p.name.split("-")[-1]
    return int(tail) if p.name.startswith("checkpoint-") and tail.isdigit() else None


def _looks_whole(p: Path) -> bool:
    """The files a resume needs are there (a marked directory half-deleted by rotation is not whole)."""
    weights = any(p.glob("*.safetensors")) or any(p.glob("*.bin"))
    return (p / COMPLETE_MARKER).is_file() and (p / "trainer_state.json").is_file() and weights


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """checkpoint-N directories under `folder` that carry the completion marker, oldest first."""
    folder = Path(folder)
    found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and _step(p) is not None and _looks_whole(p)]
    return sorted(found, key=lambda p: _step(p))


def latest_complete_checkpoint(folder: str | Path) -> Path | None:
    done = complete_checkpoints(folder)
    return done[-1] if done else None


def incomplete_checkpoints(folder: str | Path) -> list[Path]:
    """checkpoint-N directories without the marker: partial writes from a crash."""
    folder = Path(folder)
    return [p for p in folder.glob("checkpoint-*") if p.is_dir() and not (p / COMPLETE_MARKER).is_file()]


def remove_incomplete_checkpoints(folder: str | Path) -> list[Path]:
    """Delete the unmarked checkpoint-N directories under `folder`; return what was removed."""
    gone = incomplete_checkpoints(folder)
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def disk_failure(exc: BaseException, checkpoints_dir: str | Path, run_path: str | Path, *,
                 cleanup: bool = True):
    """The clean error (exit 1) when training failed on a full / over-quota / read-only disk, else None.

    It names the checkpoint that was being written when there is a half-written one, and (with
    `cleanup`) removes it: it would never be resumed from, and removing it gives the space back.
    """
    partial = sorted(incomplete_checkpoints(checkpoints_dir), key=lambda p: _step(p) or -1)
    err = disk_error(exc, partial[-1] if partial else run_path, check_free=True)
    if err is not None and cleanup:
        remove_incomplete_checkpoints(checkpoints_dir)
    return err
