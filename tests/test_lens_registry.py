"""One definition per lens: a lens registered here is traced, decoded by `entropylens.decode` and trained as pi^k,
with no other module touched; unknown lenses are one line everywhere."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import entropylens as el
from entropylens.bupo.grpo import token_entropy
from entropylens.bupo.rollout import generate_rollouts, policy_logits
from entropylens.core.lens import LENSES, lens_names, make_lens, register_lens
from entropylens.errors import UserError
from tiny import build_tiny, make_char_llama, make_char_tokenizer


def _half(model, final_norm, live):
    """The bupo lens at temperature 2: softmax(H W_U^T / 2) — a lens of our own, built on the registry's bupo."""
    base = make_lens("bupo", model, final_norm, live=live)
    return replace(base, name="half", W=base.W * 0.5, bias=None if base.bias is None else base.bias * 0.5)


@pytest.fixture
def half_lens():
    register_lens("half", _half, reads_final_norm=False, doc="bupo at temperature 2 (a test lens)")
    yield "half"
    del LENSES["half"]


def _entropy64(x: torch.Tensor, W: torch.Tensor, scale: float) -> torch.Tensor:
    lp = torch.log_softmax(scale * (x.detach().double() @ W.detach().double().T), -1)
    return -(lp.exp() * lp).sum(-1)


def test_a_registered_lens_is_traced_and_decoded(half_lens, smol_tokenizer, tmp_path):
    model = build_tiny("llama").eval()
    run = el.trace(model, ["What is 2 + 3?", "Name a colour."], tokenizer=smol_tokenizer, lens=half_lens,
                   max_new_tokens=3, sites=("attn", "layer"), name="half", cache=str(tmp_path), topk=2)
    assert set(run.entropy["lens"]) == {"half"} and set(run.topk["lens"]) == {"half"}
    assert run.manifest["lens"] == ["half"]
    # independent fp64: H^1 from the model's own hidden states, decoded as softmax(H W_U^T / 2)
    toks = run.tokens[run.tokens["prompt_idx"] == 0].sort_values("position")
    with torch.no_grad():
        h1 = model(input_ids=torch.tensor([toks["token_id"].tolist()]), output_hidden_states=True).hidden_states[1][0]
    want = _entropy64(h1, model.lm_head.weight, 0.5)  # (T,) from the raw H^1
    e = run.entropy
    got = e[(e["prompt_idx"] == 0) & (e["layer"] == 1)].sort_values("position")["H_layer"].to_numpy()
    assert abs(got - want.numpy()).max() < 1e-4
    assert abs(got - _entropy64(h1, model.lm_head.weight, 1.0).numpy()).max() > 0.05  # not the bupo lens
    dec = el.decode(h1, model, lens=half_lens)
    assert (dec.entropy.double() - want).abs().max() < 1e-4 and dec.lens == half_lens


def test_a_registered_lens_is_pi_k(half_lens):
    model, tok = make_char_llama(layers=2), make_char_tokenizer()
    ro = generate_rollouts(model, tok, ["1+2=", "7*6"], 2, 1.0, 4, seed=0)
    with torch.no_grad():
        half, _ = policy_logits(model, ro, layer=1, lens=half_lens)
        bupo, _ = policy_logits(model, ro, layer=1)
    assert torch.allclose(half, 0.5 * bupo, atol=1e-5)
    assert (token_entropy(half, 1.0) - token_entropy(bupo, 1.0)).abs().max() > 0.01
    # the gradient reaches W_U through the registered lens (built live inside the forward)
    model.zero_grad()
    half, _ = policy_logits(model, ro, layer=1, lens=half_lens)
    half.logsumexp(-1).sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_unknown_lens_is_one_line_everywhere():
    with pytest.raises(UserError, match="unknown lens 'nope'"):
        lens_names("nope")
    from entropylens.tracing.config import TraceConfig

    with pytest.raises(UserError, match="unknown --lens 'nope'; choose bupo, logit"):
        TraceConfig(lens="nope").validate()
    with pytest.raises(UserError, match="unknown lens 'nope'"):
        el.decode(torch.zeros(2, 4), torch.zeros(8, 4), lens="nope")
    assert lens_names("both") == ["bupo", "logit"]


def test_a_bare_unembedding_has_no_final_norm():
    with pytest.raises(UserError, match="needs the model's final norm"):
        el.decode(torch.zeros(2, 4), torch.zeros(8, 4), lens="logit")
