"""Trace end to end on tiny random models, checked against an independent fp64 computation."""

from __future__ import annotations

import copy
import json
import math

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch

from tiny import V, build_tiny, wrap
from entropylens import store
from entropylens.errors import UserError
from entropylens.store import QUANTITIES, SITES, load_entropy, load_tokens, read_manifest
from entropylens.tracing.job import TraceConfig, run_trace


def trace(loaded, tmp_path, **kw):
    base = dict(prompts="arith", limit=3, max_new_tokens=6, batch_size=2, lens="both", cache=str(tmp_path),
                name=kw.pop("name", "run"))
    return run_trace(TraceConfig(**(base | kw)), progress=False, loaded=loaded)


def fp64_reference(model: torch.nn.Module, ids: list[int]) -> dict[str, dict[str, np.ndarray]]:
    """lens -> site -> (L+1, T) entropies from plain forward hooks on an fp64 copy (layer 0 = H^0)."""
    m = copy.deepcopy(model).double().eval().requires_grad_(False)
    layers = m.model.layers
    got: dict[str, list] = {s: [None] for s in SITES}
    hooks = [layers[0].register_forward_pre_hook(lambda mod, args: got["layer"].__setitem__(0, args[0][0]))]
    for layer in layers:
        for site, mod in (("attn_in", layer.input_layernorm), ("attn", layer.self_attn),
                          ("ffn_in", layer.post_attention_layernorm), ("ffn", layer.mlp), ("layer", layer)):
            hooks.append(mod.register_forward_hook(
                lambda mod, args, out, site=site: got[site].append((out[0] if isinstance(out, tuple) else out)[0])))
    with torch.no_grad():
        logits = m(torch.tensor([ids])).logits[0]
    for h in hooks:
        h.remove()
    W = m.lm_head.weight  # (V, d)

    def H(z):
        return -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1).numpy()

    out = {"bupo": {}, "logit": {}}
    for site in SITES:
        for lens, f in (("bupo", lambda x: x), ("logit", m.model.norm)):
            rows = [np.full(len(ids), np.nan) if x is None else H(f(x) @ W.T) for x in got[site]]
            out[lens][site] = np.stack(rows)
    out["final"] = H(logits)
    out["logp"] = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    return out


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen3", False), ("llama", True)])
def test_matches_fp64_reference(smol_tokenizer, tmp_path, arch, tied):
    assert_matches_fp64(build_tiny(arch, tied=tied), smol_tokenizer, tmp_path)


def test_stays_exact_when_the_caller_lowered_matmul_precision(smol_tokenizer, tmp_path, medium_precision):
    """The traced forward and the decode run true fp32 GEMMs whatever precision a notebook set for speed."""
    assert_matches_fp64(build_tiny("llama"), smol_tokenizer, tmp_path)
    assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"  # the caller's setting is back


def assert_matches_fp64(model, smol_tokenizer, tmp_path):
    run = trace(wrap(model, smol_tokenizer), tmp_path)
    tokens, ent = load_tokens(run), load_entropy(run)
    L = model.config.num_hidden_layers
    worst = 0.0
    for p, seq in tokens.groupby("prompt_idx"):
        ids = seq.sort_values("position").token_id.tolist()
        ref = fp64_reference(model, ids)
        np.testing.assert_allclose(seq.H_final, ref["final"], atol=1e-4)
        np.testing.assert_allclose(seq.logprob_target.iloc[:-1], ref["logp"], atol=1e-4)
        for lens in ("bupo", "logit"):
            rows = ent[(ent.prompt_idx == p) & (ent.lens == lens)]
            for site in SITES:
                got = rows.pivot(index="layer", columns="position", values=f"H_{site}").to_numpy()
                assert got.shape == (L + 1, len(ids))
                np.testing.assert_allclose(got, ref[lens][site], atol=1e-4, equal_nan=True)
                worst = max(worst, np.nanmax(np.abs(got - ref[lens][site])))
    assert worst < 1e-4
    # the distributions are far from uniform, so the check has teeth
    assert ent.H_layer.min() < 0.5 * math.log(V)


