"""The decode engine: entropy, top-1 and target log-prob of many lens distributions, streamed over V.

Never materialises (rows, V). For each vocabulary chunk it writes the logits (R, C) of a block of rows
with one fp32 GEMM into a preallocated buffer, finishes them in place (row scale, bias, soft-cap) and
folds them into per-row online log-sum-exp accumulators (`lse.OnlineLSE`, fp64 across chunks) with one of
three per-chunk kernels (`KERNELS`): `native` (a small C kernel built at first use, one fused read per row:
the default on CPU when a C compiler is present), `compiled` (torch.compile, one read-only pass) or `eager`
(~6 torch passes; CUDA and machines without a compiler). `kernel="auto"` picks and the Stats say which.
The buffers are sized by `block_bytes`; peak extra memory is independent of V and of the sites.

`decode_layers` stacks every site of every layer of a token block into one GEMM operand. With
`additive=True` the `layer` site costs no GEMM: raw(H^l) = raw(H^0) + Σ_{j≤l} raw(A^j) + raw(F^j).

Precision: rows whose fp32 entropy could err beyond the budget are redone in fp64 (core/guard.py). No bf16
product ever reaches an exact-mode logit; on CUDA, TF32 is switched off for the duration of a decode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from entropylens.core import native
from entropylens.errors import UserError
from entropylens.core.lens import Lens, finish_logits
from entropylens.core.guard import (GUARD_NATS, GuardQueue, col_absmax, exact_rows, guard_risk, logit_scale, patch,
                                    sum_scales)
from entropylens.core.lse import OnlineLSE, Stats, refine_topk

DEFAULT_CHUNK = 2048
DEFAULT_BLOCK_BYTES = 16 << 20  # two (rows, chunk) fp32 buffers: about L3-sized
KERNELS = ("auto", "native", "compiled", "eager")


def resolve_kernel(kernel: str, compile: bool, device: torch.device, dtype: torch.dtype) -> str:
    """The per-chunk kernel a decode runs: `auto` is native on CPU fp32 where a C compiler exists, else eager.

    `compile=True` (the older flag) means `compiled`. Asking for `native` where it cannot run is an error,
    never a quiet fallback; the choice is reported in Stats.kernel (and so in manifests and the bench).
    """
    if kernel not in KERNELS:
        raise UserError(f"unknown kernel {kernel!r}; choose from {', '.join(KERNELS)}")
    if compile:
        if kernel not in ("auto", "compiled"):
            raise UserError(f"compile=True contradicts kernel={kernel!r}")
        return "compiled"
    fits = device.type == "cpu" and dtype == torch.float32
    if kernel == "auto":
        return "native" if fits and native.available() else "eager"
    if kernel == "native" and not fits:
        raise UserError(f"kernel='native' runs on CPU float32 only (got {device.type} {dtype}); use kernel='eager'")
    if kernel == "native" and not native.available():
        raise UserError("kernel='native' needs a C compiler (cc, gcc or clang on PATH, or $CC); use kernel='eager'")
    return kernel


@contextlib.contextmanager
def exact_matmul() -> Iterator[None]:
    """True fp32 GEMMs for the duration, whatever the caller chose for speed; restores the caller's settings.

    `torch.set_float32_matmul_precision("medium")` lets oneDNN round fp32 inputs to bf16 on CPUs with AMX /
    AVX512-BF16 (measured: SmolLM2-sized logits 0.30 off, against 7.8e-5 in fp32) and "high" allows TF32 on
    CUDA: both would leave every stored entropy silently inexact.
    """
    cfgs = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    prev = [c.fp32_precision for c in cfgs]
    for c in cfgs:
        c.fp32_precision = "ieee"
    try:
        yield
    finally:
        for c, p in zip(cfgs, prev):
            c.fp32_precision = p


def _check_finite(x: torch.Tensor) -> None:
    """NaN or inf activations (e.g. a float16 overflow) would give NaN entropies silently: refuse them."""
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise UserError(f"{bad} activation values are NaN or infinite; the model overflowed, try --dtype float32")


def _stream(
    X: torch.Tensor,
    W: torch.Tensor,
    lens: Lens,
    out_rows: int,
    combine: Callable[[torch.Tensor], None] | None,
    scale: torch.Tensor | None,
    targets: torch.Tensor | None,
    chunk: int,
    kernel: str = "eager",
    layers: tuple[int, int, int, int, int] | None = None,
    topk: int = 0,
) -> OnlineLSE:
    """Stream V for one block: GEMM rows X (Rg, d) into Z[:Rg], `combine` fills Z[Rg:], stats of all of Z.

    Z has `out_rows` rows; two (out_rows, chunk) buffers (one for the fused kernels) are the only
    allocations proportional to a chunk. `layers` (native kernel, no finish): the kernel makes the additive
    layer rows itself (see OnlineLSE.update) in place of `combine`.
    """
    V = W.shape[0]
    Rg = X.shape[0]
    Zbuf = torch.empty(out_rows, chunk, dtype=X.dtype, device=X.device)
    Ebuf = None if kernel != "eager" else torch.empty(out_rows, chunk, dtype=X.dtype, device=X.device)
    acc = OnlineLSE(out_rows, X.device, targets, kernel == "compiled", kernel, topk)
    for c0 in range(0, V, chunk):
        C = min(chunk, V - c0)
        Z = Zbuf[:, :C] if C == chunk else torch.empty(out_rows, C, dtype=X.dtype, device=X.device)
        torch.mm(X, W[c0 : c0 + C].to(X.dtype).T, out=Z[:Rg])  # (Rg, C); fp64 redo casts one chunk only
        if combine is not None:
            combine(Z)
        z = finish_logits(Z, lens, scale, c0)
        e = None if Ebuf is None else Ebuf[:, :C] if C == chunk else torch.empty_like(z)
        acc.update(z, c0, e, layers)
    return acc


def decode_rows(
    x: torch.Tensor,
    lens: Lens,
    targets: torch.Tensor | None = None,
    chunk: int = DEFAULT_CHUNK,
    dtype: torch.dtype = torch.float32,
    guard: float | None = GUARD_NATS,
    compile: bool = False,
    kernel: str = "auto",
    topk: int = 0,
) -> Stats:
    """Stats of lens(x) for rows x (R, d); `targets` (R,) adds log p(target); `topk` K >= 1 adds each row's
    K most probable ids and their probabilities (Stats.topk_ids / topk_p), ties broken by lowest id.

    `kernel` picks the per-chunk kernel (`resolve_kernel`; `compile=True` = "compiled"): all give the same
    results within ~1e-6 nats, see docs/performance.md. `guard` (nats): rows whose fp32 entropy could err by
    more than this are redone in fp64 (`guard_risk`); None turns the guard off.
    """
    kernel = resolve_kernel(kernel, compile, x.device, dtype)
    x = x.to(dtype)
    _check_finite(x)
    scale = lens.row_scale(x)
    scale = None if scale is None else scale.to(dtype)
    W = lens.W.to(x.device)
    with exact_matmul():
        acc = _stream(x, W, lens, x.shape[0], None, scale, targets, min(chunk, W.shape[0]), kernel, topk=topk)
    res = acc.result()
    res.kernel = kernel
    if dtype == torch.float32:
        refine_topk(res, x, lens, acc)
    if guard is not None and dtype == torch.float32:
        Z = logit_scale(x, scale, acc.best, col_absmax(W))
        rows = (guard_risk(acc, Z, x.shape[1]) > guard).nonzero().squeeze(1)
        if rows.numel():
            t = None if targets is None else targets[rows]
            ids = None if res.topk_ids is None else res.topk_ids[rows]
            patch(res, rows, exact_rows(x[rows], acc.chunk_maxima()[rows], lens, t, chunk, ids))
    return res


@dataclass
class _Rows:
    """Where each site's rows sit in the GEMM operand of a block of n tokens, in output order:
    [direct sites, L each][H^0][H^1..H^L]. The GEMM fills everything up to H^0 (all of it without the
    additive trick); with the trick the layer sums after H^0 are made from the attn and ffn rows."""

    L: int
    direct: list[str]  # sites decoded from their own vectors, in order
    want_layer: bool
    trick: bool  # raw(H^l) = raw(H^0) + Σ_{j≤l} raw(A^j) + raw(F^j): saves L GEMM rows per token

    @property
    def per_token(self) -> int:
        return self.L * len(self.direct) + (self.L + 1 if self.want_layer else 0)

    @property
    def gemm_per_token(self) -> int:
        return self.per_token - (self.L if self.trick else 0)

    @property
    def outs(self) -> list[str]:
        return self.direct + (["layer"] if self.want_layer else [])

    def offsets(self, n: int) -> tuple[int, int, int]:
        """Row offsets of A^1, F^1 and H^0 in a block of n tokens (the trick's inputs and output)."""
        return self.L * self.direct.index("attn") * n, self.L * self.direct.index("ffn") * n, self.L * len(
            self.direct) * n

    def operand(self, h0: torch.Tensor, acts: dict[str, torch.Tensor], b0: int, n: int) -> torch.Tensor:
        """Every row of tokens [b0, b0 + n), fp32, in output order: (per_token * n, d)."""
        ops = [acts[s][:, b0 : b0 + n] for s in self.direct]
        if self.want_layer:
            ops += [h0[None, b0 : b0 + n], acts["layer"][:, b0 : b0 + n]]
        return torch.cat(ops).to(torch.float32).reshape(-1, h0.shape[1])

    def split(self, res: Stats, n: int) -> dict[str, Stats]:
        """A block's Stats -> site -> (L or L + 1, n) views (the guard still patches them in place)."""
        out, k = {}, 0
        for s in self.outs:
            rows = (self.L + 1 if s == "layer" else self.L) * n
            ki, kp = (None, None) if res.topk_ids is None else (res.topk_ids[k : k + rows], res.topk_p[k : k + rows])
            out[s] = Stats(res.entropy[k : k + rows], res.top1[k : k + rows], res.p1[k : k + rows],
                           topk_ids=ki, topk_p=kp).reshape(-1, n)
            k += rows
        return out


def _layer_sums(plan: _Rows, n: int) -> Callable[[torch.Tensor], None]:
    """The trick's `combine`: raw(H^l) = raw(H^0) + Σ_{j≤l} (raw(A^j) + raw(F^j)), summed in place."""
    ia, jf, h = plan.offsets(n)
    L = plan.L

    def combine(Z: torch.Tensor) -> None:
        torch.add(Z[ia : ia + L * n], Z[jf : jf + L * n], out=Z[h + n :])
        for r in range(h + n, Z.shape[0], n):  # 5x faster than cumsum_ along dim 0
            Z[r : r + n] += Z[r - n : r]

    return combine


def _decode_block(vecs: torch.Tensor, plan: _Rows, n: int, W: torch.Tensor, lens: Lens, chunk: int,
                  kernel: str, topk: int = 0) -> tuple[OnlineLSE, torch.Tensor | None]:
    """Stream V for one block's rows; returns the accumulators and the row scale."""
    scale = lens.row_scale(vecs)
    combine, layers = None, None
    if plan.trick:
        if kernel == "native" and scale is None and lens.bias is None and not lens.softcap:
            layers = (*plan.offsets(n), n, plan.L)  # the kernel sums and folds the layer rows in one pass
        else:
            combine = _layer_sums(plan, n)
    X = vecs[: plan.gemm_per_token * n]  # the rows that need a GEMM
    return _stream(X, W, lens, plan.per_token * n, combine, scale, None, chunk, kernel, layers, topk), scale


def decode_layers(
    h0: torch.Tensor,
    acts: dict[str, torch.Tensor],
    sites: tuple[str, ...],
    lens: Lens,
    additive: bool,
    chunk: int = DEFAULT_CHUNK,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    guard: float | None = GUARD_NATS,
    compile: bool = False,
    kernel: str = "auto",
    topk: int = 0,
) -> dict[str, Stats]:
    """Decode every requested site of every layer for N token rows.

    h0: (N, d) = H^0; acts[site]: (L, N, d). Returns site -> Stats of shape (L, N), except `layer`,
    which is (L + 1, N) with H^0 at index 0. `additive` must only be set when H^l = H^{l-1}+A^l+F^l holds
    (checked by the caller with sites.additivity_error). The first site's Stats carries `redone`; every
    site's Stats carries `kernel`, the per-chunk kernel used (`kernel`/`compile` as in `decode_rows`).
    `topk` K >= 1: every Stats also carries topk_ids / topk_p of shape (..., K), made in the same stream
    (a running top-K per row; never a (rows, V) tensor).
    """
    kernel = resolve_kernel(kernel, compile, h0.device, torch.float32)
    L, N, d = acts["attn"].shape
    direct = [s for s in sites if s != "layer"]
    # The trick saves L GEMM rows only when A^l and F^l are decoded anyway; otherwise decode H^l directly.
    trick = "layer" in sites and additive and "attn" in direct and "ffn" in direct
    plan = _Rows(L, direct, "layer" in sites, trick)
    W = lens.W.to(h0.device, torch.float32).contiguous()
    colmax = None if guard is None else col_absmax(W)
    chunk = min(chunk, W.shape[0])
    n_bufs = 2 if kernel == "eager" else 1  # (rows, chunk) fp32 buffers per block: fused kernels need no scratch
    block = max(1, min(N, block_bytes // (n_bufs * plan.per_token * chunk * 4)))
    queue = GuardQueue(lens, chunk, cap=max(1, block_bytes // (8 * (chunk + d))))
    parts: dict[str, list[Stats]] = {s: [] for s in plan.outs}
    with exact_matmul():
        for b0 in range(0, N, block):
            n = min(N, b0 + block) - b0
            vecs = plan.operand(h0, acts, b0, n)  # (per_token * n, d)
            _check_finite(vecs)
            acc, scale = _decode_block(vecs, plan, n, W, lens, chunk, kernel, topk)
            res = acc.result()
            refine_topk(res, vecs, lens, acc)
            if guard is not None:
                Z = logit_scale(vecs, scale, acc.best, colmax)  # (rows,) what fp32 rounding scales with
                if trick:
                    Z = sum_scales(Z, scale, L, n, *plan.offsets(n))
                rows = (guard_risk(acc, Z, d) > guard).nonzero().squeeze(1)
                queue.add(res, rows, vecs[rows], acc.chunk_maxima()[rows])
            for s, st in plan.split(res, n).items():
                parts[s].append(st)
        queue.flush()
    result = {s: _cat(p) for s, p in parts.items()}
    next(iter(result.values())).redone = queue.redone
    for r in result.values():
        r.kernel = kernel
    return result


def _cat(parts: list[Stats]) -> Stats:
    has = parts[0].topk_ids is not None
    return Stats(
        torch.cat([p.entropy for p in parts], 1),
        torch.cat([p.top1 for p in parts], 1),
        torch.cat([p.p1 for p in parts], 1),
        topk_ids=torch.cat([p.topk_ids for p in parts], 1) if has else None,
        topk_p=torch.cat([p.topk_p for p in parts], 1) if has else None,
    )


