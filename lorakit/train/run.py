"""`lorakit train`: a recipe in, a run directory out. SFT through TRL's SFTTrainer, GRPO through train/grpo.py.

The flow: check the run directory may be written -> load the tokenizer and prepare the data (lorakit.data) ->
plan the speed levers once from the recipe, the device, the memory estimate and the rows' lengths
(lorakit.estimate.run_plan -> lorakit.speed.Plan) -> load the base + LoRA with that plan (lorakit.model) -> only
now replace an old run (--overwrite) and mark the run `running` -> eval loss and task metrics before -> train (TRL,
with the progress / signal / NaN / checkpoint callbacks) -> eval after -> save the adapter atomically -> metrics,
summary, loss plot (train/report.py) -> optional merge -> `finished`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Any

import torch
from rich.console import Console
from transformers import set_seed
from transformers.trainer_callback import PrinterCallback
from transformers.trainer_callback import ProgressCallback as TqdmCallback

from lorakit import speed
from lorakit.data import prepare as data
from lorakit.errors import EXIT_RUNTIME, Interrupted, LorakitError
from lorakit.estimate.memory import run_plan
from lorakit.merge import merge_adapter
from lorakit.model.load import describe_params, load_training_model, load_training_tokenizer
from lorakit.recipe.loader import located, output_dir, recipe_dir, to_resolved_yaml
from lorakit.runtime.device import cpu_threads, local_gpu, pick_device
from lorakit.runtime.distributed import describe as describe_world
from lorakit.runtime.distributed import is_main_process, wait_for_everyone, world_size
from lorakit.runtime.quiet import quiet_libraries
from lorakit.speed import host_checkpoints
from lorakit.speed.adamw8bit import optimizer_cls_and_kwargs
from lorakit.speed.cuda_memory import use_expandable_segments
from lorakit.speed.layer_graphs import find
from lorakit.speed.padding import GraphLengthCollator
from lorakit.speed.varlen_attention import calls
from lorakit.train import grpo
from lorakit.train.args import run_options, sft_config, training_args
from lorakit.train.evaluate import task_metrics
from lorakit.train.guards import (
    CheckpointMarker,
    GracefulStop,
    NonFiniteGuard,
    disk_failure,
    latest_complete_checkpoint,
    release_signals,
)
from lorakit.train.learning_guard import LearningGuard, check_trainable
from lorakit.train.progress import ProgressCallback, plain_output
from lorakit.train.report import (
    fmt,
    library_versions,
    losses,
    pct_change,
    peak_memory,
    plot_losses,
    print_summary,
    threads,
)
from lorakit.train.resume import check_resume
from lorakit.train.run_dir import FAILED, FINISHED, INTERRUPTED, RunDir
from lorakit.train.sft_trainer import trainer_class

log = logging.getLogger("lorakit")

BEFORE_FILE = "before.json"  # eval results of the untrained adapter, kept for a resumed run


# ----------------------------------------------------------------------------------------------
# Devices and resolved options
# ----------------------------------------------------------------------------------------------


class _Out:
    """Where human-readable lines go: the given rich console, or stderr in JSON mode."""

    def __init__(self, console, json_mode: bool):
        if json_mode or console is None:
            plain = plain_output(None)
            console = Console(stderr=True, no_color=plain, highlight=False, emoji=False)
        self.console = console

    def print(self, text: str) -> None:
        if is_main_process():  # in a multi-process run only rank 0 talks
            self.console.print(text, highlight=False, markup=False)


def _run_dir_for(recipe, resume) -> RunDir:
    if isinstance(resume, str) and resume not in ("latest", "true", "True", ""):
        return RunDir(resume)
    return RunDir(output_dir(recipe))


def _quiet_libraries() -> None:
    quiet_libraries()


def _prepare_data(recipe, tokenizer):
    if recipe.method == "grpo":
        return data.prepare_grpo(recipe, tokenizer)
    return data.prepare_sft(recipe, tokenizer)


def _check_rewards(recipe) -> None:
    """GRPO: the reward functions resolve (file, import, arguments) before weights load or the run starts."""
    if recipe.method == "grpo":
        grpo.check_rewards(recipe)


def _columns(ds) -> list[str]:
    return list(getattr(ds, "column_names", None) or [])


def _build_trainer(recipe, model, tokenizer, prepared, common: dict, callbacks: list, plan: speed.Plan):
    if recipe.method == "grpo":
        with located(recipe):  # reward loading / GRPO settings errors point at their recipe lines
            return grpo.build_grpo_trainer(recipe, model, tokenizer, prepared, common, callbacks,
                                           generation_graphs=plan.generation_graphs)
    config = sft_config(recipe, common, _columns(prepared.train), plan)
    optim = optimizer_cls_and_kwargs(config, model)
    return trainer_class()(model=model, args=config, train_dataset=prepared.train,
                           eval_dataset=prepared.eval if prepared.eval is not None else None,
                           processing_class=tokenizer, callbacks=callbacks, optimizer_cls_and_kwargs=optim)


def _evaluate(trainer, recipe, model, tokenizer, prepared, out: _Out, when: str, plan: speed.Plan) -> dict:
    """Eval loss (SFT with eval rows) and task metrics (when the recipe names metrics)."""
    result: dict[str, Any] = {"eval_loss": None, "metrics": None, "samples": []}
    if recipe.method == "sft" and prepared.eval is not None and len(prepared.eval) > 0:
        ev = trainer.evaluate(metric_key_prefix="eval")
        result["eval_loss"] = float(ev["eval_loss"]) if "eval_loss" in ev else None
        out.print(f"eval loss {when}: {result['eval_loss']:.4f}")
    examples = list(getattr(prepared, "eval_examples", None) or [])[: recipe.evaluate.samples]
    if recipe.evaluate.metrics and examples:
        t0 = time.time()
        tm = task_metrics(model, tokenizer, examples, recipe.evaluate.metrics, recipe_dir(recipe),
                          max_new_tokens=recipe.evaluate.max_new_tokens, batch_size=32)
        result["metrics"], result["samples"] = tm["metrics"], tm["samples"]
        shown = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in tm["metrics"].items())
        out.print(f"task metrics {when} ({tm['n']} held-out rows, {time.time() - t0:.0f}s): {shown}")
    if recipe.method == "grpo":  # mean reward of greedy completions on held-out prompts
        t0 = time.time()
        rw = grpo.held_out_rewards(recipe, model, tokenizer, prepared.eval,
                                   generation_graphs=plan.generation_graphs)
        result["reward"] = rw
        if rw is not None:
            parts = ", ".join(f"{k} {fmt(v)}" for k, v in rw["rewards"].items())
            out.print(f"held-out reward {when} ({rw['n']} prompts, {time.time() - t0:.0f}s): "
                      f"{fmt(rw['reward'])} ({parts})")
    return result


def _callbacks(recipe, run: RunDir, out: _Out):
    progress = ProgressCallback(run.metrics_file, console=out.console)
    stopper = GracefulStop()
    guard = NonFiniteGuard(recipe.train.nan_policy)
    learning = LearningGuard(early=recipe.method == "sft")  # before NonFiniteGuard: it sees the gradients first
    return progress, stopper, guard, learning, [progress, stopper, learning, guard, CheckpointMarker()]


def _remove_printer(trainer) -> None:
    """disable_tqdm makes the Trainer print raw log dicts; our ProgressCallback prints instead."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(TqdmCallback)


