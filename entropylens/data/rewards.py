"""Verifiable rewards: named rules that extract a final answer, normalise it and compare it with the reference.

One module for every consumer (trainer, evaluation, `entropylens trace`): a rule is written once. `RULES` maps
each name to its one-line description, shown in `--help` and the README:

- `exact` (default, lenient): the last `\\boxed{}` if there is one, else the last number in the completion.
- `boxed` (the paper's, strict): the last `\\boxed{}` only; a completion without one earns 0.
- `number`: the last number in the completion, compared as a number (7 == 7.0); the reference must be numeric.
- `math_verify`: symbolic equivalence by the optional `math-verify` package (never imported unless asked).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

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


def _same(got: str | None, answer: str) -> float:
    return float(got is not None and normalize_answer(got) == normalize_answer(str(answer)))


def exact_match_reward(completion: str, answer: str) -> float:
    """1.0 if the last boxed answer, or else the last number, equals the reference after normalisation."""
    return _same(extract_answer(completion), answer)


def boxed_reward(completion: str, answer: str) -> float:
    """The paper's strict rule: 1.0 only if the last \\boxed{} equals the reference; no box earns 0."""
    return _same(extract_boxed(completion), answer)


def _as_number(s: str) -> float | None:
    try:
        return float(normalize_answer(s))
    except ValueError:
        return None


def number_reward(completion: str, answer: str) -> float:
    """1.0 if the last number in the completion equals the numeric reference (as numbers: 7 == 7.0)."""
    numbers = _NUMBER.findall(completion)
    return float(bool(numbers) and _as_number(numbers[-1]) == _as_number(str(answer)))


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
    "boxed": boxed_reward,
    "number": number_reward,
    "math_verify": math_verify_reward,
}
RULES: dict[str, str] = {  # one line each, for --help and the README
    "exact": "last \\boxed{} if any, else the last number, equals the reference (lenient; default)",
    "boxed": "last \\boxed{} equals the reference; no box earns 0 (the paper's strict rule)",
    "number": "last number in the completion equals the numeric reference",
    "math_verify": "math-verify judges the extracted answer equivalent (needs: pip install math-verify)",
}
RULES_HELP = "; ".join(f"{k}: {v}" for k, v in RULES.items())


def get_reward(name: str) -> Callable[[str, str], float]:
    """Reward function by name (see RULES)."""
    if name not in REWARDS:
        raise UserError(f"unknown reward {name!r}; choose one of {', '.join(REWARDS)}")
    return REWARDS[name]


def check_references(prompts: Sequence, rule: str, what: str = "prompt") -> None:
    """Refuse, in one line naming the row, references a rule cannot score: missing, empty, or (for `number`)
    not a number. A reward silently 0 for a broken reference would look like a model that never learns."""
    get_reward(rule)
    for i, p in enumerate(prompts):
        answer = None if p.answer is None else str(p.answer).strip()
        where = f"{what} {i} ({p.source})"
        if not answer:
            raise UserError(f"{where} has no reference answer; every {what} needs one to be scored")
        if rule == "number" and _as_number(answer) is None:
            raise UserError(f"{where} has reference {answer!r}, not a number; the 'number' rule needs one "
                            "(use --reward exact, boxed or math_verify)")


def score(completion: str, answer: str | None, rule: str = "exact") -> tuple[float | None, bool | None]:
    """(reward, correct) of one completion under `rule`; (None, None) without a reference: never a guessed score.
    `correct` means full reward (every rule here pays 0 or 1)."""
    if answer is None:
        return None, None
    reward = get_reward(rule)(completion, answer)
    return reward, reward >= 1.0


def trace_references(prompts: Sequence, rule: str, bad: str = "error", what: str = "prompt") -> list[str | None]:
    """References `entropylens trace` scores against, one per prompt (None = scored null).

    A source without any reference is scored null throughout. Once a source has references, a row whose
    reference is empty, or not a number under the `number` rule, is an error naming the row; with
    `bad="null"` (`--bad-references null`) that row is scored null instead.
    """
    get_reward(rule)
    if bad not in ("error", "null"):
        raise UserError(f"unknown --bad-references {bad!r}; choose error or null")
    if all(p.answer is None for p in prompts):
        return [None] * len(prompts)
    refs: list[str | None] = []
    for i, p in enumerate(prompts):
        answer = None if p.answer is None else str(p.answer).strip()
        problem = ("has an empty reference answer" if not answer else
                   f"has reference {answer!r}, not a number as the 'number' rule needs"
                   if rule == "number" and _as_number(answer) is None else None)
        if problem and bad == "error":
            raise UserError(f"{what} {i} ({p.source}) {problem}; fix the row, or pass --bad-references null "
                            "to score such rows null")
        refs.append(None if problem else answer)
    return refs
