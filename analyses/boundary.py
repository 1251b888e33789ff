"""Boundary-layer choice with its evidence, and the stage table written into the run folder.

    python -m analyses.boundary RUN [--band 0.05] [--collapse-frac 0.1] -o figures
writes boundary-<run>-<lens>.{png,svg} and .csv (per-layer FFN ΔH mean, median, 95 % CI, H_layer / log V),
stages-<run>.csv (layer ranges per reading), and CACHE/runs/RUN/stages.json (what the dashboard reads).
The boundary layer is the last layer whose mean FFN ΔH is positive (the BuPO paper's choice).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
from analyses._common import parser, run_main, runs_and_lenses, save

from entropylens.analysis.report import fig_boundary
from entropylens.analysis.stages import describe, stages_table, write_stages


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__).parse_args(argv)
    runs, lenses = runs_and_lenses(args)
    run = runs[0]
    write_stages(run.path, run.stages)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stages_table(run.stages).to_csv(Path(args.out) / f"stages-{run.run_id}.csv", index=False)
    for lens in lenses:
        st = run.stages["lenses"][lens]
        print(f"{run.run_id} · {lens}: {describe(st)}")
        save(fig_boundary(run, lens), pd.DataFrame(st["per_layer"]), args.out, f"boundary-{run.run_id}-{lens}",
             args.formats)


if __name__ == "__main__":
    sys.exit(run_main(main, None))
