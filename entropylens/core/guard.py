"""The exactness guard: which rows of an fp32 decode could miss the accuracy budget, and their fp64 redo.

An fp32 GEMM logit z_i = x·w_i errs by δ_i, the rounding of the dot product's d partial sums: of order u·√d·Z
(u = 2^-24) where the partial sums reach size Z, standard deviation about u·√d·Z/3 when every product pushes the
same way. To first order the entropy moves by ΔH = −Σ_i p_i (z_i − E_p z) δ_i, whose standard deviation is at
most the per-logit one times sqrt(Σ_i p_i² (z_i − E_p z)²) ≤ `spread` (OnlineLSE.spread: from p1 and
max z − E_p z, known for free). So

    risk = GEMM_C · u · √d · Z · spread      (GEMM_C = 0.5: about a 3σ bound on |ΔH|)

with Z = max(|top logit|, s·max_k |x_k|·max_i |W_ik|) per row (`logit_scale`; for the summed `layer` rows the
root-sum-square over every partial that went into the sum, `sum_scales`). Every factor is known at the end of
the fp32 pass, in every kernel alike. Rows whose risk exceeds the guard (default GUARD_NATS) are recomputed in
fp64, over only the vocabulary chunks within `REDO_MARGIN` nats of the row's max. See
docs/performance.md#accuracy-against-fp64.
"""

from __future__ import annotations

import torch

from entropylens.core.lens import Lens, finish_logits
from entropylens.core.lse import OnlineLSE, Stats

# The exactness guard (module docstring): rows whose fp32 entropy could err by more than GUARD_NATS (half the
# 1e-4 budget, so a row the guard leaves alone breaks the budget only beyond ~6σ) are redone in fp64. The
# largest error / (u·√d·Z·spread) measured on real rows (Gemma 3 270M and SmolLM2, both lenses, every site,
# 35k rows, against an fp64 decode of the same vectors) is 0.37 and 0.46, the median 0.06: GEMM_C sits just
# above them. Checked end to end on real Gemma 3 270M by analyses/gemma_fp64.py (docs/performance.md).
GUARD_NATS = 5e-5
GEMM_C = 0.5
U32 = 2.0**-24  # fp32 unit roundoff
# The exactness guard recomputes a row's chunks in fp64 only where the chunk max is within this of the row's.
REDO_MARGIN = 50.0


def col_absmax(W: torch.Tensor) -> torch.Tensor:
    """max_i |W_ik| per column k (d,), without a (V, d) temporary."""
    return torch.maximum(W.amax(0), W.amin(0).neg()).double()


def logit_scale(x: torch.Tensor, scale: torch.Tensor | None, best: torch.Tensor, colmax: torch.Tensor) -> torch.Tensor:
    """Z per row (R,), in final-logit units: the size the fp32 dot products' partial sums reach.

    The top logit |z| where the products add up (the rows that matter: the largest logits carry the
    probability); s·max_k |x_k|·max_i |W_ik|, the largest single product, where they cancel.
    """
    T = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for r0 in range(0, x.shape[0], 4096):  # (r, d) temporaries only
        T[r0 : r0 + 4096] = (x[r0 : r0 + 4096].abs().double() * colmax).amax(1)
    if scale is not None:
        T = T * scale.double()
    return torch.maximum(best.abs(), T)


def guard_risk(acc: OnlineLSE, Z: torch.Tensor, d: int) -> torch.Tensor:
    """Per row, a ~3σ bound on its fp32 entropy's error (nats, module docstring): GEMM_C·u·√d·Z·spread."""
    return (GEMM_C * U32 * d**0.5) * Z * acc.spread()


