"""Tile sizes for the LoRA-dropout kernels (lorakit/speed/kernels/_lora_dropout_triton.py) on this GPU: times each configuration of
down_fwd and down_bwd at the 8B shapes (rank 16, p 0.05, bf16), checks it against the shipped kernels
(lora_triton.down_forward / down_backward; same mask: the hash depends on (row, column), not on the tiling), and
prints the best per shape beside the shipped one. Results and what came of them end to end:
bench/lora_kernel_tiles.md.

    python3 scripts/tune_lora_kernels.py [--json OUT]   # every tile at the 8B shapes
    python3 scripts/tune_lora_kernels.py --launch       # host time of a launch, options passed or not
    python3 scripts/tune_lora_kernels.py --compare 2197,4096,5349   # shipped vs candidate tiles at these M
"""

import argparse
import itertools
import json
from functools import partial

import torch
import triton
from probe_lora_kernels import timed as _timed  # scripts/: CUDA events, the median

from lorakit.speed.kernels import _lora_dropout_triton as k
from lorakit.speed.kernels import lora_dropout as lt

R, P, SEED = 16, 0.05, 123
SHAPES = ((4096, 4096), (4096, 14336), (4096, 1024))  # q/k/v/o/gate/up inputs, down's input; k/v outputs' size


def timed(fn) -> float:
    return _timed(fn, 30)  # median of 30 (bench/lora_kernel_tiles.md)


def fwd(x, a, BM, BK, warps, stages):
    M, K = x.shape
    h = torch.empty((M, R), device=x.device, dtype=a.dtype)
    k.down_fwd[(triton.cdiv(M, BM),)](x, a, h, M, K, R, x.stride(0), SEED, x, P, 1 / (1 - P), BM=BM, BK=BK,
                                      RP=16, SEED_PTR=False, num_warps=warps, num_stages=stages)
    return h


def bwd_grid(M: int, K: int, BM: int, BK: int, target: int) -> tuple[int, int, int]:
    """(column blocks, row splits, rows per split) of a down_bwd launch with about `target` programs."""
    col_blocks = triton.cdiv(K, BK)
    splits = max(1, min(triton.cdiv(M, BM), triton.cdiv(target, col_blocks)))
    rows_per_split = triton.cdiv(triton.cdiv(M, splits), BM) * BM
    return col_blocks, triton.cdiv(M, rows_per_split), rows_per_split


def bwd(x, a, gh, BM, BK, target, warps, stages):
    M, K = x.shape
    col_blocks, splits, rows_per_split = bwd_grid(M, K, BM, BK, target)
    gx = torch.empty((M, K), device=x.device, dtype=x.dtype)
    ga = torch.empty((splits, R, K), device=x.device, dtype=torch.float32)
    k.down_bwd[(col_blocks, splits)](x, a, gh, gx, ga, M, K, R, x.stride(0), rows_per_split, SEED, x, P,
                                     1 / (1 - P), BM=BM, BK=BK, RP=16, SEED_PTR=False, num_warps=warps,
                                     num_stages=stages)
    return gx, ga.sum(0)


def launch_cost(n: int = 2000) -> None:
    """Host time of one down_fwd launch with Triton's default options left implicit vs the same values passed
    (num_warps=4, num_stages=3): eager training is bound by such host time."""
    import time

    M = 64  # a small launch: the GPU keeps up, the host's time shows
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    a = torch.randn(R, 4096, device="cuda", dtype=torch.bfloat16)
    h = torch.empty((M, R), device="cuda", dtype=torch.bfloat16)
    BM, BK = 16, 128  # the shipped forward's tile
    for label, opts in (("implicit", {}), ("passed", {"num_warps": 4, "num_stages": 3}), ("implicit", {})):
        def go(opts=opts):
            k.down_fwd[(triton.cdiv(M, BM),)](x, a, h, M, 4096, R, 4096, SEED, x, P, 1 / (1 - P), BM=BM, BK=BK,
                                              RP=16, SEED_PTR=False, **opts)
        go()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            go()
        host = (time.perf_counter() - t) / n * 1e6
        torch.cuda.synchronize()
        print(f"launch, options {label}: {host:.1f} us of host time a launch", flush=True)


