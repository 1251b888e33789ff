"""Run-folder storage: schema, crash safety, resume, readers (pandas / DuckDB / polars), summary stats."""

from __future__ import annotations

import functools
import json
import math
import os

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.parquet as pq
import pytest

from entropylens import store
from entropylens.store import read
from entropylens.store import schema as store_schema
from entropylens.errors import UserError
from entropylens.store import QUANTITIES, SITES, RunWriter

V, L = 40, 3  # vocabulary, layers
MANIFEST = {"model": {"id": "tiny", "architecture": "LlamaForCausalLM", "n_layers": L, "vocab_size": V},
            "lens": ["bupo", "logit"], "prompts": {"source": "arith", "n": 6}}


def _entropy_p1_top1(logits: np.ndarray):
    """fp64 softmax entropy (nats), top-1 probability and id along the last axis."""
    z = logits - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return -(p * np.log(p)).sum(-1), p.max(-1), p.argmax(-1)


def make_batch(prompt_ids: list[int], seed: int, lenses=("bupo", "logit"), n_response: int = 3):
    """Synthetic tokens / entropy / responses frames for some prompts, following docs/storage.md."""
    rng = np.random.default_rng(seed)
    tok_rows, ent_rows, responses = [], [], []
    for p in prompt_ids:
        n_prompt = 2 + p % 3
        ids = rng.integers(0, V, n_prompt + n_response)
        T = len(ids)
        roles = ["prompt" if t + 1 < n_prompt else "response" if t + 1 < T else "next" for t in range(T)]
        h_final, _, _ = _entropy_p1_top1(rng.normal(size=(T, V)) * 3)
        for t in range(T):
            tok_rows.append({"prompt_idx": p, "position": t, "token_id": ids[t],
                             "token_text": f"<{ids[t]}>é",
                             "role": roles[t], "target_id": ids[t + 1] if t + 1 < T else -1,
                             "H_final": h_final[t], "logprob_target": -1.5 if t + 1 < T else np.nan})
        for lens in lenses:
            for t in range(T):
                H, p1, top1 = _entropy_p1_top1(rng.normal(size=(L + 1, 5, V)) * rng.uniform(0.5, 4))
                H[0, :4] = p1[0, :4] = np.nan  # layer 0: only the embedding (H_layer)
                top1[0, :4] = -1
                for layer in range(L + 1):
                    row = {"lens": lens, "prompt_idx": p, "position": t, "layer": layer, "role": roles[t]}
                    row.update({f"H_{s}": H[layer, i] for i, s in enumerate(SITES)})
                    row.update(dH_attn=H[layer, 1] - H[layer, 0], dH_ffn=H[layer, 3] - H[layer, 2],
                               dH_layer=H[layer, 4] - H[layer - 1, 4] if layer else np.nan)
                    row.update({f"top1_{s}": int(top1[layer, i]) for i, s in enumerate(SITES)})
                    row.update({f"p1_{s}": p1[layer, i] for i, s in enumerate(SITES)})
                    ent_rows.append(row)
        responses.append({"prompt_idx": p, "prompt": f"q{p}", "response": "r", "answer": None,
                          "n_prompt_tokens": n_prompt, "n_response_tokens": n_response})
    tokens = pd.DataFrame(tok_rows).sample(frac=1, random_state=seed)  # writer must sort
    entropy = pd.DataFrame(ent_rows).sample(frac=1, random_state=seed)
    return tokens, entropy, responses


BATCHES = [[0, 1], [2, 3], [4, 5]]


@functools.lru_cache
def batch(b: int):
    return make_batch(BATCHES[b], seed=b)  # callers never mutate these frames


def write_run(cache, run_id="run-a", batches=range(3)):
    w = RunWriter(cache, run_id, MANIFEST)
    for b in batches:
        w.write_batch(b, *batch(b))
    return w


