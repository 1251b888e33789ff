"""Shared helpers for the reliability tests: the `reliability` marker, CLI runners, a reference trace.

Slow tests (real subprocesses) carry `@pytest.mark.reliability`; they still run in plain `pytest`
(deselect them with `-m "not reliability"`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# Small and fast: 5 prompts, one per batch (5 kill points), 3 new tokens, the `layer` site only.
FAST = ["--limit", "16", "--batch-size", "1", "--max-new-tokens", "3", "--sites", "layer", "--quiet"]


def pytest_configure(config):
    config.addinivalue_line("markers", "reliability: slower fault-injection tests (subprocesses, signals)")


def popen(*args: str) -> subprocess.Popen:
    """`entropylens ARGS` in a real process (needed for SIGKILL / SIGINT / concurrent writers)."""
    return subprocess.Popen([sys.executable, "-m", "entropylens", *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`entropylens ARGS` in this process through cli.main (the console script's entry): (code, out, err)."""
    from entropylens.cli import main

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


def byte_tokenizer():
    """A byte-level tokenizer with 258 ids (no merges): a vocabulary 190x smaller than SmolLM2's keeps the
    decode, and so every trace here, fast; bytes make any input (emoji, invalid text) tokenizable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={"<eos>": 0, "<bos>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}},
                              merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", bos_token="<bos>", pad_token="<eos>")


@pytest.fixture(scope="session")
def small_folder(tmp_path_factory) -> Path:
    """A random 2-layer Llama over the byte tokenizer, saved as a transformers folder (context: 256)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=0, pad_token_id=0))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)  # entropies well below log V
    folder = tmp_path_factory.mktemp("small-llama")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def reference(small_folder, tmp_path_factory) -> Path:
    """An uninterrupted trace with the FAST settings and seed 0, run in this process."""
    from entropylens.cli import main

    cache = tmp_path_factory.mktemp("ref-cache")
    argv = sys.argv
    sys.argv = ["entropylens", "trace", "--model", str(small_folder), *FAST, "--cache", str(cache), "--name", "ref"]
    try:
        main()
    finally:
        sys.argv = argv
    return cache / "runs" / "ref"
