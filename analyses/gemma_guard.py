"""Which rows of a Gemma trace the exactness guard redoes in fp64, per lens and site.

The run's own token ids go through the model's fp32 forward one prompt at a time (the vectors the tracer reads,
as in `analyses.gemma_fp64 --forward float32`); every response position is decoded with `decode_layers` exactly
as a trace calls it, counting the rows the guard (entropylens/core/guard.py) sends to its fp64 redo.

    nice -n 5 python -m analyses.gemma_guard fam3-gemma3
prints, per lens and site, rows decoded and rows redone; writes <out>/gemma-guard.csv. A trace batches several
prompts (padded) into one forward, so its own vectors, and a row or two at the guard's margin, can differ.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from analyses.gemma_fp64 import cpu_name, fp64_sites
from entropylens.core import decode
from entropylens.core.lens import make_lens
from entropylens.model.load import load_model
from entropylens.store import SITES, load_tokens, resolve_run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a complete trace run of a Gemma model")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--cache", default="cache")
    ap.add_argument("--out", default="analyses/reports/families-3/tables")
    ap.add_argument("--prompts", default="", help="comma-separated prompt_idx (default: all)")
    args = ap.parse_args(argv)
    tokens = load_tokens(resolve_run(Path(args.cache), args.run))
    if args.prompts:
        tokens = tokens[tokens.prompt_idx.isin([int(p) for p in args.prompts.split(",")])]
    m = load_model(args.model, dtype="float32", cache=Path(args.cache)).model
    lenses = {name: make_lens(name, m, m.model.norm) for name in ("bupo", "logit")}
    print(f"cpu: {cpu_name()} · torch {torch.__version__} · run {args.run}", flush=True)

    redo: list[torch.Tensor] = []
    queue_add = decode.GuardQueue.add

    def add(self, res, rows, x, chunk_max):  # record the rows each block sends to the fp64 redo
        redo.append(rows.clone())
        return queue_add(self, res, rows, x, chunk_max)

    decode.GuardQueue.add = add
    out = []
    try:
        for p, seq in tokens.groupby("prompt_idx"):
            seq = seq.sort_values("position")
            sites, _, _ = fp64_sites(m, seq.token_id.tolist())
            pos = torch.as_tensor((seq.role == "response").to_numpy().nonzero()[0])
            h0, n = sites["layer"][0, pos].float(), len(pos)
            acts = {s: sites[s][1:, pos].float() for s in SITES}
            L = acts["attn"].shape[0]
            for name, lens in lenses.items():
                redo.clear()  # one block: row k of the operand is site k // (L n) (layer: L + 1 rows per token)
                decode.decode_layers(h0, acts, SITES, lens, additive=True, block_bytes=1 << 40, topk=5)
                rows = torch.cat(redo) if redo else torch.empty(0, dtype=torch.long)
                k = 0
                for s in SITES:
                    size = (L + 1 if s == "layer" else L) * n
                    out.append({"prompt_idx": int(p), "lens": name, "site": s, "rows": size,
                                "redone": int(((rows >= k) & (rows < k + size)).sum())})
                    k += size
            print(f"prompt {p}: {n} response positions", flush=True)
    finally:
        decode.GuardQueue.add = queue_add
    df = pd.DataFrame(out)
    table = df.groupby(["lens", "site"])[["rows", "redone"]].sum()
    table["share"] = table.redone / table.rows
    print(table.to_string(float_format=lambda v: f"{v:.1%}"))
    print(f"redone: {int(df.redone.sum())} of {int(df.rows.sum())} rows ({df.redone.sum() / df.rows.sum():.1%})")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    df.to_csv(Path(args.out) / "gemma-guard.csv", index=False)


if __name__ == "__main__":
    main()
