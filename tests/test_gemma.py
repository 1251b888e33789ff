"""Gemma 2 / 3 ("sandwich" layers: a norm before and after each branch) traced end to end, against an
independent fp64 forward that rebuilds every site from the raw branch outputs by hand."""

from __future__ import annotations

import copy
import math
import types

import numpy as np
import pytest
import torch

from tiny import V, build_tiny, build_tiny_gemma, wrap
from entropylens.errors import UserError
from entropylens.model.layout import find_layout
from entropylens.store import SITES, load_entropy, load_tokens, read_manifest
from entropylens.tracing.job import TraceConfig, run_trace

SANDWICH = {"attn_in": "input_layernorm", "attn": "post_attention_layernorm", "ffn_in": "pre_feedforward_layernorm",
            "ffn": "post_feedforward_layernorm"}


def trace(loaded, tmp_path, **kw):
    base = dict(prompts="arith", limit=3, max_new_tokens=6, batch_size=2, lens="both", cache=str(tmp_path),
                name=kw.pop("name", "run"))
    return run_trace(TraceConfig(**(base | kw)), progress=False, loaded=loaded)


def gemma_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm, written out: x / rms(x) · (1 + w)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w)


def entropy(z: torch.Tensor) -> np.ndarray:
    return -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1).numpy()


def gemma_reference(model: torch.nn.Module, ids: list[int], softcap: bool = True) -> dict:
    """lens -> site -> (L + 1, T) fp64 entropies. Only the raw modules are hooked (self_attn, mlp and the two
    pre-norms); A^l and F^l (the post-normed branches), H^0 = √d · embedding, the final norm and the soft-cap
    are computed here by hand (every norm in fp64: HF's own Gemma norm computes in fp32), and
    H^l = H^{l-1} + A^l + F^l is checked rather than assumed."""
    m = copy.deepcopy(model).double().eval().requires_grad_(False)
    cfg, layers = m.config, m.model.layers
    eps = cfg.rms_norm_eps
    for mod in m.modules():  # HF's Gemma RMSNorm computes in fp32 even in an fp64 model: make it fp64 throughout
        if type(mod).__name__.endswith("RMSNorm"):
            mod.forward = types.MethodType(lambda self, v: gemma_norm(v, self.weight, self.eps), mod)
    raw: dict[str, list] = {"attn_in": [], "attn": [], "ffn_in": [], "ffn": [], "layer": []}
    hooks = []
    for layer in layers:
        for key, mod in (("attn_in", layer.input_layernorm), ("attn", layer.self_attn),
                         ("ffn_in", layer.pre_feedforward_layernorm), ("ffn", layer.mlp), ("layer", layer)):
            hooks.append(mod.register_forward_hook(
                lambda mod, args, out, key=key: raw[key].append((out[0] if isinstance(out, tuple) else out)[0])))
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = m(x).logits[0]
    for h in hooks:
        h.remove()
    E = m.model.embed_tokens.weight  # (V, d): the tied head, read as the embedding matrix
    scale = float(m.model.embed_tokens.embed_scale)  # √d, held as an fp32 number by the model
    assert abs(scale - math.sqrt(cfg.hidden_size)) < 1e-6 * scale
    h0 = E[x[0]] * scale
    got = {"attn_in": [None], "ffn_in": [None], "attn": [None], "ffn": [None], "layer": [h0]}
    prev = h0
    for i, layer in enumerate(layers):
        a = gemma_norm(raw["attn"][i], layer.post_attention_layernorm.weight, eps)
        f = gemma_norm(raw["ffn"][i], layer.post_feedforward_layernorm.weight, eps)
        np.testing.assert_allclose(raw["layer"][i].numpy(), (prev + a + f).numpy(), rtol=1e-10, atol=1e-10)
        prev = raw["layer"][i]
        for key, v in (("attn_in", raw["attn_in"][i]), ("attn", a), ("ffn_in", raw["ffn_in"][i]), ("ffn", f),
                       ("layer", prev)):
            got[key].append(v)
    cap = getattr(cfg, "final_logit_softcapping", None) if softcap else None

    def head(v):
        z = v @ E.T
        return cap * torch.tanh(z / cap) if cap else z

    final_norm = lambda v: gemma_norm(v, m.model.norm.weight, eps)  # noqa: E731
    out = {lens: {s: np.stack([np.full(len(ids), np.nan) if v is None else entropy(head(f(v))) for v in got[s]])
                  for s in SITES} for lens, f in (("bupo", lambda v: v), ("logit", final_norm))}
    out["final"], out["own_logits"], out["lens_logits"] = entropy(logits), logits, head(final_norm(prev))
    out["z"] = {lens: {s: [None if v is None else head(f(v)) for v in got[s]] for s in SITES}
                for lens, f in (("bupo", lambda v: v), ("logit", final_norm))}  # (T, V) fp64 logits per layer
    return out


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_layout_is_the_sandwich_one(arch):
    model = build_tiny(arch)
    lay = find_layout(model)
    assert (lay.kind, lay.site_names, lay.final_norm_path) == ("sandwich", SANDWICH, "model.norm")
    assert find_layout(build_tiny("llama")).kind == "pre-norm"


