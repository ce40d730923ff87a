"""`lorakit export --format gguf`: tiny Llama / Qwen2 / Mistral models (and adapters on them) written as GGUF and
loaded back through transformers' GGUF loader (logits and token ids), the tensor types of each --quant, the
Modelfile, the unsupported-architecture error through the real CLI, output.save: gguf, and the demo model with
an adapter giving the same greedy answer from its f16 and q8_0 files as base + adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from helpers import _CORPUS, CHATML, build_tiny_model, tiny_lora

from lorakit.errors import LorakitError
from lorakit.export import gguf_writer
from lorakit.export.gguf_writer import export_gguf
from lorakit.export.modelfile import render

ROOT = Path(__file__).resolve().parents[1]
QT = gguf.GGMLQuantizationType
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
                   "'<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
MISTRAL_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
                    "' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")


def llama3_tokenizer(path: Path):
    """Byte-level BPE split by Llama-3's regex (tokenizer.ggml.pre = llama-bpe), with Llama-3's chat markers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
    tok.train_from_iterator(_CORPUS * 20, trainers.BpeTrainer(
        vocab_size=380, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.chat_template = LLAMA3_TEMPLATE
    fast.save_pretrained(path)


def sentencepiece_tokenizer(path: Path):
    """A SentencePiece-style BPE (Metaspace, byte fallback) as transformers' LlamaTokenizer builds Mistral's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(_CORPUS * 20, trainers.BpeTrainer(vocab_size=380, special_tokens=specials,
                                                              show_progress=False))
    model = json.loads(tok.to_str())["model"]
    fast = LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], bos_token="<s>",
                          eos_token="</s>", unk_token="<unk>")
    fast.chat_template = MISTRAL_TEMPLATE
    fast.save_pretrained(path)


def tiny(path: Path, arch: str, tokenizer=None, tie: bool = False, **config) -> Path:
    """conftest's tiny model of `arch` (vocab 400), its tokenizer replaced by `tokenizer` (ids < 400: the
    rows past it become [PAD] tokens) and its config updated with `config`."""
    build_tiny_model(path, arch=arch, tie=tie)
    if tokenizer is not None:
        tokenizer(path)
    if config:
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, **config}))
    return path


def save_adapter(base: Path, out: Path) -> Path:
    """A random LoRA (r=8, every Linear, lora_B drawn) on `base`, saved as a peft adapter with the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_lora(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), fused=False)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


def types(path: Path) -> dict[str, QT]:
    return {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}


def field(path: Path, key: str):
    return gguf.GGUFReader(path).fields[key].contents()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_round_trip_through_transformers(tmp_path, arch):
    """Each architecture with an adapter: the file loads back through transformers with the merged model's
    logits (within f16 rounding) and the same token ids; q/k/v/o, MLP and norms all land under gguf's names."""
    tokenizer = {"llama": llama3_tokenizer, "qwen2": None, "mistral": sentencepiece_tokenizer}[arch]
    rope = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64}, "rope_theta": 500000.0} if arch == "llama" else {}
    base = tiny(tmp_path / "base", arch, tokenizer, **rope)
    adapter = save_adapter(base, tmp_path / "adapter")
    out = tmp_path / "out" / "model.gguf"
    report = export_gguf(adapter, out, quant="f16", verify=True)

    assert report["modules_merged"] == 14  # 7 Linears x 2 layers
    assert report["max_logit_diff"] <= report["tolerance"] < 0.05 * report["max_abs_logit"]
    assert report["tokenizer_mismatches"] == []
    names = types(out)
    assert field(out, "general.architecture") == ("qwen2" if arch == "qwen2" else "llama")
    assert names["blk.1.attn_q.weight"] == QT.F16 and names["blk.0.ffn_norm.weight"] == QT.F32
    assert "output.weight" in names and len(names) == 3 + 2 * 9 + (1 if arch == "llama" else 0) + (
        6 if arch == "qwen2" else 0)  # embd, norm, output; 9 per block; rope_freqs; qwen2's q/k/v biases
    expected = {"llama": ("gpt2", "llama-bpe"), "qwen2": ("gpt2", "qwen2"), "mistral": ("llama", None)}[arch]
    assert field(out, "tokenizer.ggml.model") == expected[0]
    assert (field(out, "tokenizer.ggml.pre") if expected[1] else None) == expected[1]
    assert len(field(out, "tokenizer.ggml.tokens")) == 400  # padded to the embedding's rows
    if arch == "llama":  # Llama-3 rope: 1 for the fastest frequency, `factor` for the slowest, smooth between
        freqs = gguf.GGUFReader(out).get_tensor(0)
        assert freqs.name == "rope_freqs.weight"
        f = freqs.data.tolist()
        assert f[0] == pytest.approx(1.0) and f[-1] == pytest.approx(8.0) and f == sorted(f)


