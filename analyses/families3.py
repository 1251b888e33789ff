"""Several families on the same prompts: relative-depth flows, ΔH per layer with 95 % intervals, stages, claims.

    python -m analyses.families3 RUN_A RUN_B RUN_C -o analyses/reports/families-3/figures
writes, per lens, flows-<lens>.png (H_layer / log V on l/L) and dh-<lens>.png (ΔH_attn and ΔH_ffn per layer),
and tables flows.csv, dh.csv, stages.csv, claims.csv (in <out>/../tables). Models are named by display name.

Intervals: response tokens of one prompt are not independent, so every interval here is a percentile bootstrap
over prompts (n = prompts) of the per-prompt mean (entropylens.analysis.intervals.mean_ci). Claims, each with numbers:
- high-then-collapse: the layer policy's normalised entropy at its peak layer (the layer 1..L-1 of highest mean)
  minus its value at the last layer, with a 95 % interval; holds when the interval lies above 0.1 (10 % of
  log V) and the peak is high (mean >= 0.3 of log V). The mean over the first half (l/L <= 0.5) is listed too.
- dispersed FFN exploration (the paper's Llama reading): layers whose ΔH_ffn interval lies above 0, and how many
  thirds of the depth (early / middle / late) hold such a layer; holds when all three do.
- three stages (the paper's Qwen reading): ΔH_ffn > 0 early, ≈ 0 in the middle, < 0 late: the best split of the
  layers into three contiguous runs whose interval readings are exploration / integration (interval contains 0)
  / convergence, each with at least 2 layers that read so; reports the share of layers that fit, holds at >= 0.8.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from analyses._common import parser, run_main, runs_and_lenses
from plotly.subplots import make_subplots

from entropylens.analysis.intervals import mean_ci
from entropylens.store.schema import model_name
from entropylens.analysis.stages import StageConfig, detect_stages
from entropylens.store import load_entropy

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]


def per_prompt(ent: pd.DataFrame, lens: str, q: str) -> pd.DataFrame:
    """(layer × prompt) mean of quantity q over response tokens."""
    d = ent[(ent["lens"] == lens) & (ent["role"] == "response")]
    return d.groupby(["layer", "prompt_idx"])[q].mean().unstack("prompt_idx").sort_index()


def layer_cis(ent: pd.DataFrame, lens: str, q: str, scale: float = 1.0) -> pd.DataFrame:
    """layer, mean, lo, hi, n (prompts) of q / scale."""
    rows = []
    for layer, v in per_prompt(ent, lens, q).iterrows():
        v = v.dropna().to_numpy() / scale
        if v.size:
            rows.append({"layer": int(layer)} | mean_ci(v))
    return pd.DataFrame(rows)


def reading(lo: float, hi: float) -> str:
    return "exploration" if lo > 0 else "convergence" if hi < 0 else "integration"


def three_stage_fit(readings: list[str]) -> tuple[float, int, int]:
    """Best split of the layers into early [0, i) / middle [i, j) / late [j, L) runs read exploration /
    integration / convergence, each stage holding at least 2 layers that read so: (share of all layers whose
    interval reading matches its stage, i, j); (nan, 0, 0) when no split has 2 matching layers in every stage."""
    L, best = len(readings), (float("nan"), 0, 0)
    want = ("exploration", "integration", "convergence")
    for i in range(1, L - 1):
        for j in range(i + 1, L):
            per = [sum(r == want[s] for r in seg) for s, seg in enumerate((readings[:i], readings[i:j],
                                                                           readings[j:]))]
            if min(per) >= 2 and not sum(per) / L <= best[0]:
                best = (sum(per) / L, i, j)
    return best


def claims(name: str, lens: str, ent: pd.DataFrame, log_v: float, L: int) -> dict:
    h = per_prompt(ent, lens, "H_layer") / log_v  # (L + 1, prompts)
    early = h.loc[[x for x in h.index if 1 <= x <= L / 2]].mean(axis=0)
    inner = h.loc[[x for x in h.index if 1 <= x < L]].mean(axis=1)
    peak = int(inner.idxmax())
    drop = mean_ci((h.loc[peak] - h.loc[L]).dropna().to_numpy())
    ffn = layer_cis(ent, lens, "dH_ffn")
    ffn = ffn[ffn["layer"] >= 1]
    pos = ffn[ffn["lo"] > 0]["layer"].tolist()
    thirds = sorted({min(2, int(3 * (x - 1) / L)) for x in pos})
    read = [reading(lo, hi) for lo, hi in zip(ffn["lo"], ffn["hi"])]
    share, i, j = three_stage_fit(read)
    return {
        "model": name, "lens": lens, "n_prompts": int(h.shape[1]),
        "H_early_norm": float(early.mean()), "peak_layer": peak, "H_peak_norm": float(inner.max()),
        "H_last_norm": float(h.loc[L].mean()),
        "collapse_drop": drop["mean"], "collapse_lo": drop["lo"], "collapse_hi": drop["hi"],
        "high_then_collapse": bool(drop["lo"] > 0.1 and inner.max() >= 0.3),
        "ffn_positive_layers": len(pos), "ffn_positive_list": " ".join(map(str, pos)),
        "ffn_positive_thirds": len(thirds), "dispersed_ffn_exploration": len(thirds) == 3,
        "ffn_readings": "".join(r[0].upper() for r in read),
        "three_stage_share": round(share, 3),
        "three_stage_split": f"1-{i} | {i + 1}-{j} | {j + 1}-{L}" if i else "none",
        "three_stages": bool(share >= 0.8),
    }


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, many=True)
    args = p.parse_args(argv)
    runs, lenses = runs_and_lenses(args)
    out = Path(args.out)
    tables = out.parent / "tables"
    out.mkdir(parents=True, exist_ok=True)
    tables.mkdir(parents=True, exist_ok=True)
    flows, dhs, stages, claim_rows = [], [], [], []
    for lens in lenses:
        f_flow = go.Figure()
        f_dh = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                             subplot_titles=("ΔH_attn = H(A^l) − H(a_in^l)", "ΔH_ffn = H(F^l) − H(f_in^l)"))
        for k, run in enumerate(runs):
            m = run.manifest["model"]
            name, L, log_v = model_name(m), int(m["n_layers"]), math.log(m["vocab_size"])
            ent = load_entropy(run.path)
            c = COLORS[k % len(COLORS)]
            fl = layer_cis(ent, lens, "H_layer", log_v).assign(model=name, lens=lens)
            fl["rel_depth"] = fl["layer"] / L
            flows.append(fl)
            f_flow.add_trace(go.Scatter(x=list(fl.rel_depth) + list(fl.rel_depth[::-1]),
                                        y=list(fl.hi) + list(fl.lo[::-1]), fill="toself", line={"width": 0},
                                        fillcolor=c, opacity=0.18, showlegend=False, hoverinfo="skip"))
            f_flow.add_trace(go.Scatter(x=fl.rel_depth, y=fl["mean"], mode="lines+markers", name=name,
                                        line={"color": c}))
            for row, q in ((1, "dH_attn"), (2, "dH_ffn")):
                d = layer_cis(ent, lens, q)
                d = d[d["layer"] >= 1].assign(model=name, lens=lens, quantity=q)
                d["rel_depth"] = d["layer"] / L
                dhs.append(d)
                f_dh.add_trace(go.Scatter(
                    x=d.rel_depth, y=d["mean"], mode="lines+markers", name=name, legendgroup=name,
                    showlegend=row == 1, line={"color": c},
                    error_y={"type": "data", "symmetric": False, "array": d.hi - d["mean"],
                             "arrayminus": d["mean"] - d.lo}), row=row, col=1)
            st = detect_stages(run.summary, lens, m["vocab_size"], StageConfig(role="response"))
            stages.append({"model": name, "lens": lens, "n_layers": L, "boundary_layer": st["boundary_layer"],
                           "collapse_layer": st["collapse_layer"], "first_below": st["first_below"],
                           "ffn_stages": " ".join(f"{s['reading'][:4]} {s['start']}-{s['end']}"
                                                  for s in st["stages"]["ffn"]),
                           "attn_stages": " ".join(f"{s['reading'][:4]} {s['start']}-{s['end']}"
                                                   for s in st["stages"]["attn"])})
            claim_rows.append(claims(name, lens, ent, log_v, L))
        n = int(claim_rows[-1]["n_prompts"])
        f_flow.update_layout(template="plotly_white", width=1000, height=520, xaxis_title="relative depth l/L",
                             yaxis_title="H(π^l) / log V",
                             title=f"Layer-policy entropy on relative depth — lens {lens} · response tokens · "
                                   f"mean with 95 % interval over {n} prompts")
        f_dh.update_layout(template="plotly_white", width=1000, height=700,
                           title=f"Entropy change per layer — lens {lens} · response tokens · 95 % intervals "
                                 f"over {n} prompts")
        f_dh.update_xaxes(title_text="relative depth l/L", row=2, col=1)
        f_dh.add_hline(y=0, line={"color": "grey", "width": 1})
        f_flow.write_image(out / f"flows-{lens}.png")
        f_dh.write_image(out / f"dh-{lens}.png")
    pd.concat(flows).to_csv(tables / "flows.csv", index=False, float_format="%.5g")
    pd.concat(dhs).to_csv(tables / "dh.csv", index=False, float_format="%.5g")
    pd.DataFrame(stages).to_csv(tables / "stages.csv", index=False)
    cl = pd.DataFrame(claim_rows)
    cl.to_csv(tables / "claims.csv", index=False, float_format="%.4g")
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(pd.DataFrame(stages).to_string(index=False))
        print(cl.drop(columns=["ffn_positive_list"]).to_string(index=False))


if __name__ == "__main__":
    sys.exit(run_main(main, None))
