"""The report's outcome section: where right and wrong answers part (Markdown, tables, figures).

The figures are entropylens.analysis.figures' `auroc_figure` and `outcome_diff_figure` (the dashboard's 'Right vs wrong'
tab draws the same ones). Every number carries its n (responses, not tokens) and a 95 % interval.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from entropylens.analysis.figures import auroc_figure, outcome_diff_figure
from entropylens.analysis.intervals import fmt_ci
from entropylens.analysis.outcomes import auroc_table, baseline_aurocs, best_separators, outcome_diff
from entropylens.store.schema import model_name
from entropylens.store import load_outcomes, read_manifest


def rests_on(table: pd.DataFrame, run_dir: Path | str | None = None) -> str:
    """`n_correct correct and n_wrong wrong responses (from P prompts)`: what a number rests on."""
    n_c, n_w = int(table["n_correct"].iloc[0]), int(table["n_wrong"].iloc[0])
    text = f"{n_c} correct and {n_w} wrong responses"
    if run_dir is not None:
        out = load_outcomes(run_dir)
        text += f" from {out.loc[out['correct'].notna(), 'source_idx'].nunique()} prompts"
    return text


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
    figs, model_id = [], model_name(read_manifest(run_dir)["model"])
    for lens in lenses:
        diff = outcome_diff(run_dir, lens=lens)
        diff.to_csv(tables / f"outcome-{run_id}-{lens}.csv", index=False)
        figs += [(f"auroc-{run_id}-{lens}", f"AUROC for a wrong answer, site × layer ({run_id}, {lens})",
                  auroc_figure(auc, lens, model_id)),
                 (f"outcome-{run_id}-{lens}", f"Correct − wrong per layer ({run_id}, {lens})",
                  outcome_diff_figure(diff, lens, model_id))]
    return md, figs
