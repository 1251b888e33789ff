"""BuPO steps on the toy model, as one process (`python dist_step.py OUT STEPS LR`) or one rank of torchrun.

tests/bupo/test_distributed.py runs it both ways with the same global batch and compares the
checkpoints and metrics. Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tiny import make_char_llama, make_char_tokenizer

from entropylens.bupo import distributed
from entropylens.bupo.grpo import LOSS_AGGS
from entropylens.bupo.trainer import BupoConfig, train
from entropylens.data.prompts import Prompt

PROMPTS = [Prompt(text=t, messages=None, answer="0", source="test")
           for t in ("1+2=", "what is 40+2?", "7*6", "10-1 =", "3*3=", "2+2+2 =")]


def char_reward(text: str, answer: str) -> float:  # varies across a random model's rollouts
    return float(sum(map(ord, text)) % 7)


def main(out: Path, steps: int, lr: float) -> None:
    """One run per loss aggregation into out/<loss_agg>: one process start (the slow part) for all three."""
    for loss_agg in LOSS_AGGS:
        model = make_char_llama(layers=3).requires_grad_(False)  # frozen, as models.load_model hands it over
        # internal phase first (upper layers frozen: weight decay would betray a zero gradient given to them),
        # uneven micro-batches (3 + 3 + 2 rollouts per rank)
        cfg = BupoConfig(internal_layer=2, internal_steps=1, steps=steps, prompts_per_step=4, num_generations=4,
                         max_new_tokens=8, learning_rate=lr, weight_decay=1.0, micro_batch_size=3,
                         loss_agg=loss_agg, seed=1, group_sampling=True)  # as the ranks sample
        train(cfg, model, make_char_tokenizer(), PROMPTS, out / loss_agg, progress=False, reward_fn=char_reward)
    distributed.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]))
