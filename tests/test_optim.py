"""lorakit.optim: bitsandbytes' 8-bit AdamW without its per-tensor GPU synchronizations takes the same steps
as bitsandbytes' own (run here on the CPU, where bitsandbytes implements the same 8-bit update)."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")


def _params(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((64, 300), (300, 16), (7,))]


@pytest.mark.parametrize("cls", ["AdamW8bit", "PagedAdamW8bit"])
def test_no_sync_steps_equal_bitsandbytes_steps(cls):
    from lorakit.optim import no_sync_class

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

    from lorakit.optim import optimizer_cls_and_kwargs

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
