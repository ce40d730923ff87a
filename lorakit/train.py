"""`lorakit train`: a recipe in, a run directory out. SFT through TRL's SFTTrainer, GRPO through grpo.py.

The flow: check the run directory may be written -> load the tokenizer and prepare the data (data.py;
settles padding-free) -> load the base + LoRA (models.py) -> only now replace an old run (--overwrite) and
mark the run `running` -> eval loss and task metrics before -> train (TRL, with the progress / signal / NaN /
checkpoint callbacks) -> eval after -> save the adapter atomically -> metrics, summary, loss plot -> optional
merge -> `finished`.

`training_args(recipe, run, device)` builds the options SFT and GRPO share (one mapping of the recipe
onto transformers' TrainingArguments fields); `sft_config` adds the SFT-only ones.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from lorakit.errors import EXIT_RUNTIME, Interrupted, LorakitError
from lorakit.run_dir import FAILED, FINISHED, INTERRUPTED, RunDir

log = logging.getLogger("lorakit")

BEFORE_FILE = "before.json"  # eval results of the untrained adapter, kept for a resumed run


# ----------------------------------------------------------------------------------------------
# Devices and resolved options
# ----------------------------------------------------------------------------------------------


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_threads() -> int:
    """Threads for CPU math: OMP_NUM_THREADS if set, else the cores not already busy (at least 1).

    On a CPU that other processes keep busy, OpenMP threads that wait for each other at every small
    op make a step several times slower (measured: 2 threads 36 s vs 1 thread 9 s per step of the demo
    model on a 2-core machine at load 5); using only the idle cores avoids that.
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def resolved_options(recipe, device: str) -> dict:
    """The `auto` choices of the train section (and the speed levers of lorakit.speed.plan), resolved for
    `device`."""
    t = recipe.train
    from lorakit.models import auto_dtype_name

    precision = auto_dtype_name(device) if t.precision == "auto" else t.precision
    if precision == "fp16" and device != "cuda":
        raise LorakitError("train.precision: fp16 mixed precision needs a CUDA GPU (this machine has none)",
                           field="train.precision", hint="use fp32 (or auto) on CPU")
    from lorakit.distributed import strategy
    from lorakit.recipe import fsdp_optimizer_problem, resolved_optimizer

    # a launcher may ask for FSDP (on CPU accelerate runs it as DDP)
    engine = "fsdp" if device == "cuda" and strategy() == "fsdp" else recipe.distributed.strategy
    optimizer = resolved_optimizer(recipe, device, engine)
    if engine == "fsdp" and fsdp_optimizer_problem(optimizer):
        raise LorakitError(f"train.optimizer: {fsdp_optimizer_problem(optimizer)}", field="train.optimizer")
    from lorakit.speed import plan_for_run

    # speed levers (liger, fused_lora, padding_free, gradient checkpointing, frozen dtype): lorakit.speed
    return {"precision": precision, "optimizer": optimizer, **plan_for_run(recipe, device)}


def training_args(recipe, run: RunDir, device: str, *, has_eval: bool) -> dict:
    """TrainingArguments fields shared by SFT and GRPO, from the recipe."""
    t = recipe.train
    opts = resolved_options(recipe, device)
    eval_on = has_eval and t.eval_steps is not None
    from lorakit.speed import checkpointing_arg_names, trainer_checkpointing

    # every layer: the Trainer's checkpointing; the first K layers are set on the model (models.py)
    gc = trainer_checkpointing(opts)
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
        optim=opts["optimizer"],
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        bf16=opts["precision"] == "bf16",
        fp16=opts["precision"] == "fp16",
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
        use_liger_kernel=opts["liger"],
        torch_compile=t.torch_compile,
        include_num_input_tokens_seen="non_padding",
        # a NaN loss is logged as NaN (NonFiniteGuard stops on it) instead of the Trainer reading the loss
        # back after each backward pass to hide it (lorakit.sft_trainer: the step's host syncs)
        logging_nan_inf_filter=False,
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        # a peft model is not a PreTrainedModel, so the Trainer would default to True: an extra autograd
        # pass per step under DDP; every trainable (LoRA) parameter gets a gradient
        ddp_find_unused_parameters=False,
    )


