"""Serving the dashboard for a group: the token beyond loopback, the production server, runs that change under it."""

from __future__ import annotations

import hmac
import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from harness import one_line, run_main
from serving import Served, dash_call, flow_figure
from synthetic import SyntheticRun, write_run

TOKEN = "s3cret-Token-for-tests-0123456789"
RUNS_BODY = [b"good", b"other"]  # run ids that must not appear in an answer to an unauthorised request
TABLE = "runs-table.data runs-table.selected_rows runs-table.selected_row_ids banner.children"
TABLE_IN = [("url", "search", ""), ("refresh", "n_clicks", None)]
TABLE_STATE = [("runs-table", "selected_row_ids", None)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("serve") / "cache"
    write_run(cache, SyntheticRun("good", n_layers=3, seed=1))
    write_run(cache, SyntheticRun("other", n_layers=4, seed=2))
    return cache


@pytest.fixture(scope="module")
def guarded(cache):
    from entropylens.app.server import create_app

    return create_app(cache, token=TOKEN).server


def _flow_body(run_id: str) -> dict:
    outs = {"id": "flow-graph", "property": "figure"}
    inputs = [("focus-run", "value", run_id), ("flow-lens", "value", "bupo"), ("flow-role", "value", "response"),
              ("flow-spread", "value", "std"), ("flow-sites", "value", ["layer"]), ("outcome", "value", "all")]
    return {"output": "flow-graph.figure", "outputs": outs, "changedPropIds": [], "state": [],
            "inputs": [{"id": i, "property": p, "value": v} for i, p, v in inputs]}


# ---------------------------------------------------------------- the command line

@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "dashboard.example.org"])
def test_non_loopback_without_a_token_is_one_line(cache, monkeypatch, capsys, host):
    from entropylens.app import server

    monkeypatch.delenv("ENTROPYLENS_APP_TOKEN", raising=False)
    monkeypatch.setattr(server, "run_gunicorn", lambda *a: pytest.fail("served without a token"))
    code, out, err = run_main(monkeypatch, capsys, "app", "--cache", str(cache), "--host", host)
    assert code == 2 and one_line(err).startswith(f"error: --host {host} serves every run") and "--token" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err + out


def test_token_options_and_their_errors(cache, monkeypatch, capsys):
    from entropylens.app import server

    seen = []
    monkeypatch.setattr(server, "run_gunicorn", lambda wsgi, opts: seen.append(opts))
    monkeypatch.setattr(server, "_check_port", lambda host, port: None)  # 0.0.0.0:8050 may be taken here
    monkeypatch.delenv("ENTROPYLENS_APP_TOKEN", raising=False)
    for args, message in [(["--token", "short"], "at least 8 characters"), (["--workers", "0"], "at least 1"),
                          (["--workers", "many"], "positive integer or 'auto'"), (["--threads", "0"], "at least 1"),
                          (["--port", "70000"], "0-65535"), (["--cache-mb", "-1"], ">= 0")]:
        code, _, err = run_main(monkeypatch, capsys, "app", "--cache", str(cache), *args)
        assert code == 2 and message in one_line(err) and len(err.strip().splitlines()) == 1, (args, err)
    code, _, err = run_main(monkeypatch, capsys, "app", "--cache", str(cache), "--host", "0.0.0.0", "--token", TOKEN,
                            "--workers", "3", "--threads", "5")
    assert code == 0 and seen[-1]["bind"] == "0.0.0.0:8050" and seen[-1]["workers"] == 3 and seen[-1]["threads"] == 5
    assert TOKEN not in err and "TLS" in err
    monkeypatch.setenv("ENTROPYLENS_APP_TOKEN", TOKEN)  # the variable stands for --token
    code, _, err = run_main(monkeypatch, capsys, "app", "--cache", str(cache), "--host", "0.0.0.0")
    assert code == 0 and len(seen) == 2, err


