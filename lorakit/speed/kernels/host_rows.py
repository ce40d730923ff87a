"""Triton kernel: gather rows of a table in pinned host memory straight into GPU memory.

Pinned host memory is addressable from the GPU (unified virtual addressing): each program reads one row's slice
over the host link and writes it to the output on the GPU. The token ids stay on the GPU, so nothing waits for
the GPU to hand them to the host (lorakit.speed.host_embedding).
"""

import triton
import triton.language as tl


@triton.jit
def gather_rows(table_ptr, ids_ptr, out_ptr, n_rows, dim, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    idx = tl.load(ids_ptr + row).to(tl.int64)
    keep = (cols < dim) & (idx >= 0) & (idx < n_rows)  # an id out of range reads nothing (the caller asserts)
    values = tl.load(table_ptr + idx * dim + cols, mask=keep)
    tl.store(out_ptr + row * dim + cols, values, mask=keep)
