"""The CUDA caching allocator's expandable segments for a training run (train.expandable_segments).

Why: PyTorch's caching allocator keeps the blocks a step frees and carves later requests out of them; blocks of
the wrong size pile up as reserved memory nobody uses, well above the allocated peak (docs/speed.md). Expandable
segments map memory into
segments that grow in place instead, which PyTorch documents as the remedy for fragmentation (the
`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True` setting; Unsloth turns it on by default too). Same math: only
where tensors live changes.

A PYTORCH_CUDA_ALLOC_CONF the user set wins: lorakit then leaves the allocator alone.
"""

from __future__ import annotations

import os

import torch

ENV = "PYTORCH_CUDA_ALLOC_CONF"


def use_expandable_segments(wanted: bool) -> bool:
    """Turn expandable segments on for this process (call before the model loads); True when they are on."""
    if ENV in os.environ:  # the user's setting: on exactly when it says so
        return "expandable_segments:true" in os.environ[ENV].replace(" ", "").lower()
    if not wanted:
        return False
    if not torch.cuda.is_available():
        return False
    try:  # the setting for allocations from now on (the allocator may be initialised already: no env var then)
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
    except (AttributeError, RuntimeError):  # a torch without the setting: the default allocator
        return False
    return True
