"""Online log-sum-exp accumulators: entropy, top-1 and log p(target) of rows streamed over vocabulary chunks.

Per row, kept in fp64 across chunks (docs/definitions.md#computation):

    m = running max,  s = Σ e^{z-m},  t = Σ (z-m) e^{z-m}    ->    H = log s − t / s

(t is centred on m so the subtraction never cancels two ~100-nat numbers). A chunk's sums centred on some
c fold in as s ← αs + βs_c, t ← α(t + (m − m')s) + β(t_c + (c − m')s_c), with α = e^{m−m'}, β = e^{c−m'}.
The eager update makes ~6 passes over a chunk; the compiled one (`_chunk_sums` through torch.compile) one
pass; the native one (`entropylens.core.native`, the default on CPU) one fused read per row, top-1 included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from entropylens.core import native
from entropylens.errors import UserError

# A -inf bias entry (a masked token) enters as this: e^{z-m} is exactly 0 and (z-m)·e^{z-m} stays 0, where
# -inf would give -inf·0 = NaN. Its log-prob reads as about -1e30.
MASKED = -1e30
# The fused pass centres a chunk on the running max m; a row whose chunk max exceeds m by more than this
# (e^u would approach fp32's overflow at u = 88) is recentred on its own max and summed again.
RECENTRE = 60.0
# The eager update clamps u = z - m' at this before e^u: x86 exp is 6-10x slower where e^u underflows (u < -87),
# and raw-residual lens rows put most of V there. A clamped entry adds at most e^-80 to s and 80 e^-80 to t:
# over V <= 1e6 ids, < 1e-27 nats.
FLOOR = -80.0


@dataclass
class Stats:
    """Per-row results; every tensor has the same leading shape."""

    entropy: torch.Tensor  # float64, nats
    top1: torch.Tensor  # int64 token id
    p1: torch.Tensor  # float64 probability of top1
    logp_target: torch.Tensor | None = None  # float64 log p(target)
    redone: int = 0  # rows recomputed in fp64 by the exactness guard
    kernel: str = ""  # the per-chunk kernel that produced them (decode.KERNELS), for manifests and benches
    topk_ids: torch.Tensor | None = None  # (..., K) int64: the K most probable ids, best first (ties: lowest id)
    topk_p: torch.Tensor | None = None  # (..., K) float64: their probabilities

    def reshape(self, *shape: int) -> Stats:
        lt = None if self.logp_target is None else self.logp_target.reshape(*shape)
        ki, kp = (None, None) if self.topk_ids is None else (self.topk_ids.reshape(*shape, self.topk_ids.shape[-1]),
                                                            self.topk_p.reshape(*shape, self.topk_p.shape[-1]))
        return Stats(self.entropy.reshape(*shape), self.top1.reshape(*shape), self.p1.reshape(*shape), lt,
                     topk_ids=ki, topk_p=kp)

    def to_cpu(self) -> Stats:
        lt = None if self.logp_target is None else self.logp_target.cpu()
        ki, kp = (None, None) if self.topk_ids is None else (self.topk_ids.cpu(), self.topk_p.cpu())
        return Stats(self.entropy.cpu(), self.top1.cpu(), self.p1.cpu(), lt, self.redone, topk_ids=ki, topk_p=kp)


class OnlineLSE:
    """Accumulators for R rows; `update` takes one finished logit chunk (R, C) and overwrites it."""

    def __init__(self, rows: int, device: torch.device, targets: torch.Tensor | None = None, fused=False,
                 kernel: str = "eager", topk: int = 0):
        self.fused = fused  # use the torch.compile'd chunk kernel (`compile=True`)
        self.native = kernel == "native"  # the C kernel: fp32 CPU chunks only (decode.resolve_kernel checks)
        f64 = dict(dtype=torch.float64, device=device)
        self.m = torch.full((rows,), -math.inf, **f64)
        self.s = torch.zeros(rows, **f64)
        self.t = torch.zeros(rows, **f64)
        self.best = torch.full((rows,), -math.inf, **f64)
        self.top1 = torch.zeros(rows, dtype=torch.long, device=device)
        self.targets = targets  # (R,) long, -1 = none
        self.z_target = None if targets is None else torch.full((rows,), math.nan, **f64)
        self.chunk_max: list[torch.Tensor] = []  # per chunk (R,) fp64: lets the guard redo only what matters
        # topk >= 2: each row's K largest final logits (fp64 copies of the chunk's values) and their ids, best
        # first, equal values in id order; K = 1 is top1/best itself (no extra work)
        self.topk = topk
        self.kv = torch.full((rows, topk), -math.inf, **f64) if topk > 1 else None
        self.ki = torch.full((rows, topk), -1, dtype=torch.long, device=device) if topk > 1 else None

    def update(self, z: torch.Tensor, offset: int, e: torch.Tensor | None, layers: tuple | None = None) -> None:
        # z: (R, C) final logits of vocabulary ids [offset, offset + C); e: (R, C) scratch (eager path only).
        # layers = (ia, jf, h, n, L), native kernel only: rows h + n.. are the additive `layer` sums, never
        # written; the kernel makes and folds them in L1 (native.layer_update).
        assert layers is None or (self.native and self.targets is None)
        C = z.shape[1]
        if self.targets is not None:
            local = self.targets - offset
            hit = ((local >= 0) & (local < C)).nonzero().squeeze(1)
            self.z_target[hit] = z[hit, local[hit]].double()
        if self.native:  # one call: chunk max, top-1, sums and the fp64 merge, in place
            cmax = torch.empty_like(self.m)
            accs = (self.m, self.s, self.t, self.best, self.top1, cmax)
            tk = None if self.kv is None else (self.kv, self.ki)
            if layers is None:
                native.chunk_update(z, offset, *accs, topk=tk)
            else:
                ia, jf, h, n, L = layers
                native.chunk_update(z, offset, *accs, rows=h + n, topk=tk)
                native.layer_update(z, offset, ia, jf, h, n, L, *accs, topk=tk)
            self.chunk_max.append(cmax)
            return
        if self.fused:  # one compiled pass, z untouched, centred on the running max (R,) of earlier chunks;
            # the first chunk has none: it is centred on its own (one amax pass). A copy: ref is edited below.
            ref = z.amax(dim=1) if offset == 0 else self.m.to(z.dtype, copy=True)
            cmax, s_c, t_c = _compiled_sums(z, ref)
            jump = (cmax > ref + RECENTRE).nonzero().squeeze(1)  # e^u would overflow fp32: rare rows
            if jump.numel():
                ref[jump] = cmax[jump]
                _, s_c[jump], t_c[jump] = _chunk_sums(z[jump], ref[jump])
            self._track_top1(z, cmax.double(), offset)
            self._merge(ref.double(), s_c, t_c, cmax.double())
            return
        cmax = z.amax(dim=1).double()  # (R,)
        self._track_top1(z, cmax, offset)
        m_new = torch.maximum(self.m, cmax)  # (R,)
        u = z.sub_(m_new.to(z.dtype)[:, None]).clamp_min_(FLOOR)  # (R, C) = z - m', in place
        torch.exp(u, out=e)
        s_c = e.sum(dim=1).double()
        t_c = u.mul_(e).sum(dim=1).double()
        self._merge(m_new, s_c, t_c, m_new)

    def _track_top1(self, z: torch.Tensor, cmax: torch.Tensor, offset: int) -> None:
        """Top-1 id and logit so far (and the top-K), given the chunk's row maxima cmax (R,) fp64."""
        self.chunk_max.append(cmax)
        if self.kv is not None:
            rows = (cmax > self.kv[:, -1]).nonzero().squeeze(1)  # only rows whose chunk beats their K-th value
            if rows.numel():
                sub = z.index_select(0, rows).double()
                ids = torch.arange(offset, offset + z.shape[1], device=z.device).expand(len(rows), -1)
                self._merge_topk(rows, sub, ids)
        better = cmax > self.best
        if z.is_cuda:  # one fused kernel, no host sync
            self.top1 = torch.where(better, z.argmax(dim=1) + offset, self.top1)
        else:  # argmax (8x the cost of amax on CPU) only where the best logit moved: ~ln(V/C) chunks' worth
            rows = better.nonzero().squeeze(1)
            if rows.numel():  # index_select: a third faster than z[rows] here
                self.top1[rows] = z.index_select(0, rows).argmax(dim=1) + offset
        self.best = torch.maximum(self.best, cmax)

    def _merge_topk(self, rows: torch.Tensor, values: torch.Tensor, ids: torch.Tensor) -> None:
        """Merge candidates (values, ids) (k, n), all of higher id than rows' current lists, into their top-K.
        A stable descending sort keeps the current entries (lower ids) ahead of equal new values."""
        v = torch.cat([self.kv[rows], values], 1)
        i = torch.cat([self.ki[rows], ids], 1)
        order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, : self.topk]
        self.kv[rows], self.ki[rows] = v.gather(1, order), i.gather(1, order)

    def _merge(self, c: torch.Tensor, s_c: torch.Tensor, t_c: torch.Tensor, top: torch.Tensor) -> None:
        """Fold one chunk's sums, centred on c (R,), into the running (m, s, t); top (R,) >= the chunk's max."""
        m_new = torch.maximum(self.m, torch.maximum(c, top))
        first = torch.isinf(self.m)
        alpha = torch.where(first, 0.0, torch.exp(self.m - m_new))
        shift = torch.where(first, 0.0, (self.m - m_new) * self.s)
        beta = torch.exp(c - m_new)  # 1 where the chunk's centre is the new max
        self.t = alpha * (self.t + shift) + beta * (t_c + (c - m_new) * s_c)
        self.s = alpha * self.s + beta * s_c
        self.m = m_new

    def merge_rows(self, rows: torch.Tensor, other: OnlineLSE) -> None:
        """Fold `other` (accumulators of len(rows) rows over some chunks) into `rows` of self: the guard's
        fp64 redo touches each row only in the chunks that matter for it."""
        m, s, t = self.m[rows], self.s[rows], self.t[rows]
        m_new = torch.maximum(m, other.m)  # (k,)
        a = torch.where(torch.isinf(m), 0.0, torch.exp(m - m_new))
        shift = torch.where(torch.isinf(m), 0.0, (m - m_new) * s)
        b = torch.where(torch.isinf(other.m), 0.0, torch.exp(other.m - m_new))
        oshift = torch.where(torch.isinf(other.m), 0.0, (other.m - m_new) * other.s)
        self.t[rows] = a * (t + shift) + b * (other.t + oshift)
        self.s[rows] = a * s + b * other.s
        self.m[rows] = m_new
        if self.kv is not None:  # `other` covers later chunks than self's entries of these rows
            self._merge_topk(rows, other.kv, other.ki)
        better = other.best > self.best[rows]  # ties keep the earlier chunk's id, as argmax does
        self.top1[rows] = torch.where(better, other.top1, self.top1[rows])
        self.best[rows] = torch.maximum(self.best[rows], other.best)
        if self.z_target is not None:
            hit = ~torch.isnan(other.z_target)
            self.z_target[rows[hit]] = other.z_target[hit]

    def result(self) -> Stats:
        log_z = self.m + torch.log(self.s)  # (R,)
        entropy = torch.log(self.s) - self.t / self.s
        p1 = torch.exp(self.best - log_z)
        lt = None if self.z_target is None else self.z_target - log_z
        ki, kp = None, None
        if self.topk == 1:
            ki, kp = self.top1[:, None].clone(), p1[:, None].clone()  # refined apart from p1 (decode)
        elif self.kv is not None:
            ki, kp = self.ki, torch.exp(self.kv - log_z[:, None])
        return Stats(entropy.clamp_min(0.0), self.top1, p1, lt, topk_ids=ki, topk_p=kp)

    def spread(self) -> torch.Tensor:
        """Per row, a bound on sqrt(Σ_i p_i² (z_i − E_p z)²): how much H moves per unit of independent logit error.

        With g = max z − E_p z (= −t/s, known for free) and p1 the top probability: Σ p_i |z_i − E_p z| ≤ 2g,
        and each term p_i |z_i − E_p z| ≤ p1 · max(g, e^{−1−g}); so the sum of squares is at most the product:
        sqrt(2 · p1 · g · max(g, e^{−1−g})). Zero for a one-hot row, about p1·g·√2 for a peaked one.
        """
        g = (-self.t / self.s).clamp_min(0.0)
        p1 = torch.exp(self.best - self.m) / self.s
        return torch.sqrt(2.0 * p1 * g * torch.maximum(g, torch.exp(-1.0 - g)))

    def chunk_maxima(self) -> torch.Tensor:
        return torch.stack(self.chunk_max, 1)  # (R, n_chunks)


