"""Read run folders for the dashboard: manifests and summaries first, token rows by filter.

Why a thin layer: callbacks must stay fast on runs with tens of millions of entropy rows,
so everything token-level goes through column + row filters (pyarrow dataset with
row-group pruning, via entropylens.store), and every table a callback reads (summary, outcomes, prompt
list, vocabulary, one prompt's entropy and token rows) goes through the process's byte-bounded cache
(app.cache), keyed by run folder + manifest mtime. A run id from the browser only ever reaches the disk through
`entropylens.store.resolve_run`, which resolves it inside the cache or raises UserError.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from entropylens.app.cache import memo, run_cached
from entropylens import store
from entropylens.errors import UserError
from entropylens.store import read_manifest
from entropylens.store.cache import Cache

RUN_COLUMNS = ["run_id", "model", "architecture", "layers", "prompts", "tokens", "lens", "date", "status",
               "kind", "parent_run"]
_NEEDED = {"trace": ["summary.parquet", "entropy.parquet", "tokens.parquet"], "bupo": ["metrics.jsonl"]}


def _starting(run_dir: Path) -> bool:
    """A folder a writer has just made: no manifest yet, nothing in it but files being written (`*.tmp`) and
    an empty `parts/` (entropylens.store.RunWriter makes the folder and parts/ before the first manifest)."""
    try:
        if (run_dir / "manifest.json").exists():
            return False
        return all(p.name.endswith(".tmp") or (p.name == "parts" and p.is_dir() and
                                               all(q.name.endswith(".tmp") for q in p.iterdir()))
                   for p in run_dir.iterdir())
    except OSError:
        return False


def _status(run_dir: Path, status: str, kind: str) -> str:
    """The table's status: store status, with the reason for failed runs and damaged complete runs."""
    if status == "failed":
        try:
            return f"failed: {read_manifest(run_dir).get('error') or 'unknown error'}"[:120]
        except UserError:
            return "corrupt: manifest.json unreadable"
    if status == "corrupt":
        if _starting(run_dir):
            return "starting"
        try:  # the writer may have renamed its first manifest into place since the listing looked
            now = read_manifest(run_dir).get("status")
        except UserError:
            now = None
        if now in ("running", "complete", "failed"):
            return _status(run_dir, now, kind)
        return "corrupt: manifest.json missing or unreadable"
    if status != "complete":
        return status
    for name in _NEEDED.get(kind, _NEEDED["trace"]):
        try:
            if name.endswith(".parquet"):
                pq.read_metadata(run_dir / name)
            elif not (run_dir / name).is_file():
                raise OSError(name)
        except (OSError, ValueError):
            return f"corrupt: {name} missing or unreadable"
    return status


def list_runs(cache: Cache | Path) -> pd.DataFrame:
    """One row per run folder, newest first; broken folders show a `corrupt: ...` status, never an error.
    Rebuilt whenever a run folder appears, goes or has its manifest replaced (app.cache.memo)."""
    return memo(cache, "list_runs", lambda: _list_runs(cache))


def _list_runs(cache: Cache | Path) -> pd.DataFrame:
    df = store.list_runs(cache)
    root = Cache.of(cache).runs
    out = pd.DataFrame({
        "run_id": df["run_id"], "model": df["model"], "architecture": df["architecture"], "layers": df["n_layers"],
        "prompts": df["n_prompts"], "tokens": df["n_tokens"], "lens": df["lens"],
        "date": df["created"].fillna("").str.slice(0, 19).str.replace("T", " "),
        "kind": df["kind"].fillna("trace"), "parent_run": df["parent_run"].fillna("")})
    out["status"] = [run_cached(root / r, ("status", s, k), lambda r=r, s=s, k=k: _status(root / r, s, k))
                     for r, s, k in zip(df["run_id"], df["status"], out["kind"])]
    for col in ("layers", "prompts", "tokens"):
        out[col] = [int(x) if pd.notna(x) else "" for x in out[col]]
    return out[RUN_COLUMNS].astype(object).where(out[RUN_COLUMNS].notna(), "")


def usable(status: str) -> bool:
    """Whether a run's merged files may be read (docs/storage.md: only complete runs)."""
    return status == "complete"


def load_summary(run_dir: Path, outcome: str | None = "all") -> pd.DataFrame:
    """summary.parquet (small: per lens, layer, quantity, role, outcome), cached; the rows of one outcome
    (all / correct / wrong), or every row with `outcome=None`."""
    s = run_cached(run_dir, "summary", lambda: store.load_summary(run_dir, outcome=None))
    return s if outcome is None else s[s["outcome"] == outcome]


def load_outcomes(run_dir: Path) -> pd.DataFrame:
    """outcomes.parquet (reward / correct per sequence; empty for unscored runs), cached."""
    return run_cached(run_dir, "outcomes", lambda: store.load_outcomes(run_dir))


