"""Independent fp64 check of a Gemma trace: every stored entropy against a forward and decode done by hand in fp64.

The run's own token ids go through the same weights in float64, with every Gemma RMSNorm replaced by an fp64
`x / rms(x) · (1 + w)` (transformers computes that norm in fp32 even in a float64 model; RoPE angles stay as
transformers computes them). Only the raw modules are hooked (`self_attn`, `mlp`, the two pre-norms); the sites are
rebuilt here: A^l and F^l are the branch outputs post-normed by hand, H^0 = √d · embedding, H^l is checked to be
H^{l-1} + A^l + F^l, and each vector is decoded with full (rows, V) fp64 logits through the tied embedding matrix
(final norm by hand for the logit lens, the soft-cap by hand where the config has one).

    nice -n 5 python -m analyses.gemma_fp64 gemma-270m-check --positions 8
prints, per lens and site, rows compared and max / mean |stored − fp64| in nats; writes <out>/gemma-fp64.csv.
`--forward float32` splits the error: the model's own fp32 forward (its own norms, the post-norm outputs read
from the modules) decoded in fp64 gives the decode's share alone (writes <out>/gemma-fp64-decode.csv); `--prompts`
limits the check to some prompt_idx.
"""

from __future__ import annotations

import argparse
import math
import platform
import subprocess
import types
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from entropylens.model.load import load_model
from entropylens.store import SITES, load_entropy, load_tokens, resolve_run


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")


def gemma_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w)


