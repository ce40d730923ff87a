"""Which process am I? Rank 0 prints and writes; every rank trains.

Launchers (torchrun, `accelerate launch`, srun + accelerate) start one process per GPU and tell each
its place through the environment: RANK (global), LOCAL_RANK (on this host), WORLD_SIZE. These helpers
read that environment first, so they cost nothing and work before torch.distributed is set up; once a
process group exists they ask it instead. Without a launcher: rank 0 of a world of 1.

Only the global rank 0 writes the run directory (on a shared filesystem for multi-node runs) and
prints progress; the others train silently and report only their own failure.
"""

from __future__ import annotations

import os
import sys


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value.lstrip("-").isdigit() else None


def _group():
    """torch.distributed when it is imported and initialized (never imports torch itself)."""
    if "torch" not in sys.modules:
        return None
    try:
        import torch.distributed as dist  # torch is loaded already (checked above): a lookup, not a load

        return dist if dist.is_available() and dist.is_initialized() else None
    except Exception:  # noqa: BLE001 - a broken torch install must not break printing
        return None


def rank() -> int:
    """Global rank of this process (0 without a launcher)."""
    dist = _group()
    if dist is not None:
        return dist.get_rank()
    return _env_int("RANK") or 0


def local_rank() -> int:
    """Rank on this host (selects the GPU)."""
    return _env_int("LOCAL_RANK") or 0


def world_size() -> int:
    """Number of processes in the job (1 without a launcher)."""
    dist = _group()
    if dist is not None:
        return dist.get_world_size()
    return max(1, _env_int("WORLD_SIZE") or 1)


def is_main_process() -> bool:
    """True on the global rank 0: the process that prints and writes artifacts."""
    return rank() == 0


def launched() -> bool:
    """True inside a process started by torchrun / accelerate launch (which must not relaunch)."""
    return "LOCAL_RANK" in os.environ or world_size() > 1


def _accelerate_type() -> str | None:
    """The distributed type accelerate settled on, once its state exists (never imports accelerate)."""
    if "accelerate" not in sys.modules:
        return None
    try:
        from accelerate.state import AcceleratorState  # loaded already (checked above): a lookup

        if not AcceleratorState._shared_state:
            return None
        return str(AcceleratorState().distributed_type).rsplit(".", 1)[-1]
    except Exception:  # noqa: BLE001
        return None


def strategy() -> str:
    """single | ddp | fsdp | deepspeed: the engine in use (accelerate's state once the Trainer made one,
    else what the launcher asked for). On CPU accelerate has no FSDP: a run asked for fsdp is ddp there."""
    if world_size() <= 1:
        return "single"
    kind = _accelerate_type()
    if kind is not None:
        return {"FSDP": "fsdp", "DEEPSPEED": "deepspeed", "NO": "single"}.get(kind, "ddp")
    truthy = {"1", "true", "yes"}
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in truthy:
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in truthy:
        return "deepspeed"
    return "ddp"


def wait_for_everyone() -> None:
    """Barrier across all ranks (no-op without a process group)."""
    dist = _group()
    if dist is not None and dist.get_world_size() > 1:
        dist.barrier()


def describe() -> dict:
    """For the run summary: world size, strategy, backend, hosts."""
    dist = _group()
    backend = None
    if dist is not None:
        try:
            backend = str(dist.get_backend())
        except Exception:  # noqa: BLE001
            backend = None
    nodes = _env_int("GROUP_WORLD_SIZE") or _env_int("NNODES") or _env_int("SLURM_NNODES")
    local_world = _env_int("LOCAL_WORLD_SIZE")
    if nodes is None and local_world:
        nodes = max(1, world_size() // local_world)
    return {"world_size": world_size(), "strategy": strategy(), "backend": backend, "num_machines": nodes or 1}


def rank_label() -> str:
    """'rank 1/2' inside a multi-process job, '' otherwise (for error messages)."""
    return f"rank {rank()}/{world_size()}" if world_size() > 1 else ""


__all__ = ["describe", "is_main_process", "launched", "local_rank", "rank", "rank_label", "strategy",
           "wait_for_everyone", "world_size"]
