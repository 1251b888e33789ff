"""Dashboard figure builders and data layer, checked against pandas computations on the raw Parquet."""

from __future__ import annotations

import json
import math
import os
import socket

import numpy as np
import pandas as pd
import pytest

from entropylens.app.data import list_runs
from entropylens.app.server import create_app, serve
from entropylens.app.views.flows import build_compare, build_dh, build_flow, build_stages, stages_panel
from entropylens.app.views.tokens import build_heatmap, cell_detail
from entropylens.app.views.training import build_diff, build_training
from app_fixtures import RUNS
from entropylens.errors import UserError
from entropylens.store import compute_summary


def raw(cache, run_id, name="entropy.parquet") -> pd.DataFrame:
    return pd.read_parquet(cache / "runs" / run_id / name)


def layer_means(cache, run_id, col, lens="bupo", role="response") -> pd.Series:
    e = raw(cache, run_id)
    e = e[(e["lens"] == lens) & (e["role"] == role)]
    return e.groupby("layer")[col].mean().dropna()


def line(fig, name):
    (trace,) = [t for t in fig.data if t.name == name]
    return trace


def test_synthetic_summary_matches_store_compute_summary(cache):
    spec = RUNS["llama-base"]
    mine = raw(cache, "llama-base", "summary.parquet")
    ref = compute_summary(raw(cache, "llama-base"), spec.vocab_size, spec.n_layers)
    ref = ref[ref["count"] > 0]
    keys = ["lens", "layer", "quantity", "role"]
    both = mine.merge(ref, on=keys, suffixes=("", "_ref"))
    assert len(both) == len(ref) == len(mine)
    for c in ("mean", "std", "q25", "median", "q75", "count", "mean_norm", "rel_depth"):
        np.testing.assert_allclose(both[c], both[f"{c}_ref"], rtol=1e-5, atol=1e-6, err_msg=c)


def test_flow_lines_are_layer_means_of_the_raw_rows(cache):
    fig, data = build_flow(cache, "qwen3-base", "bupo", "response", "iqr", ["layer", "attn", "ffn"])
    lines = [t for t in fig.data if t.showlegend is not False]
    assert len(lines) == 3 and len(fig.data) == 6  # a band per line
    layer = line(fig, "layer H^l")
    assert list(layer.x) == list(range(RUNS["qwen3-base"].n_layers + 1))
    np.testing.assert_allclose(layer.y, layer_means(cache, "qwen3-base", "H_layer"), rtol=1e-5)
    ffn = line(fig, "FFN F^l")
    np.testing.assert_allclose(ffn.y, layer_means(cache, "qwen3-base", "H_ffn"), rtol=1e-5)
    assert "nats" in fig.layout.yaxis.title.text
    assert set(data["quantity"]) == {"H_layer", "H_attn", "H_ffn"}


def test_dh_colours_by_sign_and_marks_the_boundary_layer(cache):
    band = 0.1
    fig, data = build_dh(cache, "llama-base", "logit", "all", band)
    e = raw(cache, "llama-base")
    e = e[e["lens"] == "logit"]
    dffn = e.groupby("layer")["dH_ffn"].mean().dropna()
    expected_k = int(dffn[dffn > 0].index.max())
    assert any(f"boundary layer l={expected_k}" in a.text for a in fig.layout.annotations)
    assert data["boundary_layer"].iloc[0] == expected_k
    for t in fig.data:  # each bar sits in the class its sign and the band give
        for y in t.y:
            cls = "exploration" if y > band else "convergence" if y < -band else "integration"
            assert cls == t.name
    n_bars = sum(len(t.x) for t in fig.data)
    assert n_bars == 2 * RUNS["llama-base"].n_layers


def expected_stages(summary: pd.DataFrame, quantity: str, band: float) -> list[tuple[str, int, int]]:
    """(reading, start, end) runs of the sign of mean ΔH vs the band over layers 1..L, by plain pandas."""
    m = summary[summary["quantity"] == quantity].set_index("layer")["mean"].sort_index().loc[1:]
    reading = pd.Series(np.select([m > band, m < -band], ["exploration", "convergence"], "integration"), m.index)
    run = (reading != reading.shift()).cumsum()
    g = pd.DataFrame({"reading": reading, "layer": m.index}).groupby(run)
    return list(zip(g["reading"].first(), g["layer"].min(), g["layer"].max()))


