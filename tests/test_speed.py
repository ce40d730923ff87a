"""lorakit.speed: the levers keep the math (fused LoRA vs peft) and the budget arithmetic holds."""

import pytest
import torch

from lorakit import speed


def _tiny_peft(fused: bool, tmp_path, p: float = 0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300)
    model = LlamaForCausalLM(cfg)
    lc = LoraConfig(r=8, lora_alpha=16, lora_dropout=p, target_modules="all-linear", task_type="CAUSAL_LM")
    speed.customize_lora_config(lc, {"fused_lora": fused}, None)
    torch.manual_seed(1)
    pm = get_peft_model(model, lc)
    for name, prm in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(prm, std=0.05)
    return pm


def _grads(pm, ids):
    pm.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: q.grad.float() for n, q in pm.named_parameters() if q.grad is not None}


def test_fused_lora_matches_peft(tmp_path):
    ids = torch.randint(0, 300, (2, 12))
    ref, fused = _tiny_peft(False, tmp_path), _tiny_peft(True, tmp_path)
    assert type(fused.base_model.model.model.layers[0].mlp.down_proj).__name__ == "FusedLoraLinear"
    l0, g0 = _grads(ref, ids)
    l1, g1 = _grads(fused, ids)
    assert abs(l0 - l1) / l0 < 1e-3
    assert g0.keys() == g1.keys() and len(g0) == 3 * 7 * 2
    for n in g0:
        assert (g0[n] - g1[n]).norm() <= 0.05 * g0[n].norm() + 1e-6, n


def test_fused_lora_dropout_trains_and_saves_plain_adapter(tmp_path):
    ids = torch.randint(0, 300, (2, 12))
    pm = _tiny_peft(True, tmp_path, p=0.3)
    loss, g = _grads(pm, ids)
    assert all(torch.isfinite(v).all() for v in g.values()) and any(v.abs().sum() > 0 for v in g.values())
    pm.save_pretrained(tmp_path / "ad")
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=300))
    again = PeftModel.from_pretrained(base, tmp_path / "ad")  # a plain peft adapter
    assert type(again.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear"


def test_selective_checkpointing_sets_first_k_layers(tmp_path):
    pm = _tiny_peft(True, tmp_path)
    assert speed.set_checkpointing(pm, 2) == 2
    flags = [layer.gradient_checkpointing for layer in speed.decoder_layers(pm.get_base_model())]
    assert flags == [True, True, False]
    assert speed.set_checkpointing(pm, None) == 3
    assert speed.set_checkpointing(pm, 0) == 0


@pytest.mark.parametrize("budget,expect", [(10, 32), (12, 32 - 4), (100, 0), (13.9, 32 - 7)])
def test_checkpoint_layers_for_budget(budget, expect):
    gib = 2**30
    assert speed.checkpoint_layers_for_budget(32, 10 * gib, gib // 2, int(budget * gib)) == expect


def test_sft_kwargs_padding_free_drops_max_length():
    kw = speed.sft_config_kwargs({"liger": True, "padding_free": True})
    assert kw["use_liger_kernel"] and kw["padding_free"] and kw["max_length"] is None
    assert kw["gradient_checkpointing"] is False  # apply_to_model owns checkpointing
