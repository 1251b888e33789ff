"""BuPO views: before/after differences of a child run against its parent, and training curves."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from dash import Dash, dcc, html
from plotly.subplots import make_subplots

from entropylens.store.cache import Cache
from entropylens.app.common import figure_block, register_view
from entropylens.app.data import load_metrics, load_summary
from entropylens.store import read_manifest, resolve_run
from entropylens.app.views.flows import ROLE_OPTIONS
from entropylens.errors import UserError
from entropylens.analysis.figures import SITE_COLORS, SITE_LABELS, TEMPLATE, two_line_title
from entropylens.store.schema import model_name
from entropylens.analysis.stages import complete_trace_run, layer_difference
from entropylens.store import summary_layer_table

FLOW_Q = ["H_layer", "H_attn", "H_ffn"]
DH_Q = ["dH_attn", "dH_ffn"]


def build_diff(cache: Cache | Path, run_id: str | None, lens: str, role: str) -> tuple[go.Figure, pd.DataFrame]:
    """Per-layer child − parent difference of the entropy flow and of ΔH (BuPO before/after)."""
    run, m = complete_trace_run(cache, run_id)
    parent_id = m.get("parent_run")
    if not parent_id:
        raise UserError(f"{run_id} has no parent_run: pick a run traced after training (its manifest names its parent)")
    prun, _ = complete_trace_run(cache, parent_id)
    try:
        child, parent = (summary_layer_table(load_summary(r), lens, role) for r in (run, prun))
        diff = layer_difference(parent, child).set_index("layer")[FLOW_Q + DH_Q].dropna(how="all")
    except KeyError:  # a role with no rows pivots to no columns
        diff = pd.DataFrame()
    if diff.empty:
        raise UserError(f"both runs need a '{lens}' summary for {role} tokens")
    ev = _held_out_results(cache, run_id)
    titles = ["entropy flow: after − before", "entropy change ΔH: after − before"]
    if ev is not None:
        titles.append(f"held-out accuracy · {ev['base']['n_prompts']} prompts × {ev['base']['n_samples']} samples "
                      "· 95 % interval (bootstrap over prompts)")
    fig = make_subplots(rows=len(titles), cols=1, vertical_spacing=0.1, subplot_titles=titles)
    for q in FLOW_Q:
        site = q.split("_", 1)[1]
        fig.add_trace(go.Scatter(x=diff.index, y=diff[q], mode="lines+markers", name=f"Δ {SITE_LABELS[site]}",
                                 line={"color": SITE_COLORS[site]}), row=1, col=1)
    for q in DH_Q:
        site = q.split("_", 1)[1]
        fig.add_trace(go.Bar(x=diff.index, y=diff[q], name=f"Δ ΔH {site}", marker_color=SITE_COLORS[site]),
                      row=2, col=1)
    for r in (1, 2):
        fig.add_hline(y=0, line={"color": "#888", "width": 1}, row=r, col=1)
    if ev is not None:
        _accuracy_bars(fig, ev, row=3)
    fig.update_layout(template=TEMPLATE, barmode="group", legend={"orientation": "h", "y": -0.12},
                      title=two_line_title(f"Before / after — {run_id} minus parent {parent_id}",
                                           f"lens {lens} · {role} tokens · per-layer mean after − before"))
    fig.update_yaxes(title_text="difference (nats)", row=1, col=1)
    fig.update_yaxes(title_text="difference (nats)", row=2, col=1)
    fig.update_xaxes(title_text="layer l", row=2, col=1)
    out = diff.reset_index().assign(run_id=run_id, parent_run=parent_id, lens=lens, role=role)
    return fig, out


def _held_out_results(cache: Cache | Path, trained_run: str) -> dict | None:
    """eval.json of the trainer run whose re-trace is `trained_run` (`<run>-trained`), if there is one."""
    run_id = trained_run.removesuffix("-trained")
    if run_id == trained_run:
        return None
    try:
        path = resolve_run(cache, run_id) / "eval.json"
    except UserError:
        return None
    return json.loads(path.read_text()) if path.is_file() else None


def _accuracy_bars(fig: go.Figure, ev: dict, row: int) -> None:
    """Base and trained avg@K / pass@K with their 95 % intervals; the paired gain in the hover text."""
    metrics = [m for m in ev["base"] if m.startswith(("avg@", "pass@")) and not m.endswith("_ci")]
    for side, color in (("base", "#9e9e9e"), ("trained", "#d62728")):
        res = ev[side]
        y = [res[m] for m in metrics]
        fig.add_trace(go.Bar(
            x=metrics, y=y, name=f"{side} model", marker_color=color,
            error_y={"type": "data", "symmetric": False, "array": [res[f"{m}_ci"][1] - v for m, v in zip(metrics, y)],
                     "arrayminus": [v - res[f"{m}_ci"][0] for m, v in zip(metrics, y)]},
            customdata=[[ev.get("gain", {}).get(m, {}).get(k, float("nan")) for k in ("gain", "lo", "hi")]
                        for m in metrics],
            hovertemplate="%{x}: %{y:.3f}<br>gain %{customdata[0]:+.3f} [%{customdata[1]:+.3f}, "
                          "%{customdata[2]:+.3f}]<extra>" + side + "</extra>"), row=row, col=1)
    fig.update_yaxes(title_text="accuracy", range=[0, 1], row=row, col=1)


def build_training(cache: Cache | Path, run_id: str | None) -> tuple[go.Figure, pd.DataFrame]:
    """Reward, entropies, the trained policy's log-prob before/after each update, signal, clip, grad norm."""
    if not run_id:
        raise UserError("select a BuPO trainer run in the table above")
    run = resolve_run(cache, run_id)
    m = read_manifest(run)
    if m.get("kind") != "bupo":
        raise UserError(f"{run_id} is a '{m.get('kind', 'trace')}' run; training curves need a BuPO trainer run")
    df = load_metrics(run).sort_values("step")
    k = (m.get("bupo") or {}).get("layer", "k")
    fig = make_subplots(rows=6, cols=1, shared_xaxes=True, vertical_spacing=0.05,
                        subplot_titles=("reward (mean ± std over samples)", f"entropy (nats): layer {k} vs output",
                                        "log-prob of the sampled tokens under the trained policy, before → after "
                                        "each update", "signal: fraction of groups whose rewards differ",
                                        "clip fraction", "gradient norm"))
    x = df["step"]
    if "reward/std" in df:
        lo, hi = df["reward/mean"] - df["reward/std"], df["reward/mean"] + df["reward/std"]
        fig.add_trace(go.Scatter(x=pd.concat([x, x[::-1]]), y=pd.concat([hi, lo[::-1]]), fill="toself",
                                 fillcolor="#2ca02c", opacity=0.15, line={"width": 0}, showlegend=False,
                                 hoverinfo="skip", name="reward band"), row=1, col=1)
    curves = [(1, "reward/mean", "reward", "#2ca02c"), (2, "entropy/layer_k", f"π^{k} (layer {k})", "#e6550d"),
              (2, "entropy/output", "output policy", "#222222"),
              (3, "update/logp_before", "log-prob before update", "#7f7f7f"),
              (3, "update/logp_after", "log-prob after update (internal phase)", "#e6550d"),
              (5, "clip/frac", "clip fraction", "#9467bd"), (6, "optim/grad_norm", "grad norm", "#1f77b4")]
    for row, col, name, color in curves:
        if col in df:
            fig.add_trace(go.Scatter(x=x, y=df[col], mode="lines+markers" if row == 3 else "lines", name=name,
                                     line={"color": color}), row=row, col=1)
    if "signal/groups_frac" in df:
        fig.add_trace(go.Bar(x=x, y=df["signal/groups_frac"], name="groups with signal", marker_color="#17becf",
                             customdata=df[["signal/tokens"]], hovertemplate="step %{x}: %{y:.2f} of groups, "
                             "%{customdata[0]} tokens with gradient<extra></extra>"), row=4, col=1)
        fig.update_yaxes(range=[0, 1], row=4, col=1)
    switch = df.loc[df["phase"] == "output", "step"] if "phase" in df else pd.Series(dtype=float)
    if not switch.empty and (df["phase"] == "internal").any():
        s0 = float(switch.min()) - 0.5
        fig.add_vline(x=s0, line={"dash": "dash", "color": "#000"})
        fig.add_annotation(text=f"phase switch: internal (layer {k}) → output at step {int(switch.min())}",
                           x=s0, y=0.02, xref="x", yref="y domain", showarrow=False, xanchor="left",
                           yanchor="bottom", bgcolor="white")
    fig.update_layout(template=TEMPLATE, legend={"orientation": "h", "y": -0.08},
                      title=two_line_title(f"Training — {run_id} · {model_name(m.get('model') or {})}"))
    fig.update_xaxes(title_text="step", row=6, col=1)
    return fig, df


def layout() -> list:
    """Before/after and training tab contents."""
    diff = figure_block("diff", "Before / after", [
        html.Label("run after training"), dcc.Dropdown(id="diff-run", style={"width": "18em"}),
        html.Label("lens"), dcc.RadioItems(id="diff-lens", options=["bupo", "logit"], value="bupo", inline=True,
                                           className="radio"),
        html.Label("tokens"), dcc.RadioItems(id="diff-role", options=ROLE_OPTIONS, value="response", inline=True,
                                             className="radio"),
        html.Span("compared with the parent_run its manifest names", className="hint"),
    ], height=860)
    train = figure_block("train", "Training", [
        html.Label("trainer run"), dcc.Dropdown(id="train-run", style={"width": "18em"})], height=1100)
    return [diff, train]


def register(app: Dash, cache: Cache | Path) -> None:
    """Callbacks of the two BuPO views."""
    register_view(app, "diff", lambda *a: build_diff(cache, *a),
                  [("diff-run", "value"), ("diff-lens", "value"), ("diff-role", "value")], memo=cache)
    register_view(app, "train", lambda *a: build_training(cache, *a), [("train-run", "value")])
