"""What this machine runs on: the device, CPU threads, and the dtypes a recipe's `auto` values resolve to here.

Nothing here imports torch at module level: the estimate and validation read the dtype rules without a GPU.
"""

from __future__ import annotations

import os

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "uint8": "uint8"}


def pick_device() -> str:
    """"cuda" where torch sees a GPU, else "cpu"."""
    import torch  # torch-free at import: the CLI's start-up path reads this module

    return "cuda" if torch.cuda.is_available() else "cpu"


def local_gpu() -> tuple[str, int] | None:
    """(name, total memory in bytes) of this machine's first CUDA GPU, or None without one."""
    import torch  # torch-free at import (see pick_device)

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, int(props.total_memory)


def cpu_threads() -> int:
    """Threads for CPU math: OMP_NUM_THREADS if set, else the cores not already busy (at least 1).

    On a CPU that other processes keep busy, OpenMP threads that wait for each other at every small
    op make a step several times slower than one thread would; using only the idle cores avoids that.
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def torch_dtype(name: str):
    """The torch dtype of a recipe dtype name ("bf16", "fp16", "fp32", "uint8")."""
    import torch  # see pick_device

    return getattr(torch, _DTYPES[name])


def auto_dtype_name(device: str) -> str:
    """bf16 on a CUDA GPU that supports it, fp16 on other CUDA GPUs, fp32 on CPU."""
    if device == "cuda":
        import torch  # see pick_device

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def weights_dtype_name(recipe, device: str) -> str:
    """model.dtype with `auto` resolved for `device`."""
    return auto_dtype_name(device) if recipe.model.dtype == "auto" else recipe.model.dtype


def compute_dtype_name(recipe, device: str) -> str:
    """quantization.compute_dtype with `auto` resolved for `device`."""
    q = recipe.quantization.compute_dtype
    return auto_dtype_name(device) if q == "auto" else q


def run_dtype_name(recipe, device: str) -> str:
    """The dtype the run computes in: a quantized base's compute dtype, else its weights' dtype."""
    bits = recipe.quantization.resolved_bits(device)
    return compute_dtype_name(recipe, device) if bits else weights_dtype_name(recipe, device)
