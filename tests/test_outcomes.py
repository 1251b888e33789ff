"""Outcome-aware traces: scoring, outcome summaries, the correct − wrong interval and AUROC, each against an
independent computation; `--samples` across batch sizes and resume on a tiny model."""

from __future__ import annotations

import json
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from entropylens import store
from entropylens.errors import UserError
from entropylens.analysis.outcomes import auroc, auroc_ci, auroc_table, best_separators, outcome_diff
from entropylens.data.prompts import Prompt
from entropylens.data.rewards import score, trace_references
from entropylens.analysis.intervals import bootstrap_counts
from test_store import MANIFEST, L, V, make_batch

OUTCOME = {0: True, 1: False, 2: True, 3: False, 4: None, 5: False}  # prompt 4 has no reference


# ---------------------------------------------------------------- scoring

@pytest.mark.parametrize("completion,answer,rule,want", [
    (r"so the answer is \boxed{12}.", "12", "exact", (1.0, True)),
    ("I think 7, no wait, 8", "8", "exact", (1.0, True)),
    ("I think 7, no wait, 8", "7", "exact", (0.0, False)),
    ("The answer is 12", "12", "boxed", (0.0, False)),  # the strict rule wants a box
    (r"\boxed{1,000}", "1000", "boxed", (1.0, True)),
    ("about 7.0 apples", "7", "number", (1.0, True)),
    ("anything", None, "exact", (None, None)),  # no reference: null, never a guess
])
def test_score_hand_written_responses(completion, answer, rule, want):
    assert score(completion, answer, rule) == want


def test_trainer_and_trace_share_one_module():
    import entropylens.data.rewards as old
    import entropylens.data.rewards as new

    assert old.get_reward is new.get_reward and old.REWARDS is new.REWARDS


def _prompts(*answers):
    return [Prompt(text=f"q{i}", messages=None, answer=a, source="file:x.jsonl") for i, a in enumerate(answers)]


def test_bad_references_name_the_row_or_score_null():
    assert trace_references(_prompts(None, None), "exact") == [None, None]  # no reference column: all null
    assert trace_references(_prompts("2", " 4 "), "exact") == ["2", "4"]
    with pytest.raises(UserError, match=r"prompt 1 \(file:x.jsonl\) has an empty reference") as e:
        trace_references(_prompts("2", "  ", "3"), "exact")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="prompt 2 .* not a number"):
        trace_references(_prompts("2", "3", "x+1"), "number")
    assert trace_references(_prompts("2", "", None), "exact", bad="null") == ["2", None, None]
    assert trace_references(_prompts("2", "x"), "number", bad="null") == ["2", None]


# ---------------------------------------------------------------- a scored run, by hand

@pytest.fixture
def scored_run(tmp_path):
    frames = [make_batch(b, seed=i, n_response=2 + i) for i, b in enumerate([[0, 1], [2, 3], [4, 5]])]
    w = store.RunWriter(tmp_path, "scored", MANIFEST)
    for b, (tok, ent, resp) in enumerate(frames):
        for r in resp:
            c = OUTCOME[r["prompt_idx"]]
            r.update(reward=None if c is None else float(c), correct=c)
        w.write_batch(b, tok, ent, resp)
    run = w.finalize(V, L)
    entropy = pd.concat([f[1] for f in frames], ignore_index=True)
    return run, entropy


def test_outcomes_file_and_summary_by_outcome(scored_run):
    run, entropy = scored_run
    out = store.load_outcomes(run)
    assert out["prompt_idx"].tolist() == list(range(6))
    assert [None if pd.isna(x) else bool(x) for x in out["correct"]] == [OUTCOME[i] for i in range(6)]
    s = store.load_summary(run, outcome=None)
    assert set(s["outcome"]) == {"all", "correct", "wrong"}
    assert len(s) == 3 * 2 * (L + 1) * 8 * 3  # outcomes x lenses x layers x quantities x roles
    pd.testing.assert_frame_equal(store.load_summary(run), s[s.outcome == "all"].reset_index(drop=True))
    for outcome, ids in (("correct", [0, 2]), ("wrong", [1, 3, 5])):
        for lens, layer, q in product(("bupo", "logit"), range(1, L + 1), ("H_ffn", "dH_attn")):
            want = entropy[(entropy.lens == lens) & (entropy.layer == layer) & entropy.prompt_idx.isin(ids)
                           & (entropy.role == "response")][q]
            row = s[(s.outcome == outcome) & (s.lens == lens) & (s.layer == layer) & (s.quantity == q)
                    & (s.role == "response")].iloc[0]
            assert row["count"] == len(want)
            np.testing.assert_allclose(row["mean"], want.astype(np.float32).astype(np.float64).mean(), rtol=1e-6)


