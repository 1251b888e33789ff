"""Fig. 2 style: entropy trajectory of the internal layer / attention / FFN policies per layer.

    python -m analyses.trajectory RUN [--lens bupo] [--role response] -o figures
writes trajectory-<run>-<lens>.{png,svg} and .csv (per-layer mean, q25, q75 of H_layer, H_attn, H_ffn).
"""

from __future__ import annotations

import sys

from analyses._common import parser, run_main, runs_and_lenses, save

from entropylens.analysis.report import fig_trajectory


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__).parse_args(argv)
    runs, lenses = runs_and_lenses(args)
    run = runs[0]
    for lens in lenses:
        s = run.summary
        data = s[(s["lens"] == lens) & (s["role"] == args.role) & s["quantity"].isin(["H_layer", "H_attn", "H_ffn"])]
        data = data.pivot_table(index="layer", columns="quantity", values=["mean", "q25", "q75"])
        data.columns = [f"{q}_{stat}" for stat, q in data.columns]
        save(fig_trajectory(run, lens, args.role), data.reset_index(), args.out,
             f"trajectory-{run.run_id}-{lens}", args.formats)


if __name__ == "__main__":
    sys.exit(run_main(main, None))
