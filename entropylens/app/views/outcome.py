"""Right vs wrong: correct − wrong per layer with intervals, the AUROC heatmap, and a response's outcome line.

The figures are entropylens.analysis.figures' (the report draws the same ones); the statistics come from
entropylens.analysis.outcomes, bootstrapped over responses and cached per run (app.data.outcome_stats).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from dash import Dash, Input, Output, dcc, html

from entropylens.store.cache import Cache
from entropylens.app.common import figure_block, register_view
from entropylens.app.data import load_outcomes, outcome_stats
from entropylens.store import read_manifest, resolve_run
from entropylens.errors import UserError
from entropylens.analysis.figures import auroc_figure, outcome_diff_figure
from entropylens.store.schema import model_name
from entropylens.analysis.stages import complete_trace_run

TAB = "Right vs wrong"  # the figures are computed only while their tab is open (bootstraps take seconds on big runs)
QUANTITY_OPTIONS = [{"label": "H_layer", "value": "H_layer"}, {"label": "ΔH attention", "value": "dH_attn"},
                    {"label": "ΔH FFN", "value": "dH_ffn"}]


def build_outcome_diff(cache: Cache | Path, run_id: str | None, lens: str,
                       quantities: list[str]) -> tuple[go.Figure, pd.DataFrame]:
    """Correct − wrong per layer (pooled over response tokens) with a 95 % interval over responses."""
    run, m = complete_trace_run(cache, run_id)
    diff, _ = outcome_stats(run, lens)
    diff = diff[diff["quantity"].isin(quantities or ["H_layer"])]
    return outcome_diff_figure(diff, lens, model_name(m["model"])), diff.assign(run_id=run_id, lens=lens)


def build_auroc(cache: Cache | Path, run_id: str | None, lens: str) -> tuple[go.Figure, pd.DataFrame]:
    """Site × layer AUROC of the mean response-token entropy for predicting a wrong answer."""
    run, m = complete_trace_run(cache, run_id)
    _, auc = outcome_stats(run, lens)
    return auroc_figure(auc, lens, model_name(m["model"])), auc[auc["lens"] == lens].assign(run_id=run_id)


def outcome_line(cache: Cache | Path, run_id: str | None, prompt_idx: int | None) -> str:
    """One response's outcome and reference, for the token × layer view."""
    if not run_id or prompt_idx is None:
        return ""
    try:
        out = load_outcomes(resolve_run(cache, run_id))
    except UserError:
        return ""
    row = out[out["prompt_idx"] == int(prompt_idx)]
    if row.empty:
        return f"sequence {prompt_idx}: not scored (this run has no outcomes)"
    r = row.iloc[0]
    ref = _reference(cache, run_id, int(prompt_idx))
    verdict = ("not scored (no reference)" if pd.isna(r["correct"]) else
               f"{'correct' if r['correct'] else 'wrong'} (reward {r['reward']:g})")
    return (f"sequence {prompt_idx} = prompt {int(r['source_idx'])}, sample {int(r['sample'])} · outcome: {verdict}"
            f" · reference answer: {ref if ref is not None else '—'}")


def _reference(cache: Cache | Path, run_id: str, prompt_idx: int) -> str | None:
    import json

    path = resolve_run(cache, run_id) / "responses.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r.get("prompt_idx") == prompt_idx:
            return r.get("answer")
    return None


def layout() -> list:
    """The 'Right vs wrong' tab: lens, quantities, the difference figure and the AUROC heatmap."""
    return [
        figure_block("outdiff", "Correct − wrong", [
            html.Label("lens"), dcc.RadioItems(id="outcome-lens", options=["bupo"], value="bupo", inline=True,
                                               className="radio"),
            html.Label("quantities"), dcc.Checklist(id="outdiff-quantities", options=QUANTITY_OPTIONS, inline=True,
                                                    value=["H_layer", "dH_attn", "dH_ffn"], className="radio"),
        ], height=480),
        figure_block("auroc", "AUROC heatmap", [html.Span("lens as above", className="hint")], height=420),
    ]


def register(app: Dash, cache: Cache | Path) -> None:
    """Lens options follow the focus run; the two figures; the token view's outcome line."""

    @app.callback(Output("outcome-lens", "options"), Output("outcome-lens", "value"),
                  Input("focus-run", "value"), Input("outcome-lens", "value"))
    def _lenses(run_id, current):
        lenses = ["bupo"]
        try:
            lenses = read_manifest(resolve_run(cache, run_id or "")).get("lens") or lenses
        except (UserError, OSError, ValueError):
            pass  # the figures say why
        return lenses, current if current in lenses else lenses[0]

    def when_open(build):
        def run(tab, *values):
            if tab != TAB:
                raise UserError(f"open the '{TAB}' tab")
            return build(cache, *values)
        return run

    register_view(app, "outdiff", when_open(build_outcome_diff),
                  [("tabs", "value"), ("focus-run", "value"), ("outcome-lens", "value"),
                   ("outdiff-quantities", "value")], memo=cache)
    register_view(app, "auroc", when_open(build_auroc), [("tabs", "value"), ("focus-run", "value"),
                                                         ("outcome-lens", "value")], memo=cache)

    @app.callback(Output("tokens-outcome", "children"), Input("focus-run", "value"), Input("tokens-prompt", "value"))
    def _outcome_line(run_id, prompt):
        return outcome_line(cache, run_id, prompt)
