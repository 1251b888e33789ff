"""Tiny random models built from configs, shared by every test folder (import: `from tiny import ...`)."""

from __future__ import annotations

import torch

from entropylens.models import LoadedModel, ModelInfo

V = 49152  # SmolLM2's vocabulary: the tiny models share its real tokenizer


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
