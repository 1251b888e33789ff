"""Tiny random Llama + character tokenizer, built offline in milliseconds; stand-ins for entropylens.prompts."""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<bos>"]
VOCAB = SPECIALS + list(string.digits + string.ascii_letters + " +-*/=?.,{}\\$")


@dataclass
class Prompt:  # stand-in for entropylens.prompts.Prompt until it lands
    text: str
    answer: str
    messages: list = field(default_factory=list)
    source: str = "test"


def render(prompt: Prompt, tokenizer) -> str:  # stand-in for entropylens.prompts.render
    return prompt.text


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
    with torch.no_grad():  # larger random weights -> peaked, varied distributions (more EOS, non-trivial ratios)
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.3)
    return model


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def model():
    return make_model()


@pytest.fixture
def prompts():
    return [Prompt("1+2=", "3"), Prompt("what is 40+2?", "42"), Prompt("7*6", "42"), Prompt("10-1 =", "9")]
