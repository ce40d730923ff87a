"""lorakit.adapters: compose equals peft's add_weighted_adapter, unmerge inverts merge, extract is the best rank-R
approximation, several adapters merge as their cat composition; bad inputs exit 2 through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.adapters.compose import compose, merge_weighted
from lorakit.errors import LorakitError

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def make_adapter(base_dir: Path, out: Path, *, seed: int, **lora_kw) -> Path:
    """A peft adapter on `base_dir` with every trainable tensor random (not a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    lora_kw.setdefault("r", 4)
    lora_kw.setdefault("lora_alpha", 8)
    lora_kw.setdefault("target_modules", TARGETS)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora_kw))
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def two(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("two")
    return make_adapter(tiny_model_dir, d / "a", seed=1), make_adapter(tiny_model_dir, d / "b", seed=2, lora_alpha=4)


def deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """module -> its scaled delta s·B@A (fp32), from the files alone."""
    from lorakit.merge import find_source, parse_adapter

    return {m: e.scale * (e.B.float() @ e.A.float()) for m, e in parse_adapter(find_source(adapter)).items()
            if e.A is not None}


def peft_weighted(base_dir, adapters, weights, method, seed=0, **kw) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """peft's add_weighted_adapter on the real model: module -> (A, B) of the new adapter."""
    from peft import PeftModel
    from peft.tuners.lora import LoraModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      adapters[0], adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        model.load_adapter(a, adapter_name=f"a{i}")
    inject = LoraModel.inject_adapter

    def inject_then_seed(self, *a, **k):  # the new adapter's init draws random numbers; seed after it, as compose
        inject(self, *a, **k)
        torch.manual_seed(seed)

    LoraModel.inject_adapter = inject_then_seed
    try:
        model.add_weighted_adapter([f"a{i}" for i in range(len(adapters))], weights, "mix", combination_type=method, **kw)
    finally:
        LoraModel.inject_adapter = inject
    return {n.removeprefix("base_model.model."): (m.lora_A["mix"].weight.detach(), m.lora_B["mix"].weight.detach())
            for n, m in model.named_modules() if hasattr(m, "lora_A") and "mix" in m.lora_A}


def ours(out: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    t = load_file(out / "adapter_model.safetensors")
    mods = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in t if k.endswith("lora_A.weight")}
    return {m: (t[f"base_model.model.{m}.lora_A.weight"], t[f"base_model.model.{m}.lora_B.weight"]) for m in mods}


def test_cat_is_the_weighted_sum_of_the_deltas(tiny_model_dir, tmp_path):
    a = make_adapter(tiny_model_dir, tmp_path / "a", seed=1, r=4, target_modules=["q_proj", "v_proj"])
    b = make_adapter(tiny_model_dir, tmp_path / "b", seed=2, r=8, lora_alpha=4, use_rslora=True,
                     target_modules=["q_proj", "down_proj"])
    report = compose([a, b], tmp_path / "cat", weights=[0.7, -0.3], method="cat")
    assert report["rank"] == 12
    da, db, got = deltas(a), deltas(b), deltas(tmp_path / "cat")
    assert set(got) == set(da) | set(db)
    for m, d in got.items():
        want = 0.7 * da.get(m, 0) - 0.3 * db.get(m, 0)
        torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-7)
    cfg = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (12, 12, False)


@pytest.mark.parametrize("method,kw", [("linear", {}), ("ties", {"density": 0.5}), ("dare_ties", {"density": 0.6})])
def test_factor_methods_equal_peft(method, kw, two, tiny_model_dir, tmp_path):
    compose(list(two), tmp_path / "mix", weights=[0.7, 0.4], method=method, seed=3, **kw)
    want, got = peft_weighted(tiny_model_dir, two, [0.7, 0.4], method, seed=3, **kw), ours(tmp_path / "mix")
    assert set(got) == set(want) and len(got) == 2 * len(TARGETS)
    for m in want:
        torch.testing.assert_close(got[m][0], want[m][0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got[m][1], want[m][1], rtol=1e-6, atol=1e-7)


def test_svd_equals_peft_and_reports_energy(two, tiny_model_dir, tmp_path):
    report = compose(list(two), tmp_path / "svd", weights=[1.0, 0.5], method="svd", rank=3)
    want, got = peft_weighted(tiny_model_dir, two, [1.0, 0.5], "svd", svd_rank=3), ours(tmp_path / "svd")
    assert set(got) == set(want)
    for m, (A, B) in want.items():
        assert got[m][0].shape == (3, A.shape[1])
        ref = B @ A  # the factors are unique only up to signs: compare the deltas, to fp32 SVD rounding
        assert float((got[m][1] @ got[m][0] - ref).norm() / ref.norm()) < 1e-4
    # energy kept = the share of the sum's squared singular values in the first 3
    da, db = deltas(two[0]), deltas(two[1])
    m = next(iter(want))
    s = torch.linalg.svdvals(da[m] + 0.5 * db[m])
    assert report["energy_kept"][m] == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()), rel=1e-4)
    assert 0 < report["min_energy_kept"] < 1


