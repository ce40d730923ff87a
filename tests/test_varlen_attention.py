"""lorakit.speed.varlen_attention: padding-free batches attend within each row given the rows' boundaries (no mask),
every other call runs SDPA with transformers' mask; `auto` picks it for padding-free batches on a GPU and falls
back where it does not fit. On a CPU the rows go through SDPA one by one; the GPU test compares that with the
varlen kernel."""

import pytest
import torch

from lorakit import speed
from lorakit.recipe.loader import validate_data
from lorakit.speed import varlen_attention as va


def _tiny_llama(layers: int = 2, **cfg):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                        pad_token_id=0, **cfg))


def _rows(lengths=(5, 11, 8)):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 300, (n,), generator=g).tolist()} for n in lengths]


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_padding_free_batch_with_boundaries_matches_padded_sdpa():
    """TRL's padding-free collator hands the rows' boundaries to the model; they reach the attention function
    through transformers' kwargs, and loss and gradients equal padded batches with SDPA."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    va.register()
    rows = _rows()
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    assert "cu_seq_lens_q" in flat and "attention_mask" not in flat
    flat.pop("seq_idx", None)  # for linear-attention layers; Llama does not take it

    model = _tiny_llama()
    l_ref, g_ref = _loss_and_grads(model, padded)
    model.set_attn_implementation(va.NAME)
    before = dict(va.calls)
    l_var, g_var = _loss_and_grads(model, flat)
    assert va.calls["rows"] - before.get("rows", 0) == 2  # one call per layer, with boundaries
    assert va.calls["sdpa"] == before.get("sdpa", 0)
    assert l_var == pytest.approx(l_ref, rel=1e-5)
    for n in g_ref:
        torch.testing.assert_close(g_var[n], g_ref[n], rtol=1e-4, atol=1e-6, msg=n)
    # the rows really are kept apart: one row of the same tokens, attending across rows, differs
    crossed = {k: v for k, v in flat.items() if k not in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                                                            "max_length_k", "position_ids")}
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        assert abs(model(**crossed, use_cache=False).loss.item() - l_ref) > 1e-4 * l_ref


def test_calls_without_boundaries_run_sdpa_with_its_mask():
    """Padded batches and generation (left padding, a cache) give what `attn_implementation="sdpa"` gives."""
    va.register()
    model = _tiny_llama().eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (ids != 0).long()
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref_logits = model(input_ids=ids, attention_mask=mask).logits
        ref_gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        model.set_attn_implementation(va.NAME)
        before = va.calls["sdpa"]
        logits = model(input_ids=ids, attention_mask=mask).logits
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert va.calls["sdpa"] > before
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref_logits[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, ref_gen)


def test_fits_plain_causal_attention_only():
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    assert va.fits(LlamaConfig(hidden_size=64, num_attention_heads=4))
    assert not va.fits(LlamaConfig(hidden_size=64, num_attention_heads=4, attention_dropout=0.1))
    assert not va.fits(LlamaConfig(hidden_size=64 * 300, num_attention_heads=1))  # head 19200 > 256
    assert va.fits(Qwen2Config(hidden_size=64, num_attention_heads=4, use_sliding_window=False))
    assert not va.fits(Qwen2Config(hidden_size=64, num_attention_heads=4, use_sliding_window=True,
                                   sliding_window=128))
    assert not va.fits(GPT2Config(n_embd=64, n_head=4))  # not in the plain-causal list


def recipe(**sections):
    doc = {"base_model": "llama-3.1-8b", "data": {"path": "d.jsonl", "max_length": 2048},
           "quantization": {"bits": 4}, "train": {"batch_size": 2}}
    for k, v in sections.items():
        doc[k] = {**doc.get(k, {}), **v} if isinstance(v, dict) else v
    return validate_data(doc)


def test_auto_loads_varlen_where_it_fits_else_flex_then_sdpa(tmp_path, monkeypatch):
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    from lorakit.errors import LorakitError
    from lorakit.model.load import attn_implementation

    llama, qwen_sw, gpt2 = tmp_path / "llama", tmp_path / "qwen_sw", tmp_path / "gpt2"
    LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(llama)
    Qwen2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, use_sliding_window=True,
                sliding_window=64).save_pretrained(qwen_sw)
    GPT2Config(n_layer=1).save_pretrained(gpt2)
    planned = speed.Plan(attn_implementation="varlen")
    monkeypatch.setattr(va, "available", lambda: True)
    assert attn_implementation(recipe(), llama, planned) == va.NAME
    assert attn_implementation(recipe(), qwen_sw, planned) == "flex_attention"  # sliding window in use
    assert attn_implementation(recipe(), gpt2, planned) == "sdpa"  # neither varlen nor flex
    assert attn_implementation(recipe(model={"trust_remote_code": True}), llama, planned) == "sdpa"
    monkeypatch.setattr(va, "available", lambda: False)  # no kernel (old torch, pre-Ampere GPU)
    assert attn_implementation(recipe(), llama, planned) == "flex_attention"
    asked = recipe(model={"attn_implementation": "varlen"})  # asked for: kept (rows through SDPA without a kernel)
    assert attn_implementation(asked, llama, planned) == va.NAME
    for other in (gpt2, qwen_sw):  # but not where it would attend differently from the model
        with pytest.raises(LorakitError, match="plain causal attention") as e:
            attn_implementation(asked, other, planned)
        assert e.value.field == "model.attn_implementation"


@pytest.mark.parametrize("sections", [
    {"data": {"path": "d.jsonl", "padding_free": False}},
    {"method": "grpo", "grpo": {"rewards": [{"fn": "exact_answer"}]}, "data": {"path": "d.jsonl"}},
])
def test_recipe_refuses_varlen_without_flattened_sft_batches(tmp_path, sections):
    import yaml

    from lorakit.errors import RecipeError
    from lorakit.recipe.loader import load_recipe

    doc = {"base_model": "llama-3.1-8b", "model": {"attn_implementation": "varlen"}, **sections}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    (problem,) = [q for q in e.value.problems if q.field == "model.attn_implementation"]
    assert problem.line == 3 and "padding-free" in problem.message  # the `attn_implementation: varlen` line


@pytest.mark.gpu
def test_varlen_kernel_matches_rows_through_sdpa_on_gpu():
    """bf16, grouped keys/values (32 query heads on 8), rows of uneven lengths: forward and all three
    gradients of the kernel against each row through SDPA."""
    assert va.available()
    g = torch.Generator(device="cuda").manual_seed(0)
    lens = [1134, 377, 121, 632, 234, 194, 573, 744]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    T = sum(lens)

    def leaf(h):
        return torch.randn(T, h, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()

    q, k, v = leaf(32), leaf(8), leaf(8)
    grad = torch.randn(T, 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    outs = []
    for fn in (lambda: va._varlen(q, k, v, cu.cuda(), max(lens), 128**-0.5),
               lambda: va._rows(q, k, v, cu, 128**-0.5)):
        for t in (q, k, v):
            t.grad = None
        out = fn()
        out.backward(grad)
        outs.append([out.detach().float()] + [t.grad.float() for t in (q, k, v)])
    for name, a, b in zip(("out", "dq", "dk", "dv"), *outs):
        err = (a - b).abs().max().item() / b.abs().max().item()
        assert err < 2e-2, (name, err)


def test_flattened_rows_without_boundaries_take_them_from_position_ids():
    """A flattened batch with only position_ids (no collator kwargs) still attends within each row, and no
    L x L mask is built for it (transformers' mask for the batch is None)."""
    from transformers.masking_utils import create_causal_mask
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    va.register()
    rows = _rows()
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(rows)
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    model = _tiny_llama().eval()
    with torch.no_grad():
        ref = model(**padded, use_cache=False).loss.item()
        model.set_attn_implementation(va.NAME)
        before = va.calls["rows"]
        got = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"], labels=flat["labels"],
                    use_cache=False).loss.item()
        embeds = model.get_input_embeddings()(flat["input_ids"])
        built = create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=None,
                                   past_key_values=None, position_ids=flat["position_ids"])
    assert va.calls["rows"] - before == 2 and got == pytest.approx(ref, rel=1e-5)
    assert built is None


