"""Triton kernels for the down half of a LoRA layer with dropout: h = dropout(x) @ A^T and its backward.

Why: with torch ops, LoRA dropout writes a dropped copy of x and a mask for every adapted linear, reads both
back for the matmul and again in backward (rebuilding the copy, dropping the gradient, adding it to the base
layer's), and under gradient checkpointing does the forward half twice, so a non-zero `lora.dropout` makes
a step markedly slower and its peak memory higher than `0.0` (docs/speed.md). These kernels draw the dropout mask
inside the matmul from a 32-bit integer hash of (seed, row, column) (lorakit/speed/kernels/_lora_dropout_triton.py;
Philox per element, as tl.rand draws, made the random numbers the kernels' bottleneck), so nothing but x is read
and no mask is stored: the backward draws the same mask again.

Same distribution as torch's dropout (each element kept with probability 1 - p, scaled by 1 / (1 - p),
independently per layer, element and step), not the same random numbers. Used by lorakit.speed.planning's fused LoRA
layer on CUDA when Triton is installed; CPU runs keep torch's dropout. Tests run the kernels on the CPU through
Triton's interpreter (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Any

# The largest LoRA rank the kernels take: a rank is one tile (padded to a power of two), measured on the GPU up to
# 64; larger ranks would need tiling over the rank to stay within shared memory, and keep torch's dropout.
MAX_RANK = 64


def covers(rank: int, dtype_bytes: int) -> bool:
    """The kernels' reach, without probing a machine: 16-bit compute (fp32 stays with torch, whose matmuls do not
    round to TF32 by default as Triton's dots do) and a rank of at most MAX_RANK. lorakit.estimate.memory uses it
    too."""
    return dtype_bytes == 2 and 0 < rank <= MAX_RANK


def available(device_type: str, dtype: Any, rank: int) -> bool:
    """The kernels are used here: on a GPU, with Triton installed, for a covered dtype and rank."""
    return (device_type == "cuda" and covers(rank, dtype.itemsize)
            and importlib.util.find_spec("triton") is not None)


def _kernels():
    # imported on first use: Triton may be absent, and the planner and the estimate read this module torch-free
    import triton

    from lorakit.speed.kernels import _lora_dropout_triton as k

    return triton, k.down_fwd, k.down_bwd, k.mask_kernel


def _rank_pad(r: int) -> int:
    return max(16, 1 << (r - 1).bit_length())


def _seed_args(seed: Any, like: Any) -> tuple[int, Any, bool]:
    """(scalar seed, seed pointer, SEED_PTR) for a seed given as an int or as a one-element int64 tensor on the
    kernels' device (the pointer form: CUDA graphs replay launches with the arguments they were captured with)."""
    if isinstance(seed, int):
        return seed, like, False
    return 0, seed, True


class DeviceSeeds:
    """Seeds in device memory for the LoRA layers of one captured region (lorakit.speed.layer_graphs): each fused LoRA
    call takes the next slot in call order while `active()`, so a region's replayed recompute takes the slots
    its forward took. `refresh()` draws new seeds (one kernel) before each replay of the forward."""

    def __init__(self, n: int, device: Any):
        import torch  # torch-free at import: the planner and the estimate read this module

        self.values = torch.zeros(n, dtype=torch.int64, device=device)
        self.used = 0
        # its own generator, seeded from torch's: the default CUDA generator is tied to graph captures
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(int(torch.randint(0, 2**62, (1,))))

    def refresh(self) -> None:
        self.values.random_(0, 2**31 - 1, generator=self.generator)

    def take(self) -> Any:
        if self.used >= self.values.numel():
            raise RuntimeError(f"more LoRA dropout calls in this region than its {self.values.numel()} seeds")
        self.used += 1
        return self.values[self.used - 1:self.used]


_ACTIVE: list = []


@contextlib.contextmanager
def device_seeds(seeds: DeviceSeeds):
    """Inside this block the fused LoRA layer takes its dropout seeds from `seeds`, slot by slot from the first."""
    seeds.used = 0
    _ACTIVE.append(seeds)
    try:
        yield seeds
    finally:
        _ACTIVE.pop()


def active_seeds() -> DeviceSeeds | None:
    return _ACTIVE[-1] if _ACTIVE else None


def down_forward(x2: Any, a: Any, p: float, seed: Any) -> Any:
    """h = dropout(x2) @ a^T with the mask of `seed` (an int, or a one-element int64 tensor on x2's device);
    x2: (M, K) with unit column stride, a: (R, K) in the compute dtype (h comes in it too)."""
    import torch  # see DeviceSeeds

    triton, fwd, _, _ = _kernels()
    M, K = x2.shape
    R = a.shape[0]
    a = a.contiguous()
    h = torch.empty((M, R), device=x2.device, dtype=a.dtype)
    # tiles: 16 (32 for many rows) rows x 256 columns a program; backward 32 x 128: the sizes that ran fastest
    BM = 32 if M >= 8192 else 16
    with torch.cuda.device(x2.device) if x2.is_cuda else contextlib.nullcontext():
        s, s_ptr, from_ptr = _seed_args(seed, x2)
        fwd[(triton.cdiv(M, BM),)](x2, a, h, M, K, R, x2.stride(0), s, s_ptr, float(p), 1.0 / (1.0 - p),
                                  BM=BM, BK=256, RP=_rank_pad(R), SEED_PTR=from_ptr)
    return h


def down_backward(x2: Any, a: Any, grad_h: Any, p: float, seed: Any, need_x: bool = True) -> tuple[Any, Any]:
    """(grad_x2 in x2's dtype or None, grad_a in fp32) for `down_forward(x2, a, p, seed)`."""
    import torch  # see DeviceSeeds

    triton, _, bwd, _ = _kernels()
    M, K = x2.shape
    R = a.shape[0]
    a, grad_h = a.contiguous(), grad_h.to(a.dtype).contiguous()
    rp = _rank_pad(R)
    BK, BM = 128, 32
    col_blocks = triton.cdiv(K, BK)
    # enough programs to fill the GPU: split the rows when there are few column blocks
    splits = max(1, min(triton.cdiv(M, BM), triton.cdiv(1024, col_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), BM) * BM
    splits = triton.cdiv(M, rows_per_split)
    gx = torch.empty((M, K), device=x2.device, dtype=x2.dtype)
    ga = torch.empty((splits, R, K), device=x2.device, dtype=torch.float32)
    with torch.cuda.device(x2.device) if x2.is_cuda else contextlib.nullcontext():
        s, s_ptr, from_ptr = _seed_args(seed, x2)
        bwd[(col_blocks, splits)](x2, a, grad_h, gx, ga, M, K, R, x2.stride(0), rows_per_split, s, s_ptr,
                                  float(p), 1.0 / (1.0 - p), BM=BM, BK=BK, RP=rp, SEED_PTR=from_ptr)
    return (gx if need_x else None), ga.sum(0)


def dropout_mask(M: int, K: int, p: float, seed: Any, device: Any) -> Any:
    """The keep mask (M, K) the kernels use for `seed` (for tests and checks)."""
    import torch  # see DeviceSeeds

    triton, _, _, kern = _kernels()
    out = torch.empty((M, K), device=device, dtype=torch.int8)
    s, s_ptr, from_ptr = _seed_args(seed, out)
    kern[(triton.cdiv(M, 16), triton.cdiv(K, 64))](out, M, K, s, s_ptr, float(p), BM=16, BK=64, SEED_PTR=from_ptr)
    return out.bool()
