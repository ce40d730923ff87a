"""lorakit.train.sft_trainer: the token count kept on the device between logs gives the Trainer's own numbers."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorakit.train.sft_trainer import input_token_count, trainer_class


def _rows(n=24):
    # lengths 5..27: padded batches differ from their non-padding counts
    return Dataset.from_list([{"input_ids": [(i * 7 + k) % 200 + 10 for k in range(5 + (i * 5) % 23)]}
                              for i in range(n)])


def _train(cls, model_dir, out, *, padding_free=False, save_steps=100, logging_steps=2, max_steps=7):
    from trl import SFTConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    args = SFTConfig(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=3, learning_rate=1e-3,
                     logging_steps=logging_steps, save_steps=save_steps, report_to=[], disable_tqdm=True,
                     use_cpu=True, seed=0, include_num_input_tokens_seen="non_padding", max_length=None,
                     padding_free=padding_free, dataset_kwargs={"skip_prepare_dataset": False})
    trainer = cls(model=model, args=args, train_dataset=_rows(), processing_class=tok)
    trainer.train()
    return trainer


@pytest.mark.parametrize("padding_free", [False, True])
def test_token_counts_equal_the_trainers_own(tiny_model_dir, tmp_path, padding_free):
    from trl import SFTTrainer

    ours = _train(trainer_class(), tiny_model_dir, tmp_path / "ours", padding_free=padding_free, save_steps=3)
    theirs = _train(SFTTrainer, tiny_model_dir, tmp_path / "theirs", padding_free=padding_free, save_steps=3)
    assert ours.state.num_input_tokens_seen == theirs.state.num_input_tokens_seen > 0
    seen = [(h["step"], h["num_input_tokens_seen"]) for h in ours.state.log_history if "num_input_tokens_seen" in h]
    assert seen == [(h["step"], h["num_input_tokens_seen"])
                    for h in theirs.state.log_history if "num_input_tokens_seen" in h]
    assert len(seen) >= 4  # every log event carried the count
    # a checkpoint between two logs (step 3) holds the count up to its step, as the Trainer's does
    for step in (3, 6):
        state = [json.loads((t / f"checkpoint-{step}" / "trainer_state.json").read_text())["num_input_tokens_seen"]
                 for t in (tmp_path / "ours", tmp_path / "theirs")]
        assert state[0] == state[1] > 0


def test_input_token_count_rules():
    ids = torch.tensor([[5, 6, 0, 0], [7, 0, 0, 0]])
    mask = (ids != 0).long()
    pad = type("Tok", (), {"pad_token_id": 0})()
    assert int(input_token_count({"input_ids": ids, "attention_mask": mask}, "input_ids", True)) == 3
    assert int(input_token_count({"input_ids": ids}, "input_ids", True, pad)) == 3
    assert input_token_count({"input_ids": ids}, "input_ids", True) == 8  # no mask, no pad token: all
    assert input_token_count({"input_ids": ids, "attention_mask": mask}, "input_ids", False) == 8
