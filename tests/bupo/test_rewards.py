"""Answer extraction, normalisation and exact-match reward."""

import pytest

from entropylens.data.rewards import (
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


# Each rule on hand-written completions: (completion, reference) -> (exact, boxed, number)
CASES = [
    (r"so the answer is \boxed{7}.", "7", (1, 1, 1)),  # boxed
    ("7", "7", (1, 0, 1)),  # unboxed, the bare answer
    ("3 + 4 is 7", "7", (1, 0, 1)),  # several numbers, the last one right
    ("7, or maybe 8", "7", (0, 0, 0)),  # several numbers, the last one wrong
    ("I do not know", "7", (0, 0, 0)),  # none
    (r"\boxed{8} hmm, no: 7", "7", (0, 0, 1)),  # a box wins over later numbers, except for `number`
    (r"\boxed{7", "7", (1, 0, 1)),  # malformed box: no box, the last number
    (r"\boxed{}", "7", (0, 0, 0)),  # empty box
    ("The answer is 7.0", "7", (1, 0, 1)),  # normalised
    ("1,000 apples", "1000", (1, 0, 1)),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}", (1, 1, 0)),  # a non-number reference: boxed rules only
]


@pytest.mark.parametrize("completion,answer,expected", CASES)
def test_named_rules_on_hand_written_completions(completion, answer, expected):
    got = tuple(get_reward(rule)(completion, answer) for rule in ("exact", "boxed", "number"))
    assert got == expected


def test_rules_are_documented_one_line_each():
    from entropylens.data.rewards import REWARDS, RULES, RULES_HELP

    assert set(RULES) == set(REWARDS) and all("\n" not in v for v in RULES.values())
    assert all(name in RULES_HELP for name in RULES)


def test_bad_references_name_the_row():
    from entropylens.data.rewards import check_references
    from entropylens.data.prompts import Prompt

    ok = [Prompt("q", None, "3", "file:x.jsonl"), Prompt("q", None, r"\frac{1}{2}", "file:x.jsonl")]
    check_references(ok, "exact")
    with pytest.raises(UserError, match=r"prompt 1 \(file:x.jsonl\).*not a number"):
        check_references(ok, "number")
    for missing in (None, "", "  "):
        with pytest.raises(UserError, match=r"prompt 2 .*no reference answer") as e:
            check_references([*ok, Prompt("q", None, missing, "file:x.jsonl")], "boxed")
        assert "\n" not in str(e.value)
