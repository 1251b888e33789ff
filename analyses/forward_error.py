"""How far are stored entropies from fp64, and whose error is it: the decode's or the model's forward?

For each sequence length, one prompt of that many tokens goes through SmolLM2 twice, the model in float32 (the
default) and the same weights in float64 (`--dtype float64`), with the tracer's own capture backend (nnsight). At a
sample of positions (every site of every layer there) the entropies the tool stores are compared with plain fp64
references:

    decode error   |tool's decode of the fp32 activations − fp64 decode of the same fp32 activations|
    forward error  |fp64 decode of the fp32 activations − fp64 decode of the fp64 activations|
    total          |tool's decode of the fp32 activations − fp64 decode of the fp64 activations|
    fp64 trace     |tool's decode of the fp64 activations (what `--dtype float64` stores) − the same fp64 reference|

"Tool's decode" is `decode_layers` with the lens, additivity check and defaults a trace uses
(entropylens.tracing.engine.LocalEngine.decode), rounded to float32 as entropy.parquet stores it, run on the
sampled positions only: decoding every position of a 2,048-token sequence would cost minutes for nothing. That
this equals the stored entropies is checked on the first length with a real `entropylens trace` run (the `check`
line). The fp64 reference is the bench's (`entropylens.tracing.bench._reference`: full (rows, V) logits in fp64,
log_softmax, −Σ p log p), fed with the model's own unembedding in fp64 (not the lens's fp32, vocabulary-centred
copy) and, for the logit lens, with
vectors normed by the model's final norm in fp64.

    nice -n 5 .venv/bin/python -m analyses.forward_error                         # 32 … 2048 tokens, both lenses
    .venv/bin/python -m analyses.forward_error --lengths 32,128 --lens bupo --positions 8   # a quick look
    nice -n 5 .venv/bin/python -m analyses.forward_error --rope-fp64 --lens bupo --lengths 32,512,2048 --positions 8

`--rope-fp64` adds a third model, float64 with its RoPE angles computed in fp64 (transformers computes them in fp32
in every dtype, so the float64 model above shares that rounding), and the kinds `rope` (float64 forward vs float64
forward with fp64 angles) and `exact` (the stored fp32 entropies vs the latter).

Writes <out>/forward-error.csv (one row per length, lens, position and error kind: max and mean over the
position's site × layer rows) and <out>/forward-error.png; prints the machine, torch, threads and the table.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import entropylens as el
from entropylens.model.backends import make_backend
from entropylens.tracing.engine import ADDITIVE_TOL
from entropylens.tracing.bench import _reference as fp64_reference  # the bench's fp64 full-softmax entropies
from entropylens.core.decode import decode_layers
from entropylens.core.lens import Lens, make_lens
from entropylens.model.load import load_model
from entropylens.model.layout import SITES, additivity_error, find_layout
from entropylens.data.tasks import builtin_items

KINDS = ("decode", "forward", "total", "fp64_trace")


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:  # noqa: BLE001 - lscpu missing: say so, do not fail the measurement
        return platform.processor() or "unknown (no lscpu)"


def chat_ids(tok, text: str) -> list[int]:
    """Token ids of `text` rendered as one user turn with the chat template, as a trace renders a prompt."""
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    return tok(rendered, add_special_tokens=False)["input_ids"]


def prompt_text(tok, length: int) -> str:
    """A prompt whose chat-rendered token count is about `length`: built-in word and arithmetic problems."""
    overhead = len(chat_ids(tok, ""))
    body = "\n".join(t for t, _, _ in builtin_items("mixed", 0, "all"))
    ids = tok(body, add_special_tokens=False)["input_ids"][: max(1, length - overhead)]
    return tok.decode(ids)


def stored(run, lens: str, n_layers: int, T: int) -> dict[str, np.ndarray]:
    """site -> (L + 1, T) fp64 array of a run's stored entropies (rows without the site are NaN)."""
    e = run.entropy[run.entropy["lens"] == lens]
    out = {}
    for s in SITES:
        a = np.full((n_layers + 1, T), np.nan)
        a[e["layer"].to_numpy(), e["position"].to_numpy()] = e[f"H_{s}"].to_numpy(dtype=np.float64)
        out[s] = a
    return out


