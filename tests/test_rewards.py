"""Built-in rewards on hand-made cases, loading user rewards, the safety guard and the weighted sum."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest

from lorakit.errors import LorakitError
from lorakit.recipe.schema import RewardSpec
from lorakit.train.rewards import (
    combine,
    completion_text,
    exact_answer,
    exact_match,
    extract_answer,
    format_regex,
    json_match,
    length,
    load_reward,
    load_rewards,
    to_number,
    valid_json,
)


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------- extraction and numbers


@pytest.mark.parametrize("text, expected", [
    ("so it is <answer>85</answer>", "85"),
    ("<answer>1</answer> no wait <answer> 2 </answer>", "2"),           # last tag wins
    ("The result is \\boxed{\\frac{1}{2}} and 7", "\\frac{1}{2}"),      # boxed beats a later number
    ("\\boxed{a{b}c}", "a{b}c"),                                         # nested braces
    ("first 3 then 1,234.5 then", "1,234.5"),                            # last number
    ("minus: -17.", "-17"),
    ("no digits here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("s, value", [
    ("1,234", 1234.0), ("$5", 5.0), ("3/4", 0.75), ("\\frac{1}{2}", 0.5), ("-\\frac{3}{4}", -0.75),
    ("12%", 12.0), ("2.5e3", 2500.0), ("eighty", None), ("1/0", None), (7, 7.0), (True, None),
])
def test_to_number(s, value):
    assert to_number(s) == value


def test_completion_text_handles_strings_messages_and_blocks():
    assert completion_text("plain") == "plain"
    assert completion_text(chat("hi")) == "hi"
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"
    blocks = [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]
    assert completion_text([{"role": "assistant", "content": blocks}]) == "xy"


# ---------------------------------------------------------------- built-ins


def test_exact_answer_tags_boxed_last_number_and_wrong():
    completions = ["<answer>85</answer>", "\\boxed{85}", "37 + 48 = 85", "<answer>84</answer>", "I do not know"]
    assert exact_answer(completions, answer=["85"] * 5) == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_exact_answer_chat_completions_and_numeric_formats():
    completions = [chat("<answer>1,000</answer>"), chat("<answer>0.5</answer>"), chat("<answer>Paris </answer>")]
    assert exact_answer(completions, answer=["1000", "1/2", "paris"]) == [1.0, 1.0, 1.0]


def test_exact_answer_tolerance_and_column():
    completions = ["<answer>3.1416</answer>", "<answer>3.1416</answer>"]
    assert exact_answer(completions, answer=["3.14159", "3.14159"]) == [0.0, 0.0]
    assert exact_answer(completions, answer=[3.14159, 3.14159], rel_tol=1e-3) == [1.0, 1.0]
    assert exact_answer(completions, answer=["3.14159"] * 2, abs_tol=1e-4) == [1.0, 1.0]
    assert exact_answer(["<answer>7</answer>"], solution=["7"], column="solution") == [1.0]


def test_exact_answer_missing_column_names_it():
    with pytest.raises(KeyError, match="'answer'.*columns given: solution"):
        exact_answer(["7"], solution=["7"], prompts=["q"])


def test_format_regex_search_and_fullmatch():
    completions = ["think... <answer>12</answer>", "<answer>12</answer>", chat("<answer>x</answer>"), "nothing"]
    assert format_regex(completions, pattern=r"<answer>\s*-?\d+\s*</answer>") == [1.0, 1.0, 0.0, 0.0]
    assert format_regex(completions, pattern=r"<answer>\d+</answer>", match="fullmatch") == [0.0, 1.0, 0.0, 0.0]
    # DOTALL: `.` crosses lines
    assert format_regex(["<think>a\nb</think>"], pattern="<think>.*</think>", match="fullmatch") == [1.0]


def test_length_range_target_penalty_and_units():
    words = ["one two three", "one two three four five six", "", "a b c d e f g h i j k l"]
    # range [3, 6] words, tolerance defaults to max=6: inside 1, 12 words -> 1 - 6/6 = 0, 0 words -> 1 - 3/6
    assert length(words, min=3, max=6, unit="words") == [1.0, 1.0, 0.5, 0.0]
    assert length(["abcd", "ab", "abcdef"], target=4, unit="chars") == [1.0, 0.5, 0.5]
    assert length(["abcd", "ab"], target=4, unit="chars", penalty=True) == [0.0, -0.5]
    assert length(["x", "y"], max=4, completion_ids=[[1, 2, 3], [1, 2, 3, 4, 5, 6]]) == [1.0, 0.5]
    with pytest.raises(ValueError, match="unit tokens needs the generated token ids"):
        length(["x"], max=4)  # tokens outside GRPO


def test_valid_json_with_fences_and_required_keys():
    completions = ['{"a": 1, "b": 2}', '```json\n{"a": 1}\n```', "[1, 2]", "{bad json", chat('{"a": 0}')]
    assert valid_json(completions) == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert valid_json(completions, required_keys=["a", "b"]) == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_exact_match_and_json_match_against_reference():
    assert exact_match(["  Paris\n", "paris", chat("Paris")], reference=["Paris"] * 3) == [1.0, 0.0, 1.0]
    got = json_match(['{"b": 2, "a": 1}', '{"a": 1}', "not json", '{"a": 1}'],
                     reference=['{"a": 1, "b": 2}', '{"a": 2}', '"x"', {"a": 1}])
    assert got == [1.0, 0.0, 0.0, 1.0]


def test_builtins_read_their_column_among_other_kwargs():
    """Under TRL every dataset column arrives as a keyword list, next to TRL's own keywords."""
    kwargs = {"prompts": ["p1", "p2"], "completion_ids": [[1], [2]], "answer": ["4", "5"], "reference": ["x", "y"],
                  "difficulty": ["easy", "hard"], "trainer_state": object(), "log_extra": print, "log_metric": print}
    assert load_reward(RewardSpec(fn="exact_answer"), ".")(["<answer>4</answer>", "4"], **kwargs) == [1.0, 0.0]
    assert load_reward(RewardSpec(fn="exact_match"), ".")(["x", "x"], **kwargs) == [1.0, 0.0]