def test_verify_fails_without_the_rotary_permutation(tmp_path, monkeypatch):
    """The round trip is what proves the q/k layout: written without llama.cpp's permutation, verify exits 1."""
    base = tiny(tmp_path / "base", "llama")
    monkeypatch.setattr(gguf_writer, "PERMUTE_QK", ())
    with pytest.raises(LorakitError, match="logits differ") as e:
        export_gguf(base, tmp_path / "m.gguf", quant="f16", verify=True)
    assert e.value.exit_code == 1


@pytest.mark.parametrize("quant", ["bf16", "q8_0", "q4_0"])
def test_quant_types_round_trip(tmp_path, quant):
    """A tied merged checkpoint: matrices in the chosen type (q4_0 keeps the embeddings Q8_0), 1-D tensors F32,
    no output.weight (tied), and the file within that type's rounding of the source."""
    base = tiny(tmp_path / "base", "llama", tie=True)
    out = tmp_path / f"m-{quant}.gguf"
    report = export_gguf(base, out, quant=quant, verify=True)
    names = types(out)
    assert report["tied_embeddings"] and "output.weight" not in names
    want = {"bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0}[quant]
    assert names["blk.0.ffn_down.weight"] == want and names["blk.1.attn_k.weight"] == want
    assert names["token_embd.weight"] == (QT.Q8_0 if quant == "q4_0" else want)
    assert names["output_norm.weight"] == QT.F32
    assert report["max_logit_diff"] <= report["tolerance"] and report["tokenizer_mismatches"] == []
    assert field(out, "general.file_type") == gguf_writer.FILE_TYPE[quant]


def test_modelfile_translates_chat_formats(tmp_path):
    chatml = render("m.gguf", CHATML.replace("{% for", "{{ '<|im_start|>system\\nBe brief.<|im_end|>\\n' }}{% for"),
                    "<|im_end|>")
    assert chatml.startswith("FROM ./m.gguf\n") and "<|im_start|>{{ .Role }}" in chatml
    assert 'SYSTEM """Be brief."""' in chatml and chatml.count('PARAMETER stop "<|im_end|>"') == 1
    llama3 = render("m.gguf", LLAMA3_TEMPLATE, "<|eot_id|>")
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in llama3 and 'PARAMETER stop "<|eot_id|>"' in llama3
    assert "[INST] {{ .Content }}[/INST]" in render("m.gguf", MISTRAL_TEMPLATE, "</s>")
    other = render("m.gguf", "{{ messages }}", "<eos>")
    assert "TEMPLATE" not in other and 'PARAMETER stop "<eos>"' in other


def test_modelfile_beside_the_gguf(tmp_path):
    base = tiny(tmp_path / "base", "llama")
    export_gguf(base, tmp_path / "out" / "a.gguf", quant="f16")
    text = (tmp_path / "out" / "Modelfile").read_text()
    assert text.startswith("FROM ./a.gguf\n") and "<|im_start|>assistant" in text
    export_gguf(base, tmp_path / "out" / "b.gguf", quant="f16")  # a's Modelfile stays
    assert (tmp_path / "out" / "Modelfile").read_text() == text
    assert (tmp_path / "out" / "b.Modelfile").read_text().startswith("FROM ./b.gguf\n")
    with pytest.raises(LorakitError, match="already exists"):
        export_gguf(base, tmp_path / "out" / "a.gguf", quant="f16")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Modelfile", "a.gguf", "b.Modelfile", "b.gguf"]


def test_unsupported_architecture_through_the_cli(tmp_path):
    base = tiny(tmp_path / "phi3", "phi3")
    out = tmp_path / "m.gguf"
    env = {"CI": "true", "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "lorakit", "export", str(base), "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 2, p.stderr
    assert "'phi3'" in p.stderr and "llama, mistral, qwen2" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists() and list(tmp_path.glob("*.tmp-*")) == [] and list(tmp_path.glob(".*")) == []
    p = subprocess.run([sys.executable, "-m", "lorakit", "export", str(base), "--out", str(out), "--quant", "q5_k"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 2 and "--quant" in p.stderr and "q4_0" in p.stderr


def test_output_save_gguf_writes_it_after_training(workdir, tiny_model_dir):
    from test_train import make_recipe

    from lorakit.train.run import run_training

    recipe = make_recipe(workdir, tiny_model_dir, name="g", train={"max_steps": 1}, evaluate={"metrics": []},
                         output={"dir": "runs/g", "save": "gguf", "gguf_quant": "q8_0"})
    summary = run_training(recipe)
    out = workdir / "runs" / "g" / "gguf" / "model.gguf"
    assert Path(summary["artifacts"]["gguf"]).resolve() == out and summary["gguf"]["modules_merged"] == 4
    assert types(out)["blk.0.attn_v.weight"] == QT.Q8_0
    assert (out.parent / "Modelfile").read_text().startswith("FROM ./model.gguf\n")
