"""Every figure the report, the dashboard, the notebook API and the analyses/ scripts draw, drawn once.

Why one module: the same plot must look and mean the same wherever it appears. Each function here is a pure
function of stored tables (summary rows, stages evidence, outcome tables, entropy rows) returning a Plotly
figure; the callers only load and check data (entropylens.analysis.report, app/views). One palette per site, per ΔH
reading, per model family and per outcome; one interval: error bars on a mean over tokens are its 95 % interval
1.96·std/√n (entropylens.analysis.intervals.normal_ci95; bars over responses are bootstrap intervals and say so); bands
around an entropy line are spreads of the tokens (IQR or ± 1 std), named in the subtitle.

Titles are two lines, what is drawn (and the model) on top and the details (run, lens, tokens, band) as a
smaller subtitle, so they fit a 1000 px figure instead of running off its right edge.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from entropylens.analysis.intervals import normal_ci95
from entropylens.analysis.outcomes import H_SITES
from entropylens.store.schema import model_name
from entropylens.analysis.stages import READINGS, StageConfig, boundary_layer
from entropylens.analysis.style import (CI95, DASHES, DH_AXIS, FAMILY_COLORS, OUTCOME_STYLE,  # noqa: F401 (re-exported)
                                        READING_COLORS, SITE_COLORS, SITE_LABELS, TEMPLATE, family_color, hline,
                                        layer_dtick, outcomes_of, tokens_label, two_line_title, vline)


def flow_figure(s: pd.DataFrame, m: dict, run_id: str, lens: str, role: str, sites=("layer", "attn", "ffn"),
                spread: str = "iqr", outcome: str | None = "all",
                collapse_frac: float = StageConfig.collapse_frac) -> go.Figure:
    """Entropy flow (paper Fig. 2): mean entropy per layer of each site with a band of the tokens (IQR or
    ± 1 std), log V and the collapse threshold; `both`: correct solid, wrong dashed, no bands.
    `s`: summary rows of one lens and role (any outcomes), `m`: the run's manifest."""
    traces = []
    for site, oc in ((x, o) for x in sites for o in outcomes_of(outcome)):
        d = s[(s["quantity"] == f"H_{site}") & (s["outcome"] == oc)].dropna(subset=["mean"]).sort_values("layer")
        if d.empty or d["count"].eq(0).all():
            continue
        color = SITE_COLORS[site]
        if outcome == "both":
            traces.append(go.Scatter(x=d["layer"], y=d["mean"], mode="lines+markers", name=f"{SITE_LABELS[site]} · "
                                     f"{oc}", line={"color": color, "width": 2.5, "dash": OUTCOME_STYLE[oc][0]},
                                     marker={"size": 5}, hovertemplate=f"layer %{{x}}<br>H = %{{y:.3f}} nats ({oc}, "
                                     f"{int(d['count'].max())} tokens)<extra>{site}</extra>"))
            continue
        lo, hi = (d["mean"] - d["std"], d["mean"] + d["std"]) if spread == "std" else (d["q25"], d["q75"])
        traces.append(go.Scatter(x=pd.concat([d["layer"], d["layer"][::-1]]), y=pd.concat([hi, lo[::-1]]),
                                 fill="toself", fillcolor=color, opacity=0.15, line={"width": 0},
                                 hoverinfo="skip", showlegend=False, name=f"{site} band"))
        traces.append(go.Scatter(x=d["layer"], y=d["mean"], mode="lines+markers", name=SITE_LABELS[site],
                                 line={"color": color, "width": 2.5}, marker={"size": 5},
                                 hovertemplate="layer %{x}<br>H = %{y:.3f} nats<extra>" + site + "</extra>"))
    log_v = math.log(m["model"]["vocab_size"])
    top, top_label = hline(log_v, {"dash": "dot", "color": "#888"}, "log V", below=True)
    low, low_label = hline(collapse_frac * log_v, {"dash": "dash", "color": "#2ca02c"}, f"{collapse_frac:.0%} of log V")
    band = ("correct solid, wrong dashed" if outcome == "both" else
            "band: ± 1 std of the tokens" if spread == "std" else "band: IQR of the tokens")
    return go.Figure(traces, layout={
        "template": TEMPLATE, "legend": {"orientation": "h", "y": -0.15}, "shapes": [top, low],
        "annotations": top_label + low_label,
        "title": two_line_title(f"Entropy flow of the internal policies — {model_name(m['model'])}",
                                f"run {run_id} · lens {lens} · {tokens_label(role, outcome)} · mean, {band}"),
        "xaxis": {"title": {"text": "layer l (0 = embedding)"}, "dtick": layer_dtick(m["model"]["n_layers"])},
        "yaxis": {"title": {"text": "mean entropy H (nats)"}}})


