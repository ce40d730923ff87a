"""lorakit.speed.recompute_tail: a replayed layer's recompute skips the last linear's base matmul exactly where nothing
reads its output (Llama: mlp.down_proj), with the same gradients; where something does (Gemma 2's
post-feedforward norm saves its input) the check refuses and the layer recomputes in full. The placeholder's
backward is the base layer's own, for a 16-bit linear and a bitsandbytes 4-bit one."""

import pytest
import torch
from helpers import tiny_lora

from lorakit import speed
from lorakit.speed import checkpointing, fused_lora, layer_graphs, recompute_tail

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _model(family: str):
    import transformers

    torch.manual_seed(0)
    dims = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dims, attn_implementation="sdpa"))
    else:
        model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**dims, head_dim=16,
                                                                         attn_implementation="eager"))
    pm = tiny_lora(model.to(DEVICE), 0.0)
    pm.train()
    return pm


def _step(pm, ids) -> dict:
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else torch.autocast("cpu", enabled=False)
    with ctx:
        loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    pm.zero_grad(set_to_none=True)
    return grads


def _base_calls_in_backward(pm, ids, name: str, monkeypatch) -> int:
    """How often `name`'s base layer (in each decoder layer) computes its output during a step's backward pass:
    called as a module, or inside the fused layer's function (fused_lora.lora_linear) unless told to skip it."""
    calls = []
    layers = checkpointing.decoder_layers(pm.get_base_model())
    mods = [layer.get_submodule(name).base_layer for layer in layers]
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else torch.autocast("cpu", enabled=False)
    with ctx:
        loss = pm(input_ids=ids, labels=ids).loss
    lora_linear = fused_lora.lora_linear

    def counted(base, *args, skip=False, **kwargs):  # the fused layer's base + LoRA function
        if not skip and any(base is m for m in mods):
            calls.append(1)
        return lora_linear(base, *args, skip=skip, **kwargs)

    monkeypatch.setattr(fused_lora, "lora_linear", counted)
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in mods]
    try:
        loss.backward()
    finally:
        for h in hooks:
            h.remove()
        monkeypatch.undo()
    pm.zero_grad(set_to_none=True)
    return len(calls)


@pytest.mark.parametrize("family,skipped", [("llama", True), ("gemma2", False)])
def test_the_recompute_skips_the_last_linear_only_where_nothing_reads_it(family, skipped, monkeypatch):
    ids = torch.randint(0, 300, (2, 16), device=DEVICE)
    ref, graphed = _model(family), _model(family)
    checkpointing.set_checkpointing(ref, None)
    rec = layer_graphs.CudaRecorder(0) if CUDA else layer_graphs.EagerRecorder()
    checkpointing.apply_to_model(graphed, speed.Plan(**{"gradient_checkpointing": True, "checkpoint_layers": None, "cuda_graphs": True}),
                         recorder=rec)
    for _ in range(layer_graphs.WARMUP_CALLS + 1):  # warm-up calls, then the capture
        _step(graphed, ids)
    g = layer_graphs.find(graphed)
    assert g.captured == 2 and g.failures == {}, g.failure_trace
    tails = [e.tail for e in g._entries.values()]
    layers = checkpointing.decoder_layers(graphed.get_base_model())
    assert tails == ([layer.mlp.down_proj for layer in layers] if skipped else [None, None])
    assert g.tails_skipped == (2 if skipped else 0)  # what the run's summary.json reports
    if not CUDA:  # a CUDA graph replays without calling the modules: the count needs the eager stand-in
        assert _base_calls_in_backward(graphed, ids, "mlp.down_proj", monkeypatch) == (0 if skipped else 2)
        # its output feeds what backward reads
        assert _base_calls_in_backward(graphed, ids, "mlp.up_proj", monkeypatch) == 2
    want, got = _step(ref, ids), _step(graphed, ids)
    assert want.keys() == got.keys() and len(got) == 2 * 7 * 2
    for n in want:
        assert torch.allclose(want[n].float(), got[n].float(), rtol=2e-2 if CUDA else 1e-5,
                              atol=1e-4 if CUDA else 1e-7), n


def _linear(bits):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=False, dtype=torch.bfloat16)
    if bits is None:
        return lin.to(DEVICE)
    bnb = pytest.importorskip("bitsandbytes")
    q = bnb.nn.Linear4bit(64, 96, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    return q.to(DEVICE)


@pytest.mark.parametrize("bits", [None, 4])
def test_the_placeholder_has_the_base_layers_shape_and_backward(bits):
    base = _linear(bits)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
    grad = torch.randn(3, 5, 96, dtype=torch.bfloat16, device=DEVICE)
    out = base(x)
    (want,) = torch.autograd.grad(out, x, grad)
    with recompute_tail.skipping(base, fill=float("nan")):
        placeholder = recompute_tail.unread_output(base, x)
    (got,) = torch.autograd.grad(placeholder, x, grad)
    assert placeholder.shape == out.shape and placeholder.dtype == out.dtype
    assert bool(placeholder.isnan().all())  # not computed: the check's fill
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_verify_refuses_an_output_that_is_read():
    base = _linear(None)
    x = torch.randn(4, 64, dtype=torch.bfloat16, device=DEVICE)

    def grads(read: bool):
        xi = x.detach().requires_grad_(True)
        out = recompute_tail.unread_output(base, xi) if recompute_tail.skips(base) else base(xi)
        y = out * out if read else out + 1  # a product saves its inputs; an add saves nothing
        return torch.autograd.grad(y.sum(), xi)

    assert recompute_tail.verify(base, lambda: grads(read=False))
    assert not recompute_tail.verify(base, lambda: grads(read=True))
