"""Token x layer heatmap for one prompt, and the top-1 tokens of every site at a clicked cell.

Reads only the rows of the chosen prompt and lens, and only the plotted column, from
entropy.parquet (row-group pruning keeps this fast on huge runs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from dash import Dash, Input, Output, State, dash_table, dcc, html, no_update

from app.common import SITE_LABELS, TEMPLATE, figure_block, register_view
from app.data import prompt_ids, read_entropy, read_manifest, read_tokens, resolve_run, sequence_vocab
from entropylens.errors import UserError

SITES = list(SITE_LABELS)
MAX_TICK_LABELS = 120


def _show(text: str) -> str:
    """Token text made visible on an axis (whitespace and newlines spelled out)."""
    return text.replace("\n", "↵").replace(" ", "·") if text.strip() != text or "\n" in text else text


def build_heatmap(cache: Path, run_id: str | None, lens: str, prompt_idx: int | None, site: str,
                  quantity: str) -> tuple[go.Figure, pd.DataFrame]:
    """Entropy (or dH) per token position and layer of one prompt at one site."""
    if not run_id or prompt_idx is None:
        raise UserError("select a complete trace run in the table above and a prompt")
    run = resolve_run(cache, run_id)
    m = read_manifest(run)
    if m.get("status") != "complete" or m.get("kind", "trace") != "trace":
        raise UserError(f"{run_id} is not a complete trace run")
    if quantity == "dH" and site not in ("attn", "ffn", "layer"):
        raise UserError("ΔH is defined for the attention, FFN and layer sites only")
    col = f"{quantity}_{site}"
    rows = read_entropy(run, ["position", "layer", col], lens, int(prompt_idx))
    if rows.empty:
        raise UserError(f"{run_id} has no '{lens}' rows for prompt {prompt_idx}")
    toks = read_tokens(run, int(prompt_idx))
    fig = heatmap_figure(rows, toks, m["model"]["id"], lens, int(prompt_idx), site, quantity)
    long = rows.merge(toks, on="position", how="left").sort_values(["layer", "position"])
    return fig, long.assign(run_id=run_id, lens=lens, prompt_idx=prompt_idx)


def heatmap_figure(rows: pd.DataFrame, toks: pd.DataFrame, model_id: str, lens: str, prompt_idx: int, site: str,
                   quantity: str) -> go.Figure:
    """The heatmap of one prompt's entropy rows (position, layer, `<quantity>_<site>`) and its tokens (position,
    token_text, role); also drawn by entropylens.api.Run.heatmap."""
    col = f"{quantity}_{site}"
    z = rows.pivot(index="layer", columns="position", values=col).sort_index()
    z = z.reindex(columns=toks["position"])
    # Categorical x labels "t: text" carry the token text to the axis and the hover without a
    # per-cell string array (41k hover strings would triple the callback's JSON time).
    labels = [f"{p}: {_show(t)}" for p, t in zip(toks["position"], toks["token_text"])]
    is_dh = quantity == "dH"
    fig = go.Figure(go.Heatmap(
        z=z.to_numpy(), x=labels, y=z.index,
        colorscale="RdBu_r" if is_dh else "Viridis", zmid=0 if is_dh else None,
        colorbar={"title": {"text": "ΔH (nats)" if is_dh else "H (nats)"}},
        hovertemplate="position %{x}<br>layer %{y}<br>" + ("ΔH" if is_dh else "H") + " = %{z:.3f} nats<extra></extra>"))
    step = max(1, int(np.ceil(len(labels) / MAX_TICK_LABELS)))
    fig.update_xaxes(type="category", tickmode="array", tickvals=labels[::step], ticktext=labels[::step],
                     tickangle=-60, title_text="position t: token (its row predicts t+1)")
    fig.update_yaxes(title_text="layer l", dtick=1 if len(z.index) <= 41 else None)
    resp = toks.loc[toks["role"] == "response", "position"]
    if not resp.empty:
        first_generated = int(resp.min()) + 1  # rows from resp.min() on predict generated tokens
        fig.add_vline(x=first_generated - 0.5, line={"color": "#ffffff", "width": 3, "dash": "dash"})
        fig.add_annotation(text="generated response →", x=first_generated - 0.5, y=1.04, yref="paper",
                           showarrow=False, xanchor="left")
    fig.update_layout(template=TEMPLATE, margin={"b": 120},
                      title=f"{'ΔH' if is_dh else 'Entropy'} per token and layer — {SITE_LABELS[site]} · "
                            f"{model_id} · lens {lens} · prompt {prompt_idx} (click a cell for top-1 tokens)")
    return fig


def cell_detail(cache: Path, run_id: str, lens: str, prompt_idx: int, position: int, layer: int) -> pd.DataFrame:
    """Top-1 token id, its text (when it occurs in the run's sequences) and p1 for every site at one cell."""
    run = resolve_run(cache, run_id)
    cols = [f"top1_{s}" for s in SITES] + [f"p1_{s}" for s in SITES] + [f"H_{s}" for s in SITES]
    row = read_entropy(run, cols, lens, int(prompt_idx), position=int(position), layer=int(layer))
    if row.empty:
        raise UserError(f"no '{lens}' row for prompt {prompt_idx}, position {position}, layer {layer}")
    vocab, r = sequence_vocab(run), row.iloc[0]
    out = []
    for s in SITES:
        tid = int(r[f"top1_{s}"])
        if tid < 0:
            continue  # site not traced at this layer
        out.append({"site": SITE_LABELS[s], "top1_id": tid, "token": _show(vocab.get(tid, "")) or "(id only)",
                    "p1": round(float(r[f"p1_{s}"]), 4), "H (nats)": round(float(r[f"H_{s}"]), 4)})
    return pd.DataFrame(out, columns=["site", "top1_id", "token", "p1", "H (nats)"])


def layout() -> list:
    """Heatmap controls, the figure and the click-detail table."""
    return [figure_block("heatmap", "Token × layer", [
        html.Label("prompt"), dcc.Dropdown(id="tokens-prompt", clearable=False, style={"width": "8em"}),
        html.Label("lens"), dcc.RadioItems(id="tokens-lens", options=["bupo"], value="bupo", inline=True,
                                           className="radio"),
        html.Label("site"), dcc.Dropdown(id="tokens-site", clearable=False, value="layer", style={"width": "12em"},
                                         options=[{"label": SITE_LABELS[s], "value": s} for s in SITES]),
        dcc.RadioItems(id="tokens-quantity", inline=True, className="radio", value="H",
                       options=[{"label": "entropy H", "value": "H"}, {"label": "change ΔH", "value": "dH"}]),
    ], height=560), html.Div(id="cell-detail", className="detail",
                             children="Click a cell of the heatmap to see the top-1 token of each site there.")]


def register(app: Dash, cache: Path) -> None:
    """Prompt / lens options follow the focus run; the heatmap; the click detail."""

    @app.callback(Output("tokens-prompt", "options"), Output("tokens-prompt", "value"),
                  Output("tokens-lens", "options"), Output("tokens-lens", "value"),
                  Input("focus-run", "value"), State("tokens-prompt", "value"), State("tokens-lens", "value"))
    def _options(run_id, prompt, lens):
        try:
            run = resolve_run(cache, run_id or "")
            m = read_manifest(run)
            if m.get("status") != "complete" or m.get("kind", "trace") != "trace":
                return [], None, ["bupo"], "bupo"
            ids, lenses = prompt_ids(run), m.get("lens") or ["bupo"]
        except (UserError, OSError, ValueError):
            return [], None, ["bupo"], "bupo"
        return ([{"label": f"prompt {i}", "value": i} for i in ids], prompt if prompt in ids else ids[0],
                lenses, lens if lens in lenses else lenses[0])

    register_view(app, "heatmap", lambda *a: build_heatmap(cache, *a),
                  [("focus-run", "value"), ("tokens-lens", "value"), ("tokens-prompt", "value"),
                   ("tokens-site", "value"), ("tokens-quantity", "value")])

    @app.callback(Output("cell-detail", "children"), Input("heatmap-graph", "clickData"),
                  State("focus-run", "value"), State("tokens-lens", "value"), State("tokens-prompt", "value"),
                  prevent_initial_call=True)
    def _detail(click, run_id, lens, prompt):
        if not click or not click.get("points"):
            return no_update
        pt = click["points"][0]
        try:
            position = int(str(pt["x"]).split(":", 1)[0])
            df = cell_detail(cache, run_id, lens, prompt, position, int(pt["y"]))
        except UserError as e:
            return str(e)
        return [html.H4(f"Top-1 tokens at position {position}, layer {pt['y']} (prompt {prompt}, lens {lens})"),
                dash_table.DataTable(id="cell-table", data=df.to_dict("records"),
                                     columns=[{"name": c, "id": c} for c in df.columns],
                                     style_cell={"fontFamily": "monospace", "padding": "2px 8px"})]
