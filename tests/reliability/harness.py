"""CLI runners and checks shared by the reliability tests (import: `from harness import ...`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# Small and fast: 5 prompts, one per batch (5 kill points), 3 new tokens, the `layer` site only.
FAST = ["--limit", "16", "--batch-size", "1", "--max-new-tokens", "3", "--sites", "layer", "--quiet"]


def popen(*args: str) -> subprocess.Popen:
    """`entropylens ARGS` in a real process (needed for SIGKILL / SIGINT / concurrent writers)."""
    return subprocess.Popen([sys.executable, "-m", "entropylens", *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`entropylens ARGS` in this process through cli.main (the console script's entry): (code, out, err)."""
    from entropylens.cli.commands import main

    monkeypatch.setattr(sys, "argv", ["entropylens", *args])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def assert_same_run(a: Path, b: Path) -> None:
    """Same rows and values in every merged file (the manifests differ in ids and timings only)."""
    for name in ("tokens.parquet", "entropy.parquet", "summary.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(a / name), pd.read_parquet(b / name), check_exact=True)
    assert (a / "responses.jsonl").read_text() == (b / "responses.jsonl").read_text()
