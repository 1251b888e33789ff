"""`entropylens bupo`: pick the layer, evaluate + trace the base model, train, evaluate + re-trace.

Definitions (π^k, the objective, the paper's settings): docs/definitions.md#bupo.

One call of `run_bupo` does the whole loop and leaves, in the runs folder (`--runs`, default `<cache>/runs/`):

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
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from entropylens.bupo import distributed
from entropylens.bupo.checkpoint import Interrupted
from entropylens.bupo.evaluate import EvalConfig, evaluate, gains
from entropylens.data.rewards import check_references
from entropylens.bupo.config import BupoRunConfig, parse_layer
from entropylens.bupo.trainer import train
from entropylens.errors import UserError
from entropylens.model.load import LoadedModel, load_model
from entropylens.options import flatten, restore
from entropylens.data.prompts import load_prompts
from entropylens.model.layout import SITES
from entropylens.store.folder import RunFolder, new_run_id, read_manifest, resolve_run, write_json
from entropylens.analysis.stages import layer_difference, pick_boundary_layer
from entropylens.store import layer_table
from entropylens.tracing.job import TraceConfig, run_trace
from entropylens.store.cache import Cache

log = logging.getLogger(__name__)


@dataclass
class LayerChoice:
    """Which k was trained, and why; stored in the trainer run's manifest as it is (`layer_choice`)."""

    mode: int | str  # the --layer value: a number, or "auto"
    layer: int  # k, 1-indexed
    evidence: str  # "given with --layer", or the boundary-layer rule's reading
    trace_run: str | None  # the trace that chose k (auto only)


@dataclass
class BaseModelResults:
    """What the base model gave before training changed it in place; stored in before.json, read back as itself."""

    layer: int
    evidence: str
    layer_run: str | None
    eval_base: dict[str, Any]
    base_run: str

    def choice(self, mode: int | str) -> LayerChoice:
        return LayerChoice(mode, self.layer, self.evidence, self.layer_run)


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
                     runs_dir=cfg.runs_dir,
                     enable_thinking=t.enable_thinking, trust_remote_code=cfg.trust_remote_code,
                     parent_run=parent)
    return run_trace(tc, progress=progress, loaded=loaded)


def choose_layer(cfg: BupoRunConfig, loaded: LoadedModel, run_id: str, progress: bool) -> LayerChoice:
    """k as given, or the paper's boundary layer from a trace of the base model on training prompts; checked
    here, where the model's layer count is known.

    That trace decodes only the FFN input and output sites of the response positions: all `dH_ffn` needs.
    """
    mode = parse_layer(cfg.layer)
    if mode != "auto":
        choice = LayerChoice(mode, mode, "given with --layer", None)
    else:
        train_split, _, _ = _splits(cfg)
        run_dir = _trace(cfg, loaded, f"{run_id}-layer", cfg.prompts, train_split, cfg.layer_trace_prompts,
                         "response", None, progress, cfg.model, sites=("ffn_in", "ffn"))  # dH_ffn: half the GEMMs
        k, evidence = pick_boundary_layer(layer_table(run_dir, lens="bupo", role="response"))
        choice = LayerChoice(mode, k, evidence, run_dir.name)
    n_layers = loaded.info.n_layers
    if not 1 <= choice.layer <= n_layers:
        raise UserError(f"--layer {choice.layer} is out of range: the model has layers 1..{n_layers}")
    log.info("layer k = %d of %d (--layer %s): %s%s", choice.layer, n_layers, mode, choice.evidence,
             f"; trace {choice.trace_run}" if choice.trace_run else "")
    return choice


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
    runs = cfg.folders().runs
    run_id = cfg.name if resume else distributed.main_only(acc, partial(_claim_run_id, cfg, runs))
    run_dir = runs / run_id

    _log(progress, f"loading model {cfg.model} ..." + (f" ({world} processes)" if world > 1 else ""))
    loaded = distributed.main_first(acc, cfg.load)  # rank 0 fills the model cache
    t = cfg.train
    ecfg = EvalConfig(n_samples=cfg.eval_samples, ks=tuple(cfg.ks), temperature=t.temperature,
                      max_new_tokens=t.max_new_tokens, prompts_per_batch=cfg.batch_size, reward=t.reward,
                      seed=t.seed, enable_thinking=t.enable_thinking)
    before = distributed.main_only(acc, partial(_stored_before, run_dir)) if resume else None
    if resume:
        log.info("resume %s: %s", run_id, "base-model evaluation and traces kept (before.json)" if before else
                 "no before.json: choosing k and evaluating the base model again")
    if before is None:
        before = distributed.main_only(acc, partial(_before_training, cfg, loaded, run_id, ecfg, eval_set, progress))
    k, evidence, layer_run, eval_base, base_name = (before.layer, before.evidence, before.layer_run,
                                                    before.eval_base, before.base_run)
    layer_choice = asdict(before.choice(parse_layer(cfg.layer)))
    trace_n = min(cfg.trace_prompts, len(eval_set))

    bcfg = cfg.trainer_config(k, model_id=loaded.info.id, parent_run=base_name)
    ckpt = run_dir / "checkpoint"
    if resume and _trained(run_dir):
        log.info("resume %s: training finished and its checkpoint is saved; evaluating it", run_id)
    else:
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
            folder.write_json("run_config.json", _stored_options(cfg) | {"name": run_id, "layer_choice": layer_choice})
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


