"""Tables the CLI prints (rich): a run's layer table, the correct − wrong split, the BuPO evaluation, the bench.
Kept out of entropylens.cli.commands so the command definitions stay readable in one sitting."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from entropylens.analysis.table import print_layer_table

out = Console()


def print_run(run_dir: Path) -> None:
    from entropylens.store import layer_table, read_manifest

    m = read_manifest(run_dir)
    t = m.get("timings", {})
    out.print(f"[bold green]complete[/] {run_dir}  ·  {m['n_tokens']} tokens ({m['n_response_tokens']} response)"
              f"  ·  {t.get('total_s', 0):.1f} s (load {t.get('load_s', 0):.1f}, generate {t.get('generate_s', 0):.1f},"
              f" trace {t.get('trace_s', 0):.1f}, decode {t.get('decode_s', 0):.1f})")
    if t.get("decode_s"):  # every traced token's sites and lenses, through the kernel the manifest names
        out.print(f"decode rate {m['n_tokens'] / t['decode_s']:.1f} tok/s ({m.get('decode_kernel') or '?'} kernel; "
                  f"{len(m['sites'])} sites x {m['model'].get('n_layers', '?')} layers x {len(m['lens'])} lens)")
    role = "response" if m.get("n_response_tokens") else "prompt"
    for lens in m["lens"]:
        print_layer_table(layer_table(run_dir, lens=lens, role=role), f"{m['run_id']} · lens {lens} · {role} tokens")


def print_outcome_table(run_dir: Path, lens: str) -> None:
    """`show --by outcome`: per layer H_layer of correct and wrong responses, and correct − wrong with intervals."""
    import pandas as pd

    from entropylens.analysis.intervals import fmt_ci
    from entropylens.analysis.outcomes import outcome_diff

    d = outcome_diff(run_dir, lens=lens)
    n_c, n_w = int(d["n_correct"].iloc[0]), int(d["n_wrong"].iloc[0])
    table = Table(title=f"{run_dir.name} · lens {lens} · response tokens · {n_c} correct vs {n_w} wrong responses "
                  f"({n_c / (n_c + n_w):.0%} correct) · correct − wrong [95 % interval, bootstrap over responses]",
                  title_justify="left")
    wide = d.set_index(["layer", "quantity"])
    for col in ("layer", "H_layer correct", "H_layer wrong", "H_layer c−w", "ΔH_attn c−w", "ΔH_ffn c−w"):
        table.add_column(col, justify="right", no_wrap=True)

    def ci(layer: int, q: str) -> str:
        r = wide.loc[(layer, q)]
        return "—" if pd.isna(r["diff"]) else fmt_ci(r["diff"], r["lo"], r["hi"])

    for layer in sorted(d["layer"].unique()):
        r = wide.loc[(layer, "H_layer")]
        table.add_row(str(layer), *["—" if pd.isna(r[k]) else f"{r[k]:.3f}" for k in ("mean_correct", "mean_wrong")],
                      ci(layer, "H_layer"),
                      ci(layer, "dH_attn"), ci(layer, "dH_ffn"))
    Console(width=max(out.width, 150)).print(table)  # never truncate an interval, even when piped
    if not n_c or not n_w:
        out.print(f"only {'wrong' if n_w else 'correct'} responses: no correct − wrong difference to show")
    out.print("H: pooled mean entropy (nats) over response tokens; c−w: correct − wrong of H_layer and of the mean "
              "ΔH of attention and FFN; an interval that excludes 0 separates the outcomes at the 5 % level")


def print_bupo(r) -> None:
    from entropylens.analysis.intervals import fmt_ci

    out.print(f"[bold green]complete[/] {r.run_dir}  ·  checkpoint {r.checkpoint}")
    out.print(f"layer k = {r.layer}: {r.layer_evidence}" + (f" (trace {r.layer_run})" if r.layer_run else ""))
    ev = r.eval_base
    table = Table(title=f"held-out evaluation · {ev['n_prompts']} prompts × {ev['n_samples']} samples · "
                  "mean [95 % interval, bootstrap over prompts]", title_justify="left")
    ks = sorted({int(m.split("@")[1]) for m in r.gains})
    metrics = [f"avg@{ks[0]}"] + [f"pass@{k}" for k in ks if k > 1]  # avg@K is the same for every K
    for col in ["model", *metrics]:
        table.add_column(col, justify="right", no_wrap=True)
    for label, res in (("base", r.eval_base), ("trained", r.eval_trained)):
        table.add_row(label, *[fmt_ci(res[m], *res[f"{m}_ci"]) for m in metrics])
    table.add_row("gain", *[fmt_ci(r.gains[m]["gain"], r.gains[m]["lo"], r.gains[m]["hi"]) for m in metrics])
    Console(width=max(out.width, 100)).print(table)
    out.print("gain: trained − base, paired bootstrap over the same prompts; an interval that excludes 0 is a "
              "significant change at the 5 % level")
    print_layer_table(r.before_after, f"{r.trained_run} vs {r.base_run} · lens bupo · response tokens")


def print_bench(df) -> None:
    """`entropylens bench`'s table: the machine, one row per method, then the ceiling (the floor's ratio)."""
    heads = {"method": "method", "seconds": "s", "tokens_per_s": "tok/s", "gflops": "GFLOP/s",
             "max_abs_dH": "max|ΔH|", "peak_extra_gib": "peak GiB", "x_faster_recipe": "× recipe",
             "frac_floor_flops": "of floor"}
    a, mc = df.attrs, df.attrs["machine"]
    wide = Console(width=max(out.width, 150))  # never truncate a column or wrap the header, even when piped
    wide.print(f"CPU {mc['cpu']} · ISA {mc['isa']} · torch kernels {mc['torch_isa']} · {mc['threads']} threads · "
              f"torch {mc['torch']}")
    wide.print(f"default decode path: {a['default_kernel']} kernel (first-use build {a['native_build_s']} s); "
              f"compile_s {a['compile_s']} for entropylens-compiled")
    n = a["rounds"]
    paired = " (times: fastest; ratios: geometric mean of the rounds' [95 % interval])" if n > 1 else ""
    table = Table(title=f"entropylens bench · {a['tokens']} tokens · d {a['d_model']} · V {a['vocab']} · sites "
                  f"{a['sites']} · {n} round{'s' * (n > 1)}{paired}", title_justify="left")
    cols = [c for c in df.columns if not c.endswith(("_lo", "_hi"))]
    for col in cols:
        table.add_column(heads.get(col, str(col)), justify="left" if col == "method" else "right", no_wrap=True)

    def cell(row, col) -> str:
        v = row[col]
        if not isinstance(v, float):
            return str(v)
        if n > 1 and not math.isnan(row.get(col + "_lo", math.nan)):
            return f"{v:.3g} [{row[col + '_lo']:.2g}, {row[col + '_hi']:.2g}]"
        return f"{v:.3g}"

    for row in df.to_dict("records"):
        table.add_row(*[cell(row, c) for c in cols])
    wide.print(table)
    if "topk_rate_ratio" in a:
        r = a["topk_rate_ratio"]
        ci = f" [95 % interval {r['lo']:.3g}, {r['hi']:.3g}], n = {r['n']}" if n > 1 else ""
        wide.print(f"top-{a['topk']} lists: the default path runs at {r['mean']:.3g}× its top-1 rate{ci}")
    floor = df.set_index("method").to_dict("index").get("floor")
    if floor and not math.isnan(floor["x_faster_recipe"]):  # the floor and a recipe both ran
        wide.print(f"ceiling {cell(floor, 'x_faster_recipe')}× the faster recipe: the floor, the GEMM alone "
                   f"({a['entropylens_rows_per_token']} rows per token; the recipes {a['recipe_rows_per_token']}), "
                   "which no exact fp32 path beats")


def print_topk_position(run_dir: Path, lens: str, prompt: int, position: int) -> None:
    """`show --topk --position N`: per site, each layer's top-K tokens with their probabilities at one position."""
    from entropylens.store import load_tokens, load_topk
    from entropylens.analysis.grid import at_position, check_topk

    tk = load_topk(run_dir, filters=[("lens", "==", lens), ("prompt_idx", "==", prompt), ("position", "==", position)])
    if tk.empty:
        check_topk(load_topk(run_dir, columns=["rank"]), run_dir.name)
    rows = at_position(tk, lens, prompt, position)
    K = int(rows["rank"].max())
    tok = load_tokens(run_dir, columns=["position", "token_text"], filters=[
        ("prompt_idx", "==", prompt), ("position", "in", [position, position + 1])]).set_index("position")
    text = lambda p: repr(tok.loc[p, "token_text"]) if p in tok.index else "(none)"  # noqa: E731
    wide = Console(width=max(out.width, 40 + 22 * K))  # never squeeze the lists, even when piped
    for site, sel in rows.groupby("site", sort=False):
        table = Table(title=f"{run_dir.name} · lens {lens} · site {site} · prompt {prompt} · position {position} "
                      f"(token {text(position)}, next {text(position + 1)}) · top-{K}", title_justify="left")
        table.add_column("layer", justify="right", no_wrap=True)
        for k in range(1, K + 1):
            table.add_column(f"#{k}", no_wrap=True)
        for layer, g in sel.groupby("layer"):
            table.add_row(str(layer), *[f"{t!r} {p:.3f}" for t, p in zip(g["token_text"], g["prob"])])
        wide.print(table)