def _note(fig: go.Figure, text: str, x: float, xref: str) -> None:
    """A note inside the FFN panel (row 2), at its top: never over the attention panel's title."""
    fig.add_annotation(text=text, x=x, y=0.98, xref=xref, yref="y2 domain", showarrow=False, xanchor="left",
                       yanchor="top", bgcolor="rgba(255,255,255,0.85)", font={"size": 12})


def _dh_frame(rows=("attention: ΔH_attn = H(A^l) − H(attn input)",
                               "FFN: ΔH_ffn = H(F^l) − H(FFN input)")) -> go.Figure:
    return make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1, subplot_titles=rows)


def delta_figure(per_layer: pd.DataFrame | list[dict], m: dict, run_id: str, lens: str, role: str, band: float,
                 outcome: str | None = "all") -> go.Figure:
    """Entropy change (paper Fig. 3): mean ΔH of attention and FFN per layer with its 95 % interval over tokens,
    coloured exploration / integration / convergence (band b), the boundary layer marked.
    `per_layer`: `entropylens.analysis.stages.detect_stages(...)["per_layer"]`."""
    pl = pd.DataFrame(per_layer)
    fig = _dh_frame()
    for row, module in ((1, "attn"), (2, "ffn")):
        for reading in READINGS:
            d = pl[pl[f"{module}_reading"] == reading]
            fig.add_trace(go.Bar(x=d["layer"], y=d[f"dH_{module}"], name=reading, legendgroup=reading,
                                 marker_color=READING_COLORS[reading], showlegend=row == 1,
                                 error_y={"type": "data", "array": d[f"dH_{module}_ci95"], "thickness": 1,
                                          "color": "#555"},
                                 hovertemplate="layer %{x}<br>ΔH = %{y:.3f} nats<extra>" + reading + "</extra>"),
                          row=row, col=1)
        fig.add_hrect(y0=-band, y1=band, fillcolor="#9e9e9e", opacity=0.12, line_width=0, row=row, col=1)
    k = boundary_layer(pl)
    if k is not None:
        fig.add_vline(x=k + 0.5, line={"dash": "dash", "color": "#000"})
        _note(fig, f"boundary layer l={k} (last FFN ΔH > 0)", k + 0.5, "x2")
    else:
        _note(fig, "no layer with FFN ΔH > 0", 0.01, "x2 domain")
    fig.update_layout(template=TEMPLATE, barmode="overlay", legend={"orientation": "h", "y": -0.12},
                      title=two_line_title(f"Entropy change per layer — {model_name(m['model'])}",
                                           f"run {run_id} · lens {lens} · {tokens_label(role, outcome)} · |ΔH| ≤ {band:g} "
                                           f"nats reads as integration · bars: {CI95} 1.96·std/√n over tokens"))
    fig.update_yaxes(title_text=DH_AXIS)
    fig.update_xaxes(title_text="layer l", dtick=layer_dtick(m["model"]["n_layers"]), row=2, col=1)
    return fig


