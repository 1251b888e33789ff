"""Sharded tracing under torchrun (gloo, 2 CPU processes): the same rows as one process, resumable per shard."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from entropylens import store
from entropylens.tracing.shard import Shard
from entropylens.tracing.job import TraceConfig, run_trace

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
# 12 prompts in 12 batches: rank 0 traces batches 0, 2, 4 ..., rank 1 batches 1, 3, 5 ...
ARGS = ["--limit", "12", "--batch-size", "1", "--max-new-tokens", "4", "--sites", "attn,layer", "--quiet"]
FILES = ("tokens.parquet", "entropy.parquet", "summary.parquet", "responses.jsonl", "topk.parquet")


def torchrun(n: int, *args: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "entropylens", "trace", *args]
    return subprocess.Popen(cmd, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (the agent starts them in sessions of their own)."""
    import psutil

    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=30)
    proc.communicate()


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


def digest(run: Path) -> dict[str, str]:
    return {f: hashlib.sha256((run / f).read_bytes()).hexdigest() for f in FILES}


@pytest.fixture(scope="module")
def reference(tiny_folder, tmp_path_factory) -> Path:
    """The one-process run every sharded run must reproduce byte for byte."""
    cache = tmp_path_factory.mktemp("ref")
    cfg = TraceConfig(model=str(tiny_folder), limit=12, batch_size=1, max_new_tokens=4, sites=("attn", "layer"),
                      name="ref", cache=str(cache))
    return run_trace(cfg, progress=False)


def test_batches_go_round_robin():
    shards = [Shard(r, 3, r) for r in range(3)]
    owners = [[s.rank for s in shards if s.owns(b)] for b in range(7)]
    assert owners == [[0], [1], [2], [0], [1], [2], [0]]


def test_two_ranks_write_exactly_the_rows_of_one(tiny_folder, tmp_path, reference):
    cache = tmp_path / "cache"
    out = finish(torchrun(2, "--model", str(tiny_folder), *ARGS, "--cache", str(cache)))
    runs = list((cache / "runs").iterdir())
    assert len(runs) == 1, runs  # both ranks agreed on the timestamped run id
    run = runs[0]
    assert out.count("complete") == 1  # rank 0 prints the result, once
    assert digest(run) == digest(reference)  # merged files byte-identical to the one-process run
    m = store.read_manifest(run)
    assert m["status"] == "complete" and m["n_tokens"] == store.read_manifest(reference)["n_tokens"]
    assert m["shards"]["world_size"] == 2 and len(m["shards"]["timings_by_rank"]) == 2
    assert not (run / "parts").exists()
    # Readers see one dataset: CLI, DuckDB.
    import duckdb

    n = duckdb.sql(f"select count(*) from read_parquet('{run / 'entropy.parquet'}')").fetchall()[0][0]
    assert n == len(pd.read_parquet(reference / "entropy.parquet"))


def test_killed_sharded_run_resumes_per_shard(tiny_folder, tmp_path, reference):
    """SIGKILL both ranks mid-run, then resume with two ranks: each skips its finished batches."""
    cache = tmp_path / "cache"
    run = cache / "runs" / "k"
    proc = torchrun(2, "--model", str(tiny_folder), *ARGS, "--cache", str(cache), "--name", "k")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list(run.glob("parts/responses-*"))) < 2:
        time.sleep(0.02)
    kill_tree(proc)
    done = sorted(int(p.stem.split("-")[1]) for p in run.glob("parts/responses-*.jsonl"))
    assert store.read_manifest(run)["status"] == "running", "the run finished before the kill"
    assert 2 <= len(done) < 12, done
    resumed = finish(torchrun(2, "--resume", "k", "--cache", str(cache)))
    assert "complete" in resumed
    assert digest(run) == digest(reference)


def test_one_process_can_finish_a_sharded_run(tiny_folder, tmp_path, reference, monkeypatch):
    """Parts are per global batch, so a run interrupted under one world size resumes under another."""
    import entropylens.tracing.job as trace_mod

    cache = tmp_path / "cache"
    real, calls = trace_mod.trace_batch, []

    def stop_at_fourth(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trace_mod, "trace_batch", stop_at_fourth)
    cfg = TraceConfig(model=str(tiny_folder), limit=12, batch_size=1, max_new_tokens=4, sites=("attn", "layer"),
                      name="x", cache=str(cache))
    with pytest.raises(KeyboardInterrupt):
        run_trace(cfg, progress=False)
    monkeypatch.setattr(trace_mod, "trace_batch", real)
    finish(torchrun(2, "--resume", "x", "--cache", str(cache)))
    assert digest(cache / "runs" / "x") == digest(reference)
    assert json.loads((cache / "runs" / "x" / "manifest.json").read_text())["shards"]["world_size"] == 2
