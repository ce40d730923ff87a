"""lorakit.speed.tiled_mlp: an MLP run over slices of the sequence gives the untiled MLP's loss and gradients, draws
LoRA dropout's masks again in its backward, survives a later patch of the MLP's forward (Liger's), and the plan
and the estimate tile only long micro-batches."""

import pytest
import torch
from helpers import tiny_lora

from lorakit import speed
from lorakit.estimate.max_context import at_length
from lorakit.estimate.memory import estimate
from lorakit.recipe.loader import validate_data
from lorakit.speed import checkpointing, tiled_mlp


def _model(p: float = 0.0, fused: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, attn_implementation="sdpa")
    pm = tiny_lora(LlamaForCausalLM(cfg), p, fused=fused)
    pm.train()
    return pm


def _grads(pm, ids) -> tuple[float, dict]:
    loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: q.grad.clone() for n, q in pm.named_parameters() if q.requires_grad}


@pytest.mark.parametrize("offload", [False, True])
def test_tiled_mlps_give_the_untiled_gradients(offload):
    ids = torch.randint(0, 300, (2, 24))
    ref, tiled = _model(), _model()
    plan = speed.Plan(gradient_checkpointing=offload, offload_activations=offload)
    checkpointing.apply_to_model(ref, plan)
    done = checkpointing.apply_to_model(tiled, speed.Plan(gradient_checkpointing=offload,
                                                          offload_activations=offload, tiled_mlp=True))
    assert done["tiled_mlp_layers"] == 2
    calls = []
    orig = tiled_mlp._Tiled.apply
    tiled_mlp._Tiled.apply = lambda *a: calls.append(a[1]) or orig(*a)
    try:
        for layer in checkpointing.decoder_layers(tiled.get_base_model()):
            layer._forward_pre_hooks.clear()
        tiled_mlp.enable(checkpointing.decoder_layers(tiled.get_base_model()), chunk=7)  # 48 tokens: 7 slices
        want, got = _grads(ref, ids), _grads(tiled, ids)
    finally:
        tiled_mlp._Tiled.apply = orig
    assert calls == [7, 7]  # each layer's MLP with grad (a checkpointed layer's first forward slices without)
    assert got[0] == pytest.approx(want[0], rel=1e-6)
    for n, g in want[1].items():
        assert torch.allclose(got[1][n], g, rtol=1e-4, atol=1e-6), n


def test_the_backward_draws_the_forwards_dropout_masks():
    """With LoRA dropout the slices' masks are the forward's: the gradients equal those of the same slices run
    with grad from the same random state."""
    pm = _model(p=0.3, fused=False)
    mlp = pm.get_base_model().model.layers[0].mlp
    x = torch.randn(1, 20, 64)
    g = torch.randn(1, 20, 64)
    params = [q for q in mlp.parameters() if q.requires_grad]
    torch.manual_seed(5)
    out = tiled_mlp.tiled(mlp.forward, mlp, chunk=6)(x.requires_grad_(True))
    got = torch.autograd.grad(out, (x, *params), g)
    torch.manual_seed(5)
    xs = x.detach().requires_grad_(True)
    ref_out = torch.cat([mlp(s) for s in xs.split(6, dim=1)], dim=1)
    want = torch.autograd.grad(ref_out, (xs, *params), g)
    assert torch.allclose(out, ref_out)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_later_patch_of_the_mlp_forward_is_tiled_too():
    pm = _model()
    layer = checkpointing.decoder_layers(pm.get_base_model())[0]
    tiled_mlp.enable([layer], chunk=4)
    seen = []
    plain = layer.mlp.forward
    layer.mlp.forward = lambda x: seen.append(x.shape) or plain(x)  # as Liger patches the instance after loading
    pm(input_ids=torch.randint(0, 300, (1, 10)), labels=torch.randint(0, 300, (1, 10))).loss.backward()
    assert getattr(layer.mlp.forward, "lorakit_tiled", False)
    assert seen == [(1, 4, 64), (1, 4, 64), (1, 2, 64)] * 2  # 10 tokens: slices of 4, 4, 2, again in backward
    seen.clear()
    with torch.no_grad():
        pm(input_ids=torch.randint(0, 300, (1, 10)))
    assert seen == [(1, 4, 64), (1, 4, 64), (1, 2, 64)]  # without grad too: no buffer of the whole row


def _recipe(tokens: int, **train):
    r = validate_data({"base_model": "llama-3.1-8b", "data": {"path": "d.jsonl"}, "quantization": {"bits": 4},
                       "train": dict(train)})
    return at_length(r, tokens)


def test_auto_tiles_rows_that_would_not_fit_otherwise_and_the_estimate_counts_a_slice():
    gpu = 80 * 1024**3
    long = estimate(_recipe(600_000), device="cuda", device_bytes=gpu)
    assert long["setup"]["tiled_mlp"] and long["setup"]["offload_activations"]
    assert long["peak_bytes_offloaded"] > gpu >= long["memory"]["peak_bytes"]
    assert not estimate(_recipe(200_000), device="cuda", device_bytes=gpu)["setup"]["tiled_mlp"]  # fits whole
    assert not estimate(_recipe(600_000), device="cuda")["setup"]["tiled_mlp"]  # the GPU is not known
    assert speed.plan(_recipe(2048, tiled_mlp=True), "cpu").tiled_mlp
    long_on, long_off = (estimate(_recipe(131072, tiled_mlp=v), device="cuda")["memory"] for v in (True, False))
    # the MLP's operands and gradients (~100 KiB a token here) for 8k tokens instead of 128k
    assert long_off["peak_bytes"] - long_on["peak_bytes"] > 8 * 1024**3
    short_on, short_off = (estimate(_recipe(4096, tiled_mlp=v), device="cuda")["memory"] for v in (True, False))
    assert short_on["peak_bytes"] == pytest.approx(short_off["peak_bytes"], rel=0.02)
