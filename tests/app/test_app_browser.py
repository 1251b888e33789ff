"""The dashboard in headless Chromium: every view loads, selections drive the figures, screenshots saved."""

from __future__ import annotations

import os
import time

import pytest
from selenium.webdriver.common.action_chains import ActionChains

from entropylens.app.server import create_app
from app_fixtures import RUNS

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not os.path.exists("/usr/bin/chromium"), reason="needs /usr/bin/chromium")]


def figure(duo, graph: str, timeout: float = 30.0) -> dict:
    """The plotted figure of a dcc.Graph (data + layout), once it has at least one trace."""
    js = (f"const g = document.querySelector('#{graph} .js-plotly-plot'); "
          "return g && g.data && g.data.length ? {data: g.data, layout: g.layout} : null;")
    end = time.time() + timeout
    while time.time() < end:
        fig = duo.driver.execute_script(js)
        if fig:
            return fig
        time.sleep(0.1)
    said = duo.driver.execute_script(f"const g = document.querySelector('#{graph} .js-plotly-plot'); "
                                     "return g && g.layout && JSON.stringify(g.layout.annotations);")
    raise AssertionError(f"{graph} drew no trace in {timeout} s; it says {said}")


def arr(v) -> list:
    """A trace array as a list (Plotly 7 ships numeric arrays as typed arrays: {_inputArray, bdata})."""
    return list(v["_inputArray"].values() if isinstance(v["_inputArray"], dict) else v["_inputArray"]) \
        if isinstance(v, dict) else list(v)


def boxes(duo, graph: str) -> dict:
    """Screen boxes of a drawn graph: its svg, its title, and every annotation (subplot titles are annotations)."""
    js = (f"const g = document.querySelector('#{graph} .js-plotly-plot'); const r = e => e.getBoundingClientRect();"
          "const box = e => ({left: r(e).left, right: r(e).right, top: r(e).top, bottom: r(e).bottom});"
          "return {svg: box(g.querySelector('.main-svg')), title: box(g.querySelector('.gtitle')),"
          " notes: [...g.querySelectorAll('.annotation')].map(a => ({text: a.textContent, ...box(a)}))};")
    return duo.driver.execute_script(js)


def assert_title_fits(duo, graph: str) -> None:
    """The figure title ends inside the figure (long model + lens + role + band titles once ran off the edge)."""
    b = boxes(duo, graph)
    assert b["svg"]["left"] <= b["title"]["left"] and b["title"]["right"] <= b["svg"]["right"], (graph, b)


def open_tab(duo, label: str) -> None:
    for tab in duo.driver.find_elements("css selector", "#tabs .tab"):
        if tab.text.strip() == label:
            tab.click()
            return
    raise AssertionError(f"no tab {label!r}")