def sft_config(recipe, common: dict, train_columns: list[str]):
    """TRL SFTConfig: the shared options plus data handling (packing, masks, length)."""
    from trl import SFTConfig

    d = recipe.data
    # Our rows are tokenized already (input_ids + completion_mask): TRL only builds labels from the mask,
    # truncates and packs. Rows that carry their own labels skip TRL's preparation entirely.
    skip = "labels" in train_columns and not d.packing
    from lorakit.speed import sft_config_kwargs

    # padding_free (lorakit.speed.plan): rows come truncated by data.prepare_sft, so TRL gets max_length=None
    device = "cpu" if common.get("use_cpu") else "cuda"
    kw = {"max_length": d.max_length, **sft_config_kwargs(resolved_options(recipe, device))}
    return SFTConfig(
        **common,
        **kw,
        packing=d.packing,
        completion_only_loss=d.completion_only,
        dataset_kwargs={"skip_prepare_dataset": True} if skip else None,
    )


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


class _Out:
    """Where human-readable lines go: the given rich console, or stderr in JSON mode."""

    def __init__(self, console, json_mode: bool):
        if json_mode or console is None:
            from rich.console import Console

            from lorakit.progress import plain_output

            plain = plain_output(None)
            console = Console(stderr=True, no_color=plain, highlight=False) if json_mode or console is None else console
        self.console = console

    def print(self, text: str) -> None:
        from lorakit.distributed import is_main_process

        if is_main_process():  # in a multi-process run only rank 0 talks
            self.console.print(text, highlight=False, markup=False)


def _run_dir_for(recipe, resume) -> RunDir:
    from lorakit.recipe import output_dir

    if isinstance(resume, str) and resume not in ("latest", "true", "True", ""):
        return RunDir(resume)
    return RunDir(output_dir(recipe))


def _quiet_libraries() -> None:
    from lorakit.quiet import quiet_libraries

    quiet_libraries()


def _prepare_data(recipe, tokenizer):
    from lorakit import data

    if recipe.method == "grpo":
        return data.prepare_grpo(recipe, tokenizer)
    return data.prepare_sft(recipe, tokenizer)


def _check_rewards(recipe) -> None:
    """GRPO: the reward functions resolve (file, import, arguments) before weights load or the run starts."""
    if recipe.method == "grpo":
        from lorakit.grpo import check_rewards

        check_rewards(recipe)


def _columns(ds) -> list[str]:
    return list(getattr(ds, "column_names", None) or [])


def _build_trainer(recipe, model, tokenizer, prepared, common: dict, callbacks: list):
    if recipe.method == "grpo":
        from lorakit.grpo import build_grpo_trainer
        from lorakit.recipe import located

        with located(recipe):  # reward loading / GRPO settings errors point at their recipe lines
            return build_grpo_trainer(recipe, model, tokenizer, prepared, common, callbacks)
    from lorakit.optim import optimizer_cls_and_kwargs
    from lorakit.sft_trainer import trainer_class

    config = sft_config(recipe, common, _columns(prepared.train))
    optim = optimizer_cls_and_kwargs(config, model)
    return trainer_class()(model=model, args=config, train_dataset=prepared.train,
                           eval_dataset=prepared.eval if prepared.eval is not None else None,
                           processing_class=tokenizer, callbacks=callbacks, optimizer_cls_and_kwargs=optim)


