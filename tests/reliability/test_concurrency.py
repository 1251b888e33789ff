"""Two traces writing to one cache at once; the dashboard and `entropylens runs` while runs are being written."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from harness import FAST, assert_same_run, popen, run_main
from serving import dash_call, flow_figure
from entropylens import store
from entropylens.errors import UserError
from entropylens.tracing.job import TraceConfig, run_trace


def assert_intact(run: Path, n_prompts: int) -> None:
    """Complete, parts gone, and the merged files agree with each other and with the manifest."""
    m = store.read_manifest(run)
    assert m["status"] == "complete" and not (run / "parts").exists() and not list(run.rglob("*.tmp"))
    tokens, entropy = pd.read_parquet(run / "tokens.parquet"), pd.read_parquet(run / "entropy.parquet")
    assert len(tokens) == m["n_tokens"] and len(entropy) == m["n_tokens"] * (m["model"]["n_layers"] + 1)
    lines = [json.loads(x) for x in (run / "responses.jsonl").read_text().splitlines()]
    assert [r["prompt_idx"] for r in lines] == list(range(n_prompts))
    assert sum(r["n_prompt_tokens"] + r["n_response_tokens"] for r in lines) == len(tokens)
    pq.read_table(run / "summary.parquet")


@pytest.mark.reliability
def test_two_traces_one_cache_listing_and_dashboard_meanwhile(small_folder, tmp_path, reference, monkeypatch, capsys):
    from entropylens.app.data import list_runs as app_runs
    from entropylens.app.server import create_app
    from entropylens.cli import commands as cli

    cache = tmp_path / "cache"
    # default names: both start in the same second, so the second needs a fresh name, not an error
    procs = [popen("trace", "--model", str(small_folder), *FAST, "--seed", str(s), "--cache", str(cache))
             for s in (0, 1)]
    runs = cache / "runs"
    deadline = time.time() + 240
    def wrote_a_batch(run: Path) -> bool:  # a finished batch, or already merged (a fast run may be done)
        return any((run / "parts").glob("responses-*.jsonl")) or (run / "responses.jsonl").exists()

    while time.time() < deadline and sum(wrote_a_batch(r) for r in runs.glob("*")) < 2:
        assert all(p.poll() in (None, 0) for p in procs), [p.stderr.read() for p in procs]
        time.sleep(0.05)

    # meanwhile: `entropylens runs`, the dashboard's run table and a figure request on a run being written
    monkeypatch.setattr(cli.out, "width", 250)
    code, out, _ = run_main(monkeypatch, capsys, "runs", "--cache", str(cache))
    listing = store.list_runs(cache)
    assert code == 0 and len(listing) == 2
    for row in listing.itertuples():
        assert row.run_id in out and row.status in ("running", "complete")
    table = app_runs(cache)
    assert set(table["status"]) <= {"running", "complete"} and len(table) == 2
    client = create_app(cache).server.test_client()
    assert client.get("/").status_code == 200
    for run_id in listing["run_id"]:
        if store.read_manifest(runs / run_id)["status"] == "running":
            fig = flow_figure(client, run_id)
            assert fig["data"] == [] and "not a complete trace run" in fig["layout"]["annotations"][0]["text"]

    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    ids = sorted(d.name for d in runs.iterdir())
    assert len(ids) == 2
    seed0 = [r for r in ids if store.read_manifest(runs / r)["seed"] == 0][0]
    for r in ids:
        assert_intact(runs / r, int(FAST[FAST.index("--limit") + 1]))
    assert_same_run(runs / seed0, reference)  # a concurrent writer changed nothing in the other's data
    assert set(store.list_runs(cache)["status"]) == {"complete"}
    assert flow_figure(client, seed0)["data"]  # the dashboard now draws it


def test_same_second_default_names_get_distinct_runs(small_folder, tmp_path, monkeypatch):
    """In-process and deterministic: the clock frozen, so both runs ask for the same timestamped name."""
    from entropylens.tracing import job as trace
    from entropylens.model.load import load_model

    loaded = load_model(str(small_folder))
    monkeypatch.setattr(trace, "new_run_id", lambda name, tag=None: "20260101-000000-llama-arith")
    cfg = dict(model=str(small_folder), limit=1, max_new_tokens=2, sites=("layer",), cache=str(tmp_path))
    a = run_trace(TraceConfig(**cfg), progress=False, loaded=loaded)
    b = run_trace(TraceConfig(**cfg), progress=False, loaded=loaded)
    assert (a.name, b.name) == ("20260101-000000-llama-arith", "20260101-000000-llama-arith-2")
    assert_intact(a, 1)
    assert_intact(b, 1)
    named = dict(cfg, name=a.name)
    with pytest.raises(UserError, match="already exists in .*; pick a new name or resume"):
        run_trace(TraceConfig(**named), progress=False, loaded=loaded)  # an explicit name is never changed


def test_dashboard_on_a_run_with_parts_only(small_folder, tmp_path, monkeypatch):
    """A run stopped after 2 of 3 batches (parts/ only, status running or failed): listed, drawn as a message."""
    from entropylens.app.data import list_runs as app_runs
    from entropylens.app.server import create_app
    from entropylens.tracing import job as trace
    from entropylens.model.load import load_model

    loaded = load_model(str(small_folder))
    real, calls = trace.trace_batch, []

    def stop_at_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trace, "trace_batch", stop_at_third)
    cfg = TraceConfig(model=str(small_folder), limit=3, batch_size=1, max_new_tokens=2, sites=("layer",),
                      cache=str(tmp_path), name="partial")
    with pytest.raises(trace.TraceInterrupted):
        run_trace(cfg, progress=False, loaded=loaded)
    run = tmp_path / "runs" / "partial"
    assert store.read_manifest(run)["status"] == "failed"
    parts = sorted(f.name for f in (run / "parts").iterdir())  # two finished batches, top-K lists included
    assert parts == sorted(f"{kind}-{b:05d}.{ext}" for b in (0, 1) for kind, ext in
                           (("tokens", "parquet"), ("entropy", "parquet"), ("topk", "parquet"), ("responses", "jsonl")))
    shutil.copytree(run, tmp_path / "runs" / "running")  # the same folder as a live writer shows it
    m = json.loads((run / "manifest.json").read_text())
    (tmp_path / "runs" / "running" / "manifest.json").write_text(json.dumps({**m, "run_id": "running",
                                                                             "status": "running"}))
    status = app_runs(tmp_path).set_index("run_id")["status"]
    assert status["running"] == "running" and status["partial"].startswith("failed: KeyboardInterrupt")
    client = create_app(tmp_path).server.test_client()
    assert client.get("/").status_code == 200
    for run_id in ("partial", "running"):
        fig = flow_figure(client, run_id)
        assert fig["data"] == [] and "not a complete trace run" in fig["layout"]["annotations"][0]["text"]
        heat = dash_call(client, "heatmap-graph.figure", [
            ("focus-run", "value", run_id), ("tokens-lens", "value", "bupo"), ("tokens-prompt", "value", 0),
            ("tokens-site", "value", "layer"), ("tokens-quantity", "value", "H")])["heatmap-graph"]["figure"]
        assert heat["data"] == [] and heat["layout"]["annotations"]
        opts = dash_call(client, "tokens-prompt.options tokens-prompt.value tokens-lens.options tokens-lens.value",
                         [("focus-run", "value", run_id)],
                         [("tokens-prompt", "value", None), ("tokens-lens", "value", None)])
        assert opts["tokens-prompt"]["options"] == []