def test_runs_flow_dh_and_compare(dash_duo, cache, screenshot):
    dash_duo.start_server(create_app(cache))
    dash_duo.wait_for_text_to_equal("h1", "entropylens")
    dash_duo.wait_for_contains_text("#runs-table", "corrupt: summary.parquet missing or unreadable")
    assert "corrupt: manifest.json" in dash_duo.find_element("#runs-table").text
    # Defaults: the two newest complete trace runs are selected, the newest (llama-after) is in focus.
    flow = figure(dash_duo, "flow-graph")
    assert "llama-6L" in flow["layout"]["title"]["text"]
    lines = [t for t in flow["data"] if t.get("showlegend") is not False]
    assert len(lines) == 3
    assert len(arr(lines[0]["x"])) == RUNS["llama-after"].n_layers + 1
    assert_title_fits(dash_duo, "flow-graph")
    screenshot(dash_duo.driver, "flow")

    open_tab(dash_duo, "Entropy change ΔH")
    dh = figure(dash_duo, "dh-graph")
    texts = [a["text"] for a in dh["layout"].get("annotations", [])]
    assert any("boundary layer l=" in t for t in texts), texts
    assert_title_fits(dash_duo, "dh-graph")
    # The stages table beside it: boundary of the focus run, FFN ranges that follow the band input.
    k, n = RUNS["llama-after"].boundary, RUNS["llama-after"].n_layers
    dash_duo.wait_for_contains_text("#stages-boundary", f"Boundary layer l={k} of {n}", timeout=30)
    ffn_explores = "#stages-table tbody tr:last-child td[data-dash-column=exploration]"
    dash_duo.wait_for_text_to_equal(ffn_explores, f"1–{k}", timeout=30)
    band = dash_duo.find_element("#dh-band")
    band.clear()
    band.send_keys("0.3\n")  # synthetic FFN ΔH before the boundary is 0.06 log V = 0.26 nats: now integration
    dash_duo.wait_for_text_to_equal(ffn_explores, "—", timeout=30)
    screenshot(dash_duo.driver, "entropy_change")

    open_tab(dash_duo, "Compare families")
    cmp_ = figure(dash_duo, "compare-graph")
    assert sorted(t["name"] for t in cmp_["data"]) == ["synthetic/llama-6L · bupo", "synthetic/qwen3-8L · bupo"]
    assert max(max(arr(t["x"])) for t in cmp_["data"]) == pytest.approx(1.0)
    # Selecting one more run (llama-base, first row without a tick) adds its traces.
    rows = dash_duo.driver.find_elements("css selector", "#runs-table tbody tr")
    base = next(r for r in rows if r.find_elements("css selector", "td[data-dash-column=run_id]")
                and r.find_element("css selector", "td[data-dash-column=run_id]").text == "llama-base")
    base.find_element("css selector", "input[type=checkbox]").click()
    end = time.time() + 10
    while len(figure(dash_duo, "compare-graph")["data"]) != 3 and time.time() < end:
        time.sleep(0.1)
    names = [t["name"] for t in figure(dash_duo, "compare-graph")["data"]]
    assert len(names) == 3 and sum("llama-6L" in n for n in names) == 2
    screenshot(dash_duo.driver, "compare")
    assert dash_duo.get_logs() in ([], None)


def test_token_heatmap_and_click_detail(dash_duo, cache, screenshot):
    dash_duo.start_server(create_app(cache))
    open_tab(dash_duo, "Token × layer")
    heat = figure(dash_duo, "heatmap-graph")
    spec = RUNS["llama-after"]
    assert len(arr(heat["data"][0]["z"])) == spec.n_layers + 1
    assert len(heat["data"][0]["x"]) == spec.prompt_len + spec.response_len
    assert any("generated response" in a["text"] for a in heat["layout"]["annotations"])
    # Click the middle of the heatmap: the top-1 table for that cell appears.
    drag = dash_duo.find_element("#heatmap-graph .nsewdrag")
    ActionChains(dash_duo.driver).move_to_element(drag).pause(0.3).click().perform()
    dash_duo.wait_for_contains_text("#cell-detail", "Top-1 tokens at position", timeout=30)
    assert "FFN F^l" in dash_duo.find_element("#cell-table").text
    screenshot(dash_duo.driver, "token_heatmap")


def test_before_after_training_and_url_safety(dash_duo, cache, screenshot):
    dash_duo.start_server(create_app(cache))
    open_tab(dash_duo, "Before / after")
    diff = figure(dash_duo, "diff-graph")
    assert "llama-after minus parent llama-base" in diff["layout"]["title"]["text"]
    assert len(diff["data"]) == 5
    screenshot(dash_duo.driver, "before_after")
    open_tab(dash_duo, "Training")
    train = figure(dash_duo, "train-graph")
    assert any("phase switch" in a["text"] for a in train["layout"]["annotations"])
    screenshot(dash_duo.driver, "training")
    # A run id in the URL may only name a run folder.
    dash_duo.driver.get(dash_duo.server_url + "/?run=..%2F..%2Fetc")
    dash_duo.wait_for_contains_text("#banner", "Ignored the URL: invalid run id", timeout=30)
    dash_duo.driver.get(dash_duo.server_url + "/?run=qwen3-base")
    flow = figure(dash_duo, "flow-graph")
    assert "qwen3-8L" in flow["layout"]["title"]["text"]