def outcome_stats(run_dir: Path, lens: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(correct − wrong per layer, AUROC table) of a scored run: bootstraps over responses, cached per run."""
    from entropylens.analysis.outcomes import auroc_table, outcome_diff

    return run_cached(run_dir, ("outcome_stats", lens),
                      lambda: (outcome_diff(run_dir, lens=lens), auroc_table(run_dir)))


# one prompt's slice holds every per-cell column, so the heatmap of any site and a click share one read
SLICE_COLUMNS = [c for c in store.ENTROPY_SCHEMA.names if c not in ("lens", "prompt_idx", "role")]
_SLICE_DTYPES = [store.ENTROPY_SCHEMA.field(c).type.to_pandas_dtype() for c in SLICE_COLUMNS]


def read_entropy(run_dir: Path, columns: list[str], lens: str, prompt_idx: int,
                 position: int | None = None, layer: int | None = None) -> pd.DataFrame:
    """Entropy rows of one prompt (optionally one cell) for one lens, the named columns.

    The prompt's slice (every per-cell column: ~3 MB for 40 layers x 1000 tokens) is read once and cached;
    columns outside it are read directly."""
    filters = [("lens", "==", lens), ("prompt_idx", "==", int(prompt_idx))]
    if not set(columns) <= set(SLICE_COLUMNS):
        cells = [(k, "==", int(v)) for k, v in (("position", position), ("layer", layer)) if v is not None]
        return store.load_entropy(run_dir, columns=columns, filters=filters + cells)
    rows = _prompt_slice(run_dir, lens, int(prompt_idx))
    keep = pd.Series(True, index=rows.index)
    if position is not None:
        keep &= rows["position"] == int(position)
    if layer is not None:
        keep &= rows["layer"] == int(layer)
    return rows.loc[keep, list(columns)].reset_index(drop=True)


def _prompt_slice(run_dir: Path, lens: str, prompt_idx: int) -> pd.DataFrame:
    """Every per-cell column of one prompt and lens, in file order (cached).

    Parquet decodes whole row groups (~6 prompts of 40 layers x 1000 tokens each), so when one row group holds
    the prompt the group is read once and every prompt's slice in it kept: the next prompt a reader opens is
    usually there already. Otherwise (a prompt across two groups, a file without statistics) the prompt is read
    by value."""
    groups = run_cached(run_dir, "entropy_groups", lambda: store.entropy_groups(run_dir))
    hit = [i for i, (l0, l1, p0, p1) in enumerate(groups) if l0 <= lens <= l1 and p0 <= prompt_idx <= p1]
    if len(hit) != 1:
        return run_cached(run_dir, ("entropy", lens, prompt_idx), lambda: store.load_entropy(
            run_dir, columns=SLICE_COLUMNS, filters=[("lens", "==", lens), ("prompt_idx", "==", prompt_idx)]))

    def split() -> dict[tuple[str, int], pd.DataFrame]:
        rows = store.load_entropy_group(run_dir, hit[0], ["lens", "prompt_idx", *SLICE_COLUMNS])
        return {(ln, int(p)): g[SLICE_COLUMNS].reset_index(drop=True)
                for (ln, p), g in rows.groupby(["lens", "prompt_idx"], sort=False)}

    rows = run_cached(run_dir, ("entropy_group", hit[0]), split).get((lens, prompt_idx))
    if rows is None:  # the group's statistics span the prompt, but it holds no row of it
        rows = pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(SLICE_COLUMNS, _SLICE_DTYPES)})
    return rows


def read_tokens(run_dir: Path, prompt_idx: int) -> pd.DataFrame:
    """tokens.parquet rows of one prompt, ordered by position (cached)."""
    def read() -> pd.DataFrame:
        df = store.load_tokens(run_dir, columns=["position", "token_id", "token_text", "role"],
                               filters=[("prompt_idx", "==", int(prompt_idx))])
        return df.sort_values("position").reset_index(drop=True)

    return run_cached(run_dir, ("tokens", int(prompt_idx)), read)


def prompt_ids(run_dir: Path) -> list[int]:
    """The prompt indices present in a run (one column read, cached)."""
    return run_cached(run_dir, "prompt_ids", lambda: sorted(
        int(x) for x in store.load_tokens(run_dir, columns=["prompt_idx"])["prompt_idx"].unique()))


def sequence_vocab(run_dir: Path) -> dict[int, str]:
    """token id -> text for every token that occurs in the run's sequences (no tokenizer needed)."""
    def read() -> dict[int, str]:
        df = store.load_tokens(run_dir, columns=["token_id", "token_text"]).drop_duplicates("token_id")
        return dict(zip(df["token_id"].tolist(), df["token_text"].tolist()))

    return run_cached(run_dir, "vocab", read)


def load_metrics(run_dir: Path) -> pd.DataFrame:
    """metrics.jsonl of a trainer run (one row per step)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir.name} has no metrics.jsonl; pick a BuPO trainer run")
    return pd.read_json(path, lines=True)
