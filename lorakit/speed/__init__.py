"""GPU speed levers behind a small facade: `plan` decides them once per run as a frozen `Plan`, `describe` says
them in one line. The modules that apply them (checkpointing, fused_lora, layer_graphs, ...) import torch and
are imported by the model and training code that needs them; this package's import stays torch-free."""

from lorakit.speed.planning import Plan, describe, needs_estimate, plan

__all__ = ["Plan", "describe", "needs_estimate", "plan"]
