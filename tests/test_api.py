"""The library (entropylens.api, entropylens.analysis.run): trace equals the CLI, model kinds agree, decode is exact."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import entropylens as el
from entropylens.errors import UserError
from entropylens.store import list_runs
from tiny import build_tiny

PROMPTS = ["What is 2 + 3?", "Name a colour.", "Count to three, please."]
SMALL = dict(max_new_tokens=5, batch_size=2, lens="both", quiet=True)
FILES = ("tokens.parquet", "entropy.parquet", "summary.parquet", "responses.jsonl")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, smol_tokenizer):
    """One saved run of a tiny Llama in memory (module-scoped: most Run tests only read it)."""
    cache = tmp_path_factory.mktemp("api-cache")
    return el.trace(build_tiny("llama"), PROMPTS, tokenizer=smol_tokenizer, name="tiny", cache=str(cache), **SMALL)


# ---------------------------------------------------------------- trace = the CLI

def test_trace_in_memory_writes_the_cli_files(tiny_folder, tmp_path):
    """The same model, once from its folder through the CLI, once in memory through el.trace: same bytes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same GEMM order
    cli = subprocess.run([sys.executable, "-m", "entropylens", "trace", "--model", str(tiny_folder), "--prompts",
                          str(prompt_file), "--max-new-tokens", "5", "--batch-size", "2", "--lens", "both",
                          "--name", "cli", "--cache", str(tmp_path / "cli"), "--quiet"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert cli.returncode == 0, cli.stderr
    model, tok = AutoModelForCausalLM.from_pretrained(tiny_folder), AutoTokenizer.from_pretrained(tiny_folder)
    model.train()  # traced in eval mode (as the CLI does), then handed back as it was
    run = el.trace(model, PROMPTS, tokenizer=tok, name="api", cache=str(tmp_path / "api"), **SMALL)
    cli_dir, api_dir = tmp_path / "cli" / "runs" / "cli", tmp_path / "api" / "runs" / "api"
    assert run.path == api_dir
    for f in FILES:
        assert (api_dir / f).read_bytes() == (cli_dir / f).read_bytes(), f
    ent = pd.read_parquet(cli_dir / "entropy.parquet")
    assert ent["H_layer"].notna().sum() > 100 and set(ent["lens"]) == {"bupo", "logit"}  # a real run, not empty
    pd.testing.assert_frame_equal(run.entropy, ent)

    def comparable(m: dict) -> dict:
        m = copy.deepcopy(m)
        for k in ("run_id", "created", "finished", "timings"):
            m.pop(k)
        for k in ("id", "name", "source", "revision"):
            m["model"].pop(k)
        for k in ("model", "prompts", "cache", "name"):
            m["config"].pop(k)
        m["prompts"].pop("source")
        return m

    api_m = json.loads((api_dir / "manifest.json").read_text())
    assert comparable(api_m) == comparable(json.loads((cli_dir / "manifest.json").read_text()))
    assert api_m["model"]["source"] == "memory:transformers" and api_m["config"]["model"].startswith("memory:")
    # the manifest names a prompt file that exists and holds these prompts
    assert [json.loads(x)["prompt"] for x in open(api_m["prompts"]["source"], encoding="utf-8")] == PROMPTS
    assert "api" in set(list_runs(tmp_path / "api")["run_id"])  # `entropylens runs` and the dashboard see it
    assert model.training


def test_spec_string_and_save_false(tiny_folder, tmp_path):
    """A model spec as on the CLI; save=False leaves nothing behind but returns the same data."""
    common = dict(prompts="arith", limit=2, max_new_tokens=4, quiet=True, cache=str(tmp_path))
    saved = el.trace(str(tiny_folder), name="saved", **common)
    kept = el.trace(str(tiny_folder), save=False, **common)
    assert kept.path is None and sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["saved"]
    for name in ("tokens", "entropy", "summary", "responses"):
        pd.testing.assert_frame_equal(getattr(kept, name), getattr(saved, name))
    assert kept.manifest["status"] == "complete" and kept.manifest["timings"]["load_s"] > 0


def test_resume_an_interrupted_in_memory_trace(smol_tokenizer, tmp_path, monkeypatch):
    """Ctrl-C after the first batch, then resume= with the same model: the files of an uninterrupted run."""
    import entropylens.tracing.job as trace_mod

    model = build_tiny("llama")
    kw = dict(tokenizer=smol_tokenizer, max_new_tokens=4, batch_size=1, quiet=True)
    whole = el.trace(model, PROMPTS, name="whole", cache=str(tmp_path / "a"), **kw)
    real, calls = trace_mod.trace_batch, []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trace_mod, "trace_batch", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        el.trace(model, PROMPTS, name="cut", cache=str(tmp_path / "b"), **kw)
    monkeypatch.setattr(trace_mod, "trace_batch", real)
    with pytest.raises(UserError) as e:
        el.trace(resume="cut", cache=str(tmp_path / "b"))
    _one_line(e, "was traced from a model in memory; pass it again")
    done = el.trace(model, tokenizer=smol_tokenizer, resume="cut", cache=str(tmp_path / "b"), quiet=True)
    assert done.manifest["status"] == "complete"
    for f in FILES:
        assert (done.path / f).read_bytes() == (whole.path / f).read_bytes(), f


def test_limit_default_warns_when_it_drops_prompts(smol_tokenizer, tmp_path):
    many = [f"What is {i} + 1?" for i in range(9)]
    with pytest.warns(UserWarning, match="first 8 of 9 prompts"):
        run = el.trace(build_tiny("llama"), many, tokenizer=smol_tokenizer, generate=False, save=False, quiet=True,
                       sites="layer", cache=str(tmp_path))
    assert run.manifest["prompts"]["n"] == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = el.trace(build_tiny("llama"), many, tokenizer=smol_tokenizer, generate=False, save=False, quiet=True,
                       sites="layer", limit=None, cache=str(tmp_path))
    assert run.manifest["prompts"]["n"] == 9


def test_dataframe_prompts_keep_answers(smol_tokenizer, tmp_path):
    df = pd.DataFrame({"question": ["What is 2 + 3?", "What is 4 + 4?"], "answer": [5, 8]})
    run = el.trace(build_tiny("llama"), df, tokenizer=smol_tokenizer, generate=False, sites=("layer",), save=False,
                   quiet=True, cache=str(tmp_path), device="cpu", dtype="float32")  # as the model is: accepted
    assert run.responses["answer"].tolist() == ["5", "8"]


# ---------------------------------------------------------------- model kinds

def test_three_model_kinds_give_the_same_entropies(smol_tokenizer, tmp_path):
    """transformers, nnsight LanguageModel and TransformerLens TransformerBridge wrap the same weights.

    Error budget: the bridge runs HF's *eager* attention, the plain model its default SDPA kernel. The two
    kernels sum in different orders, so their fp32 entropies differ by ~1e-5 nats here (1.2e-5 on AVX2, 1.19e-5
    on AVX-512) while each stays ~1e-5 from a float64 trace of the same weights. So: the same ops must give the
    same numbers (bridge = the eager model, nnsight = transformers, ≤ 1e-6), and every kind must stay within the
    README's accuracy budget of a float64 trace (≤ 1e-4 nats), whatever the CPU's GEMM path.
    """
    from nnsight import LanguageModel
    from transformer_lens.model_bridge import TransformerBridge

    base = build_tiny("llama")
    eager = copy.deepcopy(base)
    eager.config._attn_implementation = "eager"  # the attention the bridge rewires its copy to
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = LanguageModel(copy.deepcopy(base), tokenizer=smol_tokenizer)
        bridge = TransformerBridge.boot_transformers("tiny", hf_model=copy.deepcopy(base), tokenizer=smol_tokenizer)
    kw = dict(prompts=PROMPTS[:2], save=False, max_new_tokens=5, lens="both", quiet=True, cache=str(tmp_path))
    runs = {"transformers": el.trace(base, tokenizer=smol_tokenizer, **kw), "nnsight": el.trace(lm, **kw),
            "transformer-lens": el.trace(bridge, **kw), "eager": el.trace(eager, tokenizer=smol_tokenizer, **kw),
            "fp64": el.trace(copy.deepcopy(base).double(), tokenizer=smol_tokenizer, dtype="float64", **kw)}
    ref = runs["transformers"]
    cols = [c for c in ref.entropy.columns if c.startswith(("H_", "dH_"))]

    def gap(a: str, b: str) -> float:
        A, B = runs[a], runs[b]
        assert A.tokens["token_id"].tolist() == B.tokens["token_id"].tolist(), (a, b)  # same sampled responses
        assert np.array_equal(np.isnan(A.entropy[cols].to_numpy()), np.isnan(B.entropy[cols].to_numpy()))
        diff = np.nanmax(np.abs(A.entropy[cols].to_numpy() - B.entropy[cols].to_numpy()))
        return float(max(diff, np.abs(A.tokens["H_final"] - B.tokens["H_final"]).max()))

    for kind in ("transformers", "nnsight", "transformer-lens"):
        assert runs[kind].manifest["model"]["source"] == f"memory:{kind}"
    same_ops = {("nnsight", "transformers"): gap("nnsight", "transformers"),
                ("transformer-lens", "eager"): gap("transformer-lens", "eager")}
    to_fp64 = {kind: gap(kind, "fp64") for kind in ("transformers", "nnsight", "transformer-lens", "eager")}
    print(f"same ops: {same_ops}; vs float64: {to_fp64}; SDPA vs eager: {gap('transformers', 'eager'):.2e}")
    assert max(same_ops.values()) <= 1e-6, same_ops
    assert max(to_fp64.values()) <= 1e-4, to_fp64
    assert ref.entropy["H_layer"].min() < 0.5 * math.log(len(smol_tokenizer))  # far from uniform: the check has teeth
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():  # the user's bridge still works after being traced
        assert torch.isfinite(bridge(ids, return_type="logits")).all()


def test_lazy_nnsight_model_from_a_folder(tiny_folder, tmp_path):
    """LanguageModel(folder) holds meta tensors until dispatched; trace dispatches it."""
    from nnsight import LanguageModel
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (nnsight 0.8 cannot guess the tokenizer of a local folder itself)
        lm = LanguageModel(str(tiny_folder), tokenizer=AutoTokenizer.from_pretrained(tiny_folder))
    assert not lm.dispatched
    run = el.trace(lm, PROMPTS[:1], generate=False, sites="layer", save=False, quiet=True, cache=str(tmp_path))
    assert run.entropy["H_layer"].notna().all()


# ---------------------------------------------------------------- decode

def _fp64_stats(z: torch.Tensor, targets: torch.Tensor) -> dict[str, np.ndarray]:
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    return {"entropy": -(p * logp).sum(-1).numpy(), "top1": z.argmax(-1).numpy(), "p1": p.max(-1).values.numpy(),
            "logprob_target": logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0].numpy()}


def _near_tie(W: torch.Tensor, top: float, g: torch.Generator) -> torch.Tensor:
    """A hidden state whose two largest logits are `top`-sized and exactly 0.5 apart (moved along W_i − W_j)."""
    u = torch.randn(W.shape[1], generator=g, dtype=torch.float64)
    h = u / (W @ u).max() * top
    for _ in range(20):
        z = W @ h
        i, j = z.topk(2).indices
        dw = W[i] - W[j]
        h = h - ((z[i] - z[j]) - 0.5) / dw.dot(dw) * dw
    return h


@pytest.mark.parametrize("lens", ["bupo", "logit"])
def test_decode_matches_fp64_at_large_logits(lens):
    """Hidden states (2, 5, d) from |z| ~ 0.1 to |z| in the tens of thousands, against an fp64 softmax.

    Row 1 holds near-ties at the top (two tokens 0.5 nats apart at |z| = 2e3 ... 3e4, the scale of SmolLM2's
    massive activations): there fp32 logits round by ~1e-3 nats and only the exactness guard keeps H exact."""
    model = build_tiny("llama")
    W, norm = model.lm_head.weight.detach().double(), copy.deepcopy(model.model.norm).double()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 32, generator=g)
    hidden[0] *= torch.tensor([0.05, 0.5, 3.0, 30.0, 200.0])[:, None]  # logits from ~0.1 to thousands
    for k, top in enumerate([2e3, 5e3, 1e4, 2e4, 3e4]):
        hidden[1, k] = _near_tie(W, top, g).float()
    targets = torch.randint(0, W.shape[0], (2, 5), generator=g)
    targets[0, 0] = -1
    with torch.no_grad():
        z = (norm(hidden.double()) if lens == "logit" else hidden.double()) @ W.T
    ref = _fp64_stats(z, targets)
    out = el.decode(hidden, model, lens=lens, targets=targets)
    assert out.entropy.shape == out.top1.shape == out.p1.shape == out.logprob_target.shape == (2, 5)
    err = np.abs(out.entropy.numpy() - ref["entropy"]).max()
    print(f"decode lens {lens}: max |z| {z.abs().max():.0f}, max |H - H_fp64| {err:.2e} nats, redone {out.redone}")
    assert err < 1e-4
    np.testing.assert_array_equal(out.top1.numpy(), ref["top1"])
    # p1 moves with the logit gap: the guard's fp64 redo uses the lens's fp32 (vocabulary-centred) W, whose
    # rounding leaves ~4e-4 nats of logit error at |z| = 3e4 (8.6e-5 in p1 measured; H moves far less)
    np.testing.assert_allclose(out.p1.numpy(), ref["p1"], atol=2e-4)
    lp = out.logprob_target.numpy()
    assert np.isnan(lp[0, 0])
    np.testing.assert_allclose(lp.ravel()[1:], ref["logprob_target"].ravel()[1:], rtol=1e-6, atol=1e-4)
    assert np.median(ref["entropy"]) < 0.5 * math.log(W.shape[0])  # mostly far from uniform: the check has teeth
    if lens == "bupo":
        assert ref["entropy"].min() < 1e-3 < 1.0 < ref["entropy"].max()  # peaked and spread rows both present
        assert z[1].amax(-1).min() > 1000 and out.redone >= 5  # the exactness guard is what this exercises
        assert (ref["entropy"][1] > 0.5).all()  # near-ties: not one-hot rows
        with torch.no_grad():  # a plain fp32 softmax, for contrast: visibly off at this scale
            z32 = hidden @ model.lm_head.weight.T
            naive = -(torch.softmax(z32, -1) * torch.log_softmax(z32, -1)).sum(-1).double().numpy()
        naive_err = np.abs(naive - ref["entropy"]).max()
        print(f"plain fp32 softmax: max |H - H_fp64| {naive_err:.2e} nats")
        assert naive_err > 1e-4 > err  # these rows are hard: a plain fp32 softmax misses the 1e-4 contract


