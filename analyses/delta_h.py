"""Fig. 3 style: mean ΔH of attention and FFN per layer, read as exploration / integration / convergence.

    python -m analyses.delta_h RUN [--band 0.05] -o figures
writes delta-<run>-<lens>.{png,svg} and .csv (per layer: dH_attn, dH_ffn, their 95 % CIs and readings).
"""

from __future__ import annotations

import sys

import pandas as pd
from analyses._common import parser, run_main, runs_and_lenses, save

from entropylens.analysis.report import fig_delta


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__).parse_args(argv)
    runs, lenses = runs_and_lenses(args)
    run = runs[0]
    for lens in lenses:
        pl = pd.DataFrame(run.stages["lenses"][lens]["per_layer"])
        cols = ["layer", "dH_attn", "dH_attn_ci95", "attn_reading", "dH_ffn", "dH_ffn_ci95", "ffn_reading"]
        save(fig_delta(run, lens, args.role), pl[cols], args.out, f"delta-{run.run_id}-{lens}", args.formats)


if __name__ == "__main__":
    sys.exit(run_main(main, None))
