"""The dashboard and the report draw the same figures (entropylens.analysis.figures): equal Plotly JSON for the same
run, one palette, and the interval they state."""

from __future__ import annotations

import json

import pytest

from entropylens.app.views.flows import build_compare, build_dh, build_flow
from entropylens.app.views.outcome import build_auroc, build_outcome_diff
from entropylens.app.views.tokens import build_heatmap
from app_fixtures import RUNS
from entropylens.analysis import figures
from entropylens.api import load
from entropylens.analysis.report import fig_delta, fig_families, fig_trajectory, load_run
from entropylens.analysis.outcome_report import outcome_section
from entropylens.analysis.stages import StageConfig


def as_json(fig) -> dict:
    return json.loads(fig.to_json())


def test_flow_dh_and_compare_are_the_reports_figures(cache):
    cfg = StageConfig()  # the report's defaults: band 0.05, collapse 10 % of log V, response tokens
    runs = {r: load_run(cache, r, cfg) for r in ("llama-base", "qwen3-base")}
    for run_id, lens in (("llama-base", "logit"), ("qwen3-base", "bupo")):
        ours, _ = build_flow(cache, run_id, lens, "response", "iqr", ["layer", "attn", "ffn"])
        assert as_json(ours) == as_json(fig_trajectory(runs[run_id], lens, "response"))
        ours, _ = build_dh(cache, run_id, lens, "response", cfg.band)
        assert as_json(ours) == as_json(fig_delta(runs[run_id], lens, "response"))
    ours, _ = build_compare(cache, ["llama-base", "qwen3-base"], "H_layer", "response", ["bupo"], True)
    assert as_json(ours) == as_json(fig_families(list(runs.values()), "bupo", "response"))


def test_outcome_figures_are_the_reports(cache, tmp_path):
    run_dir = cache / "runs" / "llama-scored"
    _, figs = outcome_section("llama-scored", run_dir, ["bupo"], tmp_path)
    report = {name.split("-")[0]: fig for name, _, fig in figs}
    ours, _ = build_outcome_diff(cache, "llama-scored", "bupo", ["H_layer", "dH_attn", "dH_ffn"])
    assert as_json(ours) == as_json(report["outcome"])
    ours, _ = build_auroc(cache, "llama-scored", "bupo")
    assert as_json(ours) == as_json(report["auroc"])


def test_notebook_heatmap_is_the_dashboards(cache):
    ours, _ = build_heatmap(cache, "qwen3-base", "bupo", 1, "ffn", "dH")
    theirs = load("qwen3-base", cache=str(cache)).heatmap(prompt=1, lens="bupo", site="ffn", quantity="dH")
    assert as_json(ours) == as_json(theirs)


def test_one_palette_and_the_stated_interval(cache):
    flow, _ = build_flow(cache, "llama-base", "bupo", "response", "std", list(figures.SITE_COLORS))
    lines = {t.name: t.line.color for t in flow.data if t.showlegend is not False}
    assert lines == {figures.SITE_LABELS[s]: c for s, c in figures.SITE_COLORS.items()}
    dh, data = build_dh(cache, "llama-base", "bupo", "response", 0.05)
    for t in dh.data:  # reading colours, and error bars are the stored 95 % interval, which the axis names
        assert t.marker.color == figures.READING_COLORS[t.name]
    assert all("95 % interval" in dh.layout[ax].title.text for ax in ("yaxis", "yaxis2"))
    ffn = [t for t in dh.data if t.xaxis == "x2"]
    got = {x: e for t in ffn for x, e in zip(t.x, t.error_y.array)}
    assert got == pytest.approx(dict(zip(data["layer"], data["dH_ffn_ci95"])))
    cmp_, _ = build_compare(cache, ["llama-base", "qwen3-base"], "H_layer", "response", ["bupo"], True)
    assert [t.line.color for t in cmp_.data] == [figures.family_color("llama"), figures.family_color("qwen3")]
    assert RUNS["qwen3-base"].family == "qwen3"
