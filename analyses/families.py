"""Family comparison: several runs on relative depth l/L with normalised entropy H / log V.

    python -m analyses.families RUN_A RUN_B [...] [--quantity H_layer] -o figures
writes families-<lens>.{png,svg} and .csv (run, model, family, layer, rel_depth, mean, mean_norm).
"""

from __future__ import annotations

import sys

import pandas as pd
from analyses._common import parser, run_main, runs_and_lenses, save

from entropylens.analysis.report import fig_families
from entropylens.store.schema import model_name
from entropylens.store import QUANTITIES


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__, many=True)
    p.add_argument("--quantity", default="H_layer", choices=QUANTITIES, help="summary quantity to overlay")
    args = p.parse_args(argv)
    runs, lenses = runs_and_lenses(args)
    for lens in lenses:
        frames = []
        for run in runs:
            s = run.summary
            d = s[(s["lens"] == lens) & (s["role"] == args.role) & (s["quantity"] == args.quantity)]
            frames.append(d[["layer", "rel_depth", "mean", "mean_norm"]].assign(
                run_id=run.run_id, model=model_name(run.manifest["model"]),
                family=run.manifest["model"].get("family")))
        save(fig_families(runs, lens, args.role, args.quantity), pd.concat(frames, ignore_index=True),
             args.out, f"families-{lens}", args.formats)


if __name__ == "__main__":
    sys.exit(run_main(main, None))