def test_outcome_diff_matches_a_naive_response_bootstrap(scored_run):
    run, entropy = scored_run
    d = outcome_diff(run, lens="bupo", quantities=("H_layer",), n_boot=4000).set_index("layer")
    ent = entropy[(entropy.lens == "bupo") & (entropy.role == "response")].astype({"H_layer": np.float32})
    groups = {k: [ent[ent.prompt_idx == p] for p in ids] for k, ids in (("c", [0, 2]), ("w", [1, 3, 5]))}
    rng = np.random.default_rng(123)  # a different generator and method: index resampling, loops
    for layer in range(L + 1):
        per = {k: [(g[g.layer == layer].H_layer.sum(), (g.layer == layer).sum()) for g in v]
               for k, v in groups.items()}
        pooled = {k: sum(s for s, _ in v) / sum(n for _, n in v) for k, v in per.items()}
        np.testing.assert_allclose(d.loc[layer, "mean_correct"], pooled["c"], rtol=1e-6)
        np.testing.assert_allclose(d.loc[layer, "diff"], pooled["c"] - pooled["w"], rtol=1e-6)
        boots = []
        for _ in range(4000):
            m = {}
            for k, v in per.items():
                pick = [v[i] for i in rng.integers(0, len(v), len(v))]
                m[k] = sum(s for s, _ in pick) / sum(n for _, n in pick)
            boots.append(m["c"] - m["w"])
        lo, hi = np.quantile(boots, [0.025, 0.975])
        spread = hi - lo
        assert abs(d.loc[layer, "lo"] - lo) < 0.1 * spread and abs(d.loc[layer, "hi"] - hi) < 0.1 * spread
    assert (d["n_correct"] == 2).all() and (d["n_wrong"] == 3).all()


def test_auroc_hand_computed_case():
    # wrong 3 beats both correct, wrong 2 beats 1 and ties 2: (1 + 1 + 1 + 0.5) / 4
    assert auroc(np.array([3.0, 2.0]), np.array([1.0, 2.0])) == 0.875
    assert auroc(np.array([1.0]), np.array([2.0, 3.0])) == 0.0
    w, c = np.array([3.0, 2.0, 5.0]), np.array([1.0, 2.0])
    value, lo, hi = auroc_ci(w, c, bootstrap_counts(3, 2000, 0), bootstrap_counts(2, 2000, 1))
    assert value == pytest.approx((1 + 1 + 1 + 0.5 + 1 + 1) / 6) and 0 <= lo <= value <= hi <= 1
    sep = auroc_ci(np.array([5.0, 6.0]), np.array([1.0, 2.0]), bootstrap_counts(2, 500, 0), bootstrap_counts(2, 500))
    assert sep == (1.0, 1.0, 1.0)  # perfect separation in every resample


def test_auroc_table_against_pairwise_counts(scored_run):
    run, entropy = scored_run
    t = auroc_table(run, n_boot=500)
    ent = entropy[entropy.role == "response"].astype({"H_ffn": np.float32, "H_layer": np.float32})
    for lens, layer, site in (("bupo", 2, "H_ffn"), ("logit", 0, "H_layer"), ("logit", 3, "H_layer")):
        means = ent[(ent.lens == lens) & (ent.layer == layer)].groupby("prompt_idx")[site].mean()
        w, c = means[[1, 3, 5]].to_numpy(), means[[0, 2]].to_numpy()
        pairs = [(x > y) + 0.5 * (x == y) for x in w for y in c]
        row = t[(t.lens == lens) & (t.layer == layer) & (t.site == site[2:])].iloc[0]
        assert row["auroc"] == pytest.approx(sum(pairs) / 6) and row["lo"] <= row["auroc"] <= row["hi"]
        assert (row["n_correct"], row["n_wrong"]) == (2, 3)
    assert len(t) == 2 * (L * 5 + 1)  # every site at layers 1..L, only H_layer at layer 0
    best = best_separators(t, 5)
    assert len(best) == 5 and (best["auroc"] - 0.5).abs().is_monotonic_decreasing


