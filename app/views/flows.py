"""Summary-based views: entropy flow (paper Fig. 2), entropy change (Fig. 3) with its stages, family comparison.

They read only summary.parquet (a few hundred rows per run), so they are the first thing
the page draws.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from dash import Dash, Input, Output, State, dash_table, dcc, html
from plotly.subplots import make_subplots

from app.common import (DASHES, SITE_COLORS, SITE_LABELS, TEMPLATE, family_color, figure_block,
                        register_view)
from app.data import complete_trace_run, load_summary, read_manifest, resolve_run
from entropylens.errors import UserError
from entropylens.stages import READINGS, StageConfig, classify, describe, detect_stages, stages_table

ROLE_OPTIONS = [{"label": "response tokens", "value": "response"}, {"label": "prompt tokens", "value": "prompt"},
                {"label": "all tokens", "value": "all"}]
DH_COLORS = {"exploration": "#e6550d", "integration": "#9e9e9e", "convergence": "#3182bd"}
MODULE_LABELS = {"attn": "attention", "ffn": "FFN"}  # stages table rows, in the ΔH figure's order
OUTCOME_OPTIONS = [{"label": "all responses", "value": "all"}, {"label": "correct", "value": "correct"},
                   {"label": "wrong", "value": "wrong"}, {"label": "both overlaid", "value": "both"}]
OUTCOME_STYLE = {"all": ("solid", "#444444"), "correct": ("solid", "#2ca02c"), "wrong": ("dash", "#d62728")}


def outcomes_of(outcome: str | None) -> list[str]:
    """The summary outcomes a selector value draws: `both` overlays correct and wrong."""
    return ["correct", "wrong"] if outcome == "both" else [outcome or "all"]


def _run_summary(cache: Path, run_id: str | None, lens: str, role: str,
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


def boundary_layer(dh: pd.DataFrame) -> int | None:
    """The paper's boundary layer: the last layer whose mean FFN entropy change is positive."""
    pos = dh[(dh["quantity"] == "dH_ffn") & (dh["mean"] > 0)]
    return int(pos["layer"].max()) if not pos.empty else None


def build_flow(cache: Path, run_id: str | None, lens: str, role: str, spread: str,
               sites: list[str], outcome: str | None = "all") -> tuple[go.Figure, pd.DataFrame]:
    """Mean entropy per layer of each chosen site with a std or IQR band (`both`: correct solid, wrong dashed)."""
    m, s = _run_summary(cache, run_id, lens, role, outcome)
    s = s[s["quantity"].isin([f"H_{x}" for x in sites])].sort_values("layer")
    fig = go.Figure()
    for site, oc in ((x, o) for x in sites for o in outcomes_of(outcome)):
        d = s[(s["quantity"] == f"H_{site}") & (s["outcome"] == oc)]
        if d.empty or d["count"].eq(0).all():
            continue
        if outcome == "both":
            n = int(d["count"].max())
            fig.add_trace(go.Scatter(x=d["layer"], y=d["mean"], mode="lines+markers", name=f"{SITE_LABELS[site]} · "
                                     f"{oc}", line={"color": SITE_COLORS[site], "width": 2.5,
                                                    "dash": OUTCOME_STYLE[oc][0]}, marker={"size": 5},
                                     hovertemplate=f"layer %{{x}}<br>H = %{{y:.3f}} nats ({oc}, {n} tokens)"
                                     f"<extra>{site}</extra>"))
            continue
        lo, hi = (d["mean"] - d["std"], d["mean"] + d["std"]) if spread == "std" else (d["q25"], d["q75"])
        color = SITE_COLORS[site]
        fig.add_trace(go.Scatter(x=pd.concat([d["layer"], d["layer"][::-1]]), y=pd.concat([hi, lo[::-1]]),
                                 fill="toself", fillcolor=color, opacity=0.15, line={"width": 0},
                                 hoverinfo="skip", showlegend=False, name=f"{site} band"))
        fig.add_trace(go.Scatter(x=d["layer"], y=d["mean"], mode="lines+markers", name=SITE_LABELS[site],
                                 line={"color": color, "width": 2.5}, marker={"size": 5},
                                 hovertemplate="layer %{x}<br>H = %{y:.3f} nats<extra>" + site + "</extra>"))
    band = "± 1 std" if spread == "std" else "IQR band"
    band = "correct solid, wrong dashed" if outcome == "both" else band
    which = "" if outcome in (None, "all") else f" · {outcome} responses"
    fig.update_layout(template=TEMPLATE, legend={"orientation": "h", "y": -0.15},
                      title=f"Entropy flow — {m['model']['id']} · lens {lens} · {role} tokens{which} (mean, {band})",
                      xaxis_title="layer l (0 = embedding)", yaxis_title="entropy H (nats)")
    fig.update_xaxes(dtick=1 if m["model"]["n_layers"] <= 40 else None)
    return fig, s.drop(columns=["rel_depth"], errors="ignore").assign(run_id=run_id)


