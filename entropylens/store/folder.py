"""Run folders `cache/runs/<run_id>/`, whatever wrote them (a trace, the trainer, the bupo pipeline): run ids,
crash-safe files and the manifest (docs/storage.md).

Every file appears via `*.tmp` + fsync + `os.replace` (+ fsync of the folder), so a killed writer leaves the
previous file or none, never half of one. The manifest's status is set by `RunFolder` only: `running` when a
run starts or resumes, then once `complete` (last, after every other file) or `failed` (with the error).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from entropylens.errors import UserError
from entropylens.store.cache import Cache

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # use .fullmatch: `$` allows a trailing \n
STATUSES = ("running", "complete", "failed")
ROW_GROUP_ROWS = 1 << 18  # merged files: parts are buffered into row groups of at least this many rows
COMPRESSION = "zstd"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id(name: str | None = None, *, tag: str | None = None) -> str:
    """`name` validated as is, else a sortable UTC timestamp plus a slug of `tag` (e.g. model-prompts)."""
    if name is not None:
        if not RUN_ID_RE.fullmatch(name):
            raise UserError(f"invalid run name {name!r}: use letters, digits, '.', '_', '-' (not leading)")
        return name
    run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    slug = re.sub(r"[^a-z0-9._-]+", "-", (tag or "").lower()).strip("-.")
    return f"{run_id}-{slug}"[:128] if slug else run_id


def resolve_run(cache: Cache | Path | str, run_id: str) -> Path:
    """The folder `cache/runs/<run_id>`; anything else (paths, '..', symlinks leaving it) is a UserError."""
    if not isinstance(run_id, str) or not RUN_ID_RE.fullmatch(run_id):
        raise UserError(f"invalid run id {run_id!r}: a run id is a folder name under cache/runs")
    root = Cache.of(cache).runs.resolve()
    path = (root / run_id).resolve()
    if path.parent != root or not path.is_dir():
        raise UserError(f"no run {run_id!r} in {root} (see `entropylens runs`)")
    return path


# ---------------------------------------------------------------- atomic files

def _tmp(path: Path) -> Path:
    """Per process, so two processes writing the same file (ranks, concurrent API calls) never share one."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> None:
    """fsync `tmp`, rename it over `path`, fsync the folder so the rename survives a crash."""
    _fsync(tmp)
    os.replace(tmp, path)
    _fsync(path.parent)


def write_text(path: Path, text: str) -> None:
    """A whole UTF-8 text file, crash-safe (*.tmp + fsync + rename)."""
    _tmp(path).write_text(text, encoding="utf-8")
    _commit(_tmp(path), path)


def write_json(path: Path | str, obj: dict) -> None:
    """A whole JSON file, crash-safe (*.tmp + fsync + rename)."""
    write_text(Path(path), json.dumps(obj, indent=2, default=str) + "\n")


def write_atomic(path: Path | str, write) -> None:
    """Crash-safe write of any file: `write(tmp_path)` fills a temporary file that then replaces `path`."""
    path = Path(path)
    write(_tmp(path))
    _commit(_tmp(path), path)


def write_parquet(path: Path, tables: Iterable[pa.Table], schema: pa.Schema) -> None:
    """Stream `tables` into one file, buffering small ones so row groups stay large.

    Float columns get no min/max statistics: Parquet stats leave NaN out, and DuckDB then prunes
    row groups wrongly (`where isnan(H_attn)` finds nothing). Nor dictionaries: entropies rarely
    repeat, and trying costs 3x the write time.
    """
    exact = [f.name for f in schema if not pa.types.is_floating(f.type)]
    with pq.ParquetWriter(_tmp(path), schema, compression=COMPRESSION, write_statistics=exact,
                          use_dictionary=exact) as writer:
        buf: list[pa.Table] = []
        for table in tables:
            buf.append(table)
            if sum(t.num_rows for t in buf) >= ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(buf))
                buf = []
        if buf:
            writer.write_table(pa.concat_tables(buf))
    _commit(_tmp(path), path)


# ---------------------------------------------------------------- manifest

def read_manifest(run_dir: Path | str) -> dict:
    """The run's manifest.json as a dict; UserError when missing or not a JSON object."""
    path = Path(run_dir) / "manifest.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found: not a run folder") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path} is unreadable: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


class RunFolder:
    """A run folder and its manifest.json (a dict, rewritten whole and atomically on every change).

    The one place a run's status is set: `start` writes `running`, `complete` and `fail` end the run, once.
    Traces use it through `store.RunWriter`; the trainer and the bupo pipeline directly.
    """

    def __init__(self, run_dir: Path | str, manifest: dict[str, Any]):
        self.run_dir, self.manifest = Path(run_dir), manifest

    @classmethod
    def open(cls, run_dir: Path | str) -> RunFolder:
        """The folder as stored (no write)."""
        return cls(run_dir, read_manifest(run_dir))

    @classmethod
    def start(cls, run_dir: Path | str, manifest: dict[str, Any], resume: bool = False,
              prefer: str = "stored") -> RunFolder:
        """Mark the run `running` now: a new run with `manifest`, or (`resume`) the stored run. On resume the
        stored fields win with `prefer="stored"` (the trainer keeps what its first attempt recorded), the given
        ones with `prefer="given"` (a trace records this attempt's settings, e.g. its number of ranks); the
        creation time is always the first attempt's. A complete run does not restart."""
        run_dir = Path(run_dir)
        if resume and (run_dir / "manifest.json").is_file():
            old = read_manifest(run_dir)
            if old.get("status") == "complete":
                raise UserError(f"run {run_dir.name!r} is already complete; nothing to resume")
            manifest = (manifest | old if prefer == "stored"
                        else old | manifest | {"created": old.get("created") or manifest.get("created")})
        folder = cls(run_dir, manifest | {"status": "running", "error": None, "finished": None})
        folder.write_manifest()
        return folder

    def write_manifest(self) -> None:
        write_json(self.run_dir / "manifest.json", self.manifest)

    def update(self, **fields: Any) -> None:
        """Record more manifest fields (stage, timings, ...); the status is set by start / complete / fail only."""
        if {"run_id", "status"} & set(fields):
            raise ValueError("run_id and status are managed by RunFolder")
        self.manifest.update(fields)
        self.write_manifest()

    def complete(self, **fields: Any) -> None:
        """The run is done: every other file is written. Marks it `complete` (once) with `fields`."""
        if self.manifest.get("status") == "complete":
            raise ValueError(f"run {self.run_dir.name!r} is already complete")
        self.manifest.update(fields, status="complete", error=None, finished=utc_now())
        self.write_manifest()

    def fail(self, error: str) -> None:
        """Mark the run `failed` with `error`; what it wrote stays, so a resume can continue."""
        if self.manifest.get("status") == "complete":
            raise ValueError("fail after complete: the run is complete")
        self.manifest.update(status="failed", error=error, finished=utc_now())
        self.write_manifest()

    def write_json(self, name: str, obj: dict) -> None:
        """A JSON file of the run (config, evaluation ...), crash-safe."""
        write_json(self.run_dir / name, obj)
