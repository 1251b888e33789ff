"""The trainer's reward rules live in `entropylens.rewards` (shared with `entropylens trace`); this name stays so
existing imports keep working. Nothing is defined here: a rule is written once."""

from entropylens.rewards import (  # noqa: F401
    REWARDS, RULES, RULES_HELP, boxed_reward, check_references, exact_match_reward, extract_answer, extract_boxed,
    get_reward, math_verify_reward, normalize_answer, number_reward, score,
)
