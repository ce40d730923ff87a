"""bitsandbytes' 8-bit AdamW without a GPU synchronization after each tensor's update (SFT on CUDA).

Why: bitsandbytes' `Optimizer8bit.step` calls `torch.cuda.synchronize()` after every parameter's update; a
QLoRA adapter has hundreds of tensors (one A and one B per adapted linear of every layer), so each step the GPU
drains its queue once per tensor and idles while Python prepares the next update. The updates are kernels on one
stream, ordered without the synchronizations; what the optimizer still idles is its per-tensor launches from
Python (measurements: docs/speed.md).

Same optimizer, same kernels, same math: a subclass of the optimizer class the Trainer would build for
`paged_adamw_8bit` / `adamw_8bit` whose `step` runs bitsandbytes' own per-tensor steps (init_state,
prefetch_state, update_step) and keeps the one synchronization paged states need at the end.

One update for many tensors: even without the synchronizations each tensor's update is a launch from Python
that costs more host time than the small kernel takes on the GPU, and the GPU waits for them. bitsandbytes'
blockwise 8-bit update works on blocks
of 256 elements, each with its own scale, so tensors whose sizes are multiples of 256 can be updated as one:
their 8-bit states live in shared buffers (each tensor's state a view into them, so `state_dict` keeps
bitsandbytes' per-tensor format), and one call updates the concatenated parameters and gradients - the same
blocks, scales and arithmetic as one call per tensor, bit for bit (tests/test_optim.py). Tensors that differ
(another step count or dtype, a per-parameter override, 32-bit states, a size off the block) keep the
per-tensor update.
"""

from __future__ import annotations

from typing import Any

import torch
from bitsandbytes import functional as F
from bitsandbytes.utils import sync_gpu
from transformers import Trainer

NO_SYNC_OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit")


def no_sync_class(cls: type) -> type:
    """A subclass of bitsandbytes optimizer class `cls` (an Optimizer8bit) without the per-tensor syncs."""
    class NoSync(cls):
        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            last = None
            for gindex, group in enumerate(self.param_groups):
                together = _update_together(self, gindex, group)
                if together:
                    last = together[-1]
                done = {id(p) for p in together}
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None or id(p) in done:
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.prefetch_state(p)
                    self.update_step(group, p, gindex, pindex)
                    last = p
            if self.is_paged and last is not None:  # paged states are copied asynchronously
                sync_gpu(last)
            return loss

    NoSync.__name__ = NoSync.__qualname__ = f"{cls.__name__}NoSync"
    return NoSync


BLOCK = 256  # bitsandbytes' block of the 8-bit blockwise optimizer states (one absmax per block)


