"""Stage detection on a hand-built run whose per-layer ΔH signs and entropies are known by construction."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from entropylens.errors import UserError
from entropylens.analysis.stages import (StageConfig, boundary_layer, classify, complete_trace_run, layer_difference,
                                pick_boundary_layer, read_stages, run_stages, segments, stages_table, write_stages)
from entropylens.store import QUANTITIES, compute_summary

V = 100  # log V = 4.605; 10 % of it = 0.4605 nats
LOG_V = math.log(V)
# Per layer 1..6: mean FFN ΔH and mean layer-policy entropy (layer 0 = embedding, index 0 below).
DH_FFN = [0.4, 0.3, 0.02, -0.03, 0.2, -0.8]
DH_ATTN = [0.1, -0.1, 0.0, 0.0, 0.0, 0.3]
H_LAYER = [0.2, 4.0, 3.5, 3.0, 2.0, 0.3, 0.1]  # dips below 0.46 at l=0, then stays below from l=5


def hand_built_run(cache, run_id="hand", n_tokens=4, noise=0.01, lenses=("bupo",)):
    """A complete run folder: per-token values = mean ± noise (alternating), so means are exact."""
    rows = []
    for lens in lenses:
        for pos in range(n_tokens):
            sign = 1 if pos % 2 == 0 else -1  # n_tokens even: the noise cancels in the mean
            for layer in range(len(H_LAYER)):
                r = {"lens": lens, "prompt_idx": 0, "position": pos, "layer": layer,
                     "role": "response"}
                r.update({q: float("nan") for q in QUANTITIES})
                r["H_layer"] = H_LAYER[layer] + sign * noise
                if layer:
                    r["H_ffn_in"], r["H_attn_in"] = 2.0, 2.0
                    r["dH_ffn"] = DH_FFN[layer - 1] + sign * noise
                    r["dH_attn"] = DH_ATTN[layer - 1] - sign * noise
                    r["H_ffn"] = r["H_ffn_in"] + r["dH_ffn"]
                    r["H_attn"] = r["H_attn_in"] + r["dH_attn"]
                rows.append(r)
    df = pd.DataFrame(rows)
    run = cache / "runs" / run_id
    run.mkdir(parents=True)
    compute_summary(df, V, len(H_LAYER) - 1).to_parquet(run / "summary.parquet")
    manifest = {"run_id": run_id, "status": "complete", "kind": "trace", "lens": list(lenses),
                "model": {"id": "hand/built", "family": "llama", "n_layers": len(H_LAYER) - 1, "vocab_size": V}}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def test_classify_and_segments():
    assert [classify(x, 0.05) for x in (0.06, 0.05, -0.05, -0.051, 0.0)] == \
        ["exploration", "integration", "integration", "convergence", "integration"]
    assert segments([1, 2, 3, 5], ["a", "a", "b", "b"]) == [
        {"reading": "a", "start": 1, "end": 2}, {"reading": "b", "start": 3, "end": 3},
        {"reading": "b", "start": 5, "end": 5}]  # a gap in layers starts a new range


def test_stages_of_hand_built_run(tmp_path):
    run = hand_built_run(tmp_path)
    st = run_stages(run, StageConfig(band=0.05, collapse_frac=0.10))["lenses"]["bupo"]
    assert st["stages"]["ffn"] == [
        {"reading": "exploration", "start": 1, "end": 2}, {"reading": "integration", "start": 3, "end": 4},
        {"reading": "exploration", "start": 5, "end": 5}, {"reading": "convergence", "start": 6, "end": 6}]
    assert st["stages"]["attn"] == [
        {"reading": "exploration", "start": 1, "end": 1}, {"reading": "convergence", "start": 2, "end": 2},
        {"reading": "integration", "start": 3, "end": 5}, {"reading": "exploration", "start": 6, "end": 6}]
    assert st["boundary_layer"] == 5  # last positive FFN ΔH (layers 3 at +0.02 is positive but earlier)
    assert st["first_below"] == 0 and st["collapse_layer"] == 5
    assert st["collapse_threshold"] == pytest.approx(0.1 * LOG_V)
    pl = pd.DataFrame(st["per_layer"])
    np.testing.assert_allclose(pl["dH_ffn"], DH_FFN, atol=1e-6)
    np.testing.assert_allclose(pl["H_layer_norm"], np.array(H_LAYER[1:]) / LOG_V, atol=1e-6)
    # 4 tokens with values mean ± 0.01: std (ddof 1) = 0.01 * sqrt(4/3); CI = 1.96 std / 2
    np.testing.assert_allclose(pl["dH_ffn_ci95"], 1.96 * 0.01 * math.sqrt(4 / 3) / 2, rtol=1e-3)


def test_band_moves_integration(tmp_path):
    run = hand_built_run(tmp_path)
    wide = run_stages(run, StageConfig(band=0.25))["lenses"]["bupo"]["stages"]["ffn"]
    assert [(s["reading"], s["start"], s["end"]) for s in wide] == [
        ("exploration", 1, 2), ("integration", 3, 5), ("convergence", 6, 6)]
    narrow = run_stages(run, StageConfig(band=0.0))["lenses"]["bupo"]["stages"]["ffn"]
    assert [s["reading"] for s in narrow] == ["exploration", "convergence", "exploration", "convergence"]


def test_no_collapse_and_no_boundary(tmp_path):
    run = hand_built_run(tmp_path)
    st = run_stages(run, StageConfig(collapse_frac=0.01))["lenses"]["bupo"]  # threshold 0.046 < every H
    assert st["collapse_layer"] is None and st["first_below"] is None


def test_written_json_and_table(tmp_path):
    run = hand_built_run(tmp_path, lenses=("bupo", "logit"))
    stages = run_stages(run)
    path = write_stages(run, stages)
    assert path == run / "stages.json" and not list(run.glob("*.tmp"))
    back = read_stages(run)
    assert back["lenses"]["logit"]["boundary_layer"] == 5 and back["params"]["band"] == 0.05
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    table = stages_table(back)
    assert len(table) == 2 * (4 + 4) and set(table["module"]) == {"ffn", "attn"}


def test_user_errors(tmp_path):
    run = hand_built_run(tmp_path)
    with pytest.raises(UserError, match="band"):
        run_stages(run, StageConfig(band=-1))
    with pytest.raises(UserError, match="collapse"):
        run_stages(run, StageConfig(collapse_frac=1.5))
    with pytest.raises(UserError, match="role"):
        run_stages(run, StageConfig(role="everything"))
    with pytest.raises(UserError, match="prompt"):
        run_stages(run, StageConfig(role="prompt"))  # the hand-built run has response tokens only
    with pytest.raises(UserError, match="stages.json"):
        read_stages(tmp_path)


def test_ci95_is_the_normal_interval_of_the_tokens(tmp_path):
    """stages.json's *_ci95: 1.96·std/√n of the n = 4 token values (mean ± 0.01 alternating), by plain numpy."""
    st = run_stages(hand_built_run(tmp_path))["lenses"]["bupo"]
    for row, dh in zip(st["per_layer"], DH_FFN):
        values = np.array([dh + 0.01, dh - 0.01, dh + 0.01, dh - 0.01])
        assert row["dH_ffn_ci95"] == pytest.approx(1.96 * values.std(ddof=1) / 2, rel=1e-4)


