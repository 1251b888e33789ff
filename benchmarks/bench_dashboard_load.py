"""Many readers at once: the served dashboard (gunicorn) vs Dash's development server, with a writer.

Starts each server on 127.0.0.1 over a synthetic 10 M-row, 40-layer run (benchmarks/bench_dashboard.py's
generator), drives N concurrent clients through the real Dash callback endpoints (the POSTs a browser sends
when it lists runs, switches the focus run, the outcome filter, prompts, sites, layers and clicks a cell) for a
fixed time, and prints requests/s, p50/p95/p99 latency, errors and the server's peak RSS and PSS (all its
processes), side by side; the *_steady percentiles leave out requests answered in the first --warmup seconds,
when every worker reads and draws for the first time. Meanwhile a real `entropylens trace` (a tiny random
model) writes a new run into the same cache: clients must never get data of it while it is `running`, and it
must appear, complete and drawable, after it finishes. `dev` is Dash's development server on the same app (Werkzeug, threaded, debug off);
`dev-nocache` the same with the table cache at 0 bytes, as `entropylens app` served before it had caches.

    nice -n 5 python benchmarks/bench_dashboard_load.py --clients 16 --seconds 60 [--repeats 3]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from bench_dashboard import BIG, SMALL, build  # noqa: E402

from entropylens.store.cache import Cache  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
# Dash's development server (Werkzeug, threaded, debug off) on the same app; `dev-nocache` with the table cache
# at 0 bytes (every callback reads and draws afresh), as `entropylens app` served before it had caches
DEV = ("import sys; from pathlib import Path; from entropylens.app.cache import configure; "
       "from entropylens.app.server import create_app; configure(int(sys.argv[3])); "
       "create_app(Path(sys.argv[1])).run(host='127.0.0.1', port=int(sys.argv[2]), debug=False)")
SITES = ["layer", "attn", "ffn", "attn_in", "ffn_in"]
OUTCOMES = ["all", "correct", "wrong", "both"]
RUNNING_DATA = "data for a run listed running"  # an error only if it arrived before the run completed
LOG = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-dashboard-load-{os.getpid()}.log"  # the server's output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def body(output: str, inputs, state=()) -> bytes:
    outs = [{"id": o.split(".")[0], "property": o.split(".")[1]} for o in output.split()]
    name = f"..{'...'.join(output.split())}.." if len(outs) > 1 else output
    return json.dumps({"output": name, "outputs": outs if len(outs) > 1 else outs[0],
                       "inputs": [{"id": i, "property": p, "value": v} for i, p, v in inputs],
                       "state": [{"id": i, "property": p, "value": v} for i, p, v in state],
                       "changedPropIds": [f"{i}.{p}" for i, p, _ in inputs[:1]]}).encode()


def session(rng: random.Random, runs: list[str]):
    """One user's interaction: (kind, request body) in the order a browser sends them."""
    run, outcome = rng.choice(runs), rng.choice(OUTCOMES)
    focus = ("focus-run", "value", run)
    yield "table", body("runs-table.data runs-table.selected_rows runs-table.selected_row_ids banner.children",
                        [("url", "search", ""), ("refresh", "n_clicks", rng.choice([None, 1]))],
                        [("runs-table", "selected_row_ids", runs)])
    yield "lenses", body("flow-lens.options flow-lens.value dh-lens.options dh-lens.value", [focus],
                         [("flow-lens", "value", "bupo")])
    yield "flow", body("flow-graph.figure", [
        focus, ("flow-lens", "value", "bupo"), ("flow-role", "value", rng.choice(["response", "prompt", "all"])),
        ("flow-spread", "value", rng.choice(["std", "iqr"])), ("flow-sites", "value", rng.sample(SITES, 3)),
        ("outcome", "value", outcome)])
    yield "dh", body("dh-graph.figure", [
        focus, ("dh-lens", "value", "bupo"), ("dh-role", "value", "response"),
        ("dh-band", "value", rng.choice([0.05, 0.1])), ("outcome", "value", outcome)])
    yield "compare", body("compare-graph.figure", [
        ("runs-table", "selected_row_ids", runs), ("compare-quantity", "value", rng.choice(["H_layer", "dH_ffn"])),
        ("compare-role", "value", "response"), ("compare-lens", "value", ["bupo"]),
        ("compare-norm", "value", ["norm"]), ("outcome", "value", outcome)])
    yield "prompts", body("tokens-prompt.options tokens-prompt.value tokens-lens.options tokens-lens.value", [focus],
                          [("tokens-prompt", "value", None), ("tokens-lens", "value", "bupo")])
    prompt = rng.randrange(0, 32 if run == BIG else 16)  # a group looks at a few dozen prompts, not all 256
    site = rng.choice(SITES)
    quantity = "dH" if site in ("attn", "ffn") and rng.random() < 0.5 else "H"
    yield "heatmap", body("heatmap-graph.figure", [
        focus, ("tokens-lens", "value", "bupo"), ("tokens-prompt", "value", prompt), ("tokens-site", "value", site),
        ("tokens-quantity", "value", quantity)])
    click = {"points": [{"x": f"{rng.randrange(0, 400)}: tok", "y": rng.randrange(0, 28)}]}
    yield "click", body("cell-detail.children", [("heatmap-graph", "clickData", click)],
                        [focus, ("tokens-lens", "value", "bupo"), ("tokens-prompt", "value", prompt)])