def fp64_sites(model: torch.nn.Module, ids: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
    """site -> (L + 1, T, d) fp64 vectors (row 0: H^0 for `layer`, NaN otherwise), the model's own fp64 logits
    (T, V) and the worst relative additivity residual |H^l − (H^{l-1} + A^l + F^l)| / max |H^l|. An fp32 model's
    vectors are its own (post-norm outputs read from the modules, as the tracer reads them), cast to fp64."""
    cfg, layers = model.config, model.model.layers
    own = model.dtype != torch.float64
    raw: dict[str, list] = {k: [] for k in (*SITES, "post_attn", "post_ffn")}
    hooks = []
    for layer in layers:
        for key, mod in (("attn_in", layer.input_layernorm), ("attn", layer.self_attn),
                         ("ffn_in", layer.pre_feedforward_layernorm), ("ffn", layer.mlp), ("layer", layer),
                         ("post_attn", layer.post_attention_layernorm), ("post_ffn", layer.post_feedforward_layernorm)):
            hooks.append(mod.register_forward_hook(
                lambda mod, args, out, key=key: raw[key].append((out[0] if isinstance(out, tuple) else out)[0])))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    for h in hooks:
        h.remove()
    raw = {k: [v.double() for v in vs] for k, vs in raw.items()}
    logits = logits.double()
    E = model.model.embed_tokens.weight
    h0 = (E[torch.tensor(ids)] * model.model.embed_tokens.embed_scale.to(E.dtype)).double() if own else \
        E[torch.tensor(ids)] * float(model.model.embed_tokens.embed_scale)
    nan = torch.full_like(h0, float("nan"))
    out = {k: [nan] for k in SITES}
    out["layer"] = [h0]
    prev, worst = h0, 0.0
    for i, layer in enumerate(layers):
        if own:
            a, f = raw["post_attn"][i], raw["post_ffn"][i]
        else:
            a = gemma_norm(raw["attn"][i], layer.post_attention_layernorm.weight, cfg.rms_norm_eps)
            f = gemma_norm(raw["ffn"][i], layer.post_feedforward_layernorm.weight, cfg.rms_norm_eps)
        h = raw["layer"][i]
        worst = max(worst, ((h - (prev + a + f)).abs().max() / h.abs().max()).item())
        for key, v in (("attn_in", raw["attn_in"][i]), ("attn", a), ("ffn_in", raw["ffn_in"][i]), ("ffn", f),
                       ("layer", h)):
            out[key].append(v)
        prev = h
    return {k: torch.stack(v) for k, v in out.items()}, logits, worst


def entropies(x: torch.Tensor, E: torch.Tensor, cap: float | None) -> np.ndarray:
    """fp64 entropy of softmax(cap(x E^T)) for rows x (n, d), a few rows at a time."""
    out = []
    for r in torch.split(x, 16):
        z = r @ E.T
        if cap:
            z = cap * torch.tanh(z / cap)
        lp = torch.log_softmax(z, -1)
        out.append(-(lp.exp() * lp).sum(-1))
    return torch.cat(out).numpy()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a complete trace run of a Gemma model")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--positions", type=int, default=8, help="decoded positions checked per prompt")
    ap.add_argument("--cache", default="cache")
    ap.add_argument("--out", default="analyses/reports/families-3/tables")
    ap.add_argument("--forward", choices=("float64", "float32"), default="float64",
                    help="float32: the model's own fp32 forward, decoded in fp64 (the decode's error alone)")
    ap.add_argument("--prompts", default="", help="comma-separated prompt_idx to check (default: all)")
    args = ap.parse_args(argv)
    run = resolve_run(Path(args.cache), args.run)
    tokens, ent = load_tokens(run), load_entropy(run)
    if args.prompts:
        tokens = tokens[tokens.prompt_idx.isin([int(p) for p in args.prompts.split(",")])]
    m = load_model(args.model, dtype=args.forward, cache=Path(args.cache)).model
    if args.forward == "float64":
        for mod in m.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.forward = types.MethodType(lambda self, v: gemma_norm(v, self.weight, self.eps), mod)
    cfg, E = m.config, m.model.embed_tokens.weight.double()
    norm_w = m.model.norm.weight.double()
    cap = getattr(cfg, "final_logit_softcapping", None)
    print(f"cpu: {cpu_name()} · torch {torch.__version__} · python {platform.python_version()} · "
          f"run {run.name} · V = {E.shape[0]}, L = {cfg.num_hidden_layers}, soft-cap {cap}, "
          f"forward {args.forward}", flush=True)
    rows, worst_add, final_err = [], 0.0, 0.0
    for p, seq in tokens.groupby("prompt_idx"):
        seq = seq.sort_values("position")
        sites, logits, add = fp64_sites(m, seq.token_id.tolist())
        worst_add = max(worst_add, add)
        lp = torch.log_softmax(logits, -1)
        final_err = max(final_err, float(np.abs(seq.H_final.to_numpy() - (-(lp.exp() * lp).sum(-1)).numpy()).max()))
        decoded = np.sort(ent[ent.prompt_idx == p].position.unique())
        pos = decoded[np.unique(np.linspace(0, len(decoded) - 1, min(len(decoded), args.positions)).round()
                                .astype(int))]
        for lens in ("bupo", "logit"):
            e = ent[(ent.prompt_idx == p) & (ent.lens == lens) & ent.position.isin(pos)]
            for site in SITES:
                x = sites[site][:, torch.as_tensor(pos)]  # (L + 1, K, d)
                if lens == "logit":
                    x = gemma_norm(x, norm_w, cfg.rms_norm_eps)
                ref = entropies(x.reshape(-1, x.shape[-1]), E, cap).reshape(x.shape[0], len(pos))
                got = e.pivot(index="layer", columns="position", values=f"H_{site}").loc[:, pos].to_numpy()
                d = np.abs(got - ref)
                rows.append({"prompt_idx": int(p), "lens": lens, "site": site, "rows": int(np.isfinite(d).sum()),
                             "max": float(np.nanmax(d)), "mean": float(np.nanmean(d))})
        print(f"prompt {p}: {len(seq)} tokens, {len(pos)} positions checked", flush=True)
    df = pd.DataFrame(rows)
    table = df.groupby(["lens", "site"]).agg(rows=("rows", "sum"), max=("max", "max"), mean=("mean", "mean"))
    print(table.to_string(float_format=lambda v: f"{v:.2e}"))
    print(f"worst |stored − fp64| over every site, layer and lens: {df['max'].max():.2e} nats "
          f"({int(df['rows'].sum())} rows); H_final vs the fp64 model's own logits: {final_err:.2e} nats; "
          f"additivity residual of the fp64 forward: {worst_add:.1e} (relative)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = ("gemma-fp64" if args.forward == "float64" else "gemma-fp64-decode") + \
        (f"-prompts-{args.prompts.replace(',', '-')}" if args.prompts else "") + ".csv"
    df.to_csv(out / name, index=False, float_format="%.4g")
    assert math.isfinite(df["max"].max())


if __name__ == "__main__":
    main()
