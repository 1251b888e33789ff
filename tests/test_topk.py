"""Top-K per internal policy: every kernel and the stored topk.parquet against torch.topk of fp64 logits."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from test_decode import layer_inputs, make_lens
from tiny import build_tiny, wrap
from entropylens.core import native
from entropylens.core.decode import decode_layers, decode_rows
from entropylens.core.lse import OnlineLSE
from entropylens.store import SITES, load_entropy, load_tokens, load_topk, read_manifest
from entropylens.tracing.job import TraceConfig, run_trace

KERNELS = ["eager", "compiled"] + (["native"] if native.available() else [])
SITES_ALL = ("attn_in", "attn", "ffn_in", "ffn", "layer")


def expected(z: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference top-K of fp64 logits z (R, V) with exact ties: ids by (value desc, id asc), fp64 softmax."""
    order = torch.sort(z, dim=1, descending=True, stable=True).indices[:, :K]
    return order, torch.softmax(z, -1).gather(1, order)


def assert_topk(ids, p, z, K, p_tol=1e-6, gap=1e-4):
    """ids identical to torch.topk of the fp64 softmax wherever no two of the top K + 1 logits lie within
    `gap` (fp32 rounding may swap those; exact ties are tested separately); probabilities within p_tol."""
    zs, ref_ids = torch.topk(z, K + 1, dim=1)
    ref_p = torch.softmax(z, -1).gather(1, ref_ids[:, :K])
    ref_ids = ref_ids[:, :K]
    tied = (zs[:, :-1] - zs[:, 1:]).abs().min(1).values < gap  # rows whose order fp32 rounding may swap
    assert (~tied).sum() > 0.5 * len(tied)  # the check has teeth
    assert torch.equal(ids[~tied], ref_ids[~tied])
    np.testing.assert_allclose(p.numpy(), ref_p.numpy(), atol=p_tol)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("K", [1, 2, 5, 17])
def test_rows_topk_match_fp64(kernel, K):
    lens = make_lens(V=3001, d=24, bias=True)
    x = torch.randn(37, 24, generator=torch.Generator().manual_seed(3)) * 0.7
    r = decode_rows(x, lens, kernel=kernel, topk=K, chunk=256)
    z = x.double() @ lens.W.double().T + lens.bias.double()
    assert r.topk_ids.shape == (37, K) and torch.equal(r.topk_ids[:, 0], r.top1)
    assert_topk(r.topk_ids, r.topk_p, z, K)


