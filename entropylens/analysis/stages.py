"""Stage detection as data: where attention / FFN explore, integrate and converge, and where the
layer policy collapses (the paper's Fig. 3 reading, arXiv 2512.19673).

Why a table and not just a plot: the BuPO trainer's `--layer auto`, the dashboard and the report all
need the same numbers — the FFN ΔH sign per layer, the boundary layer (last layer with FFN ΔH > 0)
and the first layer whose layer-policy entropy falls below a fraction of log V. `stages.json` in the
run folder (docs/storage.md) holds them, computed from summary.parquet only.

The derived quantities every entry point shares live here once: `boundary_layer` (and the trainer's
`pick_boundary_layer`), `layer_difference` (B − A per layer: `entropylens compare`, the BuPO pipeline's
before/after table, the dashboard's before/after view) and `complete_trace_run` (the guard of the report and
every dashboard view that reads a trace).

Readings of a mean ΔH per layer, with an integration band `b` in nats:
    ΔH > b  -> exploration,   |ΔH| <= b -> integration,   ΔH < -b -> convergence.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from entropylens.errors import UserError
from entropylens.analysis.intervals import normal_ci95
from entropylens.store.schema import model_name
from entropylens.store.folder import write_text
from entropylens.store import SUMMARY_ROLES, load_summary, read_manifest, resolve_run
from entropylens.store.cache import Cache

STAGES_FILE = "stages.json"
STAGES_VERSION = 1
READINGS = ("exploration", "integration", "convergence")
MODULES = {"ffn": "dH_ffn", "attn": "dH_attn"}


@dataclass
class StageConfig:
    """How to read a run's ΔH profile into stages."""

    band: float = 0.05  # nats: |mean ΔH| <= band reads as integration (near zero)
    collapse_frac: float = 0.10  # collapse layer: mean H_layer < collapse_frac * log V from there to the top
    role: str = "response"  # which tokens' summary to read: response | prompt | all

    def validate(self) -> None:
        if not (self.band >= 0 and math.isfinite(self.band)):
            raise UserError(f"--band must be a finite number of nats >= 0, got {self.band}")
        if not 0 < self.collapse_frac < 1:
            raise UserError(f"--collapse-frac must be in (0, 1), got {self.collapse_frac}")
        if self.role not in SUMMARY_ROLES:
            raise UserError(f"unknown role {self.role!r}; choose one of {', '.join(SUMMARY_ROLES)}")


def classify(mean: float, band: float) -> str:
    """Exploration / integration / convergence reading of one mean ΔH (nats)."""
    if mean > band:
        return "exploration"
    if mean < -band:
        return "convergence"
    return "integration"


def segments(layers: list[int], readings: list[str]) -> list[dict]:
    """Contiguous runs of one reading: [{"reading", "start", "end"}] with inclusive layer bounds."""
    out: list[dict] = []
    for layer, reading in zip(layers, readings):
        if out and out[-1]["reading"] == reading and out[-1]["end"] == layer - 1:
            out[-1]["end"] = layer
        else:
            out.append({"reading": reading, "start": layer, "end": layer})
    return out