def delta_outcomes_figure(s: pd.DataFrame, m: dict, run_id: str, lens: str, role: str, band: float) -> go.Figure:
    """ΔH of attention and FFN per layer, correct and wrong responses side by side (95 % interval over tokens).
    `s`: summary rows of dH_attn / dH_ffn for one lens and role, outcomes correct and wrong."""
    fig = _dh_frame(("attention: ΔH_attn, correct vs wrong", "FFN: ΔH_ffn, correct vs wrong"))
    for row, q in ((1, "dH_attn"), (2, "dH_ffn")):
        for oc in ("correct", "wrong"):
            d = s[(s["quantity"] == q) & (s["outcome"] == oc)].sort_values("layer")
            fig.add_trace(go.Bar(x=d["layer"], y=d["mean"], name=f"{oc} responses", legendgroup=oc,
                                 marker_color=OUTCOME_STYLE[oc][1], showlegend=row == 1,
                                 error_y={"type": "data", "array": normal_ci95(d["std"], d["count"]), "thickness": 1,
                                          "color": "#555"},
                                 hovertemplate="layer %{x}<br>ΔH = %{y:.3f} nats<extra>" + oc + "</extra>"),
                          row=row, col=1)
        fig.add_hrect(y0=-band, y1=band, fillcolor="#9e9e9e", opacity=0.12, line_width=0, row=row, col=1)
    fig.update_layout(template=TEMPLATE, barmode="group", legend={"orientation": "h", "y": -0.12},
                      title=two_line_title(f"Entropy change per layer, correct vs wrong — {model_name(m['model'])}",
                                           f"run {run_id} · lens {lens} · {role} tokens · {CI95} over tokens (the "
                                           "'Right vs wrong' tab has intervals over responses)"))
    fig.update_yaxes(title_text=DH_AXIS)
    fig.update_xaxes(title_text="layer l", dtick=layer_dtick(m["model"]["n_layers"]), row=2, col=1)
    return fig


def families_figure(runs: list[tuple[str, dict, pd.DataFrame]], quantity: str, role: str, lenses: list[str],
                    normalise: bool = True, outcome: str | None = "all") -> tuple[go.Figure, list[pd.DataFrame]]:
    """Runs overlaid on relative depth l/L, optionally entropy / log V: colour = family, dash = run within a
    family (dotted = wrong responses), marker = lens. `runs`: (run_id, manifest, summary) of complete trace runs.
    Also returns the plotted rows (empty when no run has the quantity)."""
    fig, frames, per_family = go.Figure(), [], {}
    y_col = "mean_norm" if normalise else "mean"
    model_ids = [model_name(m["model"]) for _, m, _ in runs]
    for run_id, m, s in runs:
        fam = m["model"].get("family") or "?"
        i = per_family.setdefault(fam, 0)
        per_family[fam] += 1
        for lens, oc in ((x, o) for x in lenses for o in outcomes_of(outcome)):
            d = s[(s["lens"] == lens) & (s["role"] == role) & (s["quantity"] == quantity)
                  & (s["outcome"] == oc)].sort_values("layer")
            if d.empty or d["count"].eq(0).all():
                continue
            shown = model_name(m["model"])
            name = f"{shown} · {lens}" + (f" · {run_id}" if model_ids.count(shown) > 1 else "")
            fig.add_trace(go.Scatter(
                x=d["rel_depth"], y=d[y_col], mode="lines+markers", name=name + ("" if oc == "all" else f" · {oc}"),
                line={"color": family_color(fam), "dash": "dot" if oc == "wrong" else DASHES[i % len(DASHES)],
                      "width": 2.5},
                marker={"symbol": "circle" if lens == "bupo" else "x", "size": 7},
                opacity=1.0 if lens == "bupo" else 0.6,
                customdata=d["layer"], hovertemplate="l/L %{x:.2f} (layer %{customdata})<br>%{y:.3f}"))
            frames.append(d.assign(run_id=run_id, model=model_name(m["model"]), family=fam))
    fig.update_layout(template=TEMPLATE, legend={"orientation": "h", "y": -0.15},
                      title=two_line_title(f"Compare families on relative depth — {quantity}"
                                           + (" / log V" if normalise else ""),
                                           f"lens {', '.join(lenses)} · {tokens_label(role, outcome)} · colour = family"),
                      xaxis_title="relative depth l / L",
                      yaxis_title="normalised entropy H / log V" if normalise else "entropy H (nats)")
    if normalise:
        fig.update_yaxes(range=[0, 1.05])
    return fig, frames


