"""BuPO vs GRPO on the same model, task, layer, budget and seeds, plus a sweep of the internal-phase length.

    python -m analyses.bupo_vs_grpo            # the committed study (see its regenerate.sh for the settings)
    python -m analyses.bupo_vs_grpo --quick    # a few-minute smoke run of the same pipeline

Every run trains a fresh copy of the model with `entropylens.bupo.train` and is evaluated on the same held-out
prompts (the task's test split) with `entropylens.bupo.evaluate`; the base model is evaluated once. GRPO is BuPO
with no internal phase, so both log the entropy of the same pi^k. Accuracies carry 95 % intervals by bootstrap
over prompts; a run's gain over the base model and the BuPO − GRPO difference are paired over prompts.
Writes report.md, results.csv, metrics.csv and PNG figures to analyses/reports/bupo_vs_grpo/.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from entropylens.bupo.evaluate import EvalConfig, evaluate, gains, per_prompt
from entropylens.bupo.config import DEFAULT_LAYER
from entropylens.bupo.trainer import BupoConfig, train
from entropylens.errors import UserError
from entropylens.analysis.intervals import fmt_ci, paired_gain_ci
from entropylens.model.load import load_model
from entropylens.data.prompts import load_prompts
from entropylens.store import write_json
from entropylens.store.cache import Cache

QUICK = dict(steps=4, seeds="0,1,2", sweep="0.5", layers="3", prompts_per_step=2, num_generations=4, eval_prompts=8,
             eval_samples=2, ks="1,2")
COLORS = {"grpo": "#1f77b4", "bupo": "#d62728"}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prompts", default="digits", help="built-in set or file with a train/test split")
    p.add_argument("--layer", type=int, default=DEFAULT_LAYER,
                   help="k (SmolLM2 has no layer with mean FFN ΔH > 0: see notes)")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the BuPO-vs-GRPO comparison (>= 3)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--bupo-frac", type=float, default=0.25, help="BuPO's internal phase as a fraction of --steps")
    p.add_argument("--sweep", default="0.1,0.5,0.75", help="more internal-phase fractions, run with the first seed")
    p.add_argument("--layers", default="6,24", help="more k for BuPO at --bupo-frac, run with the first seed")
    p.add_argument("--prompts-per-step", type=int, default=4)
    p.add_argument("-G", "--num-generations", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--reward", default="exact")
    p.add_argument("--objective", default="entropylens", help="entropylens | paper (docs/bupo-fidelity.md)")
    p.add_argument("--mini-batches", type=int, default=1, help="optimiser steps per rollout batch (paper: 4)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (paper: 0.01)")
    p.add_argument("--eval-prompts", type=int, default=76)
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--ks", default="1,4")
    p.add_argument("--cache", default="cache")
    p.add_argument("--tag", default="bvg")
    p.add_argument("-o", "--out", default="analyses/reports/bupo_vs_grpo")
    quick = ", ".join(f"{k}={v}" for k, v in QUICK.items())
    p.add_argument("--quick", action="store_true", help=f"tiny budget: {quick}")
    p.add_argument("--only", default="", help="train only these comma-separated runs and write no report (to run "
                   "parts of the plan in parallel processes; a later full invocation keeps them)")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    args.ks = tuple(int(k) for k in str(args.ks).split(","))
    return args


def plan(args) -> list[dict]:
    """(algo, internal fraction, seed, k) of every run: the comparison on all seeds, the sweeps on the first."""
    seeds = [int(s) for s in str(args.seeds).split(",")]
    k = args.layer
    runs = [{"algo": a, "frac": f, "seed": s, "layer": k} for s in seeds
            for a, f in (("grpo", 0.0), ("bupo", args.bupo_frac))]
    runs += [{"algo": "bupo", "frac": float(f), "seed": seeds[0], "layer": k} for f in str(args.sweep).split(",")
             if f and float(f) not in (0.0, args.bupo_frac)]
    runs += [{"algo": "bupo", "frac": args.bupo_frac, "seed": seeds[0], "layer": int(j)}
             for j in str(args.layers).split(",") if j and int(j) != k]
    return runs


def run_name(args, r: dict) -> str:
    """bvg-bupo-f25-s0 at the study's k; other k get a -k<j> suffix."""
    name = f"{args.tag}-{r['algo']}-f{int(round(100 * r['frac']))}-s{r['seed']}"
    return name if r["layer"] == args.layer else f"{name}-k{r['layer']}"