def _evaluate(trainer, recipe, model, tokenizer, prepared, out: _Out, when: str) -> dict:
    """Eval loss (SFT with eval rows) and task metrics (when the recipe names metrics)."""
    from lorakit.recipe import recipe_dir

    result: dict[str, Any] = {"eval_loss": None, "metrics": None, "samples": []}
    if recipe.method == "sft" and prepared.eval is not None and len(prepared.eval) > 0:
        ev = trainer.evaluate(metric_key_prefix="eval")
        result["eval_loss"] = float(ev["eval_loss"]) if "eval_loss" in ev else None
        out.print(f"eval loss {when}: {result['eval_loss']:.4f}")
    examples = list(getattr(prepared, "eval_examples", None) or [])[: recipe.evaluate.samples]
    if recipe.evaluate.metrics and examples:
        from lorakit.evaluate import task_metrics

        t0 = time.time()
        tm = task_metrics(model, tokenizer, examples, recipe.evaluate.metrics, recipe_dir(recipe),
                          max_new_tokens=recipe.evaluate.max_new_tokens, batch_size=32)
        result["metrics"], result["samples"] = tm["metrics"], tm["samples"]
        shown = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in tm["metrics"].items())
        out.print(f"task metrics {when} ({tm['n']} held-out rows, {time.time() - t0:.0f}s): {shown}")
    if recipe.method == "grpo":  # mean reward of greedy completions on held-out prompts
        from lorakit.grpo import held_out_rewards

        t0 = time.time()
        rw = held_out_rewards(recipe, model, tokenizer, prepared.eval)
        result["reward"] = rw
        if rw is not None:
            parts = ", ".join(f"{k} {_fmt(v)}" for k, v in rw["rewards"].items())
            out.print(f"held-out reward {when} ({rw['n']} prompts, {time.time() - t0:.0f}s): "
                      f"{_fmt(rw['reward'])} ({parts})")
    return result


def _callbacks(recipe, run: RunDir, out: _Out):
    from lorakit.guards import CheckpointMarker, GracefulStop, NonFiniteGuard
    from lorakit.learning_guard import LearningGuard
    from lorakit.progress import ProgressCallback

    progress = ProgressCallback(run.metrics_file, console=out.console)
    stopper = GracefulStop()
    guard = NonFiniteGuard(recipe.train.nan_policy)
    learning = LearningGuard(early=recipe.method == "sft")  # before NonFiniteGuard: it sees the gradients first
    return progress, stopper, guard, learning, [progress, stopper, learning, guard, CheckpointMarker()]


def _remove_printer(trainer) -> None:
    """disable_tqdm makes the Trainer print raw log dicts; our ProgressCallback prints instead."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def _save_adapter(model, tokenizer, run: RunDir, trainer=None) -> None:
    """Rank 0 writes the adapter; under FSDP every rank first joins in gathering the full state dict.
    All ranks wait until it is on disk."""
    from lorakit.distributed import wait_for_everyone

    state_dict = None
    if trainer is not None and getattr(trainer, "is_fsdp_enabled", False):
        state_dict = trainer.accelerator.get_state_dict(trainer.model)  # a collective: every rank calls it
    if run.main:
        with run.staged_dir(run.adapter_dir) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
            tokenizer.save_pretrained(str(tmp))
    wait_for_everyone()


def _distributed() -> dict:
    from lorakit.distributed import describe

    return describe()


def _print_world(recipe, device: str, out: _Out) -> None:
    """One line on the processes of a multi-process run, and what runs when the recipe's strategy cannot."""
    from lorakit.distributed import world_size

    n = world_size()
    if n <= 1:
        return
    wanted = recipe.distributed.strategy
    if wanted == "fsdp" and device != "cuda":
        out.print(f"distributed: {n} processes, data parallel (distributed.strategy fsdp needs CUDA GPUs; "
                  "on CPU accelerate runs the processes as ddp)")
    else:
        out.print(f"distributed: {n} processes, {wanted}")


