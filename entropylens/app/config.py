"""`entropylens app`'s options as one config (kept free of Dash imports: the CLI reads it at start-up)."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from entropylens.errors import UserError
from entropylens.options import option
from entropylens.store.cache import RUNS_HELP, Cache

TOKEN_ENV = "ENTROPYLENS_APP_TOKEN"


def default_workers() -> int:
    """Twice the CPU count, at most 8. Callbacks are CPU-bound Python, so within a worker its threads take turns
    on one interpreter lock: more workers with 2 threads each answered the load benchmark's tail faster than
    fewer with 4 (2 cores, single 60 s rounds: p99 236 and 281 ms at 4 x 2, 409 ms at 3 x 4, 494 ms at 4 x 4).
    Each worker holds its own table cache, so beyond 8 memory grows faster than throughput."""
    return max(2, min(2 * (os.cpu_count() or 1), 8))


def _workers(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        raise UserError(f"--workers takes a positive integer or 'auto', got {text!r}") from None
    if n < 1:
        raise UserError(f"--workers must be at least 1, got {n}")
    return n


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to any interface


@dataclass
class AppConfig:
    """How to serve the dashboard: where the runs are, where to listen, which server, who may read."""

    cache: str = option("cache", "folder holding runs/ (unless --runs)")
    runs_dir: str | None = option(None, RUNS_HELP, flags=("--runs",))
    host: str = option("127.0.0.1", "interface to bind; a non-loopback one (0.0.0.0 = every interface) needs "
                       "--token")
    port: int = option(8050, "TCP port")
    workers: int | None = option(None, "server processes (auto: twice the CPU count, at most 8)", parse=_workers,
                                 shown="auto")
    threads: int = option(2, "threads per worker (a slow callback does not block the others)")
    cache_mb: int = option(1024, "per-worker cache of the tables the callbacks read, MiB (LRU by bytes)")
    figures_mb: int = option(256, "drawn figures the workers share (JSON files in a private temporary folder), MiB")
    timeout: int = option(120, "seconds a request may take before its worker is restarted")
    token: str | None = option(None, f"shared token every request must carry (login form / ?token= link); "
                               f"required beyond loopback; prefer the {TOKEN_ENV} variable (not shown by ps)")
    dev: bool = option(False, "Dash's development server instead (hot reload, debug; one process)")

    def folders(self) -> Cache:
        """Where the runs are read."""
        return Cache(self.cache, runs=self.runs_dir)

    def resolved_token(self) -> str | None:
        """--token, else $ENTROPYLENS_APP_TOKEN, else none."""
        return self.token if self.token else (os.environ.get(TOKEN_ENV) or None)

    def resolved_workers(self) -> int:
        return self.workers if self.workers is not None else default_workers()

    def validate(self) -> None:
        """One-line UserErrors for values the servers would reject late or unsafely."""
        from entropylens.app.auth import check_token

        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be 0-65535, got {self.port}")
        for name in ("threads", "timeout"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be at least 1, got {self.workers}")
        for name in ("cache_mb", "figures_mb"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        token = self.resolved_token()
        if token is None and not is_loopback(self.host):
            raise UserError(f"--host {self.host} serves every run to anyone who can reach the port: pass --token "
                            f"TOKEN (or set {TOKEN_ENV}), or bind 127.0.0.1")
        if token is not None:
            try:
                check_token(token)
            except ValueError as e:
                raise UserError(str(e)) from None