def test_decode_bare_matrix_and_model_kinds_agree(smol_tokenizer):
    from nnsight import LanguageModel

    model = build_tiny("qwen3")
    hidden = torch.randn(7, 32) * 20
    by_model = el.decode(hidden, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm = LanguageModel(model, tokenizer=smol_tokenizer)
    for other in (el.decode(hidden, model.lm_head.weight), el.decode(hidden, lm)):
        np.testing.assert_allclose(other.entropy.numpy(), by_model.entropy.numpy(), atol=1e-5)
        assert torch.equal(other.top1, by_model.top1)
    assert el.decode(torch.empty(0, 32), model).entropy.shape == (0,)


# ---------------------------------------------------------------- Run

def test_load_and_tables(tiny_run):
    for ref in (tiny_run.run_id, str(tiny_run.path), tiny_run.path):
        run = el.load(ref, cache=tiny_run.path.parent.parent)
        assert run.path == tiny_run.path and run.manifest == tiny_run.manifest
    run = el.load(tiny_run.path)
    pd.testing.assert_frame_equal(run.entropy, pd.read_parquet(run.path / "entropy.parquet"))
    pd.testing.assert_frame_equal(run.summary, pd.read_parquet(run.path / "summary.parquet"))
    assert run.tokens.groupby("prompt_idx").size().tolist() == run.responses.eval(
        "n_prompt_tokens + n_response_tokens").tolist()
    assert "What is 2 + 3?" in run.responses["prompt"].iloc[0]


def test_show_prints_the_cli_table(tiny_run, capsys):
    tiny_run.show(lens="logit")
    out = capsys.readouterr().out
    s = tiny_run.summary
    mean = s[(s.lens == "logit") & (s.layer == 2) & (s.quantity == "dH_ffn") & (s.role == "response")]["mean"]
    assert "lens logit" in out and f"{mean.iloc[0]:.3f}" in out
    got = tiny_run.layers("logit").set_index("layer")["dH_ffn"]
    assert got.loc[2] == pytest.approx(mean.iloc[0])


def test_figures_are_the_report_and_dashboard_figures(tiny_run):
    from entropylens.app.views.tokens import build_heatmap
    from entropylens.analysis.report import fig_delta, fig_trajectory, load_run
    from entropylens.analysis.stages import StageConfig

    cache, rid = tiny_run.path.parent.parent, tiny_run.run_id
    ref = load_run(cache, rid, StageConfig())
    for ours, theirs in ((tiny_run.flow(), fig_trajectory(ref, "bupo", "response")),
                         (tiny_run.delta(lens="logit"), fig_delta(ref, "logit", "response"))):
        assert ours.to_json() == theirs.to_json()
    heat, _ = build_heatmap(cache, rid, "bupo", 1, "ffn", "dH")
    assert tiny_run.heatmap(1, site="ffn", quantity="dH").to_json() == heat.to_json()
    # and the numbers are the stored ones
    s = tiny_run.summary
    line = next(t for t in tiny_run.flow().data if t.name == "layer H^l")
    want = s[(s.lens == "bupo") & (s.role == "response") & (s.quantity == "H_layer")].sort_values("layer")["mean"]
    np.testing.assert_allclose(line.y, want.to_numpy())
    e = tiny_run.entropy
    z = e[(e.lens == "bupo") & (e.prompt_idx == 1)].pivot(index="layer", columns="position", values="dH_ffn")
    np.testing.assert_array_equal(np.asarray(tiny_run.heatmap(1, site="ffn", quantity="dH").data[0].z, float),
                                  z.to_numpy())


def test_compare_and_in_memory_heatmap(tiny_run, smol_tokenizer, tmp_path):
    other = el.trace(build_tiny("qwen3"), PROMPTS[:2], tokenizer=smol_tokenizer, save=False, cache=str(tmp_path),
                     **SMALL)
    fig = tiny_run.compare(other, quantity="H_ffn")
    assert len(fig.data) == 2
    s = other.summary
    want = s[(s.lens == "bupo") & (s.role == "response") & (s.quantity == "H_ffn")].sort_values("layer")
    np.testing.assert_allclose(fig.data[1].y, want["mean_norm"].to_numpy())
    e = other.entropy  # held in memory: the heatmap filters the frame instead of reading a file
    z = e[(e.lens == "logit") & (e.prompt_idx == 0)].pivot(index="layer", columns="position", values="H_layer")
    np.testing.assert_array_equal(np.asarray(other.heatmap(0, lens="logit").data[0].z, float), z.to_numpy())


# ---------------------------------------------------------------- bad input: one-line UserErrors

def _one_line(excinfo, needle: str) -> None:
    msg = str(excinfo.value)
    assert needle in msg and "\n" not in msg, msg


@pytest.mark.parametrize("kwargs,needle", [
    (dict(model={"not": "a model"}), "model must be a model spec string"),
    (dict(prompts=[]), "the prompt list is empty"),
    (dict(prompts=pd.DataFrame({"prompt": []})), "the prompt DataFrame is empty"),
    (dict(prompts=pd.DataFrame({"words": ["hi"]})), "the prompt DataFrame has no prompt column"),
    (dict(prompts=[3]), "the prompt list holds int items"),
    (dict(sites="attn,bogus"), "unknown site bogus"),
    (dict(lens="nope"), "unknown --lens 'nope'"),
    (dict(max_tokens=5), "unknown option 'max_tokens'"),
    (dict(tokenizer=None), "needs its tokenizer"),
    (dict(dtype="bfloat16"), "dtype='bfloat16', but the model in memory is on cpu in float32"),
    (dict(device="cuda:1"), "device='cuda:1', but the model in memory is on cpu"),
    (dict(device_map="auto"), "device_map= applies when entropylens loads the model"),
])
def test_trace_bad_input(smol_tokenizer, tmp_path, kwargs, needle):
    args = dict(model=build_tiny("llama"), prompts=PROMPTS[:1], tokenizer=smol_tokenizer, cache=str(tmp_path),
                quiet=True, save=False) | kwargs
    with pytest.raises(UserError) as e:
        el.trace(**args)
    _one_line(e, needle)


@pytest.mark.parametrize("hidden,target,lens,needle", [
    (torch.randn(4, 16), "model", "bupo", "hidden size 16 does not match the unembedding's d = 32"),
    (torch.randn(4, 32), "matrix", "logit", "lens 'logit' needs the model's final norm"),
    (torch.randn(4, 32), "model", "both", "unknown lens 'both'"),
    (torch.randn(4, 32), "spec", "bupo", "decode needs the model object"),
    (torch.randn(4, 32), "vector", "bupo", "an unembedding matrix is (V, d)"),
])
def test_decode_bad_input(hidden, target, lens, needle):
    model = build_tiny("llama")
    obj = {"model": model, "matrix": model.lm_head.weight, "spec": "smollm2", "vector": torch.randn(32)}[target]
    with pytest.raises(UserError) as e:
        el.decode(hidden, obj, lens=lens)
    _one_line(e, needle)


def test_decode_bad_targets_and_load_errors(tmp_path):
    model = build_tiny("llama")
    with pytest.raises(UserError) as e:
        el.decode(torch.randn(4, 32), model, targets=torch.zeros(3, dtype=torch.long))
    _one_line(e, "targets must be integer token ids shaped like hidden.shape[:-1] = (4,)")
    with pytest.raises(UserError) as e:
        el.load("no-such-run", cache=tmp_path)
    _one_line(e, "no run 'no-such-run'")


# ---------------------------------------------------------------- the quickstart notebook

@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    """examples/quickstart.ipynb top to bottom on the embedded model (~1-2 min), into a temporary cache."""
    import nbformat
    from nbclient import NotebookClient

    root = Path(__file__).resolve().parents[1]
    nb = nbformat.read(root / "examples" / "quickstart.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit the notebook with outputs stripped"
    cache = tmp_path / "cache"
    cache.mkdir()
    models = root / "cache" / "models"  # the repo's model cache: the dequantised weights are made once, not per run
    models.mkdir(parents=True, exist_ok=True)
    (cache / "models").symlink_to(models, target_is_directory=True)
    monkeypatch.setenv("ENTROPYLENS_CACHE", str(cache))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))  # this checkout
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    runs = list((cache / "runs").iterdir())  # the saved run only: the second one was save=False
    assert len(runs) == 1 and el.load(runs[0]).manifest["status"] == "complete"
    assert el.load(runs[0]).manifest["generation"]["max_new_tokens"] == 8
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    gap = float(text.split("max |decode - trace| = ")[1].split()[0])
    print(f"notebook: decode vs trace {gap:.1e} nats")
    assert gap < 1e-3
    figures = [c for c in code if any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in c.outputs)]
    assert len(figures) == 3  # flow, heatmap, compare
