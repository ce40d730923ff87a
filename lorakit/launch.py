"""`lorakit train --gpus N`: hand the same command over to accelerate's launcher (one process a GPU).

No home-made launcher: accelerate starts N copies of `python -m lorakit train ...` with the usual
RANK/LOCAL_RANK/WORLD_SIZE environment; each copy sees LOCAL_RANK and does not relaunch.
"""

from __future__ import annotations

import subprocess
import sys


def strip_gpus(argv: list[str]) -> list[str]:
    """argv without `--gpus N` / `--gpus=N`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            out.append(a)
    return out


def launch_command(gpus: int, argv: list[str], config: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus)]
    if config:
        cmd += ["--config_file", config]
    elif gpus > 1:
        cmd += ["--multi_gpu"]
    return cmd + ["-m", "lorakit", *strip_gpus(argv)]


def relaunch(gpus: int, argv: list[str]) -> int:
    """Run the launcher (argument list, never a shell) and return its exit code."""
    return subprocess.call(launch_command(gpus, argv))