def test_default_workers_follow_the_cpu_count(monkeypatch):
    from entropylens.app.config import AppConfig, default_workers

    for cpus, workers in [(1, 2), (2, 4), (3, 6), (64, 8)]:
        monkeypatch.setattr(os, "cpu_count", lambda c=cpus: c)
        assert default_workers() == workers and AppConfig().resolved_workers() == workers


# ---------------------------------------------------------------- hostile requests

def _dependencies_path() -> str:
    import dash

    return f"/_dash-component-suites/dash/dcc/dash_core_components.v{dash.__version__.replace('.', '_')}m1.js"


HOSTILE = {
    "page, no token": ("GET", "/", {}, None),
    "page as a browser, no token": ("GET", "/", {"Accept": "text/html"}, None),
    "layout, no token": ("GET", "/_dash-layout", {}, None),
    "dependencies, no token": ("GET", "/_dash-dependencies", {}, None),
    "callback POST, no token": ("POST", "/_dash-update-component", {}, "flow"),
    "callback POST, token in its query": ("POST", f"/_dash-update-component?token={TOKEN}", {}, "flow"),
    "wrong token": ("GET", "/?token=wrong-token-0123456789", {}, None),
    "token one char short": ("GET", f"/?token={TOKEN[:-1]}", {}, None),
    "token one char long": ("GET", f"/?token={TOKEN}x", {}, None),
    "empty token": ("GET", "/?token=", {}, None),
    "token as a path segment": ("GET", f"/{TOKEN}/_dash-layout", {}, None),
    "token in a traversal path": ("GET", f"/assets/..%2f{TOKEN}%2f..%2f_dash-layout", {}, None),
    "token in a dot-dot path": ("GET", f"/assets/../{TOKEN}/../_dash-layout", {}, None),
    "token in an Authorization header": ("GET", "/_dash-layout", {"Authorization": f"Bearer {TOKEN}"}, None),
    "token in a custom header": ("GET", "/_dash-layout", {"X-Entropylens-Token": TOKEN}, None),
    "raw token as the cookie": ("GET", "/_dash-layout", {"Cookie": f"entropylens_session={TOKEN}"}, None),
    "token in another cookie": ("GET", "/_dash-layout", {"Cookie": f"token={TOKEN}"}, None),
    "cookie of another token": ("GET", "/_dash-layout", {"Cookie": "entropylens_session=" + "0" * 64}, None),
    "asset": ("GET", "/assets/style.css", {}, None),
    "component suite": ("GET", "__deps__", {}, None),
    "favicon": ("GET", "/_favicon.ico", {}, None),
    "login with a wrong token": ("POST", "/_entropylens/login", {"Content-Type": "application/x-www-form-urlencoded"},
                                 b"token=wrong-token-0123456789&next=/_dash-layout"),
}


def _send(client, method, path, headers, body):
    path = _dependencies_path() if path == "__deps__" else path
    if body == "flow":
        body = json.dumps(_flow_body("good")).encode()
        headers = {**headers, "Content-Type": "application/json"}
    if hasattr(client, "open") and not hasattr(client, "application"):  # serving.HttpClient
        return client.open(method, path, body, headers)
    return client.open(path, method=method, data=body, headers=headers)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_requests_get_401_and_no_run_data(guarded, name):
    r = _send(guarded.test_client(), *HOSTILE[name])
    assert r.status_code in (401, 404), (name, r.status_code)
    assert not any(run in r.data for run in RUNS_BODY) and TOKEN.encode() not in r.data, (name, r.data[:300])
    assert "set-cookie" not in {k.lower() for k in r.headers.keys()}, name