def test_one_boundary_layer_for_stages_trainer_and_dashboard(tmp_path):
    table = pd.DataFrame({"layer": [0, 1, 2, 3, 4], "dH_ffn": [float("nan"), 0.1, float("nan"), 0.2, -0.1]})
    assert boundary_layer(table) == 3 and boundary_layer(table.assign(dH_ffn=-1.0)) is None
    st = run_stages(hand_built_run(tmp_path))["lenses"]["bupo"]
    # the trainer's `--layer auto` reads the same layer as the stages (and so the report and the dashboard)
    k, evidence = pick_boundary_layer(pd.DataFrame(st["per_layer"]))
    assert k == st["boundary_layer"] == boundary_layer(pd.DataFrame(st["per_layer"])) == 5
    assert "layer 5 of 6" in evidence and "+0.200" in evidence


def test_layer_difference_is_b_minus_a_of_one_depth():
    a = pd.DataFrame({"layer": [0, 1, 2], "H_layer": [3.0, 2.0, 1.0], "dH_ffn": [float("nan"), 0.5, -0.2]})
    b = a.assign(H_layer=[3.5, 2.0, 0.25], dH_ffn=[float("nan"), 0.1, 0.1])
    d = layer_difference(a, b)
    assert list(d.columns) == ["layer", "H_layer", "dH_ffn"] and list(d["layer"]) == [0, 1, 2]
    np.testing.assert_allclose(d["H_layer"], [0.5, 0.0, -0.75])
    np.testing.assert_allclose(d["dH_ffn"], [np.nan, -0.4, 0.3])
    with pytest.raises(UserError, match="different depths"):
        layer_difference(a, b.iloc[:2])


def test_complete_trace_run_guard(tmp_path):
    run = hand_built_run(tmp_path)
    path, m = complete_trace_run(tmp_path, "hand")
    assert path == run and m["model"]["id"] == "hand/built"
    for change in ({"status": "running"}, {"status": "failed"}, {"kind": "bupo"}):
        (run / "manifest.json").write_text(json.dumps({**m, **change}))
        with pytest.raises(UserError, match="not a complete trace run"):
            complete_trace_run(tmp_path, "hand")
    for bad in ("", None, "missing", "../hand"):
        with pytest.raises(UserError):
            complete_trace_run(tmp_path, bad)
