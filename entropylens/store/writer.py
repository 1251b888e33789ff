"""The trace-run writer: one run folder batch by batch, with resume (docs/storage.md).

Every file appears via `*.tmp` + fsync + `os.replace` (store.folder), per-batch parts first and merged files
only at `finalize`; the manifest flips to `complete` last, so a killed writer never leaves a run that looks
complete. Merging is deterministic (sorted by lens, prompt_idx, position, layer), so a resumed run holds
byte-for-byte the same data as an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from entropylens.errors import UserError
from entropylens.store.folder import (RunFolder, new_run_id, read_manifest, resolve_run, utc_now, write_parquet,
                                      write_text)
from entropylens.store.schema import (ENTROPY_SCHEMA, ENTROPY_SORT, LENSES, OUTCOMES_SCHEMA,
                                      QUANTITIES, SITES, SUMMARY_SCHEMA, TOKEN_ROLES, TOKENS_SCHEMA,
                                      TOKENS_SORT, TOPK_SCHEMA, TOPK_SORT, _check_values, _response_line, _to_table,
                                      outcomes_table, summary_by_outcome)
from entropylens.store.cache import Cache

_PART_RE = re.compile(r"^(tokens|entropy|topk|responses)-(\d{5,})\.(parquet|jsonl)$")
_PART_FILES = {"tokens": "tokens-{:05d}.parquet", "entropy": "entropy-{:05d}.parquet",
               "responses": "responses-{:05d}.jsonl", "topk": "topk-{:05d}.parquet"}
_REQUIRED_PARTS = {"tokens", "entropy", "responses"}  # topk parts are optional (`--topk 0` writes none)

log = logging.getLogger(__name__)


class RunWriter:
    """Writes one trace run folder batch by batch; `finalize` merges, `fail` records the error for resume.
    The run's lifecycle (running / complete / failed, the manifest) is its RunFolder's."""

    def __init__(self, cache: Cache | Path | str, run_id: str, manifest: dict, resume: bool = False):
        new_run_id(run_id)  # validates
        runs = Cache.of(cache).runs
        self.run_dir = resolve_run(cache, run_id) if resume else runs / run_id
        self.parts = self.run_dir / "parts"
        self.previous_manifest = read_manifest(self.run_dir) if resume else None  # to check the settings
        try:
            if not resume:
                runs.mkdir(parents=True, exist_ok=True)
                if self.run_dir.exists():
                    raise UserError(f"run {run_id!r} already exists in {runs}; pick a new name or resume")
                self.run_dir.mkdir()
            self.parts.mkdir(exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create run folder {self.run_dir}: {e.strerror or e}") from e
        if resume and self.previous_manifest.get("status") == "complete":
            raise UserError(f"run {run_id!r} is already complete; nothing to resume")
        for leftover in [*self.parts.glob("*.tmp"), *self.run_dir.glob("*.tmp")]:
            log.info("run %s: removing %s, half-written by a killed writer", run_id, leftover.name)
            leftover.unlink()
        done = self.done_batches()
        for p in self.parts.iterdir():  # parts of a batch cut short are rewritten from scratch
            m = _PART_RE.match(p.name)
            if m and int(m.group(2)) not in done:
                log.info("run %s: removing %s: batch %s was cut short and is traced again", run_id, p.name,
                         int(m.group(2)))
                p.unlink()
        if resume:
            log.info("run %s: resuming in %s; %d batches already complete are kept", run_id, self.run_dir, len(done))
        fields = {"run_id": run_id, "created": utc_now(), "kind": "trace", "parent_run": None, "n_tokens": None,
                  "n_response_tokens": None}
        fields |= {k: v for k, v in manifest.items() if k not in ("run_id", "status", "created")}
        self._finalized, self._joined = False, False
        try:
            self.folder = RunFolder.start(self.run_dir, fields, resume=resume, prefer="given")
        except OSError as e:
            raise UserError(f"cannot write {self.run_dir / 'manifest.json'}: {e.strerror or e}") from e

    @property
    def manifest(self) -> dict[str, Any]:
        return self.folder.manifest

    @classmethod
    def join(cls, cache: Cache | Path | str, run_id: str) -> RunWriter:
        """A writer for another rank of a sharded run (entropylens.tracing.shard): it writes its batches' parts
        only; rank 0 created the folder, owns the manifest and merges at `finalize`."""
        self = cls.__new__(cls)
        self.run_dir = resolve_run(cache, run_id)
        self.parts = self.run_dir / "parts"
        self.folder, self.previous_manifest = RunFolder.open(self.run_dir), None
        self._finalized, self._joined = False, True
        return self

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and not self._finalized:
            try:
                self.fail(f"{exc_type.__name__}: {exc}")
            except OSError:
                pass  # e.g. the disk is full: the manifest stays 'running', which resumes too; keep `exc`

    def _part(self, kind: str, batch_idx: int) -> Path:
        return self.parts / _PART_FILES[kind].format(batch_idx)

    def done_batches(self) -> set[int]:
        """Batches whose three required parts are present (responses are written last, after the optional
        topk part, so this means complete)."""
        found: dict[int, set[str]] = {}
        for p in self.parts.iterdir() if self.parts.is_dir() else ():
            if m := _PART_RE.match(p.name):
                found.setdefault(int(m.group(2)), set()).add(m.group(1))
        return {b for b, kinds in found.items() if kinds >= _REQUIRED_PARTS}

    def _lenses(self) -> tuple[str, ...]:
        """The lens names this run's rows may carry: its manifest's (any registered lens), else the built-ins."""
        lens = self.manifest.get("lens")
        return tuple(lens) if isinstance(lens, list) and lens else LENSES

    def write_batch(self, batch_idx: int, tokens: pd.DataFrame, entropy: pd.DataFrame,
                    responses: list[dict], topk: pd.DataFrame | None = None) -> None:
        """Validate and cast one batch to the schema, then write its parts (responses last)."""
        if self._finalized:
            raise ValueError("write_batch after finalize")
        if not isinstance(batch_idx, (int, np.integer)) or batch_idx < 0:
            raise ValueError(f"batch_idx must be a non-negative int, got {batch_idx!r}")
        tok = _to_table(tokens, TOKENS_SCHEMA, "tokens", TOKENS_SORT)
        ent = _to_table(entropy, ENTROPY_SCHEMA, "entropy", ENTROPY_SORT)
        _check_values(tok, "role", TOKEN_ROLES, "tokens")
        _check_values(ent, "role", TOKEN_ROLES, "entropy")
        _check_values(ent, "lens", self._lenses(), "entropy")
        tables = [("tokens", tok), ("entropy", ent)]
        if topk is not None:
            tk = _to_table(topk, TOPK_SCHEMA, "topk", TOPK_SORT)
            _check_values(tk, "lens", self._lenses(), "topk")
            _check_values(tk, "site", SITES, "topk")
            tables.append(("topk", tk))
        lines = [_response_line(r) for r in sorted(responses, key=lambda r: r.get("prompt_idx", -1))]
        for kind, table in tables:
            write_parquet(self._part(kind, batch_idx), [table], table.schema)
        write_text(self._part("responses", batch_idx), "".join(line + "\n" for line in lines))

    def update_manifest(self, **fields: Any) -> None:
        """Record more manifest fields (timings, versions...) atomically; status is the writer's."""
        if self._joined:
            raise ValueError("only rank 0 writes the manifest of a sharded run")
        self.folder.update(**fields)

    def _batches(self) -> list[int]:
        batches = sorted(self.done_batches())
        if not batches:
            raise ValueError("finalize: no batches written")
        if batches != list(range(len(batches))):
            raise ValueError(f"finalize: batches {sorted(set(range(batches[-1])) - set(batches))} missing")
        return batches

    def _entropy_tables(self, batches: list[int], kind: str = "entropy") -> Iterable[pa.Table]:
        """Parts in (lens, batch) order: one pass per lens keeps memory at one part."""
        lenses = sorted({v for b in batches
                         for v in pq.read_table(self._part(kind, b), columns=["lens"])
                         .column("lens").unique().to_pylist()})
        for lens in lenses:
            for b in batches:
                table = pq.read_table(self._part(kind, b))
                yield table.filter(pc.equal(table.column("lens"), lens))

    def finalize(self, vocab_size: int, n_layers: int) -> Path:
        """Merge parts into the final files, write the summary, remove parts, mark complete (last)."""
        if self._joined:
            raise ValueError("only rank 0 finalizes a sharded run")
        batches = self._batches()
        log.debug("run %s: merging the parts of %d batches", self.run_dir.name, len(batches))
        tokens = [pq.read_table(self._part("tokens", b)) for b in batches]
        prompts = [t.column("prompt_idx").unique().to_pylist() for t in tokens]
        for b in range(1, len(batches)):
            if prompts[b] and prompts[b - 1] and min(prompts[b]) <= max(prompts[b - 1]):
                raise ValueError(f"finalize: batch {b} has prompt_idx not after batch {b - 1}'s")
        d = self.run_dir
        write_parquet(d / "tokens.parquet", tokens, TOKENS_SCHEMA)
        write_parquet(d / "entropy.parquet", self._entropy_tables(batches), ENTROPY_SCHEMA)
        with_topk = [self._part("topk", b).is_file() for b in batches]
        if any(with_topk):
            if not all(with_topk):
                raise ValueError(f"finalize: batches {[b for b, w in zip(batches, with_topk) if not w]} have no "
                                 "topk part while others do")
            write_parquet(d / "topk.parquet", self._entropy_tables(batches, "topk"), TOPK_SCHEMA)
        text = "".join(self._part("responses", b).read_text(encoding="utf-8") for b in batches)
        write_text(d / "responses.jsonl", text)
        outcomes = outcomes_table([json.loads(line) for line in text.splitlines()])
        write_parquet(d / "outcomes.parquet", [outcomes], OUTCOMES_SCHEMA)
        ent = pq.read_table(d / "entropy.parquet", columns=["lens", "prompt_idx", "layer", "role", *QUANTITIES])
        summary = summary_by_outcome(ent.to_pandas(), outcomes.to_pandas(), vocab_size, n_layers)
        write_parquet(d / "summary.parquet", [_to_table(summary, SUMMARY_SCHEMA, "summary", [])],
                       SUMMARY_SCHEMA)
        shutil.rmtree(self.parts)
        roles = pa.concat_tables(tokens).column("role")
        self.folder.complete(n_tokens=len(roles),
                             n_response_tokens=int(pc.sum(pc.equal(roles, "response")).as_py() or 0))
        self._finalized = True
        return d

    def fail(self, error: str) -> None:
        """Mark the run failed with the error's first line; parts stay so `resume` can continue."""
        if self._finalized:
            raise ValueError("fail after finalize: the run is complete")
        lines = str(error).strip().splitlines()
        if self._joined:  # another rank failed: record it on the manifest as it is now
            self.folder = RunFolder.open(self.run_dir)
        self.folder.fail(lines[0] if lines else "unknown error")
