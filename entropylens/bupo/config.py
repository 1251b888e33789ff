"""The trainer's config: every knob of one BuPO (or plain GRPO) run, in its own module so the optimiser pass
(bupo/update.py) and the loop (bupo/trainer.py) both read it without importing each other."""

from __future__ import annotations

from dataclasses import dataclass

from entropylens.bupo.grpo import LOSS_AGGS, OBJECTIVES
from entropylens.errors import UserError
from entropylens.options import option
from entropylens.data.rewards import RULES_HELP


@dataclass
class BupoConfig:
    """Everything one BuPO (or, with internal_steps=0, plain GRPO) run needs. Names follow TRL/verl.

    The defaults are the paper's settings; `entropylens bupo` embeds this config with its own (shorter) ones.
    """

    # k: 1-indexed decoder layer whose policy pi^k = softmax(H^k W_U^T) is trained first
    internal_layer: int = option(cli=False)
    # steps on pi^k before switching to the output policy (paper: 20-30; 0 = GRPO)
    internal_steps: int = option(20, cli=False)
    steps: int = option(50, "total optimiser steps (internal + output phase)")
    prompts_per_step: int = option(8, "B: prompts per step, over all processes (rollouts per step = B * G)")
    num_generations: int = option(8, "G: rollouts per prompt, the GRPO group (paper: 8)",
                                  flags=("--num-generations", "-G"))
    max_new_tokens: int = option(128, "completion length cap (bupo: also for evaluation and traces)")
    temperature: float = option(1.0, "sampling temperature, also used when scoring log-probs")
    learning_rate: float = option(1e-6, "AdamW learning rate, constant (paper: 1e-6)", flags=("--lr",))
    weight_decay: float = option(0.0, "AdamW weight decay (never applied to frozen parameters)")
    max_grad_norm: float = option(1.0, "global gradient-norm clip")
    epsilon_low: float = option(0.2, "clip range below 1 for the ratio (paper: 0.2)")
    epsilon_high: float = option(0.2, "clip range above 1 (DAPO's clip-higher if > --epsilon-low)")
    beta: float = option(0.0, "k3 KL penalty to the frozen initial model's same policy (paper: 0)")
    loss_agg: str = option("token_mean", " | ".join(LOSS_AGGS))
    num_iterations: int = option(1, "mu: passes over each rollout batch (> 1 adds an old-log-prob pass)")
    mini_batches: int = option(1, "PPO mini-batches: optimiser steps per pass, each on an equal block of whole "
                               "prompt groups, the ratio taken against the log-probs before the first (> 1 adds "
                               "an old-log-prob pass; paper: 4 = 128 / 32 prompts)")
    objective: str = option("entropylens", "entropylens (default): two-sided clip, the loss normalised over the "
                            "whole (mini-)batch | paper: the authors' verl loss: dual-clip c = 10 for A < 0, "
                            "log-ratio clamped to +-20, token mean within each micro-batch (docs/bupo-fidelity.md; "
                            "their schedule also has --mini-batches 4 --weight-decay 0.01)")
    micro_batch_size: int = option(16, "rollouts per forward/backward chunk, per process (exact accumulation)")
    group_sampling: bool = option(False, "one seeded generate per prompt, as under torchrun (samples independent "
                                  "of rank and batch; off: one batched generate per step, ~1.7x faster on CPU)")
    reward: str = option("exact", RULES_HELP)
    save_every: int = option(0, "write the resumable state every N steps (and on Ctrl-C); 0 = only on Ctrl-C")
    seed: int = option(0, "prompt order and sampling (bupo: also evaluation and traces)")
    enable_thinking: bool = option(False, "Qwen3 chat templates: thinking mode")
    model_id: str = option("", cli=False)  # recorded in the manifest (model.config._name_or_path if empty)
    # trace run this training started from, for before/after comparisons
    parent_run: str | None = option(None, cli=False)

    def check(self) -> None:
        """Mistakes that need no model: one UserError line each."""
        if not 0 <= self.internal_steps <= self.steps:
            raise UserError(f"internal_steps must be in 0..steps ({self.steps}), got {self.internal_steps}")
        if self.num_generations < 2:
            raise UserError("num_generations must be >= 2 (group advantages need a group)")
        if self.loss_agg not in LOSS_AGGS:
            raise UserError(f"loss_agg must be one of {LOSS_AGGS}, got {self.loss_agg!r}")
        if self.temperature <= 0 or self.num_iterations < 1 or self.micro_batch_size < 1:
            raise UserError("temperature must be > 0, num_iterations and micro_batch_size >= 1")
        if self.prompts_per_step < 1:
            raise UserError("prompts_per_step must be >= 1")
        if self.objective not in OBJECTIVES:
            raise UserError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.mini_batches < 1 or self.prompts_per_step % self.mini_batches:
            raise UserError(f"mini_batches must be >= 1 and divide prompts_per_step ({self.prompts_per_step}), "
                            f"got {self.mini_batches}")
        if self.save_every < 0:
            raise UserError(f"save_every must be >= 0 (0 = never), got {self.save_every}")
        if not 0 <= self.epsilon_low < 1 or self.epsilon_high < 0:
            raise UserError(f"epsilon_low must be in [0, 1) and epsilon_high >= 0, got {self.epsilon_low}, "
                            f"{self.epsilon_high}")

    def validate(self, n_layers: int, n_prompts: int, world_size: int = 1) -> None:
        """Raise UserError on settings that cannot work with this model, prompt set and number of ranks."""
        self.check()
        if not 1 <= self.internal_layer <= n_layers:
            raise UserError(f"internal_layer must be in 1..{n_layers}, got {self.internal_layer}")
        if n_prompts < 1:
            raise UserError("need at least one prompt")
        if self.prompts_per_step % world_size:
            raise UserError(f"prompts_per_step ({self.prompts_per_step}) must be divisible by the number of "
                            f"processes ({world_size}): each rank takes an equal block of whole prompt groups")
        if (self.prompts_per_step // world_size) % self.mini_batches:
            raise UserError(f"each process's {self.prompts_per_step // world_size} prompts must split into "
                            f"{self.mini_batches} equal mini-batches")
