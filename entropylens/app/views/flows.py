"""Summary-based views: entropy flow (paper Fig. 2), entropy change (Fig. 3) with its stages, family comparison.

They read only summary.parquet (a few hundred rows per run), so they are the first thing
the page draws.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from dash import Dash, Input, Output, State, dash_table, dcc, html

from entropylens.store.cache import Cache
from entropylens.app.common import figure_block, register_view
from entropylens.app.data import load_summary
from entropylens.store import read_manifest, resolve_run
from entropylens.analysis import figures
from entropylens.errors import UserError
from entropylens.analysis.figures import SITE_LABELS, outcomes_of
from entropylens.analysis.stages import (READINGS, StageConfig, complete_trace_run, describe, detect_stages,
                                         is_complete_trace, stages_table)

ROLE_OPTIONS = [{"label": "response tokens", "value": "response"}, {"label": "prompt tokens", "value": "prompt"},
                {"label": "all tokens", "value": "all"}]
MODULE_LABELS = {"attn": "attention", "ffn": "FFN"}  # stages table rows, in the ΔH figure's order
OUTCOME_OPTIONS = [{"label": "all responses", "value": "all"}, {"label": "correct", "value": "correct"},
                   {"label": "wrong", "value": "wrong"}, {"label": "both overlaid", "value": "both"}]


def _run_summary(cache: Cache | Path, run_id: str | None, lens: str, role: str,
                 outcome: str | None = "all") -> tuple[dict, pd.DataFrame]:
    """Manifest and the summary rows of one lens, role and outcome (`both`: correct and wrong); UserError when
    there are none, saying why (an unscored run has only outcome `all`)."""
    run, m = complete_trace_run(cache, run_id)
    s = load_summary(run, outcome=None)
    wanted = outcomes_of(outcome)
    if wanted != ["all"] and not {"correct", "wrong"} & set(s["outcome"]):
        raise UserError(f"{run_id} has no scored responses (its prompts carry no reference answer): "
                        "choose 'all responses'")
    s = s[(s["lens"] == lens) & (s["role"] == role) & s["outcome"].isin(wanted)]
    if s.empty:
        raise UserError(f"{run_id} has no '{lens}' summary for {role} tokens")
    return m, s


def stage_config(band: float | None, role: str, collapse_frac: float | None = StageConfig.collapse_frac) -> StageConfig:
    """The ΔH view's inputs as a checked StageConfig, so bars and stages table read ΔH alike (empty band = 0)."""
    cfg = StageConfig(band=float(band or 0.0), collapse_frac=float(collapse_frac or 0.0), role=role)
    cfg.validate()
    return cfg


def site_order(sites: list[str] | None) -> list[str]:
    """The ticked sites in the figures' order (the layer, then each branch's input and output), whatever order
    they were ticked in: the legend reads the same, and the dashboard draws the figure once."""
    return [s for s in SITE_LABELS if s in (sites or [])]


def build_flow(cache: Cache | Path, run_id: str | None, lens: str, role: str, spread: str,
               sites: list[str], outcome: str | None = "all") -> tuple[go.Figure, pd.DataFrame]:
    """Mean entropy per layer of each chosen site with a std or IQR band (`both`: correct solid, wrong dashed)."""
    m, s = _run_summary(cache, run_id, lens, role, outcome)
    s = s[s["quantity"].isin([f"H_{x}" for x in sites])].sort_values("layer")
    fig = figures.flow_figure(s, m, run_id, lens, role, sites, spread, outcome)
    return fig, s.drop(columns=["rel_depth"], errors="ignore").assign(run_id=run_id)


def build_dh(cache: Cache | Path, run_id: str | None, lens: str, role: str, band: float,
             outcome: str | None = "all") -> tuple[go.Figure, pd.DataFrame]:
    """dH_attn and dH_ffn per layer (95 % interval over tokens), coloured exploration / integration /
    convergence, boundary marked: the stages of entropylens.analysis.stages, as the report draws them.
    `both`: correct and wrong responses side by side."""
    m, s = _run_summary(cache, run_id, lens, role, outcome)
    cfg = stage_config(band, role)
    if outcome == "both":
        s = s[s["quantity"].isin(["dH_attn", "dH_ffn"])].dropna(subset=["mean"]).sort_values("layer")
        out = s.pivot_table(index="layer", columns=["quantity", "outcome"], values="mean")
        out.columns = [f"{q}_{o}" for q, o in out.columns]
        return (figures.delta_outcomes_figure(s, m, run_id, lens, role, cfg.band),
                out.reset_index().assign(run_id=run_id))
    d = detect_stages(s, lens, m["model"]["vocab_size"], cfg)
    fig = figures.delta_figure(d["per_layer"], m, run_id, lens, role, cfg.band, outcome)
    cols = ["layer", "dH_attn", "dH_attn_ci95", "dH_ffn", "dH_ffn_ci95"]
    return fig, pd.DataFrame(d["per_layer"])[cols].assign(run_id=run_id, boundary_layer=d["boundary_layer"])


