"""What a finished run reports: summary.json's measured parts (peak memory, versions, losses), the loss plot,
and the closing lines on the console."""

from __future__ import annotations

import io
import logging
import math
import resource
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from lorakit.runtime.atomic import atomic_write_bytes
from lorakit.runtime.distributed import is_main_process

log = logging.getLogger("lorakit")


def peak_memory(device: str) -> dict:
    if device == "cuda":
        return {"kind": "cuda", "max_allocated_bytes": int(torch.cuda.max_memory_allocated()),
                "max_reserved_bytes": int(torch.cuda.max_memory_reserved())}
    return {"kind": "cpu_max_rss", "max_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def threads(device: str) -> int | None:
    if device != "cpu":
        return None
    return torch.get_num_threads()


def library_versions() -> dict:
    out = {}
    for pkg in ("lorakit", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate",
                "liger-kernel"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def losses(history: list[dict]) -> dict:
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    return {"train": train, "eval": evals}


def plot_losses(points: dict, path: Path, *, eval_before: float | None, eval_after: float | None,
                title: str, rewards: dict | None = None, reward_before: float | None = None,
                reward_after: float | None = None) -> Path | None:
    """Loss curve PNG (matplotlib Agg): train loss per logged step, eval loss points.

    With `rewards` (GRPO: grpo.reward_curves, {"total": [(step, value)], <reward name>: [...]}) a second
    panel below shows the training reward per logged step (the weighted total bold, each reward
    function thin) and the held-out mean reward before (step 0) and after training (last step).
    """
    if not is_main_process():  # only rank 0 writes the run directory
        return path
    try:  # optional: a run without matplotlib writes no plot
        import matplotlib
    except ImportError:  # a missing plot must not fail a finished run: metrics.jsonl holds the curves
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", Path(path).name)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    with_reward = bool(rewards and any(rewards.values())) or reward_before is not None or reward_after is not None
    if with_reward:
        fig, (ax, rax) = plt.subplots(2, 1, figsize=(7, 6.5), dpi=100, sharex=True,
                                      gridspec_kw={"height_ratios": [1, 1.3]})
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if points["train"]:
        xs, ys = zip(*points["train"])
        ax.plot(xs, ys, label="train loss", color="tab:blue")
    ev = list(points["eval"])
    last_step = points["train"][-1][0] if points["train"] else 0
    if eval_before is not None:
        ev = [(0, eval_before)] + ev
    if eval_after is not None and not any(s == last_step for s, _ in points["eval"]):
        ev.append((last_step, eval_after))
    if ev:
        xs, ys = zip(*ev)
        ax.plot(xs, ys, "o--", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    if with_reward:
        curves = dict(rewards or {})
        total = curves.pop("total", [])
        for name, pts in curves.items():
            if pts:
                xs, ys = zip(*pts)
                rax.plot(xs, ys, lw=1, alpha=0.7, label=f"train {name}")
        if total:
            xs, ys = zip(*total)
            rax.plot(xs, ys, lw=2, color="tab:green", label="train reward (weighted total)")
        last = max([s for pts in (rewards or {}).values() for s, _ in pts] or [last_step])
        held = [(st, v) for st, v in ((0, reward_before), (last, reward_after)) if v is not None]
        if held:
            xs, ys = zip(*held)
            rax.plot(xs, ys, "s--", color="tab:red", ms=7, label="held-out reward (greedy)")
        rax.set_xlabel("step")
        rax.set_ylabel("reward")
        rax.grid(alpha=0.3)
        rax.legend(fontsize=8)
        ax.set_xlabel("")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def pct_change(before, after) -> float | None:
    if before is None or after is None or not before:
        return None
    return 100.0 * (after - before) / before


def fmt(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.4f}"


def print_summary(s: dict, out) -> None:
    el = s["eval_loss"]
    lines = [f"finished {s['steps']} steps in {s['train_seconds']:.0f}s "
             f"({s['tokens_per_s'] or 0:,.0f} tok/s); run dir {s['run_dir']}"]
    if el["before"] is not None:
        ch = f" ({el['change_percent']:+.1f}%)" if el["change_percent"] is not None else ""
        lines.append(f"eval loss: {fmt(el['before'])} -> {fmt(el['after'])}{ch}")
    tm = s["task_metrics"]
    for name in (tm["after"] or {}):
        lines.append(f"{name}: {fmt((tm['before'] or {}).get(name), True)} -> {fmt(tm['after'][name], True)}")
    for sample in tm["samples_after"][:1]:
        lines.append(f"sample prompt: {str(sample['prompt'])[:200]}")
        lines.append(f"  after training: {sample['completion'][:200]}")
    for sample in tm["samples_before"][:1]:
        lines.append(f"  before training: {sample['completion'][:200]}")
    rw = s.get("reward")
    if rw and rw.get("after") is not None:
        b, a, ch = rw["before"] or {}, rw["after"], rw["change"] or {}
        for key in a:
            label = "held-out reward" if key == "total" else f"  {key}"
            change = f" ({ch[key]:+.4f})" if ch.get(key) is not None else ""
            count = f" ({rw['n']} prompts)" if key == "total" else ""
            lines.append(f"{label}{count}: {fmt(b.get(key))} -> {fmt(a[key])}{change}")
        if not tm["samples_after"]:
            for after_s, before_s in zip(rw["samples_after"][:1], rw["samples_before"][:1] or [None]):
                lines.append(f"sample prompt: {str(after_s['prompt'])[:200]}")
                lines.append(f"  after training: {after_s['completion'][:200]}")
                if before_s is not None:
                    lines.append(f"  before training: {before_s['completion'][:200]}")
    for line in lines:
        out.print(line)
