"""Bad input, fuzzed: prompt files, logits for the entropy engine, CLI options. Prompts or one-line errors only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import one_line, run_main
from entropylens.core.decode import decode_rows
from entropylens.errors import UserError
from entropylens.core.lens import Lens
from entropylens.data.prompts import Prompt, load_prompts

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
KEYS = st.sampled_from(["prompt", "question", "text", "answer", "ground_truth", "split", "reward_model", "x", ""])
SCALARS = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20)
VALUES = st.recursive(SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(
    st.sampled_from(["role", "content", "ground_truth", "y"]), c, max_size=3), max_leaves=8)
ROWS = st.lists(st.dictionaries(KEYS, VALUES, max_size=4), max_size=5)


def check(path: Path) -> list[Prompt] | None:
    """The contract: a list of usable prompts, or a UserError with one line; nothing else escapes."""
    try:
        prompts = load_prompts(str(path))
    except UserError as e:
        assert "\n" not in str(e) and str(e)
        return None
    assert prompts
    for p in prompts:
        assert (isinstance(p.text, str) and p.text.strip()) or p.messages
        assert p.answer is None or isinstance(p.answer, str)
    return prompts


@FUZZ
@given(rows=ROWS, array=st.booleans())
def test_json_rows_of_any_shape(tmp_path, rows, array):
    path = tmp_path / ("p.json" if array else "p.jsonl")
    path.write_text(json.dumps(rows) if array else "".join(json.dumps(r) + "\n" for r in rows))
    got = check(path)
    if rows and all(isinstance(r.get("prompt"), str) and r["prompt"].strip() and not (set(r) - {"prompt"})
                    for r in rows):
        assert [p.text for p in got] == [r["prompt"] for r in rows]  # well-formed rows are all kept, in order


@FUZZ
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".txt", ".parquet"]))
def test_arbitrary_bytes(tmp_path, data, suffix):
    path = tmp_path / f"p{suffix}"
    path.write_bytes(data)
    check(path)


@FUZZ
@given(text=st.text(max_size=300), suffix=st.sampled_from([".csv", ".txt", ".jsonl"]))
def test_arbitrary_text(tmp_path, text, suffix):
    path = tmp_path / f"p{suffix}"
    path.write_text(text, encoding="utf-8")
    got = check(path)
    if suffix == ".txt" and got is not None:
        assert [p.text for p in got] == [ln.strip() for ln in text.splitlines() if ln.strip()]


PARQUET_COLUMNS = st.sampled_from([
    pa.string(), pa.large_string(), pa.int64(), pa.float64(), pa.binary(), pa.bool_(),
    pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])), pa.list_(pa.int32()),
    pa.struct([("ground_truth", pa.string())]),
])


@FUZZ
@given(types=st.dictionaries(KEYS.filter(bool), PARQUET_COLUMNS, min_size=1, max_size=3), n=st.integers(0, 4),
       data=st.data())
def test_parquet_columns_of_any_type(tmp_path, types, n, data):
    cols = {}
    for name, typ in types.items():
        values = [None] * n
        try:
            values = data.draw(st.lists(VALUES, min_size=n, max_size=n))
            cols[name] = pa.array(values, type=typ)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            cols[name] = pa.array([None] * n, type=typ)
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table(cols), path)
    check(path)


@pytest.mark.parametrize("suffix,body", [
    (".txt", "x" * 300_000 + "\n"),
    (".jsonl", json.dumps({"prompt": "y" * 300_000}) + "\n"),
    (".csv", "prompt\n" + "z" * 300_000 + "\n"),  # over csv's field limit: a UserError, not _csv.Error
    (".jsonl", "[" * 50_000 + "]" * 50_000 + "\n"),  # RecursionError in json
    (".json", "[" * 50_000 + "]" * 50_000),
    (".txt", b"caf\xe9 au lait\n"),  # latin-1, not UTF-8
    (".csv", b"prompt\n\xff\xfe\x00bad\n"),
    (".jsonl", '{"prompt": "ok"}\n{"prompt": ""}\n'),  # empty string
    (".jsonl", '{"prompt": "ok"}\n{"prompt": 3}\n'),  # wrong type
    (".csv", "question,answer\n,4\n"),  # missing value
    (".csv", "colour\nred\n"),  # missing column
    (".parquet", b"PAR1" + b"\x00" * 40 + b"PAR1"),  # corrupt Parquet
])
def test_edge_files(tmp_path, suffix, body):
    path = tmp_path / f"p{suffix}"
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    got = check(path)
    if body.startswith(("x", '{"prompt": "y')) if isinstance(body, str) else False:
        assert len(got) == 1 and len(got[0].text) == 300_000  # huge lines are prompts, untouched


# ---------------------------------------------------------------- entropy engine

def reference_entropy(x: torch.Tensor, lens: Lens) -> torch.Tensor:
    """fp64 softmax entropy with 0·log 0 = 0 (masked tokens)."""
    z = x.double() @ lens.W.double().T + (0 if lens.bias is None else lens.bias.double())
    logp = torch.log_softmax(z, -1)
    return -torch.where(torch.isinf(logp), 0.0, logp.exp() * logp).sum(-1)


@settings(max_examples=50, deadline=None)
@given(V=st.integers(2, 300), d=st.integers(1, 12), R=st.integers(1, 5), scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
       masked=st.floats(0.0, 0.9), shift=st.floats(-1e3, 1e3), chunk=st.sampled_from([7, 64, 4096]),
       seed=st.integers(0, 2**31 - 1))
def test_decode_rows_on_random_logits(V, d, R, scale, masked, shift, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, d, generator=g)
    x = torch.randn(R, d, generator=g) * scale / math.sqrt(d)  # logits ~ ±scale (±1e4: the extreme case)
    bias = torch.zeros(V)
    mask = torch.rand(V, generator=g) < masked
    mask[torch.randint(V, (1,), generator=g)] = False  # at least one token stays
    bias[mask] = -math.inf
    lens = Lens("bupo", W, bias, None, None)
    got = decode_rows(x, lens, chunk=chunk).entropy
    ref = reference_entropy(x, lens)
    assert torch.isfinite(got).all()
    assert (got >= 0).all() and (got <= math.log(int((~mask).sum())) + 1e-6).all()
    assert torch.allclose(got, ref, atol=1e-4, rtol=0), (got - ref).abs().max()
    shifted = decode_rows(x, Lens("bupo", W, bias + shift, None, None), chunk=chunk).entropy
    assert torch.allclose(shifted, got, atol=1e-4, rtol=0)  # softmax ignores a constant


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_decode_rejects_non_finite_activations(bad):
    x = torch.randn(4, 8)
    x[2, 3] = bad
    with pytest.raises(UserError, match="1 activation values are NaN or infinite; .* --dtype float32"):
        decode_rows(x, Lens("bupo", torch.randn(50, 8), None, None, None))


def test_decode_layers_rejects_nan_sites():
    from entropylens.core.decode import decode_layers

    acts = {s: torch.randn(2, 3, 8) for s in ("attn_in", "attn", "ffn_in", "ffn", "layer")}
    acts["ffn"][1, 0, 0] = math.nan
    with pytest.raises(UserError, match="NaN or infinite"):
        decode_layers(torch.randn(3, 8), acts, ("attn", "ffn", "layer"), Lens("bupo", torch.randn(50, 8), None,
                                                                              None, None), additive=True)


# ---------------------------------------------------------------- CLI options

@pytest.mark.parametrize("args,needle", [
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--batch-size", "-4"], "--batch-size must be a positive integer"),
    (["--limit", "-2"], "--limit must be a positive integer"),
    (["--limit", "many"], "--limit takes a positive integer or 'all'"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["--top-p", "0"], "--top-p in (0, 1]"),
    (["--top-p", "1.5"], "--top-p in (0, 1]"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--lens", "tuned"], "unknown --lens 'tuned'"),
    (["--sites", "attn,mlp"], "unknown site mlp"),
    (["--sites", ","], "unknown site (none)"),
    (["--backend", "vllm"], "unknown --backend 'vllm'"),
    (["--positions", "odd"], "unknown --positions 'odd'"),
    (["--long-prompts", "wrap"], "unknown --long-prompts 'wrap'"),
    (["--dtype", "int8"], "unknown --dtype 'int8'"),
    (["--device", "tpu:9"], "unknown --device"),
    (["--name", "../escape"], "invalid run name"),
    (["--resume", "no-such-run"], "no run 'no-such-run'"),
])
def test_bad_options_one_line_exit_2(small_folder, tmp_path, monkeypatch, capsys, args, needle):
    code, out, err = run_main(monkeypatch, capsys, "trace", "--model", str(small_folder), "--limit", "1",
                              "--max-new-tokens", "1", "--cache", str(tmp_path / "cache"), "--quiet", *args)
    assert code == 2, err
    line = one_line(err)
    assert line.startswith("error: ") and needle in line, line
    assert "Traceback" not in out
    assert not list((tmp_path / "cache").glob("runs/*/tokens.parquet"))


@pytest.mark.parametrize("args", [["--batch-size", "two"], ["--max-new-tokens", "1e3"], ["--no-such-option"]])
def test_malformed_options_are_usage_errors(tmp_path, monkeypatch, capsys, args):
    code, out, err = run_main(monkeypatch, capsys, "trace", "--cache", str(tmp_path), *args)
    assert code == 2 and "Traceback" not in out
    line = one_line(err)
    assert line.startswith(("error: Invalid value for '--", "error: No such option: --")), line
