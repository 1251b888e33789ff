"""`entropylens bupo`: pick the layer, evaluate + trace the base model, train, evaluate + re-trace.

Definitions (π^k, the objective, the paper's settings): docs/definitions.md#bupo.

One call of `run_bupo` does the whole loop and leaves, under `<cache>/runs/`:

    <id>/            the trainer run (manifest kind "bupo", config.json, metrics.jsonl, checkpoint/,
                     run_config.json = this module's config, eval.json = base vs trained Avg@K / Pass@K)
    <id>-layer/      (--layer auto) trace of the base model on training prompts that chose k
    <id>-base/       trace of the base model on held-out prompts
    <id>-trained/    trace of the trained checkpoint on the same prompts, parent_run = <id>-base

The base model is evaluated and traced before training because training changes it in place; the
trained model is reloaded from the saved checkpoint, which proves the checkpoint loads.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from entropylens.bupo import distributed
from entropylens.bupo.checkpoint import Interrupted
from entropylens.bupo.evaluate import EvalConfig, evaluate, gains
from entropylens.data.rewards import check_references
from entropylens.bupo.trainer import BupoConfig, train
from entropylens.errors import UserError
from entropylens.model.load import LoadedModel, load_model
from entropylens.options import build, count_or_all, flatten, ints, option
from entropylens.data.prompts import load_prompts
from entropylens.model.layout import SITES
from entropylens.store.folder import RunFolder, new_run_id, read_manifest, resolve_run, write_json
from entropylens.analysis.stages import layer_difference, pick_boundary_layer
from entropylens.store import layer_table
from entropylens.tracing.job import TraceConfig, run_trace

ALGOS = ("bupo", "grpo")
# The default k: the embedded SmolLM2 has no layer with a positive mean FFN dH under the bupo lens (every one
# is negative, -1.8 to -10.3 nats), so `--layer auto` refuses it; 15 is the middle of its 30 layers.
DEFAULT_LAYER = 15
TRAIN_DEFAULTS = BupoConfig(internal_layer=DEFAULT_LAYER, steps=24, num_generations=4, max_new_tokens=12,
                            learning_rate=2e-5, micro_batch_size=32, save_every=10)


@dataclass
class BupoRunConfig:
    """The `entropylens bupo` command. Defaults: SmolLM2 learning the built-in `digits` task (README: time, gain)."""

    model: str = option("smollm2", "`smollm2` (embedded), a local folder, a .gguf file or a hub id")
    prompts: str = option("digits", "training prompts: built-in set (train split) or a prompt file")
    eval_prompts_source: str | None = option(None, "held-out prompts (default: test split)", flags=("--eval-source",))
    algo: str = option("bupo", "bupo (train pi^k first) | grpo (no internal phase)")
    layer: str = option(str(DEFAULT_LAYER), "k (1-indexed) or auto: last layer with positive mean FFN dH "
                        f"(SmolLM2 has none, hence the default {DEFAULT_LAYER} of its 30)")
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
    device: str = option("cpu", "cpu | cuda | cuda:N | auto")
    dtype: str = option("float32", "float32 | bfloat16 | float16 | float64")
    name: str | None = option(None, "trainer run id (traces get -layer, -base, -trained suffixes)")
    cache: str = option("cache", "folder holding runs/ and models/")
    trust_remote_code: bool = option(False, "allow model code from the checkpoint (only when asked)")

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
        if self.layer != "auto" and not (self.layer.isdigit() and int(self.layer) >= 1):
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
        self.trainer_config(DEFAULT_LAYER).check()


@dataclass
class BupoResult:
    """Where everything went, and the numbers the command prints."""

    run_dir: Path  # the trainer run folder
    checkpoint: Path
    layer: int
    layer_evidence: str  # why k (auto) or "given"
    layer_run: str | None  # the trace run that chose k (auto only)
    base_run: str
    trained_run: str
    eval_base: dict[str, Any]
    eval_trained: dict[str, Any]
    gains: dict[str, dict]  # per avg@K / pass@K: trained − base with a paired 95 % interval over prompts
    before_after: pd.DataFrame  # per layer: base, trained and change of H_layer and dH_ffn (response tokens)


def _log(progress: bool, msg: str) -> None:
    if progress:
        from rich.console import Console

        Console(stderr=True).print(msg)


def _splits(cfg: BupoRunConfig) -> tuple[str, str, str]:
    """(train split, eval source, eval split): one source's train/test halves unless given two."""
    if cfg.eval_prompts_source is None:
        return "train", cfg.prompts, "test"
    return "all", cfg.eval_prompts_source, "all"


