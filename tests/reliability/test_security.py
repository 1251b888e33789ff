"""Dashboard and model loading: local by default, reads only run folders inside the cache, no code from data."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from harness import one_line, run_main
from entropylens.errors import UserError
from entropylens.model.load import load_model
from synthetic import SyntheticRun, write_run
from serving import dash_call, flow_figure

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One good run, a complete run *outside* the cache reachable by a symlink, and malformed run folders."""
    base = tmp_path_factory.mktemp("sec")
    cache, outside = base / "cache", base / "outside"
    write_run(cache, SyntheticRun("good", n_layers=3, seed=1))
    write_run(outside, SyntheticRun("secret", n_layers=5, seed=2))  # complete and readable, were it reached
    runs = cache / "runs"
    os.symlink(outside / "runs" / "secret", runs / "escape")
    good = json.loads((runs / "good" / "manifest.json").read_text())
    bad = {"array": [1, 2], "types": {**good, "lens": 5, "model": "x", "created": 7, "prompts": None},
           "status-odd": {**good, "status": {"complete": True}}, "empty": None}
    for name, manifest in bad.items():
        (runs / name).mkdir()
        (runs / name / "manifest.json").write_text("" if manifest is None else json.dumps(manifest))
    for name, broken in (("bad-summary", "summary.parquet"), ("bad-entropy", "entropy.parquet"),
                         ("bad-tokens", "tokens.parquet")):
        shutil.copytree(runs / "good", runs / name)
        (runs / name / broken).write_bytes(b"PAR1 not really parquet")
        (runs / name / "manifest.json").write_text(json.dumps({**good, "run_id": name}))
    return cache


@pytest.fixture(scope="module", params=["dev", "gunicorn"])
def client(cache, request):
    """The app as the development server runs it (Flask's test client on the same WSGI app), and the
    production server: `entropylens app` (gunicorn, 2 workers) in a real process, over real HTTP."""
    from entropylens.app.server import create_app
    from serving import Served

    if request.param == "dev":
        c = create_app(cache).server.test_client()
        assert c.get("/").status_code == 200
        yield c
        return
    served = Served(cache, "--workers", "2", "--threads", "2")
    try:
        c = served.client()
        assert c.get("/").status_code == 200
        yield c
    finally:
        served.stop()


def test_dashboard_binds_localhost_by_default(cache, monkeypatch, capsys):
    import dash

    from entropylens.app import server

    seen = {}
    monkeypatch.setattr(server, "run_gunicorn", lambda wsgi, options: seen.update(options, wsgi=wsgi))
    monkeypatch.setattr(dash.Dash, "run", lambda self, **kw: seen.update(kw, dev=True))
    monkeypatch.delenv("ENTROPYLENS_APP_TOKEN", raising=False)
    code, _, err = run_main(monkeypatch, capsys, "app", "--cache", str(cache), "--port", "0")
    assert code == 0, err
    assert seen["bind"] == "127.0.0.1:0" and seen["worker_class"] == "gthread" and "dev" not in seen
    assert "%(U)s" in seen["access_log_format"] and "%(r)s" not in seen["access_log_format"]  # no query strings
    seen.clear()
    code, _, err = run_main(monkeypatch, capsys, "app", "--cache", str(cache), "--port", "0", "--dev")
    assert code == 0 and seen["host"] == "127.0.0.1" and seen["debug"] is True and seen["dev"], err
    import inspect
    assert inspect.signature(server.serve).parameters["host"].default == "127.0.0.1"


ESCAPES = ["..", "../outside", "../../etc", "/etc/passwd", "escape", "%2e%2e", "%2e%2e%2foutside",
           "..%2f..%2fetc", "%252e%252e%252f", "good/../escape", "good\n", ".hidden", "good/", "runs/good", "~"]


@pytest.mark.parametrize("bad", ESCAPES)
def test_run_ids_outside_the_cache_read_nothing(cache, client, bad):
    outside = str(cache.parent / "outside" / "runs" / "secret")
    for run_id in (bad, outside):
        fig = flow_figure(client, run_id)
        assert fig["data"] == []  # the outside run is complete: any read of it would draw lines
        text = fig["layout"]["annotations"][0]["text"]
        assert "invalid run id" in text or "no run" in text, text
    # the URL path (?run=...), raw and percent-encoded as a browser would send it
    table = dash_call(client, "runs-table.data runs-table.selected_rows runs-table.selected_row_ids banner.children",
                      [("url", "search", f"?run={bad}"), ("refresh", "n_clicks", None)],
                      [("runs-table", "selected_row_ids", None)])
    assert table["banner"]["children"].startswith("Ignored the URL")
    assert "escape" not in table["runs-table"]["selected_row_ids"]


