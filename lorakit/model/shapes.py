"""Model shapes without weights: config.json -> modules and their dimensions.

`load_shape` finds a model's config.json (a local directory, the offline table of known models, or
the Hugging Face hub cache) and turns it into a `ModelShape`: per-layer Linear modules with
(in_features, out_features, bias), norms and embeddings, exactly as transformers builds them, so
that parameter counts are exact. The decoder families lorakit knows (Llama, Mistral, Qwen2/3,
Gemma 1/2/3, Phi-3) are described by formulas here: no torch or transformers import, answers in
milliseconds. Any other architecture falls back to building the model on torch's meta device
(slower, needs transformers, still no weights).

`check_targets` resolves the recipe's `lora.targets` against a shape (peft semantics).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.model import registry
from lorakit.model.known_models import known_config

# Linear modules of a decoder block, in the order a printout shows them; and their parent module.
ATTN_PARENT = "self_attn"
MLP_PARENT = "mlp"
_EXTRA_TARGETS = ("lm_head", "embed_tokens")  # legal LoRA targets outside the blocks


@dataclass
class ModelShape:
    """Everything about a model that parameter and memory estimates need, from its config alone."""

    model_type: str
    architecture: str
    num_layers: int
    hidden: int
    vocab: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool
    # per decoder layer: name -> (in_features, out_features, has_bias); every layer is alike
    linears: dict[str, tuple[int, int, bool]] = field(default_factory=dict)
    # per decoder layer: norm name -> number of weights (RMSNorm: one vector)
    norms: dict[str, int] = field(default_factory=dict)
    final_norm: int = 0
    parents: dict[str, str] = field(default_factory=dict)  # linear name -> parent (self_attn / mlp)
    source: str = ""  # where the config came from
    config: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ names
    def linear_module_names(self) -> list[str]:
        """The real names of the Linear modules inside each decoder block (q_proj, ...)."""
        return list(self.linears)

    def module_path(self, name: str, layer: int) -> str:
        return f"model.layers.{layer}.{self.parents.get(name, '')}.{name}".replace("..", ".")

    # ------------------------------------------------------------------ counts
    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        """Parameters of lm_head that are not shared with the input embeddings."""
        return 0 if self.tie_word_embeddings else self.vocab * self.hidden

    def linear_params(self, name: str) -> tuple[int, int]:
        """(weight, bias) parameter counts of one layer's Linear `name`."""
        i, o, b = self.linears[name]
        return i * o, (o if b else 0)

    @property
    def layer_linear_weights(self) -> int:
        return sum(i * o for i, o, _ in self.linears.values())

    @property
    def layer_biases(self) -> int:
        return sum(o for _, o, b in self.linears.values() if b)

    @property
    def layer_norm_params(self) -> int:
        return sum(self.norms.values())

    @property
    def layer_params(self) -> int:
        return self.layer_linear_weights + self.layer_biases + self.layer_norm_params

    @property
    def total_params(self) -> int:
        """Parameters of the base model (tied embeddings counted once), as `model.parameters()` has them."""
        return self.embed_params + self.lm_head_params + self.num_layers * self.layer_params + self.final_norm

    def module_params(self, name: str) -> int:
        """Parameters of ONE module called `name` (a block Linear/norm, lm_head, embed_tokens, norm)."""
        if name in self.linears:
            w, b = self.linear_params(name)
            return w + b
        if name in self.norms:
            return self.norms[name]
        if name == "lm_head" or name == "embed_tokens":
            return self.vocab * self.hidden
        if name == "norm":
            return self.final_norm
        raise KeyError(name)

    def module_count(self, name: str) -> int:
        """How many modules are called `name` in the model."""
        if name in self.linears or name in self.norms:
            return self.num_layers
        if name in ("lm_head", "embed_tokens", "norm"):
            return 1
        return 0

    def summary(self) -> dict:
        return {"model_type": self.model_type, "architecture": self.architecture, "num_layers": self.num_layers,
                "hidden": self.hidden, "intermediate": self.intermediate, "vocab": self.vocab,
                "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "tie_word_embeddings": self.tie_word_embeddings, "total_params": self.total_params,
                "source": self.source}


# ---------------------------------------------------------------------------------------------------
# config.json -> ModelShape
# ---------------------------------------------------------------------------------------------------

