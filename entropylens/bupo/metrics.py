"""One metrics.jsonl row per training step, reduced over ranks (the keys are documented in the README)."""

from __future__ import annotations

import math

import torch

STAT_KEYS = ("loss", "H_k", "H_out", "kl", "clipped")  # _update's sums
# per-rank row: STAT_KEYS, then tokens, rollouts, seconds, then the signal and the update's effect
RANK_KEYS = (*STAT_KEYS, "tokens", "rollouts", "seconds", "signal_tokens", "logp_before", "logp_after", "adv_gain")


def metrics_row(step: int, phase: str, rewards: torch.Tensor, per_rank: torch.Tensor, grad_norm: float,
                G: int) -> dict:
    """One metrics.jsonl row from all ranks' rewards (B*G,) and per-rank statistics (W, 12) in RANK_KEYS order.

    Sums add over ranks, except the loss: each rank's carries the factor W that DDP's averaging removes,
    so the global batch's loss is their mean. Throughput is over the slowest rank's wall time.
    `signal/*` says how much of the batch carried gradient: groups whose rewards differ, and their tokens.
    `update/*` is the policy being trained (pi^k in the internal phase, the output policy after it) on this
    step's sampled tokens, before and after the optimiser step: `update/adv_logp_gain` = mean A * (after -
    before) over tokens is > 0 when the step moved the policy towards the better-than-average samples.
    """
    t = dict(zip(RANK_KEYS, per_rank.sum(0).tolist()))
    n_tok, world = max(t["tokens"], 1), per_rank.shape[0]
    groups = rewards.view(-1, G)  # (B, G)
    row = {
        "step": step, "phase": phase, "reward/mean": float(rewards.mean()),
        "reward/std": float(rewards.std(unbiased=False)), "entropy/layer_k": t["H_k"] / n_tok,
        "entropy/output": t["H_out"] / n_tok, "kl/output_vs_internal": t["kl"] / n_tok,
        "clip/frac": t["clipped"] / n_tok, "optim/grad_norm": grad_norm,
        "signal/groups_frac": float((groups.max(1).values > groups.min(1).values).float().mean()),
        "signal/tokens": int(t["signal_tokens"]),
        "update/logp_before": t["logp_before"] / n_tok,
        "update/logp_after": _or_none(t["logp_after"] / n_tok), "update/adv_logp_gain": _or_none(t["adv_gain"] / n_tok),
        "completion/len_mean": t["tokens"] / t["rollouts"],
        "perf/tokens_per_s": t["tokens"] / float(per_rank[:, RANK_KEYS.index("seconds")].max()),
        "loss": t["loss"] / world,
    }
    if world > 1:  # scalars (the dashboard tabulates rows): the spread shows how unevenly ranks were loaded
        tok = per_rank[:, RANK_KEYS.index("tokens")]
        row |= {"dist/world_size": world, "dist/tokens_min_rank": int(tok.min()),
                "dist/tokens_max_rank": int(tok.max())}
    return row


def _or_none(x: float) -> float | None:
    return None if math.isnan(x) else x
