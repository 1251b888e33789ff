"""Held-out evaluation: Avg@K and Pass@K from n sampled completions per prompt (docs/definitions.md#evaluation).

Avg@K is the mean accuracy over samples (its expectation does not depend on K, so all n samples
are used); Pass@K uses the unbiased estimator of Chen et al. (2021): 1 - C(n-c, K) / C(n, K).
Every figure carries a 95 % interval by bootstrap over prompts (`entropylens.analysis.intervals`), and the gain of a
trained model over its base is a paired bootstrap over the same prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Any
from collections.abc import Callable, Sequence

from torch import nn

from entropylens.data.rewards import check_references, get_reward
from entropylens.bupo.rollout import generate_rollouts
from entropylens.errors import UserError
from entropylens.analysis.intervals import mean_ci, paired_gain_ci
from entropylens.data.prompts import Prompt
from entropylens.data.prompts import render as render_prompt


@dataclass
class EvalConfig:
    """How to sample and score held-out prompts."""

    n_samples: int = 8  # completions sampled per prompt (n >= every K)
    ks: tuple[int, ...] = (1, 8)  # the K values reported as avg@K and pass@K
    temperature: float = 1.0  # sampling temperature
    max_new_tokens: int = 128  # completion length limit
    prompts_per_batch: int = 8  # prompts generated together (rollouts per batch = this * n_samples)
    reward: str = "exact"  # a rule of entropylens.data.rewards.RULES
    seed: int = 0  # generation seed
    enable_thinking: bool = False  # passed to the chat template


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased P(at least one of k draws without replacement from n samples, c correct, is correct)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def per_prompt(correct: Sequence[Sequence[float]], metric: str) -> list[float]:
    """One value per prompt of `avg@K` or `pass@K`, from per-prompt lists of 0/1 sample rewards."""
    kind, k = metric.split("@")
    if kind == "avg":
        return [sum(r) / len(r) for r in correct]
    return [pass_at_k(len(r), int(sum(r)), int(k)) for r in correct]


def summarize(correct: Sequence[Sequence[float]], ks: Sequence[int]) -> dict[str, Any]:
    """avg@K and pass@K averaged over prompts, each with a 95 % interval `<metric>_ci` (bootstrap over prompts)."""
    out: dict[str, Any] = {}
    for k in ks:
        for metric in (f"avg@{k}", f"pass@{k}"):
            ci = mean_ci(per_prompt(correct, metric))
            out[metric], out[f"{metric}_ci"] = ci["mean"], [ci["lo"], ci["hi"]]
    return out


def gains(base: dict[str, Any], trained: dict[str, Any], ks: Sequence[int]) -> dict[str, dict]:
    """trained − base for every avg@K / pass@K, paired over the same held-out prompts, with a 95 % interval."""
    return {m: paired_gain_ci(per_prompt(base["correct"], m), per_prompt(trained["correct"], m))
            for k in ks for m in (f"avg@{k}", f"pass@{k}")}


def evaluate(
    config: EvalConfig,
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    render: Callable[[Prompt, Any], str] | None = None,
    reward_fn: Callable[[str, str], float] | None = None,
) -> dict[str, Any]:
    """Sample n completions per held-out prompt; return avg@K, pass@K and the per-prompt correctness."""
    if not prompts or any(k > config.n_samples or k < 1 for k in config.ks):
        raise UserError(f"need prompts and 1 <= K <= n_samples ({config.n_samples}) for K in {config.ks}")
    if render is None:
        render = lambda p, tok: render_prompt(p, tok, enable_thinking=config.enable_thinking)  # noqa: E731
    if reward_fn is None:
        check_references(prompts, config.reward, "held-out prompt")
    reward_fn, n = reward_fn or get_reward(config.reward), config.n_samples
    correct: list[list[float]] = []
    for b in range(0, len(prompts), config.prompts_per_batch):
        batch = prompts[b : b + config.prompts_per_batch]
        ro = generate_rollouts(model, tokenizer, [render(p, tokenizer) for p in batch], n,
                               config.temperature, config.max_new_tokens, seed=config.seed * 1_000_003 + b)
        for i, p in enumerate(batch):
            correct.append([reward_fn(t, str(p.answer)) for t in ro.texts[i * n : (i + 1) * n]])
    return {**summarize(correct, config.ks), "n_prompts": len(prompts), "n_samples": n, "correct": correct}