def refine_topk(res: Stats, x: torch.Tensor, lens, acc: OnlineLSE, piece: int = 512) -> None:
    """Top-K probabilities from fp64 logits of the K listed ids, in place (the ids stay the fp32 pass's).
    x: the rows' vectors (R, d); lens: the decode's entropylens.core.lens.Lens; acc: the pass's accumulators.

    p_k = e^{z_k - log Z}: the fp32 logits' rounding (~6e-8 |z|) would leave p off by ~1e-6 at |z| ~ 20. The K
    logits are recomputed in fp64 (K dot products a row, nothing of size V), and Z is corrected by their
    share: Z' = Z + Σ_k (e^{z64_k} - e^{z32_k}), so only the tail beyond the top-K keeps fp32 rounding.
    """
    if res.topk_ids is None:
        return
    K = res.topk_ids.shape[1]
    z32 = acc.best[:, None] if acc.kv is None else acc.kv  # (R, K) the fp32 pass's final logits
    log_z = acc.m + torch.log(acc.s)
    W = lens.W
    for r0 in range(0, x.shape[0], piece):
        sl = slice(r0, r0 + piece)
        xr = x[sl].double()
        ids = res.topk_ids[sl].clamp_min(0)
        z = torch.stack([(xr * W[ids[:, k]].double()).sum(1) for k in range(K)], 1)  # (r, K)
        scale = lens.row_scale(xr)
        if scale is not None:
            z = z * scale.double()[:, None]
        if lens.bias is not None:
            z = z + lens.bias.to(z.device, torch.float64)[ids].clamp_min(MASKED)
        if lens.softcap:
            z = torch.tanh(z / lens.softcap) * lens.softcap
        p64 = torch.exp(z - log_z[sl, None])
        fix = 1.0 + (p64 - torch.exp(z32[sl] - log_z[sl, None])).sum(1, keepdim=True)
        res.topk_p[sl] = p64 / fix


