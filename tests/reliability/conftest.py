"""Fixtures of the reliability tests: the `reliability` marker, a small model folder, a reference trace.

Slow tests (real subprocesses) carry `@pytest.mark.reliability`; they still run in plain `pytest`
(deselect them with `-m "not reliability"`). The CLI runners live in harness.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from harness import FAST
from tiny import make_byte_llama, make_byte_tokenizer


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability: slower fault-injection tests (subprocesses, signals)")


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory) -> Path:
    """A random 2-layer Llama over the byte tokenizer, saved as a transformers folder (context: 256)."""
    folder = tmp_path_factory.mktemp("small-llama")
    make_byte_llama().save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def reference(small_folder, tmp_path_factory) -> Path:
    """An uninterrupted trace with the FAST settings and seed 0, run in this process."""
    from entropylens.cli.commands import main

    cache = tmp_path_factory.mktemp("ref-cache")
    argv = sys.argv
    sys.argv = ["entropylens", "trace", "--model", str(small_folder), *FAST, "--cache", str(cache), "--name", "ref"]
    try:
        main()
    finally:
        sys.argv = argv
    return cache / "runs" / "ref"
