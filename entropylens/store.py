"""Run folders in `cache/runs/<run_id>/`: crash-safe writing, resume, and reads (docs/storage.md).

Every file appears via `*.tmp` + fsync + `os.replace`, per-batch parts first and merged files
only at `finalize`; the manifest flips to `complete` last, so a killed writer never leaves a
run that looks complete. Merging is deterministic (sorted by lens, prompt_idx, position, layer),
so a resumed run holds byte-for-byte the same data as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from collections.abc import Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from entropylens.errors import UserError

SITES = ("attn_in", "attn", "ffn_in", "ffn", "layer")
QUANTITIES = ("H_attn_in", "H_attn", "H_ffn_in", "H_ffn", "H_layer", "dH_attn", "dH_ffn", "dH_layer")
RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # use .fullmatch: `$` allows a trailing \n
LENSES = ("bupo", "logit")
TOKEN_ROLES = ("prompt", "response", "next")
SUMMARY_ROLES = ("prompt", "response", "all")  # `all` includes `next`
STATUSES = ("running", "complete", "failed")
ROW_GROUP_ROWS = 1 << 18  # merged files: parts are buffered into row groups of at least this many rows
COMPRESSION = "zstd"

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
RESPONSE_KEYS = ("prompt_idx", "prompt", "response", "answer", "n_prompt_tokens", "n_response_tokens")
OUTCOME_KEYS = ("source_idx", "sample", "reward", "correct")  # optional in write_batch: defaults as unscored
TOKENS_SORT = ["prompt_idx", "position"]
ENTROPY_SORT = ["lens", "prompt_idx", "position", "layer"]
_PART_RE = re.compile(r"^(tokens|entropy|responses)-(\d{5,})\.(parquet|jsonl)$")
_PART_FILES = {"tokens": "tokens-{:05d}.parquet", "entropy": "entropy-{:05d}.parquet",
               "responses": "responses-{:05d}.jsonl"}
LIST_COLUMNS = ["run_id", "model", "architecture", "n_layers", "prompts", "n_prompts", "n_tokens", "lens",
                "status", "created", "parent_run", "kind"]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id(name: str | None = None, *, tag: str | None = None) -> str:
    """`name` validated as is, else a sortable UTC timestamp plus a slug of `tag` (e.g. model-prompts)."""
    if name is not None:
        if not RUN_ID_RE.fullmatch(name):
            raise UserError(f"invalid run name {name!r}: use letters, digits, '.', '_', '-' (not leading)")
        return name
    run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^a-z0-9._-]+", "-", (tag or "").lower()).strip("-.")
    return f"{run_id}-{slug}"[:128] if slug else run_id


def resolve_run(cache: Path | str, run_id: str) -> Path:
    """The folder `cache/runs/<run_id>`; anything else (paths, '..', symlinks leaving it) is a UserError."""
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id):
        raise UserError(f"invalid run id {run_id!r}: a run id is a folder name under cache/runs")
    root = (Path(cache) / "runs").resolve()
    path = (root / run_id).resolve()
    if path.parent != root or not path.is_dir():
        raise UserError(f"no run {run_id!r} in {root} (see `entropylens runs`)")
    return path


# ---------------------------------------------------------------- atomic files

def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> None:
    """fsync `tmp`, rename it over `path`, fsync the folder so the rename survives a crash."""
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def _write_text(path: Path, text: str) -> None:
    _tmp(path).write_text(text, encoding="utf-8")
    _commit(_tmp(path), path)


def write_json(path: Path | str, obj: dict) -> None:
    """A whole JSON file, crash-safe (*.tmp + fsync + rename): for run files outside RunWriter (trainer runs)."""
    _write_text(Path(path), json.dumps(obj, indent=2, default=str) + "\n")


def write_atomic(path: Path | str, write) -> None:
    """Crash-safe write of any file: `write(tmp_path)` fills a temporary file that then replaces `path`."""
    path = Path(path)
    write(_tmp(path))
    _commit(_tmp(path), path)


def _write_parquet(path: Path, tables: Iterable[pa.Table], schema: pa.Schema) -> None:
    """Stream `tables` into one file, buffering small ones so row groups stay large.

    Float columns get no min/max statistics: Parquet stats leave NaN out, and DuckDB then prunes
    row groups wrongly (`where isnan(H_attn)` finds nothing). Nor dictionaries: entropies rarely
    repeat, and trying costs 3x the write time.
    """
    exact = [f.name for f in schema if not pa.types.is_floating(f.type)]
    with pq.ParquetWriter(_tmp(path), schema, compression=COMPRESSION, write_statistics=exact,
                          use_dictionary=exact) as writer:
        buf: list[pa.Table] = []
        for table in tables:
            buf.append(table)
            if sum(t.num_rows for t in buf) >= ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(buf))
                buf = []
        if buf:
            writer.write_table(pa.concat_tables(buf))
    _commit(_tmp(path), path)


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


# ---------------------------------------------------------------- writer

class RunWriter:
    """Writes one run folder batch by batch; `finalize` merges, `fail` records the error for resume."""

    def __init__(self, cache: Path | str, run_id: str, manifest: dict, resume: bool = False):
        new_run_id(run_id)  # validates
        runs = Path(cache) / "runs"
        self.run_dir = runs / run_id
        self.parts = self.run_dir / "parts"
        created, self.previous_manifest = _now(), None  # on resume: the old manifest, to check settings
        if resume:
            self.run_dir = resolve_run(cache, run_id)
            self.parts = self.run_dir / "parts"
            old = self.previous_manifest = read_manifest(self.run_dir)
            if old.get("status") == "complete":
                raise UserError(f"run {run_id!r} is already complete; nothing to resume")
            created = old.get("created") or created
        try:
            if not resume:
                runs.mkdir(parents=True, exist_ok=True)
                if self.run_dir.exists():
                    raise UserError(f"run {run_id!r} already exists in {runs}; pick a new name or resume")
                self.run_dir.mkdir()
            self.parts.mkdir(exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create run folder {self.run_dir}: {e.strerror or e}") from e
        for leftover in [*self.parts.glob("*.tmp"), *self.run_dir.glob("*.tmp")]:
            leftover.unlink()  # a half-written file from a killed writer
        done = self.done_batches()
        for p in self.parts.iterdir():  # parts of a batch cut short are rewritten from scratch
            m = _PART_RE.match(p.name)
            if m and int(m.group(2)) not in done:
                p.unlink()
        self.manifest: dict[str, Any] = {
            "run_id": run_id, "status": "running", "error": None, "created": created, "finished": None,
            "kind": "trace", "parent_run": None, "n_tokens": None, "n_response_tokens": None,
        }
        self.manifest.update({k: v for k, v in manifest.items() if k not in ("run_id", "status", "created")})
        self.manifest.update(status="running", error=None, finished=None)
        self._finalized, self._joined = False, False
        try:
            self._write_manifest()
        except OSError as e:
            raise UserError(f"cannot write {self.run_dir / 'manifest.json'}: {e.strerror or e}") from e

    @classmethod
    def join(cls, cache: Path | str, run_id: str) -> RunWriter:
        """A writer for another rank of a sharded run (entropylens.dist): it writes its batches' parts
        only; rank 0 created the folder, owns the manifest and merges at `finalize`."""
        self = cls.__new__(cls)
        self.run_dir = resolve_run(cache, run_id)
        self.parts = self.run_dir / "parts"
        self.manifest, self.previous_manifest = read_manifest(self.run_dir), None
        self._finalized, self._joined = False, True
        return self

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and not self._finalized:
            try:
                self.fail(f"{exc_type.__name__}: {exc}")
            except OSError:
                pass  # e.g. the disk is full: the manifest stays 'running', which resumes too; keep `exc`

    def _write_manifest(self) -> None:
        _write_text(self.run_dir / "manifest.json", json.dumps(self.manifest, indent=2) + "\n")

    def _part(self, kind: str, batch_idx: int) -> Path:
        return self.parts / _PART_FILES[kind].format(batch_idx)

    def done_batches(self) -> set[int]:
        """Batches whose three parts are present (responses are written last, so this means complete)."""
        found: dict[int, set[str]] = {}
        for p in self.parts.iterdir() if self.parts.is_dir() else ():
            if m := _PART_RE.match(p.name):
                found.setdefault(int(m.group(2)), set()).add(m.group(1))
        return {b for b, kinds in found.items() if kinds == set(_PART_FILES)}

    def write_batch(self, batch_idx: int, tokens: pd.DataFrame, entropy: pd.DataFrame,
                    responses: list[dict]) -> None:
        """Validate and cast one batch to the schema, then write its parts (responses last)."""
        if self._finalized:
            raise ValueError("write_batch after finalize")
        if not isinstance(batch_idx, (int, np.integer)) or batch_idx < 0:
            raise ValueError(f"batch_idx must be a non-negative int, got {batch_idx!r}")
        tok = _to_table(tokens, TOKENS_SCHEMA, "tokens", TOKENS_SORT)
        ent = _to_table(entropy, ENTROPY_SCHEMA, "entropy", ENTROPY_SORT)
        _check_values(tok, "role", TOKEN_ROLES, "tokens")
        _check_values(ent, "role", TOKEN_ROLES, "entropy")
        _check_values(ent, "lens", LENSES, "entropy")
        lines = [_response_line(r) for r in sorted(responses, key=lambda r: r.get("prompt_idx", -1))]
        for kind, table in (("tokens", tok), ("entropy", ent)):
            _write_parquet(self._part(kind, batch_idx), [table], table.schema)
        _write_text(self._part("responses", batch_idx), "".join(line + "\n" for line in lines))

    def update_manifest(self, **fields: Any) -> None:
        """Record more manifest fields (timings, versions...) atomically; status is the writer's."""
        if {"run_id", "status"} & set(fields):
            raise ValueError("run_id and status are managed by RunWriter")
        if self._joined:
            raise ValueError("only rank 0 writes the manifest of a sharded run")
        self.manifest.update(fields)
        self._write_manifest()

    def _batches(self) -> list[int]:
        batches = sorted(self.done_batches())
        if not batches:
            raise ValueError("finalize: no batches written")
        if batches != list(range(len(batches))):
            raise ValueError(f"finalize: batches {sorted(set(range(batches[-1])) - set(batches))} missing")
        return batches

    def _entropy_tables(self, batches: list[int]) -> Iterable[pa.Table]:
        """Parts in (lens, batch) order: one pass per lens keeps memory at one part."""
        lenses = sorted({v for b in batches
                         for v in pq.read_table(self._part("entropy", b), columns=["lens"])
                         .column("lens").unique().to_pylist()})
        for lens in lenses:
            for b in batches:
                table = pq.read_table(self._part("entropy", b))
                yield table.filter(pc.equal(table.column("lens"), lens))

    def finalize(self, vocab_size: int, n_layers: int) -> Path:
        """Merge parts into the final files, write the summary, remove parts, mark complete (last)."""
        if self._joined:
            raise ValueError("only rank 0 finalizes a sharded run")
        batches = self._batches()
        tokens = [pq.read_table(self._part("tokens", b)) for b in batches]
        prompts = [t.column("prompt_idx").unique().to_pylist() for t in tokens]
        for b in range(1, len(batches)):
            if prompts[b] and prompts[b - 1] and min(prompts[b]) <= max(prompts[b - 1]):
                raise ValueError(f"finalize: batch {b} has prompt_idx not after batch {b - 1}'s")
        d = self.run_dir
        _write_parquet(d / "tokens.parquet", tokens, TOKENS_SCHEMA)
        _write_parquet(d / "entropy.parquet", self._entropy_tables(batches), ENTROPY_SCHEMA)
        text = "".join(self._part("responses", b).read_text(encoding="utf-8") for b in batches)
        _write_text(d / "responses.jsonl", text)
        outcomes = outcomes_table([json.loads(line) for line in text.splitlines()])
        _write_parquet(d / "outcomes.parquet", [outcomes], OUTCOMES_SCHEMA)
        ent = pq.read_table(d / "entropy.parquet", columns=["lens", "prompt_idx", "layer", "role", *QUANTITIES])
        summary = summary_by_outcome(ent.to_pandas(), outcomes.to_pandas(), vocab_size, n_layers)
        _write_parquet(d / "summary.parquet", [_to_table(summary, SUMMARY_SCHEMA, "summary", [])],
                       SUMMARY_SCHEMA)
        shutil.rmtree(self.parts)
        roles = pa.concat_tables(tokens).column("role")
        self.manifest.update(
            status="complete", error=None, finished=_now(), n_tokens=len(roles),
            n_response_tokens=int(pc.sum(pc.equal(roles, "response")).as_py() or 0))
        self._write_manifest()
        self._finalized = True
        return d

    def fail(self, error: str) -> None:
        """Mark the run failed with the error's first line; parts stay so `resume` can continue."""
        if self._finalized:
            raise ValueError("fail after finalize: the run is complete")
        lines = str(error).strip().splitlines()
        if self._joined:  # another rank failed: record it on the manifest as it is now
            self.manifest = read_manifest(self.run_dir)
        self.manifest.update(status="failed", error=lines[0] if lines else "unknown error", finished=_now())
        self._write_manifest()


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


# ---------------------------------------------------------------- readers

def read_manifest(run_dir: Path | str) -> dict:
    """The run's manifest.json as a dict; UserError when missing or not a JSON object."""
    path = Path(run_dir) / "manifest.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found: not a run folder") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path} is unreadable: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


def list_runs(cache: Path | str) -> pd.DataFrame:
    """One row per run folder, newest first; an unreadable manifest shows as status 'corrupt'."""
    root = Path(cache) / "runs"
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
            "run_id": d.name, "model": model.get("id"), "architecture": model.get("architecture"),
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


# ---------------------------------------------------------------- outcomes (stored side; analysis: outcomes.py)

OUTCOMES = ("all", "correct", "wrong")
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
