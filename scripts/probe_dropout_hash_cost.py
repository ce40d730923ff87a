"""What bounds the LoRA-dropout kernels (lorakit/speed/kernels/_lora_dropout_triton.py) on the GPU: the shipped forward and backward
beside the same kernels with the mask's hash made cheaper or left out, at the 8B shapes (rank 16, p 0.05, bf16),
and cuBLAS's x @ A^T (no dropout) for reference. Median of 15 (CUDA events around 20 launches in a row, so the
host's launch time does not count: as inside a CUDA graph).

    python3 scripts/probe_dropout_hash_cost.py [--json OUT]

Hashes: none (no dropout: the kernels' floor), triple32 (shipped: one 32-bit hash an element), fmix32 (murmur3's
finaliser: 2 multiplies instead of 3), pair16 (one triple32 hash for two neighbouring elements, 16 bits each).
Results of one run (H200): bench/train_graph_length.md, last section - the mask is not what bounds the kernels.
"""

import argparse
import json
from functools import partial

import torch
import triton
import triton.language as tl
from probe_lora_kernels import timed  # scripts/: CUDA events, the median
from tune_lora_kernels import bwd_grid

from lorakit.speed.kernels import _lora_dropout_triton as k
from lorakit.speed.kernels import lora_dropout as lt

R, P, SEED = 16, 0.05, 123



def _timed(fn, n: int = 15) -> float:
    return timed(fn, n, reps=20)

HASHES = {"none": 0, "triple32": 1, "fmix32": 2, "pair16": 3}


@triton.jit
def _fmix(x):
    """murmur3's 32-bit finaliser (2 multiplies; lorakit's _mix, triple32, has 3)."""
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def _keep_v(seed, rows, cols, p, BK: tl.constexpr, HASH: tl.constexpr):
    key = k._mix(tl.cast(seed, tl.uint32) ^ 0x9E3779B9)
    row_h = k._mix(rows.to(tl.uint32) ^ key)
    if HASH == 0:
        return (rows[:, None] >= 0) & (cols[None, :] >= 0)
    elif HASH == 1:
        col_h = k._mix(cols.to(tl.uint32) ^ k._mix(key ^ 0x85EBCA6B))
        u = k._mix(row_h[:, None] ^ col_h[None, :])
        return (u >> 8).to(tl.int32) >= tl.cast(p * 16777216.0, tl.int32)
    elif HASH == 2:
        col_h = k._mix(cols.to(tl.uint32) ^ k._mix(key ^ 0x85EBCA6B))
        u = _fmix(row_h[:, None] ^ col_h[None, :])
        return (u >> 8).to(tl.int32) >= tl.cast(p * 16777216.0, tl.int32)
    else:
        pairs = (tl.min(cols, axis=0) // 2) + tl.arange(0, BK // 2)
        col_h = k._mix(pairs.to(tl.uint32) ^ k._mix(key ^ 0x85EBCA6B))
        u = k._mix(row_h[:, None] ^ col_h[None, :])
        lo = (u & 0xFFFF).to(tl.int32)
        hi = (u >> 16).to(tl.int32)
        return tl.interleave(lo, hi) >= tl.cast(p * 65536.0, tl.int32)


@triton.jit
def fwd_v(x_ptr, a_ptr, h_ptr, M, K, R, stride_xm, seed, p, inv_keep,
          BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, HASH: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rs = tl.arange(0, RP)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=inside, other=0.0)
        x = tl.where(_keep_v(seed, rows, cols, p, BK, HASH), x, 0.0).to(a_ptr.dtype.element_ty)
        a = tl.load(a_ptr + rs[None, :] * K + cols[:, None], mask=(rs[None, :] < R) & (cols[:, None] < K), other=0.0)
        acc += tl.dot(x, a)
    out = (acc * inv_keep).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + rows[:, None] * R + rs[None, :], out, mask=(rows[:, None] < M) & (rs[None, :] < R))


