"""`Cache`: the one owner of the on-disk layout under a `--cache` folder.

    <root>/runs/<run_id>/    run folders (trace and bupo runs; docs/storage.md)
    <root>/models/<name>/    dequantised weights of built-in models, cached as safetensors
    <root>/offload/<name>/   accelerate's disk offload for `--device-map`
    <root>/prompts/          prompt lists the Python API was handed, saved so a run names its source

The runs root can live elsewhere than the weights (`Cache(root, runs=...)`, the commands' `--runs`); by default
both are under `root`.
Every other module asks a Cache for a path instead of joining folder names itself.
"""

from __future__ import annotations

from pathlib import Path

# The help of every command's `--runs`. Configs hold it in a field named `runs_dir`: `runs` already names a list
# of run ids (`entropylens report RUN...`). It is never stored with a run: a run folder may move.
RUNS_HELP = "folder holding the run folders, if not <cache>/runs (weights stay in --cache)"


class Cache:
    """The folders one cache root stands for; build it from whatever a caller holds with `Cache.of`."""

    def __init__(self, root: Path | str, runs: Path | str | None = None):
        self.root = Path(root)
        self.runs = Path(runs) if runs is not None else self.root / "runs"

    @classmethod
    def of(cls, cache: Cache | Path | str) -> Cache:
        return cache if isinstance(cache, Cache) else cls(cache)

    def __repr__(self) -> str:
        return f"Cache({str(self.root)!r}, runs={str(self.runs)!r})"

    def run_dir(self, run_id: str) -> Path:
        """Where run `run_id` lives (exists or not); `store.resolve_run` checks an existing one."""
        return self.runs / run_id

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    def offload_dir(self, name: str) -> Path:
        return self.root / "offload" / name

    @property
    def prompts(self) -> Path:
        return self.root / "prompts"
