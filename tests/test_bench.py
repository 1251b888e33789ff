"""The side-by-side benchmark: every method's entropies against fp64, the derived columns, one-line errors."""

from __future__ import annotations

import pytest

from entropylens.tracing.bench import BenchConfig, run_bench
from entropylens.errors import UserError


def test_model_mode_every_method_matches_fp64(tiny_folder):
    """Both hand-written recipes and entropylens on a real (tiny) model: all within 1e-4 nats of fp64."""
    cfg = BenchConfig(model=str(tiny_folder), batch=2, seq=8, repeats=2,
                      methods=("transformer-lens", "nnsight", "entropylens", "floor"))
    df = run_bench(cfg)
    assert list(df.method) == ["transformer-lens", "nnsight", "entropylens", "floor"]
    assert df.attrs["tokens"] == 16 and df.attrs["layers"] == 3 and df.attrs["additive"]
    assert (df.attrs["recipe_rows_per_token"], df.attrs["entropylens_rows_per_token"]) == (5 * 3 + 1, 4 * 3 + 1)
    assert (df.dropna(subset=["max_abs_dH"]).max_abs_dH < 1e-4).all()


def test_random_head_mode_matches_fp64():
    cfg = BenchConfig(vocab=3001, d_model=48, tokens=300, sites=("layer",), methods=("entropylens", "floor"))
    df = run_bench(cfg)
    assert list(df.method) == ["recipe", "entropylens", "floor"]
    assert (df.attrs["vocab"], df.attrs["d_model"], df.attrs["tokens"]) == (3001, 48, 300)
    assert (df.dropna(subset=["max_abs_dH"]).max_abs_dH < 1e-4).all()


def test_accuracy_column_sees_an_error_in_one_method(monkeypatch):
    """max|ΔH| is measured against bench's own fp64 reference: an entropylens result off by 1e-3 nats must
    show as ~1e-3 in its row while the recipe's row stays exact (a column that could not fail would not)."""
    import entropylens.tracing.bench as bench

    real = bench.decode_layers

    def off_by_1e3(*a, **kw):
        res = real(*a, **kw)
        for st in res.values():
            st.entropy += 1e-3
        return res

    monkeypatch.setattr(bench, "decode_layers", off_by_1e3)
    df = run_bench(BenchConfig(vocab=1001, d_model=32, tokens=64, sites=("attn", "layer"),
                               methods=("entropylens-eager", "floor"))).set_index("method")
    assert df.loc["recipe", "max_abs_dH"] < 1e-5
    assert df.loc["entropylens-eager", "max_abs_dH"] == pytest.approx(1e-3, rel=1e-2)


@pytest.mark.parametrize("kw,match", [
    (dict(vocab=100), "both --vocab and --d-model"),
    (dict(methods=("entropylens", "fast")), "unknown method 'fast'"),
    (dict(sites=("layer", "mlp")), "unknown site 'mlp'"),
])
def test_bad_options_are_one_line_errors(kw, match):
    with pytest.raises(UserError, match=match):
        run_bench(BenchConfig(**kw))


def test_cli_prints_every_column_and_refuses_bad_options_in_one_line():
    import subprocess
    import sys

    run = lambda *a: subprocess.run([sys.executable, "-m", "entropylens", "bench", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    r = run("--vocab", "501", "--d-model", "16", "--tokens", "64", "--sites", "layer", "--methods", "entropylens,floor")
    assert r.returncode == 0, r.stderr
    for head in ("recipe", "entropylens", "floor", "tok/s", "max|ΔH|", "peak GiB", "× recipe", "of floor"):
        assert head in r.stdout
    assert "× the faster recipe: the floor, the GEMM alone (2 rows per token; the recipes 2)" in r.stdout
    assert r.stdout.splitlines()[-1].startswith("ceiling ")
    r = run("--vocab", "501")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == ["error: random-head mode needs both --vocab and "
                                                                   "--d-model"]


def test_ratios_are_paired_within_rounds_so_drift_cancels():
    """Round 2 runs on a machine twice as slow for every method: each round's ratios are the same, so the
    interval collapses on them; the fastest-vs-fastest ratio (recipe's round 1 / ours round 2) would not."""
    from entropylens.tracing.bench import _paired_ratios

    F = 1e9  # GEMM FLOPs per method (the recipe's 5/4 of ours, as with the additive trick)
    rounds = {"nnsight": [(10.0, 1.25 * F), (20.0, 1.25 * F), (10.0, 1.25 * F)],
              "entropylens": [(4.0, F), (8.0, F), (4.0, F)],
              "floor": [(3.0, F), (6.0, F), (3.0, F)]}
    r = _paired_ratios(rounds, list(rounds))
    x, f = r["x_faster_recipe"]["entropylens"], r["frac_floor_flops"]["entropylens"]
    assert (x["mean"], x["lo"], x["hi"], x["n"]) == pytest.approx((2.5, 2.5, 2.5, 3))
    assert (f["mean"], f["lo"], f["hi"]) == pytest.approx((0.75, 0.75, 0.75))
    assert r["frac_floor_flops"]["nnsight"]["mean"] == pytest.approx(1.25 * 3 / 10)
    rounds["entropylens"][1] = (6.0, F)  # one faster round: the interval opens around the geometric mean
    x = _paired_ratios(rounds, list(rounds))["x_faster_recipe"]["entropylens"]
    assert x["mean"] == pytest.approx((2.5 * 2.5 * 20 / 6) ** (1 / 3)) and x["lo"] < x["mean"] < x["hi"]