def _chunk_sums(z: torch.Tensor, ref: torch.Tensor):
    """Chunk statistics centred on a given per-row ref (R,): (max, Σ e^u, Σ u e^u) with u = z - ref (R, C).

    Written for torch.compile: the three reductions are independent, so inductor fuses them into ONE
    read-only pass over z (sums accumulated in fp64) with no (R, C) temporaries. Centring on the running
    max instead of the chunk's own max is what makes one pass possible; valid while u < RECENTRE.
    """
    u = z - ref[:, None]  # (R, C), never materialised by inductor
    e = torch.exp(u)
    return z.amax(dim=1), e.sum(1, dtype=torch.float64), (u * e).sum(1, dtype=torch.float64)


_compiled: Callable | None = None  # built on first use, then shared by every decode in the process


def _pin_inductor_isa() -> None:
    """Make the vector width inductor compiles for part of its cache keys (`cpp.simdlen`).

    Measured with torch 2.13 on an AVX-512 machine: a graph cached by a process that generated 16-lane loops
    and reloaded under ATEN_CPU_CAPABILITY=avx2 (where `at::vec` is 8 lanes wide) skips half of every row:
    sums 50-100 % off, 1.57 nats in the bench. Inductor picks the ISA from ATEN_CPU_CAPABILITY but does not
    key its FX-graph cache on it, while `cpp.simdlen` is in the key. Pinning it to the width inductor would
    pick anyway changes no kernel; it only keeps kernels of different widths apart in one cache folder.
    """
    import torch._inductor.config as inductor_config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    if inductor_config.cpp.simdlen is None and pick_vec_isa().bit_width():
        inductor_config.cpp.simdlen = pick_vec_isa().bit_width()


def _compiled_sums(z: torch.Tensor, ref: torch.Tensor):
    """`_chunk_sums(z, ref)` by the compiled kernel; a compiler failure is a UserError, never a silent fallback.

    Compiled once per process with symbolic sizes (inductor's on-disk caches make a later process's compile
    a few seconds). Sizes 0 and 1 would be specialised and recompiled, so a single row or a one-id last
    chunk runs `_chunk_sums` eagerly: the same arithmetic, and nothing there is worth a compile. (Unbacked
    sizes would avoid the recompiles too, but inductor then stops fusing: four passes and an (R, C) buffer.)
    """
    global _compiled
    if min(z.shape) < 2:
        return _chunk_sums(z, ref)
    try:
        if _compiled is None:
            _pin_inductor_isa()
            _compiled = torch.compile(_chunk_sums, dynamic=True, fullgraph=True)
        return _compiled(z, ref)
    except Exception as err:  # a toolchain problem (no C++ compiler, unsupported platform), not numerics
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"compile=True: torch.compile failed here ({first[:200]}); use compile=False") from err