def build_dh(cache: Path, run_id: str | None, lens: str, role: str, band: float,
             outcome: str | None = "all") -> tuple[go.Figure, pd.DataFrame]:
    """dH_attn and dH_ffn per layer, coloured exploration / integration / convergence; boundary marked.
    `both`: correct and wrong responses side by side."""
    if outcome == "both":
        return _dh_both(cache, run_id, lens, role, band)
    m, s = _run_summary(cache, run_id, lens, role, outcome)
    s = s[s["quantity"].isin(["dH_attn", "dH_ffn"])].sort_values("layer").copy()
    band = stage_config(band, role).band
    s["reading"] = [classify(x, band) for x in s["mean"]]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("attention: ΔH_attn = H(A^l) − H(attn input)",
                                        "FFN: ΔH_ffn = H(F^l) − H(FFN input)"))
    for row, q in ((1, "dH_attn"), (2, "dH_ffn")):
        for reading, color in DH_COLORS.items():
            d = s[(s["quantity"] == q) & (s["reading"] == reading)]
            fig.add_trace(go.Bar(x=d["layer"], y=d["mean"], name=reading, marker_color=color, legendgroup=reading,
                                 showlegend=row == 1, error_y={"type": "data", "array": d["std"], "thickness": 1,
                                                               "color": "#555", "visible": True},
                                 hovertemplate="layer %{x}<br>ΔH = %{y:.3f} nats<extra>" + reading + "</extra>"),
                          row=row, col=1)
        fig.add_hrect(y0=-band, y1=band, fillcolor="#9e9e9e", opacity=0.12, line_width=0, row=row, col=1)
    k = boundary_layer(s)
    if k is not None:
        fig.add_vline(x=k + 0.5, line={"dash": "dash", "color": "#000"})
        fig.add_annotation(text=f"boundary layer l={k} (last FFN ΔH > 0)", x=k + 0.5, y=0.98, xref="x2",
                           yref="y2 domain", showarrow=False, xanchor="left", yanchor="top", bgcolor="white",
                           font={"size": 12})
    else:
        fig.add_annotation(text="no layer with FFN ΔH > 0", x=0.5, y=1.06, xref="paper", yref="paper",
                           showarrow=False)
    fig.update_layout(template=TEMPLATE, barmode="overlay", legend={"orientation": "h", "y": -0.12},
                      title=f"Entropy change — {m['model']['id']} · lens {lens} · {role} tokens"
                            + ("" if outcome in (None, "all") else f" · {outcome} responses")
                            + f" (|ΔH| ≤ {band:g} nats reads as integration)")
    fig.update_yaxes(title_text="ΔH (nats)")
    fig.update_xaxes(title_text="layer l", dtick=1 if m["model"]["n_layers"] <= 40 else None, row=2, col=1)
    out = s.pivot_table(index="layer", columns="quantity", values="mean").reset_index()
    return fig, out.assign(run_id=run_id, boundary_layer=k)


def _dh_both(cache: Path, run_id: str | None, lens: str, role: str, band: float) -> tuple[go.Figure, pd.DataFrame]:
    """ΔH of attention and FFN per layer, correct and wrong responses side by side (± 1 std)."""
    m, s = _run_summary(cache, run_id, lens, role, "both")
    s = s[s["quantity"].isin(["dH_attn", "dH_ffn"])].dropna(subset=["mean"]).sort_values("layer")
    band = stage_config(band, role).band
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("attention: ΔH_attn, correct vs wrong", "FFN: ΔH_ffn, correct vs wrong"))
    for row, q in ((1, "dH_attn"), (2, "dH_ffn")):
        for oc in ("correct", "wrong"):
            d = s[(s["quantity"] == q) & (s["outcome"] == oc)]
            fig.add_trace(go.Bar(x=d["layer"], y=d["mean"], name=f"{oc} responses", legendgroup=oc,
                                 marker_color=OUTCOME_STYLE[oc][1], showlegend=row == 1,
                                 error_y={"type": "data", "array": d["std"], "thickness": 1, "color": "#555"},
                                 hovertemplate="layer %{x}<br>ΔH = %{y:.3f} nats<extra>" + oc + "</extra>"),
                          row=row, col=1)
        fig.add_hrect(y0=-band, y1=band, fillcolor="#9e9e9e", opacity=0.12, line_width=0, row=row, col=1)
    fig.update_layout(template=TEMPLATE, barmode="group", legend={"orientation": "h", "y": -0.12},
                      title=f"Entropy change — {m['model']['id']} · lens {lens} · {role} tokens · correct vs wrong "
                            "(mean ± 1 std over tokens; the 'Right vs wrong' tab has intervals over responses)")
    fig.update_yaxes(title_text="ΔH (nats)")
    fig.update_xaxes(title_text="layer l", dtick=1 if m["model"]["n_layers"] <= 40 else None, row=2, col=1)
    out = s.pivot_table(index="layer", columns=["quantity", "outcome"], values="mean")
    out.columns = [f"{q}_{o}" for q, o in out.columns]
    return fig, out.reset_index().assign(run_id=run_id)


