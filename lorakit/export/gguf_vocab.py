"""The tokenizer of a GGUF file, from a Hugging Face fast tokenizer as transformers runs it (its class may
rebuild the pipeline tokenizer.json describes), written as llama.cpp reads it back.

Two vocabularies, told apart by the BPE model's `byte_fallback`:
  * byte-level BPE (GPT-2 style: Llama-3, SmolLM2, Qwen2): `tokenizer.ggml.model = gpt2`, the tokens in
    their byte-level spelling, the merges, and `tokenizer.ggml.pre` naming the pre-tokenizer's split rule,
    which llama.cpp implements by name. The name is found by comparing the tokenizer's Split regex with
    the table transformers' GGUF loader uses to read the file back (so both ends agree by construction).
  * SentencePiece BPE (Llama-2, Mistral): `tokenizer.ggml.model = llama`, the pieces with "▁" for spaces
    and scores, which llama.cpp's SPM tokenizer merges by. A converted SentencePiece vocabulary lists its
    pieces in merge order, so a piece's score is minus its id (0 for bytes and special tokens).
Added tokens are CONTROL when special, USER_DEFINED otherwise; ids past the tokenizer up to the model's
vocabulary size are `[PADn]` UNUSED rows, as llama.cpp's converter writes them. Special token ids, the
add-BOS/EOS flags and the chat template come through gguf's own `SpecialVocab`; the add flags are then
set from what the tokenizer actually does to a text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
from transformers import AutoTokenizer
from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

from lorakit.errors import LorakitError

_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# tokenizer.ggml.pre names (llama.cpp's) -> the names transformers' loader gives the same split regex
_SPLITS = {"llama-bpe": "llama-bpe", "qwen2": "qwen2"}


def _backend(tok_dir: Path):
    """The tokenizer as transformers runs it (its class may rebuild tokenizer.json's pipeline), and its JSON."""
    try:
        tok = AutoTokenizer.from_pretrained(tok_dir)
    except Exception as e:  # noqa: BLE001 - any loading failure is the same problem for the user
        raise LorakitError(f"{tok_dir}: transformers cannot load the tokenizer ({type(e).__name__}: {e})") from None
    if not getattr(tok, "is_fast", False):
        raise LorakitError(f"{tok_dir}: not a fast (tokenizers) tokenizer; GGUF export reads its vocabulary from it")
    return tok, json.loads(tok.backend_tokenizer.to_str())


def _steps(node: dict | None) -> list[dict]:
    if not node:
        return []
    return node.get("pretokenizers", []) if node.get("type") == "Sequence" else [node]


def pre_tokenizer_name(tj: dict) -> str:
    """llama.cpp's name for the byte-level pre-tokenizer of `tokenizer.json` (dict)."""
    steps = _steps(tj.get("pre_tokenizer"))
    splits = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    if len(splits) == 1:
        for name, key in _SPLITS.items():
            if splits[0] == GGUF_PRE_TOKENIZER_SPLITS[key]:
                return name
    elif not splits and any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps):
        digits = any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps)
        return "smollm" if digits else "gpt-2"
    raise LorakitError(f"the tokenizer's pre-tokenizer ({json.dumps(tj.get('pre_tokenizer'))[:300]}) is not one "
                       f"lorakit can name for llama.cpp (known: GPT-2, SmolLM, {', '.join(_SPLITS)})",
                       hint="llama.cpp implements each split rule by name; a wrong one would tokenize differently")


def _prefix_space(tj: dict) -> bool:
    """Whether a SentencePiece tokenizer puts "▁" before the first word (Metaspace or a Prepend normalizer)."""
    meta = [s for s in _steps(tj.get("pre_tokenizer")) if s.get("type") == "Metaspace"]
    if meta:
        return meta[0].get("prepend_scheme", "always") != "never" and meta[0].get("add_prefix_space", True)
    norm = tj.get("normalizer") or {}
    norms = norm.get("normalizers", [norm])
    return any(n.get("type") == "Prepend" for n in norms)


def add_tokenizer(writer: gguf.GGUFWriter, tok_dir: Path, n_vocab: int) -> dict:
    """Write the tokenizer of `tok_dir` into `writer` for a model with `n_vocab` embedding rows.

    Args:
        writer: the GGUF writer, before its header is written.
        tok_dir: a directory with tokenizer.json (and tokenizer_config.json / chat_template.jinja).
        n_vocab: the model's vocabulary size (rows of the embedding matrix).

    Returns:
        model (gpt2 or llama), pre (the pre-tokenizer name, gpt2 only), tokens, merges, eos (token text)
        and chat_template (or None).
    """
    tok, tj = _backend(tok_dir)
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise LorakitError(f"{tok_dir}: a {model.get('type')} tokenizer; GGUF export writes "
                           "BPE vocabularies (byte-level or SentencePiece) only")
    spm = bool(model.get("byte_fallback"))
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    by_id = {i: t for t, i in model["vocab"].items()} | {i: a["content"] for i, a in added.items()}
    if max(by_id) >= n_vocab:
        raise LorakitError(f"the tokenizer has token id {max(by_id)}, the model only {n_vocab} embedding rows",
                           hint="is the tokenizer the one this model was trained with?")
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        score, kind = 0.0, gguf.TokenType.NORMAL
        if text is None:
            text, kind = f"[PAD{i}]", gguf.TokenType.UNUSED
        elif i in added:
            kind = gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
            if spm and text == model.get("unk_token"):
                kind = gguf.TokenType.UNKNOWN
        elif spm and _BYTE.fullmatch(text):
            kind = gguf.TokenType.BYTE
        elif spm:
            score = -float(i)
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    pre = None
    if spm:
        writer.add_add_space_prefix(_prefix_space(tj))
    else:
        writer.add_tokenizer_pre(pre := pre_tokenizer_name(tj))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if spm:
        writer.add_token_scores(scores)

    special = gguf.SpecialVocab(tok_dir, load_merges=not spm, n_vocab=n_vocab)
    ids = tok("Hello")["input_ids"]
    special.add_special_token["bos"] = bool(ids) and tok.bos_token_id is not None and ids[0] == tok.bos_token_id
    special.add_special_token["eos"] = bool(ids) and tok.eos_token_id is not None and ids[-1] == tok.eos_token_id
    for kind in ("bos", "eos", "unk", "pad"):  # what the tokenizer says wins over config.json's ids
        token_id = getattr(tok, f"{kind}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < n_vocab:
            special.special_token_ids[kind] = token_id
    if not spm and not special.merges:
        raise LorakitError(f"{tok_dir}: the byte-level tokenizer has no merges")
    special.add_to_gguf(writer, quiet=True)
    template = special.chat_template if isinstance(special.chat_template, str) else None
    return {"model": "llama" if spm else "gpt2", "pre": pre, "tokens": n_vocab, "merges": len(special.merges),
            "eos": tok.eos_token, "chat_template": template}
