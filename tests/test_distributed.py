"""Beyond one GPU, as far as one CPU host allows (issue 9).

- rank helpers, rank-0-only run directory and progress, the launcher command of `--gpus N`;
- two real processes on this host over gloo (`lorakit train --gpus 2`: accelerate -> torchrun), the
  same code path DDP takes on GPUs; and a failure on rank 1 only, which must fail the launch and name
  the rank;
- the per-GPU memory estimate of DDP and FSDP;
- the launcher configs (parsed by accelerate itself) and the SLURM script (run with stub commands).
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import write_jsonl
from typer.testing import CliRunner

from lorakit.cli import app

ROOT = Path(__file__).resolve().parent.parent
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "ACCELERATE_USE_FSDP", "GROUP_WORLD_SIZE")


@pytest.fixture
def single(monkeypatch):
    """A process started without a launcher."""
    for key in LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


@pytest.fixture
def rank1(single):
    """The environment torchrun gives the second of two processes."""
    single.setenv("RANK", "1")
    single.setenv("LOCAL_RANK", "1")
    single.setenv("WORLD_SIZE", "2")
    return single


# ---------------------------------------------------------------------------------------------------
# Rank helpers, rank-0-only writing and printing
# ---------------------------------------------------------------------------------------------------


def test_rank_helpers_read_the_launcher_environment(single):
    from lorakit.runtime import distributed as d

    single.setattr(d, "_accelerate_type", lambda: None)  # no Trainer has set accelerate up (yet)
    assert (d.rank(), d.world_size(), d.is_main_process(), d.launched(), d.rank_label()) == (0, 1, True, False, "")
    assert d.strategy() == "single"
    single.setenv("RANK", "1")
    single.setenv("LOCAL_RANK", "1")
    single.setenv("WORLD_SIZE", "2")
    assert (d.rank(), d.local_rank(), d.world_size(), d.is_main_process(), d.launched()) == (1, 1, 2, False, True)
    assert d.rank_label() == "rank 1/2" and d.strategy() == "ddp"
    single.setenv("ACCELERATE_USE_FSDP", "true")
    assert d.strategy() == "fsdp"
    # once accelerate has settled, its answer counts (on CPU it has no FSDP: the run is DDP over gloo)
    for kind, name in (("MULTI_CPU", "ddp"), ("MULTI_GPU", "ddp"), ("FSDP", "fsdp"), ("DEEPSPEED", "deepspeed")):
        single.setattr(d, "_accelerate_type", lambda kind=kind: kind)
        assert d.strategy() == name
    d.wait_for_everyone()  # no process group: a no-op, not a hang


def test_run_dir_is_written_by_rank_0_only(tmp_path, rank1):
    from lorakit.train.run_dir import RUNNING, RunDir

    run = RunDir(tmp_path / "run")
    assert run.main is False
    run.check_new(overwrite=False)
    run.begin("name: x\n")
    run.set_state(RUNNING)
    run.write_json("summary.json", {"a": 1})
    run.write_text("note.txt", "x")
    run.truncate_metrics(3)
    assert not run.path.exists()  # nothing at all was written

    # rank 0 marked the directory running: rank 1 must neither call it a rival nor remove it
    main = RunDir(tmp_path / "run", main=True)
    main.begin("name: x\n")
    main.write_json("summary.json", {"a": 1})
    run.check_new(overwrite=False)
    run.check_resumable()
    run.replace_old()
    assert json.loads(main.summary_file.read_text()) == {"a": 1} and main.state == RUNNING


def test_progress_is_silent_off_rank_0(tmp_path, rank1):
    from rich.console import Console
    from transformers import TrainerControl, TrainerState

    from lorakit.train.progress import ProgressCallback

    buf = io.StringIO()
    cb = ProgressCallback(tmp_path / "metrics.jsonl", console=Console(file=buf, width=200), plain=True)
    state = TrainerState(max_steps=4, global_step=0)
    cb.on_train_begin(None, state, TrainerControl())
    state.global_step, state.num_input_tokens_seen = 1, 100
    cb.on_log(None, state, TrainerControl(), logs={"loss": 2.5, "learning_rate": 1e-4})
    cb.on_train_end(None, state, TrainerControl())
    assert buf.getvalue() == "" and not (tmp_path / "metrics.jsonl").exists()
    assert cb.last_loss == 2.5  # the numbers are still kept


# ---------------------------------------------------------------------------------------------------
# `lorakit train --gpus N`: the launcher command
# ---------------------------------------------------------------------------------------------------


def _parse_launch(cmd: list[str]):
    """accelerate's own parser on the command (proves every flag exists and takes its value)."""
    from accelerate.commands.launch import launch_command_parser

    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    return launch_command_parser().parse_args(cmd[3:])