def detect_stages(summary: pd.DataFrame, lens: str, vocab_size: int, cfg: StageConfig) -> dict:
    """Stages of one lens from summary rows (docs/storage.md schema): per-layer evidence and ranges.

    Layers 1..L only (layer 0 has no attention/FFN). The boundary layer is the last layer whose mean
    FFN ΔH is positive (the paper's choice for BuPO, band ignored). The collapse layer is the first layer
    from which the mean layer-policy entropy stays below `collapse_frac * log V` up to layer L
    (`first_below` is the first dip at all: with tied embeddings H^0 itself can be low). `ci95` is the
    normal-approximation half-width 1.96 std / sqrt(count), treating tokens as independent (they are not).
    """
    cfg.validate()
    s = summary[(summary["lens"] == lens) & (summary["role"] == cfg.role)]
    if s.empty:
        raise UserError(f"no summary rows for lens {lens!r} and role {cfg.role!r}")
    wide = {q: s[s["quantity"] == q].set_index("layer").sort_index() for q in ("H_layer", *MODULES.values())}
    if int(wide["dH_ffn"]["count"].sum()) == 0:
        raise UserError(f"lens {lens!r} has no FFN ΔH for {cfg.role} tokens (sites not traced, or no such "
                        f"tokens: try --role all)")
    log_v = math.log(vocab_size)
    layers = [int(x) for x in wide["dH_ffn"].index if x >= 1]
    per_layer = []
    for layer in layers:
        row: dict = {"layer": layer, "H_layer": _f(wide["H_layer"].loc[layer, "mean"])}
        row["H_layer_norm"] = row["H_layer"] / log_v
        for module, q in MODULES.items():
            r = wide[q].loc[layer]
            row[q] = _f(r["mean"])
            row[f"{q}_std"] = _f(r["std"])
            row[f"{q}_median"] = _f(r["median"])
            row[f"{q}_ci95"] = _f(normal_ci95(r["std"], r["count"]))
            row[f"{module}_reading"] = classify(row[q], cfg.band) if math.isfinite(row[q]) else "n/a"
        row["count"] = int(wide["dH_ffn"].loc[layer, "count"])
        per_layer.append(row)
    threshold = cfg.collapse_frac * log_v
    h = wide["H_layer"]["mean"]
    below = [int(layer) for layer, v in h.items() if v < threshold]
    stays = [k for k in below if all(v < threshold for layer, v in h.items() if layer >= k)]
    return {
        "lens": lens, "role": cfg.role, "n_layers": int(max(layers)), "vocab_size": int(vocab_size), "log_v": log_v,
        "boundary_layer": boundary_layer(pd.DataFrame(per_layer)),
        "collapse_threshold": threshold, "first_below": below[0] if below else None,
        "collapse_layer": stays[0] if stays else None,
        "stages": {m: segments(layers, [r[f"{m}_reading"] for r in per_layer]) for m in MODULES},
        "per_layer": per_layer,
    }


def boundary_layer(table: pd.DataFrame) -> int | None:
    """The paper's boundary layer: the last layer whose mean FFN entropy change is positive (None if none).

    `table`: one row per layer with columns `layer` and `dH_ffn` (mean; NaN counts as not positive)."""
    positive = table.loc[table["dH_ffn"] > 0, "layer"]
    return int(positive.max()) if len(positive) else None


def pick_boundary_layer(layer_table: pd.DataFrame) -> tuple[int, str]:
    """The BuPO trainer's `--layer auto`: `boundary_layer` of a per-layer table, with its evidence as text;
    UserError when the table is malformed or no layer qualifies."""
    missing = {"layer", "dH_ffn"} - set(layer_table.columns)
    if missing:
        raise UserError(f"layer table lacks column(s) {sorted(missing)}; need one row per layer with dH_ffn")
    t = layer_table.dropna(subset=["dH_ffn"]).sort_values("layer")
    if t["layer"].duplicated().any():
        raise UserError("layer table has several rows per layer; pass the per-layer mean of dH_ffn")
    k = boundary_layer(t)
    if k is None:
        raise UserError("no layer has a positive mean FFN entropy change; pick --layer K by hand")
    v = float(t.loc[t["layer"] == k, "dH_ffn"].iloc[0])
    above = t[t["layer"] > k]["dH_ffn"]
    rest = f"the {len(above)} layer(s) above are <= 0 (max {above.max():+.3f})" if len(above) else "top layer"
    return k, f"layer {k} of {int(t['layer'].max())}: last with mean dH_ffn > 0 ({v:+.3f} nats); {rest}"


