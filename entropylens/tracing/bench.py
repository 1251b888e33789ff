"""Side-by-side benchmark: the hand-written TransformerLens and nnsight recipes vs entropylens vs the GEMM floor.

Everything runs in ONE process on the same model and token batch, so the ratios are meaningful even on a
shared machine (absolute tokens/s are not). With `repeats` = n > 1 the methods run round-robin n times:
seconds, tokens/s and GFLOP/s are each method's fastest run, while the two ratios — × the faster recipe and
the fraction of the floor's FLOP rate — are taken within each round and reported as the geometric mean over
rounds with a 95 % t-interval (columns `*_lo`, `*_hi`; NaN for n = 1). Also: max |ΔH| against an fp64
reference on a sample of rows, and peak extra RSS (sampled every 2 ms above the RSS at the method's start;
freed heap is returned to the OS with malloc_trim before each method so one method's garbage does not hide
another's peak).

The recipe (what a researcher writes today) per hook point: logits = lm_head(act) (B, T, V) in fp32,
log_softmax, then -Σ p log p — the `bupo` lens. `entropylens-compiled` is decode_layers(compile=True); its
one-off torch.compile time is measured before the timed runs and reported as attrs["compile_s"].
`entropylens` is the default path (`kernel="auto"`: the native C kernel where a compiler exists, else eager;
column `kernel` says which, attrs["native_build_s"] its first-use build); `entropylens-eager` forces eager.
attrs["machine"] names the CPU, its vector ISA, torch's dispatch level, threads and torch build.
The command's last line names the ceiling: the floor's ratio to the faster recipe, which no exact fp32
path that multiplies the same rows can pass (where the recipes themselves run near the floor's FLOP
rate, as under AVX2, a ×N target above it is out of reach).
`--vocab/--d-model` replaces the model with a random head and random activations (one layer) to show
memory behaviour at Qwen3 scale; the recipe then runs on the same activations without a tracer.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import torch

from entropylens.core import native
from entropylens.core.decode import DEFAULT_BLOCK_BYTES, DEFAULT_CHUNK, decode_layers, resolve_kernel
from entropylens.analysis.intervals import ratio_ci95
from entropylens.core.lens import Lens, make_lens
from entropylens.tracing.config import METHODS, TOP1, BenchConfig  # noqa: F401  (BenchConfig: the bench's config)
from entropylens.model.layout import SITES, additivity_error, find_layout

OURS = ("entropylens", "entropylens-eager", "entropylens-compiled", TOP1, "floor")  # entropylens's GEMM rows
KERNEL_OF = {"entropylens": "auto", "entropylens-eager": "eager", "entropylens-compiled": "compiled", TOP1: "auto"}


def machine() -> dict[str, str]:
    """What the figures were measured on: CPU model, vector ISA of the chip and of torch's kernels, threads, build.

    `isa` is what the CPU offers (/proc/cpuinfo flags); `torch_isa` what torch dispatches to, which
    ATEN_CPU_CAPABILITY can narrow (MKL_ENABLE_INSTRUCTIONS narrows MKL's GEMM alike; both are shown).
    """
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = val.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(val.split())
    except OSError:  # not Linux: the ISA is what torch reports
        pass
    isa = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE/other") if flags else "?"
    if "amx_tile" in flags:
        isa += " + AMX"
    narrowed = ", ".join(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
                         if os.environ.get(k))
    blas = "MKL" if torch.backends.mkl.is_available() else "no MKL"
    return dict(cpu=model, isa=isa, torch_isa=torch.backends.cpu.get_cpu_capability() + (f" ({narrowed})"
                if narrowed else ""), threads=str(torch.get_num_threads()),
                torch=f"{torch.__version__} ({blas}, {'CUDA' if torch.cuda.is_available() else 'CPU'})")


class PeakRSS:
    """Context manager: peak RSS above the RSS at entry, sampled by a thread every 2 ms."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:  # not glibc: peaks may read low if freed memory was kept by the allocator
            pass
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self.done.wait(0.002):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def extra_gib(self) -> float:
        return (self.peak - self.base) / 2**30


def _recipe_entropy(head_w: torch.Tensor, head_b: torch.Tensor | None, act: torch.Tensor) -> torch.Tensor:
    """The hand-written recipe for one hook point: (..., d) -> (...) entropies via full (..., V) logits."""
    logits = torch.nn.functional.linear(act.float(), head_w, head_b)  # (..., V)
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _stacked(h0: torch.Tensor, per_site: dict[str, list[torch.Tensor]], sites) -> dict[str, torch.Tensor]:
    """Per-site (L, N) or (L + 1, N) entropies from lists of per-layer (N,) results."""
    out = {s: torch.stack(per_site[s]) for s in sites if s != "layer"}
    if "layer" in sites:
        out["layer"] = torch.stack([h0] + per_site["layer"])
    return out


def _max_err(H: dict[str, torch.Tensor], ref: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
    """max |H - H_fp64| over the sampled (layer, token) rows of every site."""
    return max((H[s].double()[idx] - r).abs().max().item() for s, (idx, r) in ref.items())


def _reference(lens: Lens, h0, acts, sites, rows: int, gen: torch.Generator) -> dict:
    """fp64 full-softmax entropies on `rows` random (layer, token) pairs per site."""
    ref = {}
    for s in sites:
        x = torch.cat([h0[None], acts["layer"]]) if s == "layer" else acts[s]  # (L', N, d)
        flat = torch.randperm(x.shape[0] * x.shape[1], generator=gen)[:rows]
        idx = (flat // x.shape[1], flat % x.shape[1])
        lp = torch.log_softmax(lens.logits(x[idx].double()), -1)
        ref[s] = (idx, -(lp.exp() * lp).sum(-1))
    return ref


def _model_methods(cfg: BenchConfig):
    """Load the model and token batch; return (lens, n_tokens, L, d, V, reference, {method: callable -> H})."""
    from entropylens.model.backends import make_backend
    from entropylens.model.load import load_model

    lm = load_model(cfg.model, cache=cfg.cache)
    model, tok = lm.model, lm.tokenizer
    layout = find_layout(model)
    gen = torch.Generator().manual_seed(cfg.seed)
    ids = torch.randint(0, lm.info.vocab_size, (cfg.batch, cfg.seq), generator=gen)
    lens = make_lens("bupo", model, layout.final_norm(model))
    head = model.get_output_embeddings()
    hw, hb = head.weight.float(), None if head.bias is None else head.bias.float()
    sites = cfg.sites
    nns = make_backend("nnsight", model, tok, layout)
    acts0 = nns.capture(ids)
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731  (B, T, d) -> (N, d)
    h0 = flat(acts0.h0)
    stacked = {s: torch.stack([flat(a) for a in acts0.sites[s]]) for s in SITES}
    additive = additivity_error(acts0) < 1e-5
    ref = _reference(lens, h0, stacked, sites, cfg.ref_rows, gen)
    L = layout.n_layers

    def recipe_from(h0_act, per_layer: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        res = {s: [_recipe_entropy(hw, hb, a).reshape(-1) for a in per_layer[s]] for s in sites}
        return _stacked(_recipe_entropy(hw, hb, h0_act).reshape(-1), res, sites)

    def run_tl():
        cache = tl.bridge.run_with_cache(ids, names_filter=lambda n: n in tl_names)[1]
        per = {s: [cache[h.format(l=i)] for i in range(L)] for s, h in tl.HOOKS.items()}
        return recipe_from(cache["blocks.0.hook_resid_pre"], per)

    def run_nnsight():
        a = nns.capture(ids)  # the same .save() trace a researcher writes
        return recipe_from(a.h0, a.sites)

    def run_entropylens(kernel: str, topk: int):
        a = nns.capture(ids)
        acts = {s: torch.stack([flat(x) for x in a.sites[s]]) for s in SITES}
        res = decode_layers(flat(a.h0), acts, sites, lens, additive, kernel=kernel, topk=topk)
        return {s: r.entropy for s, r in res.items()}

    methods = {"nnsight": run_nnsight}
    methods |= {m: (lambda k=k, K=_topk_of(m, cfg): run_entropylens(k, K)) for m, k in KERNEL_OF.items()}
    if "transformer-lens" in cfg.methods:
        tl = make_backend("transformer-lens", model, tok, layout)
        tl_names = set(tl._hook_names())
        methods["transformer-lens"] = run_tl
    return lens, h0, stacked, additive, ref, methods


def _random_methods(cfg: BenchConfig):
    """Random head (V, d) and one layer of random activations with a few massive rows; no tracer."""
    gen = torch.Generator().manual_seed(cfg.seed)
    V, d, N = cfg.vocab, cfg.d_model, cfg.tokens
    W = torch.randn(V, d, generator=gen) / d**0.5
    lens = Lens("bupo", W - W.mean(0, keepdim=True), None, None, None)
    h0 = torch.randn(N, d, generator=gen)
    stacked = {s: torch.randn(1, N, d, generator=gen) for s in ("attn_in", "attn", "ffn_in", "ffn")}
    stacked["layer"] = h0[None] + stacked["attn"] + stacked["ffn"]
    ref = _reference(lens, h0, stacked, cfg.sites, cfg.ref_rows, gen)

    def run_recipe():
        per = {s: [_recipe_entropy(W, None, stacked[s][0])] for s in cfg.sites}
        return _stacked(_recipe_entropy(W, None, h0), per, cfg.sites)

    def run_entropylens(kernel: str, topk: int):
        res = decode_layers(h0, stacked, cfg.sites, lens, True, kernel=kernel, topk=topk)
        return {s: r.entropy for s, r in res.items()}

    return lens, h0, stacked, True, ref, {"recipe": run_recipe} | {
        m: (lambda k=k, K=_topk_of(m, cfg): run_entropylens(k, K)) for m, k in KERNEL_OF.items()}


def _topk_of(method: str, cfg: BenchConfig) -> int:
    return 1 if method == TOP1 else cfg.topk


def _gemm_rows(sites, L: int, additive: bool) -> tuple[int, int]:
    """(rows per token the recipe multiplies, rows per token entropylens multiplies)."""
    n_direct = len([s for s in sites if s != "layer"])
    recipe = L * n_direct + (L + 1 if "layer" in sites else 0)
    trick = additive and "layer" in sites and {"attn", "ffn"} <= set(sites)
    return recipe, recipe - (L if trick else 0)


def _paired_ratios(rounds: dict[str, list[tuple[float, float]]], order: list[str]) -> dict[str, dict]:
    """× faster recipe and fraction of the floor's FLOP rate, per method: each round's ratio is taken within
    the round (against that round's faster recipe and floor), then their geometric mean and 95 % t-interval
    over rounds (`intervals.ratio_ci95`), so a shared machine's drift between rounds cancels."""
    n = len(rounds[order[0]])
    recipes = [m for m in order if m not in OURS]
    secs = lambda q, r: rounds[q][r][0]  # noqa: E731  seconds of method q in round r
    rate = lambda q, r: rounds[q][r][1] / rounds[q][r][0]  # noqa: E731  its GEMM FLOP/s
    nan = {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": n}
    out: dict[str, dict] = {"x_faster_recipe": {}, "frac_floor_flops": {}}
    for m in order:
        out["x_faster_recipe"][m] = ratio_ci95([min(secs(q, r) for q in recipes) / secs(m, r)
                                                for r in range(n)]) if recipes else nan
        out["frac_floor_flops"][m] = ratio_ci95([rate(m, r) / rate("floor", r)
                                                 for r in range(n)]) if "floor" in rounds else nan
    return out


def run_bench(cfg: BenchConfig) -> pd.DataFrame:
    """Run every method once (after one warm-up of the decode path) and return one row per method."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random_head = cfg.vocab is not None
    setup = _random_methods if random_head else _model_methods
    with torch.no_grad():
        lens, h0, stacked, additive, ref, methods = setup(cfg)
        N, (V, d) = h0.shape[0], lens.W.shape
        L = stacked["attn"].shape[0]
        recipe_rows, our_rows = _gemm_rows(cfg.sites, L, additive)
        order = [m for m in cfg.methods if m in methods or m == "floor"]
        if cfg.topk > 1 and "entropylens" in order:  # the K = 1 default path, right after the K one
            order.insert(order.index("entropylens") + 1, TOP1)
        if random_head:  # one recipe (no tracer) in place of the two traced ones
            order = ["recipe"] + [m for m in order if m in OURS]
        X = torch.randn(our_rows * N, d)  # the floor's operand: the rows entropylens multiplies
        W = lens.W.contiguous()
        rows = our_rows * max(1, DEFAULT_BLOCK_BYTES // (recipe_rows * DEFAULT_CHUNK * 4))  # compiled block

        def floor():
            """The same GEMM FLOPs in the engine's (block rows, chunk) shape, with no softmax at all.

            (One wide sweep, all rows x 4096 ids per GEMM, measured the same within the machine's noise.)
            """
            Z = torch.empty(rows, DEFAULT_CHUNK)
            for r0 in range(0, X.shape[0], rows):
                x = X[r0 : r0 + rows]
                for c0 in range(0, V, DEFAULT_CHUNK):
                    w = W[c0 : c0 + DEFAULT_CHUNK]
                    torch.mm(x, w.T, out=Z[: len(x), : len(w)] if len(w) == DEFAULT_CHUNK else None)
            return None

        small = ({s: a[:, :8] for s, a in stacked.items()}, cfg.sites, lens, additive)
        default = resolve_kernel("auto", False, h0.device, torch.float32)
        t0 = time.perf_counter()
        if default == "native":
            native.load()  # the first-use build (milliseconds once the per-user cache holds it)
        build_s = time.perf_counter() - t0
        decode_layers(h0[:8], *small, kernel="eager")  # warm-up
        decode_layers(h0[:8], *small)
        t0 = time.perf_counter()
        if "entropylens-compiled" in order:
            decode_layers(h0[:8], *small, compile=True)  # the one-off compile (warm if inductor's cache is)
        compile_s = time.perf_counter() - t0
        best: dict[str, dict] = {}
        rounds: dict[str, list[tuple[float, float]]] = {}  # method -> (seconds, GEMM FLOPs) per round
        for _ in range(cfg.repeats):
            for name in order:
                fn = floor if name == "floor" else methods[name]
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    H = fn()
                    dt = time.perf_counter() - t0
                flops = 2 * d * V * (our_rows if name in OURS else recipe_rows) * N
                rounds.setdefault(name, []).append((dt, flops))
                kern = KERNEL_OF.get(name, "")
                row = dict(
                    method=name, kernel=f"{default} (default)" if kern == "auto" else kern, seconds=dt,
                    tokens_per_s=N / dt, gflops=flops / dt / 1e9,
                    max_abs_dH=None if H is None else _max_err(H, ref), peak_extra_gib=mem.extra_gib,
                )
                prev = best.get(name)
                if prev is not None:  # keep the fastest run, with the largest peak seen
                    peak = max(prev["peak_extra_gib"], row["peak_extra_gib"])
                    row = {**(row if dt < prev["seconds"] else prev), "peak_extra_gib": peak}
                best[name] = row
    df = pd.DataFrame([best[m] for m in order])
    if TOP1 in rounds:  # rate with top-K over rate with top-1, paired per round
        df.attrs["topk_rate_ratio"] = ratio_ci95([rounds[TOP1][r][0] / rounds["entropylens"][r][0]
                                                  for r in range(cfg.repeats)])
    for col, per_method in _paired_ratios(rounds, order).items():
        for k, suffix in (("mean", ""), ("lo", "_lo"), ("hi", "_hi")):
            df[col + suffix] = [per_method[m][k] for m in order]
    df.attrs.update(tokens=N, d_model=d, vocab=V, layers=L, sites=",".join(cfg.sites), additive=additive,
                    recipe_rows_per_token=recipe_rows, entropylens_rows_per_token=our_rows,
                    threads=torch.get_num_threads(), rounds=cfg.repeats, topk=cfg.topk, compile_s=round(compile_s, 1),
                    default_kernel=default, native_build_s=round(build_s, 2), machine=machine())
    return df
