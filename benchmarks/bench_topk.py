"""Paired rounds of the default decode path with top-5 and with top-1 lists, in one process, the order
alternating: the rate ratio by wall time and by process CPU time (less sensitive to other load), each a
geometric mean with a 95 % interval over rounds. One random layer, all five sites (docs/performance.md).

    .venv/bin/python benchmarks/bench_topk.py V D TOKENS ROUNDS      # e.g. 262144 640 256 8 (Gemma's V)
"""
import statistics
import sys
import time

import torch

from entropylens.tracing.bench import machine
from entropylens.core.lens import Lens
from entropylens.core.decode import decode_layers
from entropylens.analysis.intervals import ratio_ci95
V, d, N, R = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
g = torch.Generator().manual_seed(0)
W = torch.randn(V, d, generator=g) / d**0.5
lens = Lens("bupo", W - W.mean(0, keepdim=True), None, None, None)
h0 = torch.randn(N, d, generator=g)
acts = {s: torch.randn(1, N, d, generator=g) for s in ("attn_in", "attn", "ffn_in", "ffn")}
acts["layer"] = h0[None] + acts["attn"] + acts["ffn"]
sites = ("attn_in", "attn", "ffn_in", "ffn", "layer")
print(machine(), f"V {V} d {d} tokens {N} rounds {R}")
decode_layers(h0[:8], {s: a[:, :8] for s, a in acts.items()}, sites, lens, True, topk=5)
wall, cpu = [], []
for r in range(R):
    t = {}
    for K in ((5, 1) if r % 2 else (1, 5)):
        w0, c0 = time.perf_counter(), time.process_time()
        decode_layers(h0, acts, sites, lens, True, topk=K)
        t[K] = (time.perf_counter() - w0, time.process_time() - c0)
    wall.append(t[1][0] / t[5][0])
    cpu.append(t[1][1] / t[5][1])
    print(r, t, flush=True)
print("rate(top5)/rate(top1) wall", ratio_ci95(wall), "median", statistics.median(wall))
print("rate(top5)/rate(top1) cpu ", ratio_ci95(cpu), "median", statistics.median(cpu))
