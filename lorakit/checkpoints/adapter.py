"""The adapter being merged: where it lives (a run directory or a peft adapter directory), the base it names,
and its tensors grouped per base module as `Edit`s with their scale (alpha/r, alpha/sqrt(r) with rsLoRA, per-module
rank and alpha patterns). Reading is strict: an adapter option lorakit cannot merge, or a lora_A without its
lora_B, is an error rather than a silently different model."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

PREFIX = "base_model.model."
UNSUPPORTED = ("use_qalora", "alora_invocation_tokens", "arrow_config", "use_bdlora", "trainable_token_indices",
               "target_parameters", "velora_config", "monteclora_config", "kasa_config", "mica")


@dataclass
class Source:
    adapter_dir: Path
    run_dir: Path | None
    recipe: dict | None
    config: dict


def find_source(source: str | Path) -> Source:
    """A run directory (adapter/ + recipe.yaml) or an adapter directory."""
    src = Path(source).expanduser()
    if not src.is_dir():
        raise LorakitError(f"{src}: no such directory", hint="pass a run directory or an adapter directory")
    run_dir, adapter = None, src
    if not (src / "adapter_config.json").is_file() and (src / "adapter" / "adapter_config.json").is_file():
        run_dir, adapter = src, src / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise LorakitError(f"{src}: no adapter_config.json here or in {src / 'adapter'}",
                           hint="pass a run directory written by `lorakit train` or a peft adapter directory")
    if not (adapter / "adapter_model.safetensors").is_file():
        raise LorakitError(f"{adapter}: no adapter_model.safetensors",
                           hint="lorakit merges safetensors adapters only (save with safe_serialization=True)")
    try:
        config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LorakitError(f"{adapter / 'adapter_config.json'}: not valid JSON ({e})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise LorakitError(f"{adapter}: peft_type {config.get('peft_type')!r} is not LoRA")
    bad = [k for k in UNSUPPORTED if config.get(k)]
    if bad:
        raise LorakitError(f"{adapter}: adapter options lorakit merge does not support: {', '.join(bad)}")
    return Source(adapter, run_dir, _read_recipe(run_dir), config)


def _read_recipe(run_dir: Path | None) -> dict | None:
    if run_dir is None or not (run_dir / "recipe.yaml").is_file():
        return None
    import yaml

    try:
        doc = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise LorakitError(f"{run_dir / 'recipe.yaml'}: cannot read the resolved recipe ({e})") from None
    return doc if isinstance(doc, dict) else None


def resolve_base(base: str | None, src: Source) -> tuple[Path, str]:
    """The base directory and the name the user knows it by."""
    name = base or (src.recipe or {}).get("base_model") or src.config.get("base_model_name_or_path")
    if not name:
        raise LorakitError(f"{src.adapter_dir}: the adapter does not name its base model", hint="pass --base")
    path = Path(str(name)).expanduser()
    if not path.is_dir():
        try:
            from lorakit.model.load import resolve_base_dir
        except ImportError:
            raise LorakitError(f"base model {name!r}: not a local directory", hint="pass --base DIR") from None
        revision = ((src.recipe or {}).get("model") or {}).get("revision")
        path = Path(resolve_base_dir(str(name), revision=revision))
    if not (path / "config.json").is_file():
        raise LorakitError(f"base model {name!r}: {path} has no config.json", hint="pass --base DIR")
    return path, str(name)


@dataclass
class Edit:
    """What the adapter does to one module of the base."""

    A: Any = None  # lora_A (Linear) or lora_embedding_A
    B: Any = None
    bias: Any = None  # lora_B.bias
    magnitude: Any = None  # DoRA
    embedding: bool = False
    scale: float = 1.0
    replace: dict = field(default_factory=dict)  # "weight"/"bias" -> tensor (modules_to_save, base_layer)


_LORA_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias",
    ".lora_embedding_A": "A", ".lora_embedding_B": "B",
    ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",
}


def _classify(key: str) -> tuple[str, str]:
    """(module, role) of an adapter key; role is A/B/bias/magnitude/emb-A/emb-B or 'replace:<param>'."""
    k = key.removeprefix(PREFIX)
    k = re.sub(r"\.modules_to_save\.[^.]+\.", ".", k)
    for suffix, role in _LORA_SUFFIXES.items():
        if k.endswith(suffix):
            return k[: -len(suffix)], ("emb-" + role if "embedding" in suffix else role)
    module, _, param = k.rpartition(".")
    return module.removesuffix(".base_layer"), "replace:" + param


def _scale(module: str, cfg: dict, r_shape: int) -> float:
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), cfg.get("r") or r_shape)
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), cfg.get("lora_alpha", r))
    if r != r_shape:
        r = r_shape  # the saved tensors are the truth; configs edited by hand can lie
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def parse_adapter(src: Source) -> dict[str, Edit]:
    """Module name (as in the base checkpoint) -> its Edit."""
    from safetensors.torch import load_file

    tensors = load_file(src.adapter_dir / "adapter_model.safetensors")
    edits: dict[str, Edit] = {}
    for key, t in tensors.items():
        module, role = _classify(key)
        e = edits.setdefault(module, Edit())
        if role.startswith("replace:"):
            e.replace[role.split(":", 1)[1]] = t
        else:
            e.embedding = e.embedding or role.startswith("emb-")
            setattr(e, role.removeprefix("emb-"), t)
    for module, e in edits.items():
        if (e.A is None) != (e.B is None):
            raise LorakitError(f"{src.adapter_dir}: {module} has lora_{'A' if e.A is not None else 'B'} "
                               "but not its pair; the adapter file is incomplete")
        if (e.bias is not None or e.magnitude is not None) and e.A is None:
            raise LorakitError(f"{src.adapter_dir}: {module} has a LoRA bias or magnitude but no lora_A/B")
        if e.A is not None:
            e.scale = _scale(module, src.config, e.A.shape[0])
    return edits