def boundary_figure(st: dict, m: dict, run_id: str, lens: str) -> go.Figure:
    """Boundary-layer evidence: FFN ΔH mean ± 95 % interval and median per layer, with H_layer / log V.
    `st`: one lens of `entropylens.analysis.stages.run_stages`."""
    pl = pd.DataFrame(st["per_layer"])
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    colors = [READING_COLORS["exploration"] if v > 0 else READING_COLORS["convergence"] for v in pl["dH_ffn"]]
    fig.add_trace(go.Bar(x=pl["layer"], y=pl["dH_ffn"], name=f"FFN ΔH mean ± {CI95}", marker_color=colors,
                         error_y={"type": "data", "array": pl["dH_ffn_ci95"], "thickness": 1, "color": "#555"}),
                  secondary_y=False)
    fig.add_trace(go.Scatter(x=pl["layer"], y=pl["dH_ffn_median"], mode="markers", name="FFN ΔH median",
                             marker={"symbol": "diamond", "color": "#000", "size": 6}), secondary_y=False)
    fig.add_trace(go.Scatter(x=pl["layer"], y=pl["H_layer_norm"], mode="lines", name="H_layer / log V",
                             line={"color": SITE_COLORS["layer"], "dash": "dot"}), secondary_y=True)
    k, c = st["boundary_layer"], st["collapse_layer"]
    if k is not None:
        fig.add_vline(x=k, line={"dash": "dash", "color": READING_COLORS["exploration"]},
                      annotation_text=f"boundary l={k}", annotation_position="top left")
    if c is not None:
        fig.add_vline(x=c, line={"dash": "dash", "color": "#2ca02c"}, annotation_text=f"collapse l={c}",
                      annotation_position="bottom left")
    fig.update_layout(template=TEMPLATE, legend={"orientation": "h", "y": -0.18},
                      title=two_line_title(f"Boundary layer (last FFN ΔH > 0) — {model_name(m['model'])}",
                                           f"run {run_id} · lens {lens} · {st['role']} tokens · bars: {CI95} "
                                           "1.96·std/√n over tokens"))
    fig.update_yaxes(title_text=f"FFN ΔH ± {CI95} (nats)", secondary_y=False)
    fig.update_yaxes(title_text="H_layer / log V", range=[0, 1.05], secondary_y=True)
    fig.update_xaxes(title_text="layer l")
    return fig


def token_distributions_figure(df: pd.DataFrame, m: dict, run_id: str, lens: str, role: str) -> go.Figure:
    """Per-token entropy distributions (violins) of early / middle / late layers, per site.
    `df`: entropy rows with H_layer, H_attn, H_ffn and a `depth` label such as "early (l=2)"."""
    order = sorted(df["depth"].unique(), key=lambda s: int(re.search(r"l=(\d+)", s).group(1)))
    fig = go.Figure()
    for site in ("layer", "attn", "ffn"):
        fig.add_trace(go.Violin(x=df["depth"], y=df[f"H_{site}"], name=SITE_LABELS[site], box_visible=True,
                                meanline_visible=True, line_color=SITE_COLORS[site], spanmode="hard",
                                points=False))
    fig.update_layout(template=TEMPLATE, violinmode="group", legend={"orientation": "h", "y": -0.18},
                      xaxis={"categoryorder": "array", "categoryarray": order},
                      title=two_line_title(f"Per-token entropy distributions — {model_name(m['model'])}",
                                           f"run {run_id} · lens {lens} · {role} tokens · "
                                           f"{len(df) // max(1, len(order))} tokens per layer"),
                      yaxis_title="entropy H (nats)")
    return fig