def test_the_right_token_opens_everything_and_the_cookie_is_not_the_token(guarded):
    c = guarded.test_client()
    r = c.get(f"/?run=good&token={TOKEN}")
    assert r.status_code == 303 and r.headers["Location"] == "/?run=good"  # the token leaves the address bar
    cookie = r.headers["Set-Cookie"]
    assert TOKEN not in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert c.get("/").status_code == 200 and c.get("/_dash-layout").status_code == 200
    assert c.get("/assets/style.css").status_code == 200
    assert flow_figure(c, "good")["data"]  # the callback draws the run
    fresh = guarded.test_client()  # the login form, with a `next` that stays on this server
    r = fresh.post("/_entropylens/login", data={"token": TOKEN, "next": "//evil.example/x"})
    assert r.status_code == 303 and r.headers["Location"] == "/"
    assert fresh.get("/_dash-layout").status_code == 200


def test_tokens_are_compared_in_constant_time(guarded, monkeypatch):
    """Every comparison goes through hmac.compare_digest on equal-length digests, whatever the guess's length."""
    from entropylens.app import auth

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    c = guarded.test_client()
    for guess in ("x", TOKEN[:-1], TOKEN + "longer", TOKEN):
        c.get(f"/?token={guess}")
    assert calls and all(a == b == 32 for a, b in calls), calls


# ---------------------------------------------------------------- the production server

@pytest.fixture(scope="module")
def prod(cache):
    served = Served(cache, "--workers", "2", "--threads", "2", env={"ENTROPYLENS_APP_TOKEN": TOKEN})
    yield served
    served.stop()


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_requests_against_the_production_server(prod, name):
    r = _send(prod.client(), *HOSTILE[name])
    assert r.status_code in (401, 404), (name, r.status_code)
    assert not any(run in r.data for run in RUNS_BODY) and TOKEN.encode() not in r.data, name


def test_token_never_reaches_the_logs(cache, tmp_path):
    served = Served(cache, "--workers", "1", "--token", TOKEN, log=tmp_path / "server.log")
    c = served.client()
    r = c.get(f"/?run=good&token={TOKEN}")
    assert r.status_code == 303 and TOKEN not in r.headers.get("location", "")
    c.cookie = r.headers["set-cookie"].split(";", 1)[0]
    assert c.get("/").status_code == 200
    assert c.post("/_dash-update-component", json=_flow_body("good")).status_code == 200
    c.cookie = None
    c.post("/_entropylens/login", data=f"token={TOKEN}".encode(), headers={"Content-Type":
                                                                           "application/x-www-form-urlencoded"})
    assert c.get(f"/?token={TOKEN}x").status_code == 401
    log = served.stop()
    assert '"GET /" 303' in log and '"POST /_dash-update-component" 200' in log  # the access log is on
    assert TOKEN not in log and TOKEN[:12] not in log, log


def test_dev_server_serves_behind_the_token(cache, tmp_path):
    """`--dev`: Werkzeug with debug and the reloader (whose child must not trip over the port its parent holds)."""
    served = Served(cache, "--dev", "--token", TOKEN, log=tmp_path / "dev.log")
    try:
        c = served.client()
        end = time.time() + 60
        while c.get("/_dash-layout").status_code != 401:  # the reloader's child is serving once it answers
            assert time.time() < end
            time.sleep(0.5)
        r = c.get(f"/?token={TOKEN}")
        assert r.status_code == 303
        c.cookie = r.headers["set-cookie"].split(";", 1)[0]
        assert c.get("/_dash-layout").status_code == 200 and flow_figure(c, "good")["data"]
    finally:
        log = served.stop()
    assert "Debug mode: on" in log and "error:" not in log and TOKEN not in log  # Dash silences route logs in
    # debug; were they on (dev_tools_silence_routes_logging=False), app.auth.RedactToken blanks the token


def test_dev_server_log_lines_are_redacted():
    import logging

    from entropylens.app.auth import RedactToken

    rec = logging.LogRecord("werkzeug", logging.INFO, "", 0, '"%s" %s', (f"GET /?run=a&token={TOKEN} HTTP/1.1", 303),
                            None)
    RedactToken().filter(rec)
    assert TOKEN not in rec.getMessage() and "token=[redacted]" in rec.getMessage() and "run=a" in rec.getMessage()


# ---------------------------------------------------------------- runs that change while the server is up