def rope_in_fp64(model) -> None:
    """Make a Llama-style model compute its RoPE angles and their cos/sin in fp64 (default RoPE type only)."""
    rot = model.model.rotary_emb
    cfg = model.config
    params = getattr(cfg, "rope_parameters", None) or {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if params.get("rope_type", "default") != "default":
        sys.exit(f"--rope-fp64 handles the default RoPE only, not {params['rope_type']!r}")
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))

    def forward(x, position_ids):
        freqs = position_ids[..., None].double() * inv.to(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * rot.attention_scaling).to(x.dtype), (emb.sin() * rot.attention_scaling).to(x.dtype)

    rot.forward = forward


def tool(acts, positions: np.ndarray, model, lens: str) -> dict[str, np.ndarray]:
    """site -> (L + 1, K) entropies the tool stores for these positions: `decode_layers` as a trace calls it
    (entropylens.tracing.engine.LocalEngine.decode: the lens from the model's head, the additive `layer` trick when the
    residual stream adds up), rounded to float32 as entropy.parquet holds them."""
    layout = find_layout(model)
    p = torch.as_tensor(positions)
    h0 = acts.h0[0, p]
    site_acts = {s: torch.stack([x[0, p] for x in xs]) for s, xs in acts.sites.items()}
    stats = decode_layers(h0, site_acts, SITES, make_lens(lens, model, layout.final_norm(model)),
                          additive=additivity_error(acts) < ADDITIVE_TOL)
    out = {}
    for s in SITES:
        a = np.full((len(acts.sites["attn"]) + 1, len(positions)), np.nan)
        a[0 if s == "layer" else 1 :] = stats[s].entropy.numpy().astype(np.float32)
        out[s] = a
    return out


def reference(acts, positions: np.ndarray, W64: torch.Tensor, norm64, lens: str, block: int = 8):
    """site -> (L + 1, len(positions)) fp64 entropies of one sequence's activations (B = 1) at `positions`."""
    exact = Lens("fp64", W64, None, None, None)  # plain x W_U^T in fp64 (no centring, no fp32 rounding)
    L = len(acts.sites["attn"])
    out = {s: np.full((L + 1, len(positions)), np.nan) for s in SITES}
    f = (lambda x: norm64(x)) if lens == "logit" else (lambda x: x)
    gen = torch.Generator().manual_seed(0)
    for b0 in range(0, len(positions), block):
        p = torch.as_tensor(positions[b0 : b0 + block])
        with torch.no_grad():
            h0 = f(acts.h0[0, p].double())
            per = {s: f(torch.stack([x[0, p] for x in acts.sites[s]]).double()) for s in SITES if s != "layer"}
            per["layer"] = f(torch.stack([x[0, p] for x in acts.sites["layer"]]).double())
        n_rows = {s: (L + 1 if s == "layer" else L) * len(p) for s in SITES}
        for s in SITES:  # one site at a time keeps the (rows, V) fp64 logits small
            ref = fp64_reference(exact, h0, per, (s,), n_rows[s], gen)
            (li, ti), H = ref[s]
            rows = out[s][:, b0 : b0 + len(p)]
            rows[(li + (0 if s == "layer" else 1)).numpy(), ti.numpy()] = H.numpy()
    return out