@triton.jit
def bwd_v(x_ptr, a_ptr, gh_ptr, gx_ptr, ga_ptr, M, K, R, stride_xm, rows_per_split, seed, p, inv_keep,
          BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, HASH: tl.constexpr):
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    split = tl.program_id(1)
    rs = tl.arange(0, RP)
    a = tl.load(a_ptr + rs[:, None] * K + cols[None, :], mask=(rs[:, None] < R) & (cols[None, :] < K), other=0.0)
    acc_t = tl.zeros((BK, RP), dtype=tl.float32)
    start = split * rows_per_split
    for m0 in range(start, start + rows_per_split, BM):
        rows = m0 + tl.arange(0, BM)
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        keep = _keep_v(seed, rows, cols, p, BK, HASH)
        gh = tl.load(gh_ptr + rows[:, None] * R + rs[None, :], mask=(rows[:, None] < M) & (rs[None, :] < R), other=0.0)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=inside, other=0.0)
        x = tl.where(keep, x, 0.0).to(a_ptr.dtype.element_ty)
        gh_b = tl.load(gh_ptr + rows[:, None] * R + rs[None, :], mask=(rows[:, None] < M) & (rs[None, :] < R),
                       other=0.0)
        acc_t += tl.dot(tl.trans(x), gh_b)
        gx = tl.where(keep, tl.dot(gh, a) * inv_keep, 0.0)
        tl.store(gx_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], gx.to(gx_ptr.dtype.element_ty), mask=inside)
    tl.store(ga_ptr + split * R * K + rs[None, :] * K + cols[:, None], acc_t * inv_keep,
             mask=(rs[None, :] < R) & (cols[:, None] < K))


def fwd(x, a, hash_id, BM=16, BK=256, warps=4):
    M, K = x.shape
    h = torch.empty((M, R), device=x.device, dtype=a.dtype)
    fwd_v[(triton.cdiv(M, BM),)](x, a, h, M, K, R, x.stride(0), SEED, P, 1 / (1 - P), BM=BM, BK=BK, RP=16,
                                 HASH=hash_id, num_warps=warps)
    return h


def bwd(x, a, gh, hash_id, BM=32, BK=128, target=1024, warps=4):
    M, K = x.shape
    col_blocks, splits, rows_per_split = bwd_grid(M, K, BM, BK, target)
    gx = torch.empty((M, K), device=x.device, dtype=x.dtype)
    ga = torch.empty((splits, R, K), device=x.device, dtype=torch.float32)
    bwd_v[(col_blocks, splits)](x, a, gh, gx, ga, M, K, R, x.stride(0), rows_per_split, SEED, P, 1 / (1 - P),
                                BM=BM, BK=BK, RP=16, HASH=hash_id, num_warps=warps)
    return gx, ga.sum(0)


def keep_rate(hash_id: int, M: int, K: int) -> float:
    """Fraction of x's elements the forward keeps (x = ones, A = e_0: h[:, 0] = kept count * inv_keep)."""
    x = torch.ones(M, K, device="cuda", dtype=torch.bfloat16)
    a = torch.zeros(R, K, device="cuda", dtype=torch.bfloat16)
    a[0] = 1
    h = fwd(x, a, hash_id).float()
    return float(h[:, 0].sum() * (1 - P) / (M * K))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for M, K in ((4096, 4096), (4096, 14336), (4096, 1024)):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
        a = (torch.randn(R, K, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
        gh = torch.randn(M, R, device="cuda", dtype=torch.bfloat16, generator=g)
        bound_f = M * K * 2 / 4.8e12 * 1e6
        ref = {"shape": f"{M}x{K}", "mm_us": _timed(partial(torch.mm, x, a.t()), 30),
               "shipped_fwd_us": _timed(partial(lt.down_forward, x, a, P, SEED), 30),
               "shipped_bwd_us": _timed(partial(lt.down_backward, x, a, gh, P, SEED), 30),
               "hbm_bound_fwd_us": bound_f, "hbm_bound_bwd_us": 2 * bound_f}
        print(ref, flush=True)
        for name, hid in HASHES.items():
            for warps in (4, 8):
                r = dict(ref, hash=name, warps=warps,
                         fwd_us=_timed(partial(fwd, x, a, hid, warps=warps), 30),
                         bwd_us=_timed(partial(bwd, x, a, gh, hid, warps=warps), 30),
                         keep=keep_rate(hid, 1024, K) if warps == 4 else None)
                if hid == 1 and warps == 4:  # the copy matches the shipped kernels
                    r["same_as_shipped"] = bool(torch.equal(fwd(x, a, 1), lt.down_forward(x, a, P, SEED)))
                rows.append(r)
                print(f"{M}x{K} {name:9s} warps {warps}: fwd {r['fwd_us']:6.1f} bwd {r['bwd_us']:6.1f} us "
                      f"(shipped {ref['shipped_fwd_us']:.1f} / {ref['shipped_bwd_us']:.1f}; mm {ref['mm_us']:.1f}; "
                      f"HBM bound {bound_f:.1f} / {2 * bound_f:.1f}) keep {r['keep']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
