"""Tiny random Llama + character tokenizer (no chat template), built offline in milliseconds."""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from entropylens.prompts import Prompt

SPECIALS = ["<pad>", "<eos>", "<bos>"]
VOCAB = SPECIALS + list(string.digits + string.ascii_letters + " +-*/=?.,{}\\$")


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", padding_side="left"
    )


def make_model(tied: bool = False, layers: int = 3, seed: int = 0) -> LlamaForCausalLM:
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


@pytest.fixture
def char_tokenizer():
    return make_tokenizer()


@pytest.fixture
def model():
    return make_model()


@pytest.fixture
def prompts():
    items = [("1+2=", "3"), ("what is 40+2?", "42"), ("7*6", "42"), ("10-1 =", "9")]
    return [Prompt(text=t, messages=None, answer=a, source="test") for t, a in items]
