"""Tokenizing: rows -> (input_ids, completion_mask), with the chat template, completion-only masks and truncation.

The masks are ours, not TRL's, so that which tokens carry the loss (assistant turns and completions, each turn's
end-of-turn token included) and what truncation drops are counted and testable; TRL's SFTTrainer builds its labels
from `completion_mask`.
"""

from __future__ import annotations

from lorakit.data.formats import (
    RowError,
    alpaca_prompt_text,
    alpaca_user,
    normalize_messages,
    prompt_value,
    string_field,
)
from lorakit.data.sources import Source
from lorakit.errors import LorakitError


class Encoder:
    """Rows -> (input_ids, completion_mask) for one tokenizer."""

    def __init__(self, tokenizer, completion_only: bool = True):
        self.tok = tokenizer
        self.completion_only = completion_only
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.eos = tokenizer.eos_token_id
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
            if getattr(t, "special", False):
                special.add(int(i))
        self.special = special
        self.special_strings = sorted({tokenizer.convert_ids_to_tokens(i) for i in special} - {None}, key=len,
                                      reverse=True)

    # -- helpers ---------------------------------------------------------------------------------
    def ids(self, text: str, special: bool = False) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def render(self, messages: list[dict], gen: bool = False) -> str:
        if not self.has_template:
            raise RowError("the tokenizer has no chat template, so chat rows cannot be rendered "
                           "(set model.chat_template in the recipe)")
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # noqa: BLE001 - jinja raises on roles the template refuses
            raise RowError(f"the chat template rejects this conversation: {str(e).splitlines()[0][:200]}") \
                from None

    def _trim(self, ids: list[int], start: int, end: int) -> int:
        """End of a turn's span without the whitespace the template writes after the end-of-turn token."""
        while end - 1 > start and ids[end - 1] not in self.special and not self.tok.decode([ids[end - 1]]).strip():
            end -= 1
        return end

    # -- chat ------------------------------------------------------------------------------------
    def chat(self, messages: list[dict], first_target: int = 0) -> tuple[list[int], list[int]]:
        full = self.render(messages)
        ids = self.ids(full)
        targets = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first_target]
        spans = self._token_spans(messages, targets, ids)
        if spans is None:
            spans = self._char_spans(messages, targets, full, ids)
        mask = [0] * len(ids)
        for s, e in spans:
            mask[s:e] = [1] * (e - s)
        if spans and self.eos is not None:
            s, e = spans[-1]
            if ids[e - 1] not in self.special:  # the template ends turns with no special token: add EOS
                ids.insert(e, self.eos)
                mask.insert(e, 1)
        if not self.completion_only:
            mask = [1] * len(ids)
        return ids, mask

    def _token_spans(self, messages, targets, ids) -> list[tuple[int, int]] | None:
        """Spans by rendering prefixes: [tokens of messages[:i] + generation prompt, tokens of messages[:i+1])."""
        spans = []
        for i in targets:
            try:
                before = self.ids(self.render(messages[:i], gen=True))
            except RowError:
                return None
            upto = self.ids(self.render(messages[: i + 1]))
            if ids[: len(before)] != before or ids[: len(upto)] != upto or len(upto) <= len(before):
                return None
            if not self.tok.decode(ids[len(before):len(upto)]).lstrip().startswith(
                    messages[i]["content"].strip()[:16].lstrip()):
                return None  # the template ignores add_generation_prompt: the header would be in the span
            spans.append((len(before), self._trim(ids, len(before), len(upto))))
        return spans

    def _char_spans(self, messages, targets, full: str, ids: list[int]) -> list[tuple[int, int]]:
        """Fallback: find each assistant content in the rendered text, map characters to tokens."""
        try:
            offsets = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        except Exception:  # noqa: BLE001 - slow tokenizers have no offsets
            raise RowError("cannot locate the assistant turns in the chat template's output "
                           "(use a fast tokenizer or set data.completion_only: false)") from None
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            content = m["content"]
            at = full.find(content, cursor) if content else -1
            if at < 0:
                if i in targets:
                    raise RowError(f"cannot locate assistant turn {i} in the chat template's output "
                                   "(set data.completion_only: false to train on every token)")
                continue
            cursor = at + len(content)
            if i not in targets:
                continue
            end = cursor
            rest = full[end:]
            stripped = rest.lstrip(" ")
            for sp in self.special_strings:
                if sp and stripped.startswith(sp):
                    end += len(rest) - len(stripped) + len(sp)
                    break
            toks = [k for k, (a, b) in enumerate(offsets) if a < end and b > at]
            if toks:
                spans.append((toks[0], toks[-1] + 1))
        return spans

    # -- other formats ---------------------------------------------------------------------------
    def prompt_completion(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        p = self.ids(prompt, special=True)
        c = self.ids(completion)
        if self.eos is not None and (not c or c[-1] != self.eos):
            c.append(self.eos)
        mask = [0] * len(p) + [1] * len(c) if self.completion_only else [1] * (len(p) + len(c))
        return p + c, mask

    def text(self, text: str) -> tuple[list[int], list[int]]:
        ids = self.ids(text, special=True)
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            ids.append(self.eos)
        return ids, [1] * len(ids)

    def encode(self, row: dict, fmt: str) -> tuple[list[int], list[int]]:
        if fmt == "messages":
            return self.chat(normalize_messages(row.get("messages")))
        if fmt == "alpaca":
            output = string_field(row, "output")
            if self.has_template:
                return self.chat([{"role": "user", "content": alpaca_user(row)},
                                 {"role": "assistant", "content": output}])
            return self.prompt_completion(alpaca_prompt_text(row), output)
        if fmt == "prompt_completion":
            prompt, completion = prompt_value(row), row.get("completion")
            if completion is None:
                raise RowError("missing 'completion'")
            if isinstance(prompt, list):
                if isinstance(completion, str):
                    completion = [{"role": "assistant", "content": completion}]
                else:
                    completion = normalize_messages(completion, "completion")
                return self.chat(prompt + completion, first_target=len(prompt))
            if not isinstance(completion, str):
                raise RowError("the prompt is a string, so the completion must be a string too "
                               f"(got {type(completion).__name__})")
            return self.prompt_completion(prompt, completion)
        if fmt == "text":
            return self.text(string_field(row, "text"))
        raise RowError("format prompt has no completion to learn from; it is for method: grpo "
                       "(for SFT use messages, alpaca, prompt_completion or text)")


def encode_rows(source: Source, idx: list[int], fmt: str, enc: Encoder, max_length: int, too_long: str) -> dict:
    """Encode the rows at `idx`; rows with no token to learn are dropped, rows over `max_length` are truncated
    or dropped (`too_long`), and a truncated row whose completion fell off is dropped. Every drop is counted."""
    ids_out, mask_out, kept = [], [], []
    dropped = {"too_long": 0, "completion_cut": 0, "no_target": 0}
    truncated = 0
    for i, row in source.rows_at(idx):
        try:
            ids, mask = enc.encode(row, fmt)
        except RowError as e:
            raise LorakitError(f"{source.where(i)}: {e}", field="data.path",
                               hint="fix or remove the row (every row needs the same shape)") from None
        if not any(mask[1:]):  # the first token is never a label (each token predicts the next)
            dropped["no_target"] += 1
            continue
        if len(ids) > max_length:
            if too_long == "drop":
                dropped["too_long"] += 1
                continue
            ids, mask = ids[:max_length], mask[:max_length]
            if not any(mask[1:]):
                dropped["completion_cut"] += 1
                continue
            truncated += 1
        ids_out.append(ids)
        mask_out.append(mask)
        kept.append(i)
    return {"input_ids": ids_out, "completion_mask": mask_out, "kept": kept, "truncated": truncated,
            "dropped": dropped, "seen": len(idx)}


def all_dropped_error(res: dict, source: Source, max_length: int, too_long: str, fld: str) -> LorakitError:
    """The error when `encode_rows` kept no row: how many were dropped for which reason, and the fix."""
    d = res["dropped"]
    why = []
    if d["too_long"]:
        why.append(f"{d['too_long']} longer than max_length={max_length} (too_long: drop)")
    if d["completion_cut"]:
        why.append(f"{d['completion_cut']} whose completion starts after token {max_length} (truncated away)")
    if d["no_target"]:
        why.append(f"{d['no_target']} with no assistant/completion tokens to learn")
    hint = (f"raise data.max_length (now {max_length})" + (" or set data.too_long: truncate" if too_long == "drop"
                                                           else "")) if d["too_long"] or d["completion_cut"] \
        else "add assistant turns / completions, or set data.completion_only: false"
    return LorakitError(f"every one of the {res['seen']} rows of {source.name} was dropped: " + "; ".join(why),
                        field=fld, hint=hint)


__all__ = ["Encoder", "all_dropped_error", "encode_rows"]