def expected_frames():
    parts = [batch(b) for b in range(3)]
    tokens = pd.concat([p[0] for p in parts]).sort_values(store_schema.TOKENS_SORT, ignore_index=True)
    entropy = pd.concat([p[1] for p in parts]).sort_values(store_schema.ENTROPY_SORT, ignore_index=True)
    return tokens, entropy


def assert_same(got: pd.DataFrame, want: pd.DataFrame):
    assert list(got.columns) == list(want.columns)
    for c in want.columns:
        if want[c].dtype.kind == "f":
            np.testing.assert_allclose(got[c].to_numpy(float), want[c].to_numpy(float), rtol=1e-6, err_msg=c)
        else:
            assert got[c].astype(str).tolist() == want[c].astype(str).tolist(), c


def test_roundtrip_with_pandas_duckdb_polars(tmp_path):
    run_dir = write_run(tmp_path).finalize(V, L)
    assert sorted(os.listdir(run_dir)) == ["entropy.parquet", "manifest.json", "outcomes.parquet",
                                           "responses.jsonl", "summary.parquet", "tokens.parquet"]
    tokens, entropy = expected_frames()
    schema = pq.read_schema(run_dir / "entropy.parquet")
    assert str(schema.field("layer").type) == "int16" and str(schema.field("H_attn").type) == "float"
    assert str(pq.read_schema(run_dir / "tokens.parquet").field("prompt_idx").type) == "int32"
    for got in (store.load_tokens(run_dir), pd.read_parquet(run_dir / "tokens.parquet"),
                duckdb.sql(f"select * from '{run_dir}/tokens.parquet'").df(),
                pl.read_parquet(run_dir / "tokens.parquet").to_pandas()):
        assert_same(got, tokens)
    for got in (store.load_entropy(run_dir), duckdb.sql(f"select * from '{run_dir}/entropy.parquet'").df(),
                pl.read_parquet(run_dir / "entropy.parquet").to_pandas()):
        assert_same(got, entropy)
    # not-traced sites are NaN (not null), and DuckDB must not prune them away via row-group stats
    (n_nan, mean), = duckdb.sql(f"select count(*), avg(H_layer) from '{run_dir}/entropy.parquet' "
                                "where isnan(H_attn) and lens = 'bupo'").fetchall()
    layer0 = entropy[(entropy.layer == 0) & (entropy.lens == "bupo")]
    assert n_nan == len(layer0) > 0
    np.testing.assert_allclose(mean, layer0.H_layer.astype(np.float32).mean(), rtol=1e-6)
    lines = [json.loads(x) for x in (run_dir / "responses.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["prompt_idx"] for r in lines] == list(range(6))
    assert list(lines[0]) == [*store_schema.RESPONSE_KEYS, *store_schema.OUTCOME_KEYS]
    assert lines[0]["reward"] is None and lines[0]["correct"] is None and lines[0]["sample"] == 0
    m = store.read_manifest(run_dir)
    assert m["status"] == "complete" and m["finished"] and m["n_tokens"] == len(tokens)
    assert m["n_response_tokens"] == (tokens["role"] == "response").sum()


def test_projection_and_filters(tmp_path):
    run_dir = write_run(tmp_path).finalize(V, L)
    _, entropy = expected_frames()
    got = store.load_entropy(run_dir, columns=["position", "H_layer"],
                             filters=[("prompt_idx", "==", 3), ("lens", "==", "logit")])
    want = entropy[(entropy.prompt_idx == 3) & (entropy.lens == "logit")][["position", "H_layer"]]
    assert_same(got, want.reset_index(drop=True))
    with pytest.raises(UserError, match="nope"):
        store.load_tokens(run_dir, columns=["nope"])


def _independent_summary(entropy: pd.DataFrame) -> dict:
    out = {}
    for (lens, layer), g in entropy.groupby(["lens", "layer"]):
        for q in QUANTITIES:
            for role in ("prompt", "response", "next", "all"):
                x = (g if role == "all" else g[g.role == role])[q].to_numpy(np.float64)
                x = x[~np.isnan(x)]
                out[lens, layer, q, role] = (len(x), x.mean() if len(x) else np.nan,
                                             x.std(ddof=1) if len(x) > 1 else np.nan,
                                             *(np.quantile(x, [.25, .5, .75]) if len(x) else [np.nan] * 3))
    return out


def test_summary_matches_independent_stats(tmp_path):
    run_dir = write_run(tmp_path).finalize(V, L)
    _, entropy = expected_frames()
    entropy = entropy.astype({q: np.float32 for q in QUANTITIES})  # what is stored
    want = _independent_summary(entropy)
    summary = store.load_summary(run_dir)
    assert len(summary) == 2 * (L + 1) * len(QUANTITIES) * 3
    assert str(pq.read_schema(run_dir / "summary.parquet").field("count").type) == "int64"
    for row in summary.itertuples():
        n, mean, std, q25, med, q75 = want[row.lens, row.layer, row.quantity, row.role]
        assert row.count == n
        np.testing.assert_allclose([row.mean, row.std, row.q25, row.median, row.q75],
                                   [mean, std, q25, med, q75], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(row.mean_norm, mean / math.log(V), rtol=1e-9)
        assert row.rel_depth == row.layer / L
    by = summary.set_index(["lens", "layer", "quantity", "role"])["count"]
    for (lens, layer, q, role), n in by.items():
        if role == "all":
            n_next = want[lens, layer, q, "next"][0]
            assert n == by[lens, layer, q, "prompt"] + by[lens, layer, q, "response"] + n_next
    assert (summary[(summary.layer == 0) & (summary.quantity == "H_attn")]["count"] == 0).all()


def test_summary_without_response_rows_keeps_full_grid():
    _, entropy, _ = make_batch([0], seed=1, lenses=("bupo",), n_response=0)
    s = store.compute_summary(entropy, V, L)
    assert len(s) == (L + 1) * len(QUANTITIES) * 3
    resp = s[s.role == "response"]
    assert (resp["count"] == 0).all() and resp["mean"].isna().all()


def test_layer_table(tmp_path):
    run_dir = write_run(tmp_path).finalize(V, L)
    _, entropy = expected_frames()
    sel = entropy[(entropy.lens == "logit") & (entropy.role == "response")]
    sel = sel.astype({q: np.float32 for q in QUANTITIES})
    want = sel.groupby("layer")[["H_layer", "H_attn", "H_ffn", "dH_attn", "dH_ffn", "dH_layer"]].mean()
    got = store.layer_table(run_dir, lens="logit").set_index("layer")
    np.testing.assert_allclose(got.to_numpy(float), want.to_numpy(float), rtol=1e-6)
    assert list(got.columns) == list(want.columns)
    with pytest.raises(UserError):
        store.layer_table(run_dir, lens="nope")


def test_manifest_stays_running_until_finalize(tmp_path):
    w = write_run(tmp_path, batches=range(2))
    assert store.read_manifest(w.run_dir)["status"] == "running"
    w.update_manifest(timings={"trace_s": 1.0})
    assert store.read_manifest(w.run_dir)["timings"] == {"trace_s": 1.0}
    assert store.read_manifest(w.run_dir)["status"] == "running"
    with pytest.raises(UserError, match="not complete"):
        store.load_entropy(w.run_dir)
    assert not (w.run_dir / "entropy.parquet").exists()


def test_resume_after_crash_equals_straight_run(tmp_path):
    straight = write_run(tmp_path / "a").finalize(V, L)
    w = write_run(tmp_path / "b", batches=range(2))
    del w  # killed: no finalize, no fail
    parts = tmp_path / "b" / "runs" / "run-a" / "parts"
    (parts / "tokens-00002.parquet.tmp").write_bytes(b"half a file")
    (parts / "entropy-00002.parquet").write_bytes(b"batch 2 cut short before its responses part")
    w = RunWriter(tmp_path / "b", "run-a", MANIFEST, resume=True)
    assert w.done_batches() == {0, 1} and w.previous_manifest["status"] == "running"
    assert sorted(p.name for p in parts.iterdir()) == sorted(
        f"{k}-0000{b}.{'jsonl' if k == 'responses' else 'parquet'}"
        for k in ("tokens", "entropy", "responses") for b in (0, 1))
    w.write_batch(2, *batch(2))
    resumed = w.finalize(V, L)
    for name in ("tokens.parquet", "entropy.parquet", "summary.parquet", "responses.jsonl"):
        assert (straight / name).read_bytes() == (resumed / name).read_bytes(), name


def test_crash_during_finalize_never_looks_complete(tmp_path, monkeypatch):
    w = write_run(tmp_path)
    real = os.replace

    def crash_on_entropy(src, dst):
        if str(dst).endswith("entropy.parquet"):
            raise KeyboardInterrupt("killed")
        real(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_entropy)
    with pytest.raises(KeyboardInterrupt):
        w.finalize(V, L)
    monkeypatch.setattr(os, "replace", real)
    assert (w.run_dir / "tokens.parquet").exists()  # merged early, but the run is not complete
    assert store.read_manifest(w.run_dir)["status"] == "running"
    with pytest.raises(UserError, match="not complete"):
        store.load_tokens(w.run_dir)
    w2 = RunWriter(tmp_path, "run-a", MANIFEST, resume=True)
    assert w2.done_batches() == {0, 1, 2} and not list(w2.run_dir.glob("*.tmp"))
    assert store.load_tokens(w2.finalize(V, L)).shape[0] == len(expected_frames()[0])


def test_fail_keeps_parts_and_context_manager(tmp_path):
    with pytest.raises(RuntimeError):
        with write_run(tmp_path, batches=range(1)) as w:
            raise RuntimeError("out of memory\ntraceback...")
    m = store.read_manifest(w.run_dir)
    assert m["status"] == "failed" and m["error"] == "RuntimeError: out of memory"
    assert RunWriter(tmp_path, "run-a", MANIFEST, resume=True).done_batches() == {0}
    assert store.read_manifest(w.run_dir)["status"] == "running"


def test_write_batch_validates_and_casts(tmp_path):
    w = RunWriter(tmp_path, "v", MANIFEST)
    tokens, entropy, responses = batch(0)
    with pytest.raises(ValueError, match="H_final"):
        w.write_batch(0, tokens.drop(columns="H_final"), entropy, responses)
    with pytest.raises(ValueError, match="role"):
        w.write_batch(0, tokens.assign(role="assistant"), entropy, responses)
    with pytest.raises(ValueError, match="duplicate"):
        w.write_batch(0, pd.concat([tokens, tokens]), entropy, responses)
    with pytest.raises(ValueError, match="prompt_idx"):
        w.write_batch(0, tokens.assign(prompt_idx=0.5), entropy, responses)
    with pytest.raises(ValueError, match="keys"):
        w.write_batch(0, tokens, entropy, [{"prompt_idx": 0}])
    assert w.done_batches() == set()
    w.write_batch(0, tokens.astype({"position": "int64", "H_final": "float64"}), entropy, responses)
    assert str(pq.read_schema(w.parts / "tokens-00000.parquet").field("position").type) == "int32"


def test_resolve_run(tmp_path):
    cache = tmp_path / "cache"
    run_dir = write_run(cache, batches=[]).run_dir
    assert store.resolve_run(cache, "run-a") == run_dir.resolve()
    outside = tmp_path / "outside"
    outside.mkdir()
    (cache / "runs" / "escape").symlink_to(outside)
    (cache / "runs" / "plainfile").write_text("x")
    for bad in ("../x", "..", ".", "/etc", "a/b", "%2e%2e", "..%2f", "run-a\n", "", "escape", "plainfile",
                "nope"):
        with pytest.raises(UserError):
            store.resolve_run(cache, bad)


def test_list_runs_survives_corrupt_manifest(tmp_path):
    write_run(tmp_path, "good").finalize(V, L)
    write_run(tmp_path, "busy", batches=[0])
    bad = tmp_path / "runs" / "broken"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    (tmp_path / "runs" / "nomanifest").mkdir()
    runs = store.list_runs(tmp_path).set_index("run_id")
    assert list(store.list_runs(tmp_path).columns) == read.LIST_COLUMNS
    assert runs.loc["good", "status"] == "complete" and runs.loc["busy", "status"] == "running"
    assert runs.loc["broken", "status"] == "corrupt" and runs.loc["nomanifest", "status"] == "corrupt"
    assert runs.loc["good", "lens"] == "bupo,logit" and runs.loc["good", "model"] == "tiny"
    assert store.list_runs(tmp_path / "empty").empty


def test_user_errors(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="cannot create"):
        RunWriter(tmp_path / "afile" / "x", "r", MANIFEST)
    write_run(tmp_path, "dup", batches=[]).fail("stopped")
    with pytest.raises(UserError, match="already exists"):
        RunWriter(tmp_path, "dup", MANIFEST)
    done = write_run(tmp_path, "done").finalize(V, L)
    with pytest.raises(UserError, match="already complete"):
        RunWriter(tmp_path, "done", MANIFEST, resume=True)
    with pytest.raises(UserError):
        RunWriter(tmp_path, "missing", MANIFEST, resume=True)
    (done / "entropy.parquet").write_bytes(b"garbage")
    with pytest.raises(UserError, match="entropy.parquet"):
        store.load_entropy(done)
    (done / "summary.parquet").unlink()
    with pytest.raises(UserError, match="summary.parquet"):
        store.load_summary(done)
    (done / "manifest.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="manifest.json"):
        store.read_manifest(done)


def test_new_run_id():
    assert store.new_run_id("my.run_1") == "my.run_1"
    rid = store.new_run_id(tag="SmolLM2 / arith")
    assert store.RUN_ID_RE.fullmatch(rid) and rid.endswith("-smollm2-arith") and rid[:8].isdigit()
    for bad in ("../x", ".hidden", "a b", "x" * 129):
        with pytest.raises(UserError):
            store.new_run_id(bad)


def test_run_folder_sets_status_once(tmp_path):
    """Any kind of run (here a trainer-like one): running at start, complete once, never back to running."""
    from entropylens.store.folder import RunFolder

    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    folder = RunFolder.start(run, {"run_id": "t", "kind": "bupo", "created": "then"})
    assert store.read_manifest(run)["status"] == "running"
    with pytest.raises(ValueError, match="status"):
        folder.update(status="complete")
    folder.update(stage="trained")
    folder.complete(stage="done")
    m = store.read_manifest(run)
    assert (m["status"], m["stage"], m["error"]) == ("complete", "done", None) and m["finished"]
    with pytest.raises(ValueError, match="already complete"):
        folder.complete()
    with pytest.raises(UserError, match="already complete"):
        RunFolder.start(run, {"kind": "bupo"}, resume=True)
    assert not list(run.glob("*.tmp"))


def test_run_folder_resume_keeps_what_was_recorded(tmp_path):
    from entropylens.store.folder import RunFolder

    run = tmp_path / "r"
    run.mkdir()
    RunFolder.start(run, {"created": "first", "kind": "bupo"}).fail("boom")
    assert store.read_manifest(run)["status"] == "failed"
    folder = RunFolder.start(run, {"created": "second", "extra": 1}, resume=True)
    m = store.read_manifest(run)
    assert (m["status"], m["error"], m["created"], m["extra"]) == ("running", None, "first", 1)
    assert folder.manifest == m
