"""entropylens: internal-policy entropy of language models (definitions: docs/definitions.md).

The library (docs/api.md): `trace`, `decode`, `load`, `Run`, imported on first use so that `import entropylens`
stays light. `entropylens.trace` and `entropylens.decode` are also the names of the modules that do the work;
those two modules are callable (`_callable_module`), so `entropylens.trace(...)` runs `entropylens.api.trace`
while `from entropylens import trace; trace.run_trace(...)` keeps working.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["trace", "load", "decode", "Run", "Decoded", "__version__"]

if TYPE_CHECKING:
    from entropylens.api import Decoded, decode, trace
    from entropylens.run import Run, load


class _CallableModule(types.ModuleType):
    """A module that is also the library function of the same name in entropylens.api."""

    def _function(self):
        from entropylens import api

        return getattr(api, self.__name__.rsplit(".", 1)[1])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls entropylens.api.<name>; see its docstring (help(entropylens.api.trace), ...)."""
        return self._function()(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self._function())


def _callable_module(name: str) -> None:
    """Make module `name` (entropylens.trace or entropylens.decode) callable; each calls it at its end."""
    sys.modules[name].__class__ = _CallableModule


def __getattr__(name: str) -> Any:
    if name in ("trace", "decode"):
        return importlib.import_module(f"entropylens.{name}")  # the callable module (it sets itself as attribute)
    if name == "Decoded":
        from entropylens.api import Decoded

        return Decoded
    if name in ("Run", "load"):
        from entropylens import run

        return getattr(run, name)
    raise AttributeError(f"module 'entropylens' has no attribute {name!r}")
