"""Our internal phase against the authors' code, re-implemented here in plain torch from their code (not ours).

Their code: github.com/Trae1ounG/BuPO (a verl fork), commit d3a85c6. The functions prefixed `their_` follow it
line by line (file:line in each docstring; docs/bupo-fidelity.md has the full comparison):

- pi^k: `verl/models/custom_model/modeling_llama.py:567-570`: `mid_layer_logits[k0] = lm_head(hidden_states[k0+1])`
  with a 0-indexed k0 (their comment: "startk = 0 equals to layer 1 in paper"), no final norm;
- log-probs: `verl/workers/actor/dp_actor.py:460-470` (logits / temperature, `logprobs_from_logits`), the
  response slice `[:, -response_length - 1 : -1]` (dp_actor.py:522);
- old log-probs: `compute_log_prob` (dp_actor.py:804-810), the same layer-k forward without gradient;
- loss: `verl/trainer/ppo/core_algos.py:867-893` (`compute_policy_loss_vanilla`: log-ratio clamped to +-20,
  two-sided clip, dual-clip at `clip_ratio_c` = 10 from `run_code/*.sh`), `agg_loss` token-mean =
  `masked_mean` (core_algos.py:720-721, `verl/utils/torch_functional.py:184-198`);
- update: `update_policy` (dp_actor.py:867-971): mini-batches, each micro-batch's loss times
  1 / gradient_accumulation, backward, grad-norm clip, optimizer step per mini-batch;
- advantages: `compute_grpo_outcome_advantage` (core_algos.py:299-326).

Nothing is frozen in their internal phase: every parameter requires grad, and the ones the layer-k loss does not
reach get none. Our trainer freezes layers > k and the final norm instead; the tests check that the sets of
parameters with a nonzero gradient are the same and that every gradient agrees within 1e-6 relative. Both run in
fp64 (the trainer keeps fp64 where a model has it), so the tolerance is about the formulas, not fp32 round-off.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np
import pytest
import torch
from tiny import make_char_llama

from entropylens.bupo.grpo import completion_mask, group_advantages
from entropylens.bupo.rollout import Rollouts
from entropylens.bupo.trainer import BupoConfig, _update, optimise_batch, set_phase

K = 2  # our 1-indexed layer k; theirs is k0 = K - 1
G, B, P, T = 4, 3, 5, 7  # group size, prompts, prompt and completion widths
PAD, EOS = 0, 1
TEMP = 0.7


def their_grpo_advantages(scores: torch.Tensor, index: np.ndarray, epsilon: float = 1e-6) -> torch.Tensor:
    """core_algos.py:299-326 with norm_adv_by_std_in_grpo=True (token-level rewards summed to one score each)."""
    scores = scores.clone()
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    for i in range(scores.shape[0]):
        id2score[index[i]].append(scores[i])
    for idx in id2score:
        if len(id2score[idx]) == 1:
            id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            st = torch.stack(id2score[idx])
            id2mean[idx], id2std[idx] = torch.mean(st), torch.std(st)
    for i in range(scores.shape[0]):
        scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
    return scores


def their_layer_k_logprobs(model, input_ids, attention_mask, position_ids, responses, k0: int, temperature: float):
    """modeling_llama.py:567-570 + dp_actor.py:446-470, 513-522, on padded inputs (their rmpad path without
    padding tokens computes the same values at the real tokens)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                output_hidden_states=True)
    logits = model.lm_head(out.hidden_states[k0 + 1])  # mid_layer_logits[k0]: raw residual, no final norm
    logits = logits / temperature  # logits_rmpad.div_(temperature)
    logits = logits[:, -responses.shape[1] - 1 : -1]  # the response slice
    labels = torch.gather(logits, -1, responses.unsqueeze(-1)).squeeze(-1)  # logprobs_from_logits_v2 (fp32)
    return labels - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])


def their_masked_mean(values, mask):
    """verl/utils/torch_functional.py:176-198."""
    return (torch.where(mask.bool(), values, 0.0) * mask).sum() / (mask.sum() + 1e-8)


def their_policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_low=0.2, clip_high=0.2, clip_c=10.0):
    """compute_policy_loss_vanilla, core_algos.py:867-893, loss_agg_mode token-mean; advantages (bs, T)."""
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * clip_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    return their_masked_mean(pg_losses, response_mask)


def their_inputs(ro: Rollouts):
    """verl's batch: prompt (left-padded) + response (right-padded); attention mask = prompt mask + response mask;
    position ids = clamp(cumsum(attention_mask) - 1, 0)."""
    input_ids = torch.cat([ro.prompt_ids, ro.completion_ids], dim=1)
    attention_mask = torch.cat([ro.prompt_mask, ro.mask.long()], dim=1)
    position_ids = torch.clamp(attention_mask.cumsum(-1) - 1, min=0)
    return input_ids, attention_mask, position_ids