def _trace(cfg: BupoRunConfig, loaded: LoadedModel, name: str, prompts: str, split: str, limit: int,
           positions: str, parent: str | None, progress: bool, model: str, sites: tuple[str, ...] = SITES) -> Path:
    t = cfg.train
    tc = TraceConfig(model=model, prompts=prompts, split=split, limit=limit, max_new_tokens=t.max_new_tokens,
                     temperature=t.temperature, lens="bupo", sites=sites, positions=positions, device=cfg.device,
                     dtype=cfg.dtype, batch_size=cfg.batch_size, name=name, seed=t.seed, cache=cfg.cache,
                     enable_thinking=t.enable_thinking, trust_remote_code=cfg.trust_remote_code,
                     parent_run=parent)
    return run_trace(tc, progress=progress, loaded=loaded)


def choose_layer(cfg: BupoRunConfig, loaded: LoadedModel, run_id: str, progress: bool) -> tuple[int, str, str | None]:
    """k as given, or the paper's boundary layer from a trace of the base model on training prompts.

    That trace decodes only the FFN input and output sites of the response positions: all `dH_ffn` needs.
    """
    n_layers = loaded.info.n_layers
    if cfg.layer != "auto":
        k = int(cfg.layer)
        if not 1 <= k <= n_layers:
            raise UserError(f"--layer {k} is out of range: the model has layers 1..{n_layers}")
        return k, "given with --layer", None
    train_split, _, _ = _splits(cfg)
    run_dir = _trace(cfg, loaded, f"{run_id}-layer", cfg.prompts, train_split, cfg.layer_trace_prompts,
                     "response", None, progress, cfg.model, sites=("ffn_in", "ffn"))  # all dH_ffn needs: half the GEMMs
    k, evidence = pick_boundary_layer(layer_table(run_dir, lens="bupo", role="response"))
    return k, evidence, run_dir.name


def before_after_table(base_dir: Path, trained_dir: Path) -> pd.DataFrame:
    """Per layer mean H_layer and dH_ffn over response tokens, before, after and the change."""
    a = layer_table(base_dir, lens="bupo", role="response").set_index("layer")
    b = layer_table(trained_dir, lens="bupo", role="response").set_index("layer")
    change = layer_difference(a.reset_index(), b.reset_index()).set_index("layer")  # trained − base
    out = pd.DataFrame({"H_layer_base": a["H_layer"], "H_layer_trained": b["H_layer"],
                        "H_layer_change": change["H_layer"], "dH_ffn_base": a["dH_ffn"],
                        "dH_ffn_trained": b["dH_ffn"], "dH_ffn_change": change["dH_ffn"]})
    return out.reset_index()