def test_half_a_sandwich_is_refused():
    model = build_tiny_gemma("gemma3")
    for layer in model.model.layers:
        del layer.post_feedforward_layernorm
    with pytest.raises(UserError, match="no post_feedforward_layernorm"):
        find_layout(model)


def test_transformer_lens_backend_refuses_the_sandwich_layout():
    from entropylens.model.backends import make_backend

    model = build_tiny_gemma("gemma2")
    with pytest.raises(UserError, match="does not trace sandwich layouts.*--backend nnsight"):
        make_backend("transformer-lens", model, None, find_layout(model))


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_matches_independent_fp64_reference(smol_tokenizer, tmp_path, arch):
    model = build_tiny(arch)
    run = trace(wrap(model, smol_tokenizer), tmp_path)
    m = read_manifest(run)
    assert m["layout"]["kind"] == "sandwich" and m["layout"]["sites"] == SANDWICH
    assert m["layer_decode"] == "additive"  # H^l = H^{l-1} + A^l + F^l holds for the post-normed branches
    tokens, ent = load_tokens(run), load_entropy(run)
    L, worst, capped = model.config.num_hidden_layers, 0.0, 0.0
    for p, seq in tokens.groupby("prompt_idx"):
        ids = seq.sort_values("position").token_id.tolist()
        ref = gemma_reference(model, ids)
        # the logit lens on H^L is the model's own output policy: same logits, soft-cap included
        torch.testing.assert_close(ref["lens_logits"], ref["own_logits"], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(seq.H_final, ref["final"], atol=1e-4)
        if model.config.final_logit_softcapping:
            uncapped = gemma_reference(model, ids, softcap=False)
        for lens in ("bupo", "logit"):
            rows = ent[(ent.prompt_idx == p) & (ent.lens == lens)]
            for site in SITES:
                got = rows.pivot(index="layer", columns="position", values=f"H_{site}").to_numpy()
                assert got.shape == (L + 1, len(ids))
                worst = max(worst, np.nanmax(np.abs(got - ref[lens][site])))
                if model.config.final_logit_softcapping:
                    capped = max(capped, np.nanmax(np.abs(uncapped[lens][site] - ref[lens][site])))
        last = rows[rows.layer == L].sort_values("position")
        np.testing.assert_allclose(last.H_layer, seq.H_final, atol=1e-5)
    assert worst < 1e-4, worst
    assert ent.H_layer.min() < 0.5 * math.log(V)  # far from uniform: the comparison has teeth
    if model.config.final_logit_softcapping:
        assert capped > 0.05  # the soft-cap moves these entropies, so applying it (after the sum) is tested


def test_topk_of_a_soft_capped_model_matches_fp64(smol_tokenizer, tmp_path):
    """Top-K lists of Gemma 2 (soft-cap after the matmul, and after the additive layer sum) against torch.topk
    of the fp64 reference's capped logits: the cap is monotone, so the ids follow the raw logits, but the
    probabilities are those of the capped distribution."""
    from test_topk import assert_topk
    from entropylens.store import load_topk

    model = build_tiny("gemma2")
    assert model.config.final_logit_softcapping
    run = trace(wrap(model, smol_tokenizer), tmp_path, topk=5)
    tk, tokens = load_topk(run), load_tokens(run)
    groups = dict(iter(tk.sort_values(["position", "rank"]).groupby(["prompt_idx", "lens", "site", "layer"])))
    checked = 0
    for p, seq in tokens.groupby("prompt_idx"):
        ids = seq.sort_values("position").token_id.tolist()
        ref = gemma_reference(model, ids)["z"]
        for lens in ("bupo", "logit"):
            for site in SITES:
                for layer, z in enumerate(ref[lens][site]):
                    if z is None:
                        continue
                    g = groups[(p, lens, site, layer)]
                    gid = torch.tensor(g.token_id.to_numpy()).reshape(len(ids), 5)
                    gp = torch.tensor(g.prob.to_numpy(), dtype=torch.float64).reshape(len(ids), 5)
                    assert_topk(gid, gp, z, 5, p_tol=1e-5, gap=1e-5)
                    checked += gid.numel()
    assert checked == len(tk) > 0