def errors(a: dict, b: dict, positions: np.ndarray | None) -> np.ndarray:
    """(rows, K) |a − b| over every site and layer at the K positions (a's columns picked by `positions`)."""
    diffs = []
    for s in SITES:
        x = a[s] if positions is None else a[s][:, positions]
        y = b[s]
        d = np.abs(x - y)
        diffs.append(d[~np.isnan(d).all(1)])
    return np.concatenate(diffs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="32,128,512,1024,2048", help="sequence lengths in tokens (approximate)")
    ap.add_argument("--positions", type=int, default=16, help="positions per sequence checked against fp64")
    ap.add_argument("--lens", default="both", choices=("bupo", "logit", "both"))
    ap.add_argument("--cache", default="cache", help="holds models/ (the embedded SmolLM2 is dequantised there)")
    ap.add_argument("--out", default="docs/figures", help="folder for forward-error.csv and .png")
    ap.add_argument("--no-figure", action="store_true")
    ap.add_argument("--rope-fp64", action="store_true",
                    help="also load a float64 model whose RoPE angles are computed in fp64 (transformers computes them "
                         "in fp32 in every dtype) and report `rope` = |fp64 forward − fp64 forward with fp64 RoPE| "
                         "and `exact` = |stored fp32 trace − the latter|")
    ap.add_argument("--from-csv", help="print the table and draw the figure from a forward-error.csv; measure nothing")
    args = ap.parse_args(argv)
    if args.from_csv:
        return report(pd.read_csv(args.from_csv), Path(args.out), not args.no_figure)
    lengths = [int(x) for x in args.lengths.split(",")]
    lenses = ["bupo", "logit"] if args.lens == "both" else [args.lens]
    print(f"cpu: {cpu_name()} · torch {torch.__version__} · threads {torch.get_num_threads()} · "
          f"python {platform.python_version()}", flush=True)

    t_start = time.perf_counter()
    m32 = load_model("smollm2", dtype="float32", cache=Path(args.cache))
    m64 = load_model("smollm2", dtype="float64", cache=Path(args.cache))
    tok = m32.tokenizer
    head = m64.model.get_output_embeddings()
    if getattr(head, "bias", None) is not None or getattr(m64.model.config, "final_logit_softcapping", None):
        sys.exit("this reference assumes a head without bias or soft-cap (SmolLM2 has neither)")
    W64 = head.weight.detach()
    norm64 = find_layout(m64.model).final_norm(m64.model)
    cap32 = make_backend("nnsight", m32.model, tok, find_layout(m32.model))
    cap64 = make_backend("nnsight", m64.model, tok, find_layout(m64.model))
    cap64r = None
    if args.rope_fp64:
        m64r = load_model("smollm2", dtype="float64", cache=Path(args.cache))
        rope_in_fp64(m64r.model)
        cap64r = make_backend("nnsight", m64r.model, tok, find_layout(m64r.model))
    L = find_layout(m32.model).n_layers
    print(f"models loaded in {time.perf_counter() - t_start:.0f} s", flush=True)

    rows, checked, out = [], False, Path(args.out)
    for length in lengths:
        t0 = time.perf_counter()
        text = prompt_text(tok, length)
        ids = torch.tensor(chat_ids(tok, text))
        T = len(ids)
        pos = np.unique(np.linspace(0, T - 1, min(T, args.positions)).round().astype(int))
        with torch.no_grad():
            a32, a64 = cap32.capture(ids[None]), cap64.capture(ids[None])
            a64r = None if cap64r is None else cap64r.capture(ids[None])
        t1 = time.perf_counter()
        for lens in lenses:
            s32, s64 = tool(a32, pos, m32.model, lens), tool(a64, pos, m64.model, lens)
            if not checked:  # the shortcut against a real trace of the same prompt: same entropies?
                run = el.trace(m32.model, [text], tokenizer=tok, generate=False, lens=lens,
                               save=False, quiet=True, batch_size=1, limit=None, cache=args.cache)
                traced = run.tokens.sort_values("position")["token_id"].to_numpy()
                if not np.array_equal(traced, ids.numpy()):
                    sys.exit("check failed: the trace tokenised the prompt differently")
                gap = np.nanmax(errors(stored(run, lens, L, T), s32, pos))
                print(f"check: stored entropies of an entropylens trace run vs this script's decode at the same "
                      f"{len(pos)} positions ({lens} lens, {T} tokens): max |diff| {gap:.1e} nats", flush=True)
                checked = True
            ref32 = reference(a32, pos, W64, norm64, lens)
            ref64 = reference(a64, pos, W64, norm64, lens)
            err = {"decode": errors(s32, ref32, None), "forward": errors(ref32, ref64, None),
                   "total": errors(s32, ref64, None), "fp64_trace": errors(s64, ref64, None)}
            if a64r is not None:
                ref64r = reference(a64r, pos, W64, norm64, lens)
                err |= {"rope": errors(ref64, ref64r, None), "exact": errors(s32, ref64r, None)}
            for kind, e in err.items():
                for k, p in enumerate(pos):
                    rows.append({"length": T, "lens": lens, "position": int(p), "kind": kind,
                                 "max": float(np.nanmax(e[:, k])), "mean": float(np.nanmean(e[:, k]))})
        out.mkdir(parents=True, exist_ok=True)  # rows so far: a long run that is stopped keeps what it measured
        pd.DataFrame(rows).to_csv(out / "forward-error.csv", index=False, float_format="%.4g")
        done = pd.DataFrame([r for r in rows if r["length"] == T])
        worst = " · ".join(f"{k} {done[done['kind'] == k]['max'].max():.1e}" for k in done["kind"].unique())
        print(f"length {T}: forwards {t1 - t0:.0f} s, decodes + fp64 references {time.perf_counter() - t1:.0f} s "
              f"({len(pos)} positions, {len(lenses)} lens(es)); max |ΔH| {worst}", flush=True)

    print(f"measured in {time.perf_counter() - t_start:.0f} s")
    return report(pd.DataFrame(rows), out, not args.no_figure)