# ---------------------------------------------------------------- weights


def test_combine_is_the_weighted_sum_skipping_none():
    per_reward = [[1.0, 0.0, None, None], [1.0, 1.0, 1.0, None]]
    assert combine(per_reward, [1.0, 0.2]) == [1.2, 0.2, 0.2, None]
    with pytest.raises(ValueError):
        combine(per_reward, [1.0])


# ---------------------------------------------------------------- loading


def test_builtin_name_binds_args_and_keeps_name():
    r = load_reward(RewardSpec(fn="format_regex", args={"pattern": "^ok$", "match": "fullmatch"}), ".")
    assert r.__name__ == "format_regex"
    assert r(["ok", "ok!"]) == [1.0, 0.0]


def test_duplicate_names_get_suffixes():
    specs = [RewardSpec(fn="format_regex", args={"pattern": "a"}), RewardSpec(fn="format_regex", args={"pattern": "b"})]
    assert [r.__name__ for r in load_rewards(specs, ".")] == ["format_regex", "format_regex_2"]


def test_unknown_builtin_suggests_close_name():
    with pytest.raises(LorakitError) as e:
        load_reward(RewardSpec(fn="exact_anwser"), ".", field="grpo.rewards.1.fn")
    assert "grpo.rewards[1].fn" in e.value.message and "unknown built-in 'exact_anwser'" in e.value.message
    assert "exact_answer" in e.value.hint
    assert e.value.field == "grpo.rewards.1.fn" and e.value.exit_code == 2


