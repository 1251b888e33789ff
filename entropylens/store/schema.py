"""The tables of a trace run: their Arrow schemas, how a DataFrame is checked and cast to one, and the
derived tables (summary.parquet per outcome, outcomes.parquet) (docs/storage.md).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa

from entropylens.store.vocab import LENSES, QUANTITIES, SITES, SUMMARY_ROLES, TOKEN_ROLES  # noqa: F401

_F32, _I32 = pa.float32(), pa.int32()
TOKENS_SCHEMA = pa.schema([
    ("prompt_idx", _I32), ("position", _I32), ("token_id", _I32), ("token_text", pa.string()),
    ("role", pa.string()), ("target_id", _I32), ("H_final", _F32), ("logprob_target", _F32),
])
ENTROPY_SCHEMA = pa.schema(
    [("lens", pa.string()), ("prompt_idx", _I32), ("position", _I32), ("layer", pa.int16()),
     ("role", pa.string())]
    + [(q, _F32) for q in QUANTITIES]
    + [(f"top1_{s}", _I32) for s in SITES]
    + [(f"p1_{s}", _F32) for s in SITES]
)
SUMMARY_SCHEMA = pa.schema(
    [("lens", pa.string()), ("layer", pa.int16()), ("quantity", pa.string()), ("role", pa.string()),
     ("outcome", pa.string())]
    + [(c, pa.float64()) for c in ("mean", "std", "q25", "median", "q75")]
    + [("count", pa.int64()), ("mean_norm", pa.float64()), ("rel_depth", pa.float64())]
)
# topk.parquet (optional, `--topk K`): one row per (lens, prompt, position, layer, site, rank), long format
TOPK_SCHEMA = pa.schema([
    ("lens", pa.string()), ("prompt_idx", _I32), ("position", _I32), ("layer", pa.int16()), ("site", pa.string()),
    ("rank", pa.int8()), ("token_id", _I32), ("token_text", pa.string()), ("prob", _F32),
])
TOPK_SORT = ["lens", "prompt_idx", "position", "layer", "site", "rank"]
RESPONSE_KEYS = ("prompt_idx", "prompt", "response", "answer", "n_prompt_tokens", "n_response_tokens")
OUTCOME_KEYS = ("source_idx", "sample", "reward", "correct")  # optional in write_batch: defaults as unscored
TOKENS_SORT = ["prompt_idx", "position"]
ENTROPY_SORT = ["lens", "prompt_idx", "position", "layer"]


# ---------------------------------------------------------------- validation

def _column(values: pd.Series, field: pa.Field, what: str) -> pa.Array:
    """One column cast to its documented type; NaN stays NaN (never null), no nulls elsewhere."""
    name, typ = field.name, field.type
    if pa.types.is_floating(typ):
        try:
            return pa.array(values.to_numpy(dtype=np.float64, na_value=np.nan).astype(typ.to_pandas_dtype()))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what}.{name}: expected numbers ({e})") from e
    if pa.types.is_integer(typ):
        if not pd.api.types.is_integer_dtype(values.dtype):
            raise ValueError(f"{what}.{name}: expected integers, got dtype {values.dtype}")
        arr = values.to_numpy()
        info = np.iinfo(typ.to_pandas_dtype())
        if len(arr) and (arr.min() < info.min or arr.max() > info.max):
            raise ValueError(f"{what}.{name}: values outside {typ}")
        return pa.array(arr.astype(typ.to_pandas_dtype()))
    try:
        arr = pa.array(values, type=typ, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"{what}.{name}: expected strings ({e})") from e
    if arr.null_count:
        raise ValueError(f"{what}.{name}: {arr.null_count} missing values")
    return arr


def _to_table(df: pd.DataFrame, schema: pa.Schema, what: str, sort: list[str]) -> pa.Table:
    """Check columns exactly match `schema`, cast, reject duplicate keys, sort by `sort`."""
    missing = [n for n in schema.names if n not in df.columns]
    extra = [str(c) for c in df.columns if c not in schema.names]
    if missing or extra:
        raise ValueError(f"{what}: missing columns {missing}, unexpected columns {extra}")
    table = pa.table([_column(df[f.name], f, what) for f in schema], schema=schema)
    if sort and df.duplicated(subset=sort).any():
        raise ValueError(f"{what}: duplicate rows for key {sort}")
    return table.sort_by([(k, "ascending") for k in sort]) if sort else table


def _check_values(table: pa.Table, column: str, allowed: tuple[str, ...], what: str) -> None:
    bad = set(table.column(column).unique().to_pylist()) - set(allowed)
    if bad:
        raise ValueError(f"{what}.{column}: unknown values {sorted(bad)}; allowed {list(allowed)}")


def _response_line(r: dict) -> str:
    if not set(RESPONSE_KEYS) <= set(r) <= {*RESPONSE_KEYS, *OUTCOME_KEYS}:
        raise ValueError(f"responses: keys must be {list(RESPONSE_KEYS)} (+ {list(OUTCOME_KEYS)}), got {sorted(r)}")
    r = {"source_idx": r["prompt_idx"], "sample": 0, "reward": None, "correct": None} | r
    return json.dumps({k: r[k] for k in (*RESPONSE_KEYS, *OUTCOME_KEYS)}, ensure_ascii=False)


# ---------------------------------------------------------------- summary

def compute_summary(entropy: pd.DataFrame, vocab_size: int, n_layers: int, outcome: str = "all",
                    grid: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per (lens, layer, quantity, role): stats over non-NaN values (std with ddof=1, linear quantiles).

    Every (lens, layer) present (or in `grid`) gets all 8 quantities x 3 roles; count 0 means NaN stats.
    `outcome` labels the rows (entropy.outcomes.summary_by_outcome passes the correct / wrong subsets).
    """
    if vocab_size < 2 or n_layers < 1:
        raise ValueError(f"need vocab_size >= 2 and n_layers >= 1, got {vocab_size}, {n_layers}")
    df = entropy[["lens", "layer", "role", *QUANTITIES]].astype({q: "float64" for q in QUANTITIES})
    keys = ["lens", "layer"]
    grid = (df.groupby(keys).size().index if grid is None
            else pd.MultiIndex.from_frame(grid[keys].astype({"layer": df["layer"].dtype}).sort_values(keys)))
    frames = []
    for role in SUMMARY_ROLES:
        g = (df if role == "all" else df[df["role"] == role]).groupby(keys)[list(QUANTITIES)]
        stats = {"mean": g.mean(), "std": g.std(), "q25": g.quantile(0.25), "median": g.quantile(0.5),
                 "q75": g.quantile(0.75), "count": g.count()}
        cols = [s.reindex(grid).rename_axis(columns="quantity").stack().rename(n) for n, s in stats.items()]
        frames.append(pd.concat(cols, axis=1).reset_index().assign(role=role))
    out = pd.concat(frames, ignore_index=True)
    out["count"] = out["count"].fillna(0).astype("int64")
    out["mean_norm"] = out["mean"] / math.log(vocab_size)
    out["rel_depth"] = out["layer"].astype("float64") / n_layers
    out["outcome"] = outcome
    order = {**{q: i for i, q in enumerate(QUANTITIES)}, **{r: i for i, r in enumerate(SUMMARY_ROLES)}}
    out = out.sort_values(["lens", "layer", "quantity", "role"], kind="stable",
                          key=lambda s: s.map(order) if s.name in ("quantity", "role") else s)
    return out[SUMMARY_SCHEMA.names].astype({"layer": "int16"}).reset_index(drop=True)


