"""Create and serve the dashboard (`entropylens app`)."""

from __future__ import annotations

import socket
from pathlib import Path

import dash

from app import layout
from entropylens.errors import UserError

ASSETS = Path(__file__).resolve().parent / "assets"


def create_app(cache: Path) -> dash.Dash:
    """A Dash app over the run folders in `cache` (reads only; the page lists runs on every load)."""
    cache = Path(cache)
    app = dash.Dash(__name__, title="entropylens", assets_folder=str(ASSETS), suppress_callback_exceptions=False)
    app.layout = lambda: layout.page(cache)
    layout.register(app, cache)
    # a script path outside Dash's registered files (e.g. `..`) is a 404, not a 500
    app.server.register_error_handler(dash.exceptions.DependencyException, lambda e: ("not found", 404))
    return app


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            raise UserError(f"port {port} on {host} is in use; pass --port with a free port") from None


def serve(cache: Path, host: str = "127.0.0.1", port: int = 8050, debug: bool = False) -> None:
    """Serve the dashboard on host:port (127.0.0.1 unless told otherwise) until interrupted."""
    if not (Path(cache) / "runs").is_dir():
        raise UserError(f"no runs in {cache}: trace a model first (entropylens trace) or pass --cache")
    _check_port(host, port)
    create_app(Path(cache)).run(host=host, port=port, debug=debug)
