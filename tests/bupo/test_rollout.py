"""Sampling and scoring see the same policy: temperature, left padding, position ids, pi^k read-out."""

import pytest
import torch
import torch.nn.functional as F

from entropylens.bupo.grpo import token_logprobs
from entropylens.bupo.rollout import generate_rollouts, policy_logits
from entropylens.core.lens import make_lens
from entropylens.model.layout import final_norm

TEXTS = ["1+2=", "what is 40+2?", "7*6"]  # different lengths -> left padding matters


def _independent_output_logprobs(model, ro, temperature):
    """Full forward without the trainer's helpers, positions as generate() assigns them."""
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    attn = torch.cat([ro.prompt_mask, torch.ones_like(ro.completion_ids)], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.double()
    P, T = ro.prompt_ids.shape[1], ro.completion_ids.shape[1]
    lp = F.log_softmax(logits[:, P - 1 : P + T - 1] / temperature, -1)
    return lp.gather(-1, ro.completion_ids[..., None])[..., 0]


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampling_and_scoring_use_the_same_tempered_policy(model, char_tokenizer, temperature):
    ro = generate_rollouts(model, char_tokenizer, TEXTS, 2, temperature, 8, seed=0, keep_scores=True)
    assert ro.prompt_mask.min() == 0  # left padding present
    with torch.no_grad():
        _, output = policy_logits(model, ro, layer=1)
    scored = token_logprobs(output, ro.completion_ids, temperature)
    # generate's processed scores are logits / T: their log-softmax is the sampling distribution
    sampled = torch.stack([F.log_softmax(s.double(), -1) for s in ro.scores], 1)
    sampled = sampled.gather(-1, ro.completion_ids[..., None])[..., 0]
    m = ro.mask.bool()
    assert torch.allclose(scored[m].double(), sampled[m], atol=1e-4)
    independent = _independent_output_logprobs(model, ro, temperature)
    assert torch.allclose(scored[m].double(), independent[m], atol=1e-5)


def test_generation_is_seeded(model, char_tokenizer):
    a = generate_rollouts(model, char_tokenizer, TEXTS, 2, 1.0, 6, seed=3)
    b = generate_rollouts(model, char_tokenizer, TEXTS, 2, 1.0, 6, seed=3)
    c = generate_rollouts(model, char_tokenizer, TEXTS, 2, 1.0, 6, seed=4)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    assert len(a.texts) == 6 and torch.equal(a.prompt_ids[0], a.prompt_ids[1])  # groups are consecutive


@pytest.mark.parametrize("k", [1, 2])
def test_internal_policy_is_raw_residual_through_unembedding(model, char_tokenizer, k):
    ro = generate_rollouts(model, char_tokenizer, TEXTS, 2, 1.0, 5, seed=1)
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    attn = torch.cat([ro.prompt_mask, torch.ones_like(ro.completion_ids)], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        internal, _ = policy_logits(model, ro, layer=k)
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=True)
    hs = out.hidden_states
    P, T = ro.prompt_ids.shape[1], ro.completion_ids.shape[1]
    expected = hs[k][:, P - 1 : P + T - 1].double() @ model.lm_head.weight.double().T  # no final norm
    assert torch.allclose(internal.double(), expected, atol=1e-4)


def test_top_layer_policy_skips_the_final_norm(model, char_tokenizer):
    """k = L reads the last layer's raw output: final_norm of it reproduces the model's own logits."""
    ro = generate_rollouts(model, char_tokenizer, TEXTS, 2, 1.0, 5, seed=2)
    L = model.config.num_hidden_layers
    captured = []
    hook = model.model.layers[L - 1].register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        internal, output = policy_logits(model, ro, layer=L)
    hook.remove()
    P, T = ro.prompt_ids.shape[1], ro.completion_ids.shape[1]
    h = captured[0][:, P - 1 : P + T - 1]
    assert torch.allclose(internal, make_lens("bupo", model, live=True).logits_fp32(h), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(model.lm_head(final_norm(model)(h)), output, atol=1e-5)
    assert not torch.allclose(internal, output, atol=1e-2)


def test_live_bupo_lens_applies_bias_and_softcap(model):
    h = torch.randn(2, 3, 32)
    model.config.final_logit_softcapping = 5.0
    got = make_lens("bupo", model, live=True).logits_fp32(h)
    assert got.abs().max() < 5.0
    assert torch.allclose(got, 5.0 * torch.tanh(h @ model.lm_head.weight.T / 5.0), atol=1e-5)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("k", [1, 2])
def test_trainer_pi_k_is_the_tracers_lens(model, char_tokenizer, k, softcap):
    """pi^k as the trainer optimises it (policy_logits -> log_softmax) = the tracer's decode of the same H^k
    (make_lens("bupo") + the decode engine): entropy within 1e-5 nats; log p of the sampled tokens within
    1e-5 nats + 1e-5 relative (the trainer's logits are fp32: ~6e-8·|z| rounding at log p ~ -30)."""
    from entropylens.core.decode import decode_rows
    from entropylens.core.lens import make_lens

    model.config.final_logit_softcapping = softcap
    ro = generate_rollouts(model, char_tokenizer, TEXTS, 2, 1.0, 6, seed=5)
    P, T = ro.prompt_ids.shape[1], ro.completion_ids.shape[1]
    captured = []
    keep = lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o)  # noqa: E731
    hook = model.model.layers[k - 1].register_forward_hook(keep)
    model.requires_grad_(True)
    try:
        internal, _ = policy_logits(model, ro, layer=k)
    finally:
        hook.remove()
    internal.sum().backward()  # differentiable: the gradient reaches W_U
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    logp = F.log_softmax(internal.detach().double(), -1)  # (n, T, V)
    H_trainer = -(logp.exp() * logp).sum(-1)
    lp_trainer = logp.gather(-1, ro.completion_ids[..., None])[..., 0]
    h = captured[0][:, P - 1 : P + T - 1].detach()  # (n, T, d) the same hidden states H^k
    lens = make_lens("bupo", model, final_norm(model))
    stats = decode_rows(h.reshape(-1, h.shape[-1]), lens, targets=ro.completion_ids.reshape(-1))
    assert (stats.entropy.double().reshape(H_trainer.shape) - H_trainer).abs().max() < 1e-5
    assert torch.allclose(stats.logp_target.double().reshape(lp_trainer.shape), lp_trainer, rtol=1e-5, atol=1e-5)
