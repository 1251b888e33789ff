"""The package's face: light to import, library functions (not callable modules), and old module paths that keep
working or say in one line where the name went."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

import pytest

import entropylens as el
from entropylens import MOVED


def test_import_entropylens_is_light():
    code = ("import sys, entropylens; "
            "print(sorted(m for m in ('torch', 'transformers', 'plotly', 'pandas', 'dash') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_library_leaves_logging_to_its_caller():
    """Modules only ask for loggers: importing them adds no handler and sets no level (the CLI's -v does)."""
    code = ("import logging, entropylens.tracing.job, entropylens.bupo.pipeline, entropylens.cli.commands; "
            "print(logging.getLogger().handlers, logging.getLogger('entropylens').handlers, "
            "logging.getLogger('entropylens').level)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] [] 0"


def test_library_names_are_functions_and_classes():
    from entropylens.analysis.run import Run, load
    from entropylens.api import Decoded, decode, trace

    assert (el.trace, el.decode, el.Decoded, el.load, el.Run) == (trace, decode, Decoded, load, Run)
    assert callable(el.trace) and not isinstance(el.trace, type(sys))  # a function, not a module
    assert set(el.__all__) == {"trace", "decode", "Decoded", "load", "Run", "__version__"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        el.nope  # noqa: B018


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_import_the_module_at_its_new_home(old):
    module = importlib.import_module(f"entropylens.{old}")
    assert module is importlib.import_module(f"entropylens.{MOVED[old]}")
    assert module.__spec__.name == f"entropylens.{MOVED[old]}"  # the real module, not a copy


def test_documented_old_imports_still_work():
    from entropylens.models import load_model
    from entropylens.store import SITES, RunWriter, load_entropy, read_manifest, resolve_run, write_json

    assert load_model.__module__ == "entropylens.model.load"
    assert RunWriter.__module__ == "entropylens.store.writer" and SITES[-1] == "layer"
    assert all(callable(f) for f in (load_entropy, read_manifest, resolve_run, write_json))


@pytest.mark.parametrize("name,home", [("trace", "tracing.job"), ("decode", "core.decode")])
def test_the_old_callable_modules_point_to_their_new_home(name, home):
    with pytest.raises(ModuleNotFoundError) as e:
        importlib.import_module(f"entropylens.{name}")
    message = str(e.value)
    assert "\n" not in message and f"entropylens.{home}" in message and f"entropylens.{name}(...)" in message


def test_no_top_level_app_package():
    """The dashboard is entropylens.app; a package named `app` would collide in users' environments."""
    import entropylens.app

    assert importlib.util.find_spec("app") is None or "entropylens" not in str(importlib.util.find_spec("app").origin)
    assert entropylens.app.__name__ == "entropylens.app"
