"""Read run folders for the dashboard: manifests and summaries first, token rows by filter.

Why a thin layer: callbacks must stay fast on runs with tens of millions of entropy rows,
so everything token-level goes through column + row filters (pyarrow dataset with
row-group pruning), and the small things (manifest, summary, vocabulary) are cached
per file modification time. A run id from the browser only ever reaches the disk through
`run_dir`, which resolves it inside the cache or raises UserError.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from urllib.parse import unquote

import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from entropylens.errors import UserError

RUN_COLUMNS = ["run_id", "model", "family", "architecture", "layers", "prompts", "tokens", "lens",
               "date", "status", "kind", "parent_run"]
_RUN_ID = re.compile(r"[A-Za-z0-9._-]+")


def resolve_run(cache: Path, run_id: str) -> Path:
    """The folder of `run_id` under cache/runs; UserError for anything that could escape it.

    Same contract as entropylens.store.resolve_run (rejects `..`, absolute paths, encoded
    separators, leading dots and symlinks that point outside the cache).
    """
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id) or run_id.startswith(".") \
            or unquote(run_id) != run_id:
        raise UserError(f"invalid run id {run_id!r}: use letters, digits, '.', '_' or '-'")
    root = (Path(cache) / "runs").resolve()
    path = (root / run_id).resolve()
    if path.parent != root or not path.is_dir():
        raise UserError(f"no run {run_id!r} in {root}")
    return path


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return -1


@lru_cache(maxsize=256)
def _manifest_cached(path: str, mtime: float) -> dict:
    return json.loads(Path(path).read_text())


def read_manifest(run_dir: Path) -> dict:
    """manifest.json as a dict (cached per modification time)."""
    path = run_dir / "manifest.json"
    return _manifest_cached(str(path), _mtime(path))


def _table_row(run_dir: Path) -> dict:
    row = dict.fromkeys(RUN_COLUMNS, "")
    row.update(run_id=run_dir.name, status="corrupt: manifest.json missing or unreadable")
    try:
        m = read_manifest(run_dir)
        model = m.get("model") or {}
        row.update(model=model.get("id", "?"), family=model.get("family", "?"),
                   architecture=model.get("architecture", "?"), layers=model.get("n_layers", ""),
                   prompts=(m.get("prompts") or {}).get("n", ""), tokens=m.get("n_tokens", ""),
                   lens=" + ".join(m.get("lens") or []), date=str(m.get("created", ""))[:19].replace("T", " "),
                   status=str(m.get("status", "?")), kind=m.get("kind", "trace"),
                   parent_run=m.get("parent_run") or "")
    except (OSError, ValueError, AttributeError):
        return row
    if row["status"] == "failed":
        row["status"] = f"failed: {m.get('error') or 'unknown error'}"[:120]
    elif row["status"] == "complete":
        needed = ["metrics.jsonl"] if row["kind"] == "bupo" else ["summary.parquet", "entropy.parquet", "tokens.parquet"]
        for name in needed:
            try:
                if name.endswith(".parquet"):
                    pq.read_metadata(run_dir / name)
                elif not (run_dir / name).is_file():
                    raise OSError(name)
            except (OSError, ValueError):
                row["status"] = f"corrupt: {name} missing or unreadable"
                break
    return row


def list_runs(cache: Path) -> pd.DataFrame:
    """One row per run folder, newest first; broken folders appear with a `corrupt: ...` status."""
    root = Path(cache) / "runs"
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    df = pd.DataFrame([_table_row(d) for d in dirs], columns=RUN_COLUMNS)
    return df.sort_values(["date", "run_id"], ascending=False, kind="stable").reset_index(drop=True)


def usable(status: str) -> bool:
    """Whether a run's merged files may be read (docs/storage.md: only complete runs)."""
    return status == "complete"


@lru_cache(maxsize=64)
def _summary_cached(path: str, mtime: float) -> pd.DataFrame:
    return pd.read_parquet(path)


def load_summary(run_dir: Path) -> pd.DataFrame:
    """summary.parquet (small: per lens, layer, quantity, role), cached per modification time."""
    path = run_dir / "summary.parquet"
    return _summary_cached(str(path), _mtime(path))


def read_entropy(run_dir: Path, columns: list[str], lens: str, prompt_idx: int,
                 position: int | None = None, layer: int | None = None) -> pd.DataFrame:
    """Entropy rows of one prompt (optionally one cell) for one lens: only the named columns are read."""
    expr = (ds.field("lens") == lens) & (ds.field("prompt_idx") == prompt_idx)
    if position is not None:
        expr &= ds.field("position") == position
    if layer is not None:
        expr &= ds.field("layer") == layer
    table = ds.dataset(run_dir / "entropy.parquet").to_table(columns=columns, filter=expr)
    return table.to_pandas()


def read_tokens(run_dir: Path, prompt_idx: int) -> pd.DataFrame:
    """tokens.parquet rows of one prompt, ordered by position."""
    table = ds.dataset(run_dir / "tokens.parquet").to_table(
        columns=["position", "token_id", "token_text", "role"], filter=ds.field("prompt_idx") == prompt_idx)
    return table.to_pandas().sort_values("position").reset_index(drop=True)


@lru_cache(maxsize=16)
def _prompt_ids_cached(path: str, mtime: float) -> list[int]:
    col = pq.read_table(path, columns=["prompt_idx"]).column(0)
    return sorted(set(col.unique().to_pylist()))


def prompt_ids(run_dir: Path) -> list[int]:
    """The prompt indices present in a run (one column read, cached)."""
    path = run_dir / "tokens.parquet"
    return _prompt_ids_cached(str(path), _mtime(path))


@lru_cache(maxsize=16)
def _vocab_cached(path: str, mtime: float) -> dict[int, str]:
    df = pq.read_table(path, columns=["token_id", "token_text"]).to_pandas().drop_duplicates("token_id")
    return dict(zip(df["token_id"].tolist(), df["token_text"].tolist()))


def sequence_vocab(run_dir: Path) -> dict[int, str]:
    """token id -> text for every token that occurs in the run's sequences (no tokenizer needed)."""
    path = run_dir / "tokens.parquet"
    return _vocab_cached(str(path), _mtime(path))


def load_metrics(run_dir: Path) -> pd.DataFrame:
    """metrics.jsonl of a trainer run (one row per step)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir.name} has no metrics.jsonl; pick a BuPO trainer run")
    return pd.read_json(path, lines=True)
