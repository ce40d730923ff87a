"""TRL's SFTTrainer whose step does not wait for the GPU between the backward pass and the optimizer (and whose
training batches may have a collator of their own: `train_collator`, lorakit.speed.padding).

Why: the Trainer reads two numbers back from the GPU right after each backward pass - the loss, to filter a
NaN out of the logged average (`logging_nan_inf_filter`, which lorakit.train.args turns off: a NaN loss is logged as NaN
and NonFiniteGuard stops the run), and the step's token count (`include_num_input_tokens_seen`). Each read
waits for the whole backward pass; the host then runs the gradient-norm clip and the optimizer's per-tensor
updates (one per LoRA tensor) while the GPU idles. Without the reads the host queues that work while the GPU is
still in the backward pass.

Same numbers: the token count is computed as the Trainer computes it, kept on the device and added to
`state.num_input_tokens_seen` when the Trainer logs or saves a checkpoint (where it reads the GPU anyway), so
tokens/s, the logs and a resumed run see the same counts. One process only: a distributed run keeps the
Trainer's own count (it gathers the counts across ranks).
"""

from __future__ import annotations

from typing import Any


def trainer_class() -> type:
    """SFTTrainer with the token count kept on the device between logs (imports TRL: call it when training)."""
    from trl import SFTTrainer  # trl is slow to import: only when a run builds its trainer

    class LorakitSFTTrainer(SFTTrainer):
        _pending_tokens: Any = None
        train_collator: Any = None  # a collator for the training batches only (lorakit.speed.padding)

        def get_train_dataloader(self):
            if self.train_collator is None:
                return super().get_train_dataloader()
            other, self.data_collator = self.data_collator, self.train_collator
            try:  # the DataLoader keeps the collator it was made with; evaluation keeps the plain one
                return super().get_train_dataloader()
            finally:
                self.data_collator = other

        def _track_num_input_tokens(self, inputs):
            mode = self.args.include_num_input_tokens_seen
            name = getattr(self.model, "main_input_name", "input_ids")
            if mode in ("no", False) or self.accelerator.num_processes > 1 or name not in inputs:
                return super()._track_num_input_tokens(inputs)
            count = input_token_count(inputs, name, mode == "non_padding", self.processing_class)
            self._pending_tokens = count if self._pending_tokens is None else self._pending_tokens + count

        def fold_token_count(self) -> None:
            """Add the counts kept on the device to the Trainer's state (one read from the GPU)."""
            if self._pending_tokens is not None:
                self.state.num_input_tokens_seen += int(self._pending_tokens)
                self._pending_tokens = None

        def log(self, logs, *args, **kwargs):
            self.fold_token_count()
            return super().log(logs, *args, **kwargs)

        def _save_checkpoint(self, *args, **kwargs):
            self.fold_token_count()
            return super()._save_checkpoint(*args, **kwargs)

    return LorakitSFTTrainer


def input_token_count(inputs: dict, name: str, non_padding: bool, processing_class: Any = None):
    """The batch's token count as transformers' Trainer counts it (`_track_num_input_tokens`): the attention
    mask's sum, else the tokens that are not the pad token, else all; a tensor on the batch's device."""
    ids = inputs[name]
    if not non_padding:
        return ids.numel()
    if "attention_mask" in inputs:
        return inputs["attention_mask"].sum()
    pad = getattr(processing_class, "pad_token_id", None)
    return (ids != pad).sum() if pad is not None else ids.numel()
