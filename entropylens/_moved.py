"""Old module paths: before the package had subpackages, its modules sat at the top (`entropylens.models`,
`entropylens.store`, ...). Importing an old path gives the module at its new home; `entropylens.trace` and
`entropylens.decode` are the library's functions now, and importing them as modules says where they went."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
from typing import Any

MOVED = {
    "lens": "core.lens", "lse": "core.lse", "native": "core.native",
    "models": "model.load", "sites": "model.layout", "backends": "model.backends", "remote": "model.remote",
    "prompts": "data.prompts", "tasks": "data.tasks", "rewards": "data.rewards", "bupo.rewards": "data.rewards",
    "schema": "store.schema", "runfolder": "store.folder",
    "config": "tracing.config", "batch": "tracing.batch", "dist": "tracing.shard", "bench": "tracing.bench",
    "stages": "analysis.stages", "outcomes": "analysis.outcomes", "intervals": "analysis.intervals",
    "figures": "analysis.figures", "report": "analysis.report", "report_outcome": "analysis.outcome_report",
    "topk": "analysis.grid", "run": "analysis.run", "cli_print": "cli.output",
}
_FUNCTIONS = {"trace": "tracing.job", "decode": "core.decode"}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import entropylens.<old>` -> the module at its new path (the same module object, not a copy)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        old = fullname.removeprefix("entropylens.")
        if old == fullname:
            return None
        if old in _FUNCTIONS:
            raise ModuleNotFoundError(f"{fullname} is the library function now (entropylens.{old}(...)); "
                                      f"its module moved to entropylens.{_FUNCTIONS[old]}")
        if old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: Any) -> Any:
        module = importlib.import_module("entropylens." + MOVED[spec.name.removeprefix("entropylens.")])
        spec.loader_state = module.__spec__  # the import system sets __spec__ to ours; exec_module puts it back
        return module

    def exec_module(self, module: Any) -> None:
        module.__spec__ = module.__spec__.loader_state