def build_stages(cache: Path, run_id: str | None, lens: str, role: str, band: float | None,
                 collapse_frac: float | None) -> tuple[dict, pd.DataFrame]:
    """Stages of the focus run for one lens and role with the ΔH view's band (entropylens.stages, as the report).

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


def build_compare(cache: Path, run_ids: list[str] | None, quantity: str, role: str, lenses: list[str],
                  normalise: bool, outcome: str | None = "all") -> tuple[go.Figure, pd.DataFrame]:
    """Several runs overlaid on relative depth l/L, optionally entropy / log V; colour = family.
    With an outcome, only scored runs draw (`both`: correct solid, wrong dotted)."""
    if not run_ids:
        raise UserError("select one or more runs in the table above")
    fig, frames, per_family = go.Figure(), [], {}
    y_col = "mean_norm" if normalise else "mean"
    runs = [(run_id, read_manifest(resolve_run(cache, run_id)), resolve_run(cache, run_id)) for run_id in run_ids]
    runs = [r for r in runs if r[1].get("status") == "complete" and r[1].get("kind", "trace") == "trace"]
    model_ids = [m["model"]["id"] for _, m, _ in runs]
    for run_id, m, run in runs:
        fam = m["model"].get("family", "?")
        i = per_family.setdefault(fam, 0)  # runs of one family share its colour, differ by dash
        per_family[fam] += 1
        s = load_summary(run, outcome=None)
        for lens, oc in ((x, o) for x in lenses for o in outcomes_of(outcome)):
            d = s[(s["lens"] == lens) & (s["role"] == role) & (s["quantity"] == quantity)
                  & (s["outcome"] == oc)].sort_values("layer")
            if d.empty or d["count"].eq(0).all():
                continue
            name = f"{m['model']['id']} · {lens}" + (f" · {run_id}" if model_ids.count(m["model"]["id"]) > 1 else "")
            name += "" if oc == "all" else f" · {oc}"
            dash = "dot" if oc == "wrong" else DASHES[i % len(DASHES)]
            fig.add_trace(go.Scatter(
                x=d["rel_depth"], y=d[y_col], mode="lines+markers", name=name,
                line={"color": family_color(fam), "dash": dash, "width": 2.5},
                marker={"symbol": "circle" if lens == "bupo" else "x", "size": 7},
                opacity=1.0 if lens == "bupo" else 0.6,
                customdata=d["layer"], hovertemplate="l/L %{x:.2f} (layer %{customdata})<br>%{y:.3f}"))
            frames.append(d.assign(run_id=run_id, model=m["model"]["id"], family=fam))
    if not frames:
        scored = "" if outcome in (None, "all") else " and scored responses"
        raise UserError(f"no complete trace run among the selection has {quantity} for {role} tokens{scored}")
    fig.update_layout(template=TEMPLATE, legend={"orientation": "h", "y": -0.15},
                      title=f"Compare families — {quantity} · {role} tokens",
                      xaxis_title="relative depth l / L",
                      yaxis_title="normalised entropy H / log V" if normalise else "entropy H (nats)")
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


def register(app: Dash, cache: Path) -> None:
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
                   ("flow-spread", "value"), ("flow-sites", "value"), ("outcome", "value")])
    register_view(app, "dh", lambda *a: build_dh(cache, *a),
                  [("focus-run", "value"), ("dh-lens", "value"), ("dh-role", "value"), ("dh-band", "value"),
                   ("outcome", "value")])

    def _stages(*values) -> tuple[list, pd.DataFrame]:
        d, table = build_stages(cache, *values)
        return stages_panel(d), table

    register_view(app, "stages", _stages,
                  [("focus-run", "value"), ("dh-lens", "value"), ("dh-role", "value"), ("dh-band", "value"),
                   ("stages-collapse", "value")],
                  target=("panel", "children"), message=lambda text: html.P(text, className="hint"))
    register_view(app, "compare", lambda ids, q, role, lenses, norm, oc: build_compare(
                      cache, ids, q, role, lenses, bool(norm), oc),
                  [("runs-table", "selected_row_ids"), ("compare-quantity", "value"), ("compare-role", "value"),
                   ("compare-lens", "value"), ("compare-norm", "value"), ("outcome", "value")])

