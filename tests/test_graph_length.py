"""lorakit.speed.graph_length: padding-free batches padded to one length so that CUDA graphs replay their layers.
The padding keeps the math (same loss and gradients as the unpadded batch, pad tokens not counted), every padded
batch has the same tensor shapes (one graph signature), and `auto` turns it on only for host-bound models."""

import pytest
import torch
from test_speed import EST_GRAPHS, recipe

from lorakit import speed
from lorakit.speed import checkpointing, layer_graphs
from lorakit.speed import padding as gl
from lorakit.speed import varlen_attention as va

GIB = 1024**3


def _rows(lengths):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 300, (n,), generator=g).tolist()} for n in lengths]


def _flat(lengths):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(_rows(lengths))


def test_graph_length_is_the_quantile_of_batch_totals_rounded_up():
    assert gl.graph_length([100] * 64, 8) == 832  # every batch 800 tokens -> the next multiple of 64
    import random

    rng = random.Random(1)
    lengths = [max(32, min(2048, int(rng.lognormvariate(6.1, 0.6)))) for _ in range(400)]
    n = gl.graph_length(lengths, 8, seed=3)
    assert n % gl.MULTIPLE == 0
    totals = []
    for s in range(20):  # other shuffles: about QUANTILE of their batches fit
        order = list(lengths)
        random.Random(100 + s).shuffle(order)
        totals += [sum(order[i:i + 8]) for i in range(0, 400, 8)]
    fit = sum(t <= n for t in totals) / len(totals)
    assert 0.9 <= fit < 1.0 and n < max(totals)
    with pytest.raises(ValueError):
        gl.graph_length([], 8)


def test_padded_batches_all_have_one_shape_and_their_boundaries_follow_the_positions():
    length, max_row = 128, 40
    batches = [gl.pad_batch(_flat(ls), length, max_row, 0) for ls in ((5, 11, 8), (30, 2, 40), (40, 40, 20))]
    shapes = {tuple((k, tuple(v.shape) if torch.is_tensor(v) else v) for k, v in b.items()) for b in batches}
    assert len(shapes) == 1  # same keys, shapes and constants: one graph signature
    for b, ls in zip(batches, ((5, 11, 8), (30, 2, 40), (40, 40, 20))):
        T = sum(ls)
        assert b["input_ids"].shape == (1, length) and (b["input_ids"][0, T:] == 0).all()
        assert (b["labels"][0, T:] == -100).all()
        starts = (b["position_ids"][0] == 0).nonzero().flatten().tolist()
        cu = b["cu_seq_lens_q"].tolist()
        assert cu[:-1] == starts and cu[-1] == length and b["cu_seq_lens_k"] is b["cu_seq_lens_q"]
        sizes = torch.tensor(cu).diff().tolist()
        assert sizes[:len(ls)] == list(ls) and all(1 <= s <= max_row for s in sizes[len(ls):])
        assert b["max_length_q"] == max_row and len(cu) == len(ls) + 1 + gl.pad_rows(length, max_row)
        assert torch.equal(b["seq_idx"][0], torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32),
                                                                    torch.tensor(sizes)))
        assert b["cu_seq_lens_q"].dtype == torch.int32
    long = _flat((60, 66))  # over the length minus a token for each pad row: left as it is, runs eager
    assert gl.pad_batch(long, length, max_row, 0) is long
    assert gl.pad_batch(_flat((60, 64)), length, max_row, 0)["input_ids"].shape[1] == length


def test_padding_keeps_the_loss_the_gradients_and_the_token_count():
    """Through varlen attention (row by row on a CPU) a padded batch gives the unpadded batch's loss and
    gradients: the pad rows attend only to themselves and no label reads them; the Trainer's token count
    (tokens that are not the pad token) leaves them out."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.train.sft_trainer import input_token_count

    va.register()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                         pad_token_id=0, attn_implementation=va.NAME))
    flat = _flat((5, 11, 8))
    padded = gl.pad_batch(flat, 64, 24, 0)
    assert padded["input_ids"].shape[1] == 64
    results = []
    for b in (flat, padded):
        b = {k: v for k, v in b.items() if k != "seq_idx"}  # for linear-attention layers; Llama does not take it
        model.zero_grad()
        loss = model(**b, use_cache=False).loss
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6, msg=n)

    class Tok:
        pad_token_id = 0

    assert int(input_token_count(padded, "input_ids", True, Tok())) == int(input_token_count(flat, "input_ids",
                                                                                           True, Tok())) == 24


def test_collator_pads_training_batches_and_counts_them():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    c = gl.GraphLengthCollator(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True), 64, 24, 0)
    assert c(_rows((5, 11, 8)))["input_ids"].shape[1] == 64
    assert c(_rows((30, 30, 10)))["input_ids"].shape[1] == 70
    assert (c.padded, c.longer, c.pad_tokens) == (1, 1, 40)


def test_padded_batches_replay_one_graph_signature_per_layer():
    """Batches of different real lengths, padded: after the warm-up calls every layer replays the one
    signature it captured (EagerRecorder stands in for the GPU's capture on a CPU)."""
    from helpers import tiny_lora
    from transformers import LlamaConfig, LlamaForCausalLM

    va.register()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=300, pad_token_id=0, attn_implementation=va.NAME)
    pm = tiny_lora(LlamaForCausalLM(cfg), 0.0)
    pm.train()
    checkpointing.apply_to_model(pm, speed.Plan(**{"gradient_checkpointing": True, "checkpoint_layers": None, "cuda_graphs": True}),
                         recorder=layer_graphs.EagerRecorder())
    g = layer_graphs.find(pm)
    for ls in ((5, 11, 8), (9, 9, 9), (20, 3, 1), (7, 7, 16), (12, 2, 2)):
        b = {k: v for k, v in gl.pad_batch(_flat(ls), 64, 24, 0).items() if k != "seq_idx"}
        pm(**b, use_cache=False).loss.backward()
    assert g.captured == 2 and g.failures == {} and g.skipped == {}, (g.skipped, g.failure_trace)


