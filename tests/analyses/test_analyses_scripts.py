"""Each analysis script on a traced tiny Llama run: files written, their numbers checked against
entropy.parquet directly (pandas, independent of the summary / stages code)."""

from __future__ import annotations

import importlib
import json
import math
import struct
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tiny import V, build_tiny, wrap
from entropylens.analysis.stages import read_stages
from entropylens.store import load_entropy
from synthetic import SyntheticRun, write_run
from entropylens.tracing.job import TraceConfig, run_trace

ROOT = Path(__file__).resolve().parents[2]
L = 3  # build_tiny's default depth


def script(name: str):
    """The module `analyses.<name>`, as `python -m analyses.<name>` runs it from the repository root."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"analyses.{name}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory, smol_tokenizer) -> Path:
    """A tiny Llama traced with both lenses (2 prompts, 5 new tokens) and a synthetic Qwen3 run."""
    root = tmp_path_factory.mktemp("cache")
    cfg = TraceConfig(prompts="arith", limit=2, max_new_tokens=5, batch_size=2, lens="both", cache=str(root),
                      name="tiny")
    run_trace(cfg, progress=False, loaded=wrap(build_tiny("llama"), smol_tokenizer))
    write_run(root, SyntheticRun("synth-qwen", family="qwen3", n_layers=6, vocab_size=V))
    return root


def response_means(cache: Path, lens: str) -> pd.DataFrame:
    """Per-layer means over response rows straight from entropy.parquet."""
    df = load_entropy(cache / "runs" / "tiny")
    df = df[(df["lens"] == lens) & (df["role"] == "response")]
    df = df.assign(dffn=df["H_ffn"] - df["H_ffn_in"])  # recomputed, not the stored dH column
    cols = ["H_layer", "H_attn", "H_ffn", "dffn"]
    return df[cols].astype("float64").groupby(df["layer"].astype("int64")).mean()


def assert_close(got: pd.Series, want: pd.Series, atol: float) -> None:
    assert list(got.index) == list(want.index)
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), atol=atol)


def figure(path: Path) -> list[dict]:
    """The traces of a figure written as JSON."""
    return json.loads(path.read_text())["data"]


def run(name, *argv):
    return script(name).main([str(a) for a in argv])


def test_trajectory_png_json_csv(cache, tmp_path):
    run("trajectory", "tiny", "--cache", cache, "--lens", "bupo", "-o", tmp_path, "--formats", "png,json")
    png = (tmp_path / "trajectory-tiny-bupo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (1000, 560)  # IHDR width, height
    data = figure(tmp_path / "trajectory-tiny-bupo.json")
    lines = [t for t in data if t.get("mode") == "lines+markers"]
    assert len(data) == 6 and len(lines) == 3  # band + line for layer, attention, FFN
    assert lines[0]["x"] == list(range(L + 1)) and lines[1]["x"] == list(range(1, L + 1))
    csv = pd.read_csv(tmp_path / "trajectory-tiny-bupo.csv").set_index("layer")
    ref = response_means(cache, "bupo")
    assert_close(csv["H_layer_mean"], ref["H_layer"], atol=1e-5)
    assert not (tmp_path / "trajectory-tiny-logit.csv").exists()


def test_delta_h_both_lenses(cache, tmp_path):
    run("delta_h", "tiny", "--cache", cache, "-o", tmp_path, "--formats", "json", "--band", "0.1")
    for lens in ("bupo", "logit"):
        csv = pd.read_csv(tmp_path / f"delta-tiny-{lens}.csv").set_index("layer")
        ref = response_means(cache, lens)
        assert list(csv.index) == list(range(1, L + 1))
        assert_close(csv["dH_ffn"], ref["dffn"].loc[1:], atol=1e-4)
        expect = ["exploration" if v > 0.1 else "convergence" if v < -0.1 else "integration"
                  for v in ref["dffn"].loc[1:]]
        assert list(csv["ffn_reading"]) == expect
        data = figure(tmp_path / f"delta-tiny-{lens}.json")
        assert sum(len(t["x"]) for t in data) == 2 * L  # every layer once per module


def test_families_relative_depth(cache, tmp_path):
    run("families", "tiny", "synth-qwen", "--cache", cache, "--lens", "bupo", "-o", tmp_path, "--formats", "json")
    data = figure(tmp_path / "families-bupo.json")
    assert [len(t["x"]) for t in data] == [L + 1, 7] and all(t["x"][-1] == 1.0 for t in data)
    csv = pd.read_csv(tmp_path / "families-bupo.csv")
    tiny = csv[csv["run_id"] == "tiny"].set_index("layer")
    ref = response_means(cache, "bupo")["H_layer"] / math.log(V)
    assert_close(tiny["mean_norm"], ref, atol=1e-6)


def test_token_distributions(cache, tmp_path):
    run("token_distributions", "tiny", "--cache", cache, "--lens", "logit", "-o", tmp_path, "--formats", "json")
    csv = pd.read_csv(tmp_path / "tokens-tiny-logit.csv")
    # L = 3: early round(3/4) = 1, middle round(3/2) = 2, late 3
    assert sorted(set(csv["layer"])) == [1, 2, 3] and set(csv["site"]) == {"H_layer", "H_attn", "H_ffn"}
    df = load_entropy(cache / "runs" / "tiny")
    n_resp = len(df[(df["lens"] == "logit") & (df["role"] == "response") & (df["layer"] == 2)])
    assert (csv["count"] == n_resp).all()
    assert [t["type"] for t in figure(tmp_path / "tokens-tiny-logit.json")] == ["violin"] * 3


def test_boundary_writes_stages(cache, tmp_path, capsys):
    run("boundary", "tiny", "--cache", cache, "-o", tmp_path, "--formats", "json")
    stages = read_stages(cache / "runs" / "tiny")
    for lens in ("bupo", "logit"):
        ref = response_means(cache, lens)["dffn"].loc[1:]
        expect = int(ref[ref > 0].index.max()) if (ref > 0).any() else None
        assert stages["lenses"][lens]["boundary_layer"] == expect
    table = pd.read_csv(tmp_path / "stages-tiny.csv")
    assert table.groupby(["lens", "module"])["end"].max().eq(L).all()  # ranges cover every layer
    assert "boundary layer" in capsys.readouterr().out


def test_script_user_error(cache, tmp_path, capsys):
    code = script("_common").run_main(script("trajectory").main, ["nope", "--cache", str(cache), "-o", str(tmp_path)])
    assert code == 2 and "nope" in capsys.readouterr().err
