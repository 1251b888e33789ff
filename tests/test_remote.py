"""The NDIF remote path, run locally through nnsight's LocalSimulationBackend (serialise, hide local modules,
deserialise, run): the same statistics as the local decode engine, and only (B, T) statistics come back."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tiny import build_tiny, wrap
from entropylens.model import remote as remote_mod
from entropylens.errors import UserError
from entropylens.model.remote import RemoteModel
from entropylens.model.layout import SITES
from entropylens.store import load_entropy, load_tokens, read_manifest
from entropylens.tracing.job import TraceConfig, run_trace


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen3", True)])
def test_remote_trace_matches_local_engine(smol_tokenizer, tmp_path, arch, tied):
    model = build_tiny(arch, tied=tied)
    common = dict(limit=3, max_new_tokens=5, batch_size=2, lens="both", cache=str(tmp_path))
    local = run_trace(TraceConfig(name="local", **common), progress=False, loaded=wrap(model, smol_tokenizer))
    sim = RemoteModel.wrap(model, smol_tokenizer, mode="local")
    far = run_trace(TraceConfig(name="far", **common), progress=False, loaded=wrap(model, smol_tokenizer), remote=sim)
    # Same seeded samples (the seed is set on the serving side), same rows.
    a, b = load_tokens(local), load_tokens(far)
    pd.testing.assert_frame_equal(a.drop(columns=["H_final", "logprob_target"]),
                                  b.drop(columns=["H_final", "logprob_target"]))
    np.testing.assert_allclose(a["H_final"], b["H_final"], atol=1e-4)
    np.testing.assert_allclose(a["logprob_target"], b["logprob_target"], atol=1e-4)
    ea, eb = load_entropy(local), load_entropy(far)
    assert len(ea) == len(eb)
    for col in ea.columns:
        if col.startswith(("H_", "dH_", "p1_")):
            np.testing.assert_allclose(ea[col], eb[col], atol=1e-4, err_msg=col)  # fp32 engine vs fp64 remote
        elif col.startswith("top1_"):
            assert (ea[col] == eb[col]).mean() > 0.99, col  # ties aside, the same argmax
        else:
            assert ea[col].equals(eb[col]), col
    m = read_manifest(far)
    assert m["backend"] == "nnsight-remote (local)" and m["device"] == "remote"


def test_only_per_token_statistics_come_back(smol_tokenizer):
    model = build_tiny("llama")
    sim = RemoteModel.wrap(model, smol_tokenizer, mode="local")
    ids = torch.randint(0, 1000, (2, 7))
    final, per_lens = sim.decode(ids, torch.full((2, 7), -1), ["bupo", "logit"], SITES)
    L = model.config.num_hidden_layers
    assert final.entropy.shape == (2, 7)
    for lens in ("bupo", "logit"):
        for site in SITES:
            st = per_lens[lens][site]
            assert st.entropy.shape == ((L + 1) if site == "layer" else L, 2, 7)  # never (.., V)
            assert st.entropy.dtype == torch.float64 and st.top1.dtype == torch.int64


def test_remote_needs_an_api_key_and_a_hub_model(monkeypatch):
    from nnsight import CONFIG

    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    with pytest.raises(UserError, match="NDIF_API_KEY"):
        remote_mod.connect("meta-llama/Llama-3.1-8B")
    monkeypatch.setattr(CONFIG.API, "APIKEY", "test-key")
    with pytest.raises(UserError, match="is local"):
        remote_mod.connect("smollm2")
    with pytest.raises(UserError, match="drop --backend"):
        TraceConfig(remote=True, backend="transformer-lens").validate()
