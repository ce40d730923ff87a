"""The `lorakit` command line: parse arguments, call one function per command, render the result.

Nothing here knows how a model is built or trained. Each command imports its module inside its own function
(heavy libraries come with those modules), so `lorakit --help` and `lorakit validate` stay fast
(tests/test_cli.py); what sits at the top is what typer's help loads anyway (rich) or the standard library.
Every `LorakitError` becomes one message and its exit code (2 bad input, 1 runtime failure); other
exceptions print one line unless `--debug` is given.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lorakit import __version__
from lorakit.cli_argv import normalize as normalize_argv
from lorakit.errors import EXIT_RUNTIME, Interrupted, LorakitError, signal_exit_code
from lorakit.export import FORMATS, QUANTS
from lorakit.runtime.atomic import atomic_write_text
from lorakit.runtime.distributed import is_main_process, launched, rank_label
from lorakit.runtime.launch import relaunch
from lorakit.runtime.quiet import progress_bars_off, quiet_from_start

app = typer.Typer(
    name="lorakit",
    help="Fine-tune language models with LoRA and QLoRA from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state: dict[str, Any] = {"debug": False}

SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", metavar="KEY=VALUE", help="Override a recipe value (parsed as YAML), e.g. --set lora.r=32.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (for CI scripts).")]
RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]


def ci_mode() -> bool:
    """Plain output (no colour, no spinners) when CI=true or stdout is not a terminal."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"} or not sys.stdout.isatty()


def console(stderr: bool = False):
    plain = ci_mode()
    return Console(stderr=stderr, no_color=plain, highlight=not plain, soft_wrap=plain, emoji=False,
                   force_terminal=False if plain else None, width=120 if plain else None)


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _run(fn: Callable[[], Any], *, json_mode: bool = False) -> Any:
    """Run a command body; turn errors into a message and an exit code. Messages are escaped: they may hold
    brackets that rich would read as markup (paths, gloo's "[/.../pair.cc:553]")."""
    try:
        return fn()
    except LorakitError as e:
        if json_mode:
            _print_json({"ok": False, **e.to_json()})
        else:
            console(stderr=True).print(f"[bold red]error:[/] {escape(e.render())}", markup=True, highlight=False)
        raise typer.Exit(e.exit_code) from None
    except Interrupted as e:  # stopped by a signal after saving a checkpoint; train printed how to resume
        if json_mode:
            _print_json({"ok": False, "interrupted": e.signal_name, "checkpoint": e.checkpoint,
                         "exit_code": e.exit_code})
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt as e:  # Ctrl-C, or a second signal during training (Stopped names it)
        name = getattr(e, "signal_name", "SIGINT")
        code = signal_exit_code(name)
        if json_mode:
            _print_json({"ok": False, "interrupted": name, "checkpoint": None, "exit_code": code})
        console(stderr=True).print(f"interrupted ({name})")
        raise typer.Exit(code) from None
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - the last line of defence against tracebacks
        if _state["debug"]:
            raise
        console(stderr=True).print(f"[bold red]error:[/] {type(e).__name__}: {escape(str(e))}\n"
                                   "This is a bug or an environment problem; run with --debug for the traceback.",
                                   markup=True, highlight=False)
        raise typer.Exit(EXIT_RUNTIME) from None


def _load(recipe_path: Path, overrides: list[str] | None):
    from lorakit.recipe.loader import load_recipe  # pydantic and yaml: not for `lorakit --help`

    return load_recipe(recipe_path, overrides or [])


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorakit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks for unexpected errors.")] = False,
) -> None:
    """Fine-tune language models with LoRA and QLoRA from one YAML recipe."""
    _state["debug"] = debug


