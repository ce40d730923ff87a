"""lorakit.data: loading, format detection, tokenization and completion-only masks, splits, and every
bad-input case (one LorakitError naming the file, line or field; never an uncaught exception)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import build_tokenizer, write_jsonl

from lorakit.data import prepare as data
from lorakit.data import sources
from lorakit.errors import EXIT_INPUT, EXIT_RUNTIME, LorakitError
from lorakit.recipe.loader import validate_data

ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris"}]
MULTI = CHAT + [{"role": "user", "content": "And of Germany?"}, {"role": "assistant", "content": "Berlin"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    """The same tokenizer without a chat template (a base model)."""
    t = build_tokenizer(tmp_path_factory.mktemp("plain-tok"))
    t.chat_template = None
    return t


def make_recipe(base: Path, method: str = "sft", seed: int = 42, **d):
    doc = {"base_model": "x", "method": method, "data": d, "train": {"seed": seed}}
    if method == "grpo":
        doc["grpo"] = {"rewards": [{"fn": "exact_answer"}]}
    r = validate_data(doc)
    r._source_dir = base
    return r


def sft(tmp_path, tok, rows=None, name="d.jsonl", **d):
    if rows is not None:
        write_jsonl(tmp_path / name, rows)
    return data.prepare_sft(make_recipe(tmp_path, path=str(tmp_path / name), **d), tok)


def masked_text(tok, row) -> str:
    return tok.decode([i for i, m in zip(row["input_ids"], row["completion_mask"]) if m])


def unmasked_text(tok, row) -> str:
    return tok.decode([i for i, m in zip(row["input_ids"], row["completion_mask"]) if not m])


def error(fn, *args, **kw) -> LorakitError:
    with pytest.raises(LorakitError) as e:
        fn(*args, **kw)
    assert e.value.exit_code in (EXIT_INPUT, EXIT_RUNTIME)
    return e.value


# ----------------------------------------------------------------------------------------------
# Formats and masks
# ----------------------------------------------------------------------------------------------


def test_messages_mask_only_the_assistant_turn_and_its_end_token(tmp_path, tok):
    p = sft(tmp_path, tok, [{"messages": CHAT}])
    row = p.train[0]
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(CHAT, tokenize=False)
    assert masked_text(tok, row) == "Paris<|im_end|>"
    prompt = unmasked_text(tok, row)
    assert "What is the capital of France?" in prompt and "<|im_start|>assistant\n" in prompt
    assert row["completion_mask"][0] == 0 and len(row["completion_mask"]) == len(row["input_ids"])
    assert p.report["format"] == "messages" and p.report["rows"] == 1
    assert p.report["loss_tokens"] == sum(row["completion_mask"])
    assert p.report["tokens"] == len(row["input_ids"])


def test_multi_turn_masks_every_assistant_turn(tmp_path, tok):
    row = sft(tmp_path, tok, [{"messages": MULTI}]).train[0]
    assert masked_text(tok, row) == "Paris<|im_end|>Berlin<|im_end|>"
    mask = row["completion_mask"]
    runs = sum(1 for a, b in zip([0] + mask, mask) if b and not a)
    assert runs == 2  # two separate spans, the user turn between them is masked out


def test_system_message_and_shared_gpt_roles(tmp_path, tok):
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"}]
    p = sft(tmp_path, tok, [{"conversations": conv}])  # auto: conversations -> messages, from/value roles
    assert p.report["format"] == "messages"
    assert masked_text(tok, p.train[0]) == "Hello<|im_end|>"
    assert "<|im_start|>system\nBe brief." in unmasked_text(tok, p.train[0])


def test_completion_only_false_trains_every_token(tmp_path, tok):
    row = sft(tmp_path, tok, [{"messages": CHAT}], completion_only=False).train[0]
    assert all(row["completion_mask"])


def test_alpaca_becomes_a_chat_with_instruction_and_input(tmp_path, tok):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "hi"}]
    p = sft(tmp_path, tok, rows)
    assert p.report["format"] == "alpaca"
    assert masked_text(tok, p.train[0]) == "5<|im_end|>"
    assert "<|im_start|>user\nAdd the numbers.\n\n2 and 3<|im_end|>" in unmasked_text(tok, p.train[0])
    assert "<|im_start|>user\nSay hi.<|im_end|>" in unmasked_text(tok, p.train[1])


def test_alpaca_without_chat_template_uses_the_alpaca_prompt_and_eos(tmp_path, plain_tok):
    p = sft(tmp_path, plain_tok, [{"instruction": "Add.", "input": "2 and 3", "output": "5"}])
    row = p.train[0]
    assert plain_tok.decode(row["input_ids"]).startswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3")
    assert masked_text(plain_tok, row) == "5<|im_end|>"  # completion + EOS


def test_prompt_completion_strings(tmp_path, tok):
    row = sft(tmp_path, tok, [{"prompt": "The capital of France is", "completion": " Paris."}]).train[0]
    assert unmasked_text(tok, row) == "The capital of France is"
    assert masked_text(tok, row) == " Paris.<|im_end|>"
    assert row["input_ids"][-1] == tok.eos_token_id


def test_prompt_completion_conversational(tmp_path, tok):
    rows = [{"prompt": [CHAT[0]], "completion": [CHAT[1]]},
            {"prompt": MULTI[:3], "completion": "Berlin"}]
    p = sft(tmp_path, tok, rows)
    assert p.report["format"] == "prompt_completion"
    assert masked_text(tok, p.train[0]) == "Paris<|im_end|>"
    assert masked_text(tok, p.train[1]) == "Berlin<|im_end|>"  # the assistant turn inside the prompt is not


def test_text_trains_every_token_and_ends_with_eos(tmp_path, tok):
    row = sft(tmp_path, tok, [{"text": "The quick brown fox."}]).train[0]
    assert all(row["completion_mask"]) and row["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(row["input_ids"]) == "The quick brown fox.<|im_end|>"


@pytest.mark.parametrize("row, fmt", [
    ({"messages": CHAT, "prompt": "x"}, "messages"),  # e.g. ultrachat: messages win over extra columns
    ({"instruction": "a", "input": "", "output": "b", "text": "a b"}, "alpaca"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"text": "hello", "id": 3}, "text"),
    ({"conversations": CHAT}, "messages"),
])
def test_auto_detection(tmp_path, tok, row, fmt):
    assert sft(tmp_path, tok, [row, row]).report["format"] == fmt


def test_column_renames(tmp_path, tok):
    rows = [{"question": "The capital of France is", "answer": " Paris."}]
    p = sft(tmp_path, tok, rows, columns={"question": "prompt", "answer": "completion"})
    assert p.report["format"] == "prompt_completion"
    assert masked_text(tok, p.train[0]) == " Paris.<|im_end|>"


def test_template_without_generation_prompt_falls_back_to_offsets(tmp_path, tok):
    """A template that ignores add_generation_prompt: the assistant header must still be masked out."""
    t = build_tokenizer(tmp_path / "t2")
    t.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
                       "'<|im_end|>\\n' }}{% endfor %}")
    row = sft(tmp_path, t, [{"messages": MULTI}]).train[0]
    assert masked_text(t, row) == "Paris<|im_end|>Berlin<|im_end|>"


def test_template_without_end_token_gets_eos(tmp_path, tok):
    t = build_tokenizer(tmp_path / "t3")
    t.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                       "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    row = sft(tmp_path, t, [{"messages": CHAT}]).train[0]
    # "assistant: " + "Paris" merge into one " Paris" token at the boundary: that token is the answer's
    assert masked_text(t, row).lstrip() == "Paris<|im_end|>"
    assert row["input_ids"][-2] == t.eos_token_id  # EOS added before the template's trailing newline


# ----------------------------------------------------------------------------------------------
# Length
# ----------------------------------------------------------------------------------------------


def _long_rows():
    short = {"messages": CHAT}
    long_answer = {"messages": [CHAT[0], {"role": "assistant", "content": "Paris " * 40}]}
    long_prompt = {"messages": [{"role": "user", "content": "What is the capital? " * 40}, CHAT[1]]}
    return [short, long_answer, long_prompt]


def test_truncate_counts_and_drops_rows_whose_completion_is_cut(tmp_path, tok):
    p = sft(tmp_path, tok, _long_rows(), max_length=40)
    r = p.report
    assert r["rows"] == 2 and r["truncated"] == 1 and r["dropped"] == 1
    assert r["dropped_reasons"]["completion_cut"] == 1
    assert max(len(x) for x in p.train["input_ids"]) == 40
    assert all(any(m) for m in p.train["completion_mask"])


def test_drop_counts_long_rows(tmp_path, tok):
    p = sft(tmp_path, tok, _long_rows(), max_length=40, too_long="drop")
    assert p.report["rows"] == 1 and p.report["truncated"] == 0 and p.report["dropped"] == 2
    assert p.report["dropped_reasons"]["too_long"] == 2


def test_all_rows_too_long_is_an_error_with_numbers(tmp_path, tok):
    e = error(sft, tmp_path, tok, _long_rows()[1:], max_length=20, too_long="drop")
    assert "2 rows" in e.message and "max_length=20" in e.message
    assert e.field == "data.max_length" and "raise data.max_length" in e.hint


# ----------------------------------------------------------------------------------------------
# Splits, limits, sources
# ----------------------------------------------------------------------------------------------


def _numbered(n):
    return [{"prompt": f"Q{i}", "completion": f"A{i}"} for i in range(n)]


def test_eval_fraction_is_deterministic_and_disjoint(tmp_path, tok):
    a = sft(tmp_path, tok, _numbered(20), eval=0.25)
    b = sft(tmp_path, tok, _numbered(20), eval=0.25)
    c = data.prepare_sft(make_recipe(tmp_path, path=str(tmp_path / "d.jsonl"), eval=0.25, seed=7), tok)
    assert a.report["rows"] == 15 and a.report["eval_rows"] == 5
    train = {tuple(x) for x in a.train["input_ids"]}
    held = {tuple(x) for x in a.eval["input_ids"]}
    assert not train & held
    assert a.eval["input_ids"] == b.eval["input_ids"]
    assert c.eval["input_ids"] != a.eval["input_ids"]  # another seed, another split
    assert len(a.eval_examples) == 5
    assert all(ex["prompt"].startswith("Q") and ex["reference"].startswith("A") for ex in a.eval_examples)


def test_eval_file_and_eval_examples_from_messages(tmp_path, tok):
    write_jsonl(tmp_path / "ev.jsonl", [{"messages": MULTI}])
    p = sft(tmp_path, tok, [{"messages": CHAT}] * 3, eval="ev.jsonl")
    assert p.report["eval_rows"] == 1 and p.eval is not None
    assert p.eval_examples == [{"prompt": MULTI[:3], "reference": "Berlin"}]


def test_max_rows_limits_training_rows_only(tmp_path, tok):
    p = sft(tmp_path, tok, _numbered(30), eval=0.1, max_rows=5)
    assert p.report["rows"] == 5 and p.report["eval_rows"] == 3


def test_directory_with_split_files(tmp_path, tok):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", _numbered(4))
    write_jsonl(folder / "validation.jsonl", _numbered(2))
    r = make_recipe(tmp_path, path="ds", eval="validation")
    p = data.prepare_sft(r, tok)
    assert p.report["rows"] == 4 and p.report["eval_rows"] == 2


def test_glob_and_relative_path_beside_the_recipe(tmp_path, tok, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # relative paths fall back to the recipe's directory
    write_jsonl(tmp_path / "part-1.jsonl", _numbered(3))
    write_jsonl(tmp_path / "part-2.jsonl", _numbered(2))
    assert data.prepare_sft(make_recipe(tmp_path, path="part-*.jsonl"), tok).report["rows"] == 5
    assert data.prepare_sft(make_recipe(tmp_path, path="part-2.jsonl"), tok).report["rows"] == 2


def test_json_csv_and_parquet_files(tmp_path, tok):
    rows = _numbered(3)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}))
    (tmp_path / "d.csv").write_text("prompt,completion\n" + "".join(f"Q{i},A{i}\n" for i in range(3)))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "wrapped.json", "d.csv", "d.parquet"):
        p = data.prepare_sft(make_recipe(tmp_path, path=str(tmp_path / name)), tok)
        assert p.report["rows"] == 3 and p.report["format"] == "prompt_completion", name


def test_csv_cells_stay_text_and_empty_cells_are_missing(tmp_path, tok):
    (tmp_path / "a.csv").write_text("instruction,input,output\nAdd 2 and 3,,5\nSay NA,x,NA\n")
    source = sources.load_source(make_recipe(tmp_path, path="a.csv"), str(tmp_path / "a.csv"))
    assert source.rows[0] == {"instruction": "Add 2 and 3", "input": None, "output": "5"}
    assert source.rows[1]["output"] == "NA" and source.where(1).endswith("a.csv:3")
    p = data.prepare_sft(make_recipe(tmp_path, path="a.csv"), tok)
    assert masked_text(tok, p.train[0]) == "5<|im_end|>"


@pytest.mark.parametrize("text, words", [('a,b\n1,"unclosed\n', "EOF inside string"),
                                         ("text\n", "header but no rows")])
def test_bad_csv(tmp_path, tok, text, words):
    (tmp_path / "d.csv").write_text(text)
    e = error(sft, tmp_path, tok, name="d.csv")
    assert "d.csv" in e.message and words in e.message


def test_csv_messages_as_json_text(tmp_path, tok):
    cell = json.dumps(CHAT).replace('"', '""')
    (tmp_path / "c.csv").write_text(f'messages\n"{cell}"\n')
    p = data.prepare_sft(make_recipe(tmp_path, path=str(tmp_path / "c.csv")), tok)
    assert masked_text(tok, p.train[0]) == "Paris<|im_end|>"


# ----------------------------------------------------------------------------------------------
# GRPO
# ----------------------------------------------------------------------------------------------


def test_grpo_prompt_rows_keep_their_columns(tmp_path, tok):
    rows = [{"prompt": [{"role": "user", "content": f"What is {i}+1?"}], "answer": str(i + 1), "level": i}
            for i in range(4)]
    write_jsonl(tmp_path / "g.jsonl", rows)
    r = make_recipe(tmp_path, method="grpo", path="g.jsonl", format="prompt", eval=0.25)
    p = data.prepare_grpo(r, tok)
    assert set(p.train.column_names) == {"prompt", "answer", "level"}
    assert p.report["rows"] == 3 and p.report["eval_rows"] == 1
    assert p.train[0]["prompt"][0]["role"] == "user"
    ex = p.eval_examples[0]
    assert ex["reference"] == str(int(ex["prompt"][0]["content"].split()[2].split("+")[0]) + 1)


def test_grpo_messages_become_prompt_and_answer(tmp_path, tok):
    write_jsonl(tmp_path / "g.jsonl", [{"messages": MULTI}, {"messages": CHAT}])
    p = data.prepare_grpo(make_recipe(tmp_path, method="grpo", path="g.jsonl"), tok)
    assert set(p.train.column_names) == {"prompt", "answer"}
    assert p.train[0]["prompt"] == MULTI[:3] and p.train[0]["answer"] == "Berlin"
    assert p.train[1]["answer"] == "Paris"


def test_grpo_string_prompts_and_text_is_refused(tmp_path, tok):
    write_jsonl(tmp_path / "g.jsonl", [{"prompt": "2+2=", "solution": "4"}])
    p = data.prepare_grpo(make_recipe(tmp_path, method="grpo", path="g.jsonl"), tok)
    assert p.train[0]["prompt"] == "2+2=" and p.train[0]["solution"] == "4"
    write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    e = error(data.prepare_grpo, make_recipe(tmp_path, method="grpo", path="t.jsonl"), tok)
    assert "GRPO needs prompts" in e.message


# ----------------------------------------------------------------------------------------------
# Bad input: one clear error each
# ----------------------------------------------------------------------------------------------


def test_missing_file(tmp_path, tok):
    e = error(data.prepare_sft, make_recipe(tmp_path, path="nope/train.jsonl"), tok)
    assert "not found" in e.message and "train.jsonl" in e.message and e.field == "data.path"
    assert e.exit_code == EXIT_INPUT


def test_missing_quickstart_data_says_how_to_make_it(tmp_path, tok, monkeypatch):
    monkeypatch.chdir(tmp_path)
    e = error(data.prepare_sft, make_recipe(tmp_path, path="data/quickstart/train.jsonl"), tok)
    assert "make_quickstart_data.py" in e.hint


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, tok, content):
    (tmp_path / "d.jsonl").write_text(content)
    e = error(sft, tmp_path, tok)
    assert "d.jsonl" in e.message and "empty" in e.message


def test_not_utf8_names_the_line(tmp_path, tok):
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    e = error(sft, tmp_path, tok)
    assert "d.jsonl:2" in e.message and "UTF-8" in e.message


def test_bad_json_line_names_the_line(tmp_path, tok):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n\n{"text": "b"\n')
    e = error(sft, tmp_path, tok)
    assert "d.jsonl:3" in e.message and "not valid JSON" in e.message


def test_json_line_that_is_not_an_object(tmp_path, tok):
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n["text", "b"]\n')
    e = error(sft, tmp_path, tok)
    assert "d.jsonl:2" in e.message and "JSON object" in e.message


def test_unreadable_file(tmp_path, tok, monkeypatch):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    e = error(sft, tmp_path, tok)
    assert "d.jsonl" in e.message and "permission denied" in e.message


@pytest.mark.parametrize("name, payload", [("d.parquet", b"not a parquet file"), ("d.json", b'{"a": ')])
def test_corrupt_files(tmp_path, tok, name, payload):
    (tmp_path / name).write_bytes(payload)
    e = error(sft, tmp_path, tok, name=name)
    assert name in e.message


def test_unsupported_suffix(tmp_path, tok):
    (tmp_path / "d.txt").write_text("hello\n")
    e = error(sft, tmp_path, tok, name="d.txt")
    assert "unsupported" in e.message and ".jsonl" in e.hint


def test_empty_directory(tmp_path, tok):
    (tmp_path / "empty").mkdir()
    e = error(data.prepare_sft, make_recipe(tmp_path, path=str(tmp_path / "empty")), tok)
    assert "holds no" in e.message


@pytest.mark.parametrize("messages, words", [
    ("hello", "must be a list"),
    ({"role": "user"}, "must be a list"),
    ([], "empty list"),
    (["hi"], "messages[0] must be an object"),
    ([{"content": "hi"}], "messages[0] has no role"),
    ([{"role": "wizard", "content": "hi"}], "unknown role 'wizard'"),
    ([{"role": "user", "content": 3}], "must be a string"),
    ([{"role": "user", "content": None}], "has no content"),
])
def test_rows_of_the_wrong_shape_name_the_line(tmp_path, tok, messages, words):
    e = error(sft, tmp_path, tok, [{"messages": CHAT}, {"messages": messages}], format="messages")
    assert "d.jsonl:2" in e.message and words in e.message, e.message


def test_wrong_types_in_other_formats(tmp_path, tok):
    e = error(sft, tmp_path, tok, [{"instruction": "a", "output": 5}])
    assert "d.jsonl:1" in e.message and "'output' must be a string" in e.message
    e = error(sft, tmp_path, tok, [{"prompt": "a", "completion": [CHAT[1]]}])
    assert "completion must be a string" in e.message


def test_unknown_columns_list_found_and_expected(tmp_path, tok):
    e = error(sft, tmp_path, tok, [{"question": "a", "reply": "b"}])
    assert "question, reply" in e.message and "prompt + completion" in e.message
    assert e.field == "data.format" and "data.columns" in e.hint


def test_named_format_with_missing_column(tmp_path, tok):
    e = error(sft, tmp_path, tok, [{"text": "a"}], format="alpaca")
    assert "no instruction, output column" in e.message and "columns: text" in e.message


def test_missing_value_in_a_named_format(tmp_path, tok):
    e = error(sft, tmp_path, tok, [{"prompt": "a", "completion": "b"}, {"prompt": "c"}],
              format="prompt_completion")
    assert "d.jsonl:2" in e.message and "missing 'completion'" in e.message


def test_rename_of_a_column_that_does_not_exist(tmp_path, tok):
    e = error(sft, tmp_path, tok, [{"text": "a"}], columns={"conversations": "messages"})
    assert e.field == "data.columns" and "'conversations'" in e.message and "columns: text" in e.message


def test_mixed_formats(tmp_path, tok):
    e = error(sft, tmp_path, tok, [{"messages": CHAT}, {"messages": CHAT}, {"text": "plain"}])
    assert "mixed formats" in e.message and "2 row(s) look like messages" in e.message
    assert "d.jsonl:3" in e.message


def test_prompt_only_data_for_sft(tmp_path, tok):
    e = error(sft, tmp_path, tok, [{"prompt": "a"}])
    assert "method: grpo" in e.message


def test_no_assistant_turns_anywhere(tmp_path, tok):
    e = error(sft, tmp_path, tok, [{"messages": [CHAT[0]]}])
    assert "no assistant/completion tokens" in e.message


def test_chat_rows_need_a_chat_template(tmp_path, plain_tok):
    e = error(sft, tmp_path, plain_tok, [{"messages": CHAT}])
    assert "no chat template" in e.message and "model.chat_template" in e.message


def test_eval_fraction_too_large_for_the_data(tmp_path, tok):
    e = error(sft, tmp_path, tok, _numbered(1), eval=0.5)
    assert e.field == "data.eval"


def test_eval_split_name_on_a_single_file(tmp_path, tok):
    e = error(sft, tmp_path, tok, _numbered(3), eval="validation")
    assert e.field == "data.eval" and "fraction" in e.hint


def test_errors_gain_the_recipe_line(tmp_path, tok):
    from lorakit.recipe.loader import load_recipe, located

    (tmp_path / "r.yaml").write_text("base_model: x\ndata:\n  path: missing.jsonl\n")
    recipe = load_recipe(tmp_path / "r.yaml")
    with pytest.raises(LorakitError) as e, located(recipe):
        data.prepare_sft(recipe, tok)
    assert e.value.problems[0].line == 3 and "missing.jsonl" in e.value.problems[0].message


def test_hub_dataset_rows_flow_like_local_ones(tmp_path, tok, monkeypatch):
    """A hub id goes to datasets.load_dataset (stubbed here: no network), split and eval split included."""
    import datasets

    calls = []

    def fake_load(name, split=None):
        calls.append((name, split))
        n = 4 if split == "train" else 2
        return datasets.Dataset.from_list([{"conversations": MULTI, "id": i} for i in range(n)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.chdir(tmp_path)
    r = make_recipe(tmp_path, path="someone/chats", eval="test", columns={"conversations": "messages"})
    p = data.prepare_sft(r, tok)
    assert calls == [("someone/chats", "train"), ("someone/chats", "test")]
    assert p.report["rows"] == 4 and p.report["eval_rows"] == 2 and p.report["source"] == "someone/chats [train]"
    assert masked_text(tok, p.train[0]) == "Paris<|im_end|>Berlin<|im_end|>"
    assert p.eval_examples[0]["reference"] == "Berlin"


def test_hub_id_offline_is_a_clear_error(tmp_path):
    code = ("from lorakit.data import sources; from lorakit.recipe.loader import validate_data\n"
            "from lorakit.errors import LorakitError\n"
            "r = validate_data({'base_model': 'x', 'data': {'path': 'someone/some-dataset'}})\n"
            "try:\n    sources.load_source(r, 'someone/some-dataset')\n"
            "except LorakitError as e:\n    print('FIELD', e.field); print('MSG', e.message); print('HINT', e.hint)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert "FIELD data.path" in out.stdout, out.stdout + out.stderr
    assert "not a local file" in out.stdout and "can't be reached" in out.stdout
    assert "HF_DATASETS_OFFLINE" in out.stdout and "Traceback" not in out.stderr


def test_fuzzed_rows_give_success_or_a_clean_error(tmp_path, tok):
    """Random JSON rows through the loader and the encoder: never an uncaught exception."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8))
    values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.sampled_from(["role", "content", "from", "value", "type", "text"]), c, max_size=3), max_leaves=6)
    keys = st.sampled_from(["messages", "conversations", "instruction", "input", "output", "prompt", "completion",
                            "text", "other"])
    rows = st.lists(st.dictionaries(keys, values, max_size=3), min_size=1, max_size=3)

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(rows=rows, fmt=st.sampled_from(["auto", "messages", "alpaca", "prompt_completion", "text"]))
    def check(rows, fmt):
        write_jsonl(tmp_path / "f.jsonl", rows)
        try:
            p = data.prepare_sft(make_recipe(tmp_path, path="f.jsonl", format=fmt, max_length=64), tok)
        except LorakitError as e:
            assert e.message and e.exit_code in (EXIT_INPUT, EXIT_RUNTIME)
            return
        assert all(len(i) == len(m) <= 64 for i, m in zip(p.train["input_ids"], p.train["completion_mask"]))
        assert all(any(m) for m in p.train["completion_mask"])

    check()