def _table(client) -> dict[str, str]:
    rows = dash_call(client, TABLE, TABLE_IN, TABLE_STATE)["runs-table"]["data"]
    return {r["id"]: r["status"] for r in rows}


def _prompts(client, run_id: str) -> list:
    return dash_call(client, "tokens-prompt.options tokens-prompt.value tokens-lens.options tokens-lens.value",
                     [("focus-run", "value", run_id)],
                     [("tokens-prompt", "value", None), ("tokens-lens", "value", "bupo")])["tokens-prompt"]["options"]


def _ys(fig: dict) -> list[float]:
    """The mean line's y values (the last trace; Plotly ships numeric arrays base64-encoded)."""
    import base64

    import numpy as np

    y = fig["data"][-1]["y"]
    if isinstance(y, dict):
        y = np.frombuffer(base64.b64decode(y["bdata"]), dtype=y["dtype"])
    return [round(float(v), 6) for v in y]


def _layer_means(run: Path) -> list[float]:
    s = pd.read_parquet(run / "summary.parquet")
    s = s[(s["lens"] == "bupo") & (s["role"] == "response") & (s["quantity"] == "H_layer") & (s["outcome"] == "all")]
    return s.sort_values("layer")["mean"].round(6).tolist()


def test_runs_written_while_the_production_server_is_up(tmp_path):
    """A run appears `running` (never read, though its files are there), then complete and drawn; a re-trace
    under the same id is drawn anew: no restart, across both workers."""
    cache, staging = tmp_path / "cache", tmp_path / "staging"
    write_run(cache, SyntheticRun("first", n_layers=3, seed=1))
    served = Served(cache, "--workers", "2", "--threads", "2")
    try:
        c = served.client()
        assert _table(c) == {"first": "complete"}
        for _ in range(4):  # warm both workers' caches
            assert flow_figure(c, "first")["data"]
        new = write_run(staging, SyntheticRun("new", n_layers=5, seed=3))
        run = cache / "runs" / "new"
        shutil.copytree(new, run)  # every file present, but the manifest says running: a writer mid-run
        manifest = json.loads((new / "manifest.json").read_text())
        (run / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))
        for _ in range(4):
            assert _table(c)["new"] == "running"
            fig = flow_figure(c, "new")
            assert fig["data"] == [] and "not a complete trace run" in fig["layout"]["annotations"][0]["text"]
            assert _prompts(c, "new") == []
        tmp = run / "manifest.json.tmp"
        tmp.write_text(json.dumps(manifest))
        os.replace(tmp, run / "manifest.json")  # the writer's last step
        for _ in range(4):
            assert _table(c)["new"] == "complete"
            fig = flow_figure(c, "new")
            assert _ys(fig) == _layer_means(run)
        before = _layer_means(run)
        write_run(cache, SyntheticRun("new", n_layers=5, seed=4))  # re-traced: same id, new data and manifest
        assert _layer_means(run) != before
        for _ in range(4):
            assert _ys(flow_figure(c, "new")) == _layer_means(run)
    finally:
        served.stop()


# ---------------------------------------------------------------- the table cache