def test_composed_adapter_loads_in_peft(two, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    compose(list(two), tmp_path / "cat", method="cat")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        got = PeftModel.from_pretrained(base, tmp_path / "cat")(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        state = merged.state_dict()
        for d in (deltas(two[0]), deltas(two[1])):
            for m, delta in d.items():
                state[f"{m}.weight"] += delta
        want = merged(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_merge_of_two_equals_merge_of_their_cat(two, tiny_model_dir, tmp_path):
    merge_weighted([(two[0], 0.7), (two[1], 0.3)], tmp_path / "m2", dtype="fp32")
    compose(list(two), tmp_path / "cat", weights=[0.7, 0.3], method="cat")
    merge_weighted([(tmp_path / "cat", 1.0)], tmp_path / "m1", base=str(tiny_model_dir), dtype="fp32")
    a, b = load_file(tmp_path / "m2" / "model.safetensors"), load_file(tmp_path / "m1" / "model.safetensors")
    base = load_file(tiny_model_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.skipif(not (__import__("importlib").util.find_spec("bitsandbytes")), reason="needs bitsandbytes")
def test_merge_of_two_from_quantized_equals_their_cat(two, tiny_model_dir, tmp_path):
    merge_weighted([(two[0], 0.5), (two[1], 0.5)], tmp_path / "m2", dtype="fp32", from_quantized=True)
    compose(list(two), tmp_path / "cat", weights=[0.5, 0.5], method="cat")
    merge_weighted([(tmp_path / "cat", 1.0)], tmp_path / "m1", base=str(tiny_model_dir), dtype="fp32",
                   from_quantized=True)
    a, b = load_file(tmp_path / "m2" / "model.safetensors"), load_file(tmp_path / "m1" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_compose_refusals(two, tiny_model_dir, tmp_path):
    other = make_adapter(tiny_model_dir, tmp_path / "other", seed=3, target_modules=["q_proj"])
    with pytest.raises(LorakitError, match=r"same modules: .*adapts .*v_proj"):
        compose([two[0], other], tmp_path / "x", method="linear")
    dora = make_adapter(tiny_model_dir, tmp_path / "dora", seed=4, use_dora=True)
    with pytest.raises(LorakitError, match="DoRA"):
        compose([two[0], dora], tmp_path / "x", method="cat")
    with pytest.raises(LorakitError, match="needs a density"):
        compose(list(two), tmp_path / "x", method="ties")
    assert not (tmp_path / "x").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_errors_exit_2(two, tiny_model_dir, tmp_path):
    other_base = tmp_path / "a2"
    other_base.mkdir()
    cfg = json.loads((two[1] / "adapter_config.json").read_text())
    (other_base / "adapter_config.json").write_text(json.dumps(dict(cfg, base_model_name_or_path="org/other")))
    (other_base / "adapter_model.safetensors").write_bytes((two[1] / "adapter_model.safetensors").read_bytes())
    cases = [
        (["compose", str(two[0]), str(other_base), "--out", str(tmp_path / "o")], "different bases"),
        (["compose", str(two[0]), str(two[1]), "--weights", "0.5", "--out", str(tmp_path / "o")], "--weights"),
        (["compose", str(two[0]), str(two[1]), "--method", "magic", "--out", str(tmp_path / "o")], "--method"),
        (["compose", str(two[0]), str(two[1]), "--method", "dare_ties", "--density", "1.5",
          "--out", str(tmp_path / "o")], "--density"),
        (["merge", "--adapter", f"{two[0]}:0.5", "--adapter", f"{other_base}:0.5", "--out", str(tmp_path / "o")],
         "different bases"),
        (["unmerge", str(tiny_model_dir), "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
         "no such directory"),
        (["extract", "--base", str(tiny_model_dir), "--tuned", str(tiny_model_dir), "--rank", "0",
          "--out", str(tmp_path / "o")], "--rank"),
        (["extract", "--base", str(tiny_model_dir), "--tuned", str(tiny_model_dir), "--rank", "2",
          "--targets", "nope_proj", "--out", str(tmp_path / "o")], "nope_proj"),
    ]
    for args, needle in cases:
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    assert not (tmp_path / "o").exists()