class _Shared:
    """The 8-bit states of a set of tensors in shared buffers, in the tensors' order."""

    def __init__(self, opt: Any, params: list):
        device = params[0].device
        self.params = params
        self.sizes = [p.numel() for p in params]
        total = sum(self.sizes)
        shape_of = torch.empty(total, dtype=torch.uint8, device=device)  # get_state_buffer pages it if it should
        self.s1 = opt.get_state_buffer(shape_of, dtype=torch.uint8)
        self.s2 = opt.get_state_buffer(shape_of, dtype=torch.uint8)
        self.a1 = torch.zeros(total // BLOCK, dtype=torch.float32, device=device)
        self.a2 = torch.zeros(total // BLOCK, dtype=torch.float32, device=device)
        if "dynamic" not in opt.name2qmap:
            opt.fill_qmap()
        opt.name2qmap["dynamic"] = opt.name2qmap["dynamic"].to(device)
        opt.name2qmap["udynamic"] = opt.name2qmap["udynamic"].to(device)
        off, self.ptrs = 0, []
        for p, n in zip(params, self.sizes):
            state = opt.state[p]
            views = {"state1": self.s1[off:off + n].view(p.shape), "state2": self.s2[off:off + n].view(p.shape),
                     "absmax1": self.a1[off // BLOCK:(off + n) // BLOCK],
                     "absmax2": self.a2[off // BLOCK:(off + n) // BLOCK]}
            for key, view in views.items():
                if key in state:  # a state of its own (a loaded checkpoint): taken over
                    view.copy_(state[key].reshape(view.shape))
                state[key] = view
            state.setdefault("step", 0)
            state["qmap1"], state["qmap2"] = opt.name2qmap["dynamic"], opt.name2qmap["udynamic"]
            self.ptrs.append(state["state1"].data_ptr())
            off += n

    def holds(self, opt: Any) -> bool:
        """Every tensor's state is still the view into these buffers (a load_state_dict replaces them)."""
        for p, ptr in zip(self.params, self.ptrs):
            s1 = opt.state[p].get("state1")
            if s1 is None or s1.data_ptr() != ptr:
                return False
        return True


def _update_together(opt: Any, gindex: int, group: dict) -> list:
    """Update the group's tensors that bitsandbytes would update alike with one call (see the module
    docstring); return them (the others are left to the per-tensor update)."""
    if not hasattr(opt, "name2qmap") or getattr(opt, "optimizer_name", None) != "adam":
        return []
    if opt.args.optim_bits != 8 or opt.args.max_unorm > 0:
        return []
    min_8bit_size = opt.args.min_8bit_size
    members, step, first = [], None, None
    for pindex, p in enumerate(group["params"]):
        g = p.grad
        state = opt.state[p]
        if (g is None or type(p.data) is not torch.Tensor or type(g) is not torch.Tensor  # not DTensors (FSDP2)
                or g.dtype != p.dtype or not p.is_contiguous() or p.numel() % BLOCK
                or p.numel() < min_8bit_size
                or (gindex, pindex) in opt.mng.index2config or id(p) in opt.mng.pid2config
                or (state and state.get("state1") is not None and state["state1"].dtype != torch.uint8)):
            continue
        if members and (p.dtype != members[0].dtype or p.device != members[0].device):
            continue
        s = state.get("step", 0)
        if step is None:
            step = s
        if s == step:
            members.append(p)
            first = pindex if first is None else first
    if len(members) < 2:
        return []
    if not hasattr(opt, "lk_shared"):
        opt.lk_shared = {}  # param group index -> _Shared
    shared = opt.lk_shared.get(gindex)
    if shared is None or [id(p) for p in shared.params] != [id(p) for p in members] or not shared.holds(opt):
        shared = opt.lk_shared[gindex] = _Shared(opt, members)
    config = opt.get_config(gindex, first, group)  # the group's: members have no overrides of their own
    step += 1
    for p in members:
        opt.state[p]["step"] = step
    flat_p = torch.cat([p.view(-1) for p in members])
    flat_g = torch.cat([p.grad.reshape(-1) for p in members])
    if getattr(shared.s1, "is_paged", False):
        F.prefetch_tensor(shared.s1)
        F.prefetch_tensor(shared.s2)
    betas = config["betas"]
    F.optimizer_update_8bit_blockwise(
        opt.optimizer_name, flat_g, flat_p, shared.s1, shared.s2, betas[0], betas[1],
        betas[2] if len(betas) >= 3 else 0.0, config.get("alpha", 0.0), config["eps"], step, config["lr"],
        opt.name2qmap["dynamic"], opt.name2qmap["udynamic"], shared.a1, shared.a2, config["weight_decay"],
        gnorm_scale=1.0, skip_zeros=config["skip_zeros"])
    torch._foreach_copy_([p.view(-1) for p in members], list(torch.split(flat_p, shared.sizes)))
    return members


def optimizer_cls_and_kwargs(args: Any, model: Any) -> tuple | None:
    """(class, kwargs) for the Trainer's `optimizer_cls_and_kwargs`: the class transformers would build for
    `args.optim` made sync-free, its kwargs unchanged; None where the Trainer's own choice stays (a CPU run, not
    a bitsandbytes 8-bit AdamW, or trainable embeddings, which transformers gives 32-bit states by recognizing
    the bitsandbytes class)."""
    if args.use_cpu or str(getattr(args.optim, "value", args.optim)) not in NO_SYNC_OPTIMIZERS:
        return None
    if any(p.requires_grad for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()):
        return None
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return no_sync_class(cls), kwargs
