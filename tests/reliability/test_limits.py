"""Resource limits: a batch that cannot fit is refused up front with a batch size that fits; long prompts are
rejected or truncated as asked, never silently mangled."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from harness import one_line, run_main
from tiny import make_byte_tokenizer
from entropylens.tracing import job as trace
from entropylens.errors import UserError
from entropylens.model.load import load_model
from entropylens.tracing.job import TraceConfig, batch_bytes, run_trace


@pytest.fixture(scope="module")
def loaded(small_folder):
    return load_model(str(small_folder))


def test_batch_estimate_covers_what_a_batch_really_captures(loaded):
    """The estimate is an upper bound of the activations the backend actually returns for a batch."""
    from entropylens.model.backends import make_backend
    from entropylens.model.layout import find_layout

    B, T = 3, 40
    layout = find_layout(loaded.model)
    acts = make_backend("nnsight", loaded.model, loaded.tokenizer, layout).capture(torch.randint(2, 200, (B, T)))
    captured = [acts.h0, acts.final_normed, *[x for xs in acts.sites.values() for x in xs]]
    real = sum(x.numel() * x.element_size() for x in captured)
    logits = B * T * loaded.info.vocab_size * 4
    assert real + logits <= batch_bytes(loaded, B, T) <= 3 * (2 * real + logits) + (16 << 20)


@pytest.mark.parametrize("free_batches", [0.5, 2.5])
def test_refuses_a_batch_that_does_not_fit_and_suggests_one(loaded, tmp_path, monkeypatch, free_batches):
    """Free memory = decode buffers + `free_batches` prompts: refuse --batch-size 8, suggest floor(that) if >= 1."""
    cfg = TraceConfig(model="small", limit=3, batch_size=8, max_new_tokens=4, sites=("layer",), cache=str(tmp_path),
                      name="big")
    T = max(len(make_byte_tokenizer()(p.text)["input_ids"]) for p in trace.load_prompts("arith", limit=3)) + 4
    per_prompt = batch_bytes(loaded, 2, T) - batch_bytes(loaded, 1, T)
    free = batch_bytes(loaded, 1, T) - per_prompt + int(free_batches * per_prompt)  # fixed buffers + that many
    monkeypatch.setattr(trace, "available_bytes", lambda device: free)
    with pytest.raises(UserError) as e:
        run_trace(cfg, progress=False, loaded=loaded)
    msg = str(e.value)
    assert f"a batch of 8 x {T} tokens needs" in msg and "\n" not in msg
    if free_batches >= 1:
        k = int(msg.rsplit("--batch-size ", 1)[1].split()[0])
        assert batch_bytes(loaded, k, T) <= free < batch_bytes(loaded, k + 1, T)
    else:
        assert "even one prompt does not fit" in msg
    assert not (tmp_path / "runs" / "big").exists()  # refused before anything was written


def long_prompts_file(tmp_path, n_long: int):
    path = tmp_path / "long.jsonl"
    long = " ".join(f"w{i}" for i in range(n_long))  # byte tokens: one per character
    path.write_text(json.dumps({"prompt": long}) + "\n" + json.dumps({"prompt": "What is 2 + 2?"}) + "\n")
    return path, long


def test_long_prompts_rejected_by_default_with_one_line(small_folder, tmp_path, monkeypatch, capsys):
    path, long = long_prompts_file(tmp_path, 80)
    n = len(long)  # the byte tokenizer: one token per character, no special tokens added
    assert len(make_byte_tokenizer()(long)["input_ids"]) == n > 256
    code, _, err = run_main(monkeypatch, capsys, "trace", "--model", str(small_folder), "--prompts", str(path),
                            "--limit", "all", "--max-new-tokens", "6", "--cache", str(tmp_path / "c"), "--quiet")
    assert code == 2
    assert one_line(err) == (f"error: prompt 0 has {n} tokens; with 6 new tokens it exceeds the model's context of "
                             "256 (--long-prompts truncate keeps its last 250)")


def test_long_prompts_truncated_keep_the_last_tokens_and_say_so(small_folder, tmp_path, monkeypatch, capsys):
    path, long = long_prompts_file(tmp_path, 80)
    tok = make_byte_tokenizer()
    code, _, err = run_main(monkeypatch, capsys, "trace", "--model", str(small_folder), "--prompts", str(path),
                            "--limit", "all", "--max-new-tokens", "6", "--long-prompts", "truncate", "--sites",
                            "layer", "--batch-size", "2", "--name", "t", "--cache", str(tmp_path / "c"), "--quiet")
    assert code == 0, err
    run = tmp_path / "c" / "runs" / "t"
    m = json.loads((run / "manifest.json").read_text())
    full = tok(long)["input_ids"]
    dropped = [{"prompt_idx": 0, "dropped_tokens": len(full) - 250}]
    assert m["long_prompts"] == {"mode": "truncate", "truncated": dropped}
    responses = [json.loads(x) for x in (run / "responses.jsonl").read_text().splitlines()]
    assert responses[0]["n_prompt_tokens"] == 250 and responses[0]["prompt"] == tok.decode(full[-250:])
    assert responses[1]["n_prompt_tokens"] == len(tok("What is 2 + 2?")["input_ids"])  # untouched
    tokens = pd.read_parquet(run / "tokens.parquet")
    first = tokens[tokens.prompt_idx == 0].sort_values("position")
    assert first["token_id"].tolist()[:250] == full[-250:]  # the kept tokens are the prompt's last ones
    assert len(first) <= 256


def test_no_room_for_the_response_is_refused_even_when_truncating(small_folder, tmp_path, monkeypatch, capsys):
    path, _ = long_prompts_file(tmp_path, 80)
    code, _, err = run_main(monkeypatch, capsys, "trace", "--model", str(small_folder), "--prompts", str(path),
                            "--max-new-tokens", "300", "--long-prompts", "truncate", "--cache", str(tmp_path / "c"))
    assert code == 2 and "lower --max-new-tokens" in one_line(err)
