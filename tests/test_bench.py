"""The side-by-side benchmark: every method's entropies against fp64, the derived columns, one-line errors."""

from __future__ import annotations

import math

import pytest

from entropylens.bench import BenchConfig, run_bench
from entropylens.errors import UserError


def _check_columns(df) -> None:
    """Derived columns recomputed from the raw ones."""
    a = df.attrs
    for r in df.itertuples():
        assert r.tokens_per_s == pytest.approx(a["tokens"] / r.seconds)
        rows = a["entropylens_rows_per_token"] if r.method.startswith(("entropylens", "floor")) \
            else a["recipe_rows_per_token"]
        assert r.gflops == pytest.approx(2 * a["d_model"] * a["vocab"] * rows * a["tokens"] / r.seconds / 1e9)
    recipes = df[~df.method.str.startswith(("entropylens", "floor"))]
    best = recipes.tokens_per_s.max()
    assert (df.x_faster_recipe * best).to_numpy() == pytest.approx(df.tokens_per_s.to_numpy())
    floor = df.set_index("method").loc["floor"]
    assert floor.frac_floor_flops == pytest.approx(1.0) and math.isnan(floor.max_abs_dH)


def test_model_mode_every_method_matches_fp64(tiny_folder):
    """Both hand-written recipes and entropylens on a real (tiny) model: all within 1e-4 nats of fp64."""
    cfg = BenchConfig(model=str(tiny_folder), batch=2, seq=8, repeats=2,
                      methods=("transformer-lens", "nnsight", "entropylens", "floor"))
    df = run_bench(cfg)
    assert list(df.method) == ["transformer-lens", "nnsight", "entropylens", "floor"]
    assert df.attrs["tokens"] == 16 and df.attrs["layers"] == 3 and df.attrs["additive"]
    assert (df.attrs["recipe_rows_per_token"], df.attrs["entropylens_rows_per_token"]) == (5 * 3 + 1, 4 * 3 + 1)
    assert (df.dropna(subset=["max_abs_dH"]).max_abs_dH < 1e-4).all()
    _check_columns(df)


def test_random_head_mode_matches_fp64():
    cfg = BenchConfig(vocab=3001, d_model=48, tokens=300, sites=("layer",), methods=("entropylens", "floor"))
    df = run_bench(cfg)
    assert list(df.method) == ["recipe", "entropylens", "floor"]
    assert (df.attrs["vocab"], df.attrs["d_model"], df.attrs["tokens"]) == (3001, 48, 300)
    assert (df.dropna(subset=["max_abs_dH"]).max_abs_dH < 1e-4).all()
    _check_columns(df)


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
    r = run("--vocab", "501")
    assert r.returncode != 0 and r.stderr.strip().splitlines() == ["error: random-head mode needs both --vocab and "
                                                                   "--d-model"]
