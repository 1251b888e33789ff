"""BuPO trainer: GRPO whose first `internal_steps` steps optimise the internal layer policy pi^k.

Definitions (π^k, the objective, the paper's settings): docs/definitions.md#bupo.

Per step: sample prompts -> G rollouts each from the full model -> rewards -> group advantages ->
log-probs of the sampled tokens under the phase's policy (pi^k while step < internal_steps, else
the output policy) -> clipped surrogate -> AdamW step. During the internal phase layers > k and the
final norm are frozen (requires_grad False, so their grads stay None and AdamW skips them, weight
decay included): only the embedding, layers <= k and the unembedding move.

Under `torchrun` / `accelerate launch` (WORLD_SIZE > 1; see `distributed`) every rank draws the same
global batch of `prompts_per_step` prompts, samples and scores its own contiguous block of them (whole
groups, so group advantages stay local), and the DDP/FSDP wrapper averages the gradients. Each group
is sampled with its own seed (`group_seed`), and the loss is normalised by the global batch's token /
sequence counts (`LossScale`), so N processes take the same step as one process with the same batch.
Metrics are reduced over ranks; rank 0 alone writes files.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from entropylens.version import __version__
from entropylens.bupo import distributed
from entropylens.bupo.config import BupoConfig  # noqa: F401  (re-exported: its documented home)
from entropylens.bupo.checkpoint import (
    STATE_FILE, Interrupted, deferred_sigint, load_state, save_checkpoint, save_state,
)
from entropylens.bupo.metrics import RANK_KEYS, metrics_row
from entropylens.bupo.grpo import group_advantages
from entropylens.data.rewards import check_references, get_reward
from entropylens.bupo.rollout import generate_groups, generate_rollouts
from entropylens.model.generation import group_seed
from entropylens.bupo.update import (  # noqa: F401  (_score_chunk, _update, _no_grad_logp: the tests' entry points)
    _no_grad_logp, _score_chunk, _update, _update_effect, optimise_batch, set_phase,
)
from entropylens.errors import UserError
from entropylens.data.prompts import Prompt, prompts_sha256
from entropylens.data.prompts import render as render_prompt
from entropylens.model.layout import decoder_layers
from entropylens.model.load import describe_model
from entropylens.store.folder import RunFolder, utc_now, write_atomic

log = logging.getLogger(__name__)


def train(
    config: BupoConfig,
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    out_dir: str | Path,
    progress: bool = True,
    *,
    render: Callable[[Prompt, Any], str] | None = None,
    model_info: dict | None = None,
    reward_fn: Callable[[str, str], float] | None = None,
    resume: bool = False,
    finish: bool = True,
) -> Path:
    """Train all of `model`'s parameters in place with BuPO; write metrics, config, manifest and checkpoint.

    Returns the checkpoint folder. The parameters' requires_grad flags are restored afterwards.

    `prompts` are `entropylens.data.prompts.Prompt`s (`.answer` is the reference); `render(prompt,
    tokenizer) -> str` defaults to `entropylens.data.prompts.render` with the config's `enable_thinking`;
    `reward_fn(completion, answer) -> float` overrides `config.reward` (e.g. a format reward).
    Under a distributed launcher every rank calls this with the same arguments; rank 0 writes the files.
    Every `config.save_every` steps (and on Ctrl-C) the resumable state goes to `out_dir/state.pt`;
    `resume=True` continues from it (or starts afresh if there is none). `finish=False` leaves the run
    `running` at stage "trained" for a caller that does more in the same run folder (the bupo pipeline).
    """
    acc = distributed.accelerator(cpu=next(model.parameters()).device.type == "cpu")
    config.validate(len(decoder_layers(model)), len(prompts), 1 if acc is None else acc.num_processes)
    if (config.save_every or resume) and distributed.shards_parameters(acc):
        raise UserError("--save-every / --resume are not supported under FSDP yet (sharded optimizer state); "
                        "use DDP or one process")
    out, main = Path(out_dir), distributed.is_main(acc)
    if render is None:
        render = lambda p, tok: render_prompt(p, tok, enable_thinking=config.enable_thinking)  # noqa: E731
    if reward_fn is None:
        check_references(prompts, config.reward, "training prompt")
    folder = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        folder = RunFolder.start(out, _manifest(config, model, prompts, out, model_info, acc), resume=resume)
        if "interrupted" in folder.manifest:  # resumed after Ctrl-C
            folder.update(interrupted=None)
        folder.write_json("config.json", asdict(config))
    t_start, flags = time.perf_counter(), [p.requires_grad for p in model.parameters()]
    try:
        reward_fn = reward_fn or get_reward(config.reward)
        ref_model = copy.deepcopy(model).eval().requires_grad_(False) if config.beta else None
        runner = _wrap(acc, model)
        n_tokens = _loop(config, model, runner, ref_model, tokenizer, prompts, render, reward_fn, out, progress,
                         acc, resume)
        state = acc.get_state_dict(runner) if distributed.shards_parameters(acc) else None  # all ranks gather
        ckpt = distributed.main_only(acc, lambda: save_checkpoint(model, tokenizer, out / "checkpoint", state))
    except Interrupted as e:  # Ctrl-C: the state of the last whole step is on disk; the run stays resumable
        if main:
            folder.update(interrupted=f"after step {e.step}", finished=utc_now())
        raise
    except BaseException as e:
        if main:
            folder.fail(f"{type(e).__name__}: {e}")
        raise
    finally:  # loaders freeze models for tracing; hand the model back as it came
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        if acc is not None:
            acc.free_memory()  # drops the accelerator's references to the wrapper and the optimizer
    if main:
        (out / STATE_FILE).unlink(missing_ok=True)  # the checkpoint supersedes it
        done = dict(stage="trained", n_tokens=n_tokens, timings={"total_s": round(time.perf_counter() - t_start, 3)})
        folder.complete(**done) if finish else folder.update(**done)
    distributed.barrier(acc)  # nobody returns before rank 0 has written everything
    return ckpt


def _wrap(acc, model: nn.Module) -> nn.Module:
    """The DDP/FSDP wrapper whose forward and backward synchronise gradients; the model itself in one process."""
    if acc is None:
        return model
    model.requires_grad_(True)  # DDP registers (FSDP flattens) only the parameters that require grad now
    return acc.prepare(model)


def _loop(cfg: BupoConfig, model, runner, ref_model, tokenizer, prompts, render, reward_fn, out: Path,
          progress: bool, acc, resume: bool = False) -> int:
    """The training steps; returns the number of completion tokens trained on (all ranks)."""
    params = list(runner.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    opt = opt if acc is None else acc.prepare(opt)
    rank, world = (0, 1) if acc is None else (acc.process_index, acc.num_processes)
    rng, order, G, total, first, rows = random.Random(cfg.seed), [], cfg.num_generations, 0, 0, []
    if resume and (out / STATE_FILE).is_file():
        st = load_state(out / STATE_FILE, model, opt, _resume_keys(cfg))
        first, total, rows, rng, order = st["step"], st["n_tokens"], st["metrics"], st["rng"], st["order"]
        log.info("resuming training at step %d of %d from %s", first, cfg.steps, out / STATE_FILE)
    elif resume:
        log.info("no training state in %s: training starts again at step 0", out)
    if rank == 0:  # the metrics of the steps the state holds, nothing after them
        write_atomic(out / "metrics.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in rows)))

    def save(step: int) -> None:
        if rank == 0:
            save_state(out / STATE_FILE, model, opt, step=step, rng=rng, order=order, metrics=rows, n_tokens=total,
                       config=_resume_keys(cfg))
        distributed.barrier(acc)

    console = Console(stderr=True, quiet=not progress or rank > 0)
    with deferred_sigint(world == 1, console) as sigint, Progress(
            TextColumn("[bold]bupo"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("bupo", total=cfg.steps, completed=first, info="")
        for step in range(first, cfg.steps):
            t0 = time.perf_counter()
            phase = "internal" if step < cfg.internal_steps else "output"
            batch = []
            for _ in range(cfg.prompts_per_step):  # epochs of shuffled prompts, seeded: the same on every rank
                if not order:
                    order = rng.sample(range(len(prompts)), len(prompts))
                batch.append(prompts[order.pop()])
            mine = distributed.shard(len(batch), rank, world)  # this rank's block of whole groups
            seeds = [group_seed(cfg.seed, step, j) for j in range(len(batch))][mine]
            batch = batch[mine]
            texts = [render(p, tokenizer) for p in batch]
            if world > 1 or cfg.group_sampling:
                ro = generate_groups(model, tokenizer, texts, G, cfg.temperature, cfg.max_new_tokens, seeds,
                                     synced_gpus=distributed.shards_parameters(acc))
            else:  # one batched call: the prompts share an RNG stream and left padding
                ro = generate_rollouts(model, tokenizer, texts, G, cfg.temperature, cfg.max_new_tokens,
                                       seed=seeds[0])
            rewards = torch.tensor([reward_fn(t, str(batch[i // G].answer)) for i, t in enumerate(ro.texts)])
            adv = group_advantages(rewards, G).to(ro.mask.device)  # (N,)
            set_phase(model, cfg.internal_layer, phase, cfg.lens)
            s, grad_norm, before = optimise_batch(model, runner, opt, params, ro, adv, ref_model, cfg, phase, acc)
            effect = _update_effect(model, ro, adv, before, cfg, phase, after=phase == "internal")
            local = {**s, "tokens": ro.n_tokens, "rollouts": len(ro.texts), "seconds": time.perf_counter() - t0,
                     **effect}  # this rank's statistics, by name
            per_rank = distributed.gather_rows(acc, torch.tensor([[local[k] for k in RANK_KEYS]],
                                                                 dtype=torch.float64))  # (W, 12) in RANK_KEYS order
            row = metrics_row(step, phase, distributed.gather_rows(acc, rewards), per_rank, grad_norm, G)
            total += int(per_rank[:, RANK_KEYS.index("tokens")].sum())
            rows.append(row)
            if rank == 0:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                if not row["signal/tokens"]:
                    log.warning("step %d: every group's rewards are equal: no advantage, no gradient this step", step)
            signal_ = f"{row['signal/groups_frac']:.2f}" if row["signal/tokens"] else "none"
            bar.update(task, advance=1, info=f"{phase} · reward {row['reward/mean']:.3f} · signal {signal_} · "
                                              f"H_k {row['entropy/layer_k']:.2f} · H_out {row['entropy/output']:.2f}")
            done = step + 1
            if sigint["hit"]:
                save(done)
                raise Interrupted(done, saved=True)
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                save(done)
    return total


def _resume_keys(cfg: BupoConfig) -> dict:
    """The settings a resumed run must share with the stored state (all but bookkeeping)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("save_every", "model_id", "parent_run")}