def test_baselines_output_entropy_and_length(scored_run):
    from entropylens.analysis.outcomes import baseline_aurocs

    run, _ = scored_run
    tok = store.load_tokens(run)
    h = tok[tok.role == "response"].groupby("prompt_idx").H_final.mean()
    pairs = [(x > y) + 0.5 * (x == y) for x in h[[1, 3, 5]] for y in h[[0, 2]]]
    b = baseline_aurocs(run, n_boot=500).set_index("baseline")
    assert b.loc["output entropy H_final", "auroc"] == pytest.approx(np.mean(pairs))
    # response lengths: correct 2 (prompt 0), 3 (prompt 2); wrong 2, 3, 4 (prompts 1, 3, 5):
    # wrong 2 vs (2, 3): 0.5 + 0; wrong 3: 1 + 0.5; wrong 4: 1 + 1  ->  4 / 6
    assert b.loc["response length", "auroc"] == pytest.approx(4 / 6)


def test_unscored_run_says_why(tmp_path):
    w = store.RunWriter(tmp_path, "plain", MANIFEST)
    w.write_batch(0, *make_batch([0, 1], seed=0))
    run = w.finalize(V, L)
    assert set(store.load_summary(run, outcome=None)["outcome"]) == {"all"}
    with pytest.raises(UserError, match="0 correct and 0 wrong"):
        outcome_diff(run)


# ---------------------------------------------------------------- trace: --samples, scoring, resume

def _trace(loaded, tmp_path, **kw):
    from entropylens.tracing.job import TraceConfig, run_trace

    base = dict(prompts="arith", limit=3, max_new_tokens=5, batch_size=2, lens="bupo", cache=str(tmp_path),
                samples=3)
    return run_trace(TraceConfig(**(base | kw)), progress=False, loaded=loaded)