def run_all(args) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    train_set = load_prompts(args.prompts, split="train")
    eval_set = load_prompts(args.prompts, split="test", limit=args.eval_prompts)
    ecfg = EvalConfig(n_samples=args.eval_samples, ks=args.ks, max_new_tokens=args.max_new_tokens,
                      reward=args.reward, seed=0)
    loaded = load_model(args.model, "float32", "cpu", Path(args.cache), False)
    print(f"[base] evaluating on {len(eval_set)} held-out prompts ...", file=sys.stderr, flush=True)
    base = evaluate(ecfg, loaded.model, loaded.tokenizer, eval_set)
    results, metrics, per = [], [], {"base": base}
    for r in plan(args):
        t0 = time.perf_counter()
        name = run_name(args, r)
        if args.only and name not in args.only.split(","):
            continue
        run_dir = Cache(args.cache).run_dir(name)
        done = run_dir / "study.json"  # a finished run is kept: rerunning the script only does the missing ones
        if done.is_file():
            kept = json.loads((run_dir / "config.json").read_text())
            want = {"objective": args.objective, "mini_batches": args.mini_batches, "weight_decay": args.weight_decay,
                    "learning_rate": args.lr, "steps": args.steps}
            have = {"objective": "entropylens", "mini_batches": 1} | {k: kept.get(k) for k in want if k in kept}
            if have != want:
                raise UserError(f"{run_dir} was trained with {have}, not {want}: use another --tag")
            stored = json.loads(done.read_text())
            results.append({"layer": args.layer} | stored["row"])  # rows stored before the k sweep lack it
            per[name] = stored["eval"]
            metrics.append(pd.read_json(run_dir / "metrics.jsonl", lines=True).assign(run=name, **r))
            print(f"[{name}] kept from {done}", file=sys.stderr, flush=True)
            continue
        loaded = load_model(args.model, "float32", "cpu", Path(args.cache), False)  # a fresh copy per run
        cfg = BupoConfig(internal_layer=r["layer"], internal_steps=int(round(r["frac"] * args.steps)),
                         steps=args.steps, prompts_per_step=args.prompts_per_step,
                         num_generations=args.num_generations, max_new_tokens=args.max_new_tokens,
                         learning_rate=args.lr, reward=args.reward, seed=r["seed"], micro_batch_size=32,
                         objective=args.objective, mini_batches=args.mini_batches, weight_decay=args.weight_decay,
                         model_id=loaded.info.id)
        print(f"[{name}] training {cfg.internal_steps} + {cfg.steps - cfg.internal_steps} steps ...",
              file=sys.stderr, flush=True)
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished attempt is redone whole
        train(cfg, loaded.model, loaded.tokenizer, train_set, run_dir, progress=False,
              model_info=loaded.info.to_dict())
        ev = evaluate(ecfg, loaded.model, loaded.tokenizer, eval_set)
        per[name] = ev
        g = gains(base, ev, args.ks)
        row = {"run": name, **r, "internal_steps": cfg.internal_steps, "minutes": (time.perf_counter() - t0) / 60}
        for m in (f"avg@{args.ks[0]}", f"pass@{args.ks[-1]}"):
            row |= {m: ev[m], f"{m}_lo": ev[f"{m}_ci"][0], f"{m}_hi": ev[f"{m}_ci"][1],
                    f"gain_{m}": g[m]["gain"], f"gain_{m}_lo": g[m]["lo"], f"gain_{m}_hi": g[m]["hi"]}
        results.append(row)
        metrics.append(pd.read_json(run_dir / "metrics.jsonl", lines=True).assign(run=name, **r))
        write_json(done, {"row": row, "eval": ev})
        print(f"[{name}] {row}", file=sys.stderr, flush=True)
        del loaded
        gc.collect()
    return pd.DataFrame(results), pd.concat(metrics), per


