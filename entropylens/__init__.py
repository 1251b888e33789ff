"""entropylens: internal-policy entropy of language models (definitions: docs/definitions.md).

The library (docs/api.md): `trace`, `decode`, `load`, `Run`, `Decoded`, imported on first use so that
`import entropylens` stays light. The package's layout:

    core/      lenses and the exact, vocabulary-streamed decode engine (torch only, no IO)
    model/     loading, the site layout of a decoder, tracing backends, NDIF
    data/      prompts, built-in tasks, reward rules
    store/     run folders on disk: schemas, atomic files, the writer, the readers, the cache layout
    tracing/   `entropylens trace`: config, job, one batch, sharding, the benchmark harness
    analysis/  stages, outcomes, intervals, figures, reports, the `Run` object
    bupo/      the BuPO / GRPO trainer
    app/       the Dash dashboard
    cli/       the `entropylens` command line
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import TYPE_CHECKING, Any

from entropylens._lazy import lazy_exports

from entropylens.version import __version__  # noqa: F401  (the package version)

if TYPE_CHECKING:
    from entropylens.analysis.run import Run, load  # noqa: F401
    from entropylens.api import Decoded, decode, trace  # noqa: F401


# Modules that moved into subpackages: importing an old path gives the module at its new home.
# `entropylens.trace` and `entropylens.decode` are the library's functions now; their modules' names point there.
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
__all__, _exports = lazy_exports(__name__, {"entropylens.api": "trace decode Decoded",
                                           "entropylens.analysis.run": "Run load"})
__all__.append("__version__")


def __getattr__(name: str) -> Any:
    """The library's names on first use; a moved module's old attribute name (`entropylens.figures`) too."""
    if name in MOVED:
        return importlib.import_module("entropylens." + MOVED[name])
    return _exports(name)




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


sys.meta_path.append(_MovedFinder())
