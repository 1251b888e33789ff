"""Decode engine vs a plain fp64 full-softmax reference on small synthetic inputs (no model needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from entropylens.core import decode, guard, lse, native
from entropylens.core.decode import decode_layers, decode_rows
from entropylens.errors import UserError
from entropylens.core.lens import Lens

SITES = ("attn_in", "attn", "ffn_in", "ffn", "layer")


def ref_stats(lens: Lens, x: torch.Tensor, targets: torch.Tensor | None = None):
    """Independent fp64 reference: full (R, V) logits, then softmax quantities."""
    x = x.double()
    z = x @ lens.W.double().T
    if lens.norm_kind == "rms":
        z = z / x.pow(2).mean(-1, keepdim=True).add(lens.eps).sqrt()
    elif lens.norm_kind == "layer":
        z = z / x.var(-1, unbiased=False, keepdim=True).add(lens.eps).sqrt()
    if lens.bias is not None:
        z = z + lens.bias.double()
    if lens.softcap:
        z = lens.softcap * torch.tanh(z / lens.softcap)
    lp = torch.log_softmax(z, -1)
    H = -(lp.exp() * lp).sum(-1)
    lt = None if targets is None else lp.gather(1, targets[:, None]).squeeze(1)
    return H, lp.argmax(-1), lp.max(-1).values.exp(), lt


def make_lens(V=300, d=24, bias=False, softcap=None, norm=None, seed=0) -> Lens:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, d, generator=g)
    b = torch.randn(V, generator=g) if bias else None
    return Lens("test", W, b, softcap, norm, 1e-6 if norm else 0.0)


def layer_inputs(L=3, N=5, d=24, seed=1, big: float = 1.0):
    """Random h0 and site activations with H^l = H^{l-1} + A^l + F^l exactly (in fp32).

    Values are multiples of 1/64, so every sum below is exact in fp32 and the additive trick is exact.
    """
    g = torch.Generator().manual_seed(seed)
    q = lambda t: (t * 64).round() / 64  # noqa: E731
    h0 = q(torch.randn(N, d, generator=g))
    acts = {s: q(torch.randn(L, N, d, generator=g)) for s in ("attn_in", "attn", "ffn_in", "ffn")}
    acts["ffn"][1, 0] *= big  # one massive FFN output (token 0, layer 2), as in SmolLM2
    layers, h = [], h0
    for l in range(L):
        h = h + acts["attn"][l] + acts["ffn"][l]
        layers.append(h)
    acts["layer"] = torch.stack(layers)
    return h0, acts


def check(res, lens, x, tol=1e-4, targets=None):
    H, top, p1, lt = ref_stats(lens, x, targets)
    assert (res.entropy.reshape(-1) - H).abs().max().item() < tol
    ours = res.top1.reshape(-1)
    if not torch.equal(ours, top):  # only a tie in fp32 may differ (a saturated soft-cap: tanh = 1 exactly)
        z = lens.logits(x.double())
        gap = (z.gather(1, top[:, None]) - z.gather(1, ours[:, None])).abs().max().item()
        assert gap < 1e-5, f"top-1 differs from fp64 by {gap} nats: not a tie"
    assert (res.p1.reshape(-1) - p1).abs().max().item() < tol
    if targets is not None:
        assert (res.logp_target - lt).abs().max().item() < tol


@pytest.mark.parametrize("kw", [{}, {"bias": True}, {"softcap": 5.0}, {"norm": "rms"}, {"norm": "layer", "bias": True}])
def test_rows_match_fp64(kw):
    lens = make_lens(**kw)
    x = torch.randn(40, 24) * 2
    targets = torch.randint(0, 300, (40,))
    check(decode_rows(x, lens, targets, chunk=64), lens, x, targets=targets)


def test_guard_redoes_huge_logits_in_fp64():
    lens = make_lens(V=257, d=16)
    lens.W[:, 0] = 1.0  # a direction every token shares: shifts all logits of a row alike
    x = torch.randn(12, 16)
    x[:4, 0] = 1e4  # logits ~ 1e4 + O(1): fp32 rounding ~5e-4 each, far above 1e-4 nats in H
    res = decode_rows(x, lens, chunk=50)
    assert res.redone >= 4
    check(res, lens, x)
    H, *_ = ref_stats(lens, x)
    unguarded = decode_rows(x, lens, chunk=50, guard=None)
    assert (unguarded.entropy - H).abs().max() > 1e-4  # the guard is what makes it exact


def test_guard_recomputes_only_the_chunks_near_the_max_and_the_target(monkeypatch):
    lens = make_lens(V=257, d=16)
    lens.W[:, 0] = torch.linspace(-1.0, 0.9, 257)  # logits of a row with x_0 = 3e4 spread over ±3e4 ...
    lens.W[250:, 0] = 1.0  # ... but seven ids share the top: H ~ log 7 with fp32 rounding ~2e-3 each
    g = torch.Generator().manual_seed(0)  # fixed draw: whether fp32 alone errs > 1e-4 here depends on it (~5 %)
    x = torch.randn(12, 16, generator=g)
    x[:4, 0] = 3e4
    targets = torch.randint(0, 257, (12,), generator=g)
    fp64_rows = []
    finish = guard.finish_logits
    monkeypatch.setattr(guard, "finish_logits", lambda z, *a: (fp64_rows.append(len(z)) if z.dtype == torch.float64
                                                               else None) or finish(z, *a))
    res = decode_rows(x, lens, targets, chunk=50)
    assert res.redone == 4
    check(res, lens, x, targets=targets)  # log p(target) exact also where the target's chunk is far below
    assert sum(fp64_rows) <= 4 * 2  # the top chunk and the target's, not all 6 chunks of each row
    unguarded = decode_rows(x, lens, targets, chunk=50, guard=None)
    assert (unguarded.entropy - ref_stats(lens, x)[0]).abs().max() > 1e-4


def _all_rows(h0, acts, site):
    x = torch.cat([h0[None], acts["layer"]]) if site == "layer" else acts[site]
    return x.reshape(-1, x.shape[-1])


@pytest.mark.parametrize("additive", [True, False])
@pytest.mark.parametrize("norm", [None, "rms"])
def test_layers_every_site_matches_fp64(additive, norm):
    lens = make_lens(norm=norm, bias=True)
    h0, acts = layer_inputs()
    res = decode_layers(h0, acts, SITES, lens, additive, chunk=64, block_bytes=1)
    for s in SITES:
        assert res[s].entropy.shape == ((4, 5) if s == "layer" else (3, 5))
        check(res[s], lens, _all_rows(h0, acts, s))


GUARD_KERNELS = ["eager", "compiled"] + (["native"] if native.available() else [])


def aligned_rows(n: int = 48, d: int = 128, V: int = 1024, seed: int = 0) -> tuple[Lens, torch.Tensor]:
    """Rows whose fp32 entropy errs beyond 1e-4 nats although every |z| < 500 (the old fixed guard's line).

    Eight ids share the top along coordinate 0 (x_0 = 150, W_i0 = 3.2 + 0.004 i: ~0.6 nats apart, H ~ 1.4), the
    shape of a massive activation: the first product is ~480 and every later one is added to a partial sum of
    that size, rounding there (~3e-5 a time): the eight top logits err by ~1e-4 each, independently.
    """
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, d, generator=g)
    W[:, 0] *= 0.5
    W[:8, 0] = 3.2 + 0.004 * torch.arange(8)
    W[:8, 1:] *= 0.02
    W -= W.mean(0)  # centred, as make_lens does for real models
    x = torch.randn(n, d, generator=g) * 2
    x[:, 0] = 150.0
    return Lens("bupo", W, None, None, None), x


@pytest.mark.parametrize("kernel", GUARD_KERNELS)
def test_guard_catches_rows_whose_gemm_rounding_breaks_the_budget(kernel):
    lens, x = aligned_rows()
    H = ref_stats(lens, x)[0]
    assert lens.logits(x.double()).abs().max() < 500  # below where a fixed |z| > 500 guard would look
    bare = decode_rows(x, lens, chunk=256, guard=None, kernel=kernel)
    assert (bare.entropy - H).abs().max() > 1e-4  # fp32 alone breaks the budget here
    res = decode_rows(x, lens, chunk=256, kernel=kernel)
    assert res.redone >= 40  # nearly every row is at risk; the rest are within GUARD_NATS in fp32
    err = (res.entropy - H).abs()
    assert err.max() < guard.GUARD_NATS and (err > 1e-9).sum() <= len(err) - res.redone
    check(res, lens, x, tol=guard.GUARD_NATS)


@pytest.mark.parametrize("kernel", GUARD_KERNELS)
def test_guard_catches_them_at_every_site_and_in_the_layer_sums(kernel):
    """The aligned rows as A^2 of every token: the attn rows and every later `layer` sum (additive trick:
    raw(H^l) carries A^2's rounding) are at risk; all sites within 2e-5 nats of fp64 with the guard."""
    lens, x = aligned_rows(n=48)
    h0, acts = layer_inputs(L=3, N=48, d=128)
    acts["attn"][1] = (x * 64).round() / 64  # multiples of 1/64: the layer sums below stay exact in fp32
    h = h0
    for l in range(3):
        h = h + acts["attn"][l] + acts["ffn"][l]
        acts["layer"][l] = h
    bare = decode_layers(h0, acts, SITES, lens, True, chunk=256, kernel=kernel, guard=None)
    worst = {s: (bare[s].entropy.reshape(-1) - ref_stats(lens, _all_rows(h0, acts, s))[0]).abs().max() for s in SITES}
    assert worst["attn"] > 1e-4 and worst["layer"] > 1e-4
    res = decode_layers(h0, acts, SITES, lens, True, chunk=256, kernel=kernel)
    assert res["attn_in"].redone > 0
    for s in SITES:
        check(res[s], lens, _all_rows(h0, acts, s), tol=guard.GUARD_NATS)


@pytest.mark.parametrize("kw", [{}, {"bias": True}, {"norm": "rms"}, {"softcap": 5.0}])
def test_guard_leaves_ordinary_rows_in_fp32(kw):
    """Ordinary rows (|z| up to ~50) are not redone: the guard does not quietly make the decode fp64."""
    lens = make_lens(**kw)
    x = torch.randn(200, 24) * 3
    res = decode_rows(x, lens, chunk=64)
    assert res.redone == 0
    check(res, lens, x)
    h0, acts = layer_inputs(N=8)
    assert decode_layers(h0, acts, SITES, lens, True, chunk=64)["attn_in"].redone == 0
    # the same rows next to the aligned ones: only those are redone
    lens, x = aligned_rows(n=16)
    ordinary = torch.randn(64, 128) * 2
    res = decode_rows(torch.cat([x, ordinary]), lens, chunk=256)
    assert 0 < res.redone <= 16


def test_guard_risk_bounds_the_measured_error():
    """guard_risk is a ~3σ bound on the fp32 error (per logit the rounding of ~d partial sums of size Z): on
    the aligned rows, built to sit at that bound, no error exceeds twice it (the margin GUARD_NATS keeps to the
    1e-4 budget) and most stay below it."""
    lens, x = aligned_rows()
    H = ref_stats(lens, x)[0]
    W = lens.W
    acc = decode._stream(x, W, lens, x.shape[0], None, None, None, 256, "eager")
    err = (acc.result().entropy - H).abs()
    risk = guard.guard_risk(acc, guard.logit_scale(x, None, acc.best, guard.col_absmax(W)), x.shape[1])
    assert err.max() > 1e-4 and (err < 2 * risk).all() and (err < risk).float().mean() > 0.9


def test_additive_layer_with_massive_branch_stays_exact():
    """A huge F^2 leaves fp32 rounding in every later running sum; the guard must catch those rows too."""
    lens = make_lens(V=400, d=24)
    lens.W -= lens.W.mean(0)  # centred, as make_lens does for real models
    h0, acts = layer_inputs(L=4, big=2048.0)
    # cancel the massive component again in the next layer, so H^3's own logits are small
    acts["attn"][2, 0] -= acts["ffn"][1, 0]
    acts["layer"][2:, 0] -= acts["ffn"][1, 0]
    res = decode_layers(h0, acts, SITES, lens, True, chunk=64)
    assert res["attn_in"].redone > 0
    for s in SITES:
        check(res[s], lens, _all_rows(h0, acts, s))


def test_additive_equals_direct_and_blocks_chunks_do_not_matter():
    lens = make_lens(norm="rms")
    h0, acts = layer_inputs(N=7)
    base = decode_layers(h0, acts, SITES, lens, False, chunk=300)
    for additive, chunk, block_bytes in [(True, 300, 1 << 30), (True, 7, 1), (False, 33, 20_000)]:
        res = decode_layers(h0, acts, SITES, lens, additive, chunk=chunk, block_bytes=block_bytes)
        for s in SITES:
            assert (res[s].entropy - base[s].entropy).abs().max() < 2e-5
            assert torch.equal(res[s].top1, base[s].top1)


def test_site_subsets():
    lens = make_lens()
    h0, acts = layer_inputs()
    for sites in [("layer",), ("ffn", "layer"), ("attn",), ("attn", "ffn", "layer")]:
        res = decode_layers(h0, acts, sites, lens, True, chunk=100)
        assert set(res) == set(sites)
        for s in sites:
            check(res[s], lens, _all_rows(h0, acts, s))



def _eager_fused(monkeypatch):
    """Run the fused path with the uncompiled kernel: tests its merge algebra without paying a compile."""
    monkeypatch.setattr(lse, "_compiled_sums", lse._chunk_sums)


@pytest.mark.parametrize("norm", [None, "rms"])
def test_fused_path_matches_fp64(monkeypatch, norm):
    _eager_fused(monkeypatch)
    lens = make_lens(norm=norm, bias=True)
    h0, acts = layer_inputs(big=2048.0)  # chunk maxima far apart: every merge branch is taken
    res = decode_layers(h0, acts, SITES, lens, True, chunk=64, block_bytes=1, compile=True)
    for s in SITES:
        check(res[s], lens, _all_rows(h0, acts, s))
    x, targets = torch.randn(9, 24) * 3, torch.randint(0, 300, (9,))
    check(decode_rows(x, lens, targets, chunk=7, compile=True), lens, x, targets=targets)


def test_fused_pass_recentres_rows_whose_max_jumps(monkeypatch):
    """A chunk ~150 nats above the running max would overflow e^u in fp32: its rows are recentred."""
    _eager_fused(monkeypatch)
    lens = make_lens(bias=True)
    lens.bias[120] = 149.5  # chunk 1 (chunk = 64) jumps ~150 nats above chunk 0 in every row: recentred
    lens.bias[250] = 150.0  # chunk 3 exceeds the running max by ~0.5: merged with a centre below its max
    x = torch.randn(6, 24)
    check(decode_rows(x, lens, chunk=64, guard=None, compile=True), lens, x)


def test_compile_failure_is_a_user_error(monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler\nmore detail")

    monkeypatch.setattr(lse, "_compiled", broken)
    with pytest.raises(UserError, match="compile=False"):
        decode_rows(torch.randn(3, 24), make_lens(), compile=True)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="no C++ compiler here: torch.compile cannot build the kernel (~15 s cold where it can)")
def test_compiled_kernel_matches_eager_and_fp64():
    """The real inductor kernel: one compile covers every block height, chunk width and a single row."""
    lens = make_lens(V=301, norm="rms", bias=True)
    h0, acts = layer_inputs(N=7, big=2048.0)
    eager = decode_layers(h0, acts, SITES, lens, True, chunk=64, block_bytes=40_000)
    fused = decode_layers(h0, acts, SITES, lens, True, chunk=64, block_bytes=40_000, compile=True)
    for s in SITES:
        check(fused[s], lens, _all_rows(h0, acts, s))
        assert (fused[s].entropy - eager[s].entropy).abs().max() < 2e-5
        assert torch.equal(fused[s].top1, eager[s].top1)
    x = torch.randn(1, 24)
    check(decode_rows(x, lens, chunk=300, compile=True), lens, x)  # R = 1, last chunk C = 1


NARROWED_SUMS = """
import torch
from entropylens.core import lse
torch.manual_seed(0)
z = torch.randn(300, 2048) * 4
ref = z.amax(1)
c, e = lse._compiled_sums(z, ref), lse._chunk_sums(z, ref)
print(float(((c[1] - e[1]).abs() / e[1]).max()), float(((c[2] - e[2]).abs() / e[2].abs()).max()))
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512", reason="narrowing needs an AVX-512 CPU")
def test_a_process_narrowed_to_avx2_never_reloads_wider_kernels(tmp_path):
    """An AVX-512 process's compiled sums, reloaded from the same inductor cache by a process narrowed to AVX2,
    summed 50-100 % off (torch 2.13: 16-lane loops over 8-lane vectors); each width now has its own key."""
    errors = []
    for narrowed in ({}, {"ATEN_CPU_CAPABILITY": "avx2"}):
        env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path)} | narrowed
        r = subprocess.run([sys.executable, "-c", NARROWED_SUMS], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        errors += [float(x) for x in r.stdout.split()]
    assert max(errors) < 1e-6, errors


def test_decode_stays_fp32_when_the_caller_lowered_matmul_precision(medium_precision):
    lens = make_lens(V=4096, d=576, seed=3)
    h0, acts = layer_inputs(L=2, N=16, d=576)
    res = decode_layers(h0, acts, SITES, lens, additive=True)
    for s, x in (("attn", acts["attn"]), ("layer", torch.cat([h0[None], acts["layer"]]))):
        check(res[s], lens, x.reshape(-1, 576))
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"  # the caller's choice is restored