def test_byte_lru_evicts_the_least_recent_and_keeps_under_its_limit():
    import numpy as np

    from entropylens.app.cache import ByteLRU, nbytes

    df = pd.DataFrame({"a": np.arange(1000, dtype=np.float64)})
    size = nbytes(df)
    assert size >= 8000 and size == df.memory_usage(deep=True).sum()
    lru, loads = ByteLRU(int(2.5 * size)), []
    get = lambda k: lru.get(k, lambda: loads.append(k) or df.copy())  # noqa: E731
    for k in ["a", "b", "a", "c"]:  # c evicts b (a was used more recently)
        get(k)
    assert loads == ["a", "b", "c"] and lru.bytes <= lru.limit and len(lru) == 2
    get("a")
    get("b")
    assert loads == ["a", "b", "c", "b"] and lru.hits == 2
    big = ByteLRU(size // 2)
    assert big.get("x", lambda: df) is df and len(big) == 0 and big.bytes == 0  # too big: returned, not kept


def test_the_cache_never_holds_a_running_run(tmp_path):
    from entropylens.app import data
    from entropylens.app.cache import CACHE
    from entropylens.errors import UserError

    run = write_run(tmp_path / "c", SyntheticRun("r", n_layers=2, seed=5))
    m = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**m, "status": "running"}))
    CACHE.clear()
    for read in (lambda: data.load_summary(run), lambda: data.read_entropy(run, ["H_layer"], "bupo", 0),
                 lambda: data.read_tokens(run, 0), lambda: data.prompt_ids(run)):
        with pytest.raises(UserError, match="not complete"):
            read()
    assert len(CACHE) == 0
    (run / "manifest.json").write_text(json.dumps(m))
    rows = data.read_entropy(run, ["position", "layer", "H_layer"], "bupo", 1)
    direct = pd.read_parquet(run / "entropy.parquet", filters=[("lens", "==", "bupo"), ("prompt_idx", "==", 1)])
    assert rows.equals(direct[["position", "layer", "H_layer"]].reset_index(drop=True))
    held = len(CACHE)
    cell = data.read_entropy(run, ["H_ffn", "top1_layer"], "bupo", 1, position=3, layer=2)
    want = direct[(direct["position"] == 3) & (direct["layer"] == 2)][["H_ffn", "top1_layer"]].reset_index(drop=True)
    assert len(cell) == 1 and cell.equals(want) and len(CACHE) == held  # the click came from the same slice


@pytest.mark.parametrize("statistics", [True, False])
def test_prompt_slices_read_by_row_group_are_the_prompts_rows(tmp_path, statistics):
    """One row group read serves every prompt in it (or, without statistics, each prompt is read by value): the
    same rows, in file order, as a filtered read, for every lens and prompt, with one read per row group."""
    import pyarrow.parquet as pq

    from entropylens import store
    from entropylens.app import data
    from entropylens.app.cache import CACHE

    run = write_run(tmp_path / "c", SyntheticRun("r", n_layers=2, n_prompts=6, seed=6, chunk_prompts=4,
                                                 lenses=("bupo", "logit")))
    if not statistics:
        pq.write_table(pq.read_table(run / "entropy.parquet"), run / "entropy.parquet", row_group_size=50,
                       write_statistics=False)
    groups = store.entropy_groups(run)
    assert (len(groups) == 4 and groups[0] == ("bupo", "bupo", 0, 3)) if statistics else groups == []
    CACHE.clear()
    for lens in ("bupo", "logit"):
        for p in range(6):
            got = data.read_entropy(run, data.SLICE_COLUMNS, lens, p)
            want = pd.read_parquet(run / "entropy.parquet", columns=data.SLICE_COLUMNS,
                                   filters=[("lens", "==", lens), ("prompt_idx", "==", p)])
            assert len(got) > 0 and got.equals(want.reset_index(drop=True)), (lens, p)
    # statistics: the index and 4 row groups; without: one read per (lens, prompt)
    assert len(CACHE) == (1 + 4 if statistics else 1 + 12)


def test_fresh_workers_serve_every_bundle_when_asked_all_at_once(cache):
    """Dash registers bundle paths on a process's first request and flags that done too early; concurrent first
    requests to a fresh worker got 404 for bundles until the set-up moved before the fork (app.server.prepare)."""
    import re
    from concurrent.futures import ThreadPoolExecutor

    from entropylens.app.server import create_app

    index = create_app(cache).server.test_client().get("/").data.decode()
    bundles = re.findall(r'src="(/_dash-component-suites/[^"]+)"', index)
    assert len(bundles) >= 5
    served = Served(cache, "--workers", "2", "--threads", "8")
    try:
        c = served.client()
        with ThreadPoolExecutor(16) as pool:  # the page's bundles, twice over, before any other request
            codes = list(pool.map(lambda path: c.get(path).status_code, bundles * 2))
    finally:
        served.stop()
    assert codes == [200] * len(codes), codes


