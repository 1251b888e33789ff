"""Verifiable rewards: extract a final answer, normalise it, compare (DESIGN §7).

The default reward is exact match after normalisation (fast, dependency-free). `math_verify`
uses the optional `math-verify` package for symbolic equivalence; it is never used unless asked.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from entropylens.errors import UserError

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces matched, or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
    return None


def extract_answer(text: str) -> str | None:
    """The last boxed answer, else the last number in the text, else None."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str:
    """Canonical string form: no spaces or $, no trailing period, numbers without commas or trailing .0."""
    s = answer.strip().replace("$", "").replace(" ", "").rstrip(".")
    for wrapper in (r"\text{", r"\mathrm{"):
        if s.startswith(wrapper) and s.endswith("}"):
            s = s[len(wrapper) : -1]
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+\.\d+", s):
        s = s.rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = s.lstrip("-")
    return s


def exact_match_reward(completion: str, answer: str) -> float:
    """1.0 if the extracted answer equals the reference after normalisation, else 0.0."""
    got = extract_answer(completion)
    return float(got is not None and normalize_answer(got) == normalize_answer(str(answer)))


def math_verify_reward(completion: str, answer: str) -> float:
    """1.0 if math-verify judges the completion's answer equivalent to the reference."""
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise UserError("reward 'math_verify' needs math-verify: pip install 'entropylens[math]'") from e
    got = extract_answer(completion)
    if got is None:
        return 0.0
    gold = parse(f"${answer}$")
    pred = parse(f"${got}$")
    return float(bool(gold) and bool(pred) and verify(gold, pred))


REWARDS: dict[str, Callable[[str, str], float]] = {
    "exact": exact_match_reward,
    "math_verify": math_verify_reward,
}


def get_reward(name: str) -> Callable[[str, str], float]:
    """Reward function by name ('exact' or 'math_verify')."""
    if name not in REWARDS:
        raise UserError(f"unknown reward {name!r}; choose one of {sorted(REWARDS)}")
    return REWARDS[name]