def _responses(run):
    return [json.loads(x) for x in (run / "responses.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tiny_loaded(smol_tokenizer):
    from tiny import build_tiny, wrap

    return wrap(build_tiny("llama"), smol_tokenizer)


def test_samples_are_sequences_scored_and_independent_of_batch_size(tiny_loaded, tmp_path):
    a = _trace(tiny_loaded, tmp_path, name="b2", batch_size=2)
    b = _trace(tiny_loaded, tmp_path, name="b4", batch_size=4)
    ra, rb = _responses(a), _responses(b)
    assert [(r["prompt_idx"], r["source_idx"], r["sample"]) for r in ra] == [
        (3 * i + s, i, s) for i in range(3) for s in range(3)]
    assert [r["response"] for r in ra] == [r["response"] for r in rb]
    assert len({r["response"] for r in ra if r["source_idx"] == 0}) > 1  # samples differ
    for r in ra:  # every response scored by the shared rule against the built-in reference
        assert r["answer"] is not None and (r["reward"], r["correct"]) == score(r["response"], r["answer"])
    ea, eb = store.load_entropy(a), store.load_entropy(b)
    assert ea[["prompt_idx", "position", "layer"]].equals(eb[["prompt_idx", "position", "layer"]])
    np.testing.assert_allclose(ea["H_layer"], eb["H_layer"], atol=1e-4)
    m = store.read_manifest(a)
    assert m["samples"] == 3 and m["n_sequences"] == 9 and m["outcome"]["reward"] == "exact"


def test_samples_resume_is_identical(tiny_loaded, tmp_path, monkeypatch):
    from entropylens.tracing.job import TraceInterrupted, config_from_run, run_trace

    whole = _trace(tiny_loaded, tmp_path, name="whole")
    calls, real = [], store.RunWriter.write_batch

    def write_then_stop(self, b, *args):
        real(self, b, *args)
        calls.append(b)
        if len(calls) == 2:  # batch 2 starts mid-way through prompt 0's group of samples
            raise KeyboardInterrupt

    monkeypatch.setattr(store.RunWriter, "write_batch", write_then_stop)
    with pytest.raises(TraceInterrupted):
        _trace(tiny_loaded, tmp_path, name="cut")
    monkeypatch.setattr(store.RunWriter, "write_batch", real)
    cut = run_trace(config_from_run(str(tmp_path), "cut"), resume=True, progress=False, loaded=tiny_loaded)
    for name in ("tokens.parquet", "entropy.parquet", "summary.parquet", "outcomes.parquet", "responses.jsonl"):
        assert (whole / name).read_bytes() == (cut / name).read_bytes(), name


def test_samples_need_sampling(tmp_path):
    from entropylens.tracing.job import TraceConfig

    with pytest.raises(UserError, match="--samples > 1 needs sampling"):
        TraceConfig(samples=2, temperature=0).validate()
    with pytest.raises(UserError, match="--samples must be a positive integer"):
        TraceConfig(samples=0).validate()
    with pytest.raises(UserError, match="unknown --reward"):
        TraceConfig(reward="fuzzy").validate()


# ---------------------------------------------------------------- the CLI: MATH-500 as verl Parquet, bad rows

MATH500 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "verl-math" / "math500.parquet"


def _main(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    from entropylens.cli.commands import main

    monkeypatch.setattr(sys, "argv", ["entropylens", *argv])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_traces_verl_parquet_with_samples_and_shows_the_split(tiny_folder, tmp_path, monkeypatch, capsys):
    """The issue's 'done when' on a tiny model: references from reward_model.ground_truth, N samples each."""
    prompts = MATH500 if MATH500.is_file() else tmp_path / "verl.parquet"
    if not MATH500.is_file():  # a fresh clone without ../shared: the same verl layout, written here
        pd.DataFrame({"prompt": [[{"role": "user", "content": f"What is {i} + 1?"}] for i in range(2)],
                      "reward_model": [{"ground_truth": str(i + 1), "style": "rule"} for i in range(2)]}
                     ).to_parquet(prompts)
    cache = str(tmp_path / "cache")
    code, _, err = _main(monkeypatch, capsys, "trace", "--model", str(tiny_folder), "--prompts", str(prompts),
                         "--limit", "2", "--samples", "2", "--max-new-tokens", "4", "--cache", cache, "--name", "m",
                         "--quiet")
    assert code == 0, err
    rows = _responses(Path(cache) / "runs" / "m")
    assert [(r["source_idx"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["answer"] and r["correct"] is not None for r in rows)
    code, out, err = _main(monkeypatch, capsys, "show", "m", "--by", "outcome", "--cache", cache)
    assert code == 0, err
    n_c = sum(r["correct"] for r in rows)
    assert f"{n_c} correct vs {4 - n_c} wrong responses" in out.replace("\n", " ")


def test_cli_bad_reference_row_is_one_line_or_null(tiny_folder, tmp_path, monkeypatch, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?", "answer": "  "}\n')
    cache = str(tmp_path / "cache")
    common = ["trace", "--model", str(tiny_folder), "--prompts", str(f), "--max-new-tokens", "3", "--cache", cache,
              "--quiet"]
    code, out, err = _main(monkeypatch, capsys, *common, "--name", "bad")
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and "prompt 1 (file:p.jsonl) has an empty reference" in lines[0]
    assert "--bad-references null" in lines[0] and "Traceback" not in err + out
    code, _, err = _main(monkeypatch, capsys, *common, "--name", "nulled", "--bad-references", "null")
    assert code == 0, err
    rows = _responses(Path(cache) / "runs" / "nulled")
    assert rows[0]["correct"] is not None and rows[1]["reward"] is None and rows[1]["correct"] is None
    assert store.read_manifest(Path(cache) / "runs" / "nulled")["outcome"]["scored_null"] == [1]
