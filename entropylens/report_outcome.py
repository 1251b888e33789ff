"""Outcome figures and tables for `entropylens report` and the dashboard: where right and wrong answers part.

Pure functions of `entropylens.outcomes` tables returning Plotly figures, so the report, the dashboard and tests
share one implementation. Every number carries its n (responses, not tokens) and a 95 % interval.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from entropylens.intervals import fmt_ci
from entropylens.outcomes import H_SITES, auroc_table, baseline_aurocs, best_separators, outcome_diff
from entropylens.store import load_outcomes

SITE_ORDER = [s[2:] for s in H_SITES]
TEMPLATE = "plotly_white"


def rests_on(table: pd.DataFrame, run_dir: Path | str | None = None) -> str:
    """`n_correct correct and n_wrong wrong responses (from P prompts)`: what a number rests on."""
    n_c, n_w = int(table["n_correct"].iloc[0]), int(table["n_wrong"].iloc[0])
    text = f"{n_c} correct and {n_w} wrong responses"
    if run_dir is not None:
        out = load_outcomes(run_dir)
        text += f" from {out.loc[out['correct'].notna(), 'source_idx'].nunique()} prompts"
    return text


def fig_auroc_heatmap(table: pd.DataFrame, lens: str, title: str = "") -> go.Figure:
    """Site × layer heatmap of AUROC (mean response-token entropy predicting a wrong answer; 0.5 = chance)."""
    t = table[table["lens"] == lens]
    z = t.pivot(index="site", columns="layer", values="auroc").reindex(SITE_ORDER)
    lo = t.pivot(index="site", columns="layer", values="lo").reindex(SITE_ORDER)
    hi = t.pivot(index="site", columns="layer", values="hi").reindex(SITE_ORDER)
    text = [[f"{z.iat[i, j]:.3f} [{lo.iat[i, j]:.3f}, {hi.iat[i, j]:.3f}]" if pd.notna(z.iat[i, j]) else ""
             for j in range(z.shape[1])] for i in range(z.shape[0])]
    fig = go.Figure(go.Heatmap(z=z.to_numpy(), x=list(z.columns), y=list(z.index), zmin=0.0, zmax=1.0, zmid=0.5,
                               colorscale="RdBu_r", customdata=text, colorbar={"title": "AUROC"},
                               hovertemplate="%{y} · layer %{x}<br>AUROC %{customdata}<extra></extra>"))
    fig.update_layout(template=TEMPLATE, title=title or f"AUROC of mean response-token entropy for a wrong answer "
                      f"· lens {lens} · {rests_on(t)}")
    fig.update_xaxes(title_text="layer l")
    fig.update_yaxes(title_text="site")
    return fig


def fig_outcome_diff(diff: pd.DataFrame, title: str = "") -> go.Figure:
    """Correct − wrong per layer with 95 % intervals (bootstrap over responses), one line per quantity."""
    fig = go.Figure()
    colors = {"H_layer": "#222222", "dH_attn": "#1f77b4", "dH_ffn": "#e6550d", "H_attn": "#1f77b4",
              "H_ffn": "#e6550d"}
    for q, d in diff.dropna(subset=["diff"]).groupby("quantity", sort=False):
        fig.add_trace(go.Scatter(x=d["layer"], y=d["diff"], mode="lines+markers", name=f"{q}: correct − wrong",
                                 line={"color": colors.get(q)},
                                 error_y={"type": "data", "symmetric": False, "array": d["hi"] - d["diff"],
                                          "arrayminus": d["diff"] - d["lo"], "thickness": 1}))
    fig.add_hline(y=0, line={"dash": "dot", "color": "#888"})
    fig.update_layout(template=TEMPLATE, legend={"orientation": "h", "y": -0.18},
                      title=title or f"correct − wrong per layer (95 % interval, bootstrap over responses) · "
                      f"{rests_on(diff)}")
    fig.update_xaxes(title_text="layer l")
    fig.update_yaxes(title_text="difference (nats)")
    return fig


def best_markdown(table: pd.DataFrame, k: int = 5) -> list[str]:
    """The k (lens, site, layer) cells furthest from chance as a Markdown table."""
    md = ["| lens | site | layer | AUROC [95 % interval] | reading |", "|---|---|---|---|---|"]
    for r in best_separators(table, k).itertuples(index=False):
        reading = "higher entropy → wrong" if r.auroc > 0.5 else "lower entropy → wrong"
        md.append(f"| {r.lens} | {r.site} | {r.layer} | {fmt_ci(r.auroc, r.lo, r.hi)} | {reading} |")
    return md


def outcome_section(run_id: str, run_dir: Path, lenses: list[str], tables: Path
                    ) -> tuple[list[str], list[tuple[str, str, go.Figure]]]:
    """Markdown and figures of a scored run's outcome analysis ([] when it lacks correct or wrong responses)."""
    out = load_outcomes(run_dir)
    n_c, n_w = int(out["correct"].eq(True).sum()), int(out["correct"].eq(False).sum())
    if not n_c or not n_w:
        return [], []
    auc = auroc_table(run_dir)
    auc.to_csv(tables / f"auroc-{run_id}.csv", index=False)
    md = [f"### Right vs wrong ({run_id})", "",
          f"Rests on {rests_on(auc, run_dir)} ({n_c / (n_c + n_w):.0%} correct). AUROC: how well a response's mean "
          "response-token entropy at one site and layer predicts a wrong answer (0.5 = chance); 95 % intervals "
          "from a bootstrap that resamples correct and wrong responses separately. Best five:", "",
          *best_markdown(auc), "",
          "Baselines an internal cell must beat (same responses and resamples): " + "; ".join(
              f"{r.baseline} {fmt_ci(r.auroc, r.lo, r.hi)}" for r in baseline_aurocs(run_dir).itertuples()) + ".", ""]
    figs = []
    for lens in lenses:
        diff = outcome_diff(run_dir, lens=lens)
        diff.to_csv(tables / f"outcome-{run_id}-{lens}.csv", index=False)
        figs += [(f"auroc-{run_id}-{lens}", f"AUROC for a wrong answer, site × layer ({run_id}, {lens})",
                  fig_auroc_heatmap(auc, lens)),
                 (f"outcome-{run_id}-{lens}", f"Correct − wrong per layer ({run_id}, {lens})",
                  fig_outcome_diff(diff))]
    return md, figs