# ---------------------------------------------------------------- outcomes (stored side; analysis: outcomes.py)

OUTCOMES_SCHEMA = pa.schema([
    ("prompt_idx", pa.int32()), ("source_idx", pa.int32()), ("sample", pa.int32()),
    ("reward", pa.float64()), ("correct", pa.bool_()), ("n_response_tokens", pa.int32()),
])


def outcomes_table(responses: list[dict]) -> pa.Table:
    """responses.jsonl records -> outcomes.parquet rows (reward/correct stay null where unscored)."""
    cols = {f.name: [r.get(f.name) for r in responses] for f in OUTCOMES_SCHEMA}
    return pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in OUTCOMES_SCHEMA}, schema=OUTCOMES_SCHEMA)


def outcome_sets(outcomes: pd.DataFrame) -> dict[str, set[int]]:
    """prompt_idx of the correct and of the wrong responses (unscored ones are in neither)."""
    c = outcomes["correct"]
    return {"correct": set(outcomes.loc[c.eq(True), "prompt_idx"].astype(int)),  # noqa: E712 (nullable)
            "wrong": set(outcomes.loc[c.eq(False), "prompt_idx"].astype(int))}


def summary_by_outcome(entropy: pd.DataFrame, outcomes: pd.DataFrame | None, vocab_size: int,
                       n_layers: int) -> pd.DataFrame:
    """summary.parquet: every (lens, layer, quantity, role) for outcome `all`, and for `correct` and `wrong`
    when any response was scored (same grid; a group with no tokens has count 0 and NaN statistics)."""
    frames = [compute_summary(entropy, vocab_size, n_layers)]
    sets = outcome_sets(outcomes) if outcomes is not None else {"correct": set(), "wrong": set()}
    if sets["correct"] or sets["wrong"]:
        grid = entropy[["lens", "layer"]].drop_duplicates()
        for name in ("correct", "wrong"):
            sub = entropy[entropy["prompt_idx"].isin(sets[name])]
            frames.append(compute_summary(sub, vocab_size, n_layers, outcome=name, grid=grid))
    return pd.concat(frames, ignore_index=True)


def model_name(model: dict) -> str:
    """The display name of a manifest's model record (tables, figures, the dashboard): its `name`, or for runs
    written before names were recorded the id with any folder part dropped, so no machine path is shown."""
    name = model.get("name") if isinstance(model, dict) else None
    if name:
        return str(name)
    mid = str(model.get("id") or "?") if isinstance(model, dict) else "?"
    if mid.startswith(("/", ".", "~")) or "\\" in mid:
        mid = mid.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        mid = mid[: -len(".gguf")] if mid.endswith(".gguf") else mid
    return mid