def build_stages(cache: Cache | Path, run_id: str | None, lens: str, role: str, band: float | None,
                 collapse_frac: float | None) -> tuple[dict, pd.DataFrame]:
    """Stages of the focus run for one lens and role with the ΔH view's band (entropylens.analysis.stages, as the
    report).

    Computed from the cached summary rather than read from stages.json, whose band and role are the
    report's and need not be the ones chosen here. Data: one row per layer range, with the boundary
    and collapse layers on every row.
    """
    m, s = _run_summary(cache, run_id, lens, role)
    cfg = stage_config(band, role, collapse_frac)
    d = detect_stages(s, lens, m["model"]["vocab_size"], cfg)
    k = d["boundary_layer"]
    ffn = {r["layer"]: r["dH_ffn"] for r in d["per_layer"]}
    table = stages_table({"run_id": run_id, "lenses": {lens: d}}).assign(
        role=role, band=cfg.band, boundary_layer=k, boundary_dH_ffn=ffn[k] if k is not None else None,
        collapse_layer=d["collapse_layer"], collapse_threshold=d["collapse_threshold"])
    return d, table


def _span(seg: dict) -> str:
    return f"{seg['start']}" if seg["start"] == seg["end"] else f"{seg['start']}–{seg['end']}"


def stages_panel(d: dict) -> list:
    """The stages as a module × reading table of layer ranges, the boundary and collapse evidence, the report line."""
    rows = [{"module": label, **{r: ", ".join(_span(x) for x in d["stages"][mod] if x["reading"] == r) or "—"
                                 for r in READINGS}} for mod, label in MODULE_LABELS.items()]
    per_layer = {r["layer"]: r for r in d["per_layer"]}
    k = d["boundary_layer"]
    if k is None:
        boundary = "No boundary layer: no layer has mean FFN ΔH > 0."
    else:
        r = per_layer[k]
        after = per_layer.get(k + 1)
        boundary = (f"Boundary layer l={k} of {d['n_layers']} (last layer with mean FFN ΔH > 0): mean FFN ΔH there "
                    f"{r['dH_ffn']:+.3f} nats (95 % CI ± {r['dH_ffn_ci95']:.3f})"
                    + (f", layer {k + 1}: {after['dH_ffn']:+.3f}" if after else "") + ".")
    c, threshold = d["collapse_layer"], d["collapse_threshold"]
    low = min(per_layer.values(), key=lambda r: r["H_layer"])
    collapse = (f"Layer-policy collapse at layer {c}: mean H^l stays below {threshold:.3f} nats from there to "
                f"layer {d['n_layers']}." if c is not None else
                f"No layer-policy collapse: mean H^l does not stay below {threshold:.3f} nats up to layer "
                f"{d['n_layers']} (lowest {low['H_layer']:.3f} at layer {low['layer']}).")
    return [dash_table.DataTable(id="stages-table", data=rows, columns=[{"name": c, "id": c} for c in rows[0]],
                                 style_cell={"padding": "2px 10px", "textAlign": "left"},
                                 style_header={"fontWeight": "bold"}),
            html.P(boundary, id="stages-boundary"), html.P(collapse, id="stages-collapse-layer"),
            html.P(describe(d), className="hint")]


def build_compare(cache: Cache | Path, run_ids: list[str] | None, quantity: str, role: str, lenses: list[str],
                  normalise: bool, outcome: str | None = "all") -> tuple[go.Figure, pd.DataFrame]:
    """Several runs overlaid on relative depth l/L, optionally entropy / log V; colour = family.
    With an outcome, only scored runs draw (`both`: correct solid, wrong dotted)."""
    if not run_ids:
        raise UserError("select one or more runs in the table above")
    runs = [(run_id, read_manifest(resolve_run(cache, run_id)), resolve_run(cache, run_id)) for run_id in run_ids]
    runs = [(run_id, m, load_summary(run, outcome=None)) for run_id, m, run in runs if is_complete_trace(m)]
    fig, frames = figures.families_figure(runs, quantity, role, lenses, normalise, outcome)
    if not frames:
        scored = "" if outcome in (None, "all") else " and scored responses"
        raise UserError(f"no complete trace run among the selection has {quantity} for {role} tokens{scored}")
    return fig, pd.concat(frames, ignore_index=True)


def _radio(id_: str, options, value) -> dcc.RadioItems:
    return dcc.RadioItems(id=id_, options=options, value=value, inline=True, className="radio")