def their_update_policy(model, ro, advantages, old_log_probs, mini_bsz: int, micro_bsz: int, optimizer=None,
                        k0: int = K - 1, grad_clip: float = 1.0) -> list[float]:
    """update_policy, dp_actor.py:867-971 (ppo_epochs 1, no entropy / KL terms, use_dynamic_bsz False): returns
    each micro-batch's policy_loss * loss_scale_factor. Without an optimizer, one mini-batch and no step."""
    input_ids, attention_mask, position_ids = their_inputs(ro)
    adv = advantages[:, None] * ro.mask  # compute_grpo_outcome_advantage: scores.unsqueeze(-1) * response_mask
    losses = []
    for start in range(0, adv.shape[0], mini_bsz):
        gradient_accumulation = mini_bsz // micro_bsz
        if optimizer is not None:
            optimizer.zero_grad()
        for ms in range(start, start + mini_bsz, micro_bsz):
            mc = slice(ms, ms + micro_bsz)
            log_prob = their_layer_k_logprobs(model, input_ids[mc], attention_mask[mc], position_ids[mc],
                                              ro.completion_ids[mc], k0, TEMP)
            pg_loss = their_policy_loss(old_log_probs[mc], log_prob, adv[mc], ro.mask[mc])
            loss = pg_loss * (1 / gradient_accumulation)
            loss.backward()
            losses.append(float(loss.detach()))
        if optimizer is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=grad_clip)
            optimizer.step()
    return losses


@torch.no_grad()
def their_old_log_probs(model, ro: Rollouts, k0: int = K - 1) -> torch.Tensor:
    """compute_log_prob, dp_actor.py:804-810: the layer-k forward without gradient while global_steps <= s_inter."""
    input_ids, attention_mask, position_ids = their_inputs(ro)
    return their_layer_k_logprobs(model, input_ids, attention_mask, position_ids, ro.completion_ids, k0, TEMP)


