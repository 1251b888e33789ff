"""95 % intervals for the numbers users read: accuracies and their gains, by bootstrap over the unit that was
sampled independently (prompts for held-out accuracy), never over the samples within one unit.

Percentile bootstrap, seeded, 10,000 resamples by default: with n units the interval of a mean is close to
mean ± 1.96·sd/√n for large n and stays inside the range of the data for small n (no negative accuracies).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

N_BOOT = 10_000
LEVEL = 0.95
Z95 = 1.96  # two-sided 95 % normal quantile, as stored in stages.json (`*_ci95`)
CI95_TOKENS = "95 % interval of the mean, 1.96·std/√n over tokens"  # how figures name `normal_ci95` bars


def bootstrap_means(values: Sequence[float] | np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """Means of `n_boot` resamples (with replacement) of `values`: the bootstrap distribution of the mean."""
    x = np.asarray(values, dtype=np.float64)  # (n,)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"need a non-empty 1-D array of per-unit values, got shape {x.shape}")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))  # (B, n)
    return x[idx].mean(axis=1)  # (B,)


def mean_ci(values: Sequence[float] | np.ndarray, level: float = LEVEL, n_boot: int = N_BOOT,
            seed: int = 0) -> dict[str, float | int]:
    """Mean of per-unit values with a percentile-bootstrap interval: {mean, lo, hi, n}."""
    x = np.asarray(values, dtype=np.float64)
    boots = bootstrap_means(x, n_boot, seed)
    a = (1.0 - level) / 2
    lo, hi = np.quantile(boots, [a, 1.0 - a])
    return {"mean": float(x.mean()), "lo": float(lo), "hi": float(hi), "n": int(x.size)}


def paired_gain_ci(base: Sequence[float], trained: Sequence[float], level: float = LEVEL, n_boot: int = N_BOOT,
                   seed: int = 0) -> dict[str, float | int | str]:
    """Mean gain trained − base over the same units, with a paired bootstrap interval (resampling units, so
    both sides of a unit move together) and the fraction of resampled gains ≤ 0 (a one-sided p-value)."""
    b, t = np.asarray(base, dtype=np.float64), np.asarray(trained, dtype=np.float64)
    if b.shape != t.shape:
        raise ValueError(f"paired values need equal shapes, got {b.shape} and {t.shape}")
    d = t - b  # (n,)
    boots = bootstrap_means(d, n_boot, seed)
    a = (1.0 - level) / 2
    lo, hi = np.quantile(boots, [a, 1.0 - a])
    return {"gain": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": int(d.size),
            "p_le_0": float((boots <= 0).mean()), "method": f"paired bootstrap over units, {n_boot} resamples"}


def normal_ci95(std, count):
    """Half-width of the 95 % normal-approximation interval of a mean, 1.96·std/√count, treating the `count`
    values as independent (tokens of one response are not: see `pooled_mean_diff_ci` for intervals over
    responses). NaN where count < 2. Scalars or arrays / Series alike."""
    std, count = np.asarray(std, dtype=np.float64), np.asarray(count, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(count > 1, Z95 * std / np.sqrt(count), np.nan)
    return float(out) if out.ndim == 0 else out


# Two-sided 95 % Student-t quantiles t_{0.975, df}; a df between two entries takes the lower one (wider).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def ratio_ci95(ratios: Sequence[float] | np.ndarray) -> dict[str, float | int]:
    """Geometric mean of paired ratios (one per round of a benchmark) with a 95 % Student-t interval on their
    logs: {mean, lo, hi, n}. Timing ratios are skewed and n is small (3-10 rounds), hence logs and t, not a
    bootstrap. lo = hi = NaN when n < 2."""
    x = np.log(np.asarray(ratios, dtype=np.float64))  # (n,)
    n, m = x.size, float(np.exp(x.mean()))
    if n < 2:
        return {"mean": m, "lo": float("nan"), "hi": float("nan"), "n": n}
    t = T975[max(k for k in T975 if k <= n - 1)] if n - 1 <= 120 else Z95
    half = t * x.std(ddof=1) / np.sqrt(n)
    return {"mean": m, "lo": float(np.exp(x.mean() - half)), "hi": float(np.exp(x.mean() + half)), "n": n}


def fmt_ci(mean: float, lo: float, hi: float, digits: int = 3) -> str:
    """`0.231 [0.180, 0.284]`: a number as users read it."""
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def bootstrap_counts(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """(n_boot, n) multiplicities of n units in each resample: resampling as weights, so a statistic over many
    columns (layers, sites) is one matrix product per resample set."""
    if n <= 0:
        raise ValueError("need at least one unit to resample")
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def pooled_mean_diff_ci(sums_a: np.ndarray, counts_a: np.ndarray, sums_b: np.ndarray, counts_b: np.ndarray,
                        level: float = LEVEL, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, np.ndarray]:
    """Pooled means Σsum/Σcount of two groups of units (e.g. responses: per-unit token sums and counts, one column
    per layer), their difference a − b, and its percentile interval resampling units within each group: the
    tokens of one response move together, so the interval reflects how many responses there are, not tokens."""
    a = (1.0 - level) / 2
    mean = {}
    boots = {}
    for key, s, c, sd in (("a", sums_a, counts_a, seed), ("b", sums_b, counts_b, seed + 1)):
        s, c = np.asarray(s, dtype=np.float64), np.asarray(c, dtype=np.float64)  # (n, K)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean[key] = s.sum(0) / c.sum(0)
            m = bootstrap_counts(len(s), n_boot, sd)  # (B, n)
            boots[key] = (m @ s) / (m @ c)  # (B, K)
    d = boots["a"] - boots["b"]  # NaN where a resample holds no tokens of a column (e.g. a site not traced)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns give NaN bounds
        lo, hi = np.nanquantile(d, [a, 1.0 - a], axis=0)
    return {"mean_a": mean["a"], "mean_b": mean["b"], "diff": mean["a"] - mean["b"], "lo": lo, "hi": hi}
