"""The dashboard on real traces of tiny random Llama and Qwen3 models (not synthetic files)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from entropylens.app.server import create_app
from entropylens.app.views.flows import build_compare, build_dh, build_flow
from entropylens.app.views.tokens import build_heatmap
from tiny import build_tiny, wrap
from entropylens.store import load_entropy
from entropylens.tracing.job import TraceConfig, run_trace


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory, smol_tokenizer):
    cache = tmp_path_factory.mktemp("real-cache")
    for arch, layers in (("llama", 3), ("qwen3", 4)):
        cfg = TraceConfig(prompts="arith", limit=2, max_new_tokens=5, batch_size=2, lens="both",
                          cache=str(cache), name=f"tiny-{arch}")
        loaded = wrap(build_tiny(arch, layers=layers), smol_tokenizer, name=f"tiny-{arch}")
        run_trace(cfg, progress=False, loaded=loaded)
    return cache


def test_views_on_real_runs_match_the_parquet(real_cache):
    fig, data = build_flow(real_cache, "tiny-qwen3", "bupo", "response", "std", ["layer", "attn", "ffn"])
    ent = load_entropy(real_cache / "runs" / "tiny-qwen3", filters=[("lens", "==", "bupo"), ("role", "==", "response")])
    expect = ent.groupby("layer").H_layer.mean()
    line = next(t for t in fig.data if "layer" in (t.name or "").lower() and len(t.x) == len(expect))
    np.testing.assert_allclose(np.asarray(line.y, dtype=float), expect.to_numpy(), rtol=1e-5)
    assert len(line.x) == 5  # layers 0..4

    band = 0.05
    fig, _ = build_dh(real_cache, "tiny-llama", "logit", "response", band)
    ent = load_entropy(real_cache / "runs" / "tiny-llama",
                       filters=[("lens", "==", "logit"), ("role", "==", "response")])
    for axis, col in (("x", "dH_attn"), ("x2", "dH_ffn")):  # one bar per layer 1..3 in each panel
        g = ent[ent["layer"] >= 1].groupby("layer")[col]
        bars = {x: (y, e, t.name) for t in fig.data if t.xaxis == axis for x, y, e in zip(t.x, t.y, t.error_y.array)}
        assert sorted(bars) == [1, 2, 3], (col, bars)
        for layer, (y, e, reading) in bars.items():
            mean, std, n = g.mean()[layer], g.std()[layer], g.count()[layer]
            assert y == pytest.approx(mean, rel=1e-4, abs=1e-6)
            assert e == pytest.approx(1.96 * std / np.sqrt(n), rel=1e-3, abs=1e-6)  # the 95 % interval over tokens
            assert reading == ("exploration" if y > band else "convergence" if y < -band else "integration")
    positive = ent[ent["layer"] >= 1].groupby("layer")["dH_ffn"].mean().loc[lambda m: m > 0]
    note = "no layer with FFN ΔH > 0" if positive.empty else f"boundary layer l={positive.index.max()} "
    assert any(a.text.startswith(note) for a in fig.layout.annotations)

    fig, _ = build_compare(real_cache, ["tiny-llama", "tiny-qwen3"], "H_layer", "response", ["bupo", "logit"], True)
    assert len(fig.data) == 4
    assert all(max(t.x) == pytest.approx(1.0) for t in fig.data)
    assert all(max(t.y) <= 1.0 + 1e-9 for t in fig.data)  # normalised by log V

    fig, _ = build_heatmap(real_cache, "tiny-llama", "bupo", 0, "layer", "H")
    assert fig.data[0].z is not None and np.asarray(fig.data[0].z).shape[0] == 4  # layers 0..3


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium")
def test_browser_lists_and_plots_real_runs(dash_duo, real_cache, screenshot):
    dash_duo.start_server(create_app(real_cache))
    dash_duo.wait_for_contains_text("#runs-table", "tiny-qwen3")
    assert "tiny-llama" in dash_duo.find_element("#runs-table").text
    dash_duo.wait_for_element("#flow-graph .js-plotly-plot")
    screenshot(dash_duo.driver, "real_runs_flow")
