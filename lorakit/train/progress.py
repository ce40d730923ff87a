"""Training progress: a rich progress bar on a terminal, plain parseable lines otherwise, metrics.jsonl.

`ProgressCallback` is a transformers TrainerCallback. On a terminal (and CI not set) it shows a rich
Progress bar with step/total, loss, lr, tokens/s and ETA; otherwise it prints one line per log event
(GRPO adds the step's mean reward after the loss):

    step=10/60 loss=1.234 lr=1.9e-04 tok/s=812 eta=42s
    step=10/60 loss=0.012 reward=0.7500 lr=1.0e-05 tok/s=95 eta=3m10s

Every log event is also appended to metrics.jsonl as one JSON object (with step, epoch and wall time).
In a multi-process run (torchrun / accelerate launch) only the global rank 0 prints and writes
metrics.jsonl; the other ranks keep the numbers (last loss, tokens/s) but stay silent.
Tokens/s counts non-padding tokens: the Trainer's own `num_input_tokens_seen` (lorakit.train.args sets
`include_num_input_tokens_seen: non_padding`), which a resumed run restores from its checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import TrainerCallback

from lorakit.runtime.distributed import is_main_process


def plain_output(console=None) -> bool:
    """Plain lines when CI is set or the output is not a terminal."""
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        return True
    if console is not None:
        return not console.is_terminal
    return not sys.stdout.isatty()


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class ProgressCallback(TrainerCallback):
    """Progress display + metrics.jsonl writer."""

    def __init__(self, metrics_file: str | Path | None, *, console=None, plain: bool | None = None,
                 quiet: bool = False, main: bool | None = None):
        self.main = is_main_process() if main is None else main
        self.metrics_file = Path(metrics_file) if metrics_file and self.main else None
        self.console = console
        self.plain = plain_output(console) if plain is None else plain
        self.quiet = quiet or not self.main
        self._progress = None
        self._task = None
        self._t0 = None
        self._tokens0 = 0
        self._step0 = 0
        self._training = False
        self.last_loss: float | None = None
        self.last_lr: float | None = None
        self.train_tokens_per_s: float | None = None

    # -- helpers ---------------------------------------------------------------------------------

    def _rate(self, state) -> tuple[float | None, float | None]:
        """(tokens/s, eta seconds) since training (or the resume point) started."""
        if self._t0 is None:
            return None, None
        elapsed = time.time() - self._t0
        done = state.global_step - self._step0
        tps = (state.num_input_tokens_seen - self._tokens0) / elapsed if elapsed > 0 else None
        eta = elapsed / done * (state.max_steps - state.global_step) if done > 0 and state.max_steps else None
        return tps, eta

    def _emit(self, text: str) -> None:
        if self.quiet:
            return
        if self.console is not None:
            self.console.print(text, highlight=False, markup=False)
        else:
            print(text, flush=True)

    def _write_metrics(self, doc: dict) -> None:
        if self.metrics_file is None:
            return
        with self.metrics_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps(doc, default=str) + "\n")

    # -- callback events -------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.time()
        self._training = True
        self._tokens0 = state.num_input_tokens_seen
        self._step0 = state.global_step
        if not self.plain and not self.quiet:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=self.console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task("train", total=state.max_steps, completed=state.global_step,
                                                 info="")

    def on_step_end(self, args, state, control, **kwargs):
        if self._progress is not None:
            tps, _ = self._rate(state)
            info = []
            if self.last_loss is not None:
                info.append(f"loss {self.last_loss:.4f}")
            if self.last_lr is not None:
                info.append(f"lr {self.last_lr:.2e}")
            if tps is not None:
                info.append(f"{tps:,.0f} tok/s")
            self._progress.update(self._task, completed=state.global_step, info="  ".join(info))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        tps, eta = self._rate(state)
        doc = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "time": round(time.time(), 3)}
        doc.update(logs)
        if "loss" in logs:
            self.last_loss = float(logs["loss"])
            if tps is not None:
                doc["tokens_per_s"] = round(tps, 1)
        if "learning_rate" in logs:
            self.last_lr = float(logs["learning_rate"])
        self._write_metrics(doc)
        if self._training and ("loss" in logs or any(k.startswith("eval_") for k in logs)):
            self._print_line(state, logs, tps, eta)

    def _print_line(self, state, logs: dict, tps, eta) -> None:
        parts = [f"step={state.global_step}/{state.max_steps}"]
        if "loss" in logs:
            parts.append(f"loss={float(logs['loss']):.4f}")
        if "reward" in logs:  # GRPO: the weighted mean reward of the step's completions
            parts.append(f"reward={float(logs['reward']):.4f}")
        if "eval_loss" in logs:
            parts.append(f"eval_loss={float(logs['eval_loss']):.4f}")
        if "learning_rate" in logs:
            parts.append(f"lr={float(logs['learning_rate']):.2e}")
        if "loss" in logs:
            parts.append(f"tok/s={tps:.0f}" if tps is not None else "tok/s=?")
            parts.append(f"eta={_fmt_eta(eta)}")
        line = " ".join(parts)
        if self._progress is not None:
            self._progress.console.print(line, highlight=False, markup=False)
        else:
            self._emit(line)

    def on_train_end(self, args, state, control, **kwargs):
        tps, _ = self._rate(state)
        self.train_tokens_per_s = tps
        self._training = False
        if self._progress is not None:
            self._progress.update(self._task, completed=state.global_step)
            self._progress.stop()
            self._progress = None
