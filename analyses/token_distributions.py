"""Per-token entropy distributions of the layer / attention / FFN policies at early, middle and late layers.

    python -m analyses.token_distributions RUN -o figures
writes tokens-<run>-<lens>.{png,svg} and .csv (per depth and site: n, mean, quantiles of token entropy).
Layers: l = round(L/4), round(L/2) and L (entropylens.analysis.report.depth_layers).
"""

from __future__ import annotations

import sys

from analyses._common import parser, run_main, runs_and_lenses, save

from entropylens.analysis.report import fig_token_distributions, token_entropies


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__).parse_args(argv)
    runs, lenses = runs_and_lenses(args)
    run = runs[0]
    for lens in lenses:
        df = token_entropies(run, lens, args.role)
        long = df.melt(id_vars=["depth", "layer"], value_vars=["H_layer", "H_attn", "H_ffn"], var_name="site")
        stats = long.groupby(["layer", "depth", "site"])["value"].describe().reset_index()
        save(fig_token_distributions(run, lens, args.role), stats, args.out, f"tokens-{run.run_id}-{lens}",
             args.formats)


if __name__ == "__main__":
    sys.exit(run_main(main, None))