def test_fuzzed_file_bytes_give_success_or_a_clean_error(tmp_path, tok):
    """Random and mutated file contents under every suffix: success or a LorakitError."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    good = (json.dumps({"messages": CHAT}) + "\n").encode()
    mutated = st.builds(lambda cut, junk: good[:cut] + junk + good[cut:], st.integers(0, len(good)),
                        st.binary(max_size=4))

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(payload=st.one_of(st.binary(max_size=40), mutated), suffix=st.sampled_from(sources.SUFFIXES))
    def check(payload, suffix):
        (tmp_path / f"f{suffix}").write_bytes(payload)
        try:
            data.prepare_sft(make_recipe(tmp_path, path=f"f{suffix}"), tok)
        except LorakitError as e:
            assert e.message and f"f{suffix}" in e.message + "".join(p.message for p in e.problems)

    check()


# ----------------------------------------------------------------------------------------------
# TRL builds labels -100 from our completion_mask
# ----------------------------------------------------------------------------------------------


def test_trl_turns_completion_mask_zeros_into_ignored_labels(tmp_path, tok, tiny_model_dir):
    """TRL 1.x builds `labels` from `completion_mask` while preparing the dataset (its collator then pads
    labels with -100): check the whole path our pre-tokenized rows take in SFTTrainer."""
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    p = sft(tmp_path, tok, [{"messages": CHAT}, {"messages": MULTI}])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = SFTConfig(output_dir=str(tmp_path / "out"), completion_only_loss=True, max_length=128,
                     report_to="none", use_cpu=True, shuffle_dataset=False, dataset_num_proc=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=p.train, processing_class=tok)
    assert isinstance(trainer.data_collator, DataCollatorForLanguageModeling)
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer.data_collator(rows)
    labels, ids = batch["labels"], batch["input_ids"]
    for b, src in enumerate(p.train):
        n = len(src["input_ids"])
        for j, m in enumerate(src["completion_mask"]):
            assert int(labels[b, j]) == (int(ids[b, j]) if m else -100)
        assert (labels[b, n:] == -100).all()  # padding
    assert tok.decode([int(t) for t in labels[1] if t != -100]) == "Paris<|im_end|>Berlin<|im_end|>"


# ----------------------------------------------------------------------------------------------
# The quickstart generator
# ----------------------------------------------------------------------------------------------


def test_quickstart_data_is_deterministic_and_well_formed(tmp_path, tok):
    script = ROOT / "scripts" / "make_quickstart_data.py"
    for out in ("a", "b"):
        res = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / out), "--train", "50",
                              "--eval", "10"], check=False, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "50 train rows" in res.stdout, res.stderr
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train = [json.loads(x) for x in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (tmp_path / "a" / "eval.jsonl").read_text().splitlines()]
    assert len(train) == 50 and len(held) == 10
    answers = [json.loads(r["messages"][1]["content"]) for r in train + held]
    assert all(list(a) == ["name", "city", "date"] for a in answers)
    import datetime

    for r, a in zip(train + held, answers):
        datetime.date.fromisoformat(a["date"])
        assert a["name"] in r["messages"][0]["content"] and a["city"] in r["messages"][0]["content"]
    assert not {json.dumps(a) for a in answers[:50]} & {json.dumps(a) for a in answers[50:]}
    recipe = make_recipe(tmp_path, path=str(tmp_path / "a" / "train.jsonl"), eval=str(tmp_path / "a" / "eval.jsonl"))
    p = data.prepare_sft(recipe, tok)
    assert p.report["rows"] == 50 and len(p.eval_examples) == 10
    assert json.loads(p.eval_examples[0]["reference"]) == answers[50]