def run_bupo(cfg: BupoRunConfig, progress: bool = True, resume: bool = False) -> BupoResult:
    """Choose k, evaluate and trace the base model, train, then evaluate and re-trace the checkpoint.

    Under `torchrun` / `accelerate launch` every rank runs this: all of them train, rank 0 alone picks
    the run id, traces, evaluates and writes; the others wait for it and get the same result.
    `resume=True` continues the run `cfg.name` where it stopped: what is stored (base evaluation and
    traces, the training state, the checkpoint) is kept, the rest is done.
    """
    cfg.validate()
    acc = distributed.accelerator(cpu=cfg.device == "cpu")
    world = 1 if acc is None else acc.num_processes
    if cfg.train.prompts_per_step % world:
        raise UserError(f"--prompts-per-step ({cfg.train.prompts_per_step}) must be divisible by the number of "
                        f"processes ({world}): each rank samples an equal block of whole prompt groups")
    progress = progress and distributed.is_main(acc)
    t0 = time.perf_counter()
    train_split, eval_source, eval_split = _splits(cfg)
    train_set = load_prompts(cfg.prompts, limit=cfg.train_prompts, seed=cfg.train.seed, split=train_split)
    eval_set = load_prompts(eval_source, limit=cfg.eval_prompts, seed=cfg.train.seed, split=eval_split)
    check_references(train_set, cfg.train.reward, "training prompt")
    check_references(eval_set, cfg.train.reward, "held-out prompt")
    runs = Path(cfg.cache) / "runs"
    run_id = cfg.name if resume else distributed.main_only(acc, lambda: _claim_run_id(cfg, runs))
    run_dir = runs / run_id

    _log(progress, f"loading model {cfg.model} ..." + (f" ({world} processes)" if world > 1 else ""))
    loaded = distributed.main_first(acc, lambda: load_model(cfg.model, cfg.dtype, cfg.device, Path(cfg.cache),
                                                             cfg.trust_remote_code))  # rank 0 fills the cache
    t = cfg.train
    ecfg = EvalConfig(n_samples=cfg.eval_samples, ks=tuple(cfg.ks), temperature=t.temperature,
                      max_new_tokens=t.max_new_tokens, prompts_per_batch=cfg.batch_size, reward=t.reward,
                      seed=t.seed, enable_thinking=t.enable_thinking)
    before = distributed.main_only(acc, lambda: _stored_before(run_dir) if resume else None)
    if before is None:
        before = distributed.main_only(acc, lambda: _before_training(cfg, loaded, run_id, ecfg, eval_set, progress))
    k, evidence, layer_run, eval_base, base_name = before
    layer_choice = {"mode": cfg.layer, "layer": k, "evidence": evidence, "trace_run": layer_run}
    trace_n = min(cfg.trace_prompts, len(eval_set))

    bcfg = cfg.trainer_config(k, model_id=loaded.info.id, parent_run=base_name)
    ckpt = run_dir / "checkpoint"
    if not (resume and _trained(run_dir)):
        try:
            train(bcfg, loaded.model, loaded.tokenizer, train_set, run_dir, progress=progress,
                  model_info=loaded.info.to_dict(), resume=resume, finish=False)
        except Interrupted as e:
            e.run_id = run_id
            raise
    loaded = None  # type: ignore[assignment]  # frees the base model before the checkpoint is reloaded
    gc.collect()

    def after_training() -> tuple[dict, dict, str, pd.DataFrame]:
        # the trainer left the run `running` at stage "trained"; it is complete once evaluated and re-traced
        folder = RunFolder.open(run_dir)
        if folder.manifest.get("status") != "running":  # resumed after a failure past training
            folder = RunFolder.start(run_dir, {}, resume=True)
        try:
            folder.update(stage="evaluate", layer_choice=layer_choice,
                          runs={"layer": layer_run, "base": base_name, "trained": f"{run_id}-trained"})
            folder.write_json("run_config.json", flatten(cfg) | {"name": run_id, "layer_choice": layer_choice})
            trained = load_model(str(ckpt), cfg.dtype, cfg.device, Path(cfg.cache), False)
            _log(progress, f"evaluating the trained model ({ckpt}) ...")
            eval_trained = evaluate(ecfg, trained.model, trained.tokenizer, eval_set)
            gain = gains(eval_base, eval_trained, cfg.ks)
            folder.write_json("eval.json", {
                "config": asdict(ecfg), "prompts": {"source": eval_source, "split": eval_split, "n": len(eval_set)},
                "interval": "95 %, percentile bootstrap over prompts (10,000 resamples); gain: paired",
                "base": eval_base, "trained": eval_trained, "gain": gain,
            })
            trained_dir = runs / f"{run_id}-trained"
            shutil.rmtree(trained_dir, ignore_errors=True)  # an interrupted re-trace is redone whole
            trained_dir = _trace(cfg, trained, trained_dir.name, eval_source, eval_split, trace_n,
                                 cfg.trace_positions, base_name, progress, str(ckpt))
            table = before_after_table(runs / base_name, trained_dir)
        except BaseException as e:
            folder.fail(f"{type(e).__name__}: {e}")
            raise
        files = folder.manifest["files"] | {"eval": "eval.json", "run_config": "run_config.json"}
        folder.complete(stage="done", files=files, pipeline_s=round(time.perf_counter() - t0, 1))
        return eval_trained, gain, trained_dir.name, table

    eval_trained, gain, trained_name, table = distributed.main_only(acc, after_training)
    distributed.close()
    return BupoResult(run_dir, ckpt, k, evidence, layer_run, base_name, trained_name, eval_base,
                      eval_trained, gain, table)


