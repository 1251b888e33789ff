"""The dashboard's outcome views on a scored synthetic run, checked against pandas on the raw Parquet."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from entropylens.app.views.flows import build_compare, build_dh, build_flow
from entropylens.app.views.outcome import build_auroc, build_outcome_diff, outcome_line
from app_fixtures import RUNS
from entropylens.errors import UserError

RUN = "llama-scored"


def raw(cache, name):
    return pd.read_parquet(cache / "runs" / RUN / name)


def ids(cache, correct: bool) -> list[int]:
    out = raw(cache, "outcomes.parquet")
    return out.loc[out["correct"] == correct, "prompt_idx"].tolist()


def test_flow_by_outcome_is_the_layer_mean_of_those_responses(cache):
    e = raw(cache, "entropy.parquet")
    e = e[(e.lens == "bupo") & (e.role == "response")]
    for oc, flag in (("correct", True), ("wrong", False)):
        fig, data = build_flow(cache, RUN, "bupo", "response", "std", ["ffn"], oc)
        (line,) = [t for t in fig.data if t.mode == "lines+markers"]
        want = e[e.prompt_idx.isin(ids(cache, flag))].groupby("layer")["H_ffn"].mean().dropna()
        assert list(line.x) == list(want.index)  # layers with FFN tokens (1..L): no undefined layer-0 point
        np.testing.assert_allclose(np.array(line.y), want.to_numpy(), rtol=1e-5)
        assert set(data["outcome"]) == {oc}
    fig, _ = build_flow(cache, RUN, "bupo", "response", "std", ["layer", "ffn"], "both")
    assert sorted(t.name for t in fig.data) == ["FFN F^l · correct", "FFN F^l · wrong", "layer H^l · correct",
                                                "layer H^l · wrong"]
    assert {t.line.dash for t in fig.data if t.name.endswith("wrong")} == {"dash"}


def test_dh_and_compare_overlay_both_outcomes(cache):
    fig, data = build_dh(cache, RUN, "bupo", "response", 0.05, "both")
    assert sorted({t.name for t in fig.data}) == ["correct responses", "wrong responses"]
    assert sum(len(t.x) for t in fig.data) == 2 * 2 * RUNS[RUN].n_layers  # 2 modules x 2 outcomes
    assert {"dH_ffn_correct", "dH_ffn_wrong"} <= set(data.columns)
    fig, _ = build_compare(cache, [RUN, "qwen3-base"], "H_ffn", "response", ["bupo"], True, "both")
    assert sorted(t.name for t in fig.data) == ["synthetic/llama-6L · bupo · correct",
                                                "synthetic/llama-6L · bupo · wrong"]  # qwen3-base is unscored


def test_unscored_run_says_so(cache):
    with pytest.raises(UserError, match="no scored responses"):
        build_flow(cache, "qwen3-base", "bupo", "response", "std", ["layer"], "correct")
    with pytest.raises(UserError, match="0 correct and 0 wrong"):
        build_outcome_diff(cache, "qwen3-base", "bupo", ["H_layer"])


def test_correct_minus_wrong_and_auroc_match_pandas(cache):
    e = raw(cache, "entropy.parquet")
    e = e[(e.lens == "logit") & (e.role == "response")]
    c, w = ids(cache, True), ids(cache, False)
    fig, data = build_outcome_diff(cache, RUN, "logit", ["dH_ffn"])
    layer = 5
    sel = e[e.layer == layer]
    want = sel[sel.prompt_idx.isin(c)].dH_ffn.mean() - sel[sel.prompt_idx.isin(w)].dH_ffn.mean()
    row = data[data.layer == layer].iloc[0]
    assert row["diff"] == pytest.approx(want, rel=1e-5) and row["lo"] < row["diff"] < row["hi"]
    assert (row["n_correct"], row["n_wrong"]) == (len(c), len(w))
    assert row["hi"] < 0  # synthetic wrong responses explore more in the upper FFNs
    assert fig.data[0].error_y.array is not None
    fig, auc = build_auroc(cache, RUN, "logit")
    means = sel.groupby("prompt_idx").H_ffn.mean()
    pairs = [(x > y) + 0.5 * (x == y) for x in means[w] for y in means[c]]
    cell = auc[(auc.site == "ffn") & (auc.layer == layer)].iloc[0]
    assert cell["auroc"] == pytest.approx(np.mean(pairs)) and cell["auroc"] > 0.9
    assert fig.data[0].z.shape == (5, RUNS[RUN].n_layers + 1)


def test_outcome_line_names_outcome_and_reference(cache):
    c, w = ids(cache, True), ids(cache, False)
    assert "outcome: correct (reward 1) · reference answer: 42" in outcome_line(cache, RUN, c[0])
    assert "outcome: wrong (reward 0)" in outcome_line(cache, RUN, w[0])
    assert "not scored" in outcome_line(cache, "qwen3-base", 0)
