"""One optimiser pass of the BuPO trainer over a rollout batch: the phase's policy, its loss, PPO mini-batches.

Split from `trainer` (which owns the config, the loop and the files). The phase decides the policy: pi^k
(`policy_logits`, lens `bupo`) in the internal phase with layers > k and the final norm frozen, the output policy
after it. The `paper` objective and the mini-batch schedule follow the authors' verl fork (docs/bupo-fidelity.md).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import nn

from entropylens.bupo import distributed
from entropylens.bupo.grpo import LossScale, chunk_weight, grpo_loss, token_entropy, token_kl, token_logprobs
from entropylens.bupo.metrics import STAT_KEYS
from entropylens.bupo.rollout import Rollouts, policy_logits
from entropylens.core.lens import lens_spec
from entropylens.model.layout import decoder_layers, final_norm

if TYPE_CHECKING:
    from entropylens.bupo.config import BupoConfig

def set_phase(model: nn.Module, layer: int, phase: str, lens: str = "bupo") -> None:
    """Every parameter trains, except, during the internal phase, layers > k and the final norm (unless pi^k's
    lens reads it: then it is part of pi^k)."""
    model.requires_grad_(True)
    if phase == "internal":
        frozen = decoder_layers(model)[layer:]
        for module in [*frozen] if lens_spec(lens).reads_final_norm else [*frozen, final_norm(model)]:
            module.requires_grad_(False)


def _score_chunk(model, ro: Rollouts, layer: int, rows: slice, phase: str, temperature: float, runner=None,
                 lens: str = "bupo"):
    """Log-probs of the sampled tokens under the phase's policy, plus both policies' logits."""
    internal, output = policy_logits(model, ro, layer, rows, runner, lens)  # (n, T, V) each
    policy = internal if phase == "internal" else output
    return token_logprobs(policy, ro.completion_ids[rows], temperature), internal, output  # (n, T)


def _update(model, ro: Rollouts, adv, old, ref, cfg: BupoConfig, phase: str, *, scale: LossScale | None = None,
            runner=None, acc=None, keep_logp: list | None = None) -> dict[str, float]:
    """One accumulated backward over all micro-batches; returns summed statistics for the metrics.

    Sharded over ranks, `scale` is the global batch's (else this batch's) and `runner` the DDP/FSDP
    wrapper of `model`: only the last micro-batch's backward all-reduces (the others run in no_sync).
    `keep_logp`, if given, collects each micro-batch's log-probs of the sampled tokens (detached, (n, T)).
    """
    scale = scale or LossScale.of(ro.mask)
    N, s = ro.completion_ids.shape[0], dict(loss=0.0, H_k=0.0, H_out=0.0, kl=0.0, clipped=0.0)
    for start in range(0, N, cfg.micro_batch_size):
        rows, last = slice(start, start + cfg.micro_batch_size), start + cfg.micro_batch_size >= N
        with nullcontext() if acc is None or last else acc.no_sync(runner):
            s = _accumulate(model, ro, adv, old, ref, cfg, phase, rows, scale, runner, s, keep_logp)
    return s


def _accumulate(model, ro: Rollouts, adv, old, ref, cfg: BupoConfig, phase: str, rows: slice, scale: LossScale,
                runner, s: dict[str, float], keep_logp: list | None = None) -> dict[str, float]:
    """Forward and backward of one micro-batch, its loss weighted into the global batch's; adds to `s`."""
    logp, internal, output = _score_chunk(model, ro, cfg.internal_layer, rows, phase, cfg.temperature, runner,
                                          cfg.lens)
    if keep_logp is not None:
        keep_logp.append(logp.detach())  # (n, T)
    m = ro.mask[rows]  # (n, T)
    old_c = logp.detach() if old is None else old[rows]
    loss, clipped = grpo_loss(logp, old_c, adv[rows], m, cfg.epsilon_low, cfg.epsilon_high, cfg.beta,
                              None if ref is None else ref[rows], cfg.loss_agg, cfg.objective)
    with torch.no_grad():
        internal, output = internal.detach(), output.detach()
        s["H_k"] += float((token_entropy(internal, cfg.temperature) * m).sum())
        s["H_out"] += float((token_entropy(output, cfg.temperature) * m).sum())
        s["kl"] += float((token_kl(output, internal, cfg.temperature) * m).sum())
        s["clipped"] += float(clipped.sum())
    del internal, output  # frees the graph of the branch that gets no gradient
    w = chunk_weight(m, scale, cfg.loss_agg, cfg.objective)
    (loss * w).backward()
    s["loss"] += loss.item() * w
    return s


