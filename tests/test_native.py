"""The native C chunk kernel and the kernel choice, against fp64 full-softmax references."""

from __future__ import annotations

import math

import pytest
import torch

from entropylens.core import decode, native
from entropylens.core.guard import GUARD_NATS
from entropylens.core.decode import decode_layers, decode_rows, resolve_kernel
from entropylens.errors import UserError
from entropylens.core.lse import MASKED
from test_decode import SITES, _all_rows, check, layer_inputs, make_lens

needs_cc = pytest.mark.skipif(not native.available(), reason="no C compiler here: the native kernel cannot be built")


def _kernel_stats(chunks: list[torch.Tensor]):
    """Feed fp32 chunks (R, C_k) through native.chunk_update; return (H, top1, best, chunk maxima)."""
    R = chunks[0].shape[0]
    f64 = dict(dtype=torch.float64)
    m, s, t = torch.full((R,), -math.inf, **f64), torch.zeros(R, **f64), torch.zeros(R, **f64)
    best, top = torch.full((R,), -math.inf, **f64), torch.zeros(R, dtype=torch.long)
    off, cms = 0, []
    for z in chunks:
        cm = torch.empty(R, **f64)
        native.chunk_update(z, off, m, s, t, best, top, cm)
        cms.append(cm)
        off += z.shape[1]
    return torch.log(s) - t / s, top, best, torch.stack(cms, 1)


@needs_cc
@pytest.mark.parametrize("widths", [[2048, 2048, 517], [7, 33, 300, 1], [16] * 5, [100]])
@pytest.mark.parametrize("rows", [1, 3, 70])
def test_kernel_matches_fp64_on_its_own_fp32_inputs(widths, rows):
    """The kernel's own error (exp polynomial, fp32 lane sums) on given fp32 logits, massive rows included.

    Rows with |z| in the thousands, chunks hundreds of nats apart (every merge branch), masked ids at -1e30
    and widths that are not multiples of the 16 vector lanes.
    """
    g = torch.Generator().manual_seed(rows * 1000 + len(widths))
    chunks = [torch.randn(rows, w, generator=g) * 4 for w in widths]
    chunks[0][0] += 3000.0  # a massive row: |z| ~ 3e3
    if len(chunks) > 1:
        chunks[1][rows // 2] += 200.0  # a later chunk 200 nats above the running max
        chunks[-1][:, :1] = MASKED  # masked ids contribute exactly nothing
    H, top, best, cm = _kernel_stats(chunks)
    z = torch.cat([c.double() for c in chunks], 1)
    lp = torch.log_softmax(z, 1)
    ref = -(lp.exp() * lp).sum(1)
    assert (H - ref).abs().max().item() < 1e-5
    assert torch.equal(top, z.argmax(1)) and torch.equal(best, z.max(1).values)
    assert torch.equal(cm, torch.stack([c.double().amax(1) for c in chunks], 1))


@needs_cc
def test_kernel_top1_is_the_first_of_tied_maxima_across_chunks():
    z = torch.zeros(2, 40)
    z[0, [5, 20, 33]] = 3.0  # ties within and across chunks: the first id wins, as with argmax
    z[1, 39] = 1.0
    _, top, _, _ = _kernel_stats([z[:, :16].contiguous(), z[:, 16:].contiguous()])
    assert top.tolist() == [5, 39]


@needs_cc
@pytest.mark.parametrize("kw", [{}, {"bias": True}, {"softcap": 5.0}, {"norm": "rms"}, {"norm": "layer", "bias": True}])
def test_native_rows_match_fp64(kw):
    lens = make_lens(**kw)
    x = torch.randn(40, 24) * 2
    targets = torch.randint(0, 300, (40,))
    res = decode_rows(x, lens, targets, chunk=64, kernel="native")
    assert res.kernel == "native"
    check(res, lens, x, targets=targets)


@needs_cc
@pytest.mark.parametrize("kernel", ["native", "eager"])
@pytest.mark.parametrize("additive,bias", [(True, False), (True, True), (False, False)])
def test_every_site_with_massive_activations_matches_fp64(kernel, additive, bias):
    """A massive F^2 (|z| in the thousands) through each kernel: every site within 1e-4 nats, with the default
    guard and with one tight enough (1e-7 nats) to redo every row that is not one-hot, so the fp64 redo of
    some rows runs through each kernel's accumulators and block layout.

    Native, additive, no bias: the kernel makes and folds the `layer` sums itself (native.layer_update).
    """
    lens = make_lens(V=400, d=24, bias=bias)  # bupo: raw residual logits, |z| up to ~1e4 in the massive rows
    lens.W -= lens.W.mean(0)  # centred, as make_lens does for real models
    h0, acts = layer_inputs(L=4, N=6, big=2048.0)
    for guard in (GUARD_NATS, 1e-7):
        res = decode_layers(h0, acts, SITES, lens, additive, chunk=64, block_bytes=30_000, kernel=kernel, guard=guard)
        assert {r.kernel for r in res.values()} == {kernel}
        for s in SITES:
            check(res[s], lens, _all_rows(h0, acts, s))
    assert res["attn_in"].redone > 0


@needs_cc
@pytest.mark.parametrize("norm", [None, "rms"])  # None: the fused layer sums; rms: torch's combine + finish
def test_native_equals_eager_closely(norm):
    lens = make_lens(V=301, norm=norm)
    h0, acts = layer_inputs(N=7)
    a = decode_layers(h0, acts, SITES, lens, True, chunk=50, block_bytes=50_000, kernel="native")
    b = decode_layers(h0, acts, SITES, lens, True, chunk=50, block_bytes=50_000, kernel="eager")
    for s in SITES:
        assert (a[s].entropy - b[s].entropy).abs().max() < 2e-6
        assert torch.equal(a[s].top1, b[s].top1)


def test_auto_picks_native_only_where_it_runs(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_kernel("auto", True, cpu, torch.float32) == "compiled"
    assert resolve_kernel("eager", False, cpu, torch.float32) == "eager"
    assert resolve_kernel("auto", False, cpu, torch.float64) == "eager"
    assert resolve_kernel("auto", False, torch.device("cuda"), torch.float32) == "eager"
    with pytest.raises(UserError, match="CPU float32"):
        resolve_kernel("native", False, torch.device("cuda"), torch.float32)
    with pytest.raises(UserError, match="unknown kernel"):
        resolve_kernel("fast", False, cpu, torch.float32)
    with pytest.raises(UserError, match="contradicts"):
        resolve_kernel("native", True, cpu, torch.float32)
    monkeypatch.setattr(native, "compiler", lambda: None)
    assert resolve_kernel("auto", False, cpu, torch.float32) == "eager"  # and Stats.kernel says so
    with pytest.raises(UserError, match="C compiler"):
        resolve_kernel("native", False, cpu, torch.float32)
    res = decode_rows(torch.randn(3, 24), make_lens())
    assert res.kernel == "eager"


def test_a_failing_build_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("ENTROPYLENS_KERNEL_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_lib", None)
    with pytest.raises(UserError, match="kernel='eager'"):
        decode_rows(torch.randn(3, 24), make_lens(), kernel="native")
    assert not list(tmp_path.glob("*.so"))  # nothing half-built is left to load later


@needs_cc
def test_isa_follows_torch_dispatch():
    assert native.isa() in ("AVX512", "AVX2", "DEFAULT")
    assert decode.KERNELS[0] == "auto"