def _band(fig, df: pd.DataFrame, y: str, row: int, col: int, show: bool, smooth: int = 5) -> None:
    """Per algo: mean over seeds (thick) and the min-max band over seeds, each a rolling mean over `smooth` steps."""
    for algo, g in df.groupby("algo"):
        wide = g.pivot_table(index="step", columns="seed", values=y).rolling(smooth, min_periods=1).mean()
        x = wide.index.to_numpy()
        lo, hi, mean = wide.min(axis=1), wide.max(axis=1), wide.mean(axis=1)
        fig.add_trace(go.Scatter(x=np.r_[x, x[::-1]], y=np.r_[hi, lo[::-1]], fill="toself", opacity=0.2,
                                 fillcolor=COLORS[algo], line=dict(width=0), showlegend=False, hoverinfo="skip"),
                      row=row, col=col)
        fig.add_trace(go.Scatter(x=x, y=mean, mode="lines", name=algo, legendgroup=algo, showlegend=show,
                                 line=dict(color=COLORS[algo], width=3)), row=row, col=col)


def figures(args, results: pd.DataFrame, metrics: pd.DataFrame, per: dict, out: Path) -> list[str]:
    main = metrics[metrics["frac"].isin([0.0, args.bupo_frac]) & (metrics["layer"] == args.layer)]
    k1 = f"avg@{args.ks[0]}"
    curves = make_subplots(rows=2, cols=2, subplot_titles=[
        "training reward (5-step rolling mean; band: min–max over seeds)", f"entropy of π^{args.layer} (nats)",
        "entropy of the output policy (nats)", "groups with reward variance (signal)"])
    for i, y in enumerate(["reward/mean", "entropy/layer_k", "entropy/output", "signal/groups_frac"]):
        _band(curves, main, y, i // 2 + 1, i % 2 + 1, show=i == 0)
    switch = int(round(args.bupo_frac * args.steps)) - 0.5
    for r in (1, 2):
        for c in (1, 2):
            curves.add_vline(x=switch, line_dash="dot", line_color="gray", row=r, col=c)
    curves.update_xaxes(title_text="step")

    seed0 = plan(args)[0]["seed"]
    study_k = results["layer"] == args.layer
    acc = make_subplots(rows=1, cols=3, column_widths=[0.4, 0.35, 0.25], subplot_titles=[
        f"held-out {k1} per run (95 % CI)", f"internal-phase length (seed {seed0})",
        f"layer k (seed {seed0}, BuPO {args.bupo_frac:.0%})"])
    base = per["base"]
    acc.add_hline(y=base[k1], line_dash="dash", line_color="gray", annotation_text=f"base {base[k1]:.3f}",
                  row=1, col=1)
    for algo, g in results[results["frac"].isin([0.0, args.bupo_frac]) & study_k].groupby("algo"):
        acc.add_trace(go.Bar(x=[f"seed {s}" for s in g["seed"]], y=g[k1], name=algo, marker_color=COLORS[algo],
                             error_y=dict(type="data", symmetric=False, array=g[f"{k1}_hi"] - g[k1],
                                          arrayminus=g[k1] - g[f"{k1}_lo"])), row=1, col=1)
    sweep = results[(results["seed"] == seed0) & study_k].sort_values("frac")
    acc.add_trace(go.Scatter(x=100 * sweep["frac"], y=sweep[k1], mode="lines+markers", name=f"{k1} by internal phase",
                             line=dict(color="#333"), error_y=dict(type="data", symmetric=False,
                             array=sweep[f"{k1}_hi"] - sweep[k1], arrayminus=sweep[k1] - sweep[f"{k1}_lo"])),
                  row=1, col=2)
    last = metrics.groupby("run").apply(lambda g: g.sort_values("step")["entropy/output"].tail(5).mean())
    acc.add_trace(go.Scatter(x=100 * sweep["frac"], y=[last[r] for r in sweep["run"]], mode="lines+markers",
                             name="output entropy, last 5 steps (nats)", line=dict(color="#ff7f0e", dash="dot")),
                  row=1, col=2)
    ks = results[(results["seed"] == seed0) & (results["algo"] == "bupo") & (results["frac"] == args.bupo_frac)]
    ks = ks.sort_values("layer")
    acc.add_trace(go.Scatter(x=ks["layer"], y=ks[k1], mode="lines+markers", name=f"BuPO {k1} by k",
                             line=dict(color=COLORS["bupo"]), error_y=dict(type="data", symmetric=False,
                             array=ks[f"{k1}_hi"] - ks[k1], arrayminus=ks[k1] - ks[f"{k1}_lo"])), row=1, col=3)
    acc.add_hline(y=base[k1], line_dash="dash", line_color="gray", row=1, col=3)
    acc.update_xaxes(title_text="internal phase (% of steps)", row=1, col=2)
    acc.update_xaxes(title_text="k (1-indexed layer)", row=1, col=3)
    acc.update_layout(barmode="group")

    move = make_subplots(rows=1, cols=1, subplot_titles=[
        f"internal phase: log-prob of the sampled tokens under π^{args.layer}, before vs after each update"])
    internal = metrics[(metrics["phase"] == "internal") & metrics["update/logp_after"].notna()]
    for run, g in internal.groupby("run"):
        move.add_trace(go.Scatter(x=g["step"], y=g["update/adv_logp_gain"], mode="markers+lines", name=run,
                                  opacity=0.7), row=1, col=1)
    move.add_hline(y=0, line_color="gray")
    move.update_yaxes(title_text="mean A·(log p after − before)")
    move.update_xaxes(title_text="step")
    names = []
    for fig, name, h in ((curves, "training_curves.png", 620), (acc, "accuracy.png", 420),
                         (move, "internal_update.png", 380)):
        fig.update_layout(width=1200, height=h, template="plotly_white", margin=dict(t=50, b=40))
        fig.write_image(out / name)
        names.append(name)
    return names


def _md(df: pd.DataFrame) -> str:
    """A Markdown table (pandas' to_markdown needs tabulate, which is not a dependency)."""
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = [list(map(str, df.columns)), ["---"] * len(df.columns)]
    rows += [[cell(v) for v in r] for r in df.itertuples(index=False)]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def pooled(args, per: dict, results: pd.DataFrame, metric: str) -> dict[str, dict]:
    """Per algorithm, per-prompt accuracy averaged over seeds; BuPO − GRPO paired over prompts."""
    by = {}
    for algo, frac in (("grpo", 0.0), ("bupo", args.bupo_frac)):
        runs = results[(results["algo"] == algo) & (results["frac"] == frac) & (results["layer"] == args.layer)]["run"]
        by[algo] = np.mean([per_prompt(per[r]["correct"], metric) for r in runs], axis=0)  # (prompts,)
    base = np.asarray(per_prompt(per["base"]["correct"], metric))
    return {"bupo_minus_grpo": paired_gain_ci(by["grpo"], by["bupo"]),
            "grpo_gain": paired_gain_ci(base, by["grpo"]), "bupo_gain": paired_gain_ci(base, by["bupo"])}


def report(args, results: pd.DataFrame, metrics: pd.DataFrame, per: dict, figs: list[str], minutes: float,
           out: Path) -> str:
    k1, kn = f"avg@{args.ks[0]}", f"pass@{args.ks[-1]}"
    base = per["base"]
    tab = results.assign(**{
        k1: [fmt_ci(r[k1], r[f"{k1}_lo"], r[f"{k1}_hi"]) for _, r in results.iterrows()],
        f"gain {k1}": [fmt_ci(r[f"gain_{k1}"], r[f"gain_{k1}_lo"], r[f"gain_{k1}_hi"]) for _, r in results.iterrows()],
        kn: [fmt_ci(r[kn], r[f"{kn}_lo"], r[f"{kn}_hi"]) for _, r in results.iterrows()],
    })[["run", "algo", "seed", "layer", "internal_steps", k1, f"gain {k1}", kn, "minutes"]]
    pk = pooled(args, per, results, k1)
    d, gg, gb = pk["bupo_minus_grpo"], pk["grpo_gain"], pk["bupo_gain"]
    internal = metrics[(metrics["phase"] == "internal") & metrics["update/adv_logp_gain"].notna()]
    moved = (internal["update/adv_logp_gain"] > 0).mean() if len(internal) else float("nan")
    no_signal = (metrics["signal/tokens"] == 0).mean()
    lines = [
        "# BuPO vs GRPO on SmolLM2-135M-Instruct, built-in `digits`", "",
        f"Generated by `analyses/bupo_vs_grpo.py` (this invocation: {minutes:.1f} minutes on 2 CPU cores; runs kept "
        "from an earlier invocation keep their own minutes in the table).", "",
        f"- model `{args.model}`; training prompts: `{args.prompts}` train split; held-out: its test split, "
        f"{base['n_prompts']} prompts × {base['n_samples']} samples at temperature 1, reward `{args.reward}`",
        f"- every run: {args.steps} steps × {args.prompts_per_step} prompts × G = {args.num_generations}, "
        f"≤ {args.max_new_tokens} new tokens, lr {args.lr}, layer k = {args.layer}; objective `{args.objective}`, "
        f"{args.mini_batches} optimiser step(s) per rollout batch, weight decay {args.weight_decay} "
        "(docs/bupo-fidelity.md)",
        f"- BuPO: the first {int(round(args.bupo_frac * args.steps))} steps ({args.bupo_frac:.0%}) on π^k; GRPO: none; "
        f"seeds {args.seeds}; sweep of the internal phase on seed {plan(args)[0]['seed']}: "
        f"{sorted({0.0, args.bupo_frac, *[float(f) for f in str(args.sweep).split(',') if f]})}; "
        f"of k (BuPO at {args.bupo_frac:.0%}, seed {plan(args)[0]['seed']}): "
        f"{sorted({args.layer, *[int(j) for j in str(args.layers).split(',') if j]})}",
        "- intervals: 95 %, percentile bootstrap over held-out prompts (10,000 resamples); gains paired over "
        "the same prompts", "",
        "## Held-out accuracy", "",
        f"Base model: {k1} {fmt_ci(base[k1], *base[f'{k1}_ci'])}, {kn} {fmt_ci(base[kn], *base[f'{kn}_ci'])}.", "",
        f"Pooled over seeds ({k1}, per-prompt accuracy averaged over the seeds' runs, then paired over prompts):",
        f"- GRPO gain over base: {fmt_ci(gg['gain'], gg['lo'], gg['hi'])}",
        f"- BuPO gain over base: {fmt_ci(gb['gain'], gb['lo'], gb['hi'])}",
        f"- **BuPO − GRPO: {fmt_ci(d['gain'], d['lo'], d['hi'])}** (n = {d['n']} prompts)", "",
        _md(tab), "",
        "## Training signal", "",
        f"- steps whose batch carried no gradient (every group's rewards equal): {no_signal:.1%} of all steps",
        f"- internal-phase updates that raised the advantage-weighted log-prob under π^k: {moved:.0%} "
        f"of {len(internal)}", "",
        "## Figures", "", *[f"![{f}]({f})" for f in figs], "",
        "## Findings", "", "See notes.md (written after reading these numbers).", "",
    ]
    text = "\n".join(lines)
    (out / "report.md").write_text(text)
    results.to_csv(out / "results.csv", index=False)
    metrics.to_csv(out / "metrics.csv", index=False)
    (out / "eval.json").write_text(json.dumps({k: {m: v for m, v in e.items()} for k, e in per.items()}))
    (out / "pooled.json").write_text(json.dumps(pk, indent=2))
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        if len(str(args.seeds).split(",")) < 3:
            raise UserError("--seeds needs at least 3 seeds for a comparison")
        results, metrics, per = run_all(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.only:
        return 0
    figs = figures(args, results, metrics, per, out)
    print(report(args, results, metrics, per, figs, (time.perf_counter() - t0) / 60, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
