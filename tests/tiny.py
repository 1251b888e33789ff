"""Tiny random models and tokenizers, shared by every test folder (import: `from tiny import ...`).

SmolLM2-vocabulary models (`build_tiny`, with SmolLM2's real tokenizer: the `smol_tokenizer` fixture) for
tracing; a character-vocabulary Llama and tokenizer (`make_char_llama`, `make_char_tokenizer`) for the trainer;
a byte-level Llama and tokenizer (`make_byte_llama`, `make_byte_tokenizer`) for the fast CLI fault tests."""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from entropylens.model.load import LoadedModel, ModelInfo

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
    elif arch in ("gemma2", "gemma3"):
        return build_tiny_gemma(arch, seed=seed, layers=layers)
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


def build_tiny_gemma(arch: str, seed: int = 0, layers: int = 3, softcap: float | None = 30.0) -> torch.nn.Module:
    """A tiny random Gemma 2 or Gemma 3: sandwich norms with random (1 + w) gains, √d-scaled embeddings, tied
    head; Gemma 2 with its final-logit soft-cap (`softcap`), Gemma 3 with sliding and full attention layers.
    Logits are spread so that the soft-cap bends them (|z| well past c/2) and entropies stay far below log V."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=4,
                  query_pre_attn_scalar=8, bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
                  layer_types=[("sliding_attention", "full_attention")[i % 2] for i in range(layers)])
    torch.manual_seed(seed)
    if arch == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(final_logit_softcapping=softcap, attn_logit_softcapping=50.0, **common))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common))
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0, 1.0)  # tied: also W_U; x √32 in the residual
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.5)  # Gemma's RMSNorm scales by (1 + w): w = 0 would hide a missing "+1"
    return model.eval()


def wrap(model: torch.nn.Module, tokenizer, name: str = "tiny") -> LoadedModel:
    cfg = model.config
    info = ModelInfo(id=name, source="memory", revision="test", architecture=type(model).__name__,
                     family=cfg.model_type, n_layers=cfg.num_hidden_layers, d_model=cfg.hidden_size,
                     vocab_size=V, tie_word_embeddings=cfg.tie_word_embeddings, dtype="float32",
                     max_positions=cfg.max_position_embeddings)
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


SPECIALS = ["<pad>", "<eos>", "<bos>"]
VOCAB = SPECIALS + list(string.digits + string.ascii_letters + " +-*/=?.,{}\\$")


def make_char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (digits, letters, arithmetic), no chat template: the trainer's toy tasks."""
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", padding_side="left"
    )


def make_char_llama(tied: bool = False, layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
    """A tiny random Llama over the character vocabulary, peaked enough to sample varied answers and EOS."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=tied,
        pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights: peaked, varied distributions, some EOS
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model


def make_byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with 258 ids (no merges): a vocabulary 190x smaller than SmolLM2's keeps the
    decode, and so every trace here, fast; bytes make any input (emoji, invalid text) tokenizable."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={"<eos>": 0, "<bos>": 1, **{c: i + 2 for i, c in enumerate(alphabet)}},
                              merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", bos_token="<bos>", pad_token="<eos>")


def make_byte_llama() -> LlamaForCausalLM:
    """A random 2-layer Llama over the byte tokenizer (context: 256), entropies well below log V."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(make_byte_tokenizer()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=0,
        pad_token_id=0))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    return model