def _peak_memory(device: str) -> dict:
    if device == "cuda":
        import torch

        return {"kind": "cuda", "max_allocated_bytes": int(torch.cuda.max_memory_allocated()),
                "max_reserved_bytes": int(torch.cuda.max_memory_reserved())}
    import resource

    return {"kind": "cpu_max_rss", "max_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def _threads(device: str) -> int | None:
    if device != "cpu":
        return None
    import torch

    return torch.get_num_threads()


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("lorakit", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate",
                "liger-kernel"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _losses(history: list[dict]) -> dict:
    train = [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h and "step" in h]
    return {"train": train, "eval": evals}


def plot_losses(points: dict, path: Path, *, eval_before: float | None, eval_after: float | None,
                title: str, rewards: dict | None = None, reward_before: float | None = None,
                reward_after: float | None = None) -> Path | None:
    """Loss curve PNG (matplotlib Agg): train loss per logged step, eval loss points.

    With `rewards` (GRPO: grpo.reward_curves, {"total": [(step, value)], <reward name>: [...]}) a second
    panel below shows the training reward per logged step (the weighted total bold, each reward
    function thin) and the held-out mean reward before (step 0) and after training (last step).
    """
    from lorakit.distributed import is_main_process

    if not is_main_process():  # only rank 0 writes the run directory
        return path
    import io

    try:
        import matplotlib
    except ImportError:  # a missing plot must not fail a finished run: metrics.jsonl holds the curves
        log.warning("matplotlib is not installed: no %s (pip install matplotlib)", Path(path).name)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorakit.atomic import atomic_write_bytes

    with_reward = bool(rewards and any(rewards.values())) or reward_before is not None or reward_after is not None
    if with_reward:
        fig, (ax, rax) = plt.subplots(2, 1, figsize=(7, 6.5), dpi=100, sharex=True,
                                      gridspec_kw={"height_ratios": [1, 1.3]})
    else:
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if points["train"]:
        xs, ys = zip(*points["train"])
        ax.plot(xs, ys, label="train loss", color="tab:blue")
    ev = list(points["eval"])
    last_step = points["train"][-1][0] if points["train"] else 0
    if eval_before is not None:
        ev = [(0, eval_before)] + ev
    if eval_after is not None and not any(s == last_step for s, _ in points["eval"]):
        ev.append((last_step, eval_after))
    if ev:
        xs, ys = zip(*ev)
        ax.plot(xs, ys, "o--", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    if with_reward:
        curves = dict(rewards or {})
        total = curves.pop("total", [])
        for name, pts in curves.items():
            if pts:
                xs, ys = zip(*pts)
                rax.plot(xs, ys, lw=1, alpha=0.7, label=f"train {name}")
        if total:
            xs, ys = zip(*total)
            rax.plot(xs, ys, lw=2, color="tab:green", label="train reward (weighted total)")
        last = max([s for pts in (rewards or {}).values() for s, _ in pts] or [last_step])
        held = [(st, v) for st, v in ((0, reward_before), (last, reward_after)) if v is not None]
        if held:
            xs, ys = zip(*held)
            rax.plot(xs, ys, "s--", color="tab:red", ms=7, label="held-out reward (greedy)")
        rax.set_xlabel("step")
        rax.set_ylabel("reward")
        rax.grid(alpha=0.3)
        rax.legend(fontsize=8)
        ax.set_xlabel("")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def _pct_change(before, after) -> float | None:
    if before is None or after is None or not before:
        return None
    return 100.0 * (after - before) / before


def run_training(recipe, *, overwrite: bool = False, resume: str | bool | None = None, console=None,
                 json_mode: bool = False) -> dict:
    """Train the recipe's adapter into its run directory; return the summary (also in summary.json)."""
    from lorakit.recipe import located, to_resolved_yaml

    t_start = time.time()
    out = _Out(console, json_mode)
    device = pick_device()
    resuming = bool(resume)
    run = _run_dir_for(recipe, resume)
    checkpoint = None
    if resuming:
        from lorakit.guards import latest_complete_checkpoint

        if overwrite:
            raise LorakitError("--resume continues the run, --overwrite replaces it: pass one of them")
        run.check_resumable(finished_ok=True)
        checkpoint = latest_complete_checkpoint(run.checkpoints_dir)
        if checkpoint is None:
            raise LorakitError(f"--resume: {run.path} has no complete checkpoint to resume from",
                               hint="set train.save_steps to save checkpoints, or start over with --overwrite")
        from lorakit.resume import check_resume

        with located(recipe):  # the recipe changes a resumed run may not make, with their lines
            check_resume(run, checkpoint, recipe)
    else:
        run.check_new(overwrite=overwrite)
    with located(recipe):
        levers = resolved_options(recipe, device)  # input errors before any weight is loaded
        _check_rewards(recipe)
    _quiet_libraries()
    if device == "cuda":
        from lorakit.cuda_memory import use_expandable_segments

        levers["expandable_segments"] = use_expandable_segments(recipe.train.expandable_segments)

    from transformers import set_seed

    set_seed(recipe.train.seed)
    from lorakit.models import describe_params, load_training_model, load_training_tokenizer

    if device == "cpu":
        import torch

        torch.set_num_threads(cpu_threads())
        out.print(f"device: cpu ({torch.get_num_threads()} threads); loading {recipe.base_model} ...")
    else:
        out.print(f"device: {device}; loading {recipe.base_model} ...")
    _print_world(recipe, device, out)
    with located(recipe):
        from lorakit.speed import describe_levers

        # data before weights: a data problem fails in seconds, and padding-free (with the attention it
        # brings) is settled on the real rows before the model loads with that attention
        tokenizer, base_dir = load_training_tokenizer(recipe)
        prepared = _prepare_data(recipe, tokenizer)
        lengths = _row_lengths(prepared)
        recipe = _settle_padding_free(recipe, levers, lengths, out, device)
        recipe = _settle_cuda_graphs(recipe, levers, lengths, device)
        recipe = _settle_graph_length(recipe, levers, lengths, out)
        model, info = load_training_model(recipe, device, base_dir, tokenizer, levers)
        info["graph_length"], info["graph_max_row"] = levers.get("graph_length"), levers.get("graph_max_row")
        levers["attn_implementation"] = info["attn_implementation"]  # as loaded: the fallbacks of `auto`
        info["expandable_segments"] = levers.get("expandable_segments", False)  # for summary.json
        out.print(describe_params(info))
        out.print(describe_levers(levers))
    report = dict(getattr(prepared, "report", None) or {})
    if report:
        out.print("data: " + ", ".join(f"{k}={v}" for k, v in report.items() if not isinstance(v, (dict, list))))

    # inputs are valid: only now may an old run go
    if overwrite and not resuming:
        run.replace_old()
    run.begin(to_resolved_yaml(recipe), resumed=resuming)
    if checkpoint is not None:
        run.truncate_metrics(int(checkpoint.name.split("-")[-1]))
        out.print(f"resuming from {checkpoint}")
    try:
        return _train_and_save(recipe, run, device, model, tokenizer, info, prepared, report, out, checkpoint,
                               t_start)
    except Interrupted:
        raise
    except KeyboardInterrupt as e:  # Ctrl-C, or a second signal (errors.Stopped) while the first one's save ran
        run.set_state(INTERRUPTED, error="interrupted before a checkpoint could be saved",
                      signal=getattr(e, "signal_name", "SIGINT"))
        raise
    except LorakitError as e:
        if run.state != FAILED:
            run.mark_failed(e.message)
        raise
    except BaseException as e:
        # a full / over-quota / read-only disk while saving (a checkpoint, metrics): a clean error, exit 1
        from lorakit.guards import disk_failure

        err = disk_failure(e, run.checkpoints_dir, run.path, cleanup=run.main)
        if err is None:
            run.mark_failed(f"{type(e).__name__}: {e}")
            raise
        run.mark_failed(err.message)
        raise err from e
    finally:  # training that ended with an exception never ran on_train_end: give the signal handlers back
        from lorakit.guards import release_signals

        release_signals()


def _row_lengths(prepared) -> list[int]:
    """Tokens per training row (empty when the rows are not tokenized yet): what the `auto` levers settle on."""
    ds = prepared.train
    return [len(x) for x in ds["input_ids"]] if "input_ids" in _columns(ds) else []


def _settle_padding_free(recipe, levers: dict, lengths: list[int], out: _Out, device: str):
    """`data.padding_free: auto` chose padding-free before the data was read: keep it only when padded
    batches of these rows would waste enough (speed.padding_free_worth_it); the resolved recipe records it,
    and `auto` attention follows (speed.attention)."""
    if recipe.method != "sft" or recipe.data.padding_free != "auto" or not levers.get("padding_free") \
            or recipe.model.attn_implementation == "varlen":  # asked for varlen: it needs the flattened rows
        return recipe
    from lorakit.speed import padding_free_worth_it, padding_waste

    if not lengths or padding_free_worth_it(lengths, recipe.train.batch_size, recipe.train.seed):
        return recipe
    out.print(f"speed: padding-free off (padded batches would waste only "
              f"{100 * padding_waste(lengths, recipe.train.batch_size, recipe.train.seed):.0f}% of tokens)")
    from lorakit.speed import attention

    recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"padding_free": False})})
    levers.update(padding_free=False, attn_implementation=attention(recipe, device, False))
    return recipe


