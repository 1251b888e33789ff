"""`Run`: one trace run as pandas tables and Plotly figures, for notebooks (docs/api.md).

Why: the figures a notebook draws should be the ones the report and the dashboard draw. `flow`, `delta` and
`compare` call entropylens.analysis.report's `fig_trajectory`, `fig_delta` and `fig_families`; `heatmap` calls the
dashboard's own `heatmap_figure` (app/views/tokens.py); `show` prints the CLI's table. A Run reads its folder
lazily, or holds everything in memory (`entropylens.trace(save=False)`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from entropylens.errors import UserError
from entropylens.store.schema import model_name
from entropylens.analysis.stages import StageConfig, stages_from
from entropylens.store import (RUN_ID_RE, SITES, load_entropy, load_summary, load_tokens, load_topk,
                               read_manifest, resolve_run, summary_layer_table)
from entropylens.store.cache import Cache

if TYPE_CHECKING:
    import plotly.graph_objects as go

    from entropylens.analysis import report

TABLES = ("tokens", "entropy", "summary", "responses", "topk")


class Run:
    """A trace run: `.manifest` (dict), `.tokens`, `.entropy`, `.summary`, `.responses` (DataFrames, read on first
    use and kept), `.show()` and figures. Build one with `entropylens.load` or `entropylens.trace`."""

    def __init__(self, path: Path | str):
        self.path: Path | None = Path(path)
        self.manifest: dict = read_manifest(self.path)
        if self.manifest.get("kind", "trace") != "trace":
            raise UserError(f"{self.path.name} is a {self.manifest.get('kind')!r} run, not a trace; load its "
                            "traces (<run>-base, <run>-trained)")
        self._tables: dict[str, pd.DataFrame] = {}

    @classmethod
    def read_into_memory(cls, path: Path | str) -> Run:
        """Every table read now, so the folder may be deleted afterwards (`path` becomes None)."""
        run = cls(path)
        for name in TABLES:
            getattr(run, name)
        run.path = None
        return run

    def __repr__(self) -> str:
        m = self.manifest
        where = str(self.path) if self.path else "in memory"
        return (f"Run({self.run_id!r}, model={m['model']['id']!r}, tokens={m.get('n_tokens')}, lens={m.get('lens')}, "
                f"status={m.get('status')!r}, {where})")

    @property
    def run_id(self) -> str:
        return self.manifest["run_id"]

    # ------------------------------------------------------------ tables

    def _table(self, name: str) -> pd.DataFrame:
        if name not in self._tables:
            if self.path is None:
                raise UserError(f"run {self.run_id} is held in memory without its {name} table")
            self._tables[name] = self._read(name)
        return self._tables[name]

    def _read(self, name: str) -> pd.DataFrame:
        if name == "responses":
            load_summary(self.path)  # the same 'not complete' / damaged-folder errors as the Parquet files
            lines = (self.path / "responses.jsonl").read_text(encoding="utf-8").splitlines()
            return pd.DataFrame([json.loads(line) for line in lines if line.strip()])
        return {"tokens": load_tokens, "entropy": load_entropy, "summary": load_summary,
                "topk": load_topk}[name](self.path)

    @property
    def tokens(self) -> pd.DataFrame:
        """One row per (prompt, position): token, role, output-policy entropy, log p of the next token."""
        return self._table("tokens")

    @property
    def entropy(self) -> pd.DataFrame:
        """One row per (lens, prompt, position, layer): every site's entropy, ΔH, top-1 id and probability."""
        return self._table("entropy")

    @property
    def summary(self) -> pd.DataFrame:
        """Per (lens, layer, quantity, role): mean, std, quartiles, count — what the figures draw."""
        return self._table("summary")

    @property
    def topk(self) -> pd.DataFrame:
        """One row per (lens, prompt, position, layer, site, rank): the K most probable tokens of every internal
        policy (`trace --topk K`), joinable with `.entropy`; empty for a run traced with --topk 0."""
        return self._table("topk")

    @property
    def responses(self) -> pd.DataFrame:
        """One row per prompt: the rendered prompt, the sampled response, the reference answer."""
        return self._table("responses")

    def _lens(self, lens: str | None) -> str:
        have = self.manifest.get("lens") or ["bupo"]
        if lens is None:
            return have[0]
        if lens not in have:
            raise UserError(f"run {self.run_id} has no lens {lens!r}; it has {have}")
        return lens

    def layers(self, lens: str | None = None, role: str = "response") -> pd.DataFrame:
        """Per-layer means of H_layer, H_attn, H_ffn and the ΔHs: the table `entropylens show` prints."""
        return summary_layer_table(self.summary, self._lens(lens), role)

    def show(self, lens: str | None = None, role: str = "response") -> None:
        """Print the per-layer table of every stored lens (or `lens`), as `entropylens show RUN` does."""
        from entropylens.analysis.table import print_layer_table

        for ln in [self._lens(lens)] if lens else self.manifest.get("lens", ["bupo"]):
            title = f"{self.run_id} · lens {ln} · {role} tokens"
            print_layer_table(summary_layer_table(self.summary, ln, role), title)

    def stages(self, role: str = "response", band: float = StageConfig.band,
               collapse_frac: float = StageConfig.collapse_frac) -> dict:
        """Exploration / integration / convergence layer ranges, boundary and collapse layers
        (entropylens.analysis.stages)."""
        return stages_from(self.manifest, self.summary, StageConfig(band, collapse_frac, role), self.run_id)

    # ------------------------------------------------------------ figures

    def _report_run(self, stages: dict | None = None) -> report.ReportRun:
        from entropylens.analysis import report

        return report.ReportRun(self.run_id, self.path, self.manifest, self.summary, stages or {})

    def flow(self, lens: str | None = None, role: str = "response") -> go.Figure:
        """Entropy of the layer, attention and FFN policies per layer (the report's trajectory figure)."""
        from entropylens.analysis.report import fig_trajectory

        return fig_trajectory(self._report_run(self.stages(role)), self._lens(lens), role)

    def delta(self, lens: str | None = None, role: str = "response", band: float = StageConfig.band) -> go.Figure:
        """ΔH of attention and FFN per layer, read as exploration / integration / convergence (the report's)."""
        from entropylens.analysis.report import fig_delta

        return fig_delta(self._report_run(self.stages(role, band)), self._lens(lens), role)

    def compare(self, others: Run | str | Path | list[Any], lens: str | None = None, role: str = "response",
                quantity: str = "H_layer") -> go.Figure:
        """This run and others on relative depth l/L with entropy / log V (the report's families figure).

        others: Runs, or run ids / folders (ids resolve beside this run, in its runs folder)."""
        from entropylens.analysis.report import fig_families
        from entropylens.store import QUANTITIES

        if quantity not in QUANTITIES:
            raise UserError(f"unknown quantity {quantity!r}; choose one of {', '.join(QUANTITIES)}")
        others = others if isinstance(others, list) else [others]
        cache = Cache(self.path.parent.parent, runs=self.path.parent) if self.path else Cache("cache")
        runs = [self] + [o if isinstance(o, Run) else load(o, cache=cache) for o in others]
        ln = self._lens(lens)
        for r in runs[1:]:
            r._lens(ln)
        return fig_families([r._report_run() for r in runs], ln, role, quantity)

    def heatmap(self, prompt: int = 0, lens: str | None = None, site: str = "layer",
                quantity: str = "H") -> go.Figure:
        """Entropy (quantity "H") or ΔH ("dH") per token position and layer of one prompt (the dashboard's)."""
        from entropylens.analysis.figures import heatmap_figure

        if site not in SITES:
            raise UserError(f"unknown site {site!r}; choose from {', '.join(SITES)}")
        if quantity not in ("H", "dH") or (quantity == "dH" and site not in ("attn", "ffn", "layer")):
            raise UserError("quantity is 'H' (any site) or 'dH' (attn, ffn, layer)")
        ln, col = self._lens(lens), f"{quantity}_{site}"
        if self.path is not None and "entropy" not in self._tables:  # read one prompt's rows only
            rows = load_entropy(self.path, columns=["position", "layer", col],
                                filters=[("lens", "==", ln), ("prompt_idx", "==", int(prompt))])
            toks = load_tokens(self.path, columns=["position", "token_text", "role"],
                               filters=[("prompt_idx", "==", int(prompt))])
        else:
            e, t = self.entropy, self.tokens
            rows = e.loc[(e["lens"] == ln) & (e["prompt_idx"] == prompt), ["position", "layer", col]]
            toks = t.loc[t["prompt_idx"] == prompt, ["position", "token_text", "role"]]
        if rows.empty:
            have = sorted(set(self.tokens["prompt_idx"]))
            raise UserError(f"run {self.run_id} has no prompt {prompt}; its prompts are {have[0]}..{have[-1]}")
        toks = toks.sort_values("position").reset_index(drop=True)
        return heatmap_figure(rows, toks, model_name(self.manifest["model"]), ln, int(prompt), site, quantity)


    def grid(self, prompt: int = 0, lens: str | None = None, site: str = "layer", color: str = "H",
             track: int | str | None = None) -> go.Figure:
        """The logit-lens grid (the dashboard's and the report's): each layer's top-1 token per position at one
        site, coloured by entropy ("H") or p1 ("p1"), top-K on hover; `track` (an id or token text) marks that
        token's rank per layer where it is in the top K."""
        from entropylens.analysis.grid import build_grid

        ln = self._lens(lens)
        e, t = self.entropy, self.tokens
        rows = e.loc[(e["lens"] == ln) & (e["prompt_idx"] == prompt)]
        toks = t.loc[t["prompt_idx"] == prompt, ["position", "token_text", "role"]]
        name = model_name(self.manifest["model"])
        return build_grid(self.topk, rows, toks, name, ln, site, int(prompt), color, track, self.run_id)[0]


def load(run: Run | str | Path, cache: Cache | str | Path = "cache", runs_dir: str | Path | None = None) -> Run:
    """A Run from a run id (a folder under `runs_dir`, default `<cache>/runs`, as `entropylens runs` lists) or a
    run folder path."""
    if isinstance(run, Run):
        return run
    if runs_dir is not None:
        cache = Cache(Cache.of(cache).root, runs=runs_dir)
    if isinstance(run, str) and RUN_ID_RE.fullmatch(run) and Cache.of(cache).run_dir(run).is_dir():
        return Run(resolve_run(cache, run))
    if Path(run).is_dir():
        return Run(Path(run))
    raise UserError(f"no run {str(run)!r}: neither a run id in {Cache.of(cache).runs} nor a run folder "
                    "(see `entropylens runs`)")
