"""The configs of the trainer (`BupoConfig`: every knob of one BuPO or plain GRPO run) and of the `entropylens bupo`
command (`BupoRunConfig`, which embeds it). Light on purpose (no torch): the command line builds its help here."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from entropylens.data.rewards import RULES_HELP
from entropylens.errors import UserError
from entropylens.model.spec import ModelSpec
from entropylens.options import count_or_all, ints, option

LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
# entropylens: the two-sided clip and the loss normalised over the whole (mini-)batch; paper: the authors' verl
# fork (docs/bupo-fidelity.md): dual-clip at c for A < 0, log-ratio clamped, token-mean within each micro-batch
OBJECTIVES = ("entropylens", "paper")
ALGOS = ("bupo", "grpo")
# The default k: the embedded SmolLM2 has no layer with a positive mean FFN dH under the bupo lens (every one
# is negative, -1.8 to -10.3 nats), so `--layer auto` refuses it; 15 is the middle of its 30 layers.
DEFAULT_LAYER = 15


def parse_layer(text: str | int) -> int | str:
    """`--layer`: a 1-indexed layer number, or "auto" (the paper's boundary layer, read from a trace)."""
    if text == "auto" or isinstance(text, int) and not isinstance(text, bool):
        return text
    if isinstance(text, str) and text.isdigit():
        return int(text)
    raise UserError(f"--layer takes 'auto' or a layer number >= 1 (1-indexed), got {text!r}")


@dataclass
class BupoConfig:
    """Everything one BuPO (or, with internal_steps=0, plain GRPO) run needs. Names follow TRL/verl.

    The defaults are the paper's settings; `entropylens bupo` embeds this config with its own (shorter) ones.
    """

    # k: 1-indexed decoder layer whose policy pi^k = softmax(H^k W_U^T) is trained first
    internal_layer: int = option(cli=False)
    # steps on pi^k before switching to the output policy (paper: 20-30; 0 = GRPO)
    internal_steps: int = option(20, cli=False)
    lens: str = option("bupo", "the lens that forms pi^k from H^k: bupo (the paper's: W_U alone, no final norm) or "
                       "any registered lens (entropylens.core.lens.register_lens)", flags=("--pi-lens",))
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
        from entropylens.core.lens import lens_spec

        self.check()
        lens_spec(self.lens)
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


TRAIN_DEFAULTS = BupoConfig(internal_layer=DEFAULT_LAYER, steps=24, num_generations=4, max_new_tokens=12,
                            learning_rate=2e-5, micro_batch_size=32, save_every=10)


@dataclass
class BupoRunConfig(ModelSpec):
    """The `entropylens bupo` command. Defaults: SmolLM2 learning the built-in `digits` task (README: time, gain)."""

    prompts: str = option("digits", "training prompts: built-in set (train split) or a prompt file")
    eval_prompts_source: str | None = option(None, "held-out prompts (default: test split)", flags=("--eval-source",))
    algo: str = option("bupo", "bupo (train pi^k first) | grpo (no internal phase)")
    layer: int | str = option(DEFAULT_LAYER, "k (1-indexed) or auto: last layer with positive mean FFN dH "
                              f"(SmolLM2 has none, hence the default {DEFAULT_LAYER} of its 30)", parse=parse_layer)
    internal_steps: int | None = option(None, "steps on pi^k first (default: steps // 4; grpo: 0)")
    # the trainer's knobs, with this command's defaults: a 24-step run on `digits` that visibly learns
    # (learning rate above the paper's 1e-6, short completions, 4 rollouts per prompt)
    train: BupoConfig = field(default_factory=lambda: replace(TRAIN_DEFAULTS))
    train_prompts: int | None = option(None, "first N training prompts, or 'all'",
                                       parse=count_or_all("--train-prompts"), shown="all")
    layer_trace_prompts: int = option(8, "training prompts traced to choose k")
    eval_prompts: int = option(76, "held-out prompts for Avg@K / Pass@K")  # digits' whole test split
    eval_samples: int = option(4, "completions per held-out prompt")
    ks: tuple[int, ...] = option((1, 4), "comma-separated K values (each <= --eval-samples)", parse=ints("--ks"),
                                 shown="1,4")
    trace_prompts: int = option(4, "held-out prompts traced before and after training")
    trace_positions: str = option("response", "response | all: positions decoded in the traces")
    batch_size: int = option(8, "prompts per traced forward / evaluation batch")
    name: str | None = option(None, "trainer run id (traces get -layer, -base, -trained suffixes)")

    def resolved_internal_steps(self) -> int:
        if self.algo == "grpo":
            return 0
        return self.train.steps // 4 if self.internal_steps is None else self.internal_steps

    def trainer_config(self, layer: int, **run: Any) -> BupoConfig:
        """The trainer's config for layer k: `train` with k, the resolved internal steps and `run` (model_id,
        parent_run)."""
        return replace(self.train, internal_layer=layer, internal_steps=self.resolved_internal_steps(), **run)

    def validate(self) -> None:
        """Mistakes that need no model: one UserError line each."""
        if self.algo not in ALGOS:
            raise UserError(f"unknown --algo {self.algo!r}; choose bupo or grpo")
        if parse_layer(self.layer) != "auto" and int(self.layer) < 1:
            raise UserError(f"--layer takes 'auto' or a layer number >= 1 (1-indexed), got {self.layer!r}")
        if self.train.steps < 1:
            raise UserError(f"--steps must be >= 1, got {self.train.steps}")
        if self.algo == "grpo" and self.internal_steps:
            raise UserError("--algo grpo has no internal phase; drop --internal-steps (or use --algo bupo)")
        if not 0 <= self.resolved_internal_steps() <= self.train.steps:
            raise UserError(f"--internal-steps must be in 0..--steps ({self.train.steps}), got {self.internal_steps}")
        for name in ("layer_trace_prompts", "eval_prompts", "eval_samples", "trace_prompts", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.train.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.train.max_new_tokens}")
        if self.train_prompts is not None and self.train_prompts < 1:
            raise UserError(f"--train-prompts must be >= 1, got {self.train_prompts}")
        if not self.ks or any(not 1 <= k <= self.eval_samples for k in self.ks):
            raise UserError(f"every K in --ks must be in 1..--eval-samples ({self.eval_samples}), got {self.ks}")
        if self.trace_positions not in ("response", "all"):
            raise UserError(f"--trace-positions must be response or all, got {self.trace_positions!r}")
        replace(self.train, internal_steps=self.resolved_internal_steps()).check()  # k is checked once the
        # model's layer count is known (choose_layer)
