"""Atomic file writes: write beside the target, then rename, so a crash never leaves half a file.

A write that fails because the disk is full, over quota or read-only raises a `LorakitError`
(exit 1) naming the path and the reason, never a bare OSError: `disk_error` / `disk_errors` do that
translation, for these writes and for any other code that writes into a run directory.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lorakit.errors import EXIT_RUNTIME, LorakitError

# errno -> (what happened, what to do about it)
DISK_ERRNOS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free some space (old runs, checkpoints, caches) or set "
                   "output.dir to a disk with room, then continue with --resume"),
    errno.EDQUOT: ("disk quota exceeded", "free some space within your quota or set output.dir to another disk, "
                   "then continue with --resume"),
    errno.EROFS: ("read-only file system", "set output.dir to a writable directory"),
}
# Libraries that write through their own I/O report the same errors without an OSError: safetensors raises
# SafetensorError("... No space left on device (os error 28)"); these phrases find them in any message.
_PHRASES: dict[int, tuple[str, ...]] = {
    errno.ENOSPC: ("no space left on device", "os error 28"),
    errno.EDQUOT: ("disk quota exceeded", "os error 122"),
    errno.EROFS: ("read-only file system", "os error 30"),
}
# Below this much free space, a failure while writing is taken for a full disk: torch.save on a full disk
# raises only RuntimeError("[enforce fail at inline_container.cc] . unexpected pos ...").
LOW_SPACE_BYTES = 1 << 20


def _errno_of(exc: BaseException | None) -> int | None:
    """The disk errno behind `exc` or the exceptions it was raised from, if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            return exc.errno
        if not isinstance(exc, LorakitError):
            text = str(exc).lower()
            for code, phrases in _PHRASES.items():
                if any(p in text for p in phrases):
                    return code
        exc = exc.__cause__ or exc.__context__
    return None


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the file system holding `path` (or its nearest existing parent); None if unknown."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_disk_error(exc: BaseException) -> bool:
    return _errno_of(exc) is not None


def disk_error(exc: BaseException, path: str | Path | None = None, *, what: str = "writing",
               check_free: bool = False) -> LorakitError | None:
    """The clean error (exit 1) for a full, over-quota or read-only disk; None when `exc` is something else.

    `path` names what was being written (an OSError's own filename wins). With `check_free`, any other
    exception counts as a full disk when the file system of `path` has less than LOW_SPACE_BYTES free.
    """
    if isinstance(exc, LorakitError) or not isinstance(exc, Exception):
        return None
    code = _errno_of(exc)
    detail = ""
    if code is None and check_free and path is not None:
        free = free_bytes(path)
        if free is not None and free < LOW_SPACE_BYTES:
            code = errno.ENOSPC
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            detail = f" ({free} bytes free; the error was {type(exc).__name__}: {first})"
    if code is None:
        return None
    reason, hint = DISK_ERRNOS[code]
    where = getattr(exc, "filename", None)
    if where is None or (path is not None and str(where).endswith(".tmp")):  # name the target, not a temp file
        where = path
    target = f" {where}" if where else ""
    return LorakitError(f"{what}{target} failed: {reason}{detail}", hint=hint, exit_code=EXIT_RUNTIME)


@contextmanager
def disk_errors(path: str | Path | None = None, *, what: str = "writing") -> Iterator[None]:
    """Turn a disk-full/quota/read-only error raised inside the block into a clean LorakitError."""
    try:
        yield
    except Exception as e:
        err = disk_error(e, path, what=what)
        if err is None:
            raise
        raise err from e


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same directory and os.replace."""
    path = Path(path)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, doc: Any) -> Path:
    return atomic_write_text(path, json.dumps(doc, indent=2, default=str) + "\n")