def test_launch_command_for_ddp_and_fsdp():
    from lorakit.runtime.launch import FSDP_FLAGS, launch_command

    argv = ["train", "r.yaml", "--gpus", "2", "--set", "lora.r=8", "--gpus=2", "--json"]
    ddp = launch_command(2, argv)
    args = _parse_launch(ddp)
    assert args.multi_gpu and not args.use_fsdp and args.num_processes == 2 and args.num_machines == 1
    assert args.mixed_precision == "no"  # precision is the recipe's, not the launcher's
    assert args.main_process_port == 0  # a free port, found by accelerate
    assert args.module and args.training_script == "lorakit"
    assert args.training_script_args == ["train", "r.yaml", "--set", "lora.r=8", "--json"]  # no --gpus

    fsdp = launch_command(4, argv, strategy="fsdp")
    args = _parse_launch(fsdp)
    assert args.use_fsdp and not args.multi_gpu and args.num_processes == 4
    assert (args.fsdp_version, args.fsdp_auto_wrap_policy, args.fsdp_activation_checkpointing) == (
        "2", "TRANSFORMER_BASED_WRAP", "false")
    # the flags are the command-line twin of the shipped FSDP config
    cfg = yaml.safe_load((ROOT / "configs" / "accelerate-fsdp-qlora.yaml").read_text())["fsdp_config"]
    assert {k: str(v).lower() for k, v in cfg.items()} == {k: v.lower() for k, v in FSDP_FLAGS.items()}

    multi = _parse_launch(launch_command(16, ["train", "r.yaml"], num_machines=2, machine_rank=1,
                                         main_process_ip="10.0.0.1", main_process_port=29555))
    assert (multi.num_machines, multi.machine_rank, multi.main_process_ip, multi.main_process_port) == (
        2, 1, "10.0.0.1", 29555)
    cfg_cmd = launch_command(2, ["train", "r.yaml"], "configs/accelerate-ddp.yaml")
    assert _parse_launch(cfg_cmd).config_file == "configs/accelerate-ddp.yaml" and "--multi_gpu" not in cfg_cmd
    with pytest.raises(ValueError):
        launch_command(2, argv, strategy="zero3")


def _recipe(path: Path, **extra) -> Path:
    doc = {"base_model": "smollm2-135m-instruct", "data": {"path": "d.jsonl"}, **extra}
    path.write_text(yaml.safe_dump(doc))
    return path


