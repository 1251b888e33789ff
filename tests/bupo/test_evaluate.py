"""Avg@K / Pass@K: the unbiased estimator against brute-force enumeration; evaluate() end to end."""

from itertools import combinations

import pytest

from entropylens.bupo.evaluate import EvalConfig, evaluate, pass_at_k, summarize
from entropylens.errors import UserError


@pytest.mark.parametrize("n,c,k", [(8, 0, 1), (8, 3, 1), (8, 3, 4), (8, 8, 8), (5, 1, 5), (6, 2, 3)])
def test_pass_at_k_equals_enumeration(n, c, k):
    samples = [1] * c + [0] * (n - c)
    subsets = list(combinations(range(n), k))
    brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute)


def test_summarize():
    correct = [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    out = summarize(correct, ks=(1, 4))
    assert out["avg@1"] == pytest.approx((0.25 + 1 + 0) / 3) == out["avg@4"]
    assert out["pass@1"] == pytest.approx((0.25 + 1 + 0) / 3)
    assert out["pass@4"] == pytest.approx(2 / 3)


def test_evaluate_runs_on_a_tiny_model(model, char_tokenizer, prompts):
    def starts_with_digit(text, answer):
        return float(text[:1].isdigit())

    cfg = EvalConfig(n_samples=4, ks=(1, 2), max_new_tokens=4, prompts_per_batch=3)
    out = evaluate(cfg, model, char_tokenizer, prompts, reward_fn=starts_with_digit)
    assert out["n_prompts"] == 4 and [len(r) for r in out["correct"]] == [4] * 4
    flat = [x for r in out["correct"] for x in r]
    assert out["avg@1"] == pytest.approx(sum(flat) / len(flat))
    assert out["pass@2"] >= out["pass@1"]
    with pytest.raises(UserError):
        evaluate(EvalConfig(n_samples=2, ks=(4,)), model, char_tokenizer, prompts)
