"""The per-layer table `entropylens show` prints and `Run.show()` prints the same way (rich only: light)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_layer_table(df, title: str, console: Console | None = None) -> None:
    """One row per layer, integers as they are and every other value to 3 decimals."""
    table = Table(title=title, title_justify="left")
    for col in df.columns:
        table.add_column(col, justify="right")
    for row in df.itertuples(index=False):
        table.add_row(*[str(v) if isinstance(v, (int,)) else f"{v:.3f}" for v in row])
    (console or Console()).print(table)
