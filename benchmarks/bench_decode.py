"""Decode engine vs the TransformerLens and nnsight recipes vs the fp32 GEMM floor, in one process.

    .venv/bin/python benchmarks/bench_decode.py                                  # SmolLM2, 4 x 128 tokens
    .venv/bin/python benchmarks/bench_decode.py --batch 1 --seq 32               # quick look
    .venv/bin/python benchmarks/bench_decode.py --vocab 151936 --d-model 1024 --sites layer   # memory

See docs/performance.md for measured figures and how to read them.
"""

from __future__ import annotations

import argparse
import json

import pandas as pd

from entropylens.tracing.bench import METHODS, BenchConfig, run_bench
from entropylens.model.layout import SITES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--sites", default=",".join(SITES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--d-model", type=int)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--repeats", type=int, default=1, help="round-robin rounds: fastest run per method, ratios "
                    "paired per round with a 95 %% interval")
    a = ap.parse_args()
    cfg = BenchConfig(model=a.model, batch=a.batch, seq=a.seq, sites=tuple(a.sites.split(",")),
                      methods=tuple(a.methods.split(",")), vocab=a.vocab, d_model=a.d_model,
                      tokens=a.tokens, threads=a.threads, repeats=a.repeats)
    df = run_bench(cfg)
    print(" · ".join(f"{k} {v}" for k, v in df.attrs["machine"].items()))
    with pd.option_context("display.width", 200, "display.float_format", "{:.4g}".format):
        print(df.to_string(index=False))
    print(json.dumps(df.attrs))


if __name__ == "__main__":
    main()