@pytest.mark.parametrize("path", ["/assets/../server.py", "/assets/..%2fserver.py", "/assets/%2e%2e/data.py",
                                  "/_dash-component-suites/dash/..%2f..%2fapp%2fserver.py", "/..%2f..%2fetc/passwd"])
def test_static_routes_do_not_serve_files_outside_their_folders(client, path):
    r = client.get(path)
    page = path.startswith("/..") and r.status_code == 200 and b"<!DOCTYPE html>" in r.data  # Dash's page route
    assert (r.status_code == 404 or page) and b"create_app" not in r.data and b"root:" not in r.data


@pytest.mark.parametrize("run_id,broken", [
    ("array", "flow heat"), ("types", "heat"), ("status-odd", "flow heat"), ("empty", "flow heat"),
    ("bad-summary", "flow"), ("bad-entropy", "heat"), ("bad-tokens", "heat")])
def test_malformed_runs_show_a_message_not_a_stack_trace(cache, client, run_id, broken):
    """Every request answers 200; a view that needs the broken file says why in the figure."""
    from entropylens.app.data import list_runs

    status = list_runs(cache).set_index("run_id")["status"]
    assert status[run_id].startswith("corrupt") or run_id in ("bad-entropy", "types")  # entropy is read lazily
    figs = {"flow": flow_figure(client, run_id), "heat": dash_call(client, "heatmap-graph.figure", [
        ("focus-run", "value", run_id), ("tokens-lens", "value", "bupo"), ("tokens-prompt", "value", 0),
        ("tokens-site", "value", "layer"), ("tokens-quantity", "value", "H")])["heatmap-graph"]["figure"]}
    for view in broken.split():
        f = figs[view]
        text = f["layout"]["annotations"][0]["text"]
        assert f["data"] == [] and text and "Traceback" not in text, (run_id, view, text)


def test_no_pickle_or_remote_code_on_the_reading_path():
    """Dashboard and store read JSON and Parquet only; remote model code is never on by default."""
    reading = [*sorted((ROOT / "entropylens" / "app").rglob("*.py")),
               *sorted((ROOT / "entropylens" / "store").rglob("*.py"))]
    for path in reading:
        src = path.read_text()
        for word in ("pickle", "torch.load", "trust_remote_code", "eval(", "exec(", "allow_pickle"):
            assert word not in src, f"{word} in {path}"
    for path in (ROOT / "entropylens").rglob("*.py"):
        assert not re.search(r"trust_remote_code\s*=\s*True", path.read_text()), path
        assert "weights_only=False" not in path.read_text(), path


# ---------------------------------------------------------------- models

def test_remote_code_needs_the_flag(small_folder, tmp_path):
    """A checkpoint whose config points at its own Python is refused without --trust-remote-code; its code never
    runs."""
    folder = Path(shutil.copytree(small_folder, tmp_path / "remote"))
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nfrom transformers import "
                                    "LlamaConfig as EvilConfig, LlamaForCausalLM as EvilModel\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="ships its own Python code; .* with --trust-remote-code$") as e:
        load_model(str(folder))
    assert "\n" not in str(e.value)
    assert not marker.exists()


def _sharded(small_folder, tmp_path) -> Path:
    """The small model split over two safetensors shards with an index, as large checkpoints ship."""
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(small_folder, tmp_path / "sharded"))
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, folder / shard, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}))
    return folder


def test_sharded_checkpoint_loads_and_a_missing_shard_is_named(small_folder, tmp_path):
    folder = _sharded(small_folder, tmp_path)
    whole = load_model(str(small_folder)).model.state_dict()
    split = load_model(str(folder)).model.state_dict()
    assert all(torch.equal(whole[k], split[k]) for k in whole)  # the sharded copy is the same model
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError) as e:
        load_model(str(folder))
    assert str(e.value) == (f"weight file {folder / 'model-00002-of-00002.safetensors'} named in "
                            "model.safetensors.index.json is missing")


def test_corrupt_shard_and_index_are_named_in_one_line(small_folder, tmp_path, monkeypatch, capsys):
    folder = _sharded(small_folder, tmp_path)
    shard = folder / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    code, _, err = run_main(monkeypatch, capsys, "trace", "--model", str(folder), "--limit", "1",
                            "--cache", str(tmp_path / "c"), "--quiet")
    assert code == 2 and f"weight file {shard} is corrupt or truncated" in one_line(err)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(UserError, match="weight index .*model.safetensors.index.json is unreadable"):
        load_model(str(folder))