def _save_adapter(model, tokenizer, run: RunDir, trainer=None) -> None:
    """Rank 0 writes the adapter; under FSDP every rank first joins in gathering the full state dict.
    All ranks wait until it is on disk."""
    state_dict = None
    if trainer is not None and getattr(trainer, "is_fsdp_enabled", False):
        state_dict = trainer.accelerator.get_state_dict(trainer.model)  # a collective: every rank calls it
    if run.main:
        with run.staged_dir(run.adapter_dir) as tmp:
            model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
            tokenizer.save_pretrained(str(tmp))
    wait_for_everyone()


def _print_world(recipe, device: str, out: _Out) -> None:
    """One line on the processes of a multi-process run, and what runs when the recipe's strategy cannot."""
    n = world_size()
    if n <= 1:
        return
    wanted = recipe.distributed.strategy
    if wanted == "fsdp" and device != "cuda":
        out.print(f"distributed: {n} processes, data parallel (distributed.strategy fsdp needs CUDA GPUs; "
                  "on CPU accelerate runs the processes as ddp)")
    else:
        out.print(f"distributed: {n} processes, {wanted}")


def run_training(recipe, *, overwrite: bool = False, resume: str | bool | None = None, console=None,
                 json_mode: bool = False) -> dict:
    """Train the recipe's adapter into its run directory; return the summary (also in summary.json).

    Args:
        recipe: a loaded lorakit.recipe.schema.Recipe.
        overwrite: replace an existing run directory (only once the inputs are checked and the model loaded).
        resume: continue from the latest complete checkpoint: True / "latest" for the recipe's own output
            directory, or a run directory's path.
        console: the rich Console for progress lines (default: stderr).
        json_mode: progress lines go to stderr, so that stdout carries only the caller's JSON document.

    Returns:
        The run's summary: run_dir, state, steps, loss, eval_loss, task_metrics, tokens_per_s, peak_memory,
        options (the speed plan as applied), artifacts, ...

    Raises LorakitError on bad input or a failed run and Interrupted on SIGINT/SIGTERM (after a checkpoint).
    """
    t_start = time.time()
    out = _Out(console, json_mode)
    device = pick_device()
    resuming = bool(resume)
    run = _run_dir_for(recipe, resume)
    checkpoint = None
    if resuming:
        if overwrite:
            raise LorakitError("--resume continues the run, --overwrite replaces it: pass one of them")
        run.check_resumable(finished_ok=True)
        checkpoint = latest_complete_checkpoint(run.checkpoints_dir)
        if checkpoint is None:
            raise LorakitError(f"--resume: {run.path} has no complete checkpoint to resume from",
                               hint="set train.save_steps to save checkpoints, or start over with --overwrite")
        with located(recipe):  # the recipe changes a resumed run may not make, with their lines
            check_resume(run, checkpoint, recipe)
    else:
        run.check_new(overwrite=overwrite)
    with located(recipe):
        options = run_options(recipe, device)  # input errors before any weight is loaded
        _check_rewards(recipe)
    _quiet_libraries()
    segments = device == "cuda" and use_expandable_segments(recipe.train.expandable_segments)

    set_seed(recipe.train.seed)
    if device == "cpu":
        torch.set_num_threads(cpu_threads())
        out.print(f"device: cpu ({torch.get_num_threads()} threads); loading {recipe.base_model} ...")
    else:
        out.print(f"device: {device}; loading {recipe.base_model} ...")
    _print_world(recipe, device, out)
    with located(recipe):
        # data before weights: a data problem fails in seconds, and padding-free (with the attention it
        # brings) is settled on the real rows before the model loads with that attention
        tokenizer, base_dir = load_training_tokenizer(recipe)
        prepared = _prepare_data(recipe, tokenizer)
        gpu = local_gpu() if device == "cuda" else None  # (name, memory): what the run must fit
        plan = run_plan(recipe, device, lengths=_row_lengths(prepared), expandable_segments=segments,
                        device_bytes=gpu[1] if gpu else None)
        for note in plan.notes:
            out.print(note)
        recipe = _settled(recipe, plan)
        model, info = load_training_model(recipe, device, base_dir, tokenizer, plan)
        out.print(describe_params(info))
        # as loaded: `auto` attention falls back where the model's attention does not fit the planned kernel
        out.print(speed.describe(dataclasses.replace(plan, attn_implementation=info["attn_implementation"])))
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
        return _train_and_save(recipe, run, device, plan, options, model, tokenizer, info, prepared, report, out,
                               checkpoint, t_start)
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
        err = disk_failure(e, run.checkpoints_dir, run.path, cleanup=run.main)
        if err is None:
            run.mark_failed(f"{type(e).__name__}: {e}")
            raise
        run.mark_failed(err.message)
        raise err from e
    finally:  # training that ended with an exception never ran on_train_end: give the signal handlers back
        release_signals()


