"""LoRA dropout kernels (lorakit.speed.kernels.lora_dropout) of several code dirs, in one process on the GPU: median time of
down_forward / down_backward at the 8B shapes (rank 16, p 0.05, bf16) and the mask's keep rate.

    python3 scripts/probe_lora_kernels.py OLD_DIR NEW_DIR   # each holds lorakit/ (git archive <commit> lorakit)

Results of one run: bench/train_dropout_hash.md.
"""

import importlib
import sys

import torch

R, P = 16, 0.05


def timed(fn, n: int = 40, reps: int = 1) -> float:
    """Median us of `fn` over n timings, each of `reps` calls in a row between two CUDA events (reps > 1: the
    host's launch time hides behind the queued kernels, as inside a CUDA graph)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) * 1e3 / reps)
    return sorted(ts)[n // 2]


def main() -> None:
    for code in sys.argv[1:]:
        for m in [k for k in sys.modules if k == "lorakit" or k.startswith("lorakit.")]:
            del sys.modules[m]
        sys.path.insert(0, code)
        lt = importlib.import_module("lorakit.speed.kernels.lora_dropout")
        sys.path.pop(0)
        for M, K in ((4096, 4096), (4096, 14336), (8192, 4096)):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            a = (torch.randn(R, K, device="cuda") * 0.1).to(torch.bfloat16)
            gh = torch.randn(M, R, device="cuda", dtype=torch.bfloat16)
            keep = lt.dropout_mask(M, K, P, 123, "cuda").float().mean().item()
            for name, fn in (("fwd", lambda lt=lt, x=x, a=a: lt.down_forward(x, a, P, 123)),
                             ("bwd", lambda lt=lt, x=x, a=a, gh=gh: lt.down_backward(x, a, gh, P, 123))):
                us = timed(fn)
                gbs = M * K * 2 * (1 if name == "fwd" else 2) / us / 1e3  # x read (+ grad_x written)
                print(f"{code:12s} M={M} K={K} {name}: {us:7.1f} us (median of 40), {gbs:5.0f} GB/s, keep {keep:.4f}")


if __name__ == "__main__":
    main()