@pytest.mark.reliability
def test_load_benchmark_runs_small_and_its_writer_check_works(tmp_path):
    """benchmarks/bench_dashboard_load.py end to end at toy size: both servers answer every request, the
    writer's run is listed and drawn once complete; a damaged figure would count as an error."""
    import argparse
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_dashboard_load as bench

    cache = tmp_path / "cache"
    bench.build(cache, 2)
    args = argparse.Namespace(cache=cache, clients=2, seconds=4.0, warmup=1.0, workers="2", threads=2,
                              client_procs=1, writer=True)
    model = bench.tiny_model(tmp_path / "model")
    for kind in ("gunicorn", "dev"):
        r = bench.run_one(kind, args, model, f"t-{kind}")
        assert r["requests"] > 8 and r["errors"] == 0, r["error_examples"]
        w = r["writer"]
        assert w["after_completion"] == "listed complete and drawn in full" and not w["stale_listings"]
        assert 0.05 < r["peak_rss_gib"] < 4 and {"table", "lenses", "flow"} <= set(r["by_kind"])
    assert bench._writer_check(b'{"response": {"flow-graph": {"figure": {"data": [{"x": [0, 1], "y": [1, 2]}]}}}}',
                               "complete", 3).startswith("partial table")
    assert bench._writer_check(b'{"response": {"flow-graph": {"figure": {"data": [{"x": [0], "y": [1]}]}}}}',
                               "running", 3) == bench.RUNNING_DATA


def test_a_folder_a_writer_just_made_is_starting_not_corrupt(tmp_path):
    """Between a trace's mkdir and its first manifest the folder is listed `starting` (not usable, never read);
    a folder with data but no manifest stays `corrupt`."""
    from entropylens.app.data import list_runs, usable

    cache = tmp_path / "c"
    write_run(cache, SyntheticRun("done", n_layers=2, seed=6))
    runs = cache / "runs"
    (runs / "empty").mkdir()
    (runs / "writing").mkdir()
    (runs / "writing" / "manifest.json.tmp").write_text("{")
    (runs / "writing" / "parts").mkdir()  # as RunWriter makes it, before its first manifest
    (runs / "orphan").mkdir()
    shutil.copy(runs / "done" / "summary.parquet", runs / "orphan" / "summary.parquet")
    (runs / "orphan-parts").mkdir()
    (runs / "orphan-parts" / "parts").mkdir()
    (runs / "orphan-parts" / "parts" / "tokens-00000.parquet").write_bytes(b"PAR1")
    status = list_runs(cache).set_index("run_id")["status"]
    assert status["empty"] == status["writing"] == "starting" and not usable("starting")
    assert status["orphan"].startswith("corrupt") and status["orphan-parts"].startswith("corrupt")
    assert status["done"] == "complete"
    m = json.loads((runs / "done" / "manifest.json").read_text())
    (runs / "writing" / "manifest.json").write_text(json.dumps({**m, "run_id": "writing", "status": "running"}))
    assert list_runs(cache).set_index("run_id")["status"]["writing"] == "running"  # seen at once: a new version


def test_a_manifest_written_between_listing_and_status_is_not_corrupt(tmp_path):
    """The listing read no manifest, then the writer renamed its first one into place before the status was
    worked out (seen under load): the run is listed with the manifest's status, not as corrupt."""
    from entropylens.app.data import _status

    cache = tmp_path / "c"
    write_run(cache, SyntheticRun("done", n_layers=2, seed=6))
    run = cache / "runs" / "writing"
    (run / "parts").mkdir(parents=True)
    m = json.loads((cache / "runs" / "done" / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**m, "run_id": "writing", "status": "running"}))
    assert _status(run, "corrupt", "trace") == "running"
    (run / "manifest.json").write_text("{")
    assert _status(run, "corrupt", "trace").startswith("corrupt")
