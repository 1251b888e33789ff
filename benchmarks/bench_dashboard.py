"""Dashboard latency on a big synthetic run (>= 10 million entropy rows).

Prints the time to first figure (a fresh app: page layout + the entropy-flow callback, cold
caches) and the latency of each callback, measured both by calling the figure builders
directly and through the Dash app's HTTP callback endpoint (Flask test client: JSON
encoding included, no browser rendering). Targets: first figure < 1.5 s, a callback < 300 ms.

    python benchmarks/bench_dashboard.py [--cache /tmp/entropylens-bench] [--prompts 256]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import sys

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic runs are test data

from entropylens.store.cache import Cache
from entropylens.app.server import create_app  # noqa: E402
from entropylens.app.views.flows import build_compare, build_dh, build_flow  # noqa: E402
from entropylens.app.views.tokens import build_heatmap, cell_detail  # noqa: E402
from synthetic import SyntheticRun, write_run  # noqa: E402

BIG = "bench-llama-40L"
SMALL = "bench-qwen3-28L"


def build(cache: Path, prompts: int) -> None:
    """Write the big run (40 layers x prompts x 1000 tokens) and a smaller one to compare with."""
    if not (Cache(cache).run_dir(BIG) / "manifest.json").exists():
        t = time.perf_counter()
        write_run(cache, SyntheticRun(BIG, family="llama", n_layers=40, n_prompts=prompts, prompt_len=200,
                                      response_len=800, vocab_size=49152, chunk_prompts=8,
                                      created="2026-01-02T00:00:00+00:00"))
        print(f"wrote {BIG} in {time.perf_counter() - t:.1f} s")
    if not (Cache(cache).run_dir(SMALL) / "manifest.json").exists():
        write_run(cache, SyntheticRun(SMALL, family="qwen3", n_layers=28, n_prompts=16, prompt_len=100,
                                      response_len=300, vocab_size=151936, created="2026-01-01T00:00:00+00:00"))


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    """Median wall time in ms over `repeat` calls, and the last result."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times), out


def post(client, output: str, inputs: list[tuple[str, str, object]], state=()) -> dict:
    body = {"output": output, "outputs": {"id": output.split(".")[0], "property": output.split(".")[1]},
            "inputs": [{"id": i, "property": p, "value": v} for i, p, v in inputs],
            "state": [{"id": i, "property": p, "value": v} for i, p, v in state], "changedPropIds": []}
    r = client.post("/_dash-update-component", json=body)
    assert r.status_code == 200, r.data[:300]
    return r.get_json()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path("/tmp/entropylens-bench"))
    ap.add_argument("--prompts", type=int, default=256, help="prompts of 1000 tokens in the big run")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    build(args.cache, args.prompts)
    rows = pq.read_metadata(Cache(args.cache).run_dir(BIG) / "entropy.parquet").num_rows
    print(f"{BIG}: {rows:,} entropy rows")
    flow_in = [("focus-run", "value", BIG), ("flow-lens", "value", "bupo"), ("flow-role", "value", "response"),
               ("flow-spread", "value", "std"), ("flow-sites", "value", ["layer", "attn", "ffn"])]

    # Time to first figure: fresh app object, page layout (lists runs), then the flow callback; cold caches.
    t = time.perf_counter()
    client = create_app(args.cache).server.test_client()
    assert client.get("/_dash-layout").status_code == 200
    fig = post(client, "flow-graph.figure", flow_in)
    first = (time.perf_counter() - t) * 1000
    assert fig["response"]["flow-graph"]["figure"]["data"], "flow figure is empty"
    print(f"time to first figure (app + layout + flow callback, cold): {first:.0f} ms   target < 1500 ms")

    c, r = args.cache, args.repeat
    direct = {
        "flow (summary)": lambda: build_flow(c, BIG, "bupo", "all", "iqr", ["layer", "attn", "ffn"]),
        "entropy change": lambda: build_dh(c, BIG, "bupo", "response", 0.05),
        "compare 2 runs": lambda: build_compare(c, [BIG, SMALL], "H_layer", "response", ["bupo"], True),
        "heatmap 1 prompt (41 x 1000)": lambda: build_heatmap(c, BIG, "bupo", 137, "ffn", "H"),
        "heatmap, another prompt, dH": lambda: build_heatmap(c, BIG, "bupo", 201, "attn", "dH"),
        "cell click (top-1 per site)": lambda: cell_detail(c, BIG, "bupo", 77, 512, 20),
    }
    print(f"\ncallback latency, median of {r} (direct call to the builder):")
    for name, fn in direct.items():
        cold, _ = timed(fn)
        warm, _ = timed(fn, r)
        print(f"  {name:32s} first {cold:7.1f} ms   then {warm:7.1f} ms")

    heat_in = [("focus-run", "value", BIG), ("tokens-lens", "value", "bupo"), ("tokens-prompt", "value", 99),
               ("tokens-site", "value", "layer"), ("tokens-quantity", "value", "H")]
    click = {"points": [{"x": "300: tok", "y": 12}]}
    via_app = {
        "flow": lambda: post(client, "flow-graph.figure", flow_in),
        "heatmap": lambda: post(client, "heatmap-graph.figure", heat_in),
        "cell click": lambda: post(client, "cell-detail.children", [("heatmap-graph", "clickData", click)],
                                   [("focus-run", "value", BIG), ("tokens-lens", "value", "bupo"),
                                    ("tokens-prompt", "value", 99)]),
    }
    print(f"\ncallback latency, median of {r} (through the app's HTTP endpoint, JSON included):")
    for name, fn in via_app.items():
        ms, _ = timed(fn, r)
        print(f"  {name:32s} {ms:7.1f} ms   target < 300 ms")


if __name__ == "__main__":
    main()
