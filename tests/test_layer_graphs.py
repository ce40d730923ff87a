"""lorakit.speed.layer_graphs: checkpointed decoder layers replayed as CUDA graphs train exactly as torch's checkpoint
does - same losses, gradients and updated weights over several optimizer steps (the replays read the weights the
optimizer changed in place) - and LoRA dropout's recompute inside a replay draws the forward's mask again.

On a GPU the graphs are real (CudaRecorder, bf16 autocast, the Triton dropout kernels compiled). On a CPU
machine EagerRecorder stands in for the capture - the same static buffers, autograd function, seeds and
fallbacks, only no CUDA graph - and the dropout kernels run in Triton's interpreter."""

import pytest
import torch
from helpers import tiny_lora

from lorakit import speed
from lorakit.speed import checkpointing, layer_graphs

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def _model(p: float, layers: int = 3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, attn_implementation="sdpa")
    pm = tiny_lora(LlamaForCausalLM(cfg).to(DEVICE), p)
    pm.train()
    return pm


def _recorder():
    return layer_graphs.CudaRecorder(0) if CUDA else layer_graphs.EagerRecorder()


def _autocast():
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else contextlib.nullcontext()


def _train(pm, steps: int, ids) -> list[float]:
    opt = torch.optim.SGD([q for q in pm.parameters() if q.requires_grad], lr=0.5)
    losses = []
    for _ in range(steps):
        with _autocast():
            loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # the Trainer drops the gradients: graphs must not write into them
        losses.append(loss.item())
    return losses


@pytest.fixture
def kernels_here(monkeypatch):
    """The fused layer's Triton dropout kernels on this machine (interpreted on a CPU)."""
    pytest.importorskip("triton")
    from lorakit.speed.kernels import lora_dropout as lora_triton

    if not CUDA:
        import triton

        if not triton.knobs.runtime.interpret:
            pytest.skip("Triton's interpreter is off (tests/conftest.py turns it on before triton is imported)")
        monkeypatch.setattr(lora_triton, "available", lambda device_type, dtype, rank: True)


def test_graphed_layers_train_like_torch_checkpoint():
    ids = torch.randint(0, 300, (2, 16), device=DEVICE)
    ref, graphed = _model(0.0), _model(0.0)
    checkpointing.set_checkpointing(ref, None)
    done = checkpointing.apply_to_model(graphed, speed.Plan(**{"gradient_checkpointing": True, "checkpoint_layers": None,
                                         "cuda_graphs": True}), recorder=_recorder())
    g = layer_graphs.find(graphed)
    assert done == {"checkpoint_layers": 3} and g is not None
    steps = layer_graphs.WARMUP_CALLS + 3  # warm-up steps run torch's checkpoint, then capture, then replays
    want, got = _train(ref, steps, ids), _train(graphed, steps, ids)
    assert g.captured == 3 and g.failures == {} and g.skipped == {}, (g.skipped, g.failure_trace)
    assert got == pytest.approx(want, rel=1e-3 if CUDA else 1e-6)
    moved = [n for (n, a), (_, b) in zip(_model(0.0).named_parameters(), graphed.named_parameters())
             if a.requires_grad and not torch.equal(a, b)]
    assert len(moved) == 3 * 7 * 2  # every LoRA weight was updated, and the replays above read the updates
    for (n, a), (_, b) in zip(ref.named_parameters(), graphed.named_parameters()):
        if a.requires_grad:
            assert torch.allclose(a.float(), b.float(), rtol=1e-2 if CUDA else 1e-5, atol=1e-4 if CUDA else 1e-6), n


def test_a_replayed_recompute_draws_the_forwards_dropout_mask(kernels_here):
    """A replayed layer's gradients are those of the same forward run without checkpointing on the seeds the
    replay drew: the recompute inside the backward graph took the forward's masks again."""
    from lorakit.speed.kernels import lora_dropout as lora_triton

    ids = torch.randint(0, 300, (2, 16), device=DEVICE)
    pm = _model(0.3, layers=1)
    checkpointing.apply_to_model(pm, speed.Plan(**{"gradient_checkpointing": True, "cuda_graphs": True}), recorder=_recorder())
    g = layer_graphs.find(pm)
    _train(pm, layer_graphs.WARMUP_CALLS, ids)  # warm-up
    with _autocast():
        loss = pm(input_ids=ids, labels=ids).loss  # captured and replayed
    loss.backward()
    assert g.captured == 1 and g.failures == {}, g.failure_trace
    (entry,) = g._entries.values()
    drawn = entry.seeds.values.clone()
    with _autocast():
        again = pm(input_ids=ids, labels=ids).loss
    again.backward()  # another replayed step: new masks
    assert not torch.equal(drawn, entry.seeds.values)
    pm.zero_grad(set_to_none=True)
    with _autocast():
        loss = pm(input_ids=ids, labels=ids).loss
    loss.backward()
    got = {n: q.grad.clone() for n, q in pm.named_parameters() if q.grad is not None}
    pm.zero_grad(set_to_none=True)
    layer = checkpointing.decoder_layers(pm.get_base_model())[0]
    layer.gradient_checkpointing = False
    with _autocast(), lora_triton.device_seeds(entry.seeds):  # the seeds the replay used, in the same order
        ref = pm(input_ids=ids, labels=ids).loss
    ref.backward()
    assert entry.seeds.used == 7  # one per adapted linear
    assert ref.item() == pytest.approx(loss.item(), rel=1e-3 if CUDA else 1e-6)
    assert len(got) == 14
    for n, q in pm.named_parameters():
        if q.grad is not None:
            assert torch.allclose(got[n].float(), q.grad.float(), rtol=2e-2 if CUDA else 1e-4,
                                  atol=1e-4 if CUDA else 1e-6), n


