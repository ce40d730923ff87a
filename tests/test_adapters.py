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
    from lorakit.checkpoints.adapter import find_source, parse_adapter

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
        names = [f"a{i}" for i in range(len(adapters))]
        model.add_weighted_adapter(names, weights, "mix", combination_type=method, **kw)
    finally:
        LoraModel.inject_adapter = inject
    return {n.removeprefix("base_model.model."): (m.lora_A["mix"].weight.detach(), m.lora_B["mix"].weight.detach())
            for n, m in model.named_modules() if hasattr(m, "lora_A") and "mix" in m.lora_A}


def ours(out: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    t = load_file(out / "adapter_model.safetensors")
    mods = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in t if "lora_A" in k}
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


def _cli(*args: str) -> tuple[int, str]:
    """The real CLI in a subprocess: (exit code, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), CI="true")
    r = subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, env=env, timeout=300)
    return r.returncode, r.stderr


def _in_process(*args: str) -> tuple[int, str]:
    """The same CLI app in this process (typer's runner): the error paths without an interpreter start each."""
    from typer.testing import CliRunner

    from lorakit.cli import app

    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stderr + r.stdout


def test_cli_errors_exit_2(two, tiny_model_dir, tmp_path):
    other_base = tmp_path / "a2"
    other_base.mkdir()
    cfg = json.loads((two[1] / "adapter_config.json").read_text())
    (other_base / "adapter_config.json").write_text(json.dumps(dict(cfg, base_model_name_or_path="org/other")))
    (other_base / "adapter_model.safetensors").write_bytes((two[1] / "adapter_model.safetensors").read_bytes())
    o = str(tmp_path / "o")
    cases = [
        (["compose", str(two[0]), str(other_base), "--out", o], "different bases"),
        (["merge", "--adapter", f"{two[0]}:0.5", "--adapter", f"{other_base}:0.5", "--out", o], "different bases"),
        (["compose", str(two[0]), str(two[1]), "--weights", "0.5", "--out", o], "--weights"),
        (["compose", str(two[0]), str(two[1]), "--method", "magic", "--out", o], "--method"),
        (["compose", str(two[0]), str(two[1]), "--method", "dare_ties", "--density", "1.5", "--out", o], "--density"),
        (["compose", str(two[0]), str(two[1]), "--method", "linear", "--rank", "2", "--out", o], "--rank"),
        (["unmerge", str(tiny_model_dir), "--adapter", str(tmp_path / "nope"), "--out", o], "no such directory"),
        (["unmerge", str(tiny_model_dir), "--adapter", str(two[0]), "--out", o, "--verify"], "--base"),
        (["extract", "--base", str(tiny_model_dir), "--tuned", str(tiny_model_dir), "--rank", "0", "--out", o],
         "--rank"),
        (["extract", "--base", str(tiny_model_dir), "--tuned", str(tiny_model_dir), "--rank", "2",
          "--targets", "nope_proj", "--out", o], "nope_proj"),
    ]
    for i, (args, needle) in enumerate(cases):
        code, err = (_cli if i == 1 else _in_process)(*args)  # one through a real interpreter start (seconds)
        assert code == 2, (args, err)
        assert needle in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# unmerge
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,kw", [("fp32", {}), ("bf16", {}), ("bf16", {"use_dora": True}),
                                      ("fp32", {"modules_to_save": ["lm_head"]})])
def test_unmerge_of_merge_is_the_base(dtype, kw, tiny_model_dir, tmp_path):
    from lorakit.adapters.unmerge import unmerge
    from lorakit.merge import merge_adapter

    a = make_adapter(tiny_model_dir, tmp_path / "a", seed=5, **kw)
    merge_adapter(a, tmp_path / "merged", dtype=dtype)
    report = unmerge(tmp_path / "merged", a, tmp_path / "base", base=tiny_model_dir, verify=True)
    assert report["worst_bound_ratio"] <= 1
    base, got = load_file(tiny_model_dir / "model.safetensors"), load_file(tmp_path / "base" / "model.safetensors")
    low = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    for k, w in base.items():
        assert got[k].dtype == low
        err = (got[k].float() - w).abs().max()
        assert err <= torch.finfo(low).eps * 4 * (w.abs().max() + merged[k].float().abs().max()), k
        if dtype == "fp32" and k.endswith("q_proj.weight"):  # the delta came off: far closer than before
            assert err < 1e-3 * (merged[k] - w).abs().max()


def test_unmerge_with_the_wrong_adapter_fails_verify(two, tiny_model_dir, tmp_path):
    from lorakit.adapters.unmerge import unmerge
    from lorakit.merge import merge_adapter

    merge_adapter(two[0], tmp_path / "merged", dtype="bf16")
    with pytest.raises(LorakitError, match="more than rounding") as e:
        unmerge(tmp_path / "merged", two[1], tmp_path / "base", base=tiny_model_dir, verify=True)
    assert e.value.exit_code == 1


def test_unmerge_of_a_two_adapter_merge(two, tiny_model_dir, tmp_path):
    from lorakit.adapters.unmerge import unmerge_weighted

    spec = [(two[0], 0.7), (two[1], -0.2)]
    merge_weighted(spec, tmp_path / "merged", dtype="fp32")
    report = unmerge_weighted(tmp_path / "merged", spec, tmp_path / "base", base=tiny_model_dir, verify=True)
    assert report["worst_bound_ratio"] <= 1 and report["max_abs_diff"] < 1e-6