@torch.no_grad()
def _no_grad_logp(model, ro: Rollouts, cfg: BupoConfig, phase: str) -> torch.Tensor:
    """Log-probs of the sampled tokens under the phase's policy, without gradient (old or reference)."""
    starts = range(0, ro.completion_ids.shape[0], cfg.micro_batch_size)
    rows = [slice(i, i + cfg.micro_batch_size) for i in starts]
    return torch.cat([_score_chunk(model, ro, cfg.internal_layer, r, phase, cfg.temperature, lens=cfg.lens)[0]
                      for r in rows])  # (N, T)


def _clip(acc, params: list[nn.Parameter], max_norm: float) -> float:
    """Clip to the global gradient norm (over all ranks' shards under FSDP) and return that norm."""
    if acc is None:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    norm = acc.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP 2 returns a DTensor


def optimise_batch(model, runner, opt, params: list[nn.Parameter], ro: Rollouts, adv: torch.Tensor, ref_model,
                   cfg: BupoConfig, phase: str, acc=None) -> tuple[dict[str, float], float, torch.Tensor]:
    """num_iterations passes over one rollout batch, each `mini_batches` optimiser steps (verl's update_policy).

    Each mini-batch is an equal block of whole prompt groups, its loss normalised over itself (the global
    mini-batch's counts under DDP). With more than one step per batch, the ratio's old log-probs are the phase's
    policy before the first step (one pass without gradient, as verl's compute_log_prob); else the update's own,
    detached (ratio 1). Returns the first pass's summed statistics, the mean gradient norm (before clipping) of its
    optimiser steps, and the trained policy's log-probs of the sampled tokens before the batch's first step (N, T).
    """
    N, n_mb = ro.completion_ids.shape[0], cfg.mini_batches
    old = _no_grad_logp(model, ro, cfg, phase) if cfg.num_iterations > 1 or n_mb > 1 else None
    ref = _no_grad_logp(ref_model, ro, cfg, phase) if ref_model is not None else None
    size = N // n_mb
    blocks = [slice(i * size, (i + 1) * size) for i in range(n_mb)]
    scales = [LossScale.from_ranks(distributed.gather_rows(acc, LossScale.local(ro.mask[b])[None])) for b in blocks]
    s, norms, before = dict.fromkeys(STAT_KEYS, 0.0), [], []  # metrics describe the first pass over this batch
    for it in range(cfg.num_iterations):
        for b, scale in zip(blocks, scales):
            opt.zero_grad(set_to_none=True)
            part = _update(model, ro.select(b), adv[b], None if old is None else old[b],
                           None if ref is None else ref[b], cfg, phase, scale=scale, runner=runner, acc=acc,
                           keep_logp=before if it == 0 and old is None else None)
            norms.append(_clip(acc, params, cfg.max_grad_norm))
            opt.step()
            if it == 0:
                s = {k: s[k] + part[k] / (n_mb if k == "loss" else 1) for k in STAT_KEYS}  # loss: mean of steps
    opt.zero_grad(set_to_none=True)
    return s, sum(norms[:n_mb]) / n_mb, old if old is not None else torch.cat(before)


@torch.no_grad()
def _update_effect(model, ro: Rollouts, adv: torch.Tensor, before: torch.Tensor, cfg: BupoConfig,
                   phase: str, after: bool = True) -> list[float]:
    """[tokens with advantage != 0, sum log-prob before, sum after, sum A * (after - before)] over masked tokens.

    `before` (N, T) are the trained policy's log-probs of the sampled tokens from the update's own forward;
    the log-probs after the step need one more forward without gradient (~12 % of a step on SmolLM2), so the
    trainer asks for them in the internal phase only, where they show that pi^k moves; else they are NaN.
    """
    m = ro.mask  # (N, T)
    signal = float((m * (adv != 0)[:, None]).sum())
    if not after:
        return {"signal_tokens": signal, "logp_before": float((before * m).sum()), "logp_after": math.nan,
                "adv_gain": math.nan}
    lp = _no_grad_logp(model, ro, cfg, phase)  # (N, T)
    return {"signal_tokens": signal, "logp_before": float((before * m).sum()), "logp_after": float((lp * m).sum()),
            "adv_gain": float((adv[:, None] * (lp - before) * m).sum())}
