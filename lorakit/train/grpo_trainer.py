"""TRL's GRPOTrainer whose generation samples through lorakit.speed.decode_graphs (grpo.generation_graphs).

Why: generation is most of a GRPO step, and TRL's transformers path decodes eagerly, one Python-launched kernel
at a time (lorakit.speed.decode_graphs says why a static cache alone does not help a 4-bit model).

What changes: only `_generate_single_turn`'s plain transformers path - the left-padded prompts, the completions
cut after their first end-of-sequence token and no log-probs are what TRL's own code returns. The policy samples
in eval mode (no LoRA dropout), as TRL's vLLM path does: the loss's importance ratio reads log-probs TRL computes
itself (a scoring pass, or the training forward detached), so the sampler only has to draw from the policy, and
without dropout it draws from the policy itself rather than from one dropout mask of it (a captured dropout
would also replay one mask). vLLM, transformers' continuous batching, FSDP, images and settings the sampler does
not implement (`decode_graphs.unsupported`) keep TRL's path.
"""

from __future__ import annotations

import logging

import torch

from lorakit.speed import decode_graphs
from lorakit.train.evaluate import until_eos

log = logging.getLogger(__name__)


def trainer_class(generation_graphs: bool) -> type:
    """GRPOTrainer, with its generation through lorakit's sampler when `generation_graphs` (imports TRL: call it
    when training)."""
    from trl import GRPOTrainer  # trl is slow to import: only when a GRPO run builds its trainer
    from trl.models import unwrap_model_for_generation
    from trl.trainer.utils import pad

    class LorakitGRPOTrainer(GRPOTrainer):
        lorakit_generation_graphs = generation_graphs
        _fallback_said = False

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):
            config = self._sampling_config()
            why = self._why_not_graphs(images, multimodal_fields, config)
            if why is not None:
                if why and not self._fallback_said:
                    log.warning("generation through transformers' generate: %s", why)
                    self._fallback_said = True
                return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                     has_tool_images)
            device = self.accelerator.device
            tensors = [torch.tensor(ids) for ids in prompt_ids]
            ids = pad(tensors, padding_value=self._tokenizer.pad_token_id, padding_side="left",
                      pad_to_multiple_of=self.pad_to_multiple_of).to(device)
            mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="left",
                       pad_to_multiple_of=self.pad_to_multiple_of).to(device)
            with (
                unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                            gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                            generation_kwargs=self.generation_kwargs,
                                            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
                as model,
                torch.no_grad(),
            ):
                was_training = model.training
                model.eval()
                try:
                    new = decode_graphs.generate(
                        model, ids, mask, max_new_tokens=self.max_completion_length, eos_token_ids=self.eos_token_ids,
                        pad_token_id=self._tokenizer.pad_token_id, config=config)
                finally:
                    model.train(was_training)
            eos = set(self.eos_token_ids)
            return [until_eos(row, eos) for row in new.tolist()], None  # one read back from the GPU

        def _sampling_config(self):
            """The GenerationConfig TRL's generate would sample with (TRL's settings over the model's own)."""
            model = self.accelerator.unwrap_model(self.model_wrapped)
            return decode_graphs.merged_config(getattr(model, "generation_config", None), self.generation_config)

        def _why_not_graphs(self, images, multimodal_fields, config) -> str | None:
            """None where lorakit's sampler generates; else why not ("" when it was not asked for)."""
            if not self.lorakit_generation_graphs:
                return ""
            if self.use_vllm or getattr(self, "use_transformers_continuous_batching", False):
                return ""
            if getattr(self, "is_fsdp_enabled", False):
                return "FSDP (sharded weights are gathered per generate call)"
            if images is not None and any(i is not None for i in images) or multimodal_fields:
                return "prompts with images"
            if self.args.cast_lm_head_to_fp32:
                return "cast_lm_head_to_fp32"
            return decode_graphs.unsupported(config)

    return LorakitGRPOTrainer