def test_stages_table_reads_the_dh_view_band(cache):
    s = raw(cache, "llama-base", "summary.parquet").query("lens == 'bupo' and role == 'response'")
    ffn = s[s["quantity"] == "dH_ffn"].set_index("layer")["mean"]
    k = int(ffn[ffn > 0].index.max())
    h = s[s["quantity"] == "H_layer"].set_index("layer")["mean"].sort_index()
    tables = {}
    for band, frac in ((0.05, 0.10), (0.3, 0.45)):
        d, table = build_stages(cache, "llama-base", "bupo", "response", band, frac)
        for module, q in (("attn", "dH_attn"), ("ffn", "dH_ffn")):
            got = table[table["module"] == module]
            assert list(zip(got["reading"], got["start"], got["end"])) == expected_stages(s, q, band), (module, band)
        assert (table["boundary_layer"] == k).all() and table["boundary_dH_ffn"].iloc[0] == pytest.approx(ffn[k])
        below = h < frac * math.log(RUNS["llama-base"].vocab_size)
        stays = [x for x in below.index if below.loc[x:].all()]
        assert d["collapse_layer"] == (stays[0] if stays else None)
        tables[band] = table[["module", "reading", "start", "end"]]
        text = [getattr(c, "children", "") for c in stages_panel(d)]
        assert any(t.startswith(f"Boundary layer l={k} of 6") and f"{ffn[k]:+.3f} nats" in t for t in text)
    assert d["collapse_layer"] is not None  # the wider collapse fraction finds one on this profile
    assert not tables[0.05].equals(tables[0.3])
    # Band 0 (an emptied input) is a valid reading for both the bars and the table.
    assert set(build_stages(cache, "llama-base", "bupo", "response", None, 0.1)[1]["reading"]) <= \
        {"exploration", "convergence"}
    build_dh(cache, "llama-base", "bupo", "response", 0)
    with pytest.raises(UserError, match="band"):
        build_stages(cache, "llama-base", "bupo", "response", -0.1, 0.1)


def test_compare_overlays_runs_on_relative_depth(cache):
    fig, _ = build_compare(cache, ["llama-base", "qwen3-base"], "H_layer", "response", ["bupo", "logit"], True)
    names = [t.name for t in fig.data]
    assert names == ["synthetic/llama-6L · bupo", "synthetic/llama-6L · logit", "synthetic/qwen3-8L · bupo"]
    q = line(fig, "synthetic/qwen3-8L · bupo")
    spec = RUNS["qwen3-base"]
    np.testing.assert_allclose(q.x, np.arange(spec.n_layers + 1) / spec.n_layers)
    np.testing.assert_allclose(q.y, layer_means(cache, "qwen3-base", "H_layer") / math.log(spec.vocab_size), rtol=1e-5)
    assert fig.data[0].line.color == fig.data[1].line.color != q.line.color  # colour = family


def test_heatmap_is_the_prompts_rows_with_token_text(cache):
    fig, data = build_heatmap(cache, "llama-base", "bupo", 2, "ffn", "dH")
    e = raw(cache, "llama-base")
    e = e[(e["lens"] == "bupo") & (e["prompt_idx"] == 2)]
    expected = e.pivot(index="layer", columns="position", values="dH_ffn")
    np.testing.assert_allclose(np.array(fig.data[0].z, dtype=float), expected.to_numpy(), equal_nan=True)
    toks = raw(cache, "llama-base", "tokens.parquet").query("prompt_idx == 2").sort_values("position")
    assert list(fig.data[0].x) == [f"{p}: {t}" for p, t in zip(toks["position"], toks["token_text"])]
    first_generated = RUNS["llama-base"].prompt_len
    assert fig.layout.shapes[0].x0 == first_generated - 0.5
    assert len(data) == len(e)
    with pytest.raises(UserError, match="ΔH is defined"):
        build_heatmap(cache, "llama-base", "bupo", 2, "attn_in", "dH")


