"""The logit-lens grid: its figure and data from a traced tiny model's topk.parquet, the tracked-token ranks
against the Parquet, the build time at 512 positions x 36 layers, and the view in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tiny import build_tiny, wrap
import entropylens as el
from entropylens.app.views import grid
from entropylens.errors import UserError
from entropylens.analysis.figures import grid_figure
from entropylens.store import load_topk
from entropylens.tracing.job import TraceConfig, run_trace

K = 5


@pytest.fixture(scope="module")
def demo(tmp_path_factory, smol_tokenizer) -> Path:
    """A cache with one demo-like run: a tiny Llama traced on the built-in arith prompts, both lenses, top-5.
    ENTROPYLENS_GRID_CACHE names a cache holding a real run "demo" instead (e.g. `entropylens trace --limit 2
    --lens both --name demo --cache /tmp/demo`), so the same checks run on the embedded model's grid."""
    if os.environ.get("ENTROPYLENS_GRID_CACHE"):
        return Path(os.environ["ENTROPYLENS_GRID_CACHE"])
    cache = tmp_path_factory.mktemp("grid-cache")
    cfg = TraceConfig(prompts="arith", limit=2, max_new_tokens=8, batch_size=2, lens="both", cache=str(cache),
                      name="demo", topk=K)
    run_trace(cfg, progress=False, loaded=wrap(build_tiny("llama"), smol_tokenizer))
    return cache


def common_token(cache: Path, lens: str, site: str, prompt: int) -> int:
    """A token that is in many of the prompt's stored lists (so tracking it has something to show)."""
    tk = load_topk(cache / "runs" / "demo")
    sel = tk[(tk.lens == lens) & (tk.site == site) & (tk.prompt_idx == prompt)]
    return int(sel["token_id"].value_counts().idxmax())


def expected_ranks(cache: Path, token: int, lens: str, site: str, prompt: int) -> dict[tuple[int, int], int]:
    tk = load_topk(cache / "runs" / "demo")
    hit = tk[(tk.lens == lens) & (tk.site == site) & (tk.prompt_idx == prompt) & (tk.token_id == token)]
    return {(int(r.layer), int(r.position)): int(r.rank) for r in hit.itertuples()}


def test_grid_data_and_tracked_ranks_match_the_parquet(demo):
    tok = common_token(demo, "logit", "ffn", 0)
    fig, data = grid.build(demo, "demo", "logit", 0, "ffn", "H", str(tok))
    want = expected_ranks(demo, tok, "logit", "ffn", 0)
    got = {(int(r.layer), int(r.position)): int(r.tracked_rank) for r in data.dropna(subset=["tracked_rank"])
           .itertuples()}
    assert got == want and len(want) > 3
    assert data["tracked_rank"].isna().sum() == len(data) - len(want)  # every other cell reads "> K"
    heat, marks = fig.data
    assert heat.type == "heatmap" and marks.type == "scatter"
    assert sorted(int(t) for t in marks.text) == sorted(want.values())
    # every hover lists K entries, and cell text is the top-1 token
    hover = [h for row in heat.customdata for h in row if h]
    assert hover and all(h.count("<br>") == K - 1 for h in hover)
    tk = load_topk(demo / "runs" / "demo")
    top = tk[(tk.lens == "logit") & (tk.site == "ffn") & (tk.prompt_idx == 0) & (tk["rank"] == 1)]
    row = top[(top.layer == 2)].sort_values("position")
    assert [t for t in heat.text[1]] == [el.figures.show_token(t) for t in row.token_text]
    # the same figure from Run
    again = el.load(demo / "runs" / "demo").grid(0, "logit", "ffn", track=tok)
    assert list(again.data[1].text) == list(marks.text)


def test_entropy_colour_is_the_stored_entropy(demo):
    fig, data = grid.build(demo, "demo", "bupo", 1, "layer", "H", "")
    ent = el.load(demo / "runs" / "demo").entropy
    e = ent[(ent.lens == "bupo") & (ent.prompt_idx == 1)].pivot(index="layer", columns="position", values="H_layer")
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float), e.to_numpy(), rtol=1e-6)
    fig, _ = grid.build(demo, "demo", "bupo", 1, "layer", "p1", "")
    tk = load_topk(demo / "runs" / "demo")
    p1 = tk[(tk.lens == "bupo") & (tk.site == "layer") & (tk.prompt_idx == 1) & (tk["rank"] == 1)]
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float),
                               p1.pivot(index="layer", columns="position", values="prob").to_numpy(), rtol=1e-6)


