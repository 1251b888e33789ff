"""Entropy by outcome: did the response earn its reward, and do the internal policies look different when it did?

A scored trace run (docs/storage.md) holds `outcomes.parquet`, one row per sequence with `reward` and `correct`
(null without a reference), joinable to tokens.parquet / entropy.parquet on `prompt_idx`. From it:

- (`store.summary_by_outcome` writes summary.parquet's rows for all, correct and wrong responses;)
- `outcome_diff`: per layer, the pooled mean over response tokens for correct and wrong responses, their
  difference and a 95 % interval that resamples responses (a response's tokens are not independent);
- `auroc_table`: per (lens, site, layer) the AUROC of a response's mean response-token entropy for predicting
  a wrong answer, with a 95 % interval from a bootstrap that resamples correct and wrong responses separately.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from entropylens.errors import UserError
from entropylens.analysis.intervals import LEVEL, N_BOOT, bootstrap_counts, pooled_mean_diff_ci
from entropylens.store import load_entropy, load_outcomes, load_tokens, outcome_sets

H_SITES = ("H_attn_in", "H_attn", "H_ffn_in", "H_ffn", "H_layer")


# ---------------------------------------------------------------- per response

def response_sums(entropy: pd.DataFrame, quantities: list[str]) -> pd.DataFrame:
    """Per (lens, prompt_idx, layer): sum and count of non-NaN response-token values of each quantity."""
    df = entropy[entropy["role"] == "response"]
    g = df.groupby(["lens", "prompt_idx", "layer"])[quantities]
    return pd.concat({"sum": g.sum(min_count=1).fillna(0.0), "count": g.count()}, axis=1)


def _load(run_dir: Path, quantities: list[str], lens: str | None) -> tuple[pd.DataFrame, dict[str, set[int]]]:
    outcomes = load_outcomes(run_dir)
    sets = outcome_sets(outcomes)
    if not sets["correct"] and not sets["wrong"]:
        return pd.DataFrame(columns=["lens", "prompt_idx", "layer", "role", *quantities]), sets  # nothing scored
    filters = [("role", "==", "response")] + ([("lens", "==", lens)] if lens else [])
    ent = load_entropy(run_dir, columns=["lens", "prompt_idx", "layer", "role", *quantities], filters=filters)
    return ent, sets


def outcome_diff(run_dir: Path | str, lens: str = "bupo", quantities: tuple[str, ...] = ("H_layer", "dH_attn",
                 "dH_ffn"), n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> pd.DataFrame:
    """Per layer and quantity: pooled mean over response tokens of correct and of wrong responses, the
    difference correct − wrong and its interval (bootstrap over responses); NaN where one outcome is absent."""
    ent, sets = _load(Path(run_dir), list(quantities), lens)
    if not sets["correct"] and not sets["wrong"]:
        raise UserError("--by outcome needs scored responses; this run has 0 correct and 0 wrong (prompts without "
                        "a reference answer are scored null)")
    if ent.empty:
        raise UserError(f"run has no response tokens for lens {lens!r}; trace with --generate")
    return diff_from_sums(response_sums(ent, list(quantities)), sets, list(quantities), n_boot, level, seed)


def diff_from_sums(sums: pd.DataFrame, sets: dict[str, set[int]], quantities: list[str], n_boot: int = N_BOOT,
                   level: float = LEVEL, seed: int = 0) -> pd.DataFrame:
    """`outcome_diff` on per-response sums (one lens): rows (layer, quantity, mean_correct, mean_wrong, diff,
    lo, hi, n_correct, n_wrong)."""
    layers = sorted(sums.index.get_level_values("layer").unique())
    rows = []
    for q in quantities:
        part = {}
        for name in ("correct", "wrong"):
            sel = sums[sums.index.get_level_values("prompt_idx").isin(sets[name])]
            wide = {k: sel[(k, q)].unstack("layer").reindex(columns=layers).fillna(0.0).to_numpy()
                    for k in ("sum", "count")}
            part[name] = wide
        if len(part["correct"]["sum"]) and len(part["wrong"]["sum"]):
            r = pooled_mean_diff_ci(part["correct"]["sum"], part["correct"]["count"], part["wrong"]["sum"],
                                    part["wrong"]["count"], level=level, n_boot=n_boot, seed=seed)
        else:  # one outcome only: its means, no difference
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = {k: v["sum"].sum(0) / v["count"].sum(0) if len(v["sum"]) else np.full(len(layers), np.nan)
                        for k, v in part.items()}
            nan = np.full(len(layers), np.nan)
            r = {"mean_a": mean["correct"], "mean_b": mean["wrong"], "diff": nan, "lo": nan, "hi": nan}
        rows.append(pd.DataFrame({"layer": layers, "quantity": q, "mean_correct": r["mean_a"],
                                  "mean_wrong": r["mean_b"], "diff": r["diff"], "lo": r["lo"], "hi": r["hi"],
                                  "n_correct": len(part["correct"]["sum"]), "n_wrong": len(part["wrong"]["sum"])}))
    return pd.concat(rows, ignore_index=True)


# ---------------------------------------------------------------- AUROC

def auroc(wrong: np.ndarray, correct: np.ndarray) -> float:
    """P(score of a wrong response > score of a correct one), ties counting one half (Mann–Whitney)."""
    w, c = np.asarray(wrong, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    k = (w[:, None] > c[None, :]) + 0.5 * (w[:, None] == c[None, :])
    return float(k.mean())


def auroc_ci(wrong: np.ndarray, correct: np.ndarray, mw: np.ndarray, mc: np.ndarray,
             level: float = LEVEL) -> tuple[float, float, float]:
    """AUROC and its percentile interval from multiplicity matrices mw (B, n_wrong), mc (B, n_correct): each
    resample's AUROC is mwᵀ K mc / (n_w n_c) with K the pairwise comparison matrix."""
    w, c = np.asarray(wrong, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    k = (w[:, None] > c[None, :]) + 0.5 * (w[:, None] == c[None, :])  # (n_w, n_c)
    boots = ((mw @ k) * mc).sum(axis=1) / (len(w) * len(c))  # (B,)
    a = (1.0 - level) / 2
    lo, hi = np.quantile(boots, [a, 1.0 - a])
    return float(k.mean()), float(lo), float(hi)


def auroc_table(run_dir: Path | str, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> pd.DataFrame:
    """Per (lens, site, layer): AUROC of the mean response-token entropy for predicting a wrong answer, its
    interval (stratified bootstrap over responses, the same resamples for every cell), n_correct, n_wrong."""
    ent, sets = _load(Path(run_dir), list(H_SITES), None)
    n_c, n_w = len(sets["correct"]), len(sets["wrong"])
    if not n_c or not n_w:
        raise UserError(f"AUROC needs correct and wrong responses; this run has {n_c} correct and {n_w} wrong")
    return auroc_from_sums(response_sums(ent, list(H_SITES)), sets, n_boot, level, seed)


def auroc_from_sums(sums: pd.DataFrame, sets: dict[str, set[int]], n_boot: int = N_BOOT, level: float = LEVEL,
                    seed: int = 0) -> pd.DataFrame:
    """`auroc_table` on per-response sums from `response_sums`."""
    means = sums["sum"] / sums["count"].where(sums["count"] > 0)  # (lens, prompt_idx, layer) x site
    pidx = means.index.get_level_values("prompt_idx")
    wrong_ids = sorted(set(pidx) & sets["wrong"])
    correct_ids = sorted(set(pidx) & sets["correct"])
    mw = bootstrap_counts(len(wrong_ids), n_boot, seed)
    mc = bootstrap_counts(len(correct_ids), n_boot, seed + 1)
    rows = []
    for (lens, layer), g in means.groupby(level=["lens", "layer"]):
        g = g.droplevel(["lens", "layer"])
        for site in H_SITES:
            w, c = g[site].reindex(wrong_ids).to_numpy(), g[site].reindex(correct_ids).to_numpy()
            if np.isnan(w).any() or np.isnan(c).any():
                continue  # a site not traced at this layer (layer 0 holds only H_layer)
            value, lo, hi = auroc_ci(w, c, mw, mc, level)
            rows.append({"lens": lens, "site": site[2:], "layer": int(layer), "auroc": value, "lo": lo, "hi": hi,
                         "n_correct": len(c), "n_wrong": len(w)})
    return pd.DataFrame(rows, columns=["lens", "site", "layer", "auroc", "lo", "hi", "n_correct", "n_wrong"])


def best_separators(table: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """The k cells furthest from chance (|AUROC − 0.5|); AUROC < 0.5 means lower entropy goes with wrong."""
    order = (table["auroc"] - 0.5).abs().sort_values(ascending=False, kind="stable").index
    return table.loc[order[:k]].reset_index(drop=True)


def baseline_aurocs(run_dir: Path | str, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> pd.DataFrame:
    """What an internal cell must beat: AUROC for a wrong answer of the output distribution's mean entropy over the
    response (H_final) and of the response length, with the same resamples as `auroc_table`."""

    out = load_outcomes(run_dir)
    sets = outcome_sets(out)
    tok = load_tokens(run_dir, columns=["prompt_idx", "role", "H_final"], filters=[("role", "==", "response")])
    h = tok.groupby("prompt_idx")["H_final"].mean()
    length = out.set_index("prompt_idx")["n_response_tokens"].astype(float)
    ids = {k: sorted(set(h.index) & v) for k, v in sets.items()}
    if not ids["correct"] or not ids["wrong"]:
        raise UserError("baselines need correct and wrong responses")
    mw, mc = bootstrap_counts(len(ids["wrong"]), n_boot, seed), bootstrap_counts(len(ids["correct"]), n_boot, seed + 1)
    rows = []
    for name, x in (("output entropy H_final", h), ("response length", length)):
        value, lo, hi = auroc_ci(x[ids["wrong"]].to_numpy(), x[ids["correct"]].to_numpy(), mw, mc, level)
        rows.append({"baseline": name, "auroc": value, "lo": lo, "hi": hi})
    return pd.DataFrame(rows)