def test_cell_detail_gives_top1_ids_text_and_p1(cache):
    df = cell_detail(cache, "qwen3-base", "bupo", 1, 4, 3)
    e = raw(cache, "qwen3-base")
    row = e[(e["prompt_idx"] == 1) & (e["position"] == 4) & (e["layer"] == 3)].iloc[0]
    vocab = raw(cache, "qwen3-base", "tokens.parquet").drop_duplicates("token_id").set_index("token_id")["token_text"]
    assert list(df["top1_id"]) == [row[f"top1_{s}"] for s in ("layer", "attn_in", "attn", "ffn_in", "ffn")]
    assert df["token"].iloc[0] == vocab[row["top1_layer"]]
    assert df["p1"].iloc[0] == pytest.approx(row["p1_layer"], abs=1e-4)
    assert len(cell_detail(cache, "qwen3-base", "bupo", 1, 4, 0)) == 1  # layer 0: only H^0 is traced


def test_before_after_is_child_minus_parent(cache):
    fig, data = build_diff(cache, "llama-after", "bupo", "response")
    expected = layer_means(cache, "llama-after", "dH_ffn") - layer_means(cache, "llama-base", "dH_ffn")
    got = data.set_index("layer")["dH_ffn"].dropna()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert len(fig.data) == 5  # no trainer run behind llama-after: no accuracy panel
    with pytest.raises(UserError, match="no parent_run"):
        build_diff(cache, "qwen3-base", "bupo", "response")


def test_training_curves_and_phase_switch(cache):
    fig, data = build_training(cache, "bupo-train")
    rows = [json.loads(x) for x in (cache / "runs" / "bupo-train" / "metrics.jsonl").read_text().splitlines()]
    first_output = min(r["step"] for r in rows if r["phase"] == "output")
    assert any(f"at step {first_output}" in a.text for a in fig.layout.annotations)
    assert fig.layout.shapes[0].x0 == first_output - 0.5
    assert [t.name for t in fig.data if t.showlegend is not False] == [
        "reward", "π^2 (layer 2)", "output policy", "log-prob before update", "log-prob after update (internal phase)",
        "clip fraction", "grad norm", "groups with signal"]
    assert len(data) == len(rows)
    after = next(t for t in fig.data if t.name.startswith("log-prob after"))
    logged = [np.nan if r["update/logp_after"] is None else r["update/logp_after"] for r in rows]
    np.testing.assert_allclose(np.array(after.y, dtype=float), logged, rtol=1e-12)  # NaN (gap) after the switch
    signal = next(t for t in fig.data if t.name == "groups with signal")
    assert list(signal.y) == [r["signal/groups_frac"] for r in rows]
    with pytest.raises(UserError, match="BuPO trainer run"):
        build_training(cache, "llama-base")


def test_runs_table_shows_broken_runs_without_failing(cache):
    df = list_runs(cache).set_index("run_id")
    assert df.loc["broken-json", "status"].startswith("corrupt")
    assert df.loc["half-written", "status"] == "corrupt: summary.parquet missing or unreadable"
    assert df.loc["still-running", "status"] == "running"
    assert df.loc["qwen3-base", "layers"] == 8 and df.loc["qwen3-base", "architecture"] == "Qwen3ForCausalLM"
    with pytest.raises(UserError):
        build_flow(cache, "still-running", "bupo", "response", "std", ["layer"])


@pytest.mark.parametrize("bad", ["..", "../runs/llama-base", "/etc", "%2e%2e", "llama-base/../qwen3-base",
                                 ".hidden", "escape", "llama-base\n"])
def test_run_ids_from_the_browser_cannot_leave_the_cache(cache, tmp_path, bad):
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    link = cache / "runs" / "escape"
    if not link.exists():
        os.symlink(outside, link)
    with pytest.raises(UserError):
        build_flow(cache, bad, "bupo", "response", "std", ["layer"])


