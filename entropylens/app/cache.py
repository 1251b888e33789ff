"""One bounded cache per server process for the tables the callbacks read, LRU by bytes.

Why: a production server runs several workers, each answering many readers; re-reading Parquet for every
callback wastes the disk and the CPU, while an unbounded cache per worker would grow with every run and
prompt anyone looked at. Entries are keyed by run folder + the run's manifest mtime (+ what was read), so a
run that completes or is re-traced is seen on the next request without a restart; a run whose manifest does
not say `complete` is never read (entropylens.store refuses it) and nothing of it is cached.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from entropylens.app.figstore import FigureStore
from entropylens.errors import UserError
from entropylens.store.cache import Cache
from entropylens.store.folder import read_manifest

T = TypeVar("T")
MiB = 1 << 20
DEFAULT_BYTES = 1024 * MiB  # every prompt slice of a 10.5 M-row run (256 x 3.05 MiB) + summary, vocab, figures


def nbytes(value: Any) -> int:
    """Approximate memory held by a cached value (DataFrames by their buffers, containers recursively)."""
    if isinstance(value, pd.DataFrame):
        return int(value.memory_usage(index=True, deep=True).sum())
    if isinstance(value, np.ndarray):
        return int(value.nbytes) + 112
    if isinstance(value, pd.Series):
        return int(value.memory_usage(index=True, deep=True))
    if isinstance(value, (tuple, list)):
        return sys.getsizeof(value) + sum(nbytes(v) for v in value)
    if isinstance(value, dict):
        return sys.getsizeof(value) + sum(nbytes(k) + nbytes(v) for k, v in value.items())
    return sys.getsizeof(value)


class ByteLRU:
    """A thread-safe LRU mapping bounded by the summed `nbytes` of its values.

    A value larger than the whole limit is returned but not kept. Two threads missing the same key may
    both load it (the second result replaces the first): loads are pure reads, so this costs time, not
    correctness, and keeps the lock off the slow path.
    """

    def __init__(self, limit_bytes: int):
        if limit_bytes < 0:
            raise ValueError("cache limit must be >= 0 bytes")
        self.limit = int(limit_bytes)
        self._data: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = 0

    def get(self, key: Hashable, load: Callable[[], T]) -> T:
        """The cached value of `key`, or `load()` (kept if it fits)."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key][0]
            self.misses += 1
        value = load()
        size = nbytes(value)
        with self._lock:
            if key in self._data:
                self.bytes -= self._data.pop(key)[1]
            if size <= self.limit:
                self._data[key] = (value, size)
                self.bytes += size
                while self.bytes > self.limit:
                    self.bytes -= self._data.popitem(last=False)[1][1]
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._data)


CACHE = ByteLRU(DEFAULT_BYTES)
FIGURES: FigureStore | None = None  # figures shared with the server's other workers (app.figstore), if any


def configure(limit_bytes: int, figures: FigureStore | None = None) -> None:
    """Set this process's cache limit and the shared figure store (the server does it before forking)."""
    global FIGURES
    CACHE.clear()
    CACHE.limit, FIGURES = int(limit_bytes), figures


def manifest_mtime(run_dir: Path) -> tuple[int, int, int]:
    """The run's version: the manifest is replaced atomically (a new file) whenever the run's status or files
    change. Its inode and size join the mtime, so two rewrites within one clock tick still differ."""
    try:
        st = (Path(run_dir) / "manifest.json").stat()
    except OSError:
        return (-1, -1, -1)
    return (st.st_mtime_ns, st.st_ino, st.st_size)


def run_cached(run_dir: Path, what: Hashable, load: Callable[[], T]) -> T:
    """`load()` once per (run folder, manifest version, what) in this process, within the byte limit.

    `load` must go through entropylens.store's readers, which refuse a run that is not complete, so an
    error is raised (and nothing cached) for a run that is still being written."""
    return CACHE.get((str(run_dir), manifest_mtime(run_dir), what), load)


def cache_version(cache: Cache | Path) -> tuple[tuple[str, tuple[int, int, int]], ...]:
    """Every run folder of `cache` with its manifest's mtime: changes whenever any run appears, goes, completes
    or is re-traced (a stat per run, no reads)."""
    root = Cache.of(cache).runs
    try:
        names = sorted(e.name for e in os.scandir(root) if e.is_dir())
    except OSError:
        return ()
    return tuple((name, manifest_mtime(root / name)) for name in names)


def _status(run_dir: Path) -> str:
    try:
        status = read_manifest(run_dir).get("status")
    except UserError:
        return "unreadable"
    return status if isinstance(status, str) else "unreadable"


def figure_version(cache: Cache | Path) -> tuple[tuple[str, str, tuple[int, int, int] | None], ...]:
    """What a figure of `cache` can depend on: every run's status, and the manifest version of the complete ones.

    Views draw only complete runs (anything else is a message naming its status), so a figure changes when a run
    appears, goes, changes status or is re-traced, never while a running run rewrites its manifest: a trace
    writing into the cache does not make every reader's figures cold again. A manifest is read once per version."""
    root = Cache.of(cache).runs
    out = []
    for name, version in cache_version(cache):
        status = CACHE.get(("status", str(root / name), version), lambda name=name: _status(root / name))
        out.append((name, status, version if status == "complete" else None))
    return tuple(out)


def memo(cache: Cache | Path, key: Hashable, load: Callable[[], T]) -> T:
    """`load()` once per `key` while no run of `cache` changes (cache_version: a stat per run)."""
    return CACHE.get(("memo", str(cache), cache_version(cache), key), load)


def memo_figure(cache: Cache | Path, key: Hashable, load: Callable[[], T]) -> T:
    """`load()` once per `key` while no run of `cache` changes what a figure can show (figure_version): once
    per server when its workers share a FigureStore, else once per process. `load` returns a JSON-ready value."""
    full = ("figure", str(cache), figure_version(cache), key)
    store = FIGURES
    return CACHE.get(full, load if store is None else lambda: store.get(full, load))