def _settle_cuda_graphs(recipe, levers: dict, lengths: list[int], device: str):
    """`train.cuda_graphs: auto` once the data is known (after padding-free was settled): graphs only for rows
    of one length, i.e. batches of one shape (speed.cuda_graphs_auto). The resolved recipe records a choice the
    data changed (training_args plans again from the recipe)."""
    if recipe.train.cuda_graphs != "auto":
        return recipe
    from lorakit.speed import auto_graphs_reason, cuda_graphs_auto, offload_embeddings

    on = cuda_graphs_auto(recipe, levers, device, one_shape=len(set(lengths)) == 1 if lengths else None)
    if on and not levers.get("cuda_graphs"):  # e.g. padding-free was settled off: the batches have one shape
        levers["checkpointing_reason"] = levers.get("checkpointing_reason", "") + auto_graphs_reason(levers)
    levers["cuda_graphs"] = on
    levers["offload_embeddings"] = offload_embeddings(recipe, levers)
    if on == cuda_graphs_auto(recipe, levers, device):  # planning from the recipe gives the same: keep `auto`
        return recipe
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"cuda_graphs": on})})


def _settle_graph_length(recipe, levers: dict, lengths: list[int], out: _Out):
    """CUDA graphs for padding-free batches: the one length every batch is padded to (lorakit.graph_length),
    from the rows' lengths, into `levers["graph_length"]`. Without the lengths, no graphs (the resolved recipe
    records it: training_args plans again from the recipe)."""
    if not (levers.get("cuda_graphs") and levers.get("padding_free") and recipe.method == "sft"):
        return recipe
    if not lengths:  # rows not tokenized yet: no length to pad to, and a graph per batch shape would not pay
        levers["cuda_graphs"] = False
        out.print("speed: CUDA graphs off (padding-free batches, row lengths unknown before training)")
        return recipe.model_copy(update={"train": recipe.train.model_copy(update={"cuda_graphs": False})})
    from lorakit.graph_length import QUANTILE, graph_length

    n = graph_length(lengths, recipe.train.batch_size, recipe.train.seed)
    levers["graph_length"] = n
    levers["graph_max_row"] = max(recipe.data.max_length, *lengths)  # no pad row longer than the longest row
    out.print(f"speed: padding-free batches padded to {n} tokens for CUDA graphs ({QUANTILE:.0%} of batches fit; "
              f"longer ones run without)")
    return recipe


