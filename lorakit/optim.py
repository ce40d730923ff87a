"""bitsandbytes' 8-bit AdamW without a GPU synchronization after each tensor's update (SFT on CUDA).

Why: bitsandbytes' `Optimizer8bit.step` calls `torch.cuda.synchronize()` after every parameter's update; a
QLoRA adapter has hundreds of tensors (448 on Llama-3.1-8B all-linear), so each step the GPU drains its queue
448 times and idles while Python prepares the next update: 38 ms of the 104 ms a CUDA-graphed step idled on the
8B shape (bench/train_idle.md). The updates are kernels on one stream, ordered without the synchronizations.
Measured (H200, 8B fixed rows with CUDA graphs, same call): +2.7%, 506 vs 519 ms a step
(bench/train_adamw_nosync.md); what the optimizer still idles is its per-tensor launches from Python.

Same optimizer, same kernels, same math: a subclass of the optimizer class the Trainer would build for
`paged_adamw_8bit` / `adamw_8bit` whose `step` runs bitsandbytes' own per-tensor steps (init_state,
prefetch_state, update_step) and keeps the one synchronization paged states need at the end.
"""

from __future__ import annotations

from typing import Any

NO_SYNC_OPTIMIZERS = ("paged_adamw_8bit", "adamw_8bit")


def no_sync_class(cls: type) -> type:
    """A subclass of bitsandbytes optimizer class `cls` (an Optimizer8bit) without the per-tensor syncs."""
    import torch
    from bitsandbytes.utils import sync_gpu

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
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
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


def optimizer_cls_and_kwargs(args: Any, model: Any) -> tuple | None:
    """(class, kwargs) for the Trainer's `optimizer_cls_and_kwargs`: the class transformers would build for
    `args.optim` made sync-free, its kwargs unchanged; None where the Trainer's own choice stays (a CPU run, not
    a bitsandbytes 8-bit AdamW, or trainable embeddings, which transformers gives 32-bit states by recognizing
    the bitsandbytes class)."""
    import torch
    from transformers import Trainer

    if args.use_cpu or str(getattr(args.optim, "value", args.optim)) not in NO_SYNC_OPTIMIZERS:
        return None
    if any(p.requires_grad for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()):
        return None
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    return no_sync_class(cls), kwargs