def test_train_gpus_hands_over_to_the_launcher(tmp_path, single):
    import lorakit.runtime.launch

    calls = []
    single.setattr(lorakit.runtime.launch.subprocess, "call", lambda cmd: calls.append(cmd) or 7)
    recipe = _recipe(tmp_path / "r.yaml", distributed={"strategy": "fsdp"})
    argv = ["train", str(recipe), "--gpus", "2", "--overwrite"]
    single.setattr(sys, "argv", ["lorakit", *argv])
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 7, r.output  # the launcher's exit code is the command's
    (cmd,) = calls
    args = _parse_launch(cmd)
    assert args.use_fsdp and args.num_processes == 2  # the recipe's distributed.strategy
    assert args.training_script_args == ["train", str(recipe), "--overwrite"]

    # a bad recipe is reported once, by this process, and nothing is launched
    bad = tmp_path / "bad.yaml"
    bad.write_text("base_model: x\nlora: {r: 0}\ndata: {path: d.jsonl}\n")
    single.setattr(sys, "argv", ["lorakit", "train", str(bad), "--gpus", "2"])
    r = CliRunner().invoke(app, ["train", str(bad), "--gpus", "2"])
    assert r.exit_code == 2 and len(calls) == 1 and "lora.r" in r.output


def test_a_launched_process_trains_instead_of_relaunching(tmp_path, rank1):
    import lorakit.runtime.launch
    import lorakit.train.run

    rank1.setattr(lorakit.runtime.launch.subprocess, "call", lambda cmd: pytest.fail("relaunched"))
    rank1.setattr(lorakit.train.run, "run_training", lambda *a, **k: {"steps": 2})
    recipe = _recipe(tmp_path / "r.yaml")
    r = CliRunner().invoke(app, ["train", str(recipe), "--gpus", "2", "--json"])
    assert r.exit_code == 0 and r.stdout == ""  # rank 1 trains; only rank 0 prints the JSON summary


def test_a_failing_rank_names_itself(tmp_path, rank1):
    import lorakit.train.run
    from lorakit.errors import LorakitError

    recipe = _recipe(tmp_path / "r.yaml")

    def boom(*a, **k):
        raise RuntimeError("gloo says [/tmp/x.cc:1] closed")

    rank1.setattr(lorakit.train.run, "run_training", boom)
    r = CliRunner().invoke(app, ["train", str(recipe)])
    assert r.exit_code == 1 and "rank 1/2: RuntimeError: gloo says" in r.stderr, r.output

    def bad_input(*a, **k):
        raise LorakitError("data.path: file not found")

    rank1.setattr(lorakit.train.run, "run_training", bad_input)
    r = CliRunner().invoke(app, ["train", str(recipe), "--json"])
    assert r.exit_code == 2 and json.loads(r.stdout)["error"] == "rank 1/2: data.path: file not found"


# ---------------------------------------------------------------------------------------------------
# Two processes on this host over gloo: the DDP code path, for real
# ---------------------------------------------------------------------------------------------------

ROWS = [{"messages": [{"role": "user", "content": f"{n} lives in {c}."},
                      {"role": "assistant", "content": json.dumps({"name": n, "city": c})}]}
        for n in ("Ada", "Bo", "Cy", "Dee") for c in ("Paris", "Oslo", "Rome", "Kyiv")]


def _two_process_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(CI="true", OMP_NUM_THREADS="1")
    return env


def _run_two(tmp_path: Path, doc: dict, *extra: str) -> subprocess.CompletedProcess:
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    lorakit = Path(sys.executable).with_name("lorakit")
    return subprocess.run([str(lorakit), "train", "r.yaml", "--gpus", "2", *extra], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=_two_process_env())


def _doc(base: Path, **sections) -> dict:
    doc = {"name": "ddp", "base_model": str(base), "quantization": {"bits": "none"},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
           "data": {"path": "train.jsonl", "max_length": 64},
           "train": {"max_steps": 3, "lr": 1e-3, "batch_size": 2, "logging_steps": 1, "seed": 0},
           "output": {"dir": "runs/ddp"}}
    doc.update(sections)
    return doc