def config_from_run(cache: str, run_id: str, runs_dir: str | None = None) -> BupoRunConfig:
    """The settings a `bupo` run was started with, for `--resume` (found under `runs_dir`, default
    `<cache>/runs`)."""
    path = resolve_run(Cache(cache, runs=runs_dir), run_id) / "run_config.json"
    if not path.is_file():
        raise UserError(f"run {run_id!r} is not a resumable bupo run (no run_config.json)")
    return restore(BupoRunConfig, json.loads(path.read_text()), cache=cache, runs_dir=runs_dir,
                   name=run_id)  # option values (flat)


def _stored_options(cfg: BupoRunConfig) -> dict[str, Any]:
    """run_config.json's option values: what `--resume` rebuilds. Not the runs folder: a run may be moved, and
    is resumed from wherever `--runs` finds it."""
    return {k: v for k, v in flatten(cfg).items() if k != "runs_dir"}


def _trained(run_dir: Path) -> bool:
    """Training finished and its checkpoint was written (the manifest says so only after both)."""
    return read_manifest(run_dir).get("stage") in ("trained", "evaluate", "done") and (run_dir / "checkpoint").is_dir()


def _stored_before(run_dir: Path) -> BaseModelResults | None:
    """What `_before_training` stored for this run, if it finished; else None (it is then redone)."""
    path = run_dir / "before.json"
    return BaseModelResults(**json.loads(path.read_text())) if path.is_file() else None


def _claim_run_id(cfg: BupoRunConfig, runs: Path) -> str:
    """A fresh run id (one for all ranks: a timestamped default differs between processes)."""
    run_id = new_run_id(cfg.name, tag=f"{cfg.algo}-{Path(cfg.prompts).stem}")
    try:
        runs.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"runs folder {runs} is not writable: {e.strerror or e}") from None
    taken = [n for n in (run_id, f"{run_id}-layer", f"{run_id}-base", f"{run_id}-trained") if (runs / n).exists()]
    if taken:
        raise UserError(f"run {taken[0]!r} already exists in {runs}; pick another --name")
    return run_id


def _before_training(cfg: BupoRunConfig, loaded: LoadedModel, run_id: str, ecfg: EvalConfig, eval_set,
                     progress: bool) -> BaseModelResults:
    """Choose k, evaluate and trace the base model (before training changes it in place); stored in before.json.

    A resumed run that stopped in here starts this part again: its unfinished traces are removed first.
    """
    for suffix in ("-layer", "-base"):
        shutil.rmtree(cfg.folders().run_dir(f"{run_id}{suffix}"), ignore_errors=True)
    choice = choose_layer(cfg, loaded, run_id, progress)
    _log(progress, f"[bold]layer k = {choice.layer}[/]: {choice.evidence}"
         + (f" (trace {choice.trace_run})" if choice.trace_run else ""))
    _log(progress, f"evaluating the base model on {len(eval_set)} held-out prompts ...")
    eval_base = evaluate(ecfg, loaded.model, loaded.tokenizer, eval_set)
    _, eval_source, eval_split = _splits(cfg)
    base_dir = _trace(cfg, loaded, f"{run_id}-base", eval_source, eval_split, min(cfg.trace_prompts, len(eval_set)),
                      cfg.trace_positions, None, progress, cfg.model)
    run_dir = cfg.folders().run_dir(run_id)  # created only now: a run that fails before this leaves nothing
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "run_config.json", _stored_options(cfg) | {"name": run_id})  # what --resume rebuilds
    before = BaseModelResults(choice.layer, choice.evidence, choice.trace_run, eval_base, base_dir.name)
    write_json(run_dir / "before.json", asdict(before))
    return before

