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
import sys
from typing import TYPE_CHECKING, Any

from entropylens._lazy import lazy_exports
from entropylens._moved import MOVED, _MovedFinder
from entropylens.version import __version__  # noqa: F401  (the package version)

if TYPE_CHECKING:
    from entropylens.analysis.run import Run, load  # noqa: F401
    from entropylens.api import Decoded, decode, trace  # noqa: F401


__all__, _exports = lazy_exports(__name__, {"entropylens.api": "trace decode Decoded",
                                           "entropylens.analysis.run": "Run load"})
__all__.append("__version__")


def __getattr__(name: str) -> Any:
    """The library's names on first use; a moved module's old attribute name (`entropylens.figures`) too."""
    if name in MOVED:
        return importlib.import_module("entropylens." + MOVED[name])
    return _exports(name)


sys.meta_path.append(_MovedFinder())
