"""Answer extraction, normalisation and exact-match reward."""

import pytest

from entropylens.bupo.rewards import (
    exact_match_reward, extract_answer, extract_boxed, get_reward, normalize_answer,
)
from entropylens.errors import UserError


@pytest.mark.parametrize("text,expected", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{ {a}{b{c}} }", " {a}{b{c}} "),
    (r"\boxed {42}", "42"),
    (r"\fbox{7}", "7"),
    (r"\boxed{12} and \boxed{unclosed", "12"),
    ("no box here", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("The answer is 12, not 13.", "13"),
    ("costs 1,234.50 dollars", "1,234.50"),
    ("-7 degrees", "-7"),
    (r"1 + 1 = \boxed{2} (checked 3 ways)", "2"),
    ("nothing", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("raw,norm", [
    (" $42$ ", "42"), ("42.0", "42"), ("1,234", "1234"), ("3.50", "3.5"), ("-0", "0"),
    (r"\text{yes}", "yes"), ("7.", "7"), (r"\frac{1}{2}", r"\frac{1}{2}"), ("1,2", "1,2"),
])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_reward():
    assert exact_match_reward(r"... \boxed{42.0}", "42") == 1.0
    assert exact_match_reward("I think 1,000", "1000") == 1.0
    assert exact_match_reward("I think 41", "42") == 0.0
    assert exact_match_reward("no idea", "42") == 0.0
    assert exact_match_reward(r"\boxed{\frac{1}{2}}", r"\frac{1}{2}") == 1.0


def test_unknown_reward_is_a_user_error():
    with pytest.raises(UserError):
        get_reward("nope")