def report(df: pd.DataFrame, out: Path, draw: bool) -> int:
    """Print the per-length table of a measurement's rows (and draw the figure)."""
    table = (df.groupby(["lens", "length", "kind"], sort=False)
               .agg(max=("max", "max"), mean=("mean", "mean"), positions=("position", "size")).reset_index())
    wide = table.pivot_table(index=["lens", "length"], columns="kind", values=["max", "mean"])
    kinds = [k for k in (*KINDS, "rope", "exact") if k in set(df["kind"])]
    wide = wide.reindex(columns=[(m, k) for k in kinds for m in ("max", "mean")])
    pd.set_option("display.width", 200)
    print("\n|ΔH| in nats, over every site × layer at the sampled positions (max over rows, mean of rows):")
    print(wide.to_string(float_format=lambda v: f"{v:.2e}"))
    if draw:
        out.mkdir(parents=True, exist_ok=True)
        figure(df).write_image(out / "forward-error.png", width=1000, height=460, scale=1)
        print(f"wrote {out / 'forward-error.png'}")
    return 0


def figure(df: pd.DataFrame):
    """Left: per length, the max and mean |ΔH| of each error kind; right: per position, the longest sequence."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    colours = {"decode": "#1f77b4", "forward": "#d62728", "total": "#7f7f7f", "fp64_trace": "#2ca02c"}
    names = {"decode": "decode (fp32 acts: tool vs fp64)", "forward": "forward (fp32 vs fp64 acts, fp64 decode)",
             "total": "total (fp32 trace vs fp64)", "fp64_trace": "--dtype float64 trace vs fp64"}
    lens = df["lens"].iloc[0]
    d = df[df["lens"] == lens]
    longest = d["length"].max()
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1, subplot_titles=(
        f"max (solid) and mean (dotted) per length, {lens} lens", f"max per position, length {longest}"))
    for kind in KINDS:
        g = d[d["kind"] == kind].groupby("length").agg(mx=("max", "max"), mn=("mean", "mean")).reset_index()
        fig.add_trace(go.Scatter(x=g["length"], y=g["mx"], mode="lines+markers", name=names[kind],
                                 line=dict(color=colours[kind]), legendgroup=kind), 1, 1)
        fig.add_trace(go.Scatter(x=g["length"], y=g["mn"], mode="lines+markers", showlegend=False,
                                 line=dict(color=colours[kind], dash="dot"), legendgroup=kind), 1, 1)
        p = d[(d["kind"] == kind) & (d["length"] == longest)]
        fig.add_trace(go.Scatter(x=p["position"] + 1, y=p["max"], mode="markers", showlegend=False,
                                 marker=dict(color=colours[kind], size=6), legendgroup=kind), 1, 2)
    fig.add_hline(y=1e-4, line=dict(color="black", dash="dash", width=1))
    fig.update_xaxes(type="log", dtick=1, title_text="sequence length (tokens)", row=1, col=1)
    fig.update_xaxes(type="log", dtick=1, title_text="position + 1", row=1, col=2)
    fig.update_yaxes(type="log", range=[-7, -3.5], dtick=1, title_text="|H − H_fp64| (nats)", exponentformat="power")
    fig.update_layout(template="plotly_white", legend=dict(orientation="h", y=-0.2), margin=dict(t=40, b=10))
    return fig


if __name__ == "__main__":
    raise SystemExit(main())