@pytest.mark.parametrize("kernel", KERNELS)
def test_ties_go_to_the_lowest_id_across_and_within_chunks(kernel):
    """Logits with many exact ties (repeated values over the vocabulary, chunks of 7): lowest ids win."""
    K, V, R = 6, 100, 9
    g = torch.Generator().manual_seed(0)
    z = (torch.randint(0, 5, (R, V), generator=g).float() + torch.randint(0, 2, (R, 1), generator=g) * 3)
    z[0] = 1.0  # every logit tied
    acc = OnlineLSE(R, torch.device("cpu"), fused=kernel == "compiled", kernel=kernel, topk=K)
    for c0 in range(0, V, 7):
        c = z[:, c0 : c0 + 7].contiguous()
        acc.update(c, c0, torch.empty_like(c))
    res = acc.result()
    ref_ids, ref_p = expected(z.double(), K)
    assert torch.equal(res.topk_ids, ref_ids)
    assert res.topk_ids[0].tolist() == list(range(K))
    np.testing.assert_allclose(res.topk_p.numpy(), ref_p.numpy(), atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("additive", [True, False])
def test_layer_sites_topk_match_fp64_with_the_guard(kernel, additive):
    """Every site of decode_layers, with a massive FFN output and a guard tight enough (1e-7 nats) to redo
    (and re-rank) every row that is not one-hot in fp64."""
    h0, acts = layer_inputs(L=3, N=6, big=800.0)
    lens = make_lens(V=2000, d=24)
    out = decode_layers(h0, acts, SITES_ALL, lens, additive=additive, chunk=128, kernel=kernel, topk=5, guard=1e-7)
    assert out["attn_in"].redone > 0  # the guard ran
    for site, st in out.items():
        xs = torch.cat([h0[None], acts["layer"]]) if site == "layer" else acts[site]
        z = (xs.double() @ lens.W.double().T).reshape(-1, lens.W.shape[0])
        # logits here reach |z| ~ 40: fp32 rounding (~6e-8 |z|) moves p by up to ~2e-6
        assert_topk(st.topk_ids.reshape(-1, 5), st.topk_p.reshape(-1, 5), z, 5, p_tol=5e-6)


def test_eager_native_and_compiled_give_the_same_lists():
    h0, acts = layer_inputs(L=2, N=5)
    lens = make_lens(V=1500, d=24, norm="rms")
    runs = [decode_layers(h0, acts, SITES_ALL, lens, additive=True, chunk=100, kernel=k, topk=4) for k in KERNELS]
    for other in runs[1:]:
        for s in SITES_ALL:
            assert torch.equal(runs[0][s].topk_ids, other[s].topk_ids)
            np.testing.assert_allclose(runs[0][s].topk_p, other[s].topk_p, atol=1e-6)  # the kernels sum e^u differently


# ---------------------------------------------------------------- a traced tiny model, read from topk.parquet

def fp64_logits(model: torch.nn.Module, ids: list[int]) -> dict[str, dict[str, list[torch.Tensor | None]]]:
    """lens -> site -> per layer (T, V) fp64 logits of the fp32 forward's site vectors (layer 0 = H^0), from
    plain forward hooks (no nnsight): the final norm and the unembedding in fp64. Decoding the fp32 vectors
    isolates the decode: an fp64 forward differs by the fp32 forward's own rounding (~1e-6 in p here)."""
    m = copy.deepcopy(model).eval().requires_grad_(False)
    got: dict[str, list] = {s: [None] for s in SITES}
    hooks = [m.model.layers[0].register_forward_pre_hook(lambda mod, a: got["layer"].__setitem__(0, a[0][0]))]
    for layer in m.model.layers:
        for site, mod in (("attn_in", layer.input_layernorm), ("attn", layer.self_attn),
                          ("ffn_in", layer.post_attention_layernorm), ("ffn", layer.mlp), ("layer", layer)):
            hooks.append(mod.register_forward_hook(
                lambda mod, a, out, site=site: got[site].append((out[0] if isinstance(out, tuple) else out)[0])))
    with torch.no_grad():
        m(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    W, norm = m.lm_head.weight.double(), copy.deepcopy(m.model.norm).double()
    return {lens: {s: [None if x is None else f(x.double()) @ W.T for x in got[s]] for s in SITES}
            for lens, f in (("bupo", lambda x: x), ("logit", norm))}


@pytest.mark.parametrize("arch", ["llama"])
def test_stored_topk_matches_torch_topk_of_fp64_softmax(smol_tokenizer, tmp_path, arch):
    model = build_tiny(arch)
    cfg = TraceConfig(prompts="arith", limit=3, max_new_tokens=6, batch_size=2, lens="both", cache=str(tmp_path),
                      name="run", topk=5)
    run = run_trace(cfg, progress=False, loaded=wrap(model, smol_tokenizer))
    tk, tokens, ent = load_topk(run), load_tokens(run), load_entropy(run)
    assert read_manifest(run)["topk"] == 5
    L = model.config.num_hidden_layers
    n_rows = len(tokens) * 2 * (4 * L + L + 1) * 5
    assert len(tk) == n_rows and set(tk["rank"]) == set(range(1, 6))
    groups = dict(iter(tk.sort_values(["position", "rank"]).groupby(["prompt_idx", "lens", "site", "layer"])))
    checked = 0
    for p, seq in tokens.groupby("prompt_idx"):
        ids = seq.sort_values("position").token_id.tolist()
        ref = fp64_logits(model, ids)
        for lens in ("bupo", "logit"):
            for site in SITES:
                for layer, z in enumerate(ref[lens][site]):
                    g = groups.get((p, lens, site, layer))
                    if z is None:
                        assert g is None
                        continue
                    gid = torch.tensor(g.token_id.to_numpy()).reshape(len(ids), 5)
                    gp = torch.tensor(g.prob.to_numpy(), dtype=torch.float64).reshape(len(ids), 5)
                    assert_topk(gid, gp, z, 5, p_tol=1e-6, gap=1e-5)
                    checked += gid.numel()
    assert checked == n_rows
    # rank 1 is entropy.parquet's top-1, joinable on the documented keys
    top = tk[tk["rank"] == 1].pivot_table(index=["lens", "prompt_idx", "position", "layer"], columns="site",
                                         values="token_id")
    e = ent.set_index(["lens", "prompt_idx", "position", "layer"])
    for site in SITES:
        both = pd.concat([top[site], e[f"top1_{site}"]], axis=1, join="inner").dropna()
        assert len(both) and (both[site] == both[f"top1_{site}"]).all()
    # the stored token text is the tokenizer's
    row = tk.iloc[0]
    assert row.token_text == smol_tokenizer.decode([int(row.token_id)])


def test_topk_0_writes_no_file_and_older_runs_read_empty(smol_tokenizer, tmp_path):
    cfg = TraceConfig(prompts="arith", limit=1, max_new_tokens=2, batch_size=1, cache=str(tmp_path), name="r0",
                      topk=0)
    run = run_trace(cfg, progress=False, loaded=wrap(build_tiny("llama"), smol_tokenizer))
    assert not (run / "topk.parquet").exists()
    assert load_topk(run).empty and list(load_topk(run).columns)[-1] == "prob"
    assert math.isfinite(load_entropy(run).H_layer.iloc[0])


def test_el_decode_topk_matches_fp64_and_keeps_the_shape():
    import entropylens as el

    lens = make_lens(V=4000, d=24)
    h = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(5))
    res = el.decode(h, lens.W, topk=5)
    assert res.topk_ids.shape == (2, 7, 5) and res.topk_p.shape == (2, 7, 5)
    W = lens.W.double()
    z = h.reshape(-1, 24).double() @ (W - W.mean(0)).T  # decode's bare-matrix lens centres W over V
    assert_topk(res.topk_ids.reshape(-1, 5), res.topk_p.reshape(-1, 5), z, 5)
    assert el.decode(h, lens.W).topk_ids is None


def test_resumed_run_has_the_same_topk_file(smol_tokenizer, tmp_path, monkeypatch):
    from entropylens import store
    from entropylens.tracing.job import TraceInterrupted, config_from_run

    loaded = wrap(build_tiny("llama"), smol_tokenizer)
    base = dict(prompts="arith", limit=3, max_new_tokens=3, batch_size=1, cache=str(tmp_path), topk=3)
    whole = run_trace(TraceConfig(name="whole", **base), progress=False, loaded=loaded)
    real = store.RunWriter.write_batch

    def write_then_stop(self, b, *args):
        real(self, b, *args)
        if b == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(store.RunWriter, "write_batch", write_then_stop)
    with pytest.raises(TraceInterrupted):
        run_trace(TraceConfig(name="cut", **base), progress=False, loaded=loaded)
    assert (tmp_path / "runs" / "cut" / "parts" / "topk-00001.parquet").is_file()
    monkeypatch.setattr(store.RunWriter, "write_batch", real)
    cut = run_trace(config_from_run(str(tmp_path), "cut"), resume=True, progress=False, loaded=loaded)
    assert (whole / "topk.parquet").read_bytes() == (cut / "topk.parquet").read_bytes()
    assert set(load_topk(cut)["rank"]) == {1, 2, 3}


def test_bench_topk_runs_the_top1_path_beside_the_default_and_reports_the_ratio():
    from entropylens.tracing.bench import BenchConfig, run_bench

    df = run_bench(BenchConfig(vocab=3001, d_model=48, tokens=200, sites=("attn", "ffn", "layer"),
                               methods=("entropylens",), topk=5, repeats=2))
    assert list(df.method) == ["recipe", "entropylens", "entropylens-top1"]
    assert (df.dropna(subset=["max_abs_dH"]).max_abs_dH < 1e-4).all()
    r = df.attrs["topk_rate_ratio"]
    assert r["n"] == 2 and r["lo"] <= r["mean"] <= r["hi"] and df.attrs["topk"] == 5