# other control characters as their Unicode control pictures (U+2400...): plotly.js fails to draw a figure
# whose text holds some of them (a vertical tab token in a real SmolLM2 grid)
_CONTROL = {c: 0x2400 + c for c in range(0x20) if c != 0x0A} | {0x7F: 0x2421}


def show_token(text: str) -> str:
    """Token text made visible on an axis (whitespace and newlines spelled out, control characters shown)."""
    text = text.translate(_CONTROL)
    return text.replace("\n", "↵").replace(" ", "·") if text.strip() != text or "\n" in text else text


MAX_TICK_LABELS = 120


def heatmap_figure(rows: pd.DataFrame, toks: pd.DataFrame, model_id: str, lens: str, prompt_idx: int, site: str,
                   quantity: str) -> go.Figure:
    """Entropy (or ΔH) per token position and layer of one prompt: its entropy rows (position, layer,
    `<quantity>_<site>`) and its tokens (position, token_text, role)."""
    col = f"{quantity}_{site}"
    layers = np.sort(rows["layer"].unique())  # (L,)
    t = pd.Index(toks["position"]).get_indexer(rows["position"])  # each row's token column; -1: not a token shown
    li, ok = np.searchsorted(layers, rows["layer"]), t >= 0
    z = np.full((len(layers), len(toks)), np.nan, dtype=rows[col].dtype)  # (L, T); cells without a row stay NaN
    z[li[ok], t[ok]] = rows[col].to_numpy()[ok]
    # Categorical x labels "t: text" carry the token text to the axis and the hover without a
    # per-cell string array (41k hover strings would triple the callback's JSON time).
    labels = [f"{p}: {show_token(t)}" for p, t in zip(toks["position"], toks["token_text"])]
    is_dh = quantity == "dH"
    heat = go.Heatmap(
        z=z, x=labels, y=layers,
        colorscale="RdBu_r" if is_dh else "Viridis", zmid=0 if is_dh else None,
        colorbar={"title": {"text": "ΔH (nats)" if is_dh else "H (nats)"}},
        hovertemplate="position %{x}<br>layer %{y}<br>" + ("ΔH" if is_dh else "H") + " = %{z:.3f} nats<extra></extra>")
    step = max(1, int(np.ceil(len(labels) / MAX_TICK_LABELS)))
    shapes, notes = [], []
    resp = toks.loc[toks["role"] == "response", "position"]
    if not resp.empty:
        first_generated = int(resp.min()) + 1  # rows from resp.min() on predict generated tokens
        shapes.append(vline(first_generated - 0.5, {"color": "#ffffff", "width": 3, "dash": "dash"}))
        notes.append({"text": "generated response →", "x": first_generated - 0.5, "y": 1.04, "yref": "paper",
                      "showarrow": False, "xanchor": "left"})
    return go.Figure(heat, layout={
        "template": TEMPLATE, "margin": {"b": 120}, "shapes": shapes, "annotations": notes,
        "title": two_line_title(f"{'ΔH' if is_dh else 'Entropy'} per token and layer — {SITE_LABELS[site]}"
                                f" · {model_id}", f"lens {lens} · prompt {prompt_idx} · click a cell for the top-1 tokens"),
        "xaxis": {"type": "category", "tickmode": "array", "tickvals": labels[::step], "ticktext": labels[::step],
                  "tickangle": -60, "title": {"text": "position t: token (its row predicts t+1)"}},
        "yaxis": {"title": {"text": "layer l"}, "dtick": 1 if len(layers) <= 41 else None}})