@pytest.mark.parametrize("spec, message", [
    (RewardSpec(fn="format_regex"), "format_regex needs args.pattern"),
    (RewardSpec(fn="format_regex", args={"pattern": "(unclosed"}), "not a valid regular expression"),
    (RewardSpec(fn="length", args={"unit": "tokens"}), "length needs args.target"),
    (RewardSpec(fn="exact_answer", args={"tolerance": 0.1}), "exact_answer takes no argument 'tolerance'"),
])
def test_bad_builtin_args_name_the_args_field(spec, message):
    with pytest.raises(LorakitError) as e:
        load_reward(spec, ".", field="grpo.rewards.0.fn")
    assert message in e.value.message
    assert e.value.field == "grpo.rewards.0.args"


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scoring.py").write_text(textwrap.dedent("""
        def contains(completions, word="yes", **kwargs):
            return [1.0 if word in c else 0.0 for c in completions]
        NOT_A_FUNCTION = 3
    """))
    (pkg / "broken.py").write_text("import not_a_real_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mypkg"
    for name in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        del sys.modules[name]


def test_user_reward_from_module(user_package):
    r = load_reward(RewardSpec(fn="mypkg.scoring:contains", args={"word": "ok"}), ".")
    assert r.__name__ == "contains"
    assert r(["ok then", "no"]) == [1.0, 0.0]


def test_user_reward_from_file_relative_to_base_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "my_rewards.py").write_text(textwrap.dedent("""
        from dataclasses import dataclass

        @dataclass
        class Cfg:  # dataclasses need the module registered in sys.modules
            bonus: float = 0.5

        def brevity(completions, bonus=Cfg().bonus, **kwargs):
            return [bonus if len(c) < 5 else 0.0 for c in completions]
    """))
    r = load_reward(RewardSpec(fn="sub/my_rewards.py:brevity"), tmp_path)
    assert r.__name__ == "brevity"
    assert r(["hi", "a long answer"]) == [0.5, 0.0]
    r2 = load_reward(RewardSpec(fn="sub/my_rewards.py:brevity", args={"bonus": 2}), tmp_path)
    assert r2(["hi"]) == [2.0]


def test_file_reward_does_not_touch_neighbouring_files(tmp_path):
    (tmp_path / "rw.py").write_text("def r(completions, **kw):\n    return [0.0] * len(completions)\n")
    (tmp_path / "__init__.py").write_text("raise RuntimeError('must not run')\n")
    (tmp_path / "other.py").write_text("raise RuntimeError('must not run')\n")
    assert load_reward(RewardSpec(fn="rw.py:r"), tmp_path)(["x"]) == [0.0]


@pytest.mark.parametrize("fn, message", [
    ("no_such_pkg_xyz.mod:f", "cannot import 'no_such_pkg_xyz.mod'"),
    ("mypkg.broken:f", "cannot import 'mypkg.broken'"),
    ("mypkg.scoring:missing", "'mypkg.scoring' has no function 'missing' (functions there: contains)"),
    ("mypkg.scoring:NOT_A_FUNCTION", "is a int, not a function"),
    ("missing_file.py:f", "file not found"),
])
def test_load_errors_name_the_field(user_package, tmp_path, fn, message):
    with pytest.raises(LorakitError) as e:
        load_reward(RewardSpec(fn=fn), tmp_path, field="grpo.rewards.2.fn")
    assert e.value.message.startswith("grpo.rewards[2].fn: ")
    assert message in e.value.message
    assert e.value.exit_code == 2 and e.value.field == "grpo.rewards.2.fn"


def test_file_that_fails_at_import_is_reported(tmp_path):
    (tmp_path / "bad.py").write_text("def f(completions, **kw):\n    return [\n")
    with pytest.raises(LorakitError, match=r"evaluate.metrics\[0\].fn: importing 'bad.py' failed: SyntaxError"):
        load_reward(RewardSpec(fn="bad.py:f"), tmp_path, field="evaluate.metrics.0.fn")


def test_async_reward_is_refused(tmp_path):
    (tmp_path / "a.py").write_text("async def f(completions, **kw):\n    return [0.0]\n")
    with pytest.raises(LorakitError, match="async function"):
        load_reward(RewardSpec(fn="a.py:f"), tmp_path)


# ---------------------------------------------------------------- the guard


def _guarded(tmp_path, body: str):
    (tmp_path / "u.py").write_text(textwrap.dedent(body))
    return load_reward(RewardSpec(fn="u.py:f"), tmp_path)


def test_reward_that_raises_fails_with_name_and_sample(tmp_path):
    r = _guarded(tmp_path, """
        def f(completions, **kwargs):
            raise ZeroDivisionError("boom")
    """)
    with pytest.raises(LorakitError) as e:
        r(["x" * 1000], prompts=["What is 2+2?"], answer=["4"])
    msg = e.value.message
    assert "reward function f (u.py:f) raised ZeroDivisionError: boom" in msg
    assert "prompt: What is 2+2?" in msg and "answer: 4" in msg
    assert "(1000 chars)" in msg  # long completions are cut
    assert e.value.exit_code == 1


def test_reward_without_kwargs_is_refused_at_load(tmp_path):
    (tmp_path / "u.py").write_text("def f(completions, answer):\n    return [0.0] * len(completions)\n")
    with pytest.raises(LorakitError) as e:
        load_reward(RewardSpec(fn="u.py:f"), tmp_path, field="grpo.rewards.0.fn")
    assert "u.py:f must accept **kwargs" in e.value.message and e.value.field == "grpo.rewards.0.fn"
    assert "def f(completions, **kwargs)" in e.value.hint


def test_user_reward_args_pass_through_kwargs(tmp_path):
    r = _guarded(tmp_path, """
        def f(completions, scale=1.0, **kwargs):
            return [scale * kwargs.get("bonus", 0.0)] * len(completions)
    """)
    assert r.args == {}
    r2 = load_reward(RewardSpec(fn="u.py:f", args={"scale": 2.0, "bonus": 1.5}), tmp_path)
    assert r2(["a"]) == [3.0]


def test_reward_of_wrong_length_fails(tmp_path):
    r = _guarded(tmp_path, """
        def f(completions, **kwargs):
            return [1.0]
    """)
    with pytest.raises(LorakitError, match=r"returned 1 values for 3 completions"):
        r(["a", "b", "c"])


@pytest.mark.parametrize("value, shown", [("'high'", "'high' (str)"), ("float('nan')", "nan (float)"),
                                          ("[1]", "[1] (list)")])
def test_reward_returning_a_non_number_shows_that_sample(tmp_path, value, shown):
    r = _guarded(tmp_path, f"""
        def f(completions, **kwargs):
            return [0.0, {value}]
    """)
    with pytest.raises(LorakitError) as e:
        r(["first", "second"], prompts=["p0", "p1"])
    assert f"returned {shown} for sample 1" in e.value.message
    assert "completion: second" in e.value.message and "prompt: p1" in e.value.message


def test_reward_may_return_none_and_numpy(tmp_path):
    r = _guarded(tmp_path, """
        import numpy as np
        def f(completions, **kwargs):
            return np.array([1, 0], dtype=np.float32) if completions[0] == "np" else [None, 1]
    """)
    assert r(["np", "x"]) == [1.0, 0.0]
    assert r(["x", "y"]) == [None, 1.0]
    assert r.last[2] == [None, 1.0]


def test_reward_returning_a_scalar_fails(tmp_path):
    r = _guarded(tmp_path, """
        def f(completions, **kwargs):
            return 1.0
    """)
    with pytest.raises(LorakitError, match="returned float, expected a list of 2 numbers"):
        r(["a", "b"])


def test_every_builtin_reward_is_bounded():
    for value in length(["a" * n for n in range(0, 50, 7)], min=5, max=20, unit="chars"):
        assert 0.0 <= value <= 1.0 and not math.isnan(value)
