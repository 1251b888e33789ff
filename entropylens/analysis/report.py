"""Paper-style figures from cached runs and a self-contained report (`entropylens report`).

Why: researchers put figures in papers and slides, not dashboards. The figures are entropylens.analysis.figures' (the
dashboard draws the same ones); the `fig_*` functions here take a loaded `ReportRun`, so the `analyses/` scripts, the
notebook API, the report and tests share one implementation. The HTML report inlines plotly.js once and works
offline; the Markdown summary links PNG/SVG files written by kaleido; notes are CommonMark (markdown-it-py).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go

from entropylens.analysis import figures
from entropylens.errors import UserError
from entropylens.analysis.config import IMAGE_FORMATS, ReportConfig
from entropylens.analysis.outcome_report import outcome_section
from entropylens.store.schema import model_name
from entropylens.analysis.stages import (StageConfig, complete_trace_run, describe, run_stages, stages_table, to_json,
                                write_stages)
from entropylens.store import load_entropy, load_summary
from entropylens.store.cache import Cache

@dataclass
class ReportRun:
    """One complete trace run as the figures need it."""

    run_id: str
    path: Path
    manifest: dict
    summary: pd.DataFrame
    stages: dict  # run_stages(...) output

    @property
    def label(self) -> str:
        return f"{model_name(self.manifest['model'])} · {self.run_id}"


def load_run(cache: Cache | Path | str, run_id: str, cfg: StageConfig) -> ReportRun:
    """Resolve, check and load a complete trace run with its stages."""
    path, m = complete_trace_run(cache, run_id)
    return ReportRun(run_id, path, m, load_summary(path), run_stages(path, cfg))


def _rows(run: ReportRun, lens: str, role: str) -> pd.DataFrame:
    """Summary rows of one lens and role, outcome `all` (a summary without the column is all `all`)."""
    s = run.summary
    s = s if "outcome" in s.columns else s.assign(outcome="all")
    return s[(s["lens"] == lens) & (s["role"] == role) & (s["outcome"] == "all")]


def fig_trajectory(run: ReportRun, lens: str, role: str) -> go.Figure:
    """Fig. 2 style: mean entropy of the layer, attention and FFN policies per layer (IQR band)."""
    frac = run.stages.get("params", {}).get("collapse_frac", StageConfig.collapse_frac)
    return figures.flow_figure(_rows(run, lens, role), run.manifest, run.run_id, lens, role, collapse_frac=frac)


def fig_delta(run: ReportRun, lens: str, role: str) -> go.Figure:
    """Fig. 3 style: mean ΔH of attention and FFN per layer, coloured by reading; boundary marked."""
    return figures.delta_figure(run.stages["lenses"][lens]["per_layer"], run.manifest, run.run_id, lens, role,
                                run.stages["params"]["band"])


def fig_families(runs: list[ReportRun], lens: str, role: str, quantity: str = "H_layer") -> go.Figure:
    """Runs overlaid on relative depth l/L with normalised entropy H / log V (family = colour)."""
    return figures.families_figure([(r.run_id, r.manifest, _rows(r, lens, role)) for r in runs], quantity, role,
                                   [lens])[0]


def depth_layers(n_layers: int) -> dict[str, int]:
    """Early / middle / late layers for distribution plots: l = round(L/4), round(L/2), L."""
    return {"early": max(1, round(n_layers / 4)), "middle": max(1, round(n_layers / 2)), "late": n_layers}


def token_entropies(run: ReportRun, lens: str, role: str) -> pd.DataFrame:
    """Per-token H of layer / attention / FFN policies at the early, middle and late layers."""
    picks = depth_layers(run.manifest["model"]["n_layers"])
    filters = [("lens", "==", lens), ("layer", "in", list(picks.values()))]
    if role != "all":
        filters.append(("role", "==", role))
    df = load_entropy(run.path, columns=["layer", "role", "H_layer", "H_attn", "H_ffn"], filters=filters)
    names = {v: f"{k} (l={v})" for k, v in picks.items()}
    return df.assign(depth=df["layer"].map(names))


def fig_token_distributions(run: ReportRun, lens: str, role: str) -> go.Figure:
    """Per-token entropy distributions (violins) of early / middle / late layers, per site."""
    return figures.token_distributions_figure(token_entropies(run, lens, role), run.manifest, run.run_id, lens, role)


def fig_boundary(run: ReportRun, lens: str) -> go.Figure:
    """Boundary-layer evidence: FFN ΔH mean ± 95 % interval and median per layer, with H_layer / log V."""
    return figures.boundary_figure(run.stages["lenses"][lens], run.manifest, run.run_id, lens)


def fig_grid(run: ReportRun, lens: str, prompt: int = 0, site: str = "layer") -> go.Figure | None:
    """The logit-lens grid of one prompt (the dashboard's), tracking the reference answer's first token; None
    for a run traced without top-K lists."""
    import json

    from entropylens.store import load_tokens, load_topk
    from entropylens.analysis.grid import build_grid, guess_answer_token

    tk = load_topk(run.path, filters=[("lens", "==", lens), ("prompt_idx", "==", prompt)])
    if tk.empty:
        return None
    ent = load_entropy(run.path, columns=["position", "layer", f"H_{site}"],
                       filters=[("lens", "==", lens), ("prompt_idx", "==", prompt)])
    toks = load_tokens(run.path, columns=["position", "token_text", "role"], filters=[("prompt_idx", "==", prompt)])
    lines = (run.path / "responses.jsonl").read_text(encoding="utf-8").splitlines()
    answer = next((r.get("answer") for r in map(json.loads, filter(str.strip, lines)) if r["prompt_idx"] == prompt),
                  None)
    token = guess_answer_token(answer, tk["token_text"])
    name = model_name(run.manifest["model"])
    return build_grid(tk, ent, toks, name, lens, site, prompt, "H", token, run.run_id)[0]


def paper_checks(stages_lens: dict) -> list[dict]:
    """The paper's description of Llama models, checked on one lens: claim, measurement, agrees?"""
    pl = pd.DataFrame(stages_lens["per_layer"])
    L = stages_lens["n_layers"]
    high = pl["H_layer_norm"] > 0.5
    frac_high = float(high[pl["layer"] < L].mean()) if L > 1 else float("nan")
    c = stages_lens["collapse_layer"]
    inner = pl[pl["layer"] < L]["dH_ffn"]
    last = float(pl[pl["layer"] == L]["dH_ffn"].iloc[0])
    frac_pos = float((inner > 0).mean()) if len(inner) else float("nan")
    return [
        {"claim": "layer-policy entropy stays high (> 0.5 log V) through most layers",
         "measured": f"{frac_high:.0%} of layers 1..L−1 above 0.5 log V", "agrees": frac_high >= 0.5},
        {"claim": "the layer policy collapses only in the last few layers",
         "measured": f"collapse layer {c} of {L} (l/L = {c / L:.2f})" if c is not None else "no collapse",
         "agrees": c is not None and c / L >= 0.8},
        {"claim": "FFN ΔH positive until the final layer",
         "measured": f"{frac_pos:.0%} of layers 1..L−1 have FFN ΔH > 0", "agrees": frac_pos >= 0.8},
        {"claim": "FFN ΔH negative at the final layer", "measured": f"FFN ΔH at l={L}: {last:+.3f} nats",
         "agrees": last < 0},
    ]


def build_report(cfg: ReportConfig) -> Path:
    """Write the report folder; returns the path of index.html."""
    if not cfg.runs:
        raise UserError("name at least one run")
    bad = [f for f in cfg.images if f not in IMAGE_FORMATS]
    if bad:
        raise UserError(f"unknown image format {bad[0]!r}; choose from {', '.join(IMAGE_FORMATS)}")
    scfg = StageConfig(band=cfg.band, collapse_frac=cfg.collapse_frac, role=cfg.role)
    runs = [load_run(cfg.folders(), r, scfg) for r in cfg.runs]
    out = Path(cfg.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(exist_ok=True)
    figs: list[tuple[str, str, go.Figure]] = []
    outcome_md: list[str] = []
    md: list[str] = [f"# {cfg.title}", ""]
    if cfg.command:
        md += ["Regenerate with:", "", "```", cfg.command, "```", ""]
    for run in runs:
        if cfg.write_stages:
            write_stages(run.path, run.stages)
        (out / "tables" / f"stages-{run.run_id}.json").write_text(to_json(run.stages), encoding="utf-8")
        md += _run_markdown(run)
        for lens in run.manifest["lens"]:
            tag = f"{run.run_id}-{lens}"
            pd.DataFrame(run.stages["lenses"][lens]["per_layer"]).to_csv(out / "tables" / f"layers-{tag}.csv",
                                                                        index=False)
            figs += [(f"trajectory-{tag}", f"Entropy trajectory of the internal policies ({run.run_id}, {lens})",
                      fig_trajectory(run, lens, cfg.role)),
                     (f"delta-{tag}", f"ΔH of attention and FFN per layer ({run.run_id}, {lens})",
                      fig_delta(run, lens, cfg.role)),
                     (f"tokens-{tag}", f"Per-token entropy, early / middle / late layers ({run.run_id}, {lens})",
                      fig_token_distributions(run, lens, cfg.role)),
                     (f"boundary-{tag}", f"Boundary-layer choice and its evidence ({run.run_id}, {lens})",
                      fig_boundary(run, lens))]
            if (grid := fig_grid(run, lens)) is not None:
                figs.append((f"grid-{tag}", f"Logit-lens grid, prompt 0, layer policy ({run.run_id}, {lens})", grid))
        omd, ofigs = outcome_section(run.run_id, run.path, run.manifest["lens"], out / "tables")
        md, figs, outcome_md = md + omd, figs + ofigs, outcome_md + omd
    pd.concat([stages_table(r.stages) for r in runs]).to_csv(out / "tables" / "stages.csv", index=False)
    for lens in sorted({lens for r in runs for lens in r.manifest["lens"]}):
        with_lens = [r for r in runs if lens in r.manifest["lens"]]
        figs.append((f"families-{lens}", f"Runs on relative depth, normalised entropy (lens {lens})",
                     fig_families(with_lens, lens, cfg.role)))
    notes = Path(cfg.notes).read_text(encoding="utf-8") if cfg.notes else ""
    if notes:
        md += [notes.strip(), ""]
    md += ["## Figures", ""]
    for name, caption, fig in figs:
        fig.update_layout(width=1000, height=560)
        for fmt in cfg.images:
            fig.write_image(out / "figures" / f"{name}.{fmt}")
        link = f"figures/{name}.png" if "png" in cfg.images else f"figures/{name}.svg" if cfg.images else None
        md += [f"### {caption}", "", f"![{caption}]({link})" if link else f"(`{name}` in index.html)", ""]
    (out / "README.md").write_text("\n".join(md), encoding="utf-8")
    index = out / "index.html"
    index.write_text(_html(cfg, runs, figs, notes, outcome_md), encoding="utf-8")
    return index


def _source_name(source: str) -> str:
    """A prompt file by its name (a report is read elsewhere: no machine path); built-in sets as they are."""
    return Path(source).name if ("/" in source or "\\" in source) else source


def _run_facts(run: ReportRun) -> list[str]:
    """Plain-text facts about a run: model, prompts, sizes, timing."""
    m = run.manifest
    g, t = m.get("generation", {}), m.get("timings", {})
    return [f"model `{model_name(m['model'])}` ({m['model'].get('architecture')}, {m['model']['n_layers']} layers, "
            f"V = {m['model']['vocab_size']}), prompts `{_source_name(m['prompts']['source'])}` "
            f"(n = {m['prompts']['n']}), "
            f"max_new_tokens {g.get('max_new_tokens')}, seed {m.get('seed')}, lens {', '.join(m['lens'])}",
            f"{m.get('n_tokens')} tokens ({m.get('n_response_tokens')} response); trace took "
            f"{t.get('total_s', float('nan')):.0f} s on {m.get('device')}"]


def _run_markdown(run: ReportRun) -> list[str]:
    md = [f"## {run.run_id}", "", *[f"- {f}" for f in _run_facts(run)], ""]
    for lens, st in run.stages["lenses"].items():
        md += [f"**lens {lens}** ({st['role']} tokens): {describe(st)}", "",
               "| claim (paper, Llama) | measured | agrees |", "|---|---|---|"]
        md += [f"| {c['claim']} | {c['measured']} | {'yes' if c['agrees'] else 'no'} |" for c in paper_checks(st)]
        md.append("")
    return md


def _run_html(run: ReportRun) -> str:
    parts = [f"<h2>{html.escape(run.run_id)}</h2>", _notes_html("\n".join(f"- {f}" for f in _run_facts(run)))]
    for lens, st in run.stages["lenses"].items():
        rows = "".join(f"<tr><td>{html.escape(c['claim'])}</td><td>{html.escape(c['measured'])}</td>"
                       f"<td>{'yes' if c['agrees'] else 'no'}</td></tr>" for c in paper_checks(st))
        parts.append(f"<p><b>lens {html.escape(lens)}</b> ({st['role']} tokens): {html.escape(describe(st))}</p>"
                     f"<table><tr><th>claim (paper, Llama)</th><th>measured</th><th>agrees</th></tr>{rows}</table>")
    return "\n".join(parts)


def _notes_html(text: str) -> str:
    """Markdown (CommonMark + tables) as HTML, raw HTML escaped; headings one level down (a note's `##` sits
    under the report's run headings)."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = md.parse(text)
    for t in tokens:
        if t.type in ("heading_open", "heading_close"):
            t.tag = f"h{min(6, int(t.tag[1]) + 1)}"
    return md.renderer.render(tokens, md.options, {})


def _html(cfg: ReportConfig, runs: list[ReportRun], figs: list, notes: str, outcome_md: list[str]) -> str:
    from plotly.offline import get_plotlyjs

    body = [f"<h1>{html.escape(cfg.title)}</h1>"]
    if cfg.command:
        body.append(f"<p>Regenerate with:</p><pre>{html.escape(cfg.command)}</pre>")
    body += [_run_html(run) for run in runs]
    if outcome_md:
        body.append(f"<pre>{html.escape(chr(10).join(outcome_md))}</pre>")
    if notes:
        body.append(_notes_html(notes))
    for name, caption, fig in figs:
        body.append(f"<h3 id='{name}'>{html.escape(caption)}</h3>")
        body.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=name,
                                config={"displaylogo": False}))
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(cfg.title)}</title><script type='text/javascript'>{get_plotlyjs()}</script>"
            "<style>body{font-family:sans-serif;max-width:1040px;margin:2em auto;} table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px} pre{background:#f5f5f5;padding:8px;overflow-x:auto}"
            "</style></head><body>" + "\n".join(body) + "</body></html>")
