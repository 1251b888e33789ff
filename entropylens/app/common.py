"""The figure + CSV download block used by every view, and the empty figure that says why (colours and the
figures themselves: entropylens.analysis.figures, shared with the report)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from dash import Dash, Input, Output, State, dcc, html, no_update

from entropylens.store.cache import Cache
from entropylens.app.data import prompt_ids
from entropylens.errors import UserError
from entropylens.analysis.figures import SITE_LABELS, TEMPLATE
from entropylens.analysis.stages import complete_trace_run


def message_figure(text: str) -> go.Figure:
    """An empty figure that says why there is nothing to plot."""
    fig = go.Figure()
    fig.add_annotation(text=text, showarrow=False, font={"size": 15}, xref="paper", yref="paper", x=0.5, y=0.5)
    fig.update_layout(template=TEMPLATE, xaxis={"visible": False}, yaxis={"visible": False}, height=300)
    return fig


def figure_block(view: str, title: str, controls: list, height: int = 520) -> html.Div:
    """A view: its controls, a Graph `<view>-graph` and a CSV button `<view>-csv` with its Download."""
    return html.Div(className="view", children=[
        html.Div(className="controls", children=controls + [
            html.Button("Download CSV", id=f"{view}-csv", className="csv-button"),
            dcc.Download(id=f"{view}-download"),
        ]),
        dcc.Loading(dcc.Graph(id=f"{view}-graph", style={"height": f"{height}px"},
                              config={"displaylogo": False,
                                      "toImageButtonOptions": {"format": "png", "filename": view}}),
                    type="circle"),
    ], **{"data-title": title})


def prompt_lens_site(view: str) -> list:
    """The prompt, lens and site controls of a per-prompt view (`<view>-prompt`, `<view>-lens`, `<view>-site`)."""
    return [html.Label("prompt"), dcc.Dropdown(id=f"{view}-prompt", clearable=False, style={"width": "8em"}),
            html.Label("lens"), dcc.RadioItems(id=f"{view}-lens", options=["bupo"], value="bupo", inline=True,
                                               className="radio"),
            html.Label("site"), dcc.Dropdown(id=f"{view}-site", clearable=False, value="layer",
                                             style={"width": "12em"},
                                             options=[{"label": lab, "value": s} for s, lab in SITE_LABELS.items()])]


def register_prompt_lens(app: Dash, cache: Cache | Path, view: str) -> None:
    """The `<view>-prompt` and `<view>-lens` options follow the focus run, keeping the choice where it still exists."""

    @app.callback(Output(f"{view}-prompt", "options"), Output(f"{view}-prompt", "value"),
                  Output(f"{view}-lens", "options"), Output(f"{view}-lens", "value"),
                  Input("focus-run", "value"), State(f"{view}-prompt", "value"), State(f"{view}-lens", "value"))
    def _options(run_id, prompt, lens):
        try:
            run, m = complete_trace_run(cache, run_id)
            ids, lenses = prompt_ids(run), m.get("lens") or ["bupo"]
        except (UserError, OSError, ValueError):
            return [], None, ["bupo"], "bupo"
        return ([{"label": f"prompt {i}", "value": i} for i in ids], prompt if prompt in ids else ids[0],
                lenses, lens if lens in lenses else lenses[0])


def register_view(app: Dash, view: str, build: Callable[..., tuple[object, pd.DataFrame]],
                  inputs: list[tuple[str, str]], target: tuple[str, str] = ("graph", "figure"),
                  message: Callable[[str], object] = message_figure, memo: Cache | Path | None = None,
                  canonical: Callable[[tuple], tuple] | None = None) -> None:
    """Wire `build(*values) -> (figure, data)` to the view's graph and its CSV download.

    The CSV callback rebuilds the same data from the same inputs, so what you download is
    exactly what is plotted; user mistakes (UserError) are shown in the figure. A table view
    passes `target=("panel", "children")` and a `message` that renders the error as text. With `memo` (the
    cache folder) figures are kept per inputs until a run there changes (app.cache.memo_figure): only for views
    that read complete runs, whose files never change while the manifest stays the same; a run that is still
    being written does not invalidate them (app.cache.figure_version). Only the figure is kept: the data behind
    it (a heatmap's is ~10 MB of token rows) is rebuilt for the rare download. `canonical` maps inputs that draw
    the same figure (a checklist ticked in another order) to one value, so they share it.
    """

    def compute(*values):
        try:
            return build(*values)
        except UserError as e:
            return message(str(e)), pd.DataFrame()

    def figure(*values):
        if memo is None:
            return compute(*values)[0]
        from entropylens.app.cache import memo_figure

        key = (view, json.dumps(values, sort_keys=True, default=str))
        return memo_figure(memo, key, lambda: _plain(compute(*values)[0]))

    @app.callback(Output(f"{view}-{target[0]}", target[1]), [Input(c, p) for c, p in inputs])
    def _figure(*values):
        return figure(*(values if canonical is None else canonical(values)))

    @app.callback(Output(f"{view}-download", "data"), Input(f"{view}-csv", "n_clicks"),
                  [State(c, p) for c, p in inputs], prevent_initial_call=True)
    def _csv(n_clicks, *values):
        df = compute(*(values if canonical is None else canonical(values)))[1]
        if df.empty:
            return no_update
        return dcc.send_data_frame(df.to_csv, f"entropylens-{view}.csv", index=False)


def _plain(fig: object) -> object:
    """A Plotly figure as its JSON-ready dict (what Dash sends; its size is countable), anything else as is."""
    return fig.to_plotly_json() if isinstance(fig, go.Figure) else fig
