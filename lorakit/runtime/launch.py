"""`lorakit train --gpus N`: hand the same command over to accelerate's launcher (one process a GPU).

No home-made launcher: accelerate (torchrun underneath) starts N copies of `python -m lorakit train ...`
with the usual RANK/LOCAL_RANK/WORLD_SIZE environment; each copy sees LOCAL_RANK and does not relaunch.
The recipe's `distributed.strategy` picks the engine:

- ddp  : data parallel, one full (4-bit) replica per GPU; accelerate's --multi_gpu.
- fsdp : FSDP2 shards weights, adapter, gradients and optimizer states over the GPUs; for QLoRA the
         4-bit weights must be stored in a dtype FSDP can shard (quantization.quant_storage: bf16).

The flags below are the command-line twin of configs/accelerate-ddp.yaml and
configs/accelerate-fsdp-qlora.yaml (a test keeps them equal); `config=` uses a config file instead.
Precision is not the launcher's business: the recipe's train.precision sets it in the Trainer, so the
launcher gets `--mixed_precision no` (a launcher bf16 would override a recipe's fp32).
Multi-node: the same command on every node with num_machines / machine_rank / main_process_ip / port
(see scripts/slurm_train.sh).
"""

from __future__ import annotations

import subprocess
import sys

STRATEGIES = ("ddp", "fsdp")

# accelerate launch flags per strategy (mirrors configs/accelerate-*.yaml)
FSDP_FLAGS: dict[str, str] = {
    "fsdp_version": "2",
    "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "fsdp_cpu_ram_efficient_loading": "true",
    "fsdp_offload_params": "false",
    "fsdp_state_dict_type": "SHARDED_STATE_DICT",
    "fsdp_reshard_after_forward": "true",
    # lorakit's train.gradient_checkpointing does the checkpointing; the Trainer refuses both at once
    "fsdp_activation_checkpointing": "false",
}


def strip_gpus(argv: list[str]) -> list[str]:
    """argv without `--gpus N` / `--gpus=N`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            out.append(a)
    return out


def launch_command(gpus: int, argv: list[str], config: str | None = None, *, strategy: str = "ddp",
                   num_machines: int = 1, machine_rank: int = 0, main_process_ip: str | None = None,
                   main_process_port: int | None = None) -> list[str]:
    """The accelerate launch command (an argument list) that runs `lorakit ARGV` on `gpus` processes.

    `gpus` is the total number of processes over all machines. On a machine without CUDA the same
    command runs the processes on CPU over gloo (tests and CI use this: the DDP code path, no GPU).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES} (got {strategy!r})")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(gpus),
           "--num_machines", str(num_machines)]
    if num_machines > 1:
        cmd += ["--machine_rank", str(machine_rank)]
        if main_process_ip:
            cmd += ["--main_process_ip", main_process_ip]
    if main_process_port is None and num_machines == 1:
        main_process_port = 0  # a free port: two jobs on one host do not collide on 29500
    if main_process_port is not None:
        cmd += ["--main_process_port", str(main_process_port)]
    if config:
        cmd += ["--config_file", config]
    else:
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        if gpus > 1 or num_machines > 1:
            if strategy == "fsdp":
                cmd += ["--use_fsdp"]
                for key, value in FSDP_FLAGS.items():
                    cmd += [f"--{key}", value]
            else:
                # torchrun underneath; on a machine without CUDA every process runs on CPU over gloo
                cmd += ["--multi_gpu"]
    return cmd + ["-m", "lorakit", *strip_gpus(argv)]


def relaunch(gpus: int, argv: list[str], *, strategy: str = "ddp", config: str | None = None) -> int:
    """Run the launcher (argument list, never a shell) and return its exit code.

    torchrun stops every rank when one fails and exits non-zero; the failing rank prints its own
    `error: rank i/N: ...` line before that.
    """
    return subprocess.call(launch_command(gpus, argv, config, strategy=strategy))