def test_logit_lens_on_last_layer_is_the_output_policy(smol_tokenizer, tmp_path):
    model = build_tiny("qwen3")
    run = trace(wrap(model, smol_tokenizer), tmp_path)
    L = model.config.num_hidden_layers
    last = load_entropy(run, filters=[("lens", "==", "logit"), ("layer", "==", L)])
    tokens = load_tokens(run)
    merged = last.merge(tokens, on=["prompt_idx", "position"])
    np.testing.assert_allclose(merged.H_layer, merged.H_final, atol=1e-5)


def test_columns_roles_and_bounds(smol_tokenizer, tmp_path):
    model = build_tiny("llama")
    run = trace(wrap(model, smol_tokenizer), tmp_path, lens="bupo")
    ent = load_entropy(run)
    np.testing.assert_allclose(ent.dH_attn, ent.H_attn - ent.H_attn_in, equal_nan=True, atol=1e-6)
    np.testing.assert_allclose(ent.dH_ffn, ent.H_ffn - ent.H_ffn_in, equal_nan=True, atol=1e-6)
    wide = ent.pivot_table(index=["prompt_idx", "position"], columns="layer", values="H_layer")
    dl = ent.pivot_table(index=["prompt_idx", "position"], columns="layer", values="dH_layer")
    np.testing.assert_allclose(dl.to_numpy(), np.diff(wide.to_numpy(), axis=1), atol=1e-6)
    H = ent[[f"H_{s}" for s in SITES]].to_numpy()
    assert np.nanmin(H) >= 0 and np.nanmax(H) <= math.log(V) + 1e-6
    assert ent.loc[ent.layer == 0, "H_attn"].isna().all() and ent.loc[ent.layer > 0, "H_attn"].notna().all()
    tokens = load_tokens(run)
    for _, seq in tokens.groupby("prompt_idx"):
        roles = seq.sort_values("position").role.tolist()
        assert roles[-1] == "next" and "response" in roles and roles[0] == "prompt"
        first_resp = roles.index("response")
        assert set(roles[:first_resp]) == {"prompt"} and set(roles[first_resp:-1]) == {"response"}
    m = read_manifest(run)
    assert m["status"] == "complete" and m["layer_decode"] == "additive" and m["model"]["family"] == "llama"
    from entropylens.core import native  # the run says which decode kernel `auto` chose here
    assert m["decode_kernel"] == ("native" if native.available() else "eager")


def test_parquet_readable_by_duckdb_and_pandas(smol_tokenizer, tmp_path):
    run = trace(wrap(build_tiny("llama"), smol_tokenizer), tmp_path, lens="bupo")
    cols = duckdb.sql(f"select * from '{run / 'entropy.parquet'}' limit 1").columns
    assert set(cols) >= {"lens", "prompt_idx", "position", "layer", "role", *QUANTITIES,
                         *(f"top1_{s}" for s in SITES), *(f"p1_{s}" for s in SITES)}
    n_duck = duckdb.sql(f"select count(*) from '{run / 'entropy.parquet'}'").fetchall()[0][0]
    assert n_duck == len(pd.read_parquet(run / "entropy.parquet"))
    mean = duckdb.sql(f"select avg(H_layer) from '{run / 'entropy.parquet'}' where layer = 2").fetchall()[0][0]
    df = pd.read_parquet(run / "entropy.parquet")
    assert mean == pytest.approx(df[df.layer == 2].H_layer.mean(), rel=1e-6)
    summ = pd.read_parquet(run / "summary.parquet")
    resp = df[(df.role == "response") & (df.layer == 2)].H_layer
    row = summ[(summ.layer == 2) & (summ.quantity == "H_layer") & (summ.role == "response")].iloc[0]
    assert row["count"] == len(resp) and row["mean"] == pytest.approx(resp.mean(), rel=1e-5)