def test_inputs_the_kernel_does_not_take_go_row_by_row():
    q16 = torch.zeros(4, 2, 8, dtype=torch.bfloat16)
    assert not va._kernel_takes(q16.float(), q16.float(), q16.float())  # fp32 (peft's upcast residual stream)
    assert not va._kernel_takes(q16, q16.float(), q16)  # mixed
    with pytest.raises(RuntimeError, match="does not implement sliding_window"):
        va.attention(torch.nn.Module(), q16[None], q16[None], q16[None], None, sliding_window=4)


def test_plan_picks_varlen_for_flattened_16_bit_sft_on_cuda(monkeypatch):
    import lorakit.runtime.device
    from lorakit.speed import planning

    monkeypatch.setattr(lorakit.runtime.device, "auto_dtype_name", lambda device: "bf16" if device == "cuda" else "fp32")
    monkeypatch.setattr(planning, "liger_available", lambda: False)

    def attn(**sections):
        return speed.plan(recipe(**sections), "cuda").attn_implementation

    assert attn() == "varlen"
    assert attn(data={"path": "d", "packing": True}) == "varlen"  # TRL packs through its padding-free collator
    assert attn(quantization={"bits": 8}) == "sdpa"  # peft's fp32 upcast: fp32 attention inputs
    assert attn(quantization={"bits": 4, "compute_dtype": "fp16"}, train={"batch_size": 2, "precision": "fp16"}) \
        == "sdpa"  # fp16 compute keeps the fp32 upcast too
    assert attn(quantization={"bits": "none"}) == "varlen"  # a bf16 base
    assert speed.plan(recipe(), "cpu").attn_implementation == "sdpa"
    # asked for: padding-free follows, even where auto would leave it off (one row a batch, a CPU)
    asked = {"model": {"attn_implementation": "varlen"}}
    assert speed.plan(recipe(train={"batch_size": 1}, **asked), "cuda").padding_free is True
    assert speed.plan(recipe(**asked), "cpu").padding_free is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the CPU path (rows through SDPA one by one)")