@pytest.mark.slow
def test_two_processes_train_one_run_written_by_rank_0(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    write_jsonl(tmp_path / "train.jsonl", ROWS)
    p = _run_two(tmp_path, _doc(tiny_model_dir), "--json")
    assert p.returncode == 0, p.stderr[-4000:]

    # one run directory, complete, nothing half-written
    assert [x.name for x in (tmp_path / "runs").iterdir()] == ["ddp"]
    run = tmp_path / "runs" / "ddp"
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*"))
    assert json.loads((run / "state.json").read_text())["state"] == "finished"

    # stdout: exactly one JSON document (rank 1 printed none), the same summary as on disk
    summary = json.loads(p.stdout)
    on_disk = json.loads((run / "summary.json").read_text())
    assert summary["ok"] and summary["steps"] == on_disk["steps"] == 3
    assert on_disk["distributed"] == {"world_size": 2, "strategy": "ddp", "backend": "gloo", "num_machines": 1}
    # each optimizer step saw 2 rows per rank: 3 steps x 2 x 2 ranks = 12 of 16 rows
    assert on_disk["epochs"] == 0.75

    # metrics.jsonl: one writer, one whole line per event
    lines = (run / "metrics.jsonl").read_text().splitlines()
    events = [json.loads(x) for x in lines]
    assert [e["step"] for e in events if "loss" in e] == [1, 2, 3]
    assert len(lines) == len(set(lines)) == 4  # 3 steps + the train summary event

    # progress printed once, plain (CI=true, no TTY)
    err = p.stderr
    steps = [x for x in err.splitlines() if x.startswith("step=")]
    assert len(steps) == 3 and all(re.fullmatch(r"step=\d/3 loss=\d+\.\d{4} lr=\S+ tok/s=\d+ eta=\S+", s)
                                   for s in steps), steps
    assert err.count("finished 3 steps") == 1 and err.count("device: cpu") == 1
    assert "\x1b[" not in err + p.stdout and "\r" not in err + p.stdout

    # the adapter trained: LoRA B starts at exactly zero
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    b = [t for k, t in adapter.items() if "lora_B" in k]
    assert len(b) == 4 and all(t.abs().sum() > 0 for t in b)


@pytest.mark.slow
def test_a_failure_on_rank_1_fails_the_launch_and_names_the_rank(tmp_path, tiny_model_dir):
    """A user metric that raises on rank 1 only: the launch exits non-zero, rank 1's message is shown."""
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "eval.jsonl", ROWS[:2])
    (tmp_path / "metric.py").write_text(
        "import os\n\n\ndef fn(completions, **kwargs):\n"
        "    if os.environ['RANK'] == '1':\n        raise RuntimeError('boom on rank 1')\n"
        "    return [0.0] * len(completions)\n")
    doc = _doc(tiny_model_dir, evaluate={"metrics": [{"fn": "metric.py:fn"}], "samples": 2, "max_new_tokens": 2})
    doc["data"]["eval"] = "eval.jsonl"
    p = _run_two(tmp_path, doc)
    assert p.returncode != 0
    assert re.search(r"error: rank 1/2: .*boom on rank 1", p.stderr), p.stderr[-4000:]
    assert json.loads((tmp_path / "runs" / "ddp" / "state.json").read_text())["state"] == "failed"
    assert not (tmp_path / "runs" / "ddp" / "adapter").exists()


# ---------------------------------------------------------------------------------------------------
# Memory per GPU: DDP and FSDP
# ---------------------------------------------------------------------------------------------------


def _8b():
    from lorakit.recipe.loader import load_recipe

    return load_recipe(ROOT / "recipes" / "qlora-llama-3.1-8b.yaml")