def test_a_token_in_no_list_and_a_run_without_topk_say_why(demo, tmp_path, smol_tokenizer):
    with pytest.raises(UserError, match="no stored top-K"):
        grid.build(demo, "demo", "bupo", 0, "layer", "H", "no-such-token-text")
    cfg = TraceConfig(prompts="arith", limit=1, max_new_tokens=2, batch_size=1, cache=str(tmp_path), name="bare",
                      topk=0)
    run_trace(cfg, progress=False, loaded=wrap(build_tiny("llama"), smol_tokenizer))
    with pytest.raises(UserError, match="no top-K lists"):
        grid.build(tmp_path, "bare", "bupo", 0, "layer", "H", "")


def test_builds_fast_at_512_positions_and_36_layers():
    """The figure for 512 positions x 37 layers (H^0..H^36) with K = 5 is built in well under a second's work
    per thousand cells (measured here: see docs/api.md), and ships no per-cell text beyond the hover."""
    P, L = 512, 37
    rng = np.random.default_rng(0)
    cells = pd.DataFrame({"layer": np.repeat(np.arange(L), P), "position": np.tile(np.arange(P), L)})
    cells["ids"] = [list(rng.integers(0, 262144, K)) for _ in range(len(cells))]
    cells["texts"] = [[f"tok{i}" for i in ids] for ids in cells["ids"]]
    cells["probs"] = [sorted(rng.random(K) / K, reverse=True) for _ in range(len(cells))]
    cells["H"] = rng.random(len(cells)) * 10
    toks = pd.DataFrame({"position": np.arange(P), "token_text": [f"t{i}" for i in range(P)], "role": "prompt"})
    tracked = cells[["layer", "position"]].assign(rank=np.where(rng.random(len(cells)) < 0.1, 3.0, np.nan),
                                                  prob=0.1)
    t0 = time.perf_counter()
    fig = grid_figure(cells, toks, "Gemma 3 270M", "logit", 0, "ffn", "H", tracked, "'x'")
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    size = len(fig.to_json())
    print(f"grid 512 x 37: build {built:.2f} s, JSON {time.perf_counter() - t0:.2f} s, {size / 1e6:.1f} MB")
    assert fig.data[0].texttemplate is None  # cell text would be 19k SVG nodes: hover only at this size
    assert built < 10 and size < 12e6


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium")
def test_grid_view_in_chromium(dash_duo, demo, screenshot):
    from entropylens.app.server import create_app
    from test_app_browser import figure, open_tab

    dash_duo.start_server(create_app(demo))
    dash_duo.wait_for_text_to_equal("h1", "entropylens")
    open_tab(dash_duo, "Logit-lens grid")
    fig = figure(dash_duo, "grid-graph")
    heat = fig["data"][0]
    assert heat["type"] == "heatmap"
    hover = [h for row in heat["customdata"] for h in row if h]
    assert hover and all(h.count("<br>") == K - 1 for h in hover)
    tok = common_token(demo, "bupo", "layer", 0)
    box = dash_duo.find_element("#grid-token")
    box.clear()
    box.send_keys(str(tok) + "\n")
    end = time.time() + 30  # the box may already track the answer's first token: wait for this one's marks
    tracking = lambda f: len(f["data"]) > 1 and f"id {tok}" in f["data"][1].get("name", "")  # noqa: E731
    while time.time() < end and not tracking(figure(dash_duo, "grid-graph")):
        time.sleep(0.2)
    marks = figure(dash_duo, "grid-graph")["data"][1]
    want = expected_ranks(demo, tok, "bupo", "layer", 0)
    labels = {int(str(x).split(":", 1)[0]) for x in marks["x"]}
    assert labels == {p for _, p in want}
    assert sorted(int(t) for t in marks["text"]) == sorted(want.values())
    screenshot(dash_duo.driver, "logit_lens_grid")
    assert dash_duo.get_logs() in ([], None)


def test_report_draws_the_grid(demo, tmp_path):
    from entropylens.analysis.report import ReportConfig, build_report

    index = build_report(ReportConfig(runs=["demo"], cache=str(demo), out=str(tmp_path / "r"), images=(),
                                      write_stages=False))
    page = index.read_text(encoding="utf-8")
    assert "id='grid-demo-bupo'" in page and "id='grid-demo-logit'" in page and "Logit-lens grid" in page