def test_run_with_varlen_asked_for_keeps_padding_free_and_a_loadable_recipe(tmp_path, monkeypatch, tiny_model_dir):
    """Rows of one length would settle `padding_free: auto` off; an explicit varlen keeps it (else every call
    would run SDPA and the written recipe would break the varlen rule). On a CPU the rows go through SDPA one by
    one; the summary counts the training's calls."""
    import yaml
    from helpers import write_jsonl

    from lorakit.recipe.loader import load_recipe
    from lorakit.train.run import run_training

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", [{"text": "The quick brown fox jumps over the lazy dog."}] * 8)
    doc = {"name": "varlen", "base_model": str(tiny_model_dir), "quantization": {"bits": "none"},
           "model": {"attn_implementation": "varlen"}, "lora": {"r": 4},
           "data": {"path": "train.jsonl", "max_length": 24},
           "train": {"max_steps": 2, "batch_size": 4, "logging_steps": 1, "gradient_checkpointing": True},
           "output": {"dir": "runs/varlen"}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
    summary = run_training(load_recipe(tmp_path / "r.yaml"))
    assert summary["options"]["padding_free"] is True and summary["options"]["attn_implementation"] == "varlen"
    calls = summary["attention_calls"]
    assert set(calls) == {"rows"} and calls["rows"] == 2 * 2 * 2  # 2 layers, 2 steps, forward + recompute
    assert load_recipe(tmp_path / "runs/varlen/recipe.yaml").model.attn_implementation == "varlen"