@app.command()
def validate(recipe: RecipeArg, set_: SetOpt = None, json_out: JsonOpt = False,
             offline: Annotated[bool, typer.Option(
                 "--schema-only", help="Check the schema only (no files, no model).")] = False) -> None:
    """Check a recipe: schema, files, model config and target modules. Loads no weights."""
    from lorakit.validate import validate_recipe  # the command's module: loaded when it runs

    def body():
        r = _load(recipe, set_)
        report = {"ok": True, "recipe": str(recipe), "checks": []} if offline else validate_recipe(r)
        if json_out:
            _print_json(report)
            return
        out = console()
        for check in report["checks"]:
            out.print(f"  ok  {check}", highlight=False)
        for warning in report.get("warnings", []):
            out.print(f"  [yellow]warning[/]  {warning}", highlight=False)
        out.print(f"{recipe}: valid", highlight=False)

    _run(body, json_mode=json_out)


@app.command()
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory.")] = False,
    resume: Annotated[Optional[str], typer.Option(
        "--resume", metavar="[RUN_DIR]",
        help="Continue from the latest complete checkpoint (of RUN_DIR, or of the recipe's output dir); "
             "a finished run continues when the recipe asks for more steps.")] = None,
    gpus: Annotated[Optional[int], typer.Option("--gpus", min=1, help="Launch on N GPUs through accelerate.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Train an adapter (SFT or GRPO) from a recipe and write the run directory."""
    if gpus and gpus > 1 and not launched():

        def relaunch_body() -> int:
            r = _load(recipe, set_)  # a bad recipe is reported once, before any process starts
            return relaunch(gpus, list(sys.argv[1:]), strategy=r.distributed.strategy)

        raise typer.Exit(_run(relaunch_body, json_mode=json_out))

    def body():
        from lorakit.train.run import run_training  # the command's module: loaded when it runs

        r = _load(recipe, set_)
        try:
            summary = run_training(r, overwrite=overwrite, resume=resume, console=console(), json_mode=json_out)
        except Exception as e:  # under a launcher: say which rank failed
            if not rank_label() or _state["debug"] or isinstance(e, Interrupted):
                raise
            if isinstance(e, LorakitError):
                e.message = f"{rank_label()}: {e.message}"
                raise
            text = f"{type(e).__name__}: {e}"
            if not json_out:  # _run prints with rich markup: library messages carry [/path:line] tags
                text = escape(text)
            raise LorakitError(f"{rank_label()}: {text}", exit_code=EXIT_RUNTIME,
                               hint="run with --debug for the traceback") from e
        if json_out and is_main_process():  # one summary document, from rank 0
            _print_json({"ok": True, **summary})

    _run(body, json_mode=json_out)


@app.command()
def estimate(
    recipe: RecipeArg,
    set_: SetOpt = None,
    budget: Annotated[Optional[str], typer.Option("--budget", help="Memory budget, e.g. 24GiB or 80GB.")] = None,
    gpu: Annotated[Optional[str], typer.Option("--gpu", help="A GPU name (e.g. rtx4090, a100-80gb, h100).")] = None,
    device: Annotated[str, typer.Option("--device", help="Device to estimate for: cuda or cpu.")] = "cuda",
    gpus: Annotated[Optional[int], typer.Option("--gpus", min=1, help="Memory per GPU of a run on N GPUs.")] = None,
    strategy: Annotated[Optional[str], typer.Option(
        "--strategy", help="ddp or fsdp (default: the recipe's distributed.strategy); needs --gpus.")] = None,
    max_context: Annotated[bool, typer.Option(
        "--max-context", help="The longest row (data.max_length) that trains at batch 1 on --gpu, --budget or "
                              "this machine's GPU.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Exact parameter counts and a memory forecast for a recipe, without loading weights."""

    def body():
        from lorakit.estimate.memory import parse_bytes  # the command's module: loaded when it runs
        from lorakit.estimate.strategy import estimate_with_strategy

        if device not in ("cuda", "cpu"):
            raise LorakitError(f"--device: expected cuda or cpu (got {device!r})")
        r = _load(recipe, set_)
        budget_bytes = parse_bytes(budget) if budget else None
        if max_context:
            return _max_context(r, budget_bytes, gpu, device, json_out)
        result = estimate_with_strategy(r, device=device, budget_bytes=budget_bytes, gpu=gpu, strategy=strategy,
                                        gpus=gpus)
        if json_out:
            _print_json(result)
            return
        from lorakit.estimate.view import render  # the command's module: loaded when it runs

        render(result, console())

    _run(body, json_mode=json_out)


def _max_context(r, budget_bytes: int | None, gpu: str | None, device: str, json_out: bool) -> None:
    """`estimate --max-context`: the longest row at batch 1 within the budget, --gpu's memory or the local GPU's."""
    from lorakit.estimate.max_context import longest_row  # the command's module: loaded when it runs
    from lorakit.estimate.memory import gpu_bytes
    from lorakit.estimate.view import human, levers

    where = f"a {human(budget_bytes)} budget" if budget_bytes else None
    host: float | None = float("inf")  # another machine's host memory: not known, not a limit
    if budget_bytes is None and gpu:
        budget_bytes, where = gpu_bytes(gpu), gpu
    if budget_bytes is None:
        host = None  # this machine's GPU: its host memory bounds offloaded checkpoints
        from lorakit.runtime.device import local_gpu  # torch: only when no GPU was named

        found = local_gpu()
        if found is None:
            raise LorakitError("--max-context: no GPU here to fit; name one with --gpu (e.g. h100) or give --budget",
                               field="--gpu")
        where, budget_bytes = found
    result = {**longest_row(r, budget_bytes=budget_bytes, device=device, host_bytes=host), "gpu": where}
    if json_out:
        _print_json(result)
        return
    c = console()
    if not result["max_context"]:
        c.print(f"No row fits {where} at batch 1: the weights and state alone exceed it.", highlight=False)
        return
    on = ", ".join(levers(result["setup"]))
    more = " (the search's limit)" if result["limited_by"] == "search limit" else ""
    pinned = result["memory"]["host_checkpoints_bytes"]
    c.print(f"Longest row at batch 1 on {where} ({human(result['budget_bytes'])}): "
            f"{result['max_context']:,} tokens{more}; estimated peak {human(result['peak_bytes'])}"
            + (f" with {on}" if on else "")
            + (f"; the layer inputs take {human(pinned)} of pinned host memory" if pinned else "") + ".",
            highlight=False)


def _print_report(report: dict, done: str, json_out: bool = False) -> None:
    """The report's figures, one per line; per-module tables as their five worst entries. With --json: the report
    as one JSON document with "ok": true."""
    if json_out:
        _print_json({"ok": True, **report})
        return
    c = console()
    for key, value in report.items():
        if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
            worst = sorted(value.items(), key=lambda kv: kv[1], reverse=key == "relative_error")[:5]
            shown = ", ".join(f"{m} {v:.4g}" for m, v in worst)
            c.print(f"  {key} (worst {len(worst)} of {len(value)}): {shown}", highlight=False)
        else:
            c.print(f"  {key}: {value}", highlight=False)
    c.print(done, highlight=False)


AdapterOpt = Annotated[Optional[list[str]], typer.Option(
    "--adapter", "-a", metavar="DIR[:WEIGHT]",
    help="An adapter or run directory and its weight (default 1); repeatable.")]


@app.command()
def merge(
    source: Annotated[Optional[Path], typer.Argument(
        help="A run directory or an adapter directory (or give --adapter).", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the merged checkpoint.")] = ...,
    adapter: AdapterOpt = None,
    base: Annotated[Optional[str], typer.Option("--base", help="Base model (default: from the adapter).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="bf16, fp16 or fp32.")] = "bf16",
    verify: Annotated[bool, typer.Option("--verify", help="Compare logits of merged vs base+adapter.")] = False,
    from_quantized: Annotated[bool, typer.Option(
        "--from-quantized", help="Merge into the 4-bit-rounded base weights the adapter was trained on.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Fold an adapter (or several, weighted) into its base, shard by shard, and write a standard checkpoint."""

    def body():
        if dtype not in ("bf16", "fp16", "fp32"):
            raise LorakitError(f"--dtype: expected bf16, fp16 or fp32 (got {dtype!r})")
        kw = dict(base=base, dtype=dtype, verify=verify, overwrite=overwrite, from_quantized=from_quantized)
        if adapter:
            from lorakit.adapters.compose import merge_weighted, parse_weighted

            specs = ([(str(source), 1.0)] if source else []) + [parse_weighted(a) for a in adapter]
            report = merge_weighted(specs, out, **kw)
        elif source is None:
            raise LorakitError("merge: give a run or adapter directory, or --adapter DIR[:WEIGHT]")
        else:
            from lorakit.merge import merge_adapter  # the command's module: loaded when it runs

            report = merge_adapter(source, out, **kw)
        _print_report(report, f"merged checkpoint written to {out}", json_out)

    _run(body, json_mode=json_out)


@app.command()
def compose(
    adapters: Annotated[list[Path], typer.Argument(help="Adapter or run directories of one base.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the new adapter.")],
    weights: Annotated[Optional[str], typer.Option(
        "--weights", help="One weight per adapter, e.g. 0.7,0.3 (default 1 each).")] = None,
    method: Annotated[str, typer.Option("--method", help="cat (exact sum), svd, linear, ties or dare_ties.")] = "cat",
    rank: Annotated[Optional[int], typer.Option("--rank", help="svd: the rank kept (default: the inputs' largest).")] \
        = None,
    density: Annotated[Optional[float], typer.Option(
        "--density", help="ties, dare_ties: the fraction of entries kept.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="dare_ties: the seed of the random masks.")] = 0,
    base: Annotated[Optional[str], typer.Option("--base", help="The base (dare_ties draws in its module order).")] \
        = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Combine adapters of the same base into one peft adapter (peft's add_weighted_adapter methods)."""

    def body():
        from lorakit.adapters.compose import compose as run_compose  # the command's module: loaded when it runs
        from lorakit.adapters.compose import parse_weights

        report = run_compose(adapters, out, weights=parse_weights(weights, len(adapters)), method=method, rank=rank,
                             density=density, seed=seed, base=base, overwrite=overwrite)
        _print_report(report, f"adapter written to {out}", json_out)

    _run(body, json_mode=json_out)


@app.command()
def unmerge(
    merged: Annotated[Path, typer.Argument(help="A merged checkpoint directory.", show_default=False)],
    adapter: AdapterOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the base checkpoint.")] = ...,
    base: Annotated[Optional[Path], typer.Option(
        "--base", help="The real base: for --verify, and for tensors the adapter replaced (modules_to_save).")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Compare every tensor with --base.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Take merged adapters off a checkpoint again, shard by shard: the base back."""

    def body():
        from lorakit.adapters.compose import parse_weighted  # the command's module: loaded when it runs
        from lorakit.adapters.unmerge import unmerge_weighted

        if not adapter:
            raise LorakitError("--adapter: name the adapter that was merged (DIR[:WEIGHT], repeatable)")
        report = unmerge_weighted(merged, [parse_weighted(a) for a in adapter], out, base=base, verify=verify,
                                  overwrite=overwrite)
        _print_report(report, f"unmerged checkpoint written to {out}", json_out)

    _run(body, json_mode=json_out)


@app.command()
def extract(
    base: Annotated[Path, typer.Option("--base", help="The base model directory.")],
    tuned: Annotated[Path, typer.Option("--tuned", help="The fine-tuned model directory.")],
    rank: Annotated[int, typer.Option("--rank", "-r", help="The adapter's rank.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the adapter.")],
    targets: Annotated[Optional[list[str]], typer.Option(
        "--targets", help="Linear module names, comma-separated or repeated (default: all-linear).")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Compare logits of base+adapter with --tuned.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output directory.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """A LoRA adapter approximating tuned - base by truncated SVD, module by module."""

    def body():
        from lorakit.adapters.extract import extract as run_extract  # the command's module: loaded when it runs

        names = [t for item in targets or [] for t in item.split(",") if t]
        report = run_extract(base, tuned, out, rank=rank, targets=names or None, verify=verify, overwrite=overwrite)
        _print_report(report, f"adapter written to {out}", json_out)

    _run(body, json_mode=json_out)


@app.command()
def export(
    source: Annotated[Path, typer.Argument(help="A run, adapter or merged checkpoint directory.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The .gguf file to write (a Modelfile goes beside it).")],
    format_: Annotated[str, typer.Option("--format", help="Output format: gguf.")] = "gguf",
    quant: Annotated[str, typer.Option("--quant", help="f16, bf16, q8_0 or q4_0.")] = "q8_0",
    base: Annotated[Optional[str], typer.Option("--base", help="An adapter's base (default: the run's).")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Load it back and compare logits and token ids.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a model for llama.cpp / Ollama (GGUF), merging the adapter on the fly; nothing to compile."""

    def body():
        if format_ not in FORMATS:
            raise LorakitError(f"--format: expected one of {', '.join(FORMATS)} (got {format_!r})")
        if quant not in QUANTS:
            raise LorakitError(f"--quant: expected one of {', '.join(QUANTS)} (got {quant!r})")
        from lorakit.export.gguf_writer import export_gguf  # torch, transformers: only for this command

        report = export_gguf(source, out, quant=quant, base=base, verify=verify, overwrite=overwrite)
        _print_report(report, f"GGUF written to {out}; run it with: ollama create NAME -f {report['modelfile']}",
                      json_out)

    _run(body, json_mode=json_out)


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(
        help="A run directory written by `lorakit train`; with --adapter also a base model.", show_default=False)],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The user message.")],
    base_only: Annotated[bool, typer.Option(
        "--base-only", help="Answer with the base model, without the adapter.")] = False,
    adapter: Annotated[Optional[list[Path]], typer.Option(
        "--adapter", "-a", help="Answer with each adapter in turn, the base loaded once (repeatable).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 128,
) -> None:
    """Answer a prompt with the trained adapter (or the base alone) to see what training changed."""

    def body():
        if adapter:
            from lorakit.generate import generate_many  # the command's module: loaded when it runs

            for label, text in generate_many(run_dir, adapter, prompt, base_only=base_only,
                                             max_new_tokens=max_new_tokens):
                typer.echo(f"== {label} ==\n{text}")
            return
        from lorakit.generate import generate as run_generate  # the command's module: loaded when it runs

        typer.echo(run_generate(run_dir, prompt, base_only=base_only, max_new_tokens=max_new_tokens))

    _run(body)


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the recipe.")] = Path("recipe.yaml"),
    preset: Annotated[str, typer.Option("--preset", help="Starting point: see `lorakit recipes`.")] = "quickstart",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Write a commented starter recipe."""

    def body():
        from lorakit.recipe.shipped import write_starter  # the command's module: loaded when it runs

        write_starter(preset, path, force=force)
        console().print(f"wrote {path} (preset {preset}); check it with: lorakit validate {path}", highlight=False)

    _run(body)


@app.command()
def schema(out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Write to a file instead of stdout.")] = None) -> None:
    """Print the recipe's JSON Schema (for editors' YAML language servers)."""

    def body():
        from lorakit.recipe.loader import json_schema

        text = json.dumps(json_schema(), indent=2) + "\n"
        if out and out.is_dir():
            raise LorakitError(f"--out {out}: is a directory; give the name of the file to write")
        if out:
            atomic_write_text(out, text)
        else:
            sys.stdout.write(text)

    _run(body)


@app.command()
def recipes(json_out: JsonOpt = False) -> None:
    """List the shipped recipes, one line each."""

    def body():
        from lorakit.recipe.shipped import list_recipes  # the command's module: loaded when it runs

        items = list_recipes()
        if json_out:
            _print_json([{"name": n, "path": str(p), "description": d} for n, p, d in items])
            return
        table = Table("recipe", "description", box=None, show_edge=False)
        for name, _, description in items:
            table.add_row(name, description)
        console().print(table)

    _run(body, json_mode=json_out)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point (also `python -m lorakit`); `argv` defaults to the process's arguments."""
    args = normalize_argv(sys.argv[1:] if argv is None else argv)  # --resume's optional value (cli_argv)
    if "--debug" not in args[: args.index("--") if "--" in args else len(args)]:
        quiet_from_start()
    if ci_mode():  # before any library imports tqdm, which reads its switch then
        progress_bars_off()
    app(args=args)


if __name__ == "__main__":
    main()