def _responses(t: pd.DataFrame) -> str:
    return f"{int(t['n_correct'].iloc[0])} correct vs {int(t['n_wrong'].iloc[0])} wrong responses"


def auroc_figure(table: pd.DataFrame, lens: str, model_id: str) -> go.Figure:
    """Site × layer heatmap of AUROC (mean response-token entropy predicting a wrong answer; 0.5 = chance),
    its 95 % interval (bootstrap over responses) in the hover. `table`: entropylens.analysis.outcomes.auroc_table."""
    t = table[table["lens"] == lens]
    order = [s[2:] for s in H_SITES]
    z, lo, hi = (t.pivot(index="site", columns="layer", values=v).reindex(order) for v in ("auroc", "lo", "hi"))
    text = [[f"{z.iat[i, j]:.3f} [{lo.iat[i, j]:.3f}, {hi.iat[i, j]:.3f}]" if pd.notna(z.iat[i, j]) else ""
             for j in range(z.shape[1])] for i in range(z.shape[0])]
    fig = go.Figure(go.Heatmap(z=z.to_numpy(), x=list(z.columns), y=list(z.index), zmin=0.0, zmax=1.0, zmid=0.5,
                               colorscale="RdBu_r", customdata=text, colorbar={"title": "AUROC"},
                               hovertemplate="%{y} · layer %{x}<br>AUROC %{customdata}<extra></extra>"))
    fig.update_layout(template=TEMPLATE, title=two_line_title(
        f"AUROC of mean response-token entropy for a wrong answer — {model_id}",
        f"lens {lens} · {_responses(t)} · 0.5 = chance · hover: {CI95}, bootstrap over responses"))
    fig.update_xaxes(title_text="layer l")
    fig.update_yaxes(title_text="site")
    return fig


def outcome_diff_figure(diff: pd.DataFrame, lens: str, model_id: str) -> go.Figure:
    """Correct − wrong per layer, one line per quantity (site colours), with its 95 % interval (bootstrap over
    responses). `diff`: entropylens.analysis.outcomes.outcome_diff rows."""
    fig = go.Figure()
    for q, d in diff.dropna(subset=["diff"]).groupby("quantity", sort=False):
        fig.add_trace(go.Scatter(x=d["layer"], y=d["diff"], mode="lines+markers", name=f"{q}: correct − wrong",
                                 line={"color": SITE_COLORS.get(q.split("_", 1)[1])},
                                 error_y={"type": "data", "symmetric": False, "array": d["hi"] - d["diff"],
                                          "arrayminus": d["diff"] - d["lo"], "thickness": 1}))
    fig.add_hline(y=0, line={"dash": "dot", "color": "#888"})
    fig.update_layout(template=TEMPLATE, legend={"orientation": "h", "y": -0.18}, title=two_line_title(
        f"Correct − wrong per layer — {model_id}",
        f"lens {lens} · response tokens · {_responses(diff)} · {CI95}, bootstrap over responses"))
    fig.update_xaxes(title_text="layer l")
    fig.update_yaxes(title_text=f"difference ± {CI95} (nats)")
    return fig


GRID_TEXT_CELLS = 4000  # beyond this many cells the top-1 text is in the hover only (SVG text per cell is slow)


