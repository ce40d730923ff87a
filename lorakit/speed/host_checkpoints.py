"""Checkpointed layer inputs kept in host memory (train.offload_activations).

Why: with every decoder layer checkpointed, what the GPU still holds across a step is each layer's input hidden
state, tokens x hidden per layer: O(layers) checkpoints, the largest activation term at long rows. Here each one
is copied to pinned host memory on a side stream as the forward passes it and brought back for the layer's
recompute, one layer ahead of the backward (double-buffered), so the GPU holds O(1) of them. The copies
overlap the layers' compute; the math is unchanged (the same values come back).

How: a checkpointed layer calls `OffloadingCheckpoint(run, *args)` (set as the layers' checkpointing function).
It runs the layer through a checkpoint function whose autograd node saves the layer input with
`save_for_backward` - torch's reentrant checkpoint, or layer_graphs' replay - inside
`torch.autograd.graph.saved_tensors_hooks`, whose pack hook offloads exactly that tensor (`HostStore.pack`) and
whose unpack hook returns it (`HostStore.unpack`). Unpacking a layer's input starts the copy back of the
layer before it (packed just before it, unpacked next). The GPU copy of a packed tensor is freed once its copy
to the host has run (the allocator waits for the side stream: `record_stream`); a copy back is allocated on the
compute stream, which frees it (its memory stays in that stream's pool); host buffers come from torch's caching
pinned-memory allocator, reused step after step.
On a CPU (tests) the same bookkeeping runs with plain copies and no streams.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


class _Stored:
    """One offloaded tensor: its host copy, the event its copy to the host recorded, and once fetched its device
    copy and the event of that copy."""

    __slots__ = ("host", "copied", "device", "device_copy", "fetched", "prev", "used")

    def __init__(self, host: torch.Tensor, copied: Any, device: torch.device, prev: _Stored | None):
        self.host, self.copied, self.device, self.prev = host, copied, device, prev
        self.device_copy: torch.Tensor | None = None
        self.fetched: Any = None
        self.used = False


class HostStore:
    """Moves tensors to host memory and back (see the module docstring). One instance per model."""

    def __init__(self) -> None:
        self._streams: dict = {}  # device -> side stream for the copies
        self._last: _Stored | None = None  # the most recently packed (a new step's first pack: already used)
        self.packed = 0  # tensors offloaded so far (the run's report)
        self.prefetched = 0  # unpacks whose copy back had started ahead of them

    def _stream(self, device: torch.device) -> Any:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def pack(self, t: torch.Tensor) -> _Stored:
        """Start copying `t` to host memory; the returned handle stands for it in the autograd graph."""
        prev = self._last if self._last is not None and not self._last.used else None
        if not t.is_cuda:
            stored = _Stored(t.detach().to("cpu", copy=True), None, t.device, prev)
        else:
            side = self._stream(t.device)
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            side.wait_stream(torch.cuda.current_stream(t.device))  # t is written
            with torch.cuda.stream(side):
                host.copy_(t, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(side)
            t.record_stream(side)  # its GPU memory is not reused before the copy has read it
            stored = _Stored(host, copied, t.device, prev)
        self._last = stored
        self.packed += 1
        return stored

    def _fetch(self, s: _Stored) -> None:
        """Start the copy of `s` back to its device (once)."""
        if s.device_copy is not None or s.used:
            return
        if s.device.type != "cuda":
            s.device_copy = s.host.to(s.device, copy=True)
            return
        side = self._stream(s.device)
        current = torch.cuda.current_stream(s.device)
        # allocated on the compute stream, so that its memory returns to that stream's pool (a block allocated on
        # the side stream could serve only the side stream again); the side stream waits for what the compute
        # stream has queued, which may still be using that memory
        s.device_copy = torch.empty(s.host.shape, dtype=s.host.dtype, device=s.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            side.wait_event(s.copied)
            s.device_copy.copy_(s.host, non_blocking=True)
            s.fetched = torch.cuda.Event()
            s.fetched.record(side)

    def unpack(self, s: _Stored) -> torch.Tensor:
        """The tensor `s` stands for, on its device; starts bringing back the one packed before it."""
        if s.used:  # a second backward through the same graph (retain_graph): a plain copy
            return s.host.to(s.device)
        ahead = s.device_copy is not None
        self._fetch(s)
        t = s.device_copy
        if s.fetched is not None:
            torch.cuda.current_stream(s.device).wait_event(s.fetched)
        # each checkpoint is read once a backward; the host copy lives as long as the autograd node that holds `s`
        s.device_copy, s.fetched, s.used = None, None, True
        self.prefetched += ahead
        if s.prev is not None:
            self._fetch(s.prev)
            s.prev = None
        return t


def reentrant_checkpoint(run: Callable, *args: Any) -> Any:
    """torch's reentrant checkpoint of a layer, whose node saves the layer's input with save_for_backward (where
    the pack hook sees it). The input is made to require grad where it does not (a frozen embedding's output):
    the reentrant checkpoint computes the layer's parameter gradients only when an input requires grad."""
    h = args[0]
    if isinstance(h, torch.Tensor) and not h.requires_grad and torch.is_grad_enabled():
        h = h.detach().requires_grad_(True)
    return checkpoint(run, h, *args[1:], use_reentrant=True)


class OffloadingCheckpoint:
    """A decoder layer's checkpointing function that keeps the layer's input in host memory between the forward
    and the recompute. `inner`: the checkpoint function to run (reentrant_checkpoint, or layer_graphs'
    GraphedCheckpoint built with `eager=reentrant_checkpoint`); its node must save the input with
    save_for_backward."""

    def __init__(self, inner: Callable = reentrant_checkpoint, store: HostStore | None = None):
        self.inner = inner
        self.store = store or HostStore()

    def __call__(self, run: Callable, *args: Any) -> Any:
        h = args[0] if args else None
        if not torch.is_grad_enabled():
            return run(*args)
        if not isinstance(h, torch.Tensor):
            return self.inner(run, *args)
        with torch.autograd.graph.saved_tensors_hooks(self._packer(h), self._unpack):
            return self.inner(run, *args)

    def _packer(self, h: torch.Tensor) -> Callable:
        key = (h.data_ptr(), tuple(h.shape), h.dtype)

        def pack(t: torch.Tensor) -> Any:
            if (t.data_ptr(), tuple(t.shape), t.dtype) == key:
                return self.store.pack(t)
            return t  # the layer's other inputs (position embeddings, masks) are shared by every layer

        return pack

    def _unpack(self, x: Any) -> torch.Tensor:
        return self.store.unpack(x) if isinstance(x, _Stored) else x


def enable(model: Any, layers: list, inner: Callable | None = None) -> OffloadingCheckpoint:
    """Offload the inputs of the checkpointed ones of `layers` (transformers GradientCheckpointingLayer instances
    inside `model`): their checkpointing function becomes an OffloadingCheckpoint around `inner` (default: the
    reentrant checkpoint), and stays it when checkpointing is turned off and on again. Checkpointing itself stays
    on (lorakit.speed.checkpointing.set_checkpointing).

    Args:
        model: the module whose forward runs the layers; a forward pre-hook on it puts the function back.
        layers: the decoder layers.
        inner: the checkpoint function the offloading wraps.

    Returns:
        The OffloadingCheckpoint the layers share.
    """
    off = OffloadingCheckpoint(inner or reentrant_checkpoint)
    checkpointed = [layer for layer in layers if layer.gradient_checkpointing]

    def keep(module: Any, args: Any) -> None:
        # TRL's generation turns the model's checkpointing off and on again (GRPO), which installs transformers'
        # own function: put this one back before any layer runs. On the model, not the layers: in some
        # transformers versions a layer chooses its checkpoint function before its own pre-hooks run.
        for layer in checkpointed:
            if layer.gradient_checkpointing and layer._gradient_checkpointing_func is not off:
                layer._gradient_checkpointing_func = off

    for layer in checkpointed:
        layer._gradient_checkpointing_func = off
    model.register_forward_pre_hook(keep)
    return off


def find(model: Any) -> OffloadingCheckpoint | None:
    """The OffloadingCheckpoint serving `model`'s layers, if any (for the run's report)."""
    for m in model.modules():
        f = getattr(m, "_gradient_checkpointing_func", None)
        if isinstance(f, OffloadingCheckpoint):
            return f
    return None


__all__ = ["HostStore", "OffloadingCheckpoint", "enable", "find", "reentrant_checkpoint"]
