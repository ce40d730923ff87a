"""The recipe mapped onto TRL's configs: the device, the run's precision and optimizer, and the TrainingArguments
fields SFT and GRPO share (`training_args`), with the SFT-only ones added by `sft_config`."""

from __future__ import annotations

from lorakit import speed
from lorakit.errors import LorakitError
from lorakit.recipe.rules import fsdp_optimizer_problem, resolved_optimizer
from lorakit.runtime import device as machine
from lorakit.runtime.distributed import strategy
from lorakit.speed.checkpointing import checkpointing_arg_names
from lorakit.speed.planning import sft_config_kwargs
from lorakit.train.run_dir import RunDir


def run_options(recipe, device: str) -> dict:
    """The run's precision and optimizer, `auto` resolved for `device` (the speed levers are the Plan's).

    Args:
        recipe: the validated Recipe.
        device: "cuda" or "cpu".

    Returns:
        {"precision": "bf16" | "fp16" | "fp32", "optimizer": a TrainingArguments `optim` name}.
    """
    t = recipe.train
    precision = machine.auto_dtype_name(device) if t.precision == "auto" else t.precision
    if precision == "fp16" and device != "cuda":
        raise LorakitError("train.precision: fp16 mixed precision needs a CUDA GPU (this machine has none)",
                           field="train.precision", hint="use fp32 (or auto) on CPU")
    # a launcher may ask for FSDP (on CPU accelerate runs it as DDP)
    engine = "fsdp" if device == "cuda" and strategy() == "fsdp" else recipe.distributed.strategy
    optimizer = resolved_optimizer(recipe, device, engine)
    if engine == "fsdp" and fsdp_optimizer_problem(optimizer):
        raise LorakitError(f"train.optimizer: {fsdp_optimizer_problem(optimizer)}", field="train.optimizer")
    return {"precision": precision, "optimizer": optimizer}


def training_args(recipe, run: RunDir, device: str, plan: speed.Plan, options: dict, *, has_eval: bool) -> dict:
    """TrainingArguments fields shared by SFT and GRPO.

    Args:
        recipe: the validated Recipe.
        run: the run directory (checkpoints go under it).
        device: "cuda" or "cpu".
        plan: the run's speed plan.
        options: `run_options(recipe, device)`.
        has_eval: whether there are evaluation rows.

    Returns:
        Keyword arguments for TRL's SFTConfig / GRPOConfig.
    """
    t = recipe.train
    eval_on = has_eval and t.eval_steps is not None
    # every layer: the Trainer's checkpointing; the first K layers are set on the model (speed.checkpointing)
    gc = plan.trainer_checkpointing
    gc_flag, gc_kwargs = checkpointing_arg_names()  # activation_* (transformers >= 5.2x) or gradient_*
    return dict(
        output_dir=str(run.checkpoints_dir),
        max_steps=t.max_steps if t.max_steps else -1,
        num_train_epochs=t.epochs,
        learning_rate=t.lr,
        lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        **{gc_flag: gc, gc_kwargs: {"use_reentrant": False} if gc else None},
        optim=options["optimizer"],
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=options["precision"] == "bf16",
        fp16=options["precision"] == "fp16",
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if eval_on else "no",
        eval_steps=t.eval_steps if eval_on else None,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        report_to=t.report_to,
        disable_tqdm=True,
        use_liger_kernel=plan.liger,
        torch_compile=t.torch_compile,
        include_num_input_tokens_seen="non_padding",
        # a NaN loss is logged as NaN (NonFiniteGuard stops on it) instead of the Trainer reading the loss
        # back after each backward pass to hide it (lorakit.train.sft_trainer: the step's host syncs)
        logging_nan_inf_filter=False,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        # a peft model is not a PreTrainedModel, so the Trainer would default to True: an extra autograd
        # pass per step under DDP; every trainable (LoRA) parameter gets a gradient
        ddp_find_unused_parameters=False,
    )


def sft_config(recipe, common: dict, train_columns: list[str], plan: speed.Plan):
    """TRL SFTConfig: the shared options (`training_args`) plus data handling (packing, masks, length)."""
    from trl import SFTConfig  # trl is slow to import: only when a run builds its trainer

    d = recipe.data
    # Our rows are tokenized already (input_ids + completion_mask): TRL only builds labels from the mask,
    # truncates and packs. Rows that carry their own labels skip TRL's preparation entirely.
    skip = "labels" in train_columns and not d.packing
    # padding-free: rows come truncated by lorakit.data, so TRL gets max_length=None
    kw = {"max_length": d.max_length, **sft_config_kwargs(plan)}
    return SFTConfig(
        **common,
        **kw,
        packing=d.packing,
        completion_only_loss=d.completion_only,
        dataset_kwargs={"skip_prepare_dataset": True} if skip else None,
    )
