"""CUDA graphs for checkpointed decoder layers (train.cuda_graphs).

Why: a lorakit step launches thousands of kernels from Python (transformers' layers, peft, bitsandbytes,
autograd), and the GPU idles a large part of the step waiting for them (docs/speed.md). Under gradient
checkpointing a decoder layer runs twice a step - a forward that keeps only its input, then in backward a
recompute and the layer's backward - and for batches of one shape both are the same kernels every step. So each
is captured once as a CUDA graph and replayed: a layer's hundreds of launches a step become a few replays.

How: transformers checkpoints a layer by calling its `_gradient_checkpointing_func(run, *args)`;
`GraphedCheckpoint` is that function. The first WARMUP_CALLS calls of a layer with a given input signature run
torch's own checkpoint (kernels compile, libraries initialise); the next one captures the layer as two graphs -
the forward without grad, and forward + backward with grad - in one memory pool shared by all layers (a layer's
intermediates live only while its graph replays) and around static input/output buffers shared by all layers.
`_Replay` replays them: its forward copies the input in, replays and keeps the input (as checkpointing does);
its backward replays the second graph and returns the input's and the LoRA weights' gradients.

Same math as checkpointing: the same kernels in the same order. LoRA dropout inside a graph takes its seeds from
device memory (lorakit.speed.kernels.lora_dropout.DeviceSeeds), drawn afresh before each forward replay and read
again by the recompute. Whatever a graph cannot hold runs torch's checkpoint: more than MAX_SIGNATURES shapes for a
layer, inputs that are neither CUDA tensors nor plain constants (flex attention's BlockMask, caches), a failed
capture.
The recompute inside the backward graph skips the base matmul of the layer's last linear where nothing reads its
output (lorakit.speed.recompute_tail, checked on the layer at capture).
Memory: the graphs' pool holds one layer's working set (what eager checkpointing frees and reuses), and all
layers share four hidden-state-sized buffers, one for the layer's LoRA gradients and one per other input.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from lorakit.speed import recompute_tail
from lorakit.speed.kernels import lora_dropout as lora_triton
from lorakit.speed.kernels.lora_dropout import DeviceSeeds

WARMUP_CALLS = 2  # eager calls of a layer before it is captured (Triton compiles, cuBLAS sets up)
MAX_SIGNATURES = 2  # input shapes captured per layer (the training shape, a last short batch); others run eager


class CudaRecorder:
    """Captures a function into a CUDA graph, after one warm-up run on the capture stream; every graph shares
    one memory pool (replays never overlap: one stream)."""

    def __init__(self, device: Any):
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    def record(self, fn: Callable[[], None]) -> Callable[[], None]:
        graph = torch.cuda.CUDAGraph()
        caller = torch.cuda.current_stream()
        self.stream.wait_stream(caller)
        try:
            with torch.cuda.stream(self.stream):
                fn()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                fn()
        finally:
            caller.wait_stream(self.stream)
        # the warm-up's blocks are cached for the capture stream, which nothing else allocates on: give them back
        torch.cuda.empty_cache()
        return graph.replay


class EagerRecorder:
    """Stands in for CudaRecorder where there is no GPU (tests): "replaying" runs the function again, reading and
    writing the same static buffers, so everything but the capture itself is exercised."""

    def record(self, fn: Callable[[], None]) -> Callable[[], None]:
        fn()  # as CudaRecorder's warm-up: what cannot run fails at capture
        return fn


def _autocast_state() -> tuple:
    dev = "cuda"
    return (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None)


def _autocast_ctx(state: tuple):
    """The caller's autocast state again, without autocast's cast cache (a cached cast made outside a capture
    would be read by every replay after it was freed)."""
    enabled, dtype = state
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype, cache_enabled=False)


class _Entry:
    """One layer captured for one input signature: its two graphs, its seeds and its trainable parameters."""

    def __init__(self, owner: GraphedCheckpoint, layer: Any, leaves: list, spec: Any):
        self.owner, self.layer, self.spec = owner, layer, spec
        self.named_params = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
        self.params = tuple(p for _, p in self.named_params)
        self.autocast = _autocast_state()
        h = leaves[0]
        self.tensor_slots = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor) and i > 0]
        self.consts = list(leaves)  # the non-tensor leaves stay as they are; tensor leaves become static buffers
        for i in self.tensor_slots:
            self.consts[i] = owner.buffer(("leaf", i), leaves[i])
        self.h = owner.buffer(("h",), h)
        self.out = owner.buffer(("out",), h)
        self.grad_out = owner.buffer(("grad_out",), h)
        self.grad_in = owner.buffer(("grad_in",), h)
        n = sum(p.numel() for p in self.params)
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) != 1:
            raise _NotGraphable("trainable parameters of several dtypes")
        self.grads = owner.buffer(("grads",), torch.empty(n, dtype=dtypes.pop(), device=h.device))
        n_lora = sum(len(m.lora_A) for m in layer.modules()
                     if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict))
        self.seeds = DeviceSeeds(max(1, 2 * n_lora), h.device)
        self.load_consts(leaves)  # the warm-up runs of the capture see this call's inputs
        self.h.copy_(h)
        self.seeds.refresh()
        self.tail = self._unread_tail()
        self.forward_graph = owner.recorder.record(self._forward)
        self.backward_graph = owner.recorder.record(self._backward)

    def _run_layer(self, x: Any, aliases: dict | None = None) -> Any:
        """The layer on `x` and the static buffers for its other inputs, itself, not checkpointed; `aliases`:
        tensors to use for its parameters (torch.func.functional_call)."""
        args, kwargs = tree_unflatten([x, *self.consts[1:]], self.spec)
        was = self.layer.gradient_checkpointing
        self.layer.gradient_checkpointing = False  # run it: this is the checkpointing function
        try:
            if aliases is None:
                out = self.layer(*args, **kwargs)
            else:
                out = torch.func.functional_call(self.layer, aliases, args, kwargs, strict=False)
        finally:
            self.layer.gradient_checkpointing = was
        if not isinstance(out, torch.Tensor) or out.shape != self.h.shape or out.dtype != self.h.dtype:
            raise _NotGraphable(f"the layer returned {type(out).__name__}, not a hidden state like its input")
        return out

    def _forward(self) -> None:
        with torch.no_grad(), _autocast_ctx(self.autocast), lora_triton.device_seeds(self.seeds):
            self.out.copy_(self._run_layer(self.h))

    def _unread_tail(self) -> Any:
        """The layer's last LoRA linear if its recompute may skip that linear's base matmul
        (lorakit.speed.recompute_tail: checked on this call's inputs), else None."""
        with contextlib.suppress(Exception):  # anything unexpected: recompute in full
            tail = recompute_tail.last_lora_module(self._forward)
            self.grad_out.normal_()  # a gradient to check with (the buffer is free until a backward loads it)
            if tail is not None and recompute_tail.verify(tail, self._grads):
                return tail
        return None

    def _grads(self) -> tuple:
        """The layer's recompute and backward on the static buffers: (input grad, *LoRA weight grads)."""
        # the LoRA weights enter as fresh leaves that alias them (same memory: replays read the current values):
        # the weights' own gradient accumulators were made on the default stream by eager steps, and routing the
        # captured backward through them would make that stream wait on the capture
        aliases = {n: p.detach().requires_grad_(True) for n, p in self.named_params}
        with torch.enable_grad(), _autocast_ctx(self.autocast), lora_triton.device_seeds(self.seeds):
            x = self.h.detach().requires_grad_(True)
            out = self._run_layer(x, aliases)
            return torch.autograd.grad(out, (x, *aliases.values()), self.grad_out, allow_unused=True)

    def _backward(self) -> None:
        skip = recompute_tail.skipping(self.tail) if self.tail is not None else contextlib.nullcontext()
        with skip:
            grads = self._grads()
        if grads[0] is None:
            self.grad_in.zero_()
        else:
            self.grad_in.copy_(grads[0])
        flat = [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads[1:], self.params)]
        torch.cat(flat, out=self.grads)

    def load_consts(self, leaves: list) -> None:
        """Copy the layer's other tensor inputs (position embeddings, masks, ids) into the static buffers: once
        per forward pass, since the layers share both the buffers and these inputs."""
        for i in self.tensor_slots:
            self.owner.load(("leaf", i), self.consts[i], leaves[i])


