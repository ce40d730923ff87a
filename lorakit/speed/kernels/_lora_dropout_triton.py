"""The Triton kernels behind lorakit.speed.kernels.lora_dropout (imported only where Triton is installed; see that
module)."""

import triton
import triton.language as tl


@triton.jit
def _mix(x):
    """triple32 (C. Wellons' 32-bit integer hash: near-ideal avalanche), uint32 -> uint32."""
    x ^= x >> 17
    x *= 0xED5AD4BB
    x ^= x >> 11
    x *= 0xAC4C1B51
    x ^= x >> 15
    x *= 0x31848BAB
    x ^= x >> 14
    return x


@triton.jit
def _keep(seed, rows, cols, p):
    """The dropout mask of a tile: element (row, col) is kept when its uniform 24-bit draw is >= p. The draw
    hashes the seed, the row and the column (a counter-based generator, as Philox is, at ~15 integer operations
    an element instead of Philox-10's ~80 for the one of its four outputs that tl.rand keeps: the kernels were
    bound by it)."""
    key = _mix(tl.cast(seed, tl.uint32) ^ 0x9E3779B9)
    row_h = _mix(rows.to(tl.uint32) ^ key)
    col_h = _mix(cols.to(tl.uint32) ^ _mix(key ^ 0x85EBCA6B))
    u = _mix(row_h[:, None] ^ col_h[None, :])
    return (u >> 8).to(tl.int32) >= tl.cast(p * 16777216.0, tl.int32)


@triton.jit
def down_fwd(x_ptr, a_ptr, h_ptr, M, K, R, stride_xm, seed, seed_ptr, p, inv_keep,
             BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, SEED_PTR: tl.constexpr):
    """h[BM rows, :R] = (mask * x) @ A^T * inv_keep, one program per block of rows."""
    if SEED_PTR:  # under CUDA graphs (which fix launch arguments) the seed is read from device memory
        key = tl.load(seed_ptr)
    else:
        key = seed
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    rs = tl.arange(0, RP)
    acc = tl.zeros((BM, RP), dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=inside, other=0.0)
        x = tl.where(_keep(key, rows, cols, p), x, 0.0).to(a_ptr.dtype.element_ty)
        a = tl.load(a_ptr + rs[None, :] * K + cols[:, None], mask=(rs[None, :] < R) & (cols[:, None] < K),
                    other=0.0)  # A^T tile, BK x RP
        acc += tl.dot(x, a)
    out = (acc * inv_keep).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + rows[:, None] * R + rs[None, :], out, mask=(rows[:, None] < M) & (rs[None, :] < R))


@triton.jit
def down_bwd(x_ptr, a_ptr, gh_ptr, gx_ptr, ga_ptr, M, K, R, stride_xm, rows_per_split, seed, seed_ptr, p, inv_keep,
             BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, SEED_PTR: tl.constexpr):
    """For a block of columns and a slice of rows: grad_x = mask * (grad_h @ A) * inv_keep, and this slice's
    part of grad_A = grad_h^T @ (mask * x) * inv_keep (summed over slices by the caller). grad_A is accumulated
    transposed (columns x rank) so that both dots have a 64-row left operand (a 16-row one made Triton 3.6's
    GPU lowering fail for ranks that are multiples of 16)."""
    if SEED_PTR:  # under CUDA graphs (which fix launch arguments) the seed is read from device memory
        key = tl.load(seed_ptr)
    else:
        key = seed
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    split = tl.program_id(1)
    rs = tl.arange(0, RP)
    a = tl.load(a_ptr + rs[:, None] * K + cols[None, :], mask=(rs[:, None] < R) & (cols[None, :] < K),
                other=0.0)  # RP x BK
    acc_t = tl.zeros((BK, RP), dtype=tl.float32)
    start = split * rows_per_split
    for m0 in range(start, start + rows_per_split, BM):
        rows = m0 + tl.arange(0, BM)
        inside = (rows[:, None] < M) & (cols[None, :] < K)
        keep = _keep(key, rows, cols, p)
        gh = tl.load(gh_ptr + rows[:, None] * R + rs[None, :], mask=(rows[:, None] < M) & (rs[None, :] < R),
                     other=0.0)  # BM x RP
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=inside, other=0.0)
        x = tl.where(keep, x, 0.0).to(a_ptr.dtype.element_ty)
        gh_b = tl.load(gh_ptr + rows[:, None] * R + rs[None, :], mask=(rows[:, None] < M) & (rs[None, :] < R),
                       other=0.0)  # the same tile again: one tensor per dot operand
        acc_t += tl.dot(tl.trans(x), gh_b)
        gx = tl.where(keep, tl.dot(gh, a) * inv_keep, 0.0)
        tl.store(gx_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], gx.to(gx_ptr.dtype.element_ty),
                 mask=inside)
    tl.store(ga_ptr + split * R * K + rs[None, :] * K + cols[:, None], acc_t * inv_keep,
             mask=(rs[None, :] < R) & (cols[:, None] < K))


@triton.jit
def mask_kernel(out_ptr, M, K, seed, seed_ptr, p, BM: tl.constexpr, BK: tl.constexpr, SEED_PTR: tl.constexpr):
    if SEED_PTR:  # under CUDA graphs (which fix launch arguments) the seed is read from device memory
        key = tl.load(seed_ptr)
    else:
        key = seed
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    keep = _keep(key, rows, cols, p)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], keep.to(tl.int8),
             mask=(rows[:, None] < M) & (cols[None, :] < K))