def _manifest(cfg: BupoConfig, model, prompts, out: Path, info: dict | None, acc=None) -> dict:
    if info is None:  # a model handed over in memory: described as the loaders describe theirs
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        model_id = cfg.model_id or getattr(model.config, "_name_or_path", "")
        info = describe_model(model, model_id, "memory", "unknown", dtype).to_dict()
    dist = {} if acc is None else {"distributed": {
        "world_size": acc.num_processes, "type": str(acc.distributed_type).split(".")[-1],
        "backend": acc.state.backend, "prompts_per_rank": cfg.prompts_per_step // acc.num_processes}}
    return dist | {
        "run_id": out.name, "created": utc_now(), "kind": "bupo", "model": info, "config": asdict(cfg),
        "bupo": {"layer": cfg.internal_layer, "internal_steps": cfg.internal_steps, "steps": cfg.steps,
                 "algo": "bupo" if cfg.internal_steps else "grpo", "objective": cfg.objective,
                 "mini_batches": cfg.mini_batches},
        "prompts": {"source": prompts[0].source, "n": len(prompts), "sha256": prompts_sha256(list(prompts))},
        "generation": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": 1.0},
        "seed": cfg.seed, "parent_run": cfg.parent_run, "device": str(next(model.parameters()).device),
        "versions": {"entropylens": __version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "files": {"metrics": "metrics.jsonl", "config": "config.json", "checkpoint": "checkpoint"},
    }