_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"}
_GEMMA_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")


def _get(cfg: dict, key: str, default=None):
    v = cfg.get(key)
    return default if v is None else v


def shape_from_config(cfg: dict, source: str = "") -> ModelShape:
    """Build the shape of a decoder-only model from its config.json values."""
    if cfg.get("model_type") == "gemma3" and isinstance(cfg.get("text_config"), dict):
        cfg = {"model_type": "gemma3_text", **cfg["text_config"],
               "tie_word_embeddings": cfg.get("tie_word_embeddings", True)}
    mt = str(cfg.get("model_type", "")).lower()
    if mt not in _LLAMA_LIKE:
        return _shape_from_meta(cfg, source)
    try:
        h = int(cfg["hidden_size"])
        inter = int(cfg["intermediate_size"])
        n = int(cfg["num_hidden_layers"])
        nh = int(cfg["num_attention_heads"])
        vocab = int(cfg["vocab_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise LorakitError(f"{source or 'config.json'}: missing or invalid field {e} in the model config",
                           field="base_model") from None
    nkv = int(_get(cfg, "num_key_value_heads", nh))
    hd = int(_get(cfg, "head_dim", h // nh))
    default_tie = mt.startswith("gemma")
    tie = bool(_get(cfg, "tie_word_embeddings", default_tie))
    attn_bias = bool(_get(cfg, "attention_bias", False))
    mlp_bias = bool(_get(cfg, "mlp_bias", False))
    q_out, kv_out = nh * hd, nkv * hd
    if mt == "phi3":
        linears = {"qkv_proj": (h, q_out + 2 * kv_out, False), "o_proj": (q_out, h, False),
                   "gate_up_proj": (h, 2 * inter, False), "down_proj": (inter, h, False)}
    else:
        qkv_bias = True if mt == "qwen2" else attn_bias
        o_bias = False if mt == "qwen2" else attn_bias
        if mt in ("mistral",) or mt.startswith("gemma"):
            mlp_bias = False
        linears = {"q_proj": (h, q_out, qkv_bias), "k_proj": (h, kv_out, qkv_bias), "v_proj": (h, kv_out, qkv_bias),
                   "o_proj": (q_out, h, o_bias), "gate_proj": (h, inter, mlp_bias), "up_proj": (h, inter, mlp_bias),
                   "down_proj": (inter, h, mlp_bias)}
    parents = {k: (MLP_PARENT if k in ("gate_proj", "up_proj", "down_proj", "gate_up_proj") else ATTN_PARENT)
               for k in linears}
    if mt in ("gemma2", "gemma3_text"):
        norms = {k: h for k in _GEMMA_NORMS}
    else:
        norms = {"input_layernorm": h, "post_attention_layernorm": h}
    if mt in ("qwen3", "gemma3_text"):
        norms.update({"q_norm": hd, "k_norm": hd})
        parents.update({"q_norm": ATTN_PARENT, "k_norm": ATTN_PARENT})
    arch = (cfg.get("architectures") or [f"{mt}ForCausalLM"])[0]
    return ModelShape(model_type=mt, architecture=arch, num_layers=n, hidden=h, vocab=vocab, intermediate=inter,
                      num_heads=nh, num_kv_heads=nkv, head_dim=hd, tie_word_embeddings=tie, linears=linears,
                      norms=norms, final_norm=h, parents=parents, source=source, config=dict(cfg))


def _shape_from_meta(cfg: dict, source: str) -> ModelShape:
    """Any other architecture: build it on the meta device (no weights) and read its modules."""
    mt = cfg.get("model_type")
    try:  # torch-free at import: the estimate and validate read this module; only this fallback needs them
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        conf = AutoConfig.for_model(mt, **{k: v for k, v in cfg.items() if k != "model_type"})
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(conf)
    except Exception as e:  # noqa: BLE001 - any failure means: we cannot describe this architecture
        raise LorakitError(f"{source or 'config.json'}: architecture {mt!r} is not one lorakit knows, and "
                           f"transformers could not build it ({str(e).splitlines()[0][:200]})",
                           field="base_model") from None
    linears: dict[str, tuple[int, int, bool]] = {}
    norms: dict[str, int] = {}
    parents: dict[str, str] = {}
    layers = None
    for name, mod in model.named_modules():
        parts = name.split(".")
        if "layers" not in parts and "h" not in parts:
            continue
        idx = parts.index("layers") if "layers" in parts else parts.index("h")
        if idx + 1 >= len(parts) or not parts[idx + 1].isdigit() or parts[idx + 1] != "0" or len(parts) <= idx + 2:
            continue
        short = parts[-1]
        if isinstance(mod, torch.nn.Linear):
            linears[short] = (mod.in_features, mod.out_features, mod.bias is not None)
            parents[short] = ".".join(parts[idx + 2:-1])
        elif not list(mod.children()) and any(True for _ in mod.parameters(recurse=False)):
            norms[short] = sum(p.numel() for p in mod.parameters(recurse=False))
        layers = ".".join(parts[:idx + 1])
    if not linears:
        raise LorakitError(f"{source}: could not find decoder layers in architecture {mt!r}", field="base_model")
    n = int(cfg.get("num_hidden_layers") or cfg.get("n_layer") or 0)
    emb = model.get_input_embeddings()
    vocab, h = emb.weight.shape
    tie = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb.weight
    total = sum(p.numel() for p in model.parameters())
    shape = ModelShape(model_type=str(mt), architecture=type(model).__name__, num_layers=n, hidden=h, vocab=vocab,
                       intermediate=int(cfg.get("intermediate_size") or 4 * h),
                       num_heads=int(cfg.get("num_attention_heads") or 1),
                       num_kv_heads=int(cfg.get("num_key_value_heads") or cfg.get("num_attention_heads") or 1),
                       head_dim=int(cfg.get("head_dim") or h // int(cfg.get("num_attention_heads") or 1)),
                       tie_word_embeddings=tie, linears=linears, norms=norms, parents=parents, source=source,
                       config=dict(cfg))
    shape.final_norm = max(0, total - (shape.total_params - shape.final_norm))  # whatever is outside the blocks
    del layers
    return shape


# ---------------------------------------------------------------------------------------------------
# Finding config.json
# ---------------------------------------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = Path(os.environ.get("HF_HOME") or Path("~/.cache/huggingface").expanduser()).expanduser()
    return home / "hub"


def _cached_config(hub: str, revision: str | None) -> Path | None:
    repo = hub_cache_dir() / ("models--" + hub.replace("/", "--"))
    if not repo.is_dir():
        return None
    snaps = repo / "snapshots"
    if revision:
        ref = repo / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else revision
        cand = snaps / commit / "config.json"
        return cand if cand.is_file() else None
    main = repo / "refs" / "main"
    if main.is_file():
        cand = snaps / main.read_text().strip() / "config.json"
        if cand.is_file():
            return cand
    found = sorted(snaps.glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    return found[0] if found else None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LorakitError(f"{path}: cannot read the model config ({e})", field="base_model") from None
    if not isinstance(data, dict):
        raise LorakitError(f"{path}: expected a JSON object", field="base_model")
    return data


def _looks_like_path(name: str) -> bool:
    """A name a hub id can't be: starts with . / ~, or has more than one slash."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def load_config(base_model: str, *, revision: str | None = None) -> tuple[dict, str]:
    """(config dict, where it came from) for an alias, a local directory or a hub id. Never downloads."""
    local = Path(base_model).expanduser()
    if local.is_dir():
        cfg = local / "config.json"
        if not cfg.is_file():
            raise LorakitError(f"base_model {base_model}: the directory has no config.json", field="base_model",
                               hint="point base_model at a directory saved with save_pretrained()")
        return _read_json(cfg), str(cfg)
    if _looks_like_path(base_model):
        raise LorakitError(f"base_model {base_model}: directory not found ({local.resolve()})", field="base_model",
                           hint="a relative path is taken from the working directory, then from the recipe's "
                                "directory; check the path")
    hub = registry.hub_id(base_model)
    if not revision or revision == "main":
        known = known_config(hub)
        if known is not None:
            return known, f"known shape of {hub}"
    cached = _cached_config(hub, revision)
    if cached is not None:
        return _read_json(cached), str(cached)
    if revision:
        known = known_config(hub)
        if known is not None:
            return known, f"known shape of {hub} (revision {revision} assumed to have the same shape)"
    raise LorakitError(
        f"base_model {base_model}: its shape is unknown offline (not a local directory, not in lorakit's "
        f"table of known models, not in the hub cache {hub_cache_dir()})", field="base_model",
        hint=f"download its config once (`hf download {hub} config.json`), or give a local directory with "
             "config.json; see `lorakit recipes` for the aliases known offline")


def load_shape(base_model: str, *, revision: str | None = None, trust_remote_code: bool = False) -> ModelShape:
    """The shape of `base_model` from its config.json only: no weights, no network."""
    cfg, source = load_config(base_model, revision=revision)
    if cfg.get("auto_map") and not trust_remote_code and str(cfg.get("model_type", "")).lower() not in _LLAMA_LIKE:
        raise LorakitError(f"base_model {base_model}: its architecture needs the repository's own code",
                           field="model.trust_remote_code", hint="set model.trust_remote_code: true if you trust it")
    return shape_from_config(cfg, source)


# ---------------------------------------------------------------------------------------------------
# LoRA targets
# ---------------------------------------------------------------------------------------------------


def check_targets(shape: ModelShape, lora_section) -> list[str]:
    """Resolve `lora.targets` to real module names of `shape` (peft semantics); check `lora.layers`."""
    targets = lora_section.targets
    real = shape.linear_module_names()
    if targets == "all-linear":
        out = list(real)
    elif isinstance(targets, str):
        candidates = registry.TARGET_PRESETS.get(targets)
        if candidates is None:
            raise LorakitError(f"unknown target preset {targets!r} (presets: all-linear, "
                               f"{', '.join(registry.TARGET_PRESETS)})", field="lora.targets")
        out = [n for n in real if n in candidates]
        if not out:
            raise LorakitError(f"preset {targets!r} matches no module of {shape.architecture} "
                               f"(its Linear modules: {', '.join(real)})", field="lora.targets")
    else:
        out = []
        unknown = []
        for t in targets:
            name = t.split(".")[-1]
            if name in real or name in _EXTRA_TARGETS:
                if name not in out:
                    out.append(name)
            else:
                unknown.append(t)
        if unknown:
            raise LorakitError(
                f"{', '.join(map(repr, unknown))}: no such module in {shape.architecture}; its Linear modules are "
                f"{', '.join(real)} (also lm_head, embed_tokens)", field="lora.targets",
                hint="use these names, or a preset: all-linear, attention, mlp, qkv")
    layers = getattr(lora_section, "layers", None)
    if layers:
        bad = sorted(i for i in layers if i >= shape.num_layers)
        if bad:
            raise LorakitError(f"layer indices {bad} do not exist: {shape.architecture} has {shape.num_layers} "
                               f"layers (0..{shape.num_layers - 1})", field="lora.layers")
    return out


def check_checkpoint_layers(shape: ModelShape, train_section) -> None:
    """`train.gradient_checkpointing: K` must not ask for more layers than the model has."""
    k = train_section.gradient_checkpointing
    if isinstance(k, int) and not isinstance(k, bool) and k > shape.num_layers:
        raise LorakitError(f"{shape.architecture} has {shape.num_layers} decoder layers; cannot checkpoint the "
                           f"first {k}", field="train.gradient_checkpointing",
                           hint=f"use a number from 0 to {shape.num_layers}, or true for every layer")


def check_modules_to_save(shape: ModelShape, names: list[str]) -> list[str]:
    """Names in `lora.modules_to_save` must be modules of the model."""
    known = set(shape.linears) | set(shape.norms) | {"lm_head", "embed_tokens", "norm"}
    bad = [n for n in names if n.split(".")[-1] not in known]
    if bad:
        raise LorakitError(f"{', '.join(map(repr, bad))}: no such module in {shape.architecture} "
                           f"(e.g. lm_head, embed_tokens, norm, {', '.join(shape.linears)})",
                           field="lora.modules_to_save")
    return [n.split(".")[-1] for n in names]


__all__ = [
    "ModelShape",
    "check_checkpoint_layers",
    "check_modules_to_save",
    "check_targets",
    "hub_cache_dir",
    "load_config",
    "load_shape",
    "shape_from_config",
]