def test_fsdp_shards_the_static_terms_by_n():
    from lorakit.estimate.memory import CONSTANTS
    from lorakit.estimate.strategy import estimate_with_strategy

    recipe = _8b()  # distributed.strategy: ddp; under FSDP the run's optimizer is torch AdamW (on the device)
    fsdp_recipe = recipe.model_copy(update={"distributed": recipe.distributed.model_copy(update={"strategy": "fsdp"})})
    assert estimate_with_strategy(recipe)["setup"]["optimizer"] == "paged_adamw_8bit"
    one = estimate_with_strategy(fsdp_recipe)
    assert one["strategy"] is None and one["setup"]["optimizer"] == "adamw_torch"
    m1 = one["memory"]
    assert not m1["optimizer_paged"]
    for n in (2, 4, 8):
        r = estimate_with_strategy(recipe, gpus=n, strategy="fsdp")  # --strategy fsdp on a ddp recipe
        assert r == estimate_with_strategy(fsdp_recipe, gpus=n)
        m = r["memory"]
        for key in ("weights_bytes", "adapter_bytes", "gradients_bytes", "optimizer_bytes"):
            assert m[key] == -(-m1[key] // n), key
        for key in ("activations_bytes", "logits_bytes"):  # the micro-batch per GPU is unchanged
            assert m[key] == m1[key]
        w, layers = m1["weights"], one["model"]["num_layers"]
        gathered = int((2 * (w["quantized_bytes"] // layers) + w["unquantized_bytes"]) * (1 - 1 / n))
        assert m["fsdp_gathered_bytes"] == gathered and m["ddp_buckets_bytes"] == 0
        # device bytes: sharded weights/adapter/grads/optimizer states + gathered units
        saved = sum(m1[k] - m[k] for k in ("weights_bytes", "adapter_bytes", "gradients_bytes", "optimizer_bytes"))
        assert m["allocated_peak_bytes"] == m1["allocated_peak_bytes"] - saved + gathered
        expected = m1["peak_bytes"] + int((gathered - saved) * (1 + CONSTANTS.fragmentation))
        assert abs(m["peak_bytes"] - expected) <= 1
        assert r["strategy"]["single_gpu"] == m1 and r["strategy"]["global_batch"] == 2 * 8 * n
    assert estimate_with_strategy(recipe, gpus=8, strategy="fsdp")["memory"]["peak_bytes"] < \
        estimate_with_strategy(recipe, gpus=2, strategy="fsdp")["memory"]["peak_bytes"] < m1["peak_bytes"]


def test_ddp_adds_the_gradient_buckets():
    from lorakit.estimate.memory import CONSTANTS
    from lorakit.estimate.strategy import estimate_with_strategy

    recipe = _8b()
    m1 = estimate_with_strategy(recipe)["memory"]
    r = estimate_with_strategy(recipe, gpus=4)  # the recipe's strategy: ddp
    m = r["memory"]
    assert r["strategy"]["name"] == "ddp"
    for key in ("weights_bytes", "adapter_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes"):
        assert m[key] == m1[key]  # a full replica per GPU
    assert m["ddp_buckets_bytes"] == m1["gradients_bytes"] > 0  # gradient memory x2
    assert m["peak_bytes"] == m1["peak_bytes"] + int(m1["gradients_bytes"] * (1 + CONSTANTS.fragmentation))
    assert estimate_with_strategy(recipe, gpus=2)["memory"]["peak_bytes"] == m["peak_bytes"]  # not by N


def test_strategy_verdict_uses_the_per_gpu_peak():
    from lorakit.estimate.memory import parse_bytes
    from lorakit.estimate.strategy import estimate_with_strategy

    recipe = _8b()
    single = estimate_with_strategy(recipe, budget_bytes=parse_bytes("16GiB"))
    fsdp = estimate_with_strategy(recipe, budget_bytes=parse_bytes("16GiB"), gpus=4, strategy="fsdp")
    ddp = estimate_with_strategy(recipe, budget_bytes=parse_bytes("16GiB"), gpus=4, strategy="ddp")
    for r in (single, fsdp, ddp):
        v = r["verdict"]
        assert v["budget_bytes"] == parse_bytes("16GiB")
        assert v["headroom_bytes"] == v["budget_bytes"] - r["memory"]["peak_bytes"]
        assert v["fits"] == (r["memory"]["peak_bytes"] <= v["budget_bytes"])
    assert fsdp["verdict"]["max_batch"] >= single["verdict"]["max_batch"] >= ddp["verdict"]["max_batch"]
    assert fsdp["verdict"]["headroom_bytes"] > single["verdict"]["headroom_bytes"] > ddp["verdict"]["headroom_bytes"]
    # FSDP-QLoRA needs the 4-bit weights stored in the compute dtype
    assert any("quant_storage" in w for w in fsdp["strategy"]["warnings"])
    assert not any("bitsandbytes" in w for w in fsdp["strategy"]["warnings"])  # auto optimizer: torch AdamW
    bnb = recipe.model_copy(update={"train": recipe.train.model_copy(update={"optimizer": "paged_adamw_8bit"})})
    warned = estimate_with_strategy(bnb, gpus=4, strategy="fsdp")["strategy"]["warnings"]
    assert any("paged_adamw_8bit (bitsandbytes) cannot update FSDP" in w for w in warned)


def test_a_launcher_asking_for_fsdp_sets_the_optimizer(monkeypatch):
    """`accelerate launch --use_fsdp` on a ddp recipe: torch AdamW, and a bitsandbytes one is a clean error."""
    import lorakit.runtime.device
    import lorakit.runtime.distributed
    from lorakit.errors import LorakitError
    from lorakit.train.args import run_options as resolved_options

    monkeypatch.setattr(lorakit.runtime.device, "auto_dtype_name", lambda device: "bf16")
    # a launched process before its Trainer exists: no accelerate state yet (an earlier test may have made one)
    monkeypatch.setattr(lorakit.runtime.distributed, "_accelerate_type", lambda: None)
    recipe = _8b()
    assert resolved_options(recipe, "cuda")["optimizer"] == "paged_adamw_8bit"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert resolved_options(recipe, "cuda")["optimizer"] == "adamw_torch"
    bnb = recipe.model_copy(update={"train": recipe.train.model_copy(update={"optimizer": "adamw_8bit"})})
    with pytest.raises(LorakitError) as e:
        resolved_options(bnb, "cuda")
    assert e.value.field == "train.optimizer" and "FSDP" in e.value.message


def test_estimate_cli_strategy_options(tmp_path):
    recipe = str(ROOT / "recipes" / "qlora-llama-3.1-8b.yaml")
    r = CliRunner().invoke(app, ["estimate", recipe, "--gpus", "2", "--strategy", "fsdp", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["strategy"]["name"] == "fsdp" and doc["strategy"]["gpus"] == 2
    r = CliRunner().invoke(app, ["estimate", recipe, "--gpus", "2", "--strategy", "fsdp", "--gpu", "rtx4090"])
    assert r.exit_code == 0 and "per GPU, FSDP over 2 GPUs" in r.stdout and "FSDP gathered params" in r.stdout
    r = CliRunner().invoke(app, ["estimate", recipe, "--strategy", "fsdp"])
    assert r.exit_code == 2 and "--gpus" in r.output
    r = CliRunner().invoke(app, ["estimate", recipe, "--gpus", "2", "--strategy", "zero"])
    assert r.exit_code == 2 and "ddp or fsdp" in r.output


# ---------------------------------------------------------------------------------------------------
# Launcher configs and the SLURM script
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["single-gpu", "ddp", "fsdp-qlora"])
def test_accelerate_configs_load_in_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "configs" / f"accelerate-{name}.yaml"))  # unknown keys raise
    assert cfg.mixed_precision == "no"  # the recipe's train.precision decides
    expected = {"single-gpu": "NO", "ddp": "MULTI_GPU", "fsdp-qlora": "FSDP"}[name]
    assert str(cfg.distributed_type).rsplit(".", 1)[-1] == expected
    if name == "fsdp-qlora":
        # the Trainer refuses FSDP's activation checkpointing together with its own
        assert cfg.fsdp_config["fsdp_activation_checkpointing"] is False


SLURM = ROOT / "scripts" / "slurm_train.sh"


def test_slurm_script_is_valid_bash_and_names_existing_configs():
    assert subprocess.run(["bash", "-n", str(SLURM)], capture_output=True).returncode == 0
    text = SLURM.read_text()
    configs = re.findall(r"configs/[\w.-]+\.yaml", text)
    assert configs and all((ROOT / c).is_file() for c in configs)
    assert os.access(SLURM, os.X_OK)


def test_slurm_script_launches_one_accelerate_per_node(tmp_path):
    """srun/scontrol/accelerate replaced by stubs: the command each node would run, for node 1 of 2."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "accelerate.args"
    stubs = {
        # srun: drop its own options, run the task once as node 1
        "srun": 'while [[ "$1" == --* ]]; do shift; done; SLURM_NODEID=1 exec "$@"',
        "scontrol": 'printf "gpu-a17\\ngpu-a18\\n"',
        "accelerate": f'printf "%s\\n" "$@" > {shlex.quote(str(log))}',
    }
    for name, body in stubs.items():
        (bin_ / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_ / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2",
           "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_NODELIST": "gpu-a[17-18]"}
    p = subprocess.run(["bash", str(SLURM), "recipes/qlora-llama-3.1-8b.yaml", "--set", "train.lr=1e-4"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    assert p.returncode == 0, p.stderr
    args = log.read_text().splitlines()
    assert args[0] == "launch"
    args = args[1:]
    from accelerate.commands.launch import launch_command_parser

    parsed = launch_command_parser().parse_args(args)
    assert parsed.config_file == "configs/accelerate-ddp.yaml"
    assert (parsed.num_machines, parsed.num_processes, parsed.machine_rank) == (2, 16, 1)
    assert parsed.main_process_ip == "gpu-a17" and parsed.main_process_port == 20000 + 4242
    assert parsed.module and parsed.training_script == "lorakit"
    assert parsed.training_script_args == ["train", "recipes/qlora-llama-3.1-8b.yaml", "--set", "train.lr=1e-4"]

    # outside SLURM it refuses instead of guessing
    env.pop("SLURM_JOB_ID")
    p = subprocess.run(["bash", str(SLURM), "r.yaml"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert p.returncode == 2 and "sbatch" in p.stderr


@pytest.mark.slow
def test_two_processes_reach_the_single_process_adapter(tmp_path, tiny_model_dir):
    """Data parallel is the same math: 2 processes x 2 rows a step end with the adapter of 1 process x 4 rows
    (the launcher shards each global batch of one shuffled order; the Trainer normalizes the loss over both
    ranks' tokens). fsdp asked for on a CPU runs as ddp, and says so."""
    from safetensors.torch import load_file

    write_jsonl(tmp_path / "train.jsonl", ROWS)
    one = _doc(tiny_model_dir, name="one", output={"dir": "runs/one"})
    one["train"] = {**one["train"], "batch_size": 4}
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(one))
    lorakit = Path(sys.executable).with_name("lorakit")
    p1 = subprocess.run([str(lorakit), "train", "one.yaml"], cwd=tmp_path, capture_output=True, text=True,
                        timeout=300, env=_two_process_env())
    assert p1.returncode == 0, p1.stderr[-4000:]
    p2 = _run_two(tmp_path, _doc(tiny_model_dir, distributed={"strategy": "fsdp"}))
    assert p2.returncode == 0, p2.stderr[-4000:]
    assert "distributed: 2 processes, data parallel (distributed.strategy fsdp needs CUDA GPUs" in p2.stdout + p2.stderr
    a = load_file(tmp_path / "runs" / "one" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "runs" / "ddp" / "adapter" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(a[k].abs().sum() > 0 for k in a if "lora_B" in k)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    losses = [[json.loads(x)["loss"] for x in (tmp_path / "runs" / d / "metrics.jsonl").read_text().splitlines()
               if "loss" in json.loads(x)] for d in ("one", "ddp")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
