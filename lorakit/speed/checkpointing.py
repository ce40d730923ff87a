"""Activation checkpointing of decoder layers: every layer (the Trainer's), the first K, or none; and the model-side
levers of a plan applied after peft wraps the model (host-memory embeddings, CUDA graphs of the checkpointed layers)."""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import TrainingArguments
from transformers.modeling_layers import GradientCheckpointingLayer

from lorakit.errors import LorakitError
from lorakit.speed import host_checkpoints, host_embedding, layer_graphs, tiled_mlp
from lorakit.speed.planning import Plan


def checkpointing_arg_names() -> tuple[str, str]:
    """(flag, kwargs) field names of transformers' TrainingArguments: `activation_checkpointing*` in recent
    releases (the old names are deprecated aliases there), `gradient_checkpointing*` before."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    if "activation_checkpointing" in names:
        return "activation_checkpointing", "activation_checkpointing_kwargs"
    return "gradient_checkpointing", "gradient_checkpointing_kwargs"


def decoder_layers(model: Any) -> list:
    """The repeated decoder blocks (transformers' GradientCheckpointingLayer instances), in order."""
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _unwrap(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def set_checkpointing(model: Any, checkpoint_layers: int | None) -> int:
    """Checkpoint the first `checkpoint_layers` decoder layers (None = all), keep the activations of the rest.
    Returns the number of layers checkpointed."""
    base = _unwrap(model)
    layers = decoder_layers(base)
    k = len(layers) if checkpoint_layers is None else max(0, min(int(checkpoint_layers), len(layers)))
    if k == 0:
        on = getattr(base, "is_activation_checkpointing", None)
        if on is None:
            on = getattr(base, "is_gradient_checkpointing", False)
        if on:
            disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
            disable()
        return 0
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < k
    return k


def apply_to_model(model: Any, p: Plan, recorder: Any = None) -> dict:
    """Apply the model-side levers of plan `p` to a (peft-wrapped) model, after get_peft_model: partial gradient
    checkpointing (every-layer checkpointing is the Trainer's), the input embeddings in host memory, CUDA
    graphs for the checkpointed layers (lorakit.speed.layer_graphs; `recorder` stands in for the GPU's graph
    capture in tests), the checkpointed layers' inputs in host memory (lorakit.speed.host_checkpoints) and the
    MLPs run over slices of the sequence (lorakit.speed.tiled_mlp).

    Returns:
        What was done: `checkpoint_layers` (layers checkpointed here), `tiled_mlp_layers`,
        `offloaded_embedding_bytes`, and
        `not_offloaded` (why) when `auto` planned the embeddings off the GPU but this model cannot have that - its
        layers then run checkpointed without graphs.
    """
    done: dict[str, Any] = {}
    k = p.checkpoint_layers
    if p.gradient_checkpointing and k is not None:
        n = len(decoder_layers(_unwrap(model)))
        if k > n:
            raise LorakitError(f"train.gradient_checkpointing: the model has {n} decoder layers; got {k}",
                               field="train.gradient_checkpointing",
                               hint=f"use a number from 0 to {n}, or true for every layer")
    graphs = p.cuda_graphs  # planned graphs: the Trainer leaves checkpointing to the model
    if p.offload_embeddings:
        why = host_embedding.problem(model)
        if why is None:
            done["offloaded_embedding_bytes"] = host_embedding.offload(model)
        elif p.offload_embeddings_required:
            raise LorakitError(why, field="train.offload_embeddings",
                               hint="set train.offload_embeddings: auto or false")
        else:  # auto: the graphs were chosen on the condition that the embeddings leave the GPU
            graphs = False
            done["not_offloaded"] = why
    if p.tiled_mlp:
        done["tiled_mlp_layers"] = tiled_mlp.enable(decoder_layers(_unwrap(model)))
    if not p.trainer_checkpointing and p.gradient_checkpointing:  # else the Trainer checkpoints (or nobody)
        done["checkpoint_layers"] = set_checkpointing(model, k)
        layers = decoder_layers(_unwrap(model))
        eager = host_checkpoints.reentrant_checkpoint if p.offload_activations else None
        inner = layer_graphs.enable(layers, recorder, eager) if graphs else eager
        if p.offload_activations:
            host_checkpoints.enable(_unwrap(model), layers, inner)
    return done
