"""Held-out evaluation: Avg@K and Pass@K from n sampled completions per prompt (DESIGN §7).

Avg@K is the mean accuracy over samples (its expectation does not depend on K, so all n samples
are used); Pass@K uses the unbiased estimator of Chen et al. (2021): 1 - C(n-c, K) / C(n, K).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import comb
from typing import Any
from collections.abc import Callable, Sequence

from torch import nn

from entropylens.bupo.rewards import get_reward
from entropylens.bupo.rollout import generate_rollouts
from entropylens.errors import UserError
from entropylens.prompts import Prompt
from entropylens.prompts import render as render_prompt


@dataclass
class EvalConfig:
    """How to sample and score held-out prompts."""

    n_samples: int = 8  # completions sampled per prompt (n >= every K)
    ks: tuple[int, ...] = (1, 8)  # the K values reported as avg@K and pass@K
    temperature: float = 1.0  # sampling temperature
    max_new_tokens: int = 128  # completion length limit
    prompts_per_batch: int = 8  # prompts generated together (rollouts per batch = this * n_samples)
    reward: str = "exact"  # exact | math_verify
    seed: int = 0  # generation seed
    enable_thinking: bool = False  # passed to the chat template


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased P(at least one of k draws without replacement from n samples, c correct, is correct)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def summarize(correct: Sequence[Sequence[float]], ks: Sequence[int]) -> dict[str, float]:
    """avg@K and pass@K averaged over prompts, from per-prompt lists of 0/1 sample rewards."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"avg@{k}"] = sum(sum(r) / len(r) for r in correct) / len(correct)
        out[f"pass@{k}"] = sum(pass_at_k(len(r), int(sum(r)), k) for r in correct) / len(correct)
    return out


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
    reward_fn, n = reward_fn or get_reward(config.reward), config.n_samples
    correct: list[list[float]] = []
    for b in range(0, len(prompts), config.prompts_per_batch):
        batch = prompts[b : b + config.prompts_per_batch]
        ro = generate_rollouts(model, tokenizer, [render(p, tokenizer) for p in batch], n,
                               config.temperature, config.max_new_tokens, seed=config.seed * 1_000_003 + b)
        for i, p in enumerate(batch):
            correct.append([reward_fn(t, str(p.answer)) for t in ro.texts[i * n : (i + 1) * n]])
    return {**summarize(correct, config.ks), "n_prompts": len(prompts), "n_samples": n, "correct": correct}
