"""Prompt sources: built-in sets, file formats, verl parquet, errors, rendering."""

from __future__ import annotations

import csv
import json
import operator
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from entropylens.errors import UserError
from entropylens.data.prompts import BUILTIN_SETS, Prompt, load_prompts, prompts_sha256, render

VERL = Path("/work/shared/data/verl-math")
needs_verl = pytest.mark.skipif(not (VERL / "math500.parquet").is_file(), reason="verl-math data not present")

# ---------------------------------------------------------------------------------------------------
# Built-in sets: answers recomputed by parsing the question text.

_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_WORD_PATTERNS = [  # (pattern, answer from the two numbers in order of appearance)
    (r"has (\d+) apples and buys (\d+) more", lambda a, b: a + b),
    (r"had (\d+) cookies and gave (\d+) to", lambda a, b: a - b),
    (r"travels at (\d+) kilometres per hour for (\d+) hours", lambda a, b: a * b),
    (r"costs (\d+) dollars\. How many dollars do (\d+) notebooks", lambda a, b: a * b),
    (r"There are (\d+) boxes with (\d+) pencils", lambda a, b: a * b),
    (r"(\d+) marbles are shared equally among (\d+) children", lambda a, b: a // b if a % b == 0 else None),
    (r"a (\d+)-dollar book with a (\d+)-dollar bill", lambda a, b: b - a),
    (r"is (\d+) years old\. .* is (\d+) years older", lambda a, b: a + b),
]


_DIGITS = re.compile(r"What is (\d) ([+*]) (\d)\? Answer with just the number\.")
_LARGER = re.compile(r"Which number is larger, (\d\d) or (\d\d)\? Answer with just the number\.")


def _solve(text: str) -> tuple[tuple, int]:
    """(problem key, answer) parsed from a built-in question; fails the test if it matches no template."""
    if m := _DIGITS.fullmatch(text):
        a, op, b = int(m[1]), m[2], int(m[3])
        return ("digits", a, op, b), _OPS[op](a, b)
    if m := _LARGER.fullmatch(text):
        a, b = int(m[1]), int(m[2])
        assert a != b
        return ("larger", min(a, b), max(a, b)), max(a, b)
    m = re.fullmatch(r"\D*?(\d+) ([-+*]) (\d+)\?.*", text)
    if m and "\\boxed{}" in text:
        a, op, b = int(m[1]), m[2], int(m[3])
        return ("arith", a, op, b), _OPS[op](a, b)
    hits = [(p, f) for p, f in _WORD_PATTERNS if re.search(p, text)]
    assert len(hits) == 1, f"question matches {len(hits)} templates: {text}"
    pattern, f = hits[0]
    a, b = map(int, re.search(pattern, text).groups())
    return (pattern, a, b), f(a, b)


@pytest.mark.parametrize("name", list(BUILTIN_SETS))
def test_builtin_answers_correct_and_distinct(name):
    prompts = load_prompts(name, seed=3)
    assert len(prompts) >= 200
    assert len({p.text for p in prompts}) == len(prompts)
    for p in prompts:
        assert p.messages is None and p.source == f"builtin:{name}"
        assert ("\\boxed{}" in p.text) == (name != "digits")
        key, answer = _solve(p.text)
        assert answer is not None and answer >= 0
        assert p.answer == str(answer)
    keys = [_solve(p.text)[0] for p in prompts]
    assert len(set(keys)) == len(keys)  # no problem asked twice in different words


def test_builtin_seeded():
    a0, a0_again, a1 = (load_prompts("arith", seed=s) for s in (0, 0, 1))
    assert a0 == a0_again
    assert len({p.text for p in a0} & {p.text for p in a1}) < len(a0) // 2
    for seed in (0, 5):
        mixed = load_prompts("mixed", seed=seed)
        parts = load_prompts("arith", seed=seed) + load_prompts("word", seed=seed)
        assert sorted((p.text, p.answer) for p in mixed) == sorted((p.text, p.answer) for p in parts)
    kinds = [_solve(p.text)[0][0] == "arith" for p in load_prompts("mixed", limit=100)]
    assert 20 < sum(kinds) < 80  # interleaved, not one set after the other


@pytest.mark.parametrize("name", list(BUILTIN_SETS))
def test_builtin_splits_disjoint_and_cover(name):
    full = load_prompts(name, seed=2)
    train = load_prompts(name, seed=2, split="train")
    test = load_prompts(name, seed=2, split="test")
    train_t, test_t = [p.text for p in train], [p.text for p in test]
    assert not set(train_t) & set(test_t)
    assert sorted(train_t + test_t) == sorted(p.text for p in full)
    assert 0.7 < len(train) / len(full) < 0.9
    order = [p.text for p in full]
    assert train_t == [t for t in order if t in set(train_t)]  # the split keeps the seeded order
    # Held-out problems stay held out under another seed, whatever the wording.
    other_train = {_solve(p.text)[0] for p in load_prompts(name, seed=9, split="train")}
    assert not {_solve(t)[0] for t in test_t} & other_train


def test_digits_holds_every_one_digit_sum_and_product():
    kinds = [_solve(p.text)[0] for p in load_prompts("digits")]
    assert {k for k in kinds if k[2] == "+"} == {("digits", a, "+", b) for a in range(10) for b in range(10)}
    assert {k for k in kinds if k[2] == "*"} == {("digits", a, "*", b) for a in range(1, 10) for b in range(1, 10)}
    assert sum(k[0] == "larger" for k in kinds) == 139
    assert len(load_prompts("digits", split="test")) >= 64  # enough held-out prompts for an interval


def test_limit_takes_first_n():
    assert load_prompts("word", limit=7) == load_prompts("word")[:7]
    assert load_prompts("arith", limit=5, split="test") == load_prompts("arith", split="test")[:5]
    assert len(load_prompts("arith", limit=10_000)) == len(load_prompts("arith"))


# ---------------------------------------------------------------------------------------------------
# Files


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_roundtrip(tmp_path):
    rows = [{"prompt": "Add 2 and 3.", "answer": 5}, {"prompt": "Say ü → é", "answer": "x"}]
    rows.append({"prompt": "None"})
    ps = load_prompts(str(_write_jsonl(tmp_path / "p.jsonl", rows)))
    assert [(p.text, p.answer) for p in ps] == [("Add 2 and 3.", "5"), ("Say ü → é", "x"), ("None", None)]
    assert all(p.messages is None and p.source == "file:p.jsonl" for p in ps)


def test_json_array_and_json_lines(tmp_path):
    rows = [{"question": f"q{i}", "final_answer": str(i), "solution": "long"} for i in range(4)]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    _write_jsonl(tmp_path / "b.json", rows)
    for name in ("a.json", "b.json"):
        ps = load_prompts(str(tmp_path / name), limit=3)
        assert [(p.text, p.answer) for p in ps] == [(f"q{i}", str(i)) for i in range(3)]


def test_csv_roundtrip(tmp_path):
    rows = [{"problem": 'Say "hi", then 1+1', "solution": "2"}, {"problem": "multi\nline", "solution": ""}]
    with open(tmp_path / "p.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["problem", "solution"])
        w.writeheader()
        w.writerows(rows)
    ps = load_prompts(str(tmp_path / "p.csv"))
    assert [(p.text, p.answer) for p in ps] == [('Say "hi", then 1+1', "2"), ("multi\nline", None)]


def test_parquet_plain_columns(tmp_path):
    table = pa.table({"input": ["a", "b", "c"], "ground_truth": [1.0, None, 2.5], "other": [1, 2, 3]})
    pq.write_table(table, tmp_path / "p.parquet")
    ps = load_prompts(str(tmp_path / "p.parquet"))
    assert [(p.text, p.answer) for p in ps] == [("a", "1"), ("b", None), ("c", "2.5")]


def test_verl_style_parquet_written_by_pandas(tmp_path):
    pd = pytest.importorskip("pandas")
    msgs = [[{"role": "system", "content": "S"}, {"role": "user", "content": f"Q{i}"}] for i in range(3)]
    df = pd.DataFrame(
        {
            "question": ["x"] * 3,
            "prompt": msgs,
            "reward_model": [{"ground_truth": str(i)} for i in range(3)],
            "solution": ["a long worked solution"] * 3,  # used only when no other answer column exists
        }
    )
    df.to_parquet(tmp_path / "v.parquet")
    assert type(pd.read_parquet(tmp_path / "v.parquet")["prompt"][0]).__module__ == "numpy"  # the trap
    ps = load_prompts(str(tmp_path / "v.parquet"))
    assert [p.messages for p in ps] == msgs and [p.answer for p in ps] == ["0", "1", "2"]
    for p in ps:
        assert p.text is None and type(p.messages) is list and all(type(m) is dict for m in p.messages)
        json.dumps(p.messages)  # plain Python, serialisable


def test_txt_roundtrip(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\n  second one  \r\n\nthird\n", encoding="utf-8")
    ps = load_prompts(str(tmp_path / "p.txt"))
    assert [(p.text, p.answer) for p in ps] == [("first prompt", None), ("second one", None), ("third", None)]


def test_file_split_column(tmp_path):
    rows = [{"text": f"t{i}", "split": "test" if i % 3 == 0 else "train"} for i in range(9)]
    path = str(_write_jsonl(tmp_path / "s.jsonl", rows))
    assert [p.text for p in load_prompts(path, split="test")] == ["t0", "t3", "t6"]
    assert len(load_prompts(path, split="train")) == 6 and len(load_prompts(path)) == 9


@needs_verl
def test_verl_math500():
    path = VERL / "math500.parquet"
    ps = load_prompts(str(path))
    table = pq.read_table(path).to_pydict()
    assert len(ps) == 500 == len(table["prompt"])
    for p, msgs, rm in zip(ps, table["prompt"], table["reward_model"]):
        assert p.text is None and [m["role"] for m in p.messages] == ["system", "user"]
        assert [m["content"] for m in p.messages] == [m["content"] for m in msgs]
        assert p.answer == rm["ground_truth"] and p.source == "file:math500.parquet"


@needs_verl
def test_verl_deepmath_prefers_chat_prompt():
    path = VERL / "deepmath-5k.parquet"
    ps = load_prompts(str(path), limit=50)
    table = pq.read_table(path).slice(0, 50).to_pydict()
    assert len(ps) == 50
    assert [p.messages[-1]["content"] for p in ps] == [m[-1]["content"] for m in table["prompt"]]
    assert [p.answer for p in ps] == table["final_answer"]


# ---------------------------------------------------------------------------------------------------
# Errors: one line each, saying what to fix.


def _error(source, **kw) -> str:
    with pytest.raises(UserError) as info:
        load_prompts(source, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_errors(tmp_path):
    assert "does not exist" in _error(str(tmp_path / "missing.jsonl"))
    (tmp_path / "p.xlsx").write_text("x")
    assert ".jsonl" in _error(str(tmp_path / "p.xlsx"))
    assert "arith, word, mixed" in _error("arithmetic")
    assert "--limit" in _error("arith", limit=0) and "--limit" in _error("arith", limit=-3)
    assert "split" in _error("arith", split="validation")

    (tmp_path / "blank.txt").write_text("\n  \n")
    assert "no prompts" in _error(str(tmp_path / "blank.txt"))
    path = str(_write_jsonl(tmp_path / "s.jsonl", [{"text": "a", "split": "train"}]))
    assert "no prompts" in _error(path, split="test")
    assert "'split' column" in _error(str(_write_jsonl(tmp_path / "n.jsonl", [{"text": "a"}])), split="train")

    msg = _error(str(_write_jsonl(tmp_path / "c.jsonl", [{"q": "a", "a": 1}])))
    assert "'q'" in msg and "'prompt'" in msg and "'question'" in msg
    assert "row 2" in _error(str(_write_jsonl(tmp_path / "e.jsonl", [{"prompt": "ok"}, {"prompt": "  "}])))
    assert "row 2" in _error(str(_write_jsonl(tmp_path / "e2.jsonl", [{"prompt": "ok"}, {"answer": "1"}])))
    assert "row 1" in _error(str(_write_jsonl(tmp_path / "m.jsonl", [{"prompt": [{"role": "user"}]}])))
    empty_chat = [{"prompt": "ok"}, {"prompt": [{"role": "user", "content": " "}]}]
    assert "row 2" in _error(str(_write_jsonl(tmp_path / "m2.jsonl", empty_chat)))
    assert "answer" in _error(str(_write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "answer": {"x": 1}}])))
    assert "JSON object" in _error(str(_write_jsonl(tmp_path / "l.jsonl", ["just a string"])))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    assert "line 2" in _error(str(tmp_path / "bad.jsonl"))

    (tmp_path / "u.txt").write_bytes(b"fine\n\xff\xfe broken\n")
    msg = _error(str(tmp_path / "u.txt"))
    assert "UTF-8" in msg and "line 2" in msg
    (tmp_path / "junk.parquet").write_bytes(b"not a parquet file at all")
    assert "Parquet" in _error(str(tmp_path / "junk.parquet"))


def test_hf_offline_says_no_hub(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert "no hub is reachable" in _error("hf:entropylens-test/does-not-exist:test")
    assert "hf:<dataset id>" in _error("hf:a:b:c:d")
    assert "give only one" in _error("hf:x/y:train", split="test")


def test_hf_rows_converted(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load(repo, config, split):
        calls.append((repo, config, split))
        return datasets.Dataset.from_list([{"question": f"q{i}", "answer": f"#### {i}"} for i in range(5)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ps = load_prompts("hf:openai/gsm8k:main:test", limit=2)
    source = "hf:openai/gsm8k:main:test"
    assert [(p.text, p.answer, p.source) for p in ps] == [(f"q{i}", f"#### {i}", source) for i in range(2)]
    load_prompts("hf:openai/gsm8k", split="test")
    assert calls == [("openai/gsm8k", "main", "test"), ("openai/gsm8k", None, "test")]


# ---------------------------------------------------------------------------------------------------
# Hash and rendering


def test_prompts_sha256():
    ps = load_prompts("arith", limit=20)
    h = prompts_sha256(ps)
    assert re.fullmatch(r"[0-9a-f]{64}", h) and h == prompts_sha256(load_prompts("arith", limit=20))
    relabelled = [Prompt(p.text, p.messages, p.answer, "elsewhere") for p in ps]
    assert prompts_sha256(relabelled) == h  # content only
    changed = [Prompt(ps[0].text, None, "999999", ps[0].source)] + ps[1:]
    assert prompts_sha256(changed) != h
    assert prompts_sha256(ps[::-1]) != h and prompts_sha256(ps[:19]) != h


def _tiny_tokenizer(template: str | None):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
    tok.chat_template = template
    return tok


QWEN3_LIKE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def test_render_with_real_chat_template(smol_tokenizer):
    tok = smol_tokenizer
    p = Prompt("What is 2 + 3?", None, "5", "t")
    out = render(p, tok)
    default_system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert out == (
        f"<|im_start|>system\n{default_system}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    out = render(p, tok, system="Be brief.")
    assert out == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    chat = Prompt(None, [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], None, "t")
    expected = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert render(chat, tok) == expected
    assert render(chat, tok, system="T").startswith("<|im_start|>system\nT<|im_end|>\n<|im_start|>user")
    with pytest.raises(UserError, match="thinking"):
        render(p, tok, enable_thinking=True)


def test_render_thinking_switch():
    tok = _tiny_tokenizer(QWEN3_LIKE)
    p = Prompt("hi", None, None, "t")
    assert render(p, tok) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert render(p, tok, enable_thinking=True) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("tok", [None, "no-template"])
def test_render_without_template(tok):
    tok = _tiny_tokenizer(None) if tok else None
    assert render(Prompt("plain text", None, None, "t"), tok) == "plain text"
    assert render(Prompt("Q", None, None, "t"), tok, system="S") == "system: S\nuser: Q\nassistant:"
    chat = Prompt(None, [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], None, "t")
    assert render(chat, tok) == "system: S\nuser: U\nassistant:"
    with pytest.raises(UserError, match="thinking"):
        render(chat, tok, enable_thinking=True)
