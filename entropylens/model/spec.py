"""`ModelSpec`: which model, on which device, in which dtype, cached where, and where runs go — the fields
`entropylens trace` and `entropylens bupo` share, declared once (each command's config extends it). Light: no torch
until `load`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from entropylens.options import option
from entropylens.store.cache import RUNS_HELP, Cache

if TYPE_CHECKING:
    from entropylens.model.load import LoadedModel


@dataclass
class ModelSpec:
    """A model as a command names it."""

    model: str = option("smollm2", "`smollm2` (embedded), `gemma3-270m` (after `make gemma`), a local folder, a "
                        ".gguf file or a hub id")
    device: str = option("cpu", "cpu | cuda | cuda:N | auto")
    dtype: str = option("float32", "float32 | bfloat16 | float16 | float64")
    cache: str = option("cache", "folder holding models/ (and runs/, unless --runs)")
    runs_dir: str | None = option(None, RUNS_HELP, flags=("--runs",))
    trust_remote_code: bool = option(False, "allow model code from the checkpoint (only when asked)")

    def folders(self) -> Cache:
        """Where weights are cached and runs are written."""
        return Cache(self.cache, runs=self.runs_dir)

    def load(self, device: str | None = None, device_map: str | None = None) -> LoadedModel:
        """The model, loaded (`device` overrides the spec's, e.g. a rank's own GPU)."""
        from entropylens.model.load import load_model

        return load_model(self.model, self.dtype, device or self.device, Path(self.cache), self.trust_remote_code,
                          device_map)