# ------------------------------------------------------------------------------------------------
# extract
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tuned(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with every Linear (and one norm) changed by a full-rank perturbation."""
    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tuned")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "proj" in n or n == "model.norm.weight":
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    model.save_pretrained(path)
    return path


def test_extract_full_rank_reproduces_the_delta(tiny_model_dir, tuned, tmp_path):
    from lorakit.adapters.extract import extract

    report = extract(tiny_model_dir, tuned, tmp_path / "x", rank=128, verify=True)
    assert report["modules"] == 14 and report["max_relative_error"] < 1e-5
    assert report["not_extracted"] == ["model.norm.weight"]
    b, t = load_file(tiny_model_dir / "model.safetensors"), load_file(tuned / "model.safetensors")
    for m, d in deltas(tmp_path / "x").items():
        torch.testing.assert_close(d, t[f"{m}.weight"] - b[f"{m}.weight"], rtol=1e-4, atol=1e-6)
    # what is left is the norm's change, which no LoRA holds
    assert report["max_logit_diff"] < 0.2 * report["base_vs_tuned_logit_diff"]
    sub = extract(tiny_model_dir, tuned, tmp_path / "q", rank=128, targets=["q_proj"], verify=True)
    assert sub["modules"] == 2 and set(deltas(tmp_path / "q")) == {f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)}


def test_extract_low_rank_is_eckart_young(tiny_model_dir, tuned, tmp_path):
    from lorakit.adapters.extract import extract

    report = extract(tiny_model_dir, tuned, tmp_path / "x", rank=5)
    b, t = load_file(tiny_model_dir / "model.safetensors"), load_file(tuned / "model.safetensors")
    got = deltas(tmp_path / "x")
    assert len(got) == 14
    for m, d in got.items():
        D = t[f"{m}.weight"] - b[f"{m}.weight"]
        s = torch.linalg.svdvals(D.double())
        best = float((s[5:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
        err = float((D - d).norm() / D.norm())
        assert err == pytest.approx(best, rel=1e-3) and report["relative_error"][m] == pytest.approx(best, rel=1e-3)
        assert report["energy_kept"][m] == pytest.approx(1 - best ** 2, rel=1e-3)


def test_extract_randomized_matches_eckart_young(monkeypatch, tiny_model_dir, tuned, tmp_path):
    """The randomized SVD (used above EXACT_MAX_SIDE) on a delta of decaying spectrum, as fine-tuning deltas have."""
    from lorakit.adapters import extract as ex

    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(300, 300, generator=g))
    V, _ = torch.linalg.qr(torch.randn(200, 200, generator=g))
    s = 0.8 ** torch.arange(200.0)
    D = U[:, :200] @ torch.diag(s) @ V.T
    monkeypatch.setattr(ex, "EXACT_MAX_SIDE", 64)
    A, B, err, kept = ex.low_rank(D, 8)
    best = float((s[8:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
    assert err == pytest.approx(best, rel=1e-3)
    assert float((D - B @ A).norm() / D.norm()) == pytest.approx(best, rel=1e-3)


# ------------------------------------------------------------------------------------------------
# generate with several adapters
# ------------------------------------------------------------------------------------------------

def test_generate_many_answers_as_each_adapter_alone(tiny_model_dir, tmp_path):
    from lorakit.generate import generate_many
    from lorakit.model.load import load_for_inference, load_tokenizer
    from lorakit.train.evaluate import generate_batch

    adapters = []
    for i in range(2):  # large random factors: each adapter changes the greedy answer
        a = make_adapter(tiny_model_dir, tmp_path / f"a{i}", seed=10 + i, target_modules=["q_proj", "v_proj", "o_proj"])
        t = load_file(a / "adapter_model.safetensors")
        g = torch.Generator().manual_seed(i)
        from safetensors.torch import save_file

        save_file({k: torch.randn(v.shape, generator=g) for k, v in t.items()}, a / "adapter_model.safetensors")
        adapters.append(a)
    got = generate_many(tiny_model_dir, adapters, "What is the capital of France?", base_only=True, max_new_tokens=8)
    assert [label for label, _ in got] == ["base", str(adapters[0]), str(adapters[1])]
    tok = load_tokenizer(tiny_model_dir)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    for (label, text), a in zip(got, [None, *adapters]):
        model = load_for_inference(tiny_model_dir, adapter_dir=a)
        assert text == generate_batch(model, tok, [chat], max_new_tokens=8, batch_size=1)[0], label
    assert len({text for _, text in got}) == 3


def test_tensors_equal_reads_blocks_and_finds_a_change_in_the_last(tmp_path):
    """extract compares the tensors it does not factor (embeddings, norms) a block of rows at a time."""
    from safetensors.torch import save_file

    from lorakit.checkpoints.layout import base_index
    from lorakit.checkpoints.streaming import tensors_equal

    a = torch.randn(1000, 64).to(torch.bfloat16)
    b = a.clone()
    b[999, 3] += 1
    for name, w in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        save_file({"w": w, "s": torch.tensor(1.0)}, tmp_path / name / "model.safetensors")
    ia, ib = base_index(tmp_path / "a"), base_index(tmp_path / "b")
    assert not tensors_equal(ia["w"], ib["w"], chunk_bytes=4096)  # 16 rows a block: the change is in the last
    assert tensors_equal(ia["w"], ia["w"], chunk_bytes=4096) and tensors_equal(ia["s"], ib["s"])