def grid_figure(cells: pd.DataFrame, toks: pd.DataFrame, model_name: str, lens: str, prompt_idx: int, site: str,
                color: str = "H", tracked: pd.DataFrame | None = None, tracked_label: str = "") -> go.Figure:
    """The logit-lens grid of one prompt at one site: positions on x (token text), layers on y, each cell the
    top-1 token of that layer's policy, coloured by its entropy (`color` "H") or top-1 probability ("p1"),
    the hover listing the stored top-K with probabilities. cells: entropylens.analysis.grid.grid_cells rows plus `H`;
    toks: (position, token_text, role). `tracked` (entropylens.analysis.grid.track rows): a marker with the token's rank
    where it is in the top K (rank and probability on hover; no marker = rank > K)."""
    layers = sorted(cells["layer"].unique())
    pos = list(toks["position"])
    K = max((len(p) for p in cells["probs"]), default=0)
    at = {(la, p): i for i, (la, p) in enumerate(zip(cells["layer"], cells["position"]))}
    idx = np.array([[at.get((la, p), -1) for p in pos] for la in layers]).reshape(len(layers), len(pos))
    ok, safe = idx >= 0, np.where(idx >= 0, idx, 0)  # (layers, positions) -> row of `cells`, -1 = none

    def grid(values: list) -> np.ndarray:
        arr = np.empty(len(values) + 1, dtype=object)
        for i, v in enumerate(values):
            arr[i] = v
        return np.where(ok, arr[safe], None)

    top1 = grid([show_token(t[0]) for t in cells["texts"]])
    hover = grid(["<br>".join(f"{k + 1}. {show_token(w)!r} {q:.3f}" for k, (w, q) in enumerate(zip(t, p)))
                  for t, p in zip(cells["texts"], cells["probs"])])
    value = np.asarray(cells["H"] if color == "H" else [p[0] for p in cells["probs"]], dtype=float)
    z = np.where(ok, value[safe] if len(value) else np.nan, np.nan)
    top1, hover = np.where(ok, top1, ""), np.where(ok, hover, "")
    labels = [f"{p}: {show_token(t)}" for p, t in zip(pos, toks["token_text"])]
    show_text = len(layers) * len(pos) <= GRID_TEXT_CELLS
    fig = go.Figure(go.Heatmap(
        z=z, x=labels, y=layers, text=top1, customdata=hover, texttemplate="%{text}" if show_text else None,
        textfont={"size": 9}, colorscale="Viridis_r" if color == "p1" else "Viridis",
        colorbar={"title": {"text": "p₁" if color == "p1" else "H (nats)"}},
        hovertemplate="position %{x}<br>layer %{y}<br>" + ("p₁" if color == "p1" else "H") + " = %{z:.3f}<br>"
                      f"top-{K}:<br>%{{customdata}}<extra></extra>"))
    if tracked is not None and len(tracked):
        hit = tracked.dropna(subset=["rank"])
        label = {p: lab for p, lab in zip(pos, labels)}
        hit = hit[hit["position"].isin(label)]
        fig.add_trace(go.Scatter(
            x=[label[p] for p in hit["position"]], y=hit["layer"], mode="markers+text", name=f"{tracked_label}",
            text=[str(int(r)) for r in hit["rank"]], textfont={"color": "#ff3b30", "size": 10},
            marker={"symbol": "square-open", "size": 14, "color": "#ff3b30", "line": {"width": 2}},
            customdata=hit["prob"], hovertemplate=f"{tracked_label!s}<br>layer %{{y}} · rank %{{text}} · "
                                                  "p = %{customdata:.3f}<extra></extra>"))
    step = max(1, int(np.ceil(len(labels) / MAX_TICK_LABELS)))
    fig.update_xaxes(type="category", tickmode="array", tickvals=labels[::step], ticktext=labels[::step],
                     tickangle=-60, title_text="position t: token (its row predicts t+1)")
    fig.update_yaxes(title_text="layer l", dtick=1 if len(layers) <= 41 else None,
                     range=[min(layers) - 0.5, max(layers) + 0.5] if layers else None)
    track = f" · tracking {tracked_label} (marker: its rank; none: > {K})" if tracked is not None else ""
    fig.update_layout(template=TEMPLATE, margin={"b": 120}, showlegend=False,
                      title=two_line_title(f"Logit-lens grid — top-1 token of the {SITE_LABELS[site]} policy · "
                                           f"{model_name}", f"lens {lens} · prompt {prompt_idx} · colour "
                                           f"{'p₁' if color == 'p1' else 'entropy H'} · hover: top-{K}{track}"))
    return fig