def test_auto_pads_for_graphs_only_up_to_the_measured_model_size(bf16_gpu):
    """auto: padding-free batches replay graphs on models of at most PADDED_GRAPHS_MAX_PARAMS parameters (the
    estimate's count: measured to pay on the 1B and 8B shapes), without a budget or where the graphs' estimated
    peak fits it; never on larger ones."""
    small = {**EST_GRAPHS, "model": {"num_layers": 32, "total_params": 8_030_261_248}}
    large = {**EST_GRAPHS, "model": {"num_layers": 80, "total_params": 70_553_706_496}}
    p = speed.plan(recipe(), "cuda", small)
    assert p.padding_free is True and p.cuda_graphs is True and p.offload_embeddings is False
    assert "padded to one length" in p.checkpointing_reason
    assert speed.plan(recipe(), "cuda", large).cuda_graphs is False
    assert speed.plan(recipe(), "cuda", {k: v for k, v in small.items() if k != "model"}).cuda_graphs is False
    assert speed.plan(recipe(train={"memory_budget_gb": 12}), "cuda", small).cuda_graphs is True  # fits 11 GiB
    assert speed.plan(recipe(train={"memory_budget_gb": 10.5}), "cuda", small).cuda_graphs is False
    assert speed.plan(recipe(train={"cuda_graphs": False}), "cuda", small).cuda_graphs is False
    assert speed.plan(recipe(), "cpu", small).cuda_graphs is False


def test_a_run_settles_the_graph_length_from_its_rows(bf16_gpu, tmp_path):
    import yaml

    from lorakit.recipe.loader import load_recipe
    from lorakit.train.run import _settled

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"base_model": "meta-llama/Llama-3.2-1B", "data": {"path": "d.jsonl"},
                                 "train": {"batch_size": 4}}))
    r = load_recipe(p)
    est = {**EST_GRAPHS, "model": {"num_layers": 16, "total_params": 1_235_814_400}}
    lengths = [100, 300, 50, 700, 20, 90, 400, 210] * 4
    plan = speed.plan(r, "cuda", est, lengths=lengths)
    assert plan.cuda_graphs is True and plan.graph_length == gl.graph_length(lengths, 4, r.train.seed)
    assert plan.graph_max_row == max(r.data.max_length, 700)  # the pad rows' longest
    assert _settled(r, plan) == r and any("padded to" in n for n in plan.notes)
    assert speed.plan(r, "cuda", est).graph_length is None  # lengths not known (the estimate): no length yet
    # rows not tokenized before training: no length to pad to, so no graphs, and the resolved recipe says so
    unknown = speed.plan(r, "cuda", est, lengths=[])
    assert unknown.cuda_graphs is False and unknown.graph_length is None and unknown.trainer_checkpointing
    assert _settled(r, unknown).train.cuda_graphs is False


def test_trainer_pads_its_training_batches_only_and_counts_and_learns_as_without(tiny_model_dir, tmp_path):
    """lorakit's SFTTrainer with `train_collator` (what train.py sets for padded graphs): the training batches
    come padded to the length, evaluation's do not; the token count and the losses are those of the same run
    without the padding."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from lorakit.train.sft_trainer import trainer_class

    va.register()
    rows = Dataset.from_list([{"input_ids": [(i * 7 + k) % 200 + 10 for k in range(5 + (i * 5) % 23)]}
                              for i in range(24)])
    runs = []
    for pad in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model.set_attn_implementation(va.NAME)
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        args = SFTConfig(output_dir=str(tmp_path / str(pad)), max_steps=5, per_device_train_batch_size=3,
                         per_device_eval_batch_size=3, learning_rate=1e-3, logging_steps=1, report_to=[],
                         disable_tqdm=True, use_cpu=True, seed=0, include_num_input_tokens_seen="non_padding",
                         max_length=None, padding_free=True, dataset_kwargs={"skip_prepare_dataset": False})
        trainer = trainer_class()(model=model, args=args, train_dataset=rows, eval_dataset=rows,
                                  processing_class=tok)
        if pad:
            trainer.train_collator = gl.GraphLengthCollator(trainer.data_collator, 96, 27,
                                                            trainer.data_collator.pad_token_id)
            assert {b["input_ids"].shape[1] for b in trainer.get_train_dataloader()} == {96}
            assert 96 not in {b["input_ids"].shape[1] for b in trainer.get_eval_dataloader()}
            trainer.train_collator.padded = 0
        trainer.train()
        runs.append(trainer)
    plain, padded = runs
    assert padded.train_collator.padded >= 5  # training's batches went through it
    assert padded.state.num_input_tokens_seen == plain.state.num_input_tokens_seen > 0
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in runs]
    assert len(losses[0]) == 5 and losses[1] == pytest.approx(losses[0], rel=1e-4)
