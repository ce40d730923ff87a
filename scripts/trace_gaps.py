"""Where the GPU waits: idle time between kernels in a torch.profiler chrome trace, by what the host was doing.

Why: a lorakit step on the 8B shape runs ~400 ms of kernels in ~600 ms of wall time. A gap on the GPU's timeline
is the host's doing when the next kernel was launched after the GPU had gone idle: the time is charged to the
CPU op that launched it (innermost and outermost op on the launching thread). Gaps whose next kernel was launched
earlier (waits on another stream, on a copy) are "queued". Host waits for the GPU (synchronizing calls) are
summed apart. Used by scripts/bench_train.py --profile; `python3 scripts/trace_gaps.py TRACE.json` prints it.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATS = {"cpu_op", "user_annotation"}
SYNC_CALLS = ("Synchronize", "cudaMemcpy ", "cudaMemcpy", "cudaEventSynchronize", "cudaStreamWaitEvent")


def _stacks(host: dict, queries: list[tuple]) -> dict:
    """{query id: host spans enclosing it, outermost first}: one sweep per thread (spans on a thread nest)."""
    out: dict = {}
    by_tid = defaultdict(list)
    for qid, tid, ts in queries:
        by_tid[tid].append((ts, qid))
    for tid, qs in by_tid.items():
        spans = sorted(host.get(tid, []), key=lambda s: (s["ts"], -s["dur"]))
        stack: list[dict] = []
        i = 0
        for ts, qid in sorted(qs, key=lambda q: q[0]):
            while i < len(spans) and spans[i]["ts"] <= ts:
                while stack and stack[-1]["ts"] + stack[-1]["dur"] < spans[i]["ts"]:
                    stack.pop()
                stack.append(spans[i])
                i += 1
            while stack and stack[-1]["ts"] + stack[-1]["dur"] < ts:
                stack.pop()
            out[qid] = [s for s in stack if s["ts"] + s["dur"] >= ts]
    return out


def analyze(events: list[dict], steps: int = 2, top: int = 15) -> str:
    dev = sorted((e for e in events if e.get("cat") in DEVICE_CATS and e.get("ph") == "X"), key=lambda e: e["ts"])
    if not dev:
        return "no device events in the trace\n"
    launches = {e["args"]["correlation"]: e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")
                and "correlation" in e.get("args", {})}
    host = defaultdict(list)
    for e in events:
        if e.get("cat") in HOST_CATS and e.get("ph") == "X" and not e["name"].startswith("ProfilerStep"):
            host[e["tid"]].append(e)
    busy = 0.0
    end = dev[0]["ts"]
    by_inner: dict[str, float] = defaultdict(float)
    by_outer: dict[str, float] = defaultdict(float)
    queued = 0.0
    n_gaps = 0
    gaps: list[tuple[float, dict]] = []
    for e in dev:
        start, stop = e["ts"], e["ts"] + e["dur"]
        if start > end:
            gap = start - end
            n_gaps += 1
            launch = launches.get(e.get("args", {}).get("correlation"))
            if launch is None or launch["ts"] <= end:
                queued += gap
            else:
                gaps.append((gap, launch))
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    wall = end - dev[0]["ts"]
    waits = [e for e in launches.values() if any(k in e["name"] for k in SYNC_CALLS) and e.get("dur", 0) > 50]
    stacks = _stacks(host, [(id(ln), ln["tid"], ln["ts"]) for _, ln in gaps]
                     + [(id(e), e["tid"], e["ts"]) for e in waits])
    for gap, launch in gaps:
        stack = stacks.get(id(launch)) or []
        inner = stack[-1]["name"] if stack else "(no op)"
        outer = next((s["name"] for s in stack if s.get("cat") == "user_annotation"),
                     stack[0]["name"] if stack else "(no op)")
        by_inner[inner[:70]] += gap
        by_outer[outer[:70]] += gap
    syncs: dict[str, float] = defaultdict(float)
    for e in waits:
        stack = stacks.get(id(e)) or []
        syncs[f"{e['name']} in {(stack[0]['name'] if stack else '(no op)')[:50]}"] += e["dur"]
    idle = wall - busy
    ms = 1e3 * steps

    def table(title: str, d: dict) -> list[str]:
        rows = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return [f"## {title}"] + [f"{v / ms:9.2f} ms/step  {k}" for k, v in rows] + [""]

    lines = [f"device span {wall / ms:.1f} ms/step, kernels busy {busy / ms:.1f} ms/step, idle {idle / ms:.1f} "
             f"ms/step ({100 * idle / wall:.0f}%) in {n_gaps // steps} gaps a step; queued (launched before the "
             f"GPU went idle) {queued / ms:.1f} ms/step", ""]
    lines += table("idle by the op that launched the next kernel (innermost)", by_inner)
    lines += table("idle by outermost op / annotation at that launch", by_outer)
    lines += table("host waits on the GPU (synchronizing calls > 50 us)", syncs)
    lines += backlog(events, dev, launches)
    return "\n".join(lines)


def backlog(events: list[dict], dev: list[dict], launches: dict) -> list[str]:
    """How far ahead of the GPU the host is when each annotated range (lk.*, Optimizer.step; a replayed layer's
    forward and backward; the gradient clip's norm) starts and ends:
    the GPU work already launched then and not yet done (0 = the GPU waits for the host from there on)."""
    import bisect

    done = sorted((launches[e["args"]["correlation"]]["ts"], e["ts"] + e["dur"]) for e in dev
                  if e.get("args", {}).get("correlation") in launches)
    ts = [t for t, _ in done]
    ends, m = [], 0.0
    for _, end in done:  # the latest end among the kernels launched up to each launch
        m = max(m, end)
        ends.append(m)

    def ahead(t: float) -> float:
        i = bisect.bisect_right(ts, t)
        return max(0.0, ends[i - 1] - t) if i else 0.0

    rows: dict[str, list] = defaultdict(list)
    for e in events:
        if e.get("cat") in HOST_CATS and e.get("ph") == "X" and (
                e["name"].startswith(("lk.", "Optimizer.step", "aten::_foreach_norm"))
                or e["name"].endswith("_ReplayBackward") or e["name"] == "_Replay"):
            rows[e["name"][:40]].append((e["dur"], ahead(e["ts"]), ahead(e["ts"] + e["dur"]), e["ts"]))
    out = ["## the host's lead over the GPU at each range (mean over its occurrences, ms)",
           "   n   host ms   lead at start   lead at end  range"]
    for name, v in sorted(rows.items(), key=lambda kv: kv[1][0][3]):  # in the order they first ran
        n = len(v)
        out.append(f"{n:4d} {sum(x[0] for x in v) / n / 1e3:9.2f} {sum(x[1] for x in v) / n / 1e3:15.2f} "
                   f"{sum(x[2] for x in v) / n / 1e3:13.2f}  {name}")
    return out + [""]


def analyze_file(path: Path, steps: int = 2) -> str:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return analyze(data.get("traceEvents", data) if isinstance(data, dict) else data, steps)


if __name__ == "__main__":
    print(analyze_file(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2))