def _pad_to_graph_length(trainer, info: dict) -> Any:
    """Pad the trainer's padding-free training batches to the planned graph length (lorakit.graph_length; pad
    rows no longer than the longest row); the collator (which counts padded and longer batches) or None."""
    n = info.get("graph_length")
    if not n:
        return None
    from lorakit.graph_length import GraphLengthCollator

    inner = trainer.data_collator
    trainer.train_collator = GraphLengthCollator(inner, n, info["graph_max_row"], inner.pad_token_id)
    return trainer.train_collator


def _train_and_save(recipe, run: RunDir, device, model, tokenizer, info, prepared, report, out: _Out,
                    checkpoint, t_start) -> dict:
    has_eval = recipe.method == "sft" and prepared.eval is not None and len(prepared.eval) > 0
    common = training_args(recipe, run, device, has_eval=has_eval)
    progress, stopper, guard, learning, callbacks = _callbacks(recipe, run, out)
    from lorakit.learning_guard import check_trainable

    check_trainable(model)
    trainer = _build_trainer(recipe, model, tokenizer, prepared, common, callbacks)
    padder = _pad_to_graph_length(trainer, info)
    _remove_printer(trainer)

    before_path = run.path / BEFORE_FILE
    if checkpoint is not None and before_path.exists():
        import json

        before = json.loads(before_path.read_text(encoding="utf-8"))
    else:
        before = _evaluate(trainer, recipe, model, tokenizer, prepared, out, "before")
        run.write_json(BEFORE_FILE, before)

    t_train = time.time()
    from lorakit.varlen_attention import calls

    calls_before = calls.copy()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    attention_calls = dict(calls - calls_before)
    train_seconds = time.time() - t_train
    state = trainer.state

    if stopper.signal_name:
        from lorakit.guards import latest_complete_checkpoint

        ckpt = latest_complete_checkpoint(run.checkpoints_dir)
        run.set_state(INTERRUPTED, step=state.global_step, checkpoint=str(ckpt) if ckpt else None,
                      signal=stopper.signal_name)
        out.print(f"stopped by {stopper.signal_name} at step {state.global_step}; checkpoint {ckpt}. "
                  f"Resume with: lorakit train {recipe._source or 'RECIPE'} --resume {run.path}")
        raise Interrupted(stopper.signal_name, str(ckpt) if ckpt else None, stopper.exit_code)
    if guard.bad_step is not None:
        from lorakit.guards import latest_complete_checkpoint

        ckpt = latest_complete_checkpoint(run.checkpoints_dir)
        msg = f"the loss or gradients became NaN/inf at step {guard.bad_step}"
        run.set_state(FAILED, error=msg, step=guard.bad_step, checkpoint=str(ckpt) if ckpt else None)
        raise LorakitError(
            msg + (f"; the last good checkpoint is {ckpt}" if ckpt else ""), exit_code=EXIT_RUNTIME,
            hint="lower train.lr, use bf16 instead of fp16, check the data for broken rows, "
                 "or set train.nan_policy: skip")
    if learning.error() is not None:  # the adapter did not move: nothing is saved as if it had learned
        run.set_state(FAILED, error=learning.problem, step=state.global_step)
        raise learning.error()

    after = _evaluate(trainer, recipe, model, tokenizer, prepared, out, "after")
    _save_adapter(model, tokenizer, run, trainer)

    history = list(state.log_history)
    points = _losses(history)
    reward = None
    if recipe.method == "grpo":
        from lorakit.grpo import reward_curves, reward_summary

        reward = reward_summary(before.get("reward"), after.get("reward"), history)
    plot = plot_losses(points, run.plot_file, eval_before=before["eval_loss"], eval_after=after["eval_loss"],
                       title=f"{recipe.name}: {recipe.base_model}",
                       rewards=reward_curves(history) if reward is not None else None,
                       reward_before=(reward["before"] or {}).get("total") if reward else None,
                       reward_after=(reward["after"] or {}).get("total") if reward else None)
    tokens = int(state.num_input_tokens_seen or 0)
    train_rt = next((h.get("train_runtime") for h in reversed(history) if "train_runtime" in h), None)
    summary = {
        "name": recipe.name,
        "run_dir": str(run.path),
        "state": FINISHED,
        "method": recipe.method,
        "base_model": recipe.base_model,
        "base_dir": info["base_dir"],
        "device": device,
        "distributed": _distributed(),  # world_size, strategy (single | ddp | fsdp), backend, num_machines
        "cpu_threads": _threads(device),
        "resumed": checkpoint is not None,
        "options": {**resolved_options(recipe, device), "bits": info["bits"], "dtype": info["dtype"],
                    "attn_implementation": info["attn_implementation"],  # as loaded (auto's fallbacks)
                    "expandable_segments": info.get("expandable_segments", False),
                    **({"cuda_graphs": False, "offload_embeddings": False} if "not_offloaded" in info else {})},
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 4),
        "loss": {"first": points["train"][0][1] if points["train"] else None,
                 "last": points["train"][-1][1] if points["train"] else None},
        "eval_loss": {"before": before["eval_loss"], "after": after["eval_loss"],
                      "change_percent": _pct_change(before["eval_loss"], after["eval_loss"])},
        "task_metrics": {"before": before["metrics"], "after": after["metrics"],
                         "samples_before": before["samples"], "samples_after": after["samples"]},
        "reward": reward,  # GRPO: held-out mean reward before/after (total and per function); None for SFT
        "tokens": tokens,
        "train_seconds": round(train_rt if train_rt else train_seconds, 2),
        "tokens_per_s": round(tokens / train_seconds, 1) if train_seconds > 0 else None,
        "wall_seconds": None,
        "peak_memory": _peak_memory(device),
        "params": {"trainable": info["trainable_params"], "total": info["total_params"],
                   "percent": info["trainable_percent"], "target_modules": info["target_modules"]},
        "skipped_nonfinite_steps": guard.skipped,
        "data": report,
        "versions": library_versions(),
        "artifacts": {"adapter": str(run.adapter_dir), "recipe": str(run.recipe_file),
                      "metrics": str(run.metrics_file), "plot": str(plot) if plot else None},
    }
    from lorakit.layer_graphs import find

    graphs = find(model)
    if graphs is not None:  # which layer shapes replayed graphs, and why any ran torch's checkpoint instead
        summary["cuda_graphs"] = {"captured": graphs.captured, "fallbacks": graphs.failures,
                                  "not_graphable_calls": graphs.skipped,
                                  "recompute_tail_skipped": graphs.tails_skipped}
        if padder is not None:  # padding-free batches: padded to one length, or longer and run without graphs
            summary["cuda_graphs"].update(graph_length=padder.length, padded_batches=padder.padded,
                                          longer_batches=padder.longer, pad_tokens=padder.pad_tokens)
        for why in sorted(graphs.failures):
            out.print(f"speed: a layer ran without CUDA graphs ({why})")
    if info["attn_implementation"] == "varlen":  # training's attention calls (a checkpointed layer's recompute
        # calls again): flattened rows through the kernel (varlen) or row by row (rows), others SDPA (sdpa)
        summary["attention_calls"] = attention_calls
    if recipe.output.save in ("merged", "both") and run.main:
        summary["merge"] = _merge(recipe, run, out)
        summary["artifacts"]["merged"] = str(run.merged_dir)
    summary["wall_seconds"] = round(time.time() - t_start, 2)
    run.write_json("summary.json", summary)
    run.set_state(FINISHED, step=state.global_step)
    _print_summary(summary, out)
    return summary