def layout() -> list:
    """The three summary views as tab contents (the ΔH tab also holds its stages table)."""
    flow = figure_block("flow", "Entropy flow", [
        html.Label("lens"), _radio("flow-lens", ["bupo"], "bupo"),
        html.Label("tokens"), _radio("flow-role", ROLE_OPTIONS, "response"),
        html.Label("spread"), _radio("flow-spread", [{"label": "± std", "value": "std"},
                                                     {"label": "IQR", "value": "iqr"}], "std"),
        html.Label("sites"), dcc.Checklist(id="flow-sites", inline=True, className="radio",
                                           options=[{"label": SITE_LABELS[s], "value": s} for s in SITE_LABELS],
                                           value=["layer", "attn", "ffn"]),
    ])
    dh = figure_block("dh", "Entropy change", [
        html.Label("lens"), _radio("dh-lens", ["bupo"], "bupo"),
        html.Label("tokens"), _radio("dh-role", ROLE_OPTIONS, "response"),
        html.Label("integration band |ΔH| ≤"),
        dcc.Input(id="dh-band", type="number", value=0.05, min=0, step=0.01, debounce=True, style={"width": "5em"}),
        html.Span("nats"),
    ], height=620)
    stages = html.Div(className="view", children=[
        html.Div(className="controls", children=[
            html.H4("Stages (lens, tokens and band as above)"),
            html.Label("collapse: H^l <"),
            dcc.Input(id="stages-collapse", type="number", value=StageConfig.collapse_frac, min=0.01, max=0.99,
                      step=0.01, debounce=True, style={"width": "5em"}),
            html.Span("· log V"),
            html.Button("Download CSV", id="stages-csv", className="csv-button"),
            dcc.Download(id="stages-download"),
        ]),
        dcc.Loading(html.Div(id="stages-panel", className="detail"), type="circle"),
    ])
    compare = figure_block("compare", "Compare families", [
        html.Label("quantity"),
        dcc.Dropdown(id="compare-quantity", clearable=False, value="H_layer", style={"width": "11em"},
                     options=["H_layer", "H_attn", "H_ffn", "H_attn_in", "H_ffn_in", "dH_attn", "dH_ffn", "dH_layer"]),
        html.Label("tokens"), _radio("compare-role", ROLE_OPTIONS, "response"),
        html.Label("lens"), dcc.Checklist(id="compare-lens", options=["bupo", "logit"], value=["bupo"],
                                          inline=True, className="radio"),
        dcc.Checklist(id="compare-norm", options=[{"label": "normalise by log V", "value": "norm"}],
                      value=["norm"], inline=True, className="radio"),
    ])
    return [flow, [dh, stages], compare]


def register(app: Dash, cache: Cache | Path) -> None:
    """Callbacks of the summary views (lens options follow the focus run's manifest)."""

    @app.callback(Output("flow-lens", "options"), Output("flow-lens", "value"),
                  Output("dh-lens", "options"), Output("dh-lens", "value"),
                  Input("focus-run", "value"), State("flow-lens", "value"))
    def _lenses(run_id, current):
        lenses = ["bupo"]
        if run_id:
            try:
                lenses = read_manifest(resolve_run(cache, run_id)).get("lens") or lenses
            except (UserError, OSError, ValueError):
                pass  # the figure callbacks show the reason
        value = current if current in lenses else lenses[0]
        return lenses, value, lenses, value

    register_view(app, "flow", lambda *a: build_flow(cache, *a),
                  [("focus-run", "value"), ("flow-lens", "value"), ("flow-role", "value"),
                   ("flow-spread", "value"), ("flow-sites", "value"), ("outcome", "value")], memo=cache,
                  canonical=lambda v: (*v[:4], site_order(v[4]), *v[5:]))
    register_view(app, "dh", lambda *a: build_dh(cache, *a),
                  [("focus-run", "value"), ("dh-lens", "value"), ("dh-role", "value"), ("dh-band", "value"),
                   ("outcome", "value")], memo=cache)

    def _stages(*values) -> tuple[list, pd.DataFrame]:
        d, table = build_stages(cache, *values)
        return stages_panel(d), table

    register_view(app, "stages", _stages,
                  [("focus-run", "value"), ("dh-lens", "value"), ("dh-role", "value"), ("dh-band", "value"),
                   ("stages-collapse", "value")],
                  target=("panel", "children"), message=lambda text: html.P(text, className="hint"), memo=cache)
    register_view(app, "compare", lambda ids, q, role, lenses, norm, oc: build_compare(
                      cache, ids, q, role, lenses, bool(norm), oc),
                  [("runs-table", "selected_row_ids"), ("compare-quantity", "value"), ("compare-role", "value"),
                   ("compare-lens", "value"), ("compare-norm", "value"), ("outcome", "value")], memo=cache)

