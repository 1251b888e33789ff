"""Bootstrap and t intervals against cases whose answer is known independently."""

import itertools

import numpy as np
import pytest

from entropylens.analysis.intervals import bootstrap_means, fmt_ci, mean_ci, normal_ci95, paired_gain_ci, ratio_ci95


def test_bootstrap_matches_the_exact_resampling_distribution():
    """n = 4: all 4^4 equally likely resamples enumerated give the exact distribution of the resampled mean."""
    x = np.array([0.0, 0.25, 1.0, 1.0])
    exact = np.array([np.mean(c) for c in itertools.product(x, repeat=4)])  # (256,)
    boots = bootstrap_means(x, n_boot=200_000, seed=1)
    for q in (0.025, 0.5, 0.975):
        assert np.mean(boots <= np.quantile(exact, q)) == pytest.approx(np.mean(exact <= np.quantile(exact, q)),
                                                                         abs=0.005)
    ci = mean_ci(x, n_boot=200_000, seed=1)
    assert ci["lo"] == pytest.approx(np.quantile(exact, 0.025), abs=0.02)
    assert ci["hi"] == pytest.approx(np.quantile(exact, 0.975), abs=0.02)
    assert ci["mean"] == pytest.approx(0.5625) and ci["n"] == 4


def test_large_sample_interval_is_the_normal_one():
    x = np.random.default_rng(0).binomial(1, 0.3, size=2000).astype(float)
    half = 1.96 * x.std() / np.sqrt(x.size)
    ci = mean_ci(x)
    assert ci["lo"] == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert ci["hi"] == pytest.approx(x.mean() + half, abs=0.1 * half)


def test_constant_values_give_a_point_and_intervals_stay_in_range():
    assert mean_ci([0.5] * 7) == {"mean": 0.5, "lo": 0.5, "hi": 0.5, "n": 7}
    ci = mean_ci([0.0, 0.0, 1.0])
    assert 0.0 <= ci["lo"] <= ci["mean"] <= ci["hi"] <= 1.0


def test_paired_gain_resamples_units_together():
    base = np.linspace(0, 1, 50)
    trained = base + 0.1  # the same gain on every unit: the paired interval has no width at all
    g = paired_gain_ci(base, trained)
    assert g["gain"] == pytest.approx(0.1) and g["lo"] == pytest.approx(0.1) and g["hi"] == pytest.approx(0.1)
    assert g["p_le_0"] == 0.0 and g["n"] == 50
    noise = paired_gain_ci(base, base[::-1])  # no gain on average
    assert noise["lo"] < 0 < noise["hi"] and 0.2 < noise["p_le_0"] < 0.8
    with pytest.raises(ValueError):
        paired_gain_ci([0, 1], [0, 1, 1])


def test_format():
    assert fmt_ci(0.2314, 0.18, 0.2849) == "0.231 [0.180, 0.285]"


def test_normal_ci95_half_width():
    assert normal_ci95(2.0, 16) == pytest.approx(0.98)  # 1.96 * 2 / 4
    assert np.isnan(normal_ci95(2.0, 1)) and np.isnan(normal_ci95(float("nan"), 9))
    np.testing.assert_allclose(normal_ci95(np.array([1.0, 3.0, 1.0]), np.array([4, 9, 0])), [0.98, 1.96, np.nan])


def test_ratio_interval_is_the_t_interval_of_the_logs_and_covers_95_percent():
    """By hand for one sample (t_{0.975,2} = 4.303), then coverage by simulation: log-normal ratios around a
    true geometric mean of 2.5, n = 3 and n = 8 rounds, 4,000 trials each: ~95 % of intervals hold 2.5."""
    r = [2.0, 2.5, 3.1]
    lg = np.log(r)
    half = 4.303 * lg.std(ddof=1) / np.sqrt(3)
    ci = ratio_ci95(r)
    assert ci["n"] == 3 and ci["mean"] == pytest.approx(np.exp(lg.mean()))
    assert (ci["lo"], ci["hi"]) == pytest.approx((np.exp(lg.mean() - half), np.exp(lg.mean() + half)))
    assert np.isnan(ratio_ci95([2.0])["lo"])
    rng = np.random.default_rng(0)
    for n in (3, 8):
        hits = 0
        for _ in range(4000):
            c = ratio_ci95(np.exp(np.log(2.5) + 0.1 * rng.standard_normal(n)))
            hits += c["lo"] <= 2.5 <= c["hi"]
        assert 0.935 < hits / 4000 < 0.965
