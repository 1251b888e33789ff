"""Figures shared by the workers of one server: a folder of JSON files, one per drawn figure.

Why: each gunicorn worker keeps its own cache (app.cache), so without this every worker would draw every
figure once more. A worker that draws a figure writes its JSON here (tmp + rename, so a reader never sees half
a file); the others read it (~1 ms) instead of drawing it again (25-100 ms). The keys carry the run versions
(app.cache.figure_version), so a file is never stale, only unused; the folder is bounded by bytes, oldest files
removed first. It lives in a private temporary folder the server makes before forking and removes at exit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Hashable
from pathlib import Path

PRUNE_EVERY = 32  # writes between two size checks of the folder (a scandir)


class FigureStore:
    """JSON-ready values by key in `folder`, within `limit_bytes` (checked every PRUNE_EVERY writes)."""

    def __init__(self, folder: Path, limit_bytes: int):
        self.folder, self.limit, self.writes = Path(folder), int(limit_bytes), 0
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    @classmethod
    def create(cls, limit_bytes: int) -> FigureStore:
        """A store in a new private folder (mode 0700), removed when the creating process exits."""
        import atexit

        folder, owner = Path(tempfile.mkdtemp(prefix="entropylens-figures-")), os.getpid()
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))
        return cls(folder, limit_bytes)

    def _path(self, key: Hashable) -> Path:
        return self.folder / (hashlib.sha256(repr(key).encode()).hexdigest() + ".json")

    def get(self, key: Hashable, load: Callable[[], object]) -> object:
        """The stored value of `key`, or `load()` (JSON-encoded as Dash sends it, stored, and returned decoded
        so every worker answers with the same value)."""
        path = self._path(key)
        try:
            return json.loads(path.read_bytes())
        except (OSError, ValueError):
            pass
        from plotly.io.json import to_json_plotly

        text = to_json_plotly(load())
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except OSError:  # a full disk costs the sharing, not the answer
            tmp.unlink(missing_ok=True)
        self.writes += 1
        if self.writes % PRUNE_EVERY == 0:
            self.prune()
        return json.loads(text)

    def prune(self) -> None:
        """Remove the oldest files until the folder holds at most 3/4 of the limit (when it is over it)."""
        files = []
        try:
            for e in os.scandir(self.folder):
                if e.name.endswith(".json"):
                    st = e.stat()
                    files.append((st.st_mtime, st.st_size, e.path))
        except OSError:
            return
        total = sum(size for _, size, _ in files)
        if total <= self.limit:
            return
        for _, size, path in sorted(files):
            if total <= self.limit * 3 // 4:
                break
            try:
                os.unlink(path)
                total -= size
            except OSError:
                pass