def _merge(recipe, run: RunDir, out: _Out) -> dict:
    try:
        from lorakit.merge import merge_adapter
    except ImportError:
        raise LorakitError("output.save: merged needs lorakit.merge, which is missing from this installation",
                           field="output.save", exit_code=EXIT_RUNTIME) from None
    out.print(f"merging the adapter into the base -> {run.merged_dir}")
    report = merge_adapter(run.path, run.merged_dir, dtype=recipe.output.merged_dtype, overwrite=True)
    if recipe.output.save == "merged":
        pass  # the adapter stays: it is the run's primary artifact and small
    return report


def _fmt(v, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.4f}"


def _print_summary(s: dict, out: _Out) -> None:
    el = s["eval_loss"]
    lines = [f"finished {s['steps']} steps in {s['train_seconds']:.0f}s "
             f"({s['tokens_per_s'] or 0:,.0f} tok/s); run dir {s['run_dir']}"]
    if el["before"] is not None:
        ch = f" ({el['change_percent']:+.1f}%)" if el["change_percent"] is not None else ""
        lines.append(f"eval loss: {_fmt(el['before'])} -> {_fmt(el['after'])}{ch}")
    tm = s["task_metrics"]
    for name in (tm["after"] or {}):
        lines.append(f"{name}: {_fmt((tm['before'] or {}).get(name), True)} -> {_fmt(tm['after'][name], True)}")
    for sample in tm["samples_after"][:1]:
        lines.append(f"sample prompt: {str(sample['prompt'])[:200]}")
        lines.append(f"  after training: {sample['completion'][:200]}")
    for sample in tm["samples_before"][:1]:
        lines.append(f"  before training: {sample['completion'][:200]}")
    rw = s.get("reward")
    if rw and rw.get("after") is not None:
        b, a, ch = rw["before"] or {}, rw["after"], rw["change"] or {}
        for key in a:
            label = "held-out reward" if key == "total" else f"  {key}"
            change = f" ({ch[key]:+.4f})" if ch.get(key) is not None else ""
            count = f" ({rw['n']} prompts)" if key == "total" else ""
            lines.append(f"{label}{count}: {_fmt(b.get(key))} -> {_fmt(a[key])}{change}")
        if not tm["samples_after"]:
            for after_s, before_s in zip(rw["samples_after"][:1], rw["samples_before"][:1] or [None]):
                lines.append(f"sample prompt: {str(after_s['prompt'])[:200]}")
                lines.append(f"  after training: {after_s['completion'][:200]}")
                if before_s is not None:
                    lines.append(f"  before training: {before_s['completion'][:200]}")
    for line in lines:
        out.print(line)


__all__ = ["run_training", "training_args", "sft_config", "resolved_options", "plot_losses", "pick_device"]
