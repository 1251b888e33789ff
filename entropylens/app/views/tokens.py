"""Token x layer heatmap for one prompt, and the top-1 tokens of every site at a clicked cell.

Reads only the rows of the chosen prompt and lens, and only the plotted column, from
entropy.parquet (row-group pruning keeps this fast on huge runs).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from dash import Dash, Input, Output, State, dash_table, dcc, html, no_update

from entropylens.store.cache import Cache
from entropylens.app.common import figure_block, prompt_lens_site, register_prompt_lens, register_view
from entropylens.app.data import read_entropy, read_tokens, sequence_vocab
from entropylens.store import resolve_run
from entropylens.errors import UserError
from entropylens.analysis.figures import SITE_LABELS, heatmap_figure, show_token
from entropylens.store.schema import model_name
from entropylens.analysis.stages import complete_trace_run

SITES = list(SITE_LABELS)
__all__ = ["build_heatmap", "cell_detail", "layout", "register"]


def build_heatmap(cache: Cache | Path, run_id: str | None, lens: str, prompt_idx: int | None, site: str,
                  quantity: str) -> tuple[go.Figure, pd.DataFrame]:
    """Entropy (or dH) per token position and layer of one prompt at one site."""
    if not run_id or prompt_idx is None:
        raise UserError("select a complete trace run in the table above and a prompt")
    run, m = complete_trace_run(cache, run_id)
    if quantity == "dH" and site not in ("attn", "ffn", "layer"):
        raise UserError("ΔH is defined for the attention, FFN and layer sites only")
    col = f"{quantity}_{site}"
    rows = read_entropy(run, ["position", "layer", col], lens, int(prompt_idx))
    if rows.empty:
        raise UserError(f"{run_id} has no '{lens}' rows for prompt {prompt_idx}")
    toks = read_tokens(run, int(prompt_idx))
    fig = heatmap_figure(rows, toks, model_name(m["model"]), lens, int(prompt_idx), site, quantity)
    long = rows.merge(toks, on="position", how="left").sort_values(["layer", "position"])
    return fig, long.assign(run_id=run_id, lens=lens, prompt_idx=prompt_idx)


def cell_detail(cache: Cache | Path, run_id: str, lens: str, prompt_idx: int, position: int,
                layer: int) -> pd.DataFrame:
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
        out.append({"site": SITE_LABELS[s], "top1_id": tid, "token": show_token(vocab.get(tid, "")) or "(id only)",
                    "p1": round(float(r[f"p1_{s}"]), 4), "H (nats)": round(float(r[f"H_{s}"]), 4)})
    return pd.DataFrame(out, columns=["site", "top1_id", "token", "p1", "H (nats)"])


def layout() -> list:
    """Heatmap controls, the figure and the click-detail table."""
    return [figure_block("heatmap", "Token × layer", [
        *prompt_lens_site("tokens"),
        dcc.RadioItems(id="tokens-quantity", inline=True, className="radio", value="H",
                       options=[{"label": "entropy H", "value": "H"}, {"label": "change ΔH", "value": "dH"}]),
    ], height=560), html.Div(id="cell-detail", className="detail",
                             children="Click a cell of the heatmap to see the top-1 token of each site there.")]


def register(app: Dash, cache: Cache | Path) -> None:
    """Prompt / lens options follow the focus run; the heatmap; the click detail."""

    register_prompt_lens(app, cache, "tokens")

    register_view(app, "heatmap", lambda *a: build_heatmap(cache, *a),
                  [("focus-run", "value"), ("tokens-lens", "value"), ("tokens-prompt", "value"),
                   ("tokens-site", "value"), ("tokens-quantity", "value")], memo=cache)

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
