"""The per-process figure cache: what makes a drawn figure stale, and inputs that draw the same figure."""

from __future__ import annotations

import json
import os

from synthetic import SyntheticRun, write_run
from serving import dash_call, flow_figure


def _set_status(run, status: str, **extra) -> None:
    """Replace the manifest the way the writer does (a new file renamed into place)."""
    path = run / "manifest.json"
    m = {**json.loads(path.read_text()), "status": status, **extra}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(m))
    os.replace(tmp, path)


def test_a_run_being_written_leaves_drawn_figures_warm_until_it_completes(tmp_path, monkeypatch):
    from entropylens.analysis import figures
    from entropylens.app.cache import CACHE, figure_version
    from entropylens.app.server import create_app

    cache = tmp_path / "cache"
    write_run(cache, SyntheticRun("done", n_layers=3, seed=1))
    writing = write_run(cache, SyntheticRun("writing", n_layers=2, seed=2))
    _set_status(writing, "running")
    builds = []
    real = figures.flow_figure
    monkeypatch.setattr(figures, "flow_figure", lambda *a, **k: builds.append(a[2]) or real(*a, **k))
    CACHE.clear()
    client = create_app(cache).server.test_client()

    first = flow_figure(client, "done")
    v0 = figure_version(cache)
    for step in range(3):  # the writer records progress: the manifest is replaced, the status stays running
        _set_status(writing, "running", progress=step)
        assert figure_version(cache) == v0
        assert flow_figure(client, "done") == first
    assert builds == ["done"]
    assert flow_figure(client, "writing")["data"] == []  # a running run is a message, never read

    _set_status(writing, "complete")  # a status change: every figure may read differently now
    assert figure_version(cache) != v0
    assert flow_figure(client, "done") == first and builds == ["done", "done"]
    assert flow_figure(client, "writing")["data"] and builds[-1] == "writing"

    done = cache / "runs" / "done"  # a complete run re-traced in place: its new manifest version is seen
    _set_status(done, "complete", retraced=True)
    flow_figure(client, "done")
    assert builds == ["done", "done", "writing", "done"]


def test_sites_ticked_in_any_order_draw_one_figure(tmp_path, monkeypatch):
    from entropylens.analysis import figures
    from entropylens.app.cache import CACHE
    from entropylens.app.server import create_app

    cache = tmp_path / "cache"
    write_run(cache, SyntheticRun("r", n_layers=3, seed=3))
    builds = []
    real = figures.flow_figure
    monkeypatch.setattr(figures, "flow_figure", lambda *a, **k: builds.append(a[5]) or real(*a, **k))
    CACHE.clear()
    client = create_app(cache).server.test_client()

    def flow(sites):
        return dash_call(client, "flow-graph.figure", [
            ("focus-run", "value", "r"), ("flow-lens", "value", "bupo"), ("flow-role", "value", "response"),
            ("flow-spread", "value", "std"), ("flow-sites", "value", sites), ("outcome", "value", "all")],
        )["flow-graph"]["figure"]

    a, b = flow(["ffn", "layer", "attn"]), flow(["attn", "ffn", "layer"])
    assert a == b and builds == [["layer", "attn", "ffn"]]
    names = [t["name"] for t in a["data"] if t.get("fill") is None]
    assert names == [figures.SITE_LABELS[s] for s in ("layer", "attn", "ffn")]
    flow(["ffn_in", "layer"])
    assert builds[-1] == ["layer", "ffn_in"]


def test_workers_share_drawn_figures_through_the_store(tmp_path):
    from entropylens.app.figstore import FigureStore

    a, b = FigureStore(tmp_path, 1 << 20), FigureStore(tmp_path, 1 << 20)  # two workers, one folder
    drawn = []
    fig = {"data": [{"type": "scatter", "y": [1.5, 2.0]}], "layout": {"title": {"text": "H"}}}
    assert a.get(("figure", "k"), lambda: drawn.append("a") or fig) == fig
    assert b.get(("figure", "k"), lambda: drawn.append("b") or fig) == fig
    assert drawn == ["a"] and not list(tmp_path.glob("*.tmp"))
    a._path(("figure", "torn")).write_text('{"data": [')  # a torn file is redrawn, not served
    assert b.get(("figure", "torn"), lambda: drawn.append("torn") or fig) == fig and drawn[-1] == "torn"


def test_the_store_stays_within_its_bytes_oldest_first(tmp_path):
    from entropylens.app import figstore

    store = figstore.FigureStore(tmp_path, 40_000)
    for i in range(3 * figstore.PRUNE_EVERY):
        store.get(i, lambda i=i: {"i": i, "pad": "x" * 1000})
        os.utime(store._path(i), (i, i))  # a clear age order
    sizes = sum(p.stat().st_size for p in tmp_path.glob("*.json"))
    assert sizes <= 40_000 and not store._path(0).exists() and store._path(3 * figstore.PRUNE_EVERY - 1).exists()


def test_figures_from_the_store_answer_like_drawn_ones(tmp_path):
    from entropylens.app import cache as app_cache
    from entropylens.app.figstore import FigureStore
    from entropylens.app.server import create_app
    from serving import dash_call

    cache = tmp_path / "cache"
    write_run(cache, SyntheticRun("r", n_layers=3, seed=4))
    calls = [("flow-graph.figure", [("focus-run", "value", "r"), ("flow-lens", "value", "bupo"),
                                    ("flow-role", "value", "response"), ("flow-spread", "value", "iqr"),
                                    ("flow-sites", "value", ["layer", "ffn"]), ("outcome", "value", "all")]),
             ("heatmap-graph.figure", [("focus-run", "value", "r"), ("tokens-lens", "value", "bupo"),
                                       ("tokens-prompt", "value", 1), ("tokens-site", "value", "ffn"),
                                       ("tokens-quantity", "value", "dH")]),
             ("stages-panel.children", [("focus-run", "value", "r"), ("dh-lens", "value", "bupo"),
                                        ("dh-role", "value", "response"), ("dh-band", "value", 0.05),
                                        ("stages-collapse", "value", 0.1)])]
    answers = []
    for store in (None, FigureStore(tmp_path / "shared", 1 << 24), FigureStore(tmp_path / "shared", 1 << 24)):
        app_cache.configure(app_cache.DEFAULT_BYTES, store)  # drawn; drawn and stored; read from the store
        client = create_app(cache).server.test_client()
        answers.append([json.dumps(dash_call(client, out, ins), sort_keys=True) for out, ins in calls])
        if store is not None:
            assert len(list((tmp_path / "shared").glob("*.json"))) == len(calls)
    app_cache.configure(app_cache.DEFAULT_BYTES)
    assert answers[0] == answers[1] == answers[2]