def test_outcome_selector_right_vs_wrong_and_token_outcome(dash_duo, cache, screenshot):
    dash_duo.start_server(create_app(cache))
    dash_duo.driver.get(dash_duo.server_url + "/?run=llama-scored")
    dash_duo.wait_for_contains_text("#tabs", "Right vs wrong")
    flow = figure(dash_duo, "flow-graph")
    assert "llama-6L" in flow["layout"]["title"]["text"] and "correct" not in flow["layout"]["title"]["text"]
    # both overlaid: every site drawn for correct (solid) and wrong (dashed) responses
    dash_duo.find_element("#outcome input[value=both]").click()
    end = time.time() + 20
    while not any("· wrong" in t.get("name", "") for t in figure(dash_duo, "flow-graph")["data"]):
        assert time.time() < end, "the flow view did not follow the outcome selector"
        time.sleep(0.1)
    names = [t["name"] for t in figure(dash_duo, "flow-graph")["data"]]
    assert sorted(names) == sorted(f"{s} · {o}" for s in ("layer H^l", "attention A^l", "FFN F^l")
                                   for o in ("correct", "wrong"))
    screenshot(dash_duo.driver, "flow_by_outcome")
    open_tab(dash_duo, "Entropy change ΔH")
    end = time.time() + 20
    while sorted({t["name"] for t in figure(dash_duo, "dh-graph")["data"]}) != ["correct responses",
                                                                              "wrong responses"]:
        assert time.time() < end, "the ΔH view did not follow the outcome selector"
        time.sleep(0.1)
    open_tab(dash_duo, "Right vs wrong")
    diff = figure(dash_duo, "outdiff-graph", timeout=30)
    assert "correct vs" in diff["layout"]["title"]["text"] and "bootstrap over responses" in \
        diff["layout"]["title"]["text"]
    assert len(diff["data"]) == 3 and all(len(arr(t["error_y"]["array"])) == len(arr(t["x"])) for t in diff["data"])
    auroc = figure(dash_duo, "auroc-graph", timeout=30)
    assert auroc["data"][0]["type"] == "heatmap" and len(arr(auroc["data"][0]["y"])) == 5
    screenshot(dash_duo.driver, "right_vs_wrong")
    open_tab(dash_duo, "Token × layer")
    dash_duo.wait_for_contains_text("#tokens-outcome", "reference answer: 42", timeout=30)
    assert "outcome: " in dash_duo.find_element("#tokens-outcome").text
    screenshot(dash_duo.driver, "token_outcome")
    assert dash_duo.get_logs() in ([], None)


def test_long_titles_and_the_no_boundary_note_stay_clear_at_1500_px(dash_duo, tmp_path, screenshot):
    """A run with no positive FFN ΔH and a long model name: the note sits in the FFN panel, not over the attention
    panel's title, and the titles end inside the figure."""
    import json

    from synthetic import SyntheticRun, write_run

    run = write_run(tmp_path, SyntheticRun("no-boundary", n_layers=6, vocab_size=80, boundary=0, seed=5))
    m = json.loads((run / "manifest.json").read_text())
    m["model"]["id"] = "some-organisation/A-Rather-Long-Model-Name-70B-Instruct-v0.3-preview-2026-with-a-long-suffix"
    (run / "manifest.json").write_text(json.dumps(m))
    dash_duo.driver.set_window_size(1500, 1500)
    dash_duo.start_server(create_app(tmp_path))
    assert_title_fits(dash_duo, "flow-graph") if figure(dash_duo, "flow-graph") else None
    open_tab(dash_duo, "Entropy change ΔH")
    figure(dash_duo, "dh-graph")
    b = boxes(dash_duo, "dh-graph")
    (note,) = [a for a in b["notes"] if a["text"] == "no layer with FFN ΔH > 0"]
    (attn,) = [a for a in b["notes"] if a["text"].startswith("attention: ΔH_attn")]
    (ffn,) = [a for a in b["notes"] if a["text"].startswith("FFN: ΔH_ffn")]
    assert note["top"] >= attn["bottom"] and note["top"] >= ffn["bottom"], b  # below both panel titles
    assert_title_fits(dash_duo, "dh-graph")
    screenshot(dash_duo.driver, "entropy_change_no_boundary")
    assert dash_duo.get_logs() in ([], None)
