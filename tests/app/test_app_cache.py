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