class _NotGraphable(Exception):
    pass


class _Replay(torch.autograd.Function):
    """A captured layer: forward replays the no-grad graph and keeps the input; backward replays the
    recompute-and-backward graph."""

    @staticmethod
    def forward(ctx, entry, leaves, h, *params):
        entry.load_consts(leaves)
        entry.h.copy_(h)
        entry.seeds.refresh()
        entry.forward_graph()
        # the input itself is kept only through save_for_backward (where activation offloading's pack hook sees it)
        ctx.entry, ctx.leaves = entry, [None, *leaves[1:]]
        ctx.save_for_backward(h)
        return entry.out.clone()

    @staticmethod
    def backward(ctx, grad):
        entry = ctx.entry
        (h,) = ctx.saved_tensors
        entry.load_consts(ctx.leaves)  # the same objects as in forward: copied again only if overwritten since
        entry.h.copy_(h)
        entry.grad_out.copy_(grad)
        entry.backward_graph()
        grad_in = entry.grad_in.clone() if ctx.needs_input_grad[2] else None
        flat, out, start = entry.grads.clone(), [], 0
        for p in entry.params:
            out.append(flat[start:start + p.numel()].view_as(p))
            start += p.numel()
        return (None, None, grad_in, *out)


class GraphedCheckpoint:
    """A layer's `_gradient_checkpointing_func` that replays CUDA graphs of the layer (see the module docstring).
    One instance serves every layer of a model. `recorder` captures (CudaRecorder on a GPU); `eager` checkpoints
    the calls that do not replay (torch's non-reentrant checkpoint unless given)."""

    def __init__(self, recorder: Any = None, eager: Callable | None = None):
        self.recorder = recorder
        self.eager = eager or _torch_checkpoint
        self._entries: dict = {}  # (layer id, signature) -> _Entry
        self._calls: dict = {}  # (layer id, signature) -> calls seen
        self._per_layer: dict = {}  # layer id -> signatures captured
        self._failed: dict = {}  # (layer id, signature) -> why it runs eager
        self._buffers: dict = {}  # (name, shape, dtype) -> static tensor shared by the layers
        self._loaded: dict = {}  # buffer key -> (the tensor last copied into it, its version then)
        self.skipped: dict = {}  # why a call could not replay a graph -> calls
        self._layer_problem: dict = {}  # layer id -> why it cannot be captured at all ("" if it can)
        self.failure_trace = ""  # the first failed capture's traceback (for debugging)
        self._replay = _Replay  # the autograd function a graphed call applies (tests wrap it)

    @property
    def captured(self) -> int:
        """Layer signatures captured so far."""
        return len(self._entries)

    @property
    def tails_skipped(self) -> int:
        """Captured layer signatures whose recompute skips the last linear's base matmul
        (lorakit.speed.recompute_tail)."""
        return sum(1 for e in self._entries.values() if e.tail is not None)

    @property
    def failures(self) -> dict:
        """Why captures failed -> how many layer shapes (those layers run torch's checkpoint)."""
        out: dict = {}
        for why in self._failed.values():
            out[why] = out.get(why, 0) + 1
        return out

    def buffer(self, name: tuple, like: Any) -> Any:
        key = (*name, tuple(like.shape), like.dtype, like.device)
        if key not in self._buffers:
            self._buffers[key] = torch.zeros_like(like, memory_format=torch.contiguous_format)
        return self._buffers[key]

    def load(self, name: tuple, buf: Any, src: Any) -> None:
        """Copy `src` into the shared buffer unless it holds that tensor, unchanged, already."""
        key = (*name, tuple(buf.shape), buf.dtype, buf.device)
        last = self._loaded.get(key)
        if last is None or last[0] is not src or last[1] != src._version:
            buf.copy_(src)
            self._loaded[key] = (src, src._version)

    def __call__(self, run: Any, *args: Any) -> Any:
        if not torch.is_grad_enabled():
            return run(*args)
        found = self._graphable(run, args)
        if found is None:
            return self.eager(run, *args)
        layer, leaves, spec, key = found
        entry = self._entries.get(key)
        if entry is None:
            if self.recorder is None:
                self._skip("no captures after a failed one")
                return self.eager(run, *args)
            calls = self._calls[key] = self._calls.get(key, 0) + 1
            if calls <= WARMUP_CALLS or key in self._failed or self._per_layer.get(id(layer), 0) >= MAX_SIGNATURES:
                return self.eager(run, *args)
            try:
                entry = _Entry(self, layer, leaves, spec)
            except Exception as e:  # a capture that fails leaves this layer and shape to torch's checkpoint
                self._failed[key] = f"{type(e).__name__}: {e}"[:300]
                self.failure_trace = self.failure_trace or traceback.format_exc()
                if isinstance(self.recorder, CudaRecorder):  # after a failed capture no further one is tried
                    self.recorder = None
                return self.eager(run, *args)
            self._entries[key] = entry
            self._per_layer[id(layer)] = self._per_layer.get(id(layer), 0) + 1
        return self._replay.apply(entry, leaves, leaves[0], *entry.params)

    def _graphable(self, run: Any, args: tuple) -> tuple | None:
        """(layer, leaves, spec, key) when this call can replay a graph, else None (the reason counted in
        `skipped`)."""
        layer = _layer_of(run)
        if layer is None:
            return self._skip("not a layer's forward")
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return self._skip("capturing")
        leaves, spec = tree_flatten((args, run.keywords))
        if not leaves or not args or leaves[0] is not args[0] or not isinstance(leaves[0], torch.Tensor):
            return self._skip("the first input is not the hidden state")
        cuda = isinstance(self.recorder, CudaRecorder)
        sig = [spec, _autocast_state()]
        for i, v in enumerate(leaves):
            if isinstance(v, torch.Tensor):
                if i > 0 and v.requires_grad:
                    return self._skip("an input other than the hidden state requires grad")
                if cuda and not v.is_cuda:
                    return self._skip("an input is not on the GPU")
                sig.append((tuple(v.shape), v.dtype))
            elif v is None or isinstance(v, (bool, int, float, str)):
                sig.append(v)
            else:
                return self._skip(f"an input is a {type(v).__name__}")
        why = self._layer_problem.get(id(layer), "?")
        if why == "?":
            why = self._layer_problem[id(layer)] = _layer_problem(layer)
        if why:
            return self._skip(why)
        return layer, leaves, spec, (id(layer), tuple(sig))

    def _skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1
        return None