def make_batch(seed: int = 0) -> tuple[Rollouts, torch.Tensor]:
    """B prompts x G rollouts of random tokens, left-padded prompts, completions ending at varied EOS, rewards."""
    g = torch.Generator().manual_seed(seed)
    N = B * G
    prompt_ids = torch.randint(3, 40, (N // G, P), generator=g).repeat_interleave(G, 0)
    prompt_mask = torch.ones(N, P, dtype=torch.long)
    for i, n_pad in enumerate([0, 2, 1]):  # prompt b has n_pad left pads
        prompt_ids[i * G:(i + 1) * G, :n_pad], prompt_mask[i * G:(i + 1) * G, :n_pad] = PAD, 0
    completion_ids = torch.randint(3, 40, (N, T), generator=g)
    for i in range(N):
        end = 2 + (i * 5) % (T - 1)  # EOS at position end (or none when end >= T)
        if end < T:
            completion_ids[i, end] = EOS
            completion_ids[i, end + 1:] = PAD
    mask = completion_mask(completion_ids, EOS, PAD)
    rewards = torch.randint(0, 2, (N,), generator=g).float()
    rewards[:G] = torch.tensor([1.0, 0.0, 0.0, 1.0])  # at least one group with signal
    return Rollouts(prompt_ids, prompt_mask, completion_ids, mask, [""] * N), rewards


def grads(model) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_same_gradients(ours: dict, theirs: dict) -> None:
    nonzero = lambda gs: {n for n, g in gs.items() if g is not None and bool(g.abs().max() > 0)}  # noqa: E731
    assert nonzero(ours) == nonzero(theirs)
    assert any(n.startswith("model.layers.0.") for n in nonzero(theirs))  # layers <= k move
    assert not any(n.startswith(f"model.layers.{K}.") for n in nonzero(theirs))  # layers > k do not
    assert "model.norm.weight" not in nonzero(theirs)
    for n in nonzero(theirs):
        err = float((ours[n].double() - theirs[n].double()).norm() / theirs[n].double().norm())
        assert err < 1e-6, f"{n}: relative gradient error {err:.2e}"


def config(**kw) -> BupoConfig:
    return BupoConfig(internal_layer=K, steps=1, internal_steps=1, num_generations=G, prompts_per_step=B,
                      temperature=TEMP, **kw)


@pytest.mark.parametrize("tied", [False, True])
def test_advantages_are_theirs(tied):
    ro, rewards = make_batch(seed=int(tied))
    index = np.repeat(np.arange(B), G)  # uid per prompt
    assert torch.allclose(group_advantages(rewards, G), their_grpo_advantages(rewards, index), rtol=0, atol=1e-7)


@pytest.mark.parametrize("tied", [False, True])
def test_internal_phase_loss_and_gradients_equal_theirs(tied):
    """The study's setting (one micro-batch, one optimiser step per batch): our default objective is theirs."""
    ro, rewards = make_batch()
    adv = group_advantages(rewards, G)
    theirs = make_char_llama(tied=tied, layers=4).double()
    ours = copy.deepcopy(theirs)
    theirs.requires_grad_(True)  # their code freezes nothing
    old = their_old_log_probs(theirs, ro)
    their_loss = their_update_policy(theirs, ro, adv, old, mini_bsz=B * G, micro_bsz=B * G)
    set_phase(ours, K, "internal")
    s = _update(ours, ro, adv, None, None, config(micro_batch_size=B * G), "internal")
    assert abs(s["loss"] - their_loss[0]) <= 1e-6 * abs(their_loss[0]) and their_loss[0] != 0
    assert_same_gradients(grads(ours), grads(theirs))


def off_policy_old(theirs, ro: Rollouts, adv: torch.Tensor) -> torch.Tensor:
    """Old log-probs that put ratios everywhere: inside the clip, beyond 1 +- eps, beyond c = 10 with A < 0, and a
    log-ratio of 30 (clamped to 20)."""
    old = their_old_log_probs(theirs, ro)
    shift = torch.linspace(-3.0, 3.0, old.numel()).view_as(old)  # log-ratios -3 .. 3 (r from 0.05 to 20)
    shift[(adv < 0).nonzero()[0, 0], 0] = 30.0
    beyond_c = (shift > np.log(10.0)) & (adv < 0)[:, None] & ro.mask.bool()
    assert beyond_c.any() and ((shift < -0.5) & ro.mask.bool()).any()  # dual-clip and lower clip both active
    return old - shift


@pytest.mark.parametrize("tied", [False, True])
def test_paper_objective_equals_theirs_off_policy_over_micro_batches(tied):
    """Ratios away from 1 and three micro-batches of unequal token counts: `--objective paper` is their loss;
    the default differs (no dual-clip, the batch's token mean), which is what the flag is for."""
    ro, rewards = make_batch(seed=1)
    adv = group_advantages(rewards, G)
    theirs = make_char_llama(tied=tied, layers=4).double()
    ours, default = copy.deepcopy(theirs), copy.deepcopy(theirs)
    theirs.requires_grad_(True)
    old = off_policy_old(theirs, ro, adv)
    their_loss = sum(their_update_policy(theirs, ro, adv, old, mini_bsz=B * G, micro_bsz=G))
    set_phase(ours, K, "internal")
    s = _update(ours, ro, adv, old, None, config(micro_batch_size=G, objective="paper"), "internal")
    assert abs(s["loss"] - their_loss) <= 1e-6 * abs(their_loss) and their_loss != 0
    assert_same_gradients(grads(ours), grads(theirs))
    set_phase(default, K, "internal")
    d = _update(default, ro, adv, old, None, config(micro_batch_size=G), "internal")
    assert abs(d["loss"] - their_loss) > 1e-3 * abs(their_loss)


@pytest.mark.parametrize("objective", ["entropylens", "paper"])
def test_mini_batch_schedule_equals_their_update_policy(objective):
    """Two mini-batches (two optimiser steps per rollout batch, the second off-policy against the old log-probs
    of the first): the parameters after our `optimise_batch` are theirs after `update_policy`. With whole-batch
    micro-batches both objectives agree with theirs; the second step's ratios != 1 exercise the clip."""
    ro, rewards = make_batch(seed=2)
    adv = group_advantages(rewards, G)
    adv[G:] = adv[G:] * 0 + torch.tensor([1.0, -1.0, 0.5, -0.5] * (B - 1))  # signal in every group
    theirs = make_char_llama(layers=4).double()
    ours = copy.deepcopy(theirs)
    theirs.requires_grad_(True)
    old = their_old_log_probs(theirs, ro)
    lr = 0.05  # SGD: parameter differences equal gradient differences, no Adam normalisation of round-off
    their_update_policy(theirs, ro, adv, old, mini_bsz=G, micro_bsz=G, optimizer=torch.optim.SGD(
        theirs.parameters(), lr=lr))
    cfg = config(micro_batch_size=G, mini_batches=B, objective=objective)
    cfg.max_grad_norm = 1.0
    set_phase(ours, K, "internal")
    params = list(ours.parameters())
    s, norm, before = optimise_batch(ours, ours, torch.optim.SGD(params, lr=lr), params, ro, adv, None, cfg,
                                     "internal")
    m = ro.mask.bool()  # (their attention mask also hides the tokens after EOS, which no loss reads)
    assert torch.allclose(before[m], old[m], rtol=0, atol=1e-10)
    base = dict(make_char_llama(layers=4).double().named_parameters())
    moved = 0
    for (n, p_ours), p_theirs in zip(ours.named_parameters(), theirs.parameters()):
        step_theirs = (p_theirs - base[n]).detach().double()
        step_ours = (p_ours - base[n]).detach().double()
        if step_theirs.abs().max() == 0:
            assert step_ours.abs().max() == 0, n
            continue
        moved += 1
        assert float((step_ours - step_theirs).norm() / step_theirs.norm()) < 1e-5, n
    assert moved > 0
