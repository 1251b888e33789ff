"""Page skeleton: header, runs table, focus run, tabs; and the callbacks that tie them together."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs

from dash import Dash, Input, Output, State, ctx, dash_table, dcc, html

from entropylens.store.cache import Cache
from entropylens.app.data import list_runs, usable
from entropylens.store import resolve_run
from entropylens.app.views import flows, grid, outcome, tokens, training
from entropylens.errors import UserError

TABLE_COLUMNS = [("run_id", "run"), ("model", "model"), ("architecture", "architecture"), ("layers", "layers"),
                 ("prompts", "prompts"), ("tokens", "tokens"), ("lens", "lens"), ("date", "date (UTC)"),
                 ("status", "status"), ("kind", "kind"), ("parent_run", "parent")]
N_DEFAULT_SELECTED = 2
GRAPHS = ["flow", "dh", "compare", "heatmap", "grid", "outdiff", "auroc", "diff", "train"]


def table_records(cache: Cache | Path) -> list[dict]:
    """Rows for the runs table (DataTable needs an `id` per row for selected_row_ids)."""
    df = list_runs(cache)
    return [dict(r, id=r["run_id"]) for r in df.astype(str).to_dict("records")]


def default_selection(records: list[dict]) -> list[str]:
    """The newest complete trace runs (records are newest first)."""
    ok = [r["id"] for r in records if usable(r["status"]) and r["kind"] == "trace"]
    return ok[:N_DEFAULT_SELECTED]


def page(cache: Cache | Path) -> html.Div:
    """The whole page; run folders are listed on every page load."""
    records = table_records(cache)
    flow, dh, compare = flows.layout()
    diff, train = training.layout()
    tabs = [("Entropy flow", flow), ("Entropy change ΔH", dh), ("Compare families", compare),
            ("Token × layer", [html.P(id="tokens-outcome", className="hint"), *tokens.layout()]),
            ("Logit-lens grid", grid.layout()),
            ("Right vs wrong", outcome.layout()), ("Before / after", diff), ("Training", train)]
    return html.Div(className="page", children=[
        dcc.Location(id="url", refresh=False),
        html.Header(className="header", children=[
            html.H1("entropylens"),
            html.Span(f"internal-policy entropy · runs {Cache.of(cache).runs.resolve()}", className="subtitle"),
            html.Button("Refresh runs", id="refresh"),
            html.Label("image download"),
            dcc.RadioItems(id="image-format", options=["png", "svg"], value="png", inline=True, className="radio"),
        ]),
        html.Div(id="banner", className="banner"),
        dash_table.DataTable(
            id="runs-table", data=records, row_selectable="multi", selected_rows=[], sort_action="native",
            filter_action="native", page_size=12,
            columns=[{"name": label, "id": col} for col, label in TABLE_COLUMNS],
            style_table={"overflowX": "auto"}, style_cell={"fontSize": 13, "padding": "3px 8px", "textAlign": "left"},
            style_header={"fontWeight": "bold"},
            style_data_conditional=[{"if": {"filter_query": '{status} contains "corrupt"'}, "color": "#b00020"},
                                    {"if": {"filter_query": '{status} contains "failed"'}, "color": "#b00020"},
                                    {"if": {"filter_query": '{status} = "running"'}, "color": "#a36a00"}]),
        html.Div(className="focus", children=[
            html.Label("focus run (entropy flow, ΔH, token × layer):"),
            dcc.Dropdown(id="focus-run", clearable=False, style={"width": "24em"}),
            html.Label("responses (flow, ΔH, compare):"),
            dcc.RadioItems(id="outcome", options=flows.OUTCOME_OPTIONS, value="all", inline=True, className="radio"),
        ]),
        dcc.Tabs(id="tabs", value="Entropy flow", children=[
            dcc.Tab(label=label, value=label, children=content) for label, content in tabs]),
    ])


def register(app: Dash, cache: Cache | Path) -> None:
    """Table refresh and selection (URL ?run=a,b or newest runs), focus run, per-view run lists."""

    @app.callback(Output("runs-table", "data"), Output("runs-table", "selected_rows"),
                  Output("runs-table", "selected_row_ids"), Output("banner", "children"),
                  Input("url", "search"), Input("refresh", "n_clicks"), State("runs-table", "selected_row_ids"))
    def _table(search, _clicks, selected_ids):
        records = table_records(cache)
        ids, banner = [r["id"] for r in records], ""
        wanted = selected_ids if ctx.triggered_id == "refresh" else None
        if wanted is None:
            asked = [x for v in parse_qs((search or "").lstrip("?")).get("run", []) for x in v.split(",") if x]
            try:
                wanted = [resolve_run(cache, x).name for x in asked] or default_selection(records)
            except UserError as e:
                wanted, banner = default_selection(records), f"Ignored the URL: {e}"
        wanted = [x for x in wanted if x in ids]
        return records, [ids.index(x) for x in wanted], wanted, banner

    @app.callback(Output("focus-run", "options"), Output("focus-run", "value"),
                  Input("runs-table", "selected_row_ids"), State("focus-run", "value"))
    def _focus(selected, current):
        selected = selected or []
        return selected, current if current in selected else (selected[0] if selected else None)

    @app.callback(Output("diff-run", "options"), Output("diff-run", "value"),
                  Output("train-run", "options"), Output("train-run", "value"),
                  Input("runs-table", "data"), State("diff-run", "value"), State("train-run", "value"))
    def _bupo_runs(records, diff_cur, train_cur):
        ok = [r for r in records if usable(r["status"])]
        children = [r["id"] for r in ok if r["parent_run"] and r["kind"] == "trace"]
        trainers = [r["id"] for r in ok if r["kind"] == "bupo"]
        pick = lambda cur, opts: cur if cur in opts else (opts[0] if opts else None)  # noqa: E731
        return children, pick(diff_cur, children), trainers, pick(train_cur, trainers)

    @app.callback([Output(f"{g}-graph", "config") for g in GRAPHS], Input("image-format", "value"))
    def _image_format(fmt):
        return [{"displaylogo": False, "toImageButtonOptions": {"format": fmt, "filename": f"entropylens-{g}",
                                                                "scale": 2}} for g in GRAPHS]

    flows.register(app, cache)
    tokens.register(app, cache)
    grid.register(app, cache)
    outcome.register(app, cache)
    training.register(app, cache)
