"""Paper-style figures from cached runs and a self-contained report (`entropylens report`).

Why: researchers put figures in papers and slides, not dashboards. Every figure here is a pure
function of stored run data (summary / entropy Parquet, stages) returning a Plotly figure, so the
`analyses/` scripts, the report and tests share one implementation. The HTML report inlines
plotly.js once and works offline; the Markdown summary links PNG/SVG files written by kaleido.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from entropylens.errors import UserError
from entropylens.report_outcome import outcome_section
from entropylens.stages import READINGS, StageConfig, describe, run_stages, stages_table, to_json, write_stages
from entropylens.store import load_entropy, load_summary, read_manifest, resolve_run

# Same look as the dashboard (app/common.py, app/views/flows.py); copied so the library needs no Dash.
SITE_COLORS = {"layer": "#222222", "attn_in": "#9ecae1", "attn": "#1f77b4", "ffn_in": "#fdae6b", "ffn": "#e6550d"}
SITE_LABELS = {"layer": "layer H^l", "attn_in": "attention input", "attn": "attention A^l",
               "ffn_in": "FFN input", "ffn": "FFN F^l"}
FAMILY_COLORS = {"llama": "#1f77b4", "qwen3": "#d62728", "qwen2": "#ff7f0e", "mistral": "#9467bd",
                 "gemma": "#2ca02c", "gemma2": "#2ca02c", "gpt2": "#7f7f7f"}
READING_COLORS = {"exploration": "#e6550d", "integration": "#9e9e9e", "convergence": "#3182bd"}
TEMPLATE = "plotly_white"
IMAGE_FORMATS = ("png", "svg")


@dataclass
class Run:
    """One complete trace run as the figures need it."""

    run_id: str
    path: Path
    manifest: dict
    summary: pd.DataFrame
    stages: dict  # run_stages(...) output

    @property
    def label(self) -> str:
        return f"{self.manifest['model']['id']} · {self.run_id}"


def load_run(cache: Path | str, run_id: str, cfg: StageConfig) -> Run:
    """Resolve, check and load a complete trace run with its stages."""
    path = resolve_run(cache, run_id)
    m = read_manifest(path)
    if m.get("status") != "complete" or m.get("kind", "trace") != "trace":
        raise UserError(f"{run_id} is not a complete trace run (status {m.get('status')}, kind {m.get('kind')})")
    return Run(run_id, path, m, load_summary(path), run_stages(path, cfg))


def _sel(run: Run, lens: str, role: str, quantity: str) -> pd.DataFrame:
    s = run.summary
    return s[(s["lens"] == lens) & (s["role"] == role) & (s["quantity"] == quantity)].sort_values("layer")


def fig_trajectory(run: Run, lens: str, role: str) -> go.Figure:
    """Fig. 2 style: mean entropy of the layer, attention and FFN policies per layer (IQR band)."""
    fig = go.Figure()
    for site in ("layer", "attn", "ffn"):
        d = _sel(run, lens, role, f"H_{site}").dropna(subset=["mean"])
        color = SITE_COLORS[site]
        fig.add_trace(go.Scatter(x=pd.concat([d["layer"], d["layer"][::-1]]), y=pd.concat([d["q75"], d["q25"][::-1]]),
                                 fill="toself", fillcolor=color, opacity=0.15, line={"width": 0},
                                 hoverinfo="skip", showlegend=False))
        fig.add_trace(go.Scatter(x=d["layer"], y=d["mean"], mode="lines+markers", name=SITE_LABELS[site],
                                 line={"color": color, "width": 2.5}, marker={"size": 5}))
    st = run.stages["lenses"][lens]
    fig.add_hline(y=math.log(run.manifest["model"]["vocab_size"]), line={"dash": "dot", "color": "#888"},
                  annotation_text="log V", annotation_position="bottom right")
    fig.add_hline(y=st["collapse_threshold"], line={"dash": "dash", "color": "#2ca02c"},
                  annotation_text=f"{run.stages['params']['collapse_frac']:.0%} of log V")
    fig.update_layout(template=TEMPLATE, legend={"orientation": "h", "y": -0.18},
                      title=f"Internal policy entropy — {run.label} · lens {lens} · {role} tokens (mean, IQR)",
                      xaxis_title="layer l (0 = embedding)", yaxis_title="entropy H (nats)")
    return fig


def fig_delta(run: Run, lens: str, role: str) -> go.Figure:
    """Fig. 3 style: mean ΔH of attention and FFN per layer, coloured by reading; boundary marked."""
    st = run.stages["lenses"][lens]
    band = run.stages["params"]["band"]
    pl = pd.DataFrame(st["per_layer"])
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        subplot_titles=("attention: ΔH_attn = H(A^l) − H(attn input)",
                                        "FFN: ΔH_ffn = H(F^l) − H(FFN input)"))
    for row, module in ((1, "attn"), (2, "ffn")):
        for reading in READINGS:
            d = pl[pl[f"{module}_reading"] == reading]
            fig.add_trace(go.Bar(x=d["layer"], y=d[f"dH_{module}"], name=reading, legendgroup=reading,
                                 marker_color=READING_COLORS[reading], showlegend=row == 1,
                                 error_y={"type": "data", "array": d[f"dH_{module}_ci95"], "thickness": 1}),
                          row=row, col=1)
        fig.add_hrect(y0=-band, y1=band, fillcolor="#9e9e9e", opacity=0.12, line_width=0, row=row, col=1)
    if st["boundary_layer"] is not None:
        fig.add_vline(x=st["boundary_layer"] + 0.5, line={"dash": "dash", "color": "#000"})
    fig.update_layout(template=TEMPLATE, barmode="overlay", legend={"orientation": "h", "y": -0.15},
                      title=f"Entropy change — {run.label} · lens {lens} · {role} tokens "
                            f"(|ΔH| ≤ {band:g} nats = integration; boundary l={st['boundary_layer']})")
    fig.update_yaxes(title_text="ΔH (nats)")
    fig.update_xaxes(title_text="layer l", row=2, col=1)
    return fig


def fig_families(runs: list[Run], lens: str, role: str, quantity: str = "H_layer") -> go.Figure:
    """Runs overlaid on relative depth l/L with normalised entropy H / log V (family = colour)."""
    fig = go.Figure()
    for i, run in enumerate(runs):
        d = _sel(run, lens, role, quantity)
        fam = run.manifest["model"].get("family") or "?"
        color = FAMILY_COLORS.get(fam, ["#8c564b", "#e377c2", "#17becf", "#bcbd22"][i % 4])
        fig.add_trace(go.Scatter(x=d["rel_depth"], y=d["mean_norm"], mode="lines+markers", name=run.label,
                                 line={"color": color, "width": 2.5, "dash": ["solid", "dash", "dot"][i % 3]},
                                 customdata=d["layer"], hovertemplate="l/L %{x:.2f} (layer %{customdata})"))
    fig.update_layout(template=TEMPLATE, legend={"orientation": "h", "y": -0.18},
                      title=f"Families on relative depth — {quantity} / log V · lens {lens} · {role} tokens",
                      xaxis_title="relative depth l / L", yaxis_title="normalised entropy H / log V",
                      yaxis_range=[0, 1.05])
    return fig


def depth_layers(n_layers: int) -> dict[str, int]:
    """Early / middle / late layers for distribution plots: l = round(L/4), round(L/2), L."""
    return {"early": max(1, round(n_layers / 4)), "middle": max(1, round(n_layers / 2)), "late": n_layers}


def token_entropies(run: Run, lens: str, role: str) -> pd.DataFrame:
    """Per-token H of layer / attention / FFN policies at the early, middle and late layers."""
    picks = depth_layers(run.manifest["model"]["n_layers"])
    filters = [("lens", "==", lens), ("layer", "in", list(picks.values()))]
    if role != "all":
        filters.append(("role", "==", role))
    df = load_entropy(run.path, columns=["layer", "role", "H_layer", "H_attn", "H_ffn"], filters=filters)
    names = {v: f"{k} (l={v})" for k, v in picks.items()}
    return df.assign(depth=df["layer"].map(names))


def fig_token_distributions(run: Run, lens: str, role: str) -> go.Figure:
    """Per-token entropy distributions (violins) of early / middle / late layers, per site."""
    df = token_entropies(run, lens, role)
    order = sorted(df["depth"].unique(), key=lambda s: int(re.search(r"l=(\d+)", s).group(1)))
    fig = go.Figure()
    for site in ("layer", "attn", "ffn"):
        fig.add_trace(go.Violin(x=df["depth"], y=df[f"H_{site}"], name=SITE_LABELS[site], box_visible=True,
                                meanline_visible=True, line_color=SITE_COLORS[site], spanmode="hard",
                                points=False))
    fig.update_layout(template=TEMPLATE, violinmode="group", legend={"orientation": "h", "y": -0.18},
                      xaxis={"categoryorder": "array", "categoryarray": order},
                      title=f"Per-token entropy distributions — {run.label} · lens {lens} · {role} tokens "
                            f"({len(df) // max(1, len(order))} tokens)", yaxis_title="entropy H (nats)")
    return fig


def fig_boundary(run: Run, lens: str) -> go.Figure:
    """Boundary-layer evidence: FFN ΔH mean ± 95 % CI and median per layer, with H_layer / log V."""
    st = run.stages["lenses"][lens]
    pl = pd.DataFrame(st["per_layer"])
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    colors = ["#e6550d" if v > 0 else "#3182bd" for v in pl["dH_ffn"]]
    fig.add_trace(go.Bar(x=pl["layer"], y=pl["dH_ffn"], name="FFN ΔH mean ± 95% CI", marker_color=colors,
                         error_y={"type": "data", "array": pl["dH_ffn_ci95"], "thickness": 1}), secondary_y=False)
    fig.add_trace(go.Scatter(x=pl["layer"], y=pl["dH_ffn_median"], mode="markers", name="FFN ΔH median",
                             marker={"symbol": "diamond", "color": "#000", "size": 6}), secondary_y=False)
    fig.add_trace(go.Scatter(x=pl["layer"], y=pl["H_layer_norm"], mode="lines", name="H_layer / log V",
                             line={"color": SITE_COLORS["layer"], "dash": "dot"}), secondary_y=True)
    k, c = st["boundary_layer"], st["collapse_layer"]
    if k is not None:
        fig.add_vline(x=k, line={"dash": "dash", "color": "#e6550d"}, annotation_text=f"boundary l={k}",
                      annotation_position="top left")
    if c is not None:
        fig.add_vline(x=c, line={"dash": "dash", "color": "#2ca02c"}, annotation_text=f"collapse l={c}",
                      annotation_position="bottom left")
    fig.update_layout(template=TEMPLATE, legend={"orientation": "h", "y": -0.18},
                      title=f"Boundary layer (last FFN ΔH > 0) — {run.label} · lens {lens} · {st['role']} tokens")
    fig.update_yaxes(title_text="FFN ΔH (nats)", secondary_y=False)
    fig.update_yaxes(title_text="H_layer / log V", range=[0, 1.05], secondary_y=True)
    fig.update_xaxes(title_text="layer l")
    return fig


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


@dataclass
class ReportConfig:
    """What `entropylens report` gathers and where it writes."""

    runs: list[str]  # run ids under cache/runs (one or more)
    out: str = "report"  # output folder: index.html, README.md, figures/, tables/
    cache: str = "cache"  # folder holding runs/
    role: str = "response"  # which tokens' statistics: response | prompt | all
    band: float = 0.05  # nats: |mean ΔH| <= band reads as integration
    collapse_frac: float = 0.10  # collapse threshold as a fraction of log V
    images: tuple[str, ...] = IMAGE_FORMATS  # static formats written by kaleido; () = none
    write_stages: bool = True  # also write stages.json into each run folder (the dashboard reads it)
    title: str = "entropylens report"  # heading of both documents
    notes: str | None = None  # optional Markdown file whose text is included (discussion of results)
    command: str | None = None  # the command line to print as "regenerate with"


def build_report(cfg: ReportConfig) -> Path:
    """Write the report folder; returns the path of index.html."""
    if not cfg.runs:
        raise UserError("name at least one run")
    bad = [f for f in cfg.images if f not in IMAGE_FORMATS]
    if bad:
        raise UserError(f"unknown image format {bad[0]!r}; choose from {', '.join(IMAGE_FORMATS)}")
    scfg = StageConfig(band=cfg.band, collapse_frac=cfg.collapse_frac, role=cfg.role)
    runs = [load_run(cfg.cache, r, scfg) for r in cfg.runs]
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


def _run_facts(run: Run) -> list[str]:
    """Plain-text facts about a run: model, prompts, sizes, timing."""
    m = run.manifest
    g, t = m.get("generation", {}), m.get("timings", {})
    return [f"model `{m['model']['id']}` ({m['model'].get('architecture')}, {m['model']['n_layers']} layers, "
            f"V = {m['model']['vocab_size']}), prompts `{m['prompts']['source']}` (n = {m['prompts']['n']}), "
            f"max_new_tokens {g.get('max_new_tokens')}, seed {m.get('seed')}, lens {', '.join(m['lens'])}",
            f"{m.get('n_tokens')} tokens ({m.get('n_response_tokens')} response); trace took "
            f"{t.get('total_s', float('nan')):.0f} s on {m.get('device')}"]


def _run_markdown(run: Run) -> list[str]:
    md = [f"## {run.run_id}", "", *[f"- {f}" for f in _run_facts(run)], ""]
    for lens, st in run.stages["lenses"].items():
        md += [f"**lens {lens}** ({st['role']} tokens): {describe(st)}", "",
               "| claim (paper, Llama) | measured | agrees |", "|---|---|---|"]
        md += [f"| {c['claim']} | {c['measured']} | {'yes' if c['agrees'] else 'no'} |" for c in paper_checks(st)]
        md.append("")
    return md


def _run_html(run: Run) -> str:
    parts = [f"<h2>{html.escape(run.run_id)}</h2>", _notes_html("\n".join(f"- {f}" for f in _run_facts(run)))]
    for lens, st in run.stages["lenses"].items():
        rows = "".join(f"<tr><td>{html.escape(c['claim'])}</td><td>{html.escape(c['measured'])}</td>"
                       f"<td>{'yes' if c['agrees'] else 'no'}</td></tr>" for c in paper_checks(st))
        parts.append(f"<p><b>lens {html.escape(lens)}</b> ({st['role']} tokens): {html.escape(describe(st))}</p>"
                     f"<table><tr><th>claim (paper, Llama)</th><th>measured</th><th>agrees</th></tr>{rows}</table>")
    return "\n".join(parts)


def _notes_html(text: str) -> str:
    """A small Markdown subset (headings, bullets, paragraphs, `code`, ``` blocks) as HTML."""
    out, para, in_code = [], [], False

    def inline(s: str) -> str:
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(s))

    def flush() -> None:
        if para:
            out.append(f"<p>{inline(' '.join(para))}</p>")
            para.clear()

    for line in text.splitlines():
        if line.startswith("```"):
            flush()
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
        elif in_code:
            out.append(html.escape(line))
        elif line.startswith("#"):
            flush()
            level = min(6, len(line) - len(line.lstrip("#")) + 1)
            out.append(f"<h{level}>{inline(line.lstrip('#').strip())}</h{level}>")
        elif line.lstrip().startswith(("- ", "* ")):
            flush()
            out.append(f"<ul><li>{inline(line.lstrip()[2:])}</li></ul>")
        elif not line.strip():
            flush()
        else:
            para.append(line.strip())
    flush()
    return "\n".join(out)


def _html(cfg: ReportConfig, runs: list[Run], figs: list, notes: str, outcome_md: list[str]) -> str:
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
