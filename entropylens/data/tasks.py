"""Built-in prompt sets, generated from a seed with no external data.

`arith`, `word` and `mixed` ask for `\\boxed{}` answers and are hard for sub-1B models (SmolLM2-135M-Instruct:
~4 % at temperature 1). `digits` is the trainer's default task: one-digit sums and products and "which of two
numbers is larger", phrased the way a small instruct model answers ("Answer with just the number."), so that
SmolLM2-135M-Instruct is right about one time in four and GRPO groups carry advantage (README, "BuPO trainer").

Every set's train/test split goes by a hash of the underlying problem (the numbers and the operation, not the
wording), so a held-out problem never appears in a training set under any seed; the split is about 80/20.
"""

from __future__ import annotations

import hashlib
import random

BUILTIN_SETS: dict[str, str] = {
    "arith": "one- and two-digit additions, subtractions and multiplications, answer in \\boxed{}",
    "word": "short word problems (apples, trains, prices, ...) with integer answers, answer in \\boxed{}",
    "mixed": "arith and word together, shuffled",
    "digits": "one-digit sums and products, and the larger of two two-digit numbers; answer with just the number",
}

_BUILTIN_SIZE = 500  # distinct problems per generated set (mixed holds both: 1000)
_DIGITS_COMPARE = 139  # "which is larger" problems in `digits`: with 100 sums and 81 products, 320 problems
_BOXED = "Put your final answer in \\boxed{}."
_JUST = "Answer with just the number."


def builtin_items(name: str, seed: int, split: str) -> list[tuple[str, str, str]]:
    """(text, answer, problem key) of a built-in set's `split`, in seeded order."""
    if name == "mixed":
        items = _generate("arith", seed) + _generate("word", seed)
        random.Random(f"mixed:{seed}").shuffle(items)
    elif name == "digits":
        items = _digits(seed)
    else:
        items = _generate(name, seed)
    if split != "all":
        items = [it for it in items if is_test_key(it[2]) == (split == "test")]
    return items


def _generate(name: str, seed: int) -> list[tuple[str, str, str]]:
    """`_BUILTIN_SIZE` distinct problems as (text, answer, problem key), in seeded order."""
    rng = random.Random(f"{name}:{seed}")  # str seeds hash the same in every process
    make = _arith_item if name == "arith" else _word_item
    items: dict[str, tuple[str, str, str]] = {}
    while len(items) < _BUILTIN_SIZE:
        text, answer, key = make(rng)
        items.setdefault(key, (f"{text} {_BOXED}", str(answer), key))
    return list(items.values())


def is_test_key(key: str) -> bool:
    """Held-out iff the problem's hash falls in one of five buckets: ~20 %, the same under every seed."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 5 == 0


_ARITH_PHRASES = ("What is {e}?", "What is the value of {e}?", "How much is {e}?", "Can you compute {e}?")


def _arith_item(rng: random.Random) -> tuple[str, int, str]:
    op = rng.choice("+-*")
    if op == "*":  # keep products small: one factor has one digit
        a, b = rng.randint(2, 9), rng.randint(2, 99)
        if rng.random() < 0.5:
            a, b = b, a
    else:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        if op == "-" and a < b:  # non-negative differences
            a, b = b, a
    answer = a + b if op == "+" else a - b if op == "-" else a * b
    return rng.choice(_ARITH_PHRASES).format(e=f"{a} {op} {b}"), answer, f"arith:{a}{op}{b}"


_NAMES = ("Sam", "Mia", "Leo", "Ana", "Tom", "Zoe", "Omar", "Lena", "Ravi", "Kim", "Noah", "Ella")


def _word_item(rng: random.Random) -> tuple[str, int, str]:
    n = rng.choice(_NAMES)
    kind = rng.randrange(8)
    if kind == 0:
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        text, answer = f"{n} has {a} apples and buys {b} more. How many apples does {n} have now?", a + b
    elif kind == 1:
        b = rng.randint(2, 40)
        a = b + rng.randint(1, 50)
        text = f"{n} had {a} cookies and gave {b} to friends. How many cookies does {n} have left?"
        answer = a - b
    elif kind == 2:
        a, b = rng.randint(20, 120), rng.randint(2, 9)
        text = f"A train travels at {a} kilometres per hour for {b} hours. How many kilometres does it go?"
        answer = a * b
    elif kind == 3:
        a, b = rng.randint(2, 30), rng.randint(2, 12)
        text, answer = f"A notebook costs {a} dollars. How many dollars do {b} notebooks cost?", a * b
    elif kind == 4:
        a, b = rng.randint(2, 12), rng.randint(2, 25)
        text = f"There are {a} boxes with {b} pencils in each box. How many pencils are there in total?"
        answer = a * b
    elif kind == 5:
        b, q = rng.randint(2, 9), rng.randint(2, 20)
        a = b * q
        text = f"{a} marbles are shared equally among {b} children. How many marbles does each child get?"
        answer = q
    elif kind == 6:
        a = rng.choice((10, 20, 50, 100))
        b = rng.randint(1, a - 1)
        text = f"{n} pays for a {b}-dollar book with a {a}-dollar bill. How many dollars does {n} get back?"
        answer = a - b
    else:
        a, b = rng.randint(5, 60), rng.randint(1, 40)
        text = f"{n} is {a} years old. {n}'s cousin is {b} years older. How old is the cousin?"
        answer = a + b
    return text, answer, f"word{kind}:{a},{b}"


def _digits(seed: int) -> list[tuple[str, str, str]]:
    """Every one-digit sum (0-9 + 0-9) and product (1-9 * 1-9), plus seeded two-digit comparisons."""
    items = [(f"What is {a} + {b}? {_JUST}", str(a + b), f"add:{a}+{b}") for a in range(10) for b in range(10)]
    items += [(f"What is {a} * {b}? {_JUST}", str(a * b), f"mul:{a}*{b}") for a in range(1, 10) for b in range(1, 10)]
    rng, pairs = random.Random("digits-compare"), {}  # the same comparisons under every seed, like the rest
    while len(pairs) < _DIGITS_COMPARE:
        a, b = rng.sample(range(10, 100), 2)
        pairs.setdefault(f"max:{min(a, b)},{max(a, b)}", (a, b))
    items += [(f"Which number is larger, {a} or {b}? {_JUST}", str(max(a, b)), key) for key, (a, b) in pairs.items()]
    random.Random(f"digits:{seed}").shuffle(items)
    return items
