"""scripts/bench_train.py --max-context: the search for the longest row that trains (probes faked: no GPU here)."""

import importlib.util
import time
import types
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


@pytest.fixture()
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_train_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "write_max_context", lambda out, doc: None)
    return mod


def run_search(bench, limit: int, outcome_above: str = "oom", bisect=None):
    tried: list[int] = []

    def probe(args, me, log, model, run, length, ballast, timeout):
        tried.append(length)
        return {"length": length, "outcome": "ok" if length <= limit else outcome_above, "error": None}

    bench.probe = probe
    args = types.SimpleNamespace(bisect=bisect, probe_start=32768, probe_max=1 << 20, resolution=8192,
                                 probe_timeout=300)
    doc = {"runs": {"lorakit": {"probes": [], "longest_ok": None, "shortest_failed": None}}}
    bench.search(args, [], Path("log"), Path("."), doc, "8b-2l", "lorakit", 0, time.time() + 1000)
    return doc["runs"]["lorakit"], tried


def test_search_doubles_then_bisects_to_the_resolution(bench):
    r, tried = run_search(bench, 342000)
    assert tried[:5] == [32768, 65536, 131072, 262144, 524288]
    assert r["longest_ok"] <= 342000 < r["shortest_failed"]
    assert r["shortest_failed"] - r["longest_ok"] <= 8192


def test_search_goes_on_from_given_bounds_without_probing_upward(bench):
    r, tried = run_search(bench, 100000, bisect=(65536, 131072))
    assert min(tried) > 65536 and max(tried) < 131072
    assert r["longest_ok"] <= 100000 < r["shortest_failed"] and r["shortest_failed"] - r["longest_ok"] <= 8192


def test_a_setup_error_stops_the_search_instead_of_bisecting_down(bench):
    r, tried = run_search(bench, 0, outcome_above="error")
    assert tried == [32768] and r["longest_ok"] is None and "error" in r["stopped"]


def test_oom_is_recognized_in_a_result_or_a_log(bench):
    assert bench.is_oom("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert bench.is_oom("RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED")
    assert not bench.is_oom("ValueError: max_length must be positive")
