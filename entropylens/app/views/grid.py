"""The logit-lens grid: what each layer's policy "would say" at every position of one prompt.

Cells are the top-1 token of the chosen site and lens, coloured by entropy (or p1); the hover lists the stored
top-K (topk.parquet) with probabilities; "track token" marks, per layer, the rank and probability of one token
(an id or its text; by default the reference answer's first token), from the stored lists ("> K" beyond them).
Reads only one prompt's rows of one lens and site. The figure is entropylens.analysis.figures.grid_figure, the one
`Run.grid` and `entropylens report` draw.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from dash import Dash, Input, Output, dcc, html

from entropylens.store.cache import Cache
from entropylens.app.common import figure_block, prompt_lens_site, register_prompt_lens, register_view
from entropylens.app.data import read_entropy, read_tokens
from entropylens import store
from entropylens.errors import UserError
from entropylens.store.schema import model_name
from entropylens.analysis.figures import SITE_LABELS
from entropylens.analysis.stages import complete_trace_run
from entropylens.analysis.grid import build_grid, guess_answer_token

SITES = list(SITE_LABELS)
__all__ = ["build", "default_token", "layout", "register"]


def read_topk(run: Path, lens: str, site: str, prompt_idx: int) -> pd.DataFrame:
    """topk.parquet rows of one (lens, site, prompt): row-group pruning keeps this fast on huge runs."""
    return store.load_topk(run, filters=[("lens", "==", lens), ("site", "==", site),
                                         ("prompt_idx", "==", int(prompt_idx))])


def build(cache: Cache | Path, run_id: str | None, lens: str, prompt_idx: int | None, site: str, color: str,
          token: str | None) -> tuple[go.Figure, pd.DataFrame]:
    """The grid of one prompt at one site and lens, tracking `token` (id or text) when given."""
    if not run_id or prompt_idx is None:
        raise UserError("select a complete trace run in the table above and a prompt")
    run, m = complete_trace_run(cache, run_id)
    tk = read_topk(run, lens, site, int(prompt_idx))
    ent = read_entropy(run, ["position", "layer", f"H_{site}"], lens, int(prompt_idx))
    name = model_name(m["model"])
    fig, data = build_grid(tk, ent, read_tokens(run, int(prompt_idx)), name, lens, site, int(prompt_idx), color,
                           token, run_id)
    return fig, data.assign(run_id=run_id)


def default_token(cache: Cache | Path, run_id: str | None, prompt_idx: int | None) -> str:
    """The reference answer's first token (the stored token text that is its longest prefix), or ""."""
    try:
        run, _ = complete_trace_run(cache, run_id)
        lines = (run / "responses.jsonl").read_text(encoding="utf-8").splitlines()
        answer = next((json.loads(x).get("answer") for x in lines if x.strip()
                       and json.loads(x).get("prompt_idx") == prompt_idx), None)
        vocab = store.load_topk(run, columns=["token_text"], filters=[("prompt_idx", "==", int(prompt_idx))])
        return guess_answer_token(answer, vocab["token_text"]) or ""
    except (UserError, OSError, ValueError, TypeError):
        return ""


def layout() -> list:
    """Grid controls and the figure."""
    return [figure_block("grid", "Logit-lens grid", [
        *prompt_lens_site("grid"),
        dcc.RadioItems(id="grid-color", inline=True, className="radio", value="H",
                       options=[{"label": "colour: entropy H", "value": "H"}, {"label": "colour: p₁", "value": "p1"}]),
        html.Label("track token (id or text)"),
        dcc.Input(id="grid-token", type="text", debounce=True, style={"width": "10em"}),
    ], height=640)]


def register(app: Dash, cache: Cache | Path) -> None:
    """Prompt / lens options follow the focus run; the tracked token defaults to the answer's first token."""

    register_prompt_lens(app, cache, "grid")

    @app.callback(Output("grid-token", "value"), Input("focus-run", "value"), Input("grid-prompt", "value"))
    def _token(run_id, prompt):
        return default_token(cache, run_id, prompt) if prompt is not None else ""

    register_view(app, "grid", lambda *a: build(cache, *a),
                  [("focus-run", "value"), ("grid-lens", "value"), ("grid-prompt", "value"),
                   ("grid-site", "value"), ("grid-color", "value"), ("grid-token", "value")])