def _row_lengths(prepared) -> list[int]:
    """Tokens per training row (empty when the rows are not tokenized yet): what the `auto` levers settle on."""
    ds = prepared.train
    return [len(x) for x in ds["input_ids"]] if "input_ids" in _columns(ds) else []








def _settled(recipe, plan: speed.Plan):
    """The recipe with the values the rows decided under `auto` (plan.settled): the resolved recipe records them."""
    for section, key, value in plan.settled:
        part = getattr(recipe, section).model_copy(update={key: value})
        recipe = recipe.model_copy(update={section: part})
    return recipe


def _pad_to_graph_length(trainer, plan: speed.Plan) -> Any:
    """Pad the trainer's padding-free training batches to the planned graph length (lorakit.speed.padding; pad
    rows no longer than the longest row); the collator (which counts padded and longer batches) or None."""
    if not plan.graph_length:
        return None
    inner = trainer.data_collator
    trainer.train_collator = GraphLengthCollator(inner, plan.graph_length, plan.graph_max_row, inner.pad_token_id)
    return trainer.train_collator


def _train_and_save(recipe, run: RunDir, device, plan: speed.Plan, options: dict, model, tokenizer, info, prepared,
                    report, out: _Out, checkpoint, t_start) -> dict:
    has_eval = recipe.method == "sft" and prepared.eval is not None and len(prepared.eval) > 0
    common = training_args(recipe, run, device, plan, options, has_eval=has_eval)
    progress, stopper, guard, learning, callbacks = _callbacks(recipe, run, out)
    check_trainable(model)
    trainer = _build_trainer(recipe, model, tokenizer, prepared, common, callbacks, plan)
    padder = _pad_to_graph_length(trainer, plan)
    _remove_printer(trainer)

    before_path = run.path / BEFORE_FILE
    if checkpoint is not None and before_path.exists():
        before = json.loads(before_path.read_text(encoding="utf-8"))
    else:
        before = _evaluate(trainer, recipe, model, tokenizer, prepared, out, "before", plan)
        run.write_json(BEFORE_FILE, before)

    t_train = time.time()
    calls_before = calls.copy()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    attention_calls = dict(calls - calls_before)
    train_seconds = time.time() - t_train
    state = trainer.state

    if stopper.signal_name:
        ckpt = latest_complete_checkpoint(run.checkpoints_dir)
        run.set_state(INTERRUPTED, step=state.global_step, checkpoint=str(ckpt) if ckpt else None,
                      signal=stopper.signal_name)
        out.print(f"stopped by {stopper.signal_name} at step {state.global_step}; checkpoint {ckpt}. "
                  f"Resume with: lorakit train {recipe._source or 'RECIPE'} --resume {run.path}")
        raise Interrupted(stopper.signal_name, str(ckpt) if ckpt else None, stopper.exit_code)
    if guard.bad_step is not None:
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

    after = _evaluate(trainer, recipe, model, tokenizer, prepared, out, "after", plan)
    _save_adapter(model, tokenizer, run, trainer)

    history = list(state.log_history)
    points = losses(history)
    reward = None
    if recipe.method == "grpo":
        reward = grpo.reward_summary(before.get("reward"), after.get("reward"), history)
    plot = plot_losses(points, run.plot_file, eval_before=before["eval_loss"], eval_after=after["eval_loss"],
                       title=f"{recipe.name}: {recipe.base_model}",
                       rewards=grpo.reward_curves(history) if reward is not None else None,
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
        "distributed": describe_world(),  # world_size, strategy (single | ddp | fsdp), backend, num_machines
        "cpu_threads": threads(device),
        "resumed": checkpoint is not None,
        "options": {**options, **plan.as_dict(), "bits": info["bits"], "dtype": info["dtype"],
                    "attn_implementation": info["attn_implementation"],  # as loaded (auto's fallbacks)
                    **({"cuda_graphs": False, "offload_embeddings": False} if "not_offloaded" in info else {})},
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 4),
        "loss": {"first": points["train"][0][1] if points["train"] else None,
                 "last": points["train"][-1][1] if points["train"] else None},
        "eval_loss": {"before": before["eval_loss"], "after": after["eval_loss"],
                      "change_percent": pct_change(before["eval_loss"], after["eval_loss"])},
        "task_metrics": {"before": before["metrics"], "after": after["metrics"],
                         "samples_before": before["samples"], "samples_after": after["samples"]},
        "reward": reward,  # GRPO: held-out mean reward before/after (total and per function); None for SFT
        "tokens": tokens,
        "train_seconds": round(train_rt if train_rt else train_seconds, 2),
        "tokens_per_s": round(tokens / train_seconds, 1) if train_seconds > 0 else None,
        "wall_seconds": None,
        "peak_memory": peak_memory(device),
        "params": {"trainable": info["trainable_params"], "total": info["total_params"],
                   "percent": info["trainable_percent"], "target_modules": info["target_modules"]},
        "skipped_nonfinite_steps": guard.skipped,
        "data": report,
        "versions": library_versions(),
        "artifacts": {"adapter": str(run.adapter_dir), "recipe": str(run.recipe_file),
                      "metrics": str(run.metrics_file), "plot": str(plot) if plot else None},
    }
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
    offload = host_checkpoints.find(model)
    if offload is not None:  # checkpointed layer inputs that went to host memory, and came back ahead of use
        summary["offloaded_checkpoints"] = {"packed": offload.store.packed, "prefetched": offload.store.prefetched}
    if info["attn_implementation"] == "varlen":  # training's attention calls (a checkpointed layer's recompute
        # calls again): flattened rows through the kernel (varlen) or row by row (rows), others SDPA (sdpa)
        summary["attention_calls"] = attention_calls
    if recipe.output.save in ("merged", "both") and run.main:
        summary["merge"] = _merge(recipe, run, out)
        summary["artifacts"]["merged"] = str(run.merged_dir)
    if recipe.output.save == "gguf" and run.main:
        from lorakit.export.gguf_writer import export_gguf  # the merge and the gguf package: only when asked

        out.print(f"writing the GGUF -> {run.path / 'gguf' / 'model.gguf'}")
        summary["gguf"] = export_gguf(run.path, run.path / "gguf" / "model.gguf", quant=recipe.output.gguf_quant,
                                      overwrite=True)
        summary["artifacts"]["gguf"] = summary["gguf"]["out"]
    summary["wall_seconds"] = round(time.time() - t_start, 2)
    run.write_json("summary.json", summary)
    run.set_state(FINISHED, step=state.global_step)
    print_summary(summary, out)
    return summary


def _merge(recipe, run: RunDir, out: _Out) -> dict:
    """output.save merged / both: the adapter folded into its base beside it (the adapter stays: it is the run's
    primary artifact, and small)."""
    out.print(f"merging the adapter into the base -> {run.merged_dir}")
    return merge_adapter(run.path, run.merged_dir, dtype=recipe.output.merged_dtype, overwrite=True)
