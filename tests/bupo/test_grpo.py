"""GRPO tensor functions against independent (loop / float64 / numpy) computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from entropylens.bupo.grpo import (
    aggregate_loss, chunk_weight, clipped_surrogate, completion_mask, group_advantages, grpo_loss, k3_kl,
    token_entropy, token_kl, token_logprobs,
)


def test_group_advantages_match_numpy_and_sum_to_zero():
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 2, (4 * 8,), generator=g).float()
    r[:8] = torch.rand(8, generator=g)  # one group of continuous rewards
    adv = group_advantages(r, 8)
    ref = [(x - x.mean()) / (x.std(ddof=1) + 1e-6) for x in r.numpy().reshape(4, 8)]
    np.testing.assert_allclose(adv.numpy(), np.concatenate(ref), rtol=1e-5, atol=1e-6)
    assert torch.allclose(adv.view(4, 8).sum(1), torch.zeros(4), atol=1e-5)


def test_equal_rewards_give_zero_advantage_without_nan():
    r = torch.tensor([1.0] * 4 + [0.0] * 4 + [0.5, 0.5, 0.5, 0.5])
    adv = group_advantages(r, 4)
    assert not torch.isnan(adv).any() and torch.equal(adv, torch.zeros(12))


def test_group_advantages_rejects_bad_groups():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(6), 1)


def _mask_by_loop(rows, eos, pad):
    out = []
    for row in rows:
        end = len(row)
        while end > 0 and row[end - 1] == pad and pad not in eos:
            end -= 1
        m, done = [], False
        for i, tok in enumerate(row):
            m.append(0.0 if done or i >= end else 1.0)
            done = done or tok in eos
        out.append(m)
    return out


@pytest.mark.parametrize("eos,pad", [(1, 0), (0, 0), ([1, 7], 0), ([7, 0], 0)])
def test_completion_mask_stops_at_first_eos(eos, pad):
    rows = [
        [5, 6, 1, 0, 0, 0],  # EOS then padding
        [5, 1, 6, 1, 0, 0],  # only the first EOS ends it
        [5, 6, 8, 9, 4, 3],  # truncated: all count
        [1, 0, 0, 0, 0, 0],  # immediate EOS
        [0, 0, 0, 0, 0, 0],  # eos == pad: the first pad is the EOS
        [5, 7, 6, 0, 0, 0],
        [5, 0, 6, 1, 0, 0],  # a pad sampled mid-sequence is a real token when pad is not an EOS
    ]
    eos_list = [eos] if isinstance(eos, int) else eos
    got = completion_mask(torch.tensor(rows), eos, pad)
    assert got.tolist() == _mask_by_loop(rows, eos_list, pad)


def test_padding_never_counts():
    ids = torch.tensor([[5, 1, 0, 0], [5, 6, 0, 0], [0, 0, 0, 0]])
    m = completion_mask(ids, eos_id=1, pad_id=0)
    assert m.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]
    m2 = completion_mask(ids, eos_id=0, pad_id=0)  # eos == pad
    assert m2.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0]]


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_token_logprobs_entropy_kl_match_float64(temperature):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g) * 4
    other = torch.randn(3, 5, 11, generator=g) * 4
    ids = torch.randint(0, 11, (3, 5), generator=g)
    z = logits.double() / temperature
    lp = z - torch.logsumexp(z, -1, keepdim=True)
    ref = torch.tensor([[lp[n, t, ids[n, t]].item() for t in range(5)] for n in range(3)])
    assert token_logprobs(logits.half(), ids, temperature).dtype == torch.float32
    assert torch.allclose(token_logprobs(logits, ids, temperature).double(), ref.double(), atol=1e-5)
    assert torch.allclose(token_entropy(logits, temperature).double(), -(lp.exp() * lp).sum(-1), atol=1e-5)
    zq = other.double() / temperature
    lq = zq - torch.logsumexp(zq, -1, keepdim=True)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    assert torch.allclose(token_kl(logits, other, temperature).double(), kl, atol=1e-5)


def test_clipped_surrogate_by_hand():
    ratios = [0.5, 0.9, 1.0, 1.1, 1.5]
    logp = torch.log(torch.tensor([ratios, ratios]))
    old = torch.zeros_like(logp)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1.0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    loss, clipped = clipped_surrogate(logp, old, adv, mask, 0.2, 0.3)
    for n, a in enumerate([2.0, -1.0]):
        for t, r in enumerate(ratios):
            expect = -min(r * a, min(max(r, 0.8), 1.3) * a)
            assert loss[n, t].item() == pytest.approx(expect, rel=1e-6)
            active = (r < 0.8 and a < 0) or (r > 1.3 and a > 0)
            assert clipped[n, t].item() == float(active and mask[n, t] == 1)


def test_k3_is_nonnegative_and_zero_at_equality():
    a = torch.randn(4, 6)
    b = torch.randn(4, 6)
    assert (k3_kl(a, b) >= 0).all() and torch.equal(k3_kl(a, a), torch.zeros(4, 6))


def _agg_by_loop(x, m, mode):
    rows = [[(x[n][t], m[n][t]) for t in range(len(x[0]))] for n in range(len(x))]
    if mode == "token_mean":
        return sum(v * w for r in rows for v, w in r) / sum(w for r in rows for _, w in r)
    if mode == "seq_mean_token_mean":
        return sum(sum(v * w for v, w in r) / sum(w for _, w in r) for r in rows) / len(rows)
    return sum(sum(v * w for v, w in r) / len(r) for r in rows) / len(rows)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_aggregation_and_micro_batch_weights(mode):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 7, generator=g)
    m = (torch.rand(5, 7, generator=g) > 0.3).float()
    m[:, 0] = 1
    full = aggregate_loss(x, m, mode)
    assert full.item() == pytest.approx(_agg_by_loop(x.tolist(), m.tolist(), mode), rel=1e-5)
    chunks = (slice(0, 2), slice(2, 5))
    parts = sum(chunk_weight(m[s], m, mode) * aggregate_loss(x[s], m[s], mode) for s in chunks)
    assert parts.item() == pytest.approx(full.item(), rel=1e-5)


def test_single_update_gradient_is_reinforce_with_baseline():
    """With old = new.detach() the ratio is exactly 1 and the gradient is -(1/N_tok) sum adv grad logp."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, 9, generator=g, requires_grad=True)
    ids = torch.randint(0, 9, (4, 6), generator=g)
    mask = torch.tensor([[1.0] * 6, [1.0] * 3 + [0.0] * 3, [1.0] * 5 + [0.0], [1.0] + [0.0] * 5])
    adv = torch.tensor([1.5, -0.5, 0.25, -1.25])
    logp = token_logprobs(logits, ids, 0.8)
    assert torch.equal(torch.exp(logp - logp.detach()), torch.ones(4, 6))
    loss, clipped = grpo_loss(logp, logp.detach(), adv, mask)
    (grad,) = torch.autograd.grad(loss, logits)
    assert clipped.sum() == 0
    # independent: REINFORCE with baseline via float64 log-softmax
    leaf = logits.detach().double().requires_grad_(True)
    z = leaf / 0.8
    lp = (z - torch.logsumexp(z, -1, keepdim=True)).gather(-1, ids[..., None])[..., 0]
    ref_loss = -(adv.double()[:, None] * lp * mask.double()).sum() / mask.sum()
    (ref,) = torch.autograd.grad(ref_loss, leaf)
    assert torch.allclose(grad.double(), ref, atol=1e-6)
    token_advs = [a * w for a, row in zip(adv.tolist(), mask.tolist()) for w in row]
    expected_value = -sum(token_advs) / mask.sum().item()
    assert math.isclose(loss.item(), expected_value, rel_tol=1e-6)  # ratio 1: loss = -mean token advantage


def test_token_logprobs_gradient_flushes_only_denormals():
    """A peaked softmax over raw-residual logits leaves denormal gradient entries; only those become 0."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 500) * 60  # (N, T, V): e^-100-scale probabilities on most tokens
    ids = torch.randint(0, 500, (2, 3))
    grads = []
    for fn in (token_logprobs, lambda z, i, t: F.log_softmax(z / t, -1).gather(-1, i[..., None])[..., 0]):
        z = logits.clone().requires_grad_(True)
        fn(z, ids, 1.0).sum().backward()
        grads.append(z.grad)
    ours, plain = grads
    tiny = torch.finfo(torch.float32).tiny
    denormal = (plain != 0) & (plain.abs() < tiny)
    assert denormal.sum() > 50  # the case the flush exists for
    assert (ours[denormal] == 0).all()
    assert torch.equal(ours[~denormal], plain[~denormal])
    assert not ((ours != 0) & (ours.abs() < tiny)).any()
