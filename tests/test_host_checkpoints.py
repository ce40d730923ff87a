"""lorakit.speed.host_checkpoints: checkpointed layers whose inputs live in host memory train exactly as torch's
checkpoint does (eager layers and CUDA-graph replays), each layer's input is offloaded once a step and brought back
one layer ahead of its recompute, and the plan turns it on only where a layer hides the copy.

On a CPU the store copies without streams (same bookkeeping); on a GPU (`gpu` marker) the copies go through pinned
memory on a side stream and the GPU holds O(1) checkpoints instead of one per layer."""

import pytest
import torch
from helpers import tiny_lora

from lorakit import speed
from lorakit.errors import LorakitError
from lorakit.recipe.loader import validate_data
from lorakit.speed import checkpointing, host_checkpoints, layer_graphs
from lorakit.speed.planning import offload_activations

CUDA = torch.cuda.is_available()
GIB = 1024**3
DEVICE = "cuda" if CUDA else "cpu"


def _model(layers: int = 3, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, attn_implementation="sdpa")
    pm = tiny_lora(LlamaForCausalLM(cfg).to(DEVICE))
    pm.train()
    return pm


def _train(pm, steps: int, ids) -> list[float]:
    opt = torch.optim.SGD([q for q in pm.parameters() if q.requires_grad], lr=0.5)
    losses = []
    for _ in range(steps):
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _same_weights(a, b, tol=1e-6):
    for (n, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        if x.requires_grad:
            assert torch.allclose(x.float(), y.float(), rtol=tol, atol=tol), n


@pytest.mark.parametrize("graphs", [False, True])
def test_offloaded_layers_train_like_torch_checkpoint(graphs):
    ids = torch.randint(0, 300, (2, 16), device=DEVICE)
    ref, off = _model(), _model()
    checkpointing.set_checkpointing(ref, None)
    plan = speed.Plan(gradient_checkpointing=True, checkpoint_layers=None, cuda_graphs=graphs,
                      offload_activations=True)
    recorder = (layer_graphs.CudaRecorder(0) if CUDA else layer_graphs.EagerRecorder()) if graphs else None
    assert not plan.trainer_checkpointing
    done = checkpointing.apply_to_model(off, plan, recorder=recorder)
    o = host_checkpoints.find(off)
    assert done == {"checkpoint_layers": 3} and o is not None
    assert (layer_graphs.find(off) is not None) == graphs  # the graphs sit inside the offloading function
    steps = layer_graphs.WARMUP_CALLS + 2  # with graphs: eager warm-up calls, a capture, replays
    want, got = _train(ref, steps, ids), _train(off, steps, ids)
    assert got == pytest.approx(want, rel=1e-5)
    _same_weights(ref, off, 1e-3 if CUDA else 1e-5)
    assert o.store.packed == 3 * steps  # every layer's input, every step (warm-up calls and replays alike)
    assert o.store.prefetched == 2 * steps  # all but the last layer's came back ahead of their recompute
    if graphs:
        assert o.inner.captured == 3 and o.inner.failures == {}, o.inner.failure_trace


def test_the_first_layer_trains_although_the_embeddings_are_frozen():
    """The reentrant checkpoint computes a layer's weight gradients only when an input requires grad; the frozen
    embedding's output does not, so the offloading path makes it a leaf that does."""
    ids = torch.randint(0, 300, (1, 8), device=DEVICE)
    pm = _model(layers=2)
    checkpointing.apply_to_model(pm, speed.Plan(gradient_checkpointing=True, offload_activations=True))
    pm(input_ids=ids, labels=ids).loss.backward()
    first = [p.grad for n, p in pm.named_parameters() if "layers.0." in n and "lora_A" in n]
    assert first and all(g is not None and g.abs().sum() > 0 for g in first)


def test_checkpointing_turned_off_and_on_again_still_offloads():
    """TRL's GRPO generation disables the model's checkpointing and enables it again (transformers' own function
    comes back): the layers offload again from their next forward."""
    ids = torch.randint(0, 300, (1, 8), device=DEVICE)
    pm = _model(layers=2)
    checkpointing.apply_to_model(pm, speed.Plan(gradient_checkpointing=True, offload_activations=True))
    store = host_checkpoints.find(pm).store
    base = pm.get_base_model()
    base.gradient_checkpointing_disable()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm(input_ids=ids, labels=ids).loss.backward()
    assert store.packed == 2 and host_checkpoints.find(pm).store is store


def test_no_grad_and_eval_forwards_offload_nothing():
    ids = torch.randint(0, 300, (1, 8), device=DEVICE)
    pm = _model(layers=2)
    checkpointing.apply_to_model(pm, speed.Plan(gradient_checkpointing=True, offload_activations=True))
    with torch.no_grad():
        pm(input_ids=ids)
    pm.eval()
    pm(input_ids=ids)
    assert host_checkpoints.find(pm).store.packed == 0


def test_the_store_returns_what_it_took_and_fetches_the_previous_one_ahead():
    store = host_checkpoints.HostStore()
    xs = [torch.randn(4, 8, device=DEVICE) for _ in range(3)]
    handles = [store.pack(x) for x in xs]
    assert handles[2].prev is handles[1] and handles[0].prev is None
    assert torch.equal(store.unpack(handles[2]), xs[2])
    assert handles[1].device_copy is not None  # started when the one after it was read
    assert torch.equal(store.unpack(handles[1]), xs[1]) and torch.equal(store.unpack(handles[0]), xs[0])
    assert store.prefetched == 2
    assert torch.equal(store.unpack(handles[1]), xs[1])  # a second backward (retain_graph) reads it again
    nxt = store.pack(xs[0])
    assert nxt.prev is None  # a new step does not chain onto the last one


MODEL_8B = {"num_layers": 32, "hidden": 4096, "vocab": 128256, "tie_word_embeddings": False,
            "total_params": 8_030_261_248}
MODEL_135M = {"num_layers": 30, "hidden": 576, "vocab": 49152, "tie_word_embeddings": True,
              "total_params": 134_515_008}


def _recipe(method="sft", **train):
    doc = {"base_model": "llama-3.1-8b", "data": {"path": "d.jsonl", "max_length": 2048},
           "quantization": {"bits": 4}, "train": {"batch_size": 2, **train}}
    if method == "grpo":
        doc.update(method="grpo", grpo={"rewards": [{"fn": "exact_answer"}], "max_prompt_length": 200,
                                        "max_completion_length": 256, "num_generations": 2})
    return validate_data(doc)


def test_auto_offloads_sft_where_the_layers_hide_the_copies_and_grpo_where_it_would_not_fit():
    r, grpo = _recipe(), _recipe("grpo")
    every = {"gradient_checkpointing": True, "checkpoint_layers": None}
    # 32 layers x 4096 tokens x 4096 x 2 bytes: 1 GiB pinned (the estimate's host_checkpoints_bytes)
    est = {"model": MODEL_8B, "peak_bytes_layer_inputs_on_gpu": 30 * GIB, "host_checkpoints_bytes_offloaded": GIB}
    on, why = offload_activations(r, every, est, "cuda", host_bytes=64 * GIB, limit_bytes=32 * GIB)
    assert on and why == "auto: on (the layers' compute hides the copies)"  # SFT: although it fits
    assert offload_activations(r, every, est, "cuda", 64 * GIB, limit_bytes=None)[0]  # the GPU is not known
    assert not offload_activations(grpo, every, est, "cuda", 64 * GIB, limit_bytes=32 * GIB)[0]  # fits as it is
    assert not offload_activations(grpo, every, est, "cuda", 64 * GIB, limit_bytes=None)[0]
    for recipe in (r, grpo):
        on, why = offload_activations(recipe, every, est, "cuda", host_bytes=64 * GIB, limit_bytes=24 * GIB)
        assert on and "30.0 GiB with the layer inputs on the GPU > 24.0 GiB" in why
    small = {**est, "model": MODEL_135M}
    on, why = offload_activations(r, every, small, "cuda", 64 * GIB, 24 * GIB)
    assert not on and "too small" in why
    assert not offload_activations(r, every, est, "cpu", 64 * GIB, 24 * GIB)[0]
    partial = {"gradient_checkpointing": True, "checkpoint_layers": 4}
    assert not offload_activations(r, partial, est, "cuda", 64 * GIB, 24 * GIB)[0]
    # 1 GiB pinned: not with 1 GiB of host memory free
    on, why = offload_activations(r, every, est, "cuda", host_bytes=GIB, limit_bytes=24 * GIB)
    assert not on and "host" in why
    assert not offload_activations(r, every, {}, "cuda", 64 * GIB)[0]  # the model's shape is not known
    assert offload_activations(_recipe(offload_activations=True), every, {}, "cuda")[0]
    assert not offload_activations(_recipe(offload_activations=False), every, est, "cuda", 64 * GIB, 24 * GIB)[0]


def test_asking_for_offloading_where_nothing_is_checkpointed_says_so():
    p = speed.plan(_recipe(offload_activations=True), "cpu")  # checkpointing auto: off on a CPU
    assert not p.offload_activations and not p.gradient_checkpointing
    assert any("offload_activations is off: no layer is checkpointed" in n for n in p.notes)
    on = speed.plan(_recipe(offload_activations=True, gradient_checkpointing=True), "cpu")
    assert on.offload_activations and not any("offload" in n for n in on.notes)


def test_the_estimate_and_train_plan_offloading_for_a_row_that_needs_it():
    from lorakit.estimate.max_context import at_length
    from lorakit.estimate.memory import estimate

    long = at_length(_recipe(), 200_000)
    fits = estimate(long, device="cuda", device_bytes=80 * GIB)
    assert fits["setup"]["offload_activations"] and fits["memory"]["peak_bytes"] <= 80 * GIB
    assert fits["peak_bytes_layer_inputs_on_gpu"] > 80 * GIB > fits["peak_bytes_offloaded"]
    assert estimate(_recipe(), device="cuda", device_bytes=80 * GIB)["setup"]["offload_activations"]  # SFT: fits
    assert not estimate(_recipe("grpo"), device="cuda", device_bytes=80 * GIB)["setup"]["offload_activations"]
    assert speed.plan(long, "cuda", fits, device_bytes=80 * GIB, host_bytes=float("inf")).offload_activations


def test_offloading_without_checkpointing_is_a_recipe_error():
    with pytest.raises(LorakitError) as e:
        _recipe(offload_activations=True, gradient_checkpointing=False)
    assert [p.field for p in e.value.problems] == ["train.offload_activations"]
    assert _recipe(offload_activations=True).train.offload_activations is True


@pytest.mark.gpu
def test_the_gpu_holds_two_checkpoints_not_one_per_layer():
    """After a 12-layer forward the GPU holds the offloaded run's checkpoints in host memory: at least 8 layers'
    inputs less than the same run with checkpoints on the GPU; the backward's peak is lower too."""
    ids = torch.randint(0, 300, (4, 2048), device="cuda")
    held, peaks = {}, {}
    for off in (False, True):
        pm = _model(layers=12, hidden=512)
        checkpointing.apply_to_model(pm, speed.Plan(gradient_checkpointing=True, offload_activations=off))
        if not off:
            checkpointing.set_checkpointing(pm, None)
        pm(input_ids=ids, labels=ids).loss.backward()  # warm-up: pinned buffers, kernels
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # also frees blocks whose copy to the host has finished
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = pm(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        held[off] = torch.cuda.memory_allocated() - before
        loss.backward()
        torch.cuda.synchronize()
        peaks[off] = torch.cuda.max_memory_allocated() - before
        del pm, loss
        torch.cuda.empty_cache()
    layer_input = 4 * 2048 * 512 * 4  # fp32 here
    assert held[False] - held[True] >= 8 * layer_input, (held, peaks)
    assert peaks[True] < peaks[False], (held, peaks)