def layer_difference(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Per-layer B − A of two runs' layer tables (`store.layer_table`: a `layer` column and one column per
    quantity): the same columns, rows of layers present in both. UserError when the depths differ."""
    a, b = a.set_index("layer"), b.set_index("layer")
    if len(a) != len(b):
        raise UserError(f"runs have different depths ({len(a) - 1} vs {len(b) - 1} layers); compare needs one model")
    return (b - a).reset_index()


def is_complete_trace(manifest: dict) -> bool:
    """Whether a manifest describes a finished trace run (what figures and stages read)."""
    return manifest.get("status") == "complete" and manifest.get("kind", "trace") == "trace"


def complete_trace_run(cache: Cache | Path | str, run_id: str | None) -> tuple[Path, dict]:
    """(folder, manifest) of a finished trace run in `cache`'s runs folder; UserError for an empty id, a bad or
    missing run, an unfinished one or a trainer run."""
    if not run_id:
        raise UserError("no run given: select a run in the table above")
    run = resolve_run(cache, run_id)
    m = read_manifest(run)
    if not is_complete_trace(m):
        raise UserError(f"{run_id} is not a complete trace run (status {m.get('status')}, kind {m.get('kind')})")
    return run, m


def _f(x) -> float:
    return float(x) if x is not None and pd.notna(x) else float("nan")


def run_stages(run_dir: Path | str, cfg: StageConfig | None = None) -> dict:
    """Stages of every lens stored in a complete trace run (reads manifest + summary.parquet)."""
    cfg = cfg or StageConfig()
    cfg.validate()
    run_dir = Path(run_dir)
    m = read_manifest(run_dir)
    if m.get("kind", "trace") != "trace":
        raise UserError(f"{run_dir.name} is a {m.get('kind')!r} run; stages need a trace run")
    return stages_from(m, load_summary(run_dir), cfg, m.get("run_id", run_dir.name))


def stages_from(m: dict, summary: pd.DataFrame, cfg: StageConfig, run_id: str) -> dict:
    """`run_stages` of a manifest and summary already in memory (entropylens.api.Run)."""
    cfg.validate()
    return {
        "version": STAGES_VERSION, "run_id": run_id, "model": model_name(m["model"]),
        "family": m["model"].get("family"), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "params": asdict(cfg),
        "lenses": {lens: detect_stages(summary, lens, m["model"]["vocab_size"], cfg) for lens in m["lens"]},
    }


def stages_table(stages: dict) -> pd.DataFrame:
    """Flat rows (run_id, lens, module, reading, start, end): what a dashboard table shows."""
    rows = [{"run_id": stages["run_id"], "lens": lens, "module": module, **seg}
            for lens, d in stages["lenses"].items() for module, segs in d["stages"].items() for seg in segs]
    return pd.DataFrame(rows, columns=["run_id", "lens", "module", "reading", "start", "end"])


def to_json(stages: dict) -> str:
    """stages as strict JSON text (NaN written as null)."""
    return json.dumps(_nan_to_none(stages), indent=1, allow_nan=False)


def write_stages(run_dir: Path | str, stages: dict) -> Path:
    """Write `stages.json` into the run folder atomically."""
    path = Path(run_dir) / STAGES_FILE
    write_text(path, to_json(stages))
    return path


def read_stages(run_dir: Path | str) -> dict:
    """A run's stages.json; UserError when absent (run `entropylens report RUN` to write it)."""
    path = Path(run_dir) / STAGES_FILE
    if not path.is_file():
        raise UserError(f"{path} not found; `entropylens report {Path(run_dir).name}` writes it")
    return json.loads(path.read_text(encoding="utf-8"))


def _nan_to_none(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def describe(d: dict) -> str:
    """One line per lens for reports: FFN ranges, boundary and collapse layers."""
    def rng(seg: dict) -> str:
        return f"{seg['start']}" if seg["start"] == seg["end"] else f"{seg['start']}–{seg['end']}"

    parts = []
    for reading in READINGS:
        segs = [rng(s) for s in d["stages"]["ffn"] if s["reading"] == reading]
        parts.append(f"{reading} {', '.join(segs) if segs else '—'}")
    collapse = d["collapse_layer"]
    if collapse is None:
        collapse = f"none (does not stay below {d['collapse_threshold']:.2f})"
    return (f"FFN ΔH: {'; '.join(parts)} · boundary layer {d['boundary_layer']} of {d['n_layers']}"
            f" · layer-policy collapse (H < {d['collapse_threshold']:.2f} nats) at layer {collapse}")