def config_from_run(cache: str, run_id: str) -> BupoRunConfig:
    """The settings a `bupo` run was started with, for `--resume`."""
    path = resolve_run(cache, run_id) / "run_config.json"
    if not path.is_file():
        raise UserError(f"run {run_id!r} is not a resumable bupo run (no run_config.json)")
    stored = json.loads(path.read_text())  # the command's option values (flat)
    return build(BupoRunConfig, stored | {"ks": tuple(stored["ks"]), "cache": cache, "name": run_id})


def _trained(run_dir: Path) -> bool:
    """Training finished and its checkpoint was written (the manifest says so only after both)."""
    return read_manifest(run_dir).get("stage") in ("trained", "evaluate", "done") and (run_dir / "checkpoint").is_dir()


def _stored_before(run_dir: Path) -> tuple[int, str, str | None, dict[str, Any], str] | None:
    """What `_before_training` stored for this run, if it finished; else None (it is then redone)."""
    path = run_dir / "before.json"
    if not path.is_file():
        return None
    b = json.loads(path.read_text())
    return b["layer"], b["evidence"], b["layer_run"], b["eval_base"], b["base_run"]


def _claim_run_id(cfg: BupoRunConfig, runs: Path) -> str:
    """A fresh run id (one for all ranks: a timestamped default differs between processes)."""
    run_id = new_run_id(cfg.name, tag=f"{cfg.algo}-{Path(cfg.prompts).stem}")
    try:
        runs.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cache folder {cfg.cache} is not writable: {e.strerror or e}") from None
    taken = [n for n in (run_id, f"{run_id}-layer", f"{run_id}-base", f"{run_id}-trained") if (runs / n).exists()]
    if taken:
        raise UserError(f"run {taken[0]!r} already exists in {runs}; pick another --name")
    return run_id


def _before_training(cfg: BupoRunConfig, loaded: LoadedModel, run_id: str, ecfg: EvalConfig, eval_set,
                     progress: bool) -> tuple[int, str, str | None, dict[str, Any], str]:
    """Choose k, evaluate and trace the base model (before training changes it in place); stored in before.json.

    A resumed run that stopped in here starts this part again: its unfinished traces are removed first.
    """
    for suffix in ("-layer", "-base"):
        shutil.rmtree(Path(cfg.cache) / "runs" / f"{run_id}{suffix}", ignore_errors=True)
    k, evidence, layer_run = choose_layer(cfg, loaded, run_id, progress)
    _log(progress, f"[bold]layer k = {k}[/]: {evidence}" + (f" (trace {layer_run})" if layer_run else ""))
    _log(progress, f"evaluating the base model on {len(eval_set)} held-out prompts ...")
    eval_base = evaluate(ecfg, loaded.model, loaded.tokenizer, eval_set)
    _, eval_source, eval_split = _splits(cfg)
    base_dir = _trace(cfg, loaded, f"{run_id}-base", eval_source, eval_split, min(cfg.trace_prompts, len(eval_set)),
                      cfg.trace_positions, None, progress, cfg.model)
    run_dir = Path(cfg.cache) / "runs" / run_id  # created only now: a run that fails before this leaves nothing
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "run_config.json", flatten(cfg) | {"name": run_id})  # what --resume rebuilds
    write_json(run_dir / "before.json", {
        "layer": k, "evidence": evidence, "layer_run": layer_run, "eval_base": eval_base, "base_run": base_dir.name})
    return k, evidence, layer_run, eval_base, base_dir.name