def _layer_problem(layer: Any) -> str:
    """Why `layer` cannot replay as graphs at all, or "". Random numbers other than LoRA dropout's (whose seeds
    live in device memory) would differ between a replayed forward and its replayed recompute: torch's
    checkpoint restores the generator's state for the recompute, a graph cannot."""
    if not any(p.requires_grad for p in layer.parameters()):
        return "no trainable parameters"
    lora_dropouts = {id(d) for m in layer.modules() if isinstance(getattr(m, "lora_dropout", None),
                                                                   torch.nn.ModuleDict)
                     for d in m.lora_dropout.values()}
    for name, m in layer.named_modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 and id(m) not in lora_dropouts:
            return f"dropout in {name or 'the layer'} (p={m.p})"
        if float(getattr(m, "attention_dropout", 0) or 0) > 0:
            return f"attention dropout in {name or 'the layer'}"
    return ""


def _layer_of(run: Any) -> Any:
    """The module whose forward `run` is: transformers passes partial(forward, layer, **kwargs) (recent
    releases) or partial(layer.__call__, **kwargs) (5.17 and before)."""
    if not hasattr(run, "keywords"):
        return None
    if len(run.args) == 1 and isinstance(run.args[0], torch.nn.Module):
        return run.args[0]
    owner = getattr(run.func, "__self__", None)
    return owner if not run.args and isinstance(owner, torch.nn.Module) else None


def _torch_checkpoint(run: Callable, *args: Any) -> Any:
    return checkpoint(run, *args, use_reentrant=False)


def enable(layers: list, recorder: Any = None, eager: Callable | None = None) -> GraphedCheckpoint:
    """Checkpoint the checkpointed ones of `layers` (transformers GradientCheckpointingLayer instances) through
    CUDA graphs: replaces the function the layers call, checkpointing itself stays on (speed.set_checkpointing).
    `eager`: the checkpoint function for calls that do not replay (GraphedCheckpoint)."""
    graphed = GraphedCheckpoint(recorder or CudaRecorder(torch.cuda.current_device()), eager)
    for layer in layers:
        if layer.gradient_checkpointing:
            layer._gradient_checkpointing_func = graphed
    return graphed


def find(model: Any) -> GraphedCheckpoint | None:
    """The GraphedCheckpoint serving `model`'s layers, if any (for the run's report); also where a wrapper around
    it (activation offloading's) holds it as `inner`."""
    for m in model.modules():
        f = getattr(m, "_gradient_checkpointing_func", None)
        f = getattr(f, "inner", f)
        if isinstance(f, GraphedCheckpoint):
            return f
    return None