def compare(rows_list: list[int], fwd_tile: tuple, bwd_tile: tuple) -> None:
    """Shipped kernels vs one candidate tile pair at row counts M of varied batches (K = 4096 and 14336)."""
    for K in (4096, 14336):
        for M in rows_list:
            g = torch.Generator(device="cuda").manual_seed(M)
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
            a = (torch.randn(R, K, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
            gh = torch.randn(M, R, device="cuda", dtype=torch.bfloat16, generator=g)
            f0 = timed(partial(lt.down_forward, x, a, P, SEED))
            f1 = timed(partial(fwd, x, a, *fwd_tile, 4, 3))
            b0 = timed(partial(lt.down_backward, x, a, gh, P, SEED))
            b1 = timed(partial(bwd, x, a, gh, *bwd_tile, 4, 3))
            print(f"K={K} M={M}: fwd shipped {f0:.1f} candidate {f1:.1f} us; bwd shipped {b0:.1f} candidate "
                  f"{b1:.1f} us", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--launch", action="store_true", help="only the host time of a launch (options passed or not)")
    ap.add_argument("--compare", default=None, metavar="M,M,...",
                    help="only shipped vs the candidate tiles of bench/lora_kernel_tiles.md at these row counts")
    args = ap.parse_args()
    if args.launch:
        launch_cost()
        return
    if args.compare:
        compare([int(m) for m in args.compare.split(",")], (16, 256), (32, 128, 1024))
        return
    out = []
    for M, K in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
        a = (torch.randn(R, K, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
        gh = torch.randn(M, R, device="cuda", dtype=torch.bfloat16, generator=g)
        ref_h = lt.down_forward(x, a, P, SEED).float()
        ref_gx, ref_ga = lt.down_backward(x, a, gh, P, SEED)
        rows = [("fwd", "shipped", timed(partial(lt.down_forward, x, a, P, SEED)), True),
                ("bwd", "shipped", timed(partial(lt.down_backward, x, a, gh, P, SEED)), True)]
        for BM, BK, w, st in itertools.product((16, 32), (128, 256, 512), (4, 8), (3, 4)):
            try:
                ok = torch.allclose(fwd(x, a, BM, BK, w, st).float(), ref_h, rtol=2e-2, atol=2e-2)
                rows.append(("fwd", f"BM={BM} BK={BK} w={w} s={st}", timed(partial(fwd, x, a, BM, BK, w, st)), ok))
            except Exception as e:  # out of shared memory etc.
                rows.append(("fwd", f"BM={BM} BK={BK} w={w} s={st}: {type(e).__name__}", float("inf"), False))
        for BM, BK, target, w, st in itertools.product((32, 64, 128), (32, 64, 128), (512, 1024, 2048), (4, 8),
                                                       (2, 3)):
            try:
                gx, ga = bwd(x, a, gh, BM, BK, target, w, st)
                ok = (torch.allclose(gx, ref_gx, rtol=1e-2, atol=1e-2)
                      and torch.allclose(ga, ref_ga, rtol=1e-3, atol=1e-3))
                rows.append(("bwd", f"BM={BM} BK={BK} t={target} w={w} s={st}",
                             timed(partial(bwd, x, a, gh, BM, BK, target, w, st)), ok))
            except Exception as e:
                rows.append(("bwd", f"BM={BM} BK={BK} t={target}: {type(e).__name__}", float("inf"), False))
        for kind in ("fwd", "bwd"):
            mine = sorted((r for r in rows if r[0] == kind and r[3]), key=lambda r: r[2])
            shipped = next(r[2] for r in rows if r[0] == kind and r[1] == "shipped")
            bad = sum(1 for r in rows if r[0] == kind and not r[3] and r[2] != float("inf"))
            print(f"M={M} K={K} {kind}: shipped {shipped:.1f} us; best " + "; ".join(
                f"{r[1]} {r[2]:.1f} us" for r in mine[:4]) + (f"; {bad} configs MISMATCH" if bad else ""),
                flush=True)
        out.append({"M": M, "K": K, "rows": [list(r) for r in rows if r[2] != float("inf")]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
