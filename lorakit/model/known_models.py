"""Offline shapes of common base models: their config.json values, keyed by hub id.

`estimate` and `validate` must answer with no network and no hub cache, so the fields that fix a
model's shape (as the repository's config.json has them) are kept here. Only shape fields are kept;
`shapes.load_shape` reads these dicts exactly as it reads a real config.json. Gemma 3 (a vision +
text model) is described by its text part, the one LoRA fine-tuning of the language model adapts.
"""

from __future__ import annotations


def _llama(hidden, inter, layers, heads, kv, vocab, tie, head_dim=None, **extra) -> dict:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
           "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tie,
           "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "rms_norm_eps": 1e-5}
    if head_dim:
        cfg["head_dim"] = head_dim
    cfg.update(extra)
    return cfg


def _qwen2(hidden, inter, layers, heads, kv, vocab, tie) -> dict:
    return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tie,
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 32768}


_LLAMA2_7B = _llama(4096, 11008, 32, 32, 32, 32000, False, max_position_embeddings=4096)
_LLAMA32_1B = _llama(2048, 8192, 16, 32, 8, 128256, True, head_dim=64, max_position_embeddings=131072)
_LLAMA32_3B = _llama(3072, 8192, 28, 24, 8, 128256, True, head_dim=128, max_position_embeddings=131072)
_LLAMA31_8B = _llama(4096, 14336, 32, 32, 8, 128256, False, head_dim=128, max_position_embeddings=131072)
_MISTRAL_7B = {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_size": 4096,
               "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32768, "tie_word_embeddings": False,
               "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 32768}
_QWEN3_8B = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_size": 4096,
             "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
             "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False,
             "attention_bias": False, "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 40960}
_GEMMA2_9B = {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "hidden_size": 3584,
              "intermediate_size": 14336, "num_hidden_layers": 42, "num_attention_heads": 16,
              "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000, "tie_word_embeddings": True,
              "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "max_position_embeddings": 8192}
_GEMMA3_4B = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "hidden_size": 2560,
              "intermediate_size": 10240, "num_hidden_layers": 34, "num_attention_heads": 8,
              "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 262208, "tie_word_embeddings": True,
              "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "max_position_embeddings": 131072}
_PHI3_MINI = {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "hidden_size": 3072,
              "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": 32064, "tie_word_embeddings": False,
              "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 4096}
_SMOLLM2_135M = _llama(576, 1536, 30, 9, 3, 49152, True, max_position_embeddings=8192)
_SMOLLM2_360M = _llama(960, 2560, 32, 15, 5, 49152, True, max_position_embeddings=8192)
_SMOLLM2_1_7B = _llama(2048, 8192, 24, 32, 32, 49152, True, max_position_embeddings=8192)

KNOWN_CONFIGS: dict[str, dict] = {
    "meta-llama/Llama-2-7b-hf": _LLAMA2_7B,
    "meta-llama/Llama-2-7b-chat-hf": _LLAMA2_7B,
    "meta-llama/Llama-3.2-1B": _LLAMA32_1B,
    "meta-llama/Llama-3.2-1B-Instruct": _LLAMA32_1B,
    "meta-llama/Llama-3.2-3B": _LLAMA32_3B,
    "meta-llama/Llama-3.2-3B-Instruct": _LLAMA32_3B,
    "meta-llama/Llama-3.1-8B": _LLAMA31_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA31_8B,
    "meta-llama/Meta-Llama-3.1-8B": _LLAMA31_8B,
    "meta-llama/Meta-Llama-3.1-8B-Instruct": _LLAMA31_8B,
    "meta-llama/Meta-Llama-3-8B": _LLAMA31_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA31_8B,
    "mistralai/Mistral-7B-v0.3": _MISTRAL_7B,
    "mistralai/Mistral-7B-Instruct-v0.3": _MISTRAL_7B,
    "Qwen/Qwen2.5-0.5B": _qwen2(896, 4864, 24, 14, 2, 151936, True),
    "Qwen/Qwen2.5-0.5B-Instruct": _qwen2(896, 4864, 24, 14, 2, 151936, True),
    "Qwen/Qwen2.5-1.5B": _qwen2(1536, 8960, 28, 12, 2, 151936, True),
    "Qwen/Qwen2.5-1.5B-Instruct": _qwen2(1536, 8960, 28, 12, 2, 151936, True),
    "Qwen/Qwen2.5-7B": _qwen2(3584, 18944, 28, 28, 4, 152064, False),
    "Qwen/Qwen2.5-7B-Instruct": _qwen2(3584, 18944, 28, 28, 4, 152064, False),
    "Qwen/Qwen3-8B": _QWEN3_8B,
    "Qwen/Qwen3-8B-Base": _QWEN3_8B,
    "google/gemma-2-9b": _GEMMA2_9B,
    "google/gemma-2-9b-it": _GEMMA2_9B,
    "google/gemma-3-4b-pt": _GEMMA3_4B,
    "google/gemma-3-4b-it": _GEMMA3_4B,
    "microsoft/Phi-3-mini-4k-instruct": _PHI3_MINI,
    "microsoft/Phi-3-mini-128k-instruct": {**_PHI3_MINI, "max_position_embeddings": 131072},
    "HuggingFaceTB/SmolLM2-135M": _SMOLLM2_135M,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M,
    "HuggingFaceTB/SmolLM2-360M": _SMOLLM2_360M,
    "HuggingFaceTB/SmolLM2-360M-Instruct": _SMOLLM2_360M,
    "HuggingFaceTB/SmolLM2-1.7B": _SMOLLM2_1_7B,
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": _SMOLLM2_1_7B,
}

_BY_LOWER = {k.lower(): k for k in KNOWN_CONFIGS}


def known_config(hub_id: str) -> dict | None:
    """A copy of the known config.json values for `hub_id` (case-insensitive), or None."""
    key = _BY_LOWER.get(hub_id.strip().lower())
    return dict(KNOWN_CONFIGS[key]) if key else None


def known_ids() -> list[str]:
    return sorted(KNOWN_CONFIGS)