def exact_rows(x: torch.Tensor, chunk_max: torch.Tensor, lens: Lens, targets, chunk: int,
                topk_ids: torch.Tensor | None = None) -> Stats:
    """fp64 Stats of rows x (k, d) (the exactness guard), computed over only the chunks that matter.

    chunk_max (k, n_chunks) holds the fp32 pass's chunk maxima (off by far less than a nat). A chunk whose
    maximum lies more than REDO_MARGIN below the row's best holds logits with p < e^-50 each: with V <= 1e6
    they move H by < 1e-13 nats, so only the other chunks (and the target's) are recomputed in fp64 —
    for SmolLM2's massive-activation rows about 3 of the 24. With `topk_ids` (k, K), the fp32 pass's top-K,
    their chunks are redone too, so the top-K is re-ranked on fp64 logits (an id the fp32 pass ranked just
    below the K-th, in a chunk more than REDO_MARGIN below the max, has p < e^-50 and is not looked for).
    """
    need = chunk_max > chunk_max.max(1, keepdim=True).values - REDO_MARGIN  # (k, n_chunks)
    if targets is not None:  # log p(target) needs the target's own logit, exactly
        has = (targets >= 0).nonzero().squeeze(1)
        need[has, targets[has] // chunk] = True
    if topk_ids is not None:
        need[torch.arange(len(need), device=need.device)[:, None], topk_ids.clamp_min(0) // chunk] = True
    K = 0 if topk_ids is None else topk_ids.shape[1]
    x = x.double()
    scale = lens.row_scale(x)
    scale = None if scale is None else scale.double()
    W = lens.W.to(x.device)
    V, k = W.shape[0], x.shape[0]
    acc = OnlineLSE(k, x.device, targets, topk=K)
    for j in need.any(0).nonzero().squeeze(1).tolist():
        c0 = j * chunk
        C = min(chunk, V - c0)
        r = need[:, j].nonzero().squeeze(1)  # only these rows' statistics see this chunk (SmolLM2: ~1 in 9)
        Z = finish_logits(x[r] @ W[c0 : c0 + C].double().T, lens, None if scale is None else scale[r], c0)  # (r, C)
        part = OnlineLSE(len(r), x.device, None if targets is None else targets[r], topk=K)
        part.update(Z, c0, torch.empty_like(Z))
        acc.merge_rows(r, part)
    return acc.result()


def patch(res: Stats, rows: torch.Tensor, exact: Stats, k0: int = 0) -> None:
    """Overwrite `rows` of res, in place, with exact's rows k0, k0 + 1, ..."""
    k = slice(k0, k0 + rows.numel())
    res.entropy[rows], res.top1[rows], res.p1[rows] = exact.entropy[k], exact.top1[k], exact.p1[k]
    if res.topk_ids is not None:
        res.topk_ids[rows], res.topk_p[rows] = exact.topk_ids[k], exact.topk_p[k]
    if res.logp_target is not None:
        res.logp_target[rows] = exact.logp_target[k]
    res.redone += rows.numel()


class GuardQueue:
    """Rows for the exactness guard, redone together across blocks (fewer, larger fp64 GEMMs), at most
    `cap` at a time so the fp64 buffers stay within the block budget."""

    def __init__(self, lens: Lens, chunk: int, cap: int):
        self.lens, self.chunk, self.cap = lens, chunk, cap
        self.pending: list[tuple[Stats, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # res, rows, x, maxima
        self.redone = 0

    def add(self, res: Stats, rows: torch.Tensor, x: torch.Tensor, chunk_max: torch.Tensor) -> None:
        if rows.numel():
            self.pending.append((res, rows, x, chunk_max))
            self.redone += rows.numel()
            if sum(p[1].numel() for p in self.pending) >= self.cap:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        cat = lambda i: torch.cat([p[i] for p in self.pending])  # noqa: E731
        ids = None if self.pending[0][0].topk_ids is None else torch.cat(
            [res.topk_ids[rows] for res, rows, _, _ in self.pending])
        exact = exact_rows(cat(2), cat(3), self.lens, None, self.chunk, ids)
        k0 = 0
        for res, rows, _, _ in self.pending:
            patch(res, rows, exact, k0)
            k0 += rows.numel()
        self.pending.clear()


def sum_scales(Z: torch.Tensor, scale: torch.Tensor | None, L: int, n: int, ia: int, jf: int, h: int):
    """Z of the summed `layer` rows: raw(H^l) = raw(H^0) + Σ_{j≤l} raw(A^j) + raw(F^j) carries the GEMM rounding of
    every partial, independent of one another, and of each running sum: the root-sum-square of their Z (raw
    units, then scaled like H^l's logits). A massive F^j (|z| ~ 2e4 in SmolLM2) so leaves its rounding in every
    later H^l, even where H^l's own logits are small.
    """
    raw = Z if scale is None else Z / scale.double()
    layer = raw[h:].view(L + 1, n).square()
    branch = (raw[ia : ia + L * n].square() + raw[jf : jf + L * n].square()).view(L, n)
    rss = torch.cat([layer[:1], layer[1:] + branch]).cumsum(0).sqrt()  # (L + 1, n)
    out = Z.clone()
    out[h:] = rss.reshape(-1) * (1.0 if scale is None else scale[h:].double())
    return out
