"""Synthetic cache for the dashboard tests (shared by conftest.py, the tests and the benchmark)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from synthetic import SyntheticRun, write_bupo_run, write_run

# Newest first in the table: llama-after (child of llama-base), qwen3-base, llama-base.
RUNS = {
    "llama-base": SyntheticRun("llama-base", family="llama", n_layers=6, vocab_size=80, lenses=("bupo", "logit"),
                               created="2026-01-01T10:00:00+00:00", seed=1),
    "qwen3-base": SyntheticRun("qwen3-base", family="qwen3", n_layers=8, vocab_size=120, boundary=3,
                               created="2026-01-02T10:00:00+00:00", seed=2),
    "llama-after": SyntheticRun("llama-after", family="llama", n_layers=6, vocab_size=80, parent_run="llama-base",
                                boundary=2, created="2026-01-04T10:00:00+00:00", seed=3),
    "llama-scored": SyntheticRun("llama-scored", family="llama", n_layers=6, vocab_size=80, n_prompts=40,
                                 lenses=("bupo", "logit"), created="2025-12-31T10:00:00+00:00", seed=4,
                                 correct_frac=0.4),
}


def build_cache(root: Path) -> Path:
    """Tiny Llama-like and Qwen3-like runs, a BuPO child + trainer run, and three broken folders."""
    for spec in RUNS.values():
        write_run(root, spec)
    write_bupo_run(root, "bupo-train", steps=24, internal_steps=10, layer_k=2, parent_run="llama-base")
    runs = root / "runs"
    (runs / "broken-json").mkdir()
    (runs / "broken-json" / "manifest.json").write_text("{half a manifest")
    half = shutil.copytree(runs / "llama-base", runs / "half-written")
    (half / "summary.parquet").write_bytes(b"PAR1 truncated")
    manifest = json.loads((half / "manifest.json").read_text())
    (half / "manifest.json").write_text(json.dumps({**manifest, "run_id": "half-written"}))
    running = runs / "still-running"
    running.mkdir()
    (running / "manifest.json").write_text(json.dumps({**manifest, "run_id": "still-running", "status": "running",
                                                       "created": "2026-01-05T00:00:00+00:00"}))
    return root
