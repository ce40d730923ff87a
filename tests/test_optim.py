"""lorakit.speed.adamw8bit: bitsandbytes' 8-bit AdamW without its per-tensor GPU synchronizations, and with the tensors
whose sizes are whole 8-bit blocks updated by one call, takes the same steps as bitsandbytes' own, bit for bit
(on the CPU, where bitsandbytes implements the same 8-bit update, and on a GPU); its state_dict is bitsandbytes'
per-tensor format, so a checkpoint of either loads into the other."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _params(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((64, 300), (300, 16), (7,))]


@pytest.mark.parametrize("cls", ["AdamW8bit", "PagedAdamW8bit"])
def test_no_sync_steps_equal_bitsandbytes_steps(cls):
    from lorakit.speed.adamw8bit import no_sync_class

    base = getattr(bnb.optim, cls)
    a, b = _params(0), _params(0)
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, min_8bit_size=0)
    opt_a = base([{"params": a[:2]}, {"params": a[2:], "weight_decay": 0.0}], **kw)
    opt_b = no_sync_class(base)([{"params": b[:2]}, {"params": b[2:], "weight_decay": 0.0}], **kw)
    assert isinstance(opt_b, base) and type(opt_b).__name__ == f"{cls}NoSync"
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=g) for p in a]
        for p, q, gr in zip(a, b, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        if step == 2:
            a[1].grad = b[1].grad = None  # a tensor without a gradient this step is skipped by both
        opt_a.step()
        opt_b.step()
        for p, q in zip(a, b):
            assert torch.equal(p, q)
    assert not torch.equal(a[0], _params(0)[0])  # they moved
    assert torch.equal(opt_a.state[a[0]]["state1"], opt_b.state[b[0]]["state1"])  # 8-bit states alike


def test_only_cuda_8bit_adamw_without_trained_embeddings_gets_it():
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from lorakit.speed.adamw8bit import optimizer_cls_and_kwargs

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    def args(optim: str = "paged_adamw_8bit", use_cpu: bool = False):
        return TrainingArguments(output_dir="/tmp/lk-optim", optim=optim, learning_rate=3e-4, report_to="none",
                                 use_cpu=use_cpu)

    cls, kw = optimizer_cls_and_kwargs(args(), model)
    assert cls.__name__.endswith("NoSync") and issubclass(cls, bnb.optim.optimizer.Optimizer8bit)
    assert kw["lr"] == 3e-4 and kw.get("is_paged") is True and kw.get("optim_bits") == 8
    assert optimizer_cls_and_kwargs(args(use_cpu=True), model) is None
    assert optimizer_cls_and_kwargs(args("adamw_torch"), model) is None
    model.model.embed_tokens.weight.requires_grad_(True)  # trained embeddings: transformers' 32-bit override
    assert optimizer_cls_and_kwargs(args(), model) is None


def _lora_like(seed: int):
    """LoRA-shaped tensors: whole 256-element blocks (updated together), one that is not, one under
    min_8bit_size (32-bit states), in one group."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((16, 256), (512, 16), (16, 1024), (1024, 16), (16, 300), (8, 16))
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(DEVICE, torch.bfloat16)) for s in shapes]


def _grads(params, g):
    return [torch.randn(p.shape, generator=g).to(DEVICE, p.dtype) for p in params]


@pytest.mark.parametrize("cls", ["AdamW8bit", "PagedAdamW8bit"])
def test_one_update_for_whole_blocks_equals_bitsandbytes_per_tensor(cls):
    from lorakit.speed import adamw8bit as optim

    base = getattr(bnb.optim, cls)
    a, b = _lora_like(0), _lora_like(0)
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    opt_a, opt_b = base(a, **kw), optim.no_sync_class(base)(b, **kw)
    calls = []
    real = bnb.functional.optimizer_update_8bit_blockwise

    def counting(*args, **kwargs):
        calls.append(args[1].numel())
        return real(*args, **kwargs)

    g = torch.Generator().manual_seed(1)
    for step in range(5):
        grads = _grads(a, g)
        for p, q, gr in zip(a, b, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        if step == 2:
            a[1].grad = b[1].grad = None  # skipped this step by both; updated alone until its count catches up
        opt_a.step()
        bnb.functional.optimizer_update_8bit_blockwise = counting
        try:
            opt_b.step()
        finally:
            bnb.functional.optimizer_update_8bit_blockwise = real
        for p, q in zip(a, b):
            assert torch.equal(p, q)
        if step == 0:  # the four whole-block tensors in one call, the (16, 300) one alone; (8, 16) is 32-bit
            assert sorted(calls) == [16 * 300, 4096 + 8192 + 16384 + 16384]
        calls.clear()
    for p, q in zip(a, b):
        for key in ("state1", "state2", "absmax1", "absmax2", "step"):
            if key in opt_a.state[p]:
                assert torch.equal(torch.as_tensor(opt_a.state[p][key]), torch.as_tensor(opt_b.state[q][key])), key
    assert not torch.equal(a[0], _lora_like(0)[0])  # they moved


def test_a_checkpoint_moves_between_the_shared_and_the_per_tensor_states(tmp_path):
    from lorakit.speed import adamw8bit as optim

    base = bnb.optim.AdamW8bit
    kw = dict(lr=1e-2, weight_decay=0.01)
    a, b = _lora_like(0), _lora_like(0)
    opt_a, opt_b = optim.no_sync_class(base)(a, **kw), optim.no_sync_class(base)(b, **kw)
    g = torch.Generator().manual_seed(2)
    for _ in range(2):
        for p, q, gr in zip(a, b, _grads(a, g)):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt_a.step()
        opt_b.step()
    torch.save(opt_a.state_dict(), tmp_path / "opt.pt")
    for q, gr in zip(b, _grads(b, g)):  # b's optimizer moves on: its shared buffers now hold other states
        q.grad = gr
    opt_b.step()
    with torch.no_grad():
        for p, q in zip(a, b):
            q.copy_(p)
    plain = base(a, **kw)  # bitsandbytes' own class reads lorakit's checkpoint ...
    plain.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=False))
    resumed = opt_b  # ... and lorakit's, mid-run, reads it back into shared buffers
    resumed.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=False))
    for _ in range(2):
        for p, q, gr in zip(a, b, _grads(a, g)):
            p.grad, q.grad = gr.clone(), gr.clone()
        plain.step()
        resumed.step()
        for p, q in zip(a, b):
            assert torch.equal(p, q)
