"""Readers of run folders: the run list and each table of a complete run (docs/storage.md).

A run that is not `complete` is never read: every reader refuses it with one line.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from entropylens.errors import UserError
from entropylens.store.folder import RUN_ID_RE, STATUSES, read_manifest
from entropylens.store.schema import OUTCOMES_SCHEMA, SUMMARY_ROLES, SUMMARY_SCHEMA, TOPK_SCHEMA, model_name
from entropylens.store.cache import Cache

LIST_COLUMNS = ["run_id", "model", "architecture", "n_layers", "prompts", "n_prompts", "n_tokens", "lens",
                "status", "created", "parent_run", "kind"]


def list_runs(cache: Cache | Path | str) -> pd.DataFrame:
    """One row per run folder, newest first; an unreadable manifest shows as status 'corrupt'."""
    root = Cache.of(cache).runs
    rows = []
    for d in sorted(root.iterdir()) if root.is_dir() else ():
        if not d.is_dir() or not RUN_ID_RE.fullmatch(d.name) or d.resolve().parent != root.resolve():
            continue  # like resolve_run: nothing outside cache/runs, not even through a symlink
        try:
            m = read_manifest(d)
        except UserError:
            m = {"status": "corrupt"}
        model = m.get("model") if isinstance(m.get("model"), dict) else {}
        prompts = m.get("prompts") if isinstance(m.get("prompts"), dict) else {}
        lens, created = m.get("lens"), m.get("created")
        rows.append({
            "run_id": d.name, "model": model_name(model), "architecture": model.get("architecture"),
            "n_layers": model.get("n_layers"), "prompts": prompts.get("source"),
            "n_prompts": prompts.get("n"), "n_tokens": m.get("n_tokens"),
            "lens": ",".join(map(str, lens)) if isinstance(lens, list) else lens,
            "status": m.get("status") if m.get("status") in STATUSES else "corrupt",
            "created": None if created is None else str(created),
            "parent_run": m.get("parent_run"), "kind": m.get("kind"),
        })
    out = pd.DataFrame(rows, columns=LIST_COLUMNS)
    return out.sort_values(["created", "run_id"], ascending=False, na_position="last").reset_index(drop=True)


def _complete_file(run_dir: Path | str, name: str) -> Path:
    run_dir = Path(run_dir)
    status = read_manifest(run_dir).get("status")
    if status != "complete":
        raise UserError(f"run {run_dir.name!r} is {status!r}, not complete; resume or re-run it")
    path = run_dir / name
    if not path.is_file():
        raise UserError(f"{path} is missing; the run folder is damaged, re-run it")
    return path


def _read_parquet(run_dir: Path | str, name: str, columns: list[str] | None,
                  filters: list | None) -> pd.DataFrame:
    path = _complete_file(run_dir, name)
    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is corrupt: {e}") from None
    flat = [f for conj in filters or [] for f in (conj if isinstance(conj, list) else [conj])]
    asked = list(columns or []) + [f[0] for f in flat if isinstance(f, tuple) and f]
    unknown = [c for c in asked if c not in names]
    if unknown:
        raise UserError(f"unknown column(s) {unknown} in {name}; available: {names}")
    try:
        return pq.read_table(path, columns=columns, filters=filters).to_pandas()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def load_summary(run_dir: Path | str, outcome: str | None = "all") -> pd.DataFrame:
    """summary.parquet of a complete run (what the dashboard loads first): the rows of one outcome (all /
    correct / wrong), or every row with `outcome=None`. Runs from before outcomes read as outcome `all`."""
    df = _read_parquet(run_dir, "summary.parquet", None, None)
    if "outcome" not in df.columns:
        df.insert(SUMMARY_SCHEMA.names.index("outcome"), "outcome", "all")
    return df if outcome is None else df[df["outcome"] == outcome].reset_index(drop=True)


def load_outcomes(run_dir: Path | str) -> pd.DataFrame:
    """outcomes.parquet (one row per sequence: reward, correct; null where unscored); empty for older runs."""
    if not (Path(run_dir) / "outcomes.parquet").is_file():
        _complete_file(run_dir, "manifest.json")  # still refuse an incomplete run
        return OUTCOMES_SCHEMA.empty_table().to_pandas()
    return _read_parquet(run_dir, "outcomes.parquet", None, None)


def load_tokens(run_dir: Path | str, columns: list[str] | None = None,
                filters: list | None = None) -> pd.DataFrame:
    """tokens.parquet with column projection and pyarrow filters, e.g. [("prompt_idx", "==", 3)]."""
    return _read_parquet(run_dir, "tokens.parquet", columns, filters)


def load_entropy(run_dir: Path | str, columns: list[str] | None = None,
                 filters: list | None = None) -> pd.DataFrame:
    """entropy.parquet with column projection and pyarrow filters, e.g. [("lens", "==", "bupo")]."""
    return _read_parquet(run_dir, "entropy.parquet", columns, filters)


def entropy_groups(run_dir: Path | str) -> list[tuple[str, str, int, int]]:
    """Per row group of entropy.parquet, from its statistics: (first lens, last lens, first prompt, last prompt);
    [] when the file has none (a reader then filters by value). Lets a reader that wants one prompt read the
    row group that holds it once for every prompt in it: Parquet decodes whole row groups anyway."""
    path = _complete_file(run_dir, "entropy.parquet")
    try:
        meta = pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path} is corrupt: {e}") from None
    names = [meta.schema.column(j).name for j in range(meta.num_columns)]
    if "lens" not in names or "prompt_idx" not in names:
        return []
    out = []
    for i in range(meta.num_row_groups):
        lens, prompt = (meta.row_group(i).column(names.index(c)).statistics for c in ("lens", "prompt_idx"))
        if lens is None or prompt is None or not (lens.has_min_max and prompt.has_min_max):
            return []
        out.append((lens.min, lens.max, int(prompt.min), int(prompt.max)))
    return out


def load_entropy_group(run_dir: Path | str, group: int, columns: list[str]) -> pd.DataFrame:
    """Row group `group` of entropy.parquet (see entropy_groups), the named columns."""
    path = _complete_file(run_dir, "entropy.parquet")
    try:
        return pq.ParquetFile(path).read_row_group(group, columns=columns).to_pandas()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def load_topk(run_dir: Path | str, columns: list[str] | None = None,
              filters: list | None = None) -> pd.DataFrame:
    """topk.parquet (per lens, prompt, position, layer, site: the K most probable tokens, rank 1 first) with
    column projection and pyarrow filters; an empty table for runs traced without `--topk`."""
    if not (Path(run_dir) / "topk.parquet").is_file():
        _complete_file(run_dir, "manifest.json")  # still refuse an incomplete run
        empty = TOPK_SCHEMA.empty_table().to_pandas()
        return empty if columns is None else empty[list(columns)]
    return _read_parquet(run_dir, "topk.parquet", columns, filters)


def layer_table(run_dir: Path | str, lens: str = "bupo", role: str = "response") -> pd.DataFrame:
    """Per layer the mean H_layer, H_attn, H_ffn and dH_attn, dH_ffn, dH_layer (`entropylens show`)."""
    if role not in SUMMARY_ROLES:
        raise UserError(f"unknown role {role!r}; choose one of {list(SUMMARY_ROLES)}")
    return summary_layer_table(load_summary(run_dir), lens, role)


def summary_layer_table(summary: pd.DataFrame, lens: str = "bupo", role: str = "response") -> pd.DataFrame:
    """`layer_table` of a summary already in memory (entropylens.api.Run)."""
    if role not in SUMMARY_ROLES:
        raise UserError(f"unknown role {role!r}; choose one of {list(SUMMARY_ROLES)}")
    if lens not in set(summary["lens"]):
        raise UserError(f"run has no lens {lens!r}; it has {sorted(set(summary['lens']))}")
    cols = ["H_layer", "H_attn", "H_ffn", "dH_attn", "dH_ffn", "dH_layer"]
    if "outcome" in summary.columns:
        summary = summary[summary["outcome"] == "all"]
    sel = summary[(summary["lens"] == lens) & (summary["role"] == role) & summary["quantity"].isin(cols)]
    table = sel.pivot(index="layer", columns="quantity", values="mean")[cols]
    return table.rename_axis(columns=None).reset_index()
