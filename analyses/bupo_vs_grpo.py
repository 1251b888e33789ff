"""BuPO vs GRPO: same model, task, budget and seeds; held-out accuracy, training curves, internal entropy.

    python analyses/bupo_vs_grpo.py --quick          # the small study this machine can afford (2 cores)
    python analyses/bupo_vs_grpo.py --steps 40 ...   # a bigger budget elsewhere

Every (algo, seed) pair is one `entropylens bupo` run (entropylens.bupo.pipeline.run_bupo) with the
same layer k (chosen once by `--layer auto` on the first run, then fixed, so GRPO's `entropy/layer_k`
tracks the same layer), the same prompts and the same seed. Writes `report.md`, figures (PNG via
plotly + kaleido) and `results.csv` / `metrics.csv` to `analyses/reports/bupo_vs_grpo/`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from entropylens.bupo.pipeline import BupoRunConfig, run_bupo
from entropylens.errors import UserError

ALGOS = ("bupo", "grpo")
COLORS = {"bupo": "#d62728", "grpo": "#1f77b4"}
QUICK = dict(steps=4, internal_steps=2, prompts_per_step=2, num_generations=4, max_new_tokens=16,
             eval_prompts=6, eval_samples=2, ks="1,2", trace_prompts=2, layer_trace_prompts=2, seeds="0,1,2")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prompts", default="arith")
    p.add_argument("--layer", default="15", help="k, or auto (chosen on the first run, then fixed); SmolLM2 "
                   "has no layer with positive mean FFN dH, so auto refuses it")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated, >= 3 for a comparison")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--internal-steps", type=int, default=4, help="BuPO only; GRPO uses 0")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("-G", "--num-generations", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--eval-prompts", type=int, default=16)
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--ks", default="1,4")
    p.add_argument("--trace-prompts", type=int, default=8)
    p.add_argument("--layer-trace-prompts", type=int, default=8)
    p.add_argument("--cache", default="cache")
    p.add_argument("--tag", default=None, help="run id prefix (default: bvg-<UTC time>)")
    p.add_argument("-o", "--out", default="analyses/reports/bupo_vs_grpo")
    quick = ", ".join(f"{k}={v}" for k, v in QUICK.items())
    p.add_argument("--quick", action="store_true", help=f"tiny budget: {quick}")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    return args


def run_all(args: argparse.Namespace) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """One run per (seed, algo) -> (results per run, metrics per step, before/after per layer, layer choice)."""
    seeds = [int(s) for s in str(args.seeds).split(",")]
    tag = args.tag or "bvg-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    layer, choice, results, metrics, layers = args.layer, {}, [], [], []
    for seed in seeds:
        for algo in ALGOS:
            t0 = time.perf_counter()
            cfg = BupoRunConfig(
                model=args.model, prompts=args.prompts, algo=algo, layer=str(layer),
                internal_steps=args.internal_steps if algo == "bupo" else None, steps=args.steps,
                prompts_per_step=args.prompts_per_step, num_generations=args.num_generations,
                max_new_tokens=args.max_new_tokens, learning_rate=args.lr, eval_prompts=args.eval_prompts,
                eval_samples=args.eval_samples, ks=tuple(int(k) for k in str(args.ks).split(",")),
                trace_prompts=args.trace_prompts, layer_trace_prompts=args.layer_trace_prompts, seed=seed,
                name=f"{tag}-{algo}-s{seed}", cache=args.cache,
            )
            print(f"[{algo} seed {seed}] layer {layer} ...", file=sys.stderr, flush=True)
            r = run_bupo(cfg, progress=False)
            if layer == "auto":
                layer, choice = r.layer, {"layer": r.layer, "evidence": r.layer_evidence, "trace_run": r.layer_run}
            row = {"algo": algo, "seed": seed, "layer": r.layer, "run": r.run_dir.name,
                   "minutes": round((time.perf_counter() - t0) / 60, 2)}
            for side, ev in (("base", r.eval_base), ("trained", r.eval_trained)):
                row |= {f"{side}_{k}": v for k, v in ev.items() if k.startswith(("avg@", "pass@"))}
            results.append(row)
            m = pd.read_json(r.run_dir / "metrics.jsonl", lines=True).assign(algo=algo, seed=seed)
            metrics.append(m)
            layers.append(r.before_after.assign(algo=algo, seed=seed))
            print(f"[{algo} seed {seed}] {row}", file=sys.stderr, flush=True)
    return pd.DataFrame(results), pd.concat(metrics), pd.concat(layers), choice | {"fixed": layer}


def _band(fig, df: pd.DataFrame, x: str, y: str, row: int, col: int, show: bool) -> None:
    """Per algo: every seed thin, the seed mean thick."""
    for algo, g in df.groupby("algo"):
        for _, s in g.groupby("seed"):
            fig.add_trace(go.Scatter(x=s[x], y=s[y], mode="lines", line=dict(color=COLORS[algo], width=1),
                                     opacity=0.3, showlegend=False), row=row, col=col)
        mean = g.groupby(x)[y].mean().reset_index()
        fig.add_trace(go.Scatter(x=mean[x], y=mean[y], mode="lines+markers", name=algo, legendgroup=algo,
                                 line=dict(color=COLORS[algo], width=3), showlegend=show), row=row, col=col)


def figures(metrics: pd.DataFrame, layers: pd.DataFrame, k: int, out: Path) -> list[str]:
    curves = make_subplots(rows=1, cols=3, subplot_titles=["reward (train batch)", f"entropy of π^{k} (layer k)",
                                                           "entropy of the output policy"])
    for i, y in enumerate(["reward/mean", "entropy/layer_k", "entropy/output"], 1):
        _band(curves, metrics, "step", y, 1, i, show=i == 1)
    curves.update_xaxes(title_text="step")
    dyn = make_subplots(rows=1, cols=2, subplot_titles=["H_layer: trained − base (held-out responses)",
                                                        "FFN ΔH: trained − base"])
    _band(dyn, layers, "layer", "H_layer_change", 1, 1, show=True)
    _band(dyn, layers, "layer", "dH_ffn_change", 1, 2, show=False)
    for c in (1, 2):
        dyn.add_vline(x=k, line_dash="dot", line_color="gray", row=1, col=c)
    dyn.update_xaxes(title_text="layer")
    names = []
    for fig, name in ((curves, "training_curves.png"), (dyn, "layer_entropy_change.png")):
        fig.update_layout(width=1200, height=420, template="plotly_white", margin=dict(t=40, b=40))
        fig.write_image(out / name)
        names.append(name)
    return names


def _md(df: pd.DataFrame) -> str:
    """A Markdown table (pandas' to_markdown needs tabulate, which is not a dependency)."""
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = [list(map(str, df.columns)), ["---"] * len(df.columns)]
    rows += [[cell(v) for v in r] for r in df.itertuples(index=False)]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def _mean_sd(s: pd.Series) -> str:
    return f"{s.mean():.3f} ± {s.std(ddof=1):.3f}" if len(s) > 1 else f"{s.mean():.3f}"


def report(args, results: pd.DataFrame, metrics: pd.DataFrame, layers: pd.DataFrame, choice: dict,
           figs: list[str], minutes: float, out: Path) -> str:
    k1 = min(int(k) for k in str(args.ks).split(","))
    kmax = max(int(k) for k in str(args.ks).split(","))
    results = results.assign(gain=results[f"trained_avg@{k1}"] - results[f"base_avg@{k1}"])
    summary = results.groupby("algo").agg(**{
        f"base avg@{k1}": (f"base_avg@{k1}", _mean_sd), f"trained avg@{k1}": (f"trained_avg@{k1}", _mean_sd),
        f"gain avg@{k1}": ("gain", _mean_sd), f"trained pass@{kmax}": (f"trained_pass@{kmax}", _mean_sd),
        "minutes/run": ("minutes", "mean")}).reset_index()
    last = metrics[metrics["step"] == metrics["step"].max()].groupby("algo")[
        ["reward/mean", "entropy/layer_k", "entropy/output"]].mean().reset_index()
    g = results.groupby("algo")["gain"]
    diff = g.mean().get("bupo", float("nan")) - g.mean().get("grpo", float("nan"))
    noise = results.groupby("algo")["gain"].std(ddof=1).max()
    verdict = (f"BuPO's mean held-out gain minus GRPO's is {diff:+.3f} (avg@{k1}); the seed-to-seed spread of "
               f"the gain is up to {noise:.3f}, so " + ("this difference is within the noise."
               if abs(diff) <= noise else "this difference exceeds one seed standard deviation."))
    mode = "`--quick`" if args.quick else "full"
    lines = [
        "# BuPO vs GRPO", "",
        f"Generated by `analyses/bupo_vs_grpo.py` ({mode} mode) in {minutes:.1f} minutes on this machine "
        "(2 CPU cores, shared with other jobs).", "",
        f"- model `{args.model}`, prompts `{args.prompts}` (train split for training, test split held out)",
        f"- seeds {args.seeds}; per run {args.steps} steps × {args.prompts_per_step} prompts × "
        f"G={args.num_generations}, "
        f"max {args.max_new_tokens} new tokens, lr {args.lr}; BuPO: first {args.internal_steps} steps on π^k",
        f"- layer k = {choice.get('fixed')} for both algorithms: {choice.get('evidence') or 'given with --layer'}",
        f"- held-out: {args.eval_prompts} prompts × {args.eval_samples} samples (temperature 1); traces on "
        f"{args.trace_prompts} held-out prompts before and after training", "",
        "## Held-out accuracy (mean ± sd over seeds)", "", _md(summary), "",
        "## Per run", "", _md(results), "",
        "## Last training step (mean over seeds)", "", _md(last), "",
        "## Findings", "", verdict,
        "With budgets this small the comparison says little about the paper's claim; it shows that both "
        "algorithms run end to end on the same footing and how π^k's entropy moves while it is trained directly "
        "(BuPO's internal phase) versus only through the output policy (GRPO).", "",
        "## Figures", "", *[f"![{f}]({f})" for f in figs], "",
    ]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    results.to_csv(out / "results.csv", index=False)
    metrics.to_csv(out / "metrics.csv", index=False)
    layers.to_csv(out / "layers.csv", index=False)
    (out / "layer_choice.json").write_text(json.dumps(choice, indent=2))
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if len(str(args.seeds).split(",")) < 3:
            raise UserError("--seeds needs at least 3 seeds for a comparison")
        results, metrics, layers, choice = run_all(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    figs = figures(metrics, layers, int(choice["fixed"]), out)
    print(report(args, results, metrics, layers, choice, figs, (time.perf_counter() - t0) / 60, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
