"""The look every figure shares: one palette per site, ΔH reading, model family and outcome; the template;
two-line titles; reference lines built as layout entries (entropylens.analysis.figures draws with them).

Why its own module: colours and labels are read by the dashboard's controls and tables too, without the figures.
"""

from __future__ import annotations

import plotly.graph_objects as go

TEMPLATE = "entropylens"  # plotly_white, less the defaults of trace types never drawn here (see _register_template)
SITE_COLORS = {"layer": "#222222", "attn_in": "#9ecae1", "attn": "#1f77b4", "ffn_in": "#fdae6b", "ffn": "#e6550d"}
SITE_LABELS = {"layer": "layer H^l", "attn_in": "attention input", "attn": "attention A^l",
               "ffn_in": "FFN input", "ffn": "FFN F^l"}
FAMILY_COLORS = {"llama": "#1f77b4", "qwen3": "#d62728", "qwen2": "#ff7f0e", "qwen": "#d62728",
                 "mistral": "#9467bd", "gemma": "#2ca02c", "gemma2": "#2ca02c", "gpt2": "#7f7f7f"}
_FALLBACK = ["#8c564b", "#e377c2", "#17becf", "#bcbd22"]
DASHES = ["solid", "dash", "dot", "dashdot", "longdash"]
READING_COLORS = {"exploration": "#e6550d", "integration": "#9e9e9e", "convergence": "#3182bd"}
OUTCOME_STYLE = {"all": ("solid", "#444444"), "correct": ("solid", "#2ca02c"), "wrong": ("dash", "#d62728")}
CI95 = "95 % interval"  # what every error bar on a mean is; the axis titles say so
DH_AXIS = f"mean ΔH ± {CI95} (nats)"


def _register_template() -> None:
    """plotly_white with the trace defaults of scatter, bar and heatmap only: the same look, and a figure
    costs ~5 ms less to build (Plotly copies and validates the whole template into every figure; a
    dashboard worker builds thousands)."""
    import plotly.io as pio

    white = pio.templates["plotly_white"]
    pio.templates[TEMPLATE] = go.layout.Template(layout=white.layout,
                                                 data={k: white.data[k] for k in ("scatter", "bar", "heatmap")})


_register_template()


def hline(y: float, line: dict, text: str | None = None, below: bool = False) -> tuple[dict, list[dict]]:
    """A horizontal line across the plot with an optional label at its right end (above it, or `below`):
    what `fig.add_hline` draws, as layout entries, so a figure is built in one constructor call (add_hline
    costs ~8 ms a line)."""
    shape = {"type": "line", "xref": "x domain", "x0": 0, "x1": 1, "yref": "y", "y0": y, "y1": y, "line": line}
    label = [{"text": text, "showarrow": False, "xref": "x domain", "x": 1, "xanchor": "right", "yref": "y", "y": y,
              "yanchor": "top" if below else "bottom"}] if text else []
    return shape, label


def vline(x: float, line: dict) -> dict:
    """A vertical line over the plot's height (what `fig.add_vline` draws, as a layout shape)."""
    return {"type": "line", "xref": "x", "x0": x, "x1": x, "yref": "y domain", "y0": 0, "y1": 1, "line": line}


def family_color(family: str) -> str:
    """Fixed colour for a model family, so Llama is the same blue in every figure."""
    return FAMILY_COLORS.get(family, _FALLBACK[sum(map(ord, family or "?")) % len(_FALLBACK)])


def two_line_title(main: str, detail: str = "") -> dict:
    """A title whose details sit on a smaller second line (long model + lens + role + band titles fit)."""
    return {"text": f"{main}<br><sup>{detail}</sup>" if detail else main, "x": 0.01, "xanchor": "left"}


def layer_dtick(n_layers: int) -> int | None:
    """A tick per layer up to 40 layers; Plotly's choice beyond."""
    return 1 if n_layers <= 40 else None


def tokens_label(role: str, outcome: str | None = "all") -> str:
    """'response tokens', '... · correct responses': which tokens a figure averages."""
    return f"{role} tokens" + ("" if outcome in (None, "all") else f" · {outcome} responses")


def outcomes_of(outcome: str | None) -> list[str]:
    """The summary outcomes a selector value draws: `both` overlays correct and wrong."""
    return ["correct", "wrong"] if outcome == "both" else [outcome or "all"]
