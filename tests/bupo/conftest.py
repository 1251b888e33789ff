"""Fixtures of the trainer tests: the character-vocabulary toy (tests/tiny.py), built offline in milliseconds."""

from __future__ import annotations

import pytest
from tiny import make_char_llama, make_char_tokenizer

from entropylens.data.prompts import Prompt


@pytest.fixture
def char_tokenizer():
    return make_char_tokenizer()


@pytest.fixture
def model():
    return make_char_llama()


@pytest.fixture
def prompts():
    items = [("1+2=", "3"), ("what is 40+2?", "42"), ("7*6", "42"), ("10-1 =", "9")]
    return [Prompt(text=t, messages=None, answer=a, source="test") for t, a in items]
