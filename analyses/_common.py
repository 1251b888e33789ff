"""Shared command-line plumbing of the analysis scripts: which runs, which lens, where to write.

Each script turns cached runs into one figure or table with a function from
`entropylens.analysis.report` / `entropylens.analysis.stages`, then writes it here in the asked formats plus the
plotted numbers as CSV, so a figure in a paper can always be traced back to its data.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.utils import PlotlyJSONEncoder

from entropylens.errors import UserError
from entropylens.analysis.report import ReportRun, load_run
from entropylens.analysis.stages import StageConfig

FORMATS = ("png", "svg", "html", "json")


def parser(doc: str, many: bool = False) -> argparse.ArgumentParser:
    """Arguments every script takes: run id(s), --cache, --lens, --role, stage options, -o, --formats."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("runs", nargs="+" if many else 1, help="run id(s) under CACHE/runs")
    p.add_argument("--cache", default="cache", help="folder holding runs/")
    p.add_argument("--lens", default=None, help="bupo | logit (default: every lens of the run)")
    p.add_argument("--role", default="response", help="response | prompt | all")
    p.add_argument("--band", type=float, default=0.05, help="nats: |mean ΔH| <= band reads as integration")
    p.add_argument("--collapse-frac", type=float, default=0.10, help="collapse threshold as a fraction of log V")
    p.add_argument("-o", "--out", default="figures", help="output folder")
    p.add_argument("--formats", default="png,svg", help=f"comma-separated, from {', '.join(FORMATS)}")
    return p


def runs_and_lenses(args: argparse.Namespace) -> tuple[list[ReportRun], list[str]]:
    """Load the named runs; the lenses to plot are --lens or those of the first run."""
    cfg = StageConfig(band=args.band, collapse_frac=args.collapse_frac, role=args.role)
    runs = [load_run(args.cache, r, cfg) for r in args.runs]
    lenses = [args.lens] if args.lens else list(runs[0].manifest["lens"])
    missing = [(r.run_id, ln) for r in runs for ln in lenses if ln not in r.manifest["lens"]]
    if missing:
        raise UserError(f"run {missing[0][0]} has no lens {missing[0][1]!r}")
    return runs, lenses


def save(fig: go.Figure, data: pd.DataFrame, out: str, name: str, formats: str) -> list[Path]:
    """Write `name.<fmt>` for each format and `name.csv` with the plotted numbers; returns the paths."""
    fmts = [f.strip() for f in formats.split(",") if f.strip()]
    bad = [f for f in fmts if f not in FORMATS]
    if bad:
        raise UserError(f"unknown format {bad[0]!r}; choose from {', '.join(FORMATS)}")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    fig.update_layout(width=1000, height=560)
    paths = []
    for fmt in fmts:
        path = folder / f"{name}.{fmt}"
        if fmt == "html":
            fig.write_html(path, include_plotlyjs=True)
        elif fmt == "json":
            path.write_text(json.dumps(_plain(fig.to_plotly_json()), cls=PlotlyJSONEncoder), encoding="utf-8")
        else:
            fig.write_image(path)
        paths.append(path)
    data.to_csv(folder / f"{name}.csv", index=False)
    return paths + [folder / f"{name}.csv"]


def _plain(obj):
    """Plotly's base64 typed arrays ({"dtype", "bdata"}) back to lists, so any JSON tool reads the figure."""
    if isinstance(obj, dict):
        if "bdata" in obj and "dtype" in obj:
            values = np.frombuffer(base64.b64decode(obj["bdata"]), dtype=obj["dtype"])
            shape = [int(n) for n in str(obj.get("shape", len(values))).split(",")]  # e.g. "2, 3"
            return values.reshape(shape).tolist()
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def run_main(main, argv: list[str] | None) -> int:
    """Run a script's main; a UserError becomes one line on stderr and exit code 2."""
    import sys

    try:
        main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