def _post(conn: http.client.HTTPConnection, payload: bytes) -> tuple[bool, bytes]:
    conn.request("POST", "/_dash-update-component", payload, {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    return r.status == 200 and b'"response"' in data[:40], data


def _flow_of(run: str) -> bytes:
    return body("flow-graph.figure", [("focus-run", "value", run), ("flow-lens", "value", "bupo"),
                                      ("flow-role", "value", "response"), ("flow-spread", "value", "std"),
                                      ("flow-sites", "value", ["layer"]), ("outcome", "value", "all")])


def _length(values) -> int:
    """Length of a trace array (Plotly ships numeric arrays base64-encoded: {dtype, bdata})."""
    if isinstance(values, dict):
        import base64

        return len(base64.b64decode(values["bdata"])) // np.dtype(values["dtype"]).itemsize
    return len(values)


def _writer_check(data: bytes, status: str, n_points: int | None) -> str | None:
    """A figure of the writer's run: none while it is not complete, every layer once it is."""
    fig = json.loads(data)["response"]["flow-graph"]["figure"]
    if status != "complete":  # data here is checked against the completion time by run_one (RUNNING_DATA)
        return RUNNING_DATA if fig["data"] else None
    if not fig["data"]:
        return f"completed run drew nothing: {fig['layout']['annotations'][0]['text']!r}"
    got = {_length(t["x"]) for t in fig["data"] if t.get("x") is not None and t.get("fill") is None}
    return None if n_points is None or n_points in got else f"partial table: {got} points, expected {n_points}"


def _client(port: int, seconds: float, seed: int, writer_run: str, out: list) -> None:
    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    runs, end = [BIG, SMALL], time.time() + seconds
    rec = {"lat": [], "at": [], "kind": [], "errors": [], "writer_seen": [], "running_data_at": [], "retries": 0}
    while time.time() < end:
        for kind, payload in session(rng, runs):
            if time.time() >= end:
                break
            extra = []
            t = time.perf_counter()
            try:
                try:
                    ok, data = _post(conn, payload)
                except (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError):
                    # the server closed an idle keep-alive connection: a browser retries on a new one
                    conn.close()
                    rec["retries"] += 1
                    ok, data = _post(conn, payload)
            except (OSError, http.client.HTTPException) as e:
                ok, data = False, str(e).encode()
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            rec["lat"].append(time.perf_counter() - t)
            rec["at"].append(time.time())
            rec["kind"].append(kind)
            if not ok:
                rec["errors"].append(f"{kind}: {data[:200]!r}")
                continue
            if kind == "table":  # the writer's run as listed: ask for its figure, whatever its status
                rows = {r["id"]: r for r in json.loads(data)["response"]["runs-table"]["data"]}
                if writer_run in rows:
                    status = rows[writer_run]["status"]
                    rec["writer_seen"].append((time.time(), status))
                    layers = rows[writer_run]["layers"]
                    extra.append((status, int(layers) + 1 if str(layers).isdigit() else None))
                    if status == "complete" and writer_run not in runs:
                        runs.append(writer_run)  # from now on a run the clients browse like the others
            for status, n_points in extra:
                t = time.perf_counter()
                try:
                    ok, data = _post(conn, _flow_of(writer_run))
                except (OSError, http.client.HTTPException) as e:
                    ok, data = False, str(e).encode()
                rec["lat"].append(time.perf_counter() - t)
                rec["at"].append(time.time())
                rec["kind"].append("writer-flow")
                problem = _writer_check(data, status, n_points) if ok else f"writer-flow: {data[:200]!r}"
                if problem == RUNNING_DATA:  # listed running, drawn: fine if it completed in between
                    rec["running_data_at"].append(time.time())
                elif problem:
                    rec["errors"].append(problem)
    out.append(rec)


def _clients_proc(port: int, seconds: float, n: int, seed: int, writer_run: str, q) -> None:
    out: list = []
    threads = [threading.Thread(target=_client, args=(port, seconds, seed * 1000 + i, writer_run, out))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q.put(out)


def _wait_ready(port: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {LOG.read_text()[-2000:]}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/_dash-layout")
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError("server did not come up")


def _tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(RSS, PSS) summed over the server and its workers. RSS counts the pages the workers share with the
    master (the app, loaded once before forking) once per process; PSS splits them, so it is the memory used."""
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    rss = pss = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            rss, pss = rss + info.rss, pss + info.pss
        except psutil.Error:
            pass
    return rss, pss


def start_server(kind: str, cache: Path, port: int, workers: str, threads: int | None) -> subprocess.Popen:
    if kind == "gunicorn":
        cmd = [sys.executable, "-m", "entropylens", "app", "--cache", str(cache), "--port", str(port),
               "--workers", workers, *(["--threads", str(threads)] if threads else [])]
    elif kind in ("dev", "dev-nocache"):
        cmd = [sys.executable, "-c", DEV, str(cache), str(port), str(0 if kind == "dev-nocache" else 1024 << 20)]
    else:
        raise SystemExit(f"error: unknown server {kind!r} (gunicorn, dev, dev-nocache)")
    # its log goes to a file: a pipe nobody reads fills up after ~64 kB of access lines and stalls the server
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=open(LOG, "w"), text=True)


def writer_cmd(model: Path, cache: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "entropylens", "trace", "--model", str(model), "--limit", "16", "--batch-size", "2",
            "--max-new-tokens", "3", "--sites", "layer", "--quiet", "--cache", str(cache), "--name", name]


def _after_completion(port: int, writer_run: str) -> str | None:
    """Once the writer is done: the run list (no restart) shows its run complete and it draws in full."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    table = session(random.Random(0), [BIG])
    ok, data = _post(conn, next(table)[1])
    row = next((r for r in json.loads(data)["response"]["runs-table"]["data"] if r["id"] == writer_run), None) \
        if ok else None
    if row is None or row["status"] != "complete":
        return f"not listed complete after completion: {row and row['status']}"
    ok, data = _post(conn, _flow_of(writer_run))
    return _writer_check(data, "complete", int(row["layers"]) + 1) if ok else f"flow failed: {data[:200]!r}"


def run_one(kind: str, args, model: Path, tag: str) -> dict:
    """One server, N clients for args.seconds, a trace writing a new run from 1/10 of the time on."""
    port = free_port()
    proc = start_server(kind, args.cache, port, args.workers, args.threads)
    try:
        _wait_ready(port, proc)
        writer_run = f"load-writer-{tag}"
        ps, peak, stop = psutil.Process(proc.pid), [0, 0], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[:] = map(max, peak, _tree_memory(ps))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample)
        sampler.start()
        nproc = min(args.client_procs, args.clients)
        per = [args.clients // nproc + (i < args.clients % nproc) for i in range(nproc)]
        q = mp.Queue()
        workers = [mp.Process(target=_clients_proc, args=(port, args.seconds, n, i + 1, writer_run, q))
                   for i, n in enumerate(per)]
        t0 = time.time()
        for w in workers:
            w.start()
        writer = None
        if args.writer:
            time.sleep(args.seconds / 10)
            writer = subprocess.Popen(writer_cmd(model, args.cache, writer_run), env=ENV,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # quiet
        recs = [r for _ in workers for r in q.get()]
        elapsed = time.time() - t0
        for w in workers:
            w.join()
        stop.set()
        sampler.join()
        done_at, after = None, None
        if writer is not None:
            if writer.wait(timeout=300) != 0:
                raise RuntimeError(f"writer trace failed: {writer.stderr.read()[-2000:]}")
            done_at = (Cache(args.cache).run_dir(writer_run) / "manifest.json").stat().st_mtime
            after = _after_completion(port, writer_run)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        import shutil

        shutil.rmtree(Cache(args.cache).run_dir(f"load-writer-{tag}"), ignore_errors=True)
    lat = np.array([x for r in recs for x in r["lat"]]) * 1000
    steady = lat[np.array([x for r in recs for x in r["at"]]) >= t0 + args.warmup]  # after the warm-up
    errors = [e for r in recs for e in r["errors"]]
    # data of the writer's run received before its manifest turned complete: a running run was read
    errors += [f"data of a running run served {(done_at or t) - t:.2f} s before it completed"
               for r in recs for t in r["running_data_at"] if done_at is None or t < done_at]
    seen = sorted(x for r in recs for x in r["writer_seen"])
    statuses = {s for _, s in seen}
    # a listing taken after the run was marked complete must show it complete (modulo 1 s of clock slack)
    stale = [t for t, s in seen if s != "complete" and done_at is not None and t > done_at + 1.0]
    return {"server": kind, "requests": len(lat), "rps": len(lat) / elapsed, "p50": np.percentile(lat, 50),
            "p95": np.percentile(lat, 95), "p99": np.percentile(lat, 99), "errors": len(errors),
            "p95_steady": np.percentile(steady, 95), "p99_steady": np.percentile(steady, 99),
            "error_examples": errors[:3], "peak_rss_gib": peak[0] / 2**30, "peak_pss_gib": peak[1] / 2**30,
            "retries": sum(r["retries"] for r in recs),
            "writer": (None if writer is None else
                       {"statuses_seen": sorted(statuses), "stale_listings": len(stale),
                        "after_completion": after or "listed complete and drawn in full"}),
            "by_kind": {k: float(np.percentile(lat[np.array([x for r in recs for x in r["kind"]]) == k], 99))
                        for k in sorted({x for r in recs for x in r["kind"]})}}


def tiny_model(folder: Path) -> Path:
    if not (folder / "config.json").exists():
        from tiny import make_byte_llama, make_byte_tokenizer

        make_byte_llama().save_pretrained(folder)
        make_byte_tokenizer().save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/entropylens-bench"))
    ap.add_argument("--prompts", type=int, default=256, help="prompts of 1000 tokens in the big run (256: 10.5 M rows)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=10.0,
                    help="seconds at the start (every worker's first reads and figures) left out of the *_steady "
                         "percentiles; the plain percentiles keep them")
    ap.add_argument("--repeats", type=int, default=1, help="rounds; each runs gunicorn then the dev server")
    ap.add_argument("--workers", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="threads per gunicorn worker (default: the app's)")
    ap.add_argument("--client-procs", type=int, default=4, help="processes the client threads are spread over")
    ap.add_argument("--servers", default="gunicorn,dev", help="of gunicorn, dev, dev-nocache; each round runs each")
    ap.add_argument("--no-writer", dest="writer", action="store_false")
    args = ap.parse_args()
    if args.clients > 256 or args.seconds > 600 or args.repeats > 10:
        sys.exit("error: at most 256 clients, 600 s and 10 repeats")
    build(args.cache, args.prompts)
    model = tiny_model(args.cache.parent / (args.cache.name + "-tiny-model"))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"cpu: {cpu} · {os.cpu_count()} cores · {args.clients} clients · {args.seconds:g} s · workers "
          f"{args.workers} x {args.threads or 'default'} threads", flush=True)
    results = []
    for rep in range(args.repeats):
        for kind in args.servers.split(","):
            r = run_one(kind, args, model, f"{kind}-{rep}-{int(time.time())}")
            results.append(r)
            w = r["writer"]
            print(f"round {rep + 1} {kind:11s} {r['rps']:7.1f} req/s  p50 {r['p50']:6.0f}  p95 {r['p95']:6.0f}  "
                  f"p99 {r['p99']:6.0f} ms  errors {r['errors']}/{r['requests']} (reconnects {r['retries']})  "
                  f"peak RSS {r['peak_rss_gib']:.2f} GiB (PSS {r['peak_pss_gib']:.2f})\n    after the first "
                  f"{args.warmup:g} s: p95 {r['p95_steady']:.0f}  p99 {r['p99_steady']:.0f} ms"
                  + (f"\n    writer run: listed as {w['statuses_seen']} during the reads, stale listings "
                     f"{w['stale_listings']}, after completion: {w['after_completion']}" if w else ""),
                  flush=True)
            print("    p99 by callback (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in r["by_kind"].items()), flush=True)
            for e in r["error_examples"]:
                print(f"    error: {e}", flush=True)
    kinds = args.servers.split(",")
    print("\nsummary (median [min, max] over rounds):")
    for kind in kinds:
        rs = [r for r in results if r["server"] == kind]
        for key in ("rps", "p50", "p95", "p99", "p95_steady", "p99_steady", "peak_rss_gib", "peak_pss_gib"):
            vals = [r[key] for r in rs]
            print(f"  {kind:11s} {key:13s} {statistics.median(vals):8.2f} [{min(vals):.2f}, {max(vals):.2f}]")
    rounds = [results[i : i + len(kinds)] for i in range(0, len(results), len(kinds))]  # kinds' order, per round
    for other in [k for k in kinds if k != "gunicorn"] if "gunicorn" in kinds else []:
        ratios = [rd[kinds.index("gunicorn")]["rps"] / rd[kinds.index(other)]["rps"] for rd in rounds]
        print(f"  throughput gunicorn / {other} per round: {', '.join(f'{x:.2f}' for x in ratios)}"
              f" (median {statistics.median(ratios):.2f})")


if __name__ == "__main__":
    main()
