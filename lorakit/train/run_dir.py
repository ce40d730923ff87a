"""The run directory: its layout, its state, atomic writes, and the rules for reusing one.

    RUN/
      state.json        running | interrupted | failed | finished, with timestamps (written atomically)
      recipe.yaml       the fully resolved recipe
      adapter/          adapter_model.safetensors + adapter_config.json + tokenizer (plain peft format)
      checkpoints/      Trainer checkpoints (checkpoint-N, marked complete by guards.CheckpointMarker)
      metrics.jsonl     one JSON line per log event
      summary.json      the run's outcome
      loss.png          loss curve (train and eval)
      merged/           merged checkpoint (output.save: merged | both)
      gguf/             model.gguf + Ollama Modelfile (output.save: gguf)

Every file is written to a temporary name and renamed; directories (the adapter) are written to
NAME.tmp and renamed, so a crash never leaves something that looks complete. A finished or existing
run is never replaced without `overwrite`, and even then only once `replace_old()` is called, i.e.
after the new run's inputs have been validated.

In a multi-process run (torchrun / accelerate launch) only the global rank 0 writes: on the other
ranks (`main` False) begin/set_state/write_*/truncate_metrics/replace_old do nothing and they never
judge the directory (check_new), so they cannot mistake rank 0's fresh `running` state for a rival.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.runtime.atomic import atomic_write_json, atomic_write_text, disk_errors
from lorakit.runtime.distributed import is_main_process

RUNNING, INTERRUPTED, FAILED, FINISHED = "running", "interrupted", "failed", "finished"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDir:
    """One run directory. Paths are attributes; state changes go through `set_state`."""

    def __init__(self, path: str | Path, *, main: bool | None = None):
        self.path = Path(path)
        self.main = is_main_process() if main is None else main  # only rank 0 writes
        self.state_file = self.path / "state.json"
        self.recipe_file = self.path / "recipe.yaml"
        self.adapter_dir = self.path / "adapter"
        self.checkpoints_dir = self.path / "checkpoints"
        self.metrics_file = self.path / "metrics.jsonl"
        self.summary_file = self.path / "summary.json"
        self.plot_file = self.path / "loss.png"
        self.merged_dir = self.path / "merged"

    # -- state -----------------------------------------------------------------------------------

    def read_state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    @property
    def state(self) -> str | None:
        doc = self.read_state()
        return doc.get("state") if doc else None

    def set_state(self, state: str, **extra: Any) -> dict:
        if not self.main:
            return self.read_state() or {}
        doc = self.read_state() or {}
        now = _now()
        doc.update({"state": state, "updated": now, **extra})
        doc.setdefault("created", now)
        if state == RUNNING:
            doc.update({"started": now, "pid": os.getpid(), "host": socket.gethostname()})
            doc.pop("error", None)
            doc.pop("finished", None)
        elif state == FINISHED:
            doc["finished"] = now
        self._write_state(doc)
        return doc

    def _write_state(self, doc: dict) -> None:
        """Write state.json atomically; on a full disk, overwrite it in place instead, when the new document
        fits in the blocks the file already has (no new space needed), so a run that stops because the
        disk is full is still recorded as failed or interrupted."""
        try:
            atomic_write_json(self.state_file, doc)
        except LorakitError:  # atomic writes raise it for a full / over-quota / read-only disk only
            if not self._overwrite_state_in_place(doc):
                raise

    def _overwrite_state_in_place(self, doc: dict) -> bool:
        data = (json.dumps(doc, indent=2, default=str) + "\n").encode("utf-8")
        try:
            st = self.state_file.stat()
            if len(data) > max(st.st_size, st.st_blocks * 512):
                return False
            fd = os.open(self.state_file, os.O_WRONLY)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.ftruncate(fd, len(data))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            return False
        return True

    def mark_failed(self, error: str, **extra: Any) -> None:
        """Record `failed` if at all possible; never raises (it runs while another error is on its way out,
        e.g. with a full disk, where even state.json may not be writable)."""
        try:
            self.set_state(FAILED, error=error, **extra)
        except (OSError, LorakitError):
            pass

    def _running_elsewhere(self, doc: dict | None) -> bool:
        if not self.main:  # rank 0 of the same job may have marked it running already
            return False
        if not doc or doc.get("state") != RUNNING:
            return False
        pid = doc.get("pid")
        return (doc.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid()
                and _pid_alive(pid))

    # -- reuse rules -----------------------------------------------------------------------------

    def is_empty(self) -> bool:
        return not self.path.exists() or (self.path.is_dir() and not any(self.path.iterdir()))

    def check_new(self, *, overwrite: bool) -> None:
        """Raise unless a new run may be written here (nothing there, or overwrite allowed)."""
        if not self.main:
            return
        if self.path.exists() and not self.path.is_dir():
            raise LorakitError(f"output.dir {self.path}: exists and is not a directory", field="output.dir")
        if self.is_empty():
            return
        doc = self.read_state()
        if self._running_elsewhere(doc):
            raise LorakitError(f"{self.path}: another lorakit process (pid {doc['pid']}) is training into it",
                               field="output.dir", hint="wait for it, or set output.dir to another directory")
        if overwrite:
            return
        state = doc.get("state") if doc else None
        what = f"a {state} run" if state else "files"
        hint = "pass --overwrite to replace it, or set output.dir (e.g. --set output.dir=runs/other)"
        if state in (INTERRUPTED, FAILED, RUNNING):
            hint = "pass --resume to continue it, " + hint
        raise LorakitError(f"{self.path} already holds {what}; it is never overwritten by default",
                           field="output.dir", hint=hint)

    def check_resumable(self, *, finished_ok: bool = False) -> None:
        """Raise unless the run here may be resumed (`finished_ok`: a finished one too, to train it further)."""
        if not self.path.is_dir():
            raise LorakitError(f"--resume: {self.path} does not exist", hint="train without --resume first")
        doc = self.read_state()
        if doc is None:
            raise LorakitError(f"--resume: {self.path} is not a lorakit run directory (no state.json)")
        if doc.get("state") == FINISHED and not finished_ok:
            raise LorakitError(f"--resume: the run in {self.path} already finished",
                               hint="use --overwrite to train it again")
        if self._running_elsewhere(doc):
            raise LorakitError(f"--resume: another lorakit process (pid {doc['pid']}) is training in {self.path}")

    def replace_old(self) -> None:
        """Remove an existing run (called only after the new run's inputs validated)."""
        if not self.main:
            return
        if self.path.is_dir() and not self.is_empty():
            trash = self.path.with_name(f".{self.path.name}.old-{os.getpid()}-{int(time.time())}")
            os.replace(self.path, trash)  # atomic: the old run disappears in one step
            shutil.rmtree(trash, ignore_errors=True)

    def begin(self, recipe_yaml: str, *, resumed: bool = False) -> None:
        if not self.main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.recipe_file, recipe_yaml)
        self.set_state(RUNNING, resumed=resumed)

    # -- writing ---------------------------------------------------------------------------------

    def write_json(self, name: str, doc: Any) -> Path:
        if not self.main:
            return self.path / name
        return atomic_write_json(self.path / name, doc)

    def write_text(self, name: str, text: str) -> Path:
        if not self.main:
            return self.path / name
        return atomic_write_text(self.path / name, text)

    @contextmanager
    def staged_dir(self, target: Path) -> Iterator[Path]:
        """Yield NAME.tmp to write into; on success it replaces `target` (an old one is removed).

        Whatever fails (a crash, a full disk), `target` is either the old directory or the new one,
        never a mix, and NAME.tmp is removed. A full/read-only disk raises a clean LorakitError.
        """
        tmp = target.with_name(target.name + ".tmp")
        old = target.with_name(target.name + ".old")
        try:
            with disk_errors(target):
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                yield tmp
                moved = False
                if target.exists():
                    shutil.rmtree(old, ignore_errors=True)
                    os.replace(target, old)
                    moved = True
                try:
                    os.replace(tmp, target)
                except BaseException:
                    if moved:  # put the old one back
                        os.replace(old, target)
                    raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)

    def truncate_metrics(self, max_step: int) -> None:
        """Keep metrics.jsonl lines up to `max_step` (a resumed run rewrites what follows)."""
        if not self.main:
            return
        if not self.metrics_file.exists():
            return
        kept = []
        for line in self.metrics_file.read_text(encoding="utf-8").splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= max_step:
                    kept.append(line)
            except (ValueError, TypeError, AttributeError):
                continue
        atomic_write_text(self.metrics_file, "".join(k + "\n" for k in kept))

    def read_metrics(self) -> list[dict]:
        if not self.metrics_file.exists():
            return []
        out = []
        for line in self.metrics_file.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


def find_run_dir(path: str | Path) -> RunDir:
    """A RunDir for an existing run (for generate/merge): it must have an adapter."""
    run = RunDir(path)
    if not run.path.is_dir():
        raise LorakitError(f"{run.path}: no such run directory")
    if not (run.adapter_dir / "adapter_config.json").is_file():
        state = run.state
        extra = f" (its state is {state})" if state else ""
        raise LorakitError(f"{run.path}: no finished adapter in this directory{extra}",
                           hint="point at a run directory written by `lorakit train`")
    return run