def test_what_a_graph_cannot_hold_runs_torch_checkpoint(monkeypatch):
    """LoRA dropout without the Triton kernels cannot be redrawn inside a replay: the capture is refused, the
    reason recorded, and the layer keeps training under torch's checkpoint."""
    from lorakit.speed.kernels import lora_dropout as lora_triton

    monkeypatch.setattr(lora_triton, "available", lambda device_type, dtype, rank: False)
    ids = torch.randint(0, 300, (2, 16), device=DEVICE)
    pm = _model(0.3, layers=2)
    checkpointing.apply_to_model(pm, speed.Plan(**{"gradient_checkpointing": True, "cuda_graphs": True}), recorder=_recorder())
    g = layer_graphs.find(pm)
    losses = _train(pm, layer_graphs.WARMUP_CALLS + 2, ids)
    assert g.captured == 0 and all("Triton dropout kernels" in why for why in g.failures)
    if CUDA:  # after a failed capture on a GPU no other is tried
        assert sum(g.failures.values()) == 1 and g.skipped["no captures after a failed one"] > 0
    else:
        assert sum(g.failures.values()) == 2
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]


def test_other_shapes_and_no_grad_run_without_graphs():
    pm = _model(0.0, layers=1)
    checkpointing.apply_to_model(pm, speed.Plan(**{"gradient_checkpointing": True, "cuda_graphs": True}), recorder=_recorder())
    g = layer_graphs.find(pm)
    for t in (8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10):  # the third call of a shape captures it, two shapes at most
        ids = torch.randint(0, 300, (1, t), device=DEVICE)
        _train(pm, 1, ids)
    assert g.captured == 2 and sorted(k[1][2][0] for k in g._entries) == [(1, 8, 64), (1, 9, 64)]
    replays = []
    replay = g._replay
    g._replay = type("Counting", (), {"apply": staticmethod(lambda *a: replays.append(1) or replay.apply(*a))})
    _train(pm, 1, torch.randint(0, 300, (1, 8), device=DEVICE))
    assert replays == [1]  # a captured shape replays
    with torch.no_grad():
        pm(input_ids=torch.randint(0, 300, (1, 8), device=DEVICE))  # the same shape without grad: the layer as it is
    assert replays == [1] and g.captured == 2


def test_layers_with_other_random_numbers_are_not_captured():
    """Attention or residual dropout draws torch's random numbers, which a replayed recompute would draw anew
    (torch's checkpoint restores the generator, a graph cannot): such layers keep torch's checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, attn_implementation="sdpa", attention_dropout=0.1)
    pm = tiny_lora(LlamaForCausalLM(cfg).to(DEVICE), 0.0)
    checkpointing.apply_to_model(pm, speed.Plan(**{"gradient_checkpointing": True, "cuda_graphs": True}), recorder=_recorder())
    g = layer_graphs.find(pm)
    _train(pm, layer_graphs.WARMUP_CALLS + 2, torch.randint(0, 300, (2, 16), device=DEVICE))
    assert g.captured == 0 and g.failures == {}
    assert g.skipped == {"attention dropout in self_attn": 2 * (layer_graphs.WARMUP_CALLS + 2)}


@pytest.mark.parametrize("form", ["forward", "call"])
def test_both_forms_transformers_passes_a_layer_in(form):
    """transformers hands the checkpointing function partial(forward, layer, **kwargs) in recent releases and
    partial(layer.__call__, **kwargs) in 5.17 and before (the GPU image's): both are captured."""
    from functools import partial

    pm = _model(0.0, layers=1)
    layer = checkpointing.decoder_layers(pm.get_base_model())[0]
    graphed = layer_graphs.GraphedCheckpoint(_recorder())
    rotary = pm.get_base_model().model.rotary_emb
    h = torch.randn(1, 8, 64, device=DEVICE)
    pos = torch.arange(8, device=DEVICE)[None]
    kw = {"position_embeddings": rotary(h, pos), "attention_mask": None}
    # the layer's own forward, under transformers' checkpointing wrapper in recent releases
    forward = getattr(type(layer).forward, "__wrapped__", type(layer).forward)
    run = partial(forward, layer, **kw) if form == "forward" else partial(layer.__call__, **kw)
    ref = h.clone().requires_grad_()
    with _autocast():
        want = forward(layer, ref, **kw)
    want.sum().backward()
    for _ in range(layer_graphs.WARMUP_CALLS + 2):
        x = h.clone().requires_grad_()
        with _autocast():
            out = graphed(run, x)
        out.sum().backward()
    assert graphed.captured == 1 and graphed.skipped == {}
    tol = {"rtol": 2e-2, "atol": 1e-2} if CUDA else {"rtol": 1e-5, "atol": 1e-6}
    assert torch.allclose(out.float(), want.float(), **tol) and torch.allclose(x.grad.float(), ref.grad.float(), **tol)