@pytest.mark.parametrize("dtype,atol", [("float64", 1e-5), ("float32", 5e-5)])
def test_backends_agree(smol_tokenizer, tmp_path, dtype, atol):
    """Same sites captured by both tracers. In fp64 they agree far inside 1e-5 nats; in fp32 the
    TransformerBridge recomputes the norms with its own fp32 rounding (~2e-7 relative), which the
    deliberately sharp tiny model (entropies down to 0.09 nats) turns into up to ~1.2e-5 nats."""
    model = build_tiny("qwen3").to(getattr(torch, dtype))
    loaded = wrap(model, smol_tokenizer)
    a = load_entropy(trace(loaded, tmp_path, name="nn", backend="nnsight", limit=2))
    b = load_entropy(trace(loaded, tmp_path, name="tl", backend="transformer-lens", limit=2))
    assert len(a) == len(b)
    for q in QUANTITIES:
        np.testing.assert_allclose(a[q], b[q], atol=atol, equal_nan=True, err_msg=q)
    assert (a.top1_layer == b.top1_layer).mean() > 0.99


def test_positions_response_packs_only_response_rows(smol_tokenizer, tmp_path):
    loaded = wrap(build_tiny("llama"), smol_tokenizer)
    full = load_entropy(trace(loaded, tmp_path, name="all", lens="bupo"))
    resp = load_entropy(trace(loaded, tmp_path, name="resp", lens="bupo", positions="response"))
    assert set(resp.role) == {"response"}
    ref = full[full.role == "response"].reset_index(drop=True)
    np.testing.assert_allclose(resp.H_layer, ref.H_layer, atol=1e-6, equal_nan=True)


def test_generation_is_seeded(smol_tokenizer, tmp_path):
    loaded = wrap(build_tiny("llama"), smol_tokenizer)
    a = load_tokens(trace(loaded, tmp_path, name="a", seed=1, lens="bupo", sites=("layer",)))
    b = load_tokens(trace(loaded, tmp_path, name="b", seed=1, lens="bupo", sites=("layer",)))
    c = load_tokens(trace(loaded, tmp_path, name="c", seed=2, lens="bupo", sites=("layer",)))
    assert a.token_id.tolist() == b.token_id.tolist()
    assert a.token_id.tolist() != c.token_id.tolist()


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gpt2"])
def test_other_families_trace_generically(smol_tokenizer, tmp_path, arch):
    """No per-model code: the layout is found, the residual is additive, and the logit lens on H^L
    (RMSNorm or GPT-2's LayerNorm folded into W) reproduces the model's own output policy."""
    model = build_tiny(arch)
    run = trace(wrap(model, smol_tokenizer), tmp_path, limit=2)
    L = model.config.num_hidden_layers
    last = load_entropy(run, filters=[("lens", "==", "logit"), ("layer", "==", L)])
    merged = last.merge(load_tokens(run), on=["prompt_idx", "position"])
    np.testing.assert_allclose(merged.H_layer, merged.H_final, atol=1e-5)
    assert read_manifest(run)["layer_decode"] == "additive"


def test_device_map_with_a_layer_offloaded_to_disk_gives_the_same_rows(tiny_folder, tmp_path):
    """accelerate's dispatch hooks (here: layer 2 streamed from disk) change where weights live, not the rows."""
    layout = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    spec = tmp_path / "map.json"
    spec.write_text(json.dumps(layout))
    common = dict(model=str(tiny_folder), limit=3, max_new_tokens=4, lens="both", cache=str(tmp_path))
    plain = run_trace(TraceConfig(name="plain", **common), progress=False)
    mapped = run_trace(TraceConfig(name="mapped", device_map=str(spec), **common), progress=False)
    for name in ("tokens.parquet", "entropy.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(plain / name), pd.read_parquet(mapped / name), check_exact=True)
    assert "disk" in store.read_manifest(mapped)["device"]
    assert (tmp_path / "offload" / "map").is_dir()
    auto = run_trace(TraceConfig(name="auto", device_map="auto", **common), progress=False)  # CPU only here
    pd.testing.assert_frame_equal(pd.read_parquet(plain / "entropy.parquet"), pd.read_parquet(auto / "entropy.parquet"))
    spec.write_text(json.dumps(layout | {"lm_head": "disk"}))
    with pytest.raises(UserError, match="offloads lm_head to disk"):
        run_trace(TraceConfig(name="bad", device_map=str(spec), **common), progress=False)
    with pytest.raises(UserError, match="unknown --device-map"):
        run_trace(TraceConfig(name="bad2", device_map="everywhere", **common), progress=False)
