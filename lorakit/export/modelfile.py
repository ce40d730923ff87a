"""The Ollama `Modelfile` written beside a GGUF: FROM the file, its chat format as an Ollama (Go) template,
the stop tokens of that format, and the template's default system prompt when it has one.

Ollama cannot run the Jinja chat template of a Hugging Face tokenizer, so the common formats are recognised
by their marker tokens and written as Ollama templates: ChatML (SmolLM2, Qwen2), Llama-3 and Mistral's [INST].
Any other template is left to Ollama (it reads the GGUF's own) and said so in a comment.
"""

from __future__ import annotations

import re
from pathlib import Path

CHATML = """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
LLAMA3 = """{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""
MISTRAL = """{{- range .Messages }}
{{- if eq .Role "user" }}[INST] {{ .Content }}[/INST]
{{- else if eq .Role "assistant" }}{{ .Content }}</s>
{{- end }}
{{- end }}"""
# format -> (marker in the Jinja template, Ollama template, stop tokens, default system prompt pattern)
FORMATS = {
    "chatml": ("<|im_start|>", CHATML, ("<|im_start|>", "<|im_end|>"),
               r"<\|im_start\|>system(?:\\n|\n)([^'\"{}+]+?)<\|im_end\|>"),
    "llama3": ("<|start_header_id|>", LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), None),
    "mistral": ("[INST]", MISTRAL, ("[INST]", "[/INST]", "</s>"), None),
}


def chat_format(template: str | None) -> str | None:
    """chatml, llama3, mistral or None, from the markers of a Jinja chat template."""
    return next((name for name, (marker, *_) in FORMATS.items() if template and marker in template), None)


def render(gguf_name: str, template: str | None, eos: str | None) -> str:
    """The Modelfile text for `./gguf_name` with this Jinja chat template and end-of-sequence token."""
    fmt = chat_format(template)
    lines = [f"FROM ./{gguf_name}", ""]
    stops: list[str] = []
    if fmt is None:
        lines += ["# The chat template is not one lorakit translates (ChatML, Llama-3, Mistral [INST]);",
                  "# Ollama falls back to the template stored in the GGUF file.", ""]
    else:
        _, ollama, stops, system = FORMATS[fmt]
        lines += [f'TEMPLATE """{ollama}"""', ""]
        found = re.search(system, template) if system else None
        if found:
            lines += [f'SYSTEM """{found.group(1).strip()}"""', ""]
    for stop in dict.fromkeys([*stops, *([eos] if eos else [])]):
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines).rstrip() + "\n"


def modelfile_path(gguf_path: Path, overwrite: bool) -> Path:
    """`Modelfile` beside the GGUF, unless one there belongs to another file (then `<stem>.Modelfile`)."""
    path = gguf_path.with_name("Modelfile")
    if path.is_file() and not overwrite and f"FROM ./{gguf_path.name}\n" not in path.read_text(encoding="utf-8"):
        return gguf_path.with_name(f"{gguf_path.stem}.Modelfile")
    return path
