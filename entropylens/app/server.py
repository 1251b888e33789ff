"""Create and serve the dashboard (`entropylens app`): gunicorn by default, Dash's development server with --dev.

Why gunicorn: the callbacks are CPU-bound Python (Plotly figures, JSON), so one process with threads
(waitress, Werkzeug) is held to one core by the GIL; gunicorn's pre-forked workers (gthread: threads
inside each) use every core, restart a worker that hangs, and are the maintained, widely deployed choice on
Linux/macOS. The app is built once in the master before forking (shared pages of memory); each worker
then has its own byte-bounded table cache (app.cache), and the workers share the figures they draw
(app.figstore).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import dash

from entropylens.app import layout
from entropylens.app.cache import MiB, configure
from entropylens.app.config import AppConfig, is_loopback
from entropylens.app.figstore import FigureStore
from entropylens.errors import UserError
from entropylens.store.cache import Cache

ASSETS = Path(__file__).resolve().parent / "assets"
# the access log names the path only: a first link's ?token=... never reaches a log line
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s" %(s)s %(B)s %(M)sms'


def create_app(cache: Cache | Path, token: str | None = None) -> dash.Dash:
    """A Dash app over the run folders in `cache` (a folder holding runs/, or a Cache naming its runs folder; reads
    only; the page lists runs on every load); with a `token`, every request needs it (app.auth)."""
    cache = Cache.of(cache)
    app = dash.Dash(__name__, title="entropylens", assets_folder=str(ASSETS), suppress_callback_exceptions=False)
    app.layout = lambda: layout.page(cache)
    layout.register(app, cache)
    # a script path outside Dash's registered files (e.g. `..`) is a 404, not a 500
    app.server.register_error_handler(dash.exceptions.DependencyException, lambda e: ("not found", 404))
    if token is not None:
        from entropylens.app.auth import protect

        protect(app.server, token)
    return app


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            raise UserError(f"port {port} on {host} is in use; pass --port with a free port") from None


def prepare(app: dash.Dash) -> None:
    """Run Dash's first-request set-up (it registers the component bundles' paths) before forking.

    Dash does it lazily on a process's first request and flags it done before it is: a worker whose first
    requests arrive together (a browser fetching bundles from a fresh worker) answers some of them 404.
    Done once in the master, every worker inherits a finished set-up."""
    with app.server.test_request_context("/"):
        app._setup_server()


def gunicorn_options(cfg: AppConfig) -> dict:
    """gunicorn settings for `cfg` (bind, gthread workers, logs without query strings)."""
    host = f"[{cfg.host}]" if ":" in cfg.host and not cfg.host.startswith("[") else cfg.host
    return {"bind": f"{host}:{cfg.port}", "workers": cfg.resolved_workers(), "threads": cfg.threads,
            "worker_class": "gthread", "timeout": cfg.timeout, "graceful_timeout": 10, "preload_app": True,
            "keepalive": 30,  # gunicorn's 2 s closes a browser's idle connection between two clicks
            "accesslog": "-", "access_log_format": ACCESS_LOG_FORMAT, "errorlog": "-", "loglevel": "warning",
            "proc_name": "entropylens-app", "forwarded_allow_ips": "127.0.0.1,::1"}


def run_gunicorn(wsgi, options: dict) -> None:  # pragma: no cover - replaced in the unit tests
    """Serve `wsgi` with gunicorn until interrupted."""
    try:
        from gunicorn.app.base import BaseApplication
    except ImportError:  # e.g. Windows, where gunicorn does not run
        raise UserError("the production server needs gunicorn (Linux/macOS): pip install gunicorn, "
                        "or serve with --dev") from None

    class _App(BaseApplication):
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self):
            return wsgi

    _App().run()


def serve(cfg: AppConfig | Path | str, host: str = "127.0.0.1", port: int = 8050, debug: bool = False) -> None:
    """Serve the dashboard until interrupted: `cfg` (or a cache folder, with host / port / debug as before)."""
    if not isinstance(cfg, AppConfig):
        cfg = AppConfig(cache=str(cfg), host=host, port=port, dev=debug)
    cfg.validate()
    cache = cfg.folders()
    if not cache.runs.is_dir():
        raise UserError(f"no runs folder {cache.runs}: trace a model first (entropylens trace) or pass --cache / "
                        "--runs")
    reloaded = os.environ.get("WERKZEUG_RUN_MAIN") == "true"  # --dev's reloader child: the parent holds the port
    if not reloaded:
        _check_port(cfg.host, cfg.port)
    token = cfg.resolved_token()
    # the development server is one process: nothing to share; gunicorn's workers share drawn figures
    configure(cfg.cache_mb * MiB, None if cfg.dev or not cfg.figures_mb else FigureStore.create(cfg.figures_mb * MiB))
    app = create_app(cache, token)
    where = f"http://{cfg.host}:{cfg.port}/"
    guard = "token required (login form, or ?token=... once)" if token else "no token (loopback only)"
    if not is_loopback(cfg.host):
        guard += "; plain HTTP: put a TLS reverse proxy in front"
    if cfg.dev:
        if not reloaded:
            print(f"entropylens app: {where} · Dash development server (debug, hot reload) · {guard}",
                  file=sys.stderr)
        app.run(host=cfg.host, port=cfg.port, debug=True)
        return
    opts = gunicorn_options(cfg)
    prepare(app)
    print(f"entropylens app: {where} · gunicorn, {opts['workers']} workers x {cfg.threads} threads, "
          f"{cfg.cache_mb} MiB table cache each, {cfg.figures_mb} MiB of shared figures · {guard}", file=sys.stderr)
    run_gunicorn(app.server, opts)