def test_show_topk_position_prints_each_site(demo):
    env = {**os.environ, "COLUMNS": "250"}
    cmd = [sys.executable, "-m", "entropylens", "show", "demo", "--topk", "--position", "3", "--lens", "logit",
           "--cache", str(demo)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    for site in ("attn_in", "attn", "ffn_in", "ffn", "layer"):
        assert f"site {site} · prompt 0 · position 3" in r.stdout
    tk = load_topk(demo / "runs" / "demo")
    first = tk[(tk.lens == "logit") & (tk.site == "ffn") & (tk.position == 3) & (tk.prompt_idx == 0) & (tk.layer == 1)]
    assert f"{first.token_text.iloc[0]!r} {first.prob.iloc[0]:.3f}" in r.stdout
    bad = subprocess.run(cmd[:-5] + ["--position", "9999", "--cache", str(demo)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    lone = subprocess.run(cmd[:6] + ["--cache", str(demo)], capture_output=True, text=True, env=env, timeout=300)
    assert lone.returncode == 2 and "--topk and --position go together" in lone.stderr


def test_control_characters_in_tokens_are_shown_and_drawn(tmp_path):
    """A real SmolLM2 grid held a vertical-tab token, and plotly.js refused to draw the figure: every control
    character is shown as its Unicode picture, and the figure renders."""
    from entropylens.analysis.figures import show_token

    controls = [chr(c) for c in [*range(0x20), 0x7F]]
    shown = [show_token(c) for c in controls]
    assert all(s.isprintable() and s.strip() for s in shown) and show_token("\x0b") == "␋"
    assert show_token(" a") == "·a" and show_token("a\nb") == "a↵b" and show_token("ok") == "ok"
    P, L = len(controls), 3
    cells = pd.DataFrame({"layer": np.repeat(np.arange(L), P), "position": np.tile(np.arange(P), L)})
    cells["ids"] = [[i % P] for i in range(len(cells))]
    cells["texts"] = [[controls[i % P]] for i in range(len(cells))]
    cells["probs"] = [[0.5]] * len(cells)
    cells["H"] = 1.0
    toks = pd.DataFrame({"position": np.arange(P), "token_text": controls, "role": "prompt"})
    tracked = cells[["layer", "position"]].assign(rank=np.nan, prob=np.nan)
    fig = grid_figure(cells, toks, "m", "bupo", 0, "layer", "H", tracked, "'x'")
    assert fig.data[0].texttemplate  # small enough for cell text: the case that failed
    if os.path.exists("/usr/bin/chromium"):
        fig.write_image(tmp_path / "grid.png", width=800, height=400)
        assert (tmp_path / "grid.png").stat().st_size > 1000


def test_figures_name_the_model_never_its_path(demo, tmp_path):
    """A run traced from a local file records the file's path as its id; every figure title shows the model's
    display name instead (reports are committed and shared, so a machine path must not leak into them)."""
    from entropylens.analysis.report import ReportConfig, build_report

    cache = tmp_path / "cache"
    shutil.copytree(demo / "runs" / "demo", cache / "runs" / "demo")
    man = cache / "runs" / "demo" / "manifest.json"
    m = json.loads(man.read_text(encoding="utf-8"))
    m["model"].update(id="/home/someone/models/tiny-llama.gguf", name="Tiny Llama")
    man.write_text(json.dumps(m), encoding="utf-8")

    titles = [grid.build(cache, "demo", "bupo", 0, "layer", "H", None)[0].layout.title.text,
              el.load("demo", cache=cache).grid(0, lens="logit").layout.title.text,
              el.load("demo", cache=cache).heatmap(0, lens="logit").layout.title.text]
    assert all("Tiny Llama" in t and "/home/someone" not in t for t in titles), titles
    page = build_report(ReportConfig(runs=["demo"], cache=str(cache), out=str(tmp_path / "r"), images=(),
                                     write_stages=False)).read_text(encoding="utf-8")
    assert "Tiny Llama" in page and "someone" not in page


def test_the_default_tracked_token_is_the_longest_prefix_and_the_same_in_every_process():
    from entropylens.analysis.grid import guess_answer_token

    vocab = pd.Series([" 4", "4", "4", "42x", " 42", "7", "\\", " \\"])
    assert guess_answer_token("42", vocab) == " 42"  # longest stripped prefix; '42x' is no prefix
    assert guess_answer_token("4.5", vocab) == "4"  # ' 4' and '4' tie on length: '4' is stored more often
    assert guess_answer_token("\\frac{1}{2}", vocab) == " \\"  # equal counts: first in sort order
    assert guess_answer_token("9", vocab) is None and guess_answer_token("  ", vocab) is None
    code = ("import pandas as pd; from entropylens.analysis.grid import guess_answer_token as g; "
            "print(repr(g('\\\\frac', pd.Series(['\\\\', ' \\\\', '\\\\f', ' \\\\f', 'x']))))")
    seen = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                           capture_output=True, text=True, check=True).stdout for seed in range(6)}
    assert seen == {"' \\\\f'\n"}