def test_callbacks_through_the_app_reject_bad_ids_and_serve_csv(cache):
    client = create_app(cache).server.test_client()
    client.get("/")

    def call(output, inputs, state=()):
        body = {"output": output, "outputs": {"id": output.split(".")[0], "property": output.split(".")[1]},
                "inputs": [{"id": i, "property": p, "value": v} for i, p, v in inputs],
                "state": [{"id": i, "property": p, "value": v} for i, p, v in state], "changedPropIds": []}
        r = client.post("/_dash-update-component", json=body)
        assert r.status_code == 200, r.data[:300]
        return r.get_json()["response"]

    flow_in = [("flow-lens", "value", "bupo"), ("flow-role", "value", "response"),
               ("flow-spread", "value", "std"), ("flow-sites", "value", ["layer"]), ("outcome", "value", "all")]
    bad = call("flow-graph.figure", [("focus-run", "value", "../../etc")] + flow_in)
    assert "invalid run id" in bad["flow-graph"]["figure"]["layout"]["annotations"][0]["text"]
    good = call("flow-graph.figure", [("focus-run", "value", "qwen3-base")] + flow_in)
    assert len(good["flow-graph"]["figure"]["data"]) == 2
    csv = call("flow-download.data", [("flow-csv", "n_clicks", 1)],
               [("focus-run", "value", "qwen3-base")] + flow_in)["flow-download"]["data"]
    table = pd.read_csv(__import__("io").StringIO(csv["content"]))
    assert set(table["quantity"]) == {"H_layer"} and len(table) == RUNS["qwen3-base"].n_layers + 1
    stages_in = [("dh-lens", "value", "bupo"), ("dh-role", "value", "response"), ("dh-band", "value", 0.05),
                 ("stages-collapse", "value", 0.1)]
    said = call("stages-panel.children", [("focus-run", "value", "still-running")] + stages_in)
    assert "not a complete trace run" in said["stages-panel"]["children"]["props"]["children"]
    csv = call("stages-download.data", [("stages-csv", "n_clicks", 1)],
               [("focus-run", "value", "qwen3-base")] + stages_in)["stages-download"]["data"]
    table = pd.read_csv(__import__("io").StringIO(csv["content"]))
    assert set(table["module"]) == {"attn", "ffn"} and set(table["boundary_layer"]) == {RUNS["qwen3-base"].boundary}


def test_serve_refuses_a_busy_port_with_one_line(cache):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is in use; pass --port") as e:
            serve(cache, port=port)
    assert "\n" not in str(e.value)


def test_the_app_reads_runs_kept_apart_from_the_cache(cache, tmp_path):
    """`app --runs R`: the dashboard lists and reads the runs in R, whatever --cache says; a missing R is one line."""
    from entropylens.app.config import AppConfig
    from entropylens.app.layout import table_records
    from entropylens.store.cache import Cache

    apart = Cache(tmp_path / "weights", runs=cache / "runs")
    assert [r["id"] for r in table_records(apart)] == [r["id"] for r in table_records(cache)]
    fig, data = build_flow(apart, "qwen3-base", "bupo", "response", "std", ["layer"])
    assert len(fig.data) == 2 and len(data) == RUNS["qwen3-base"].n_layers + 1
    assert create_app(apart).server.test_client().get("/").status_code == 200
    with pytest.raises(UserError, match="no runs folder .*nowhere"):
        serve(AppConfig(cache=str(cache), runs_dir=str(tmp_path / "nowhere")))


def test_before_after_shows_held_out_accuracy_with_intervals(cache, tmp_path):
    import shutil

    from entropylens.bupo.evaluate import gains, summarize

    c = tmp_path / "cache"
    shutil.copytree(cache / "runs" / "llama-after", c / "runs" / "t-trained")
    shutil.copytree(cache / "runs" / "llama-base", c / "runs" / "llama-base")
    (c / "runs" / "t").mkdir()
    base, trained = [[0, 0], [1, 0], [0, 0]], [[1, 0], [1, 1], [0, 1]]
    ev = {"base": summarize(base, (1, 2)) | {"correct": base, "n_prompts": 3, "n_samples": 2},
          "trained": summarize(trained, (1, 2)) | {"correct": trained, "n_prompts": 3, "n_samples": 2}}
    ev["gain"] = gains(ev["base"], ev["trained"], (1, 2))
    (c / "runs" / "t" / "eval.json").write_text(json.dumps(ev))
    fig, _ = build_diff(c, "t-trained", "bupo", "response")
    bars = {t.name: t for t in fig.data if t.name in ("base model", "trained model")}
    assert list(bars["trained model"].x) == ["avg@1", "pass@1", "avg@2", "pass@2"]
    assert bars["trained model"].y[0] == pytest.approx(2 / 3) and bars["base model"].y[0] == pytest.approx(1 / 6)
    lo, hi = ev["trained"]["avg@1_ci"]
    assert bars["trained model"].error_y.array[0] == pytest.approx(hi - 2 / 3)
    assert bars["trained model"].error_y.arrayminus[0] == pytest.approx(2 / 3 - lo)
    assert any("3 prompts × 2 samples" in a.text and "95 %" in a.text for a in fig.layout.annotations)
