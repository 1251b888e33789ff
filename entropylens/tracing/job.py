"""`entropylens trace`: prompts -> (seeded generation) -> one traced forward per batch -> decode -> Parquet.

This module runs the job (config, prompts, memory check, sharding, resume, manifest); what happens to one
batch lives in entropylens.tracing.batch.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from dataclasses import asdict
from pathlib import Path
from collections.abc import Iterator

import torch

from entropylens.version import __version__
from entropylens.tracing.batch import GroupSampler, Sequences, trace_batch
from entropylens.tracing.engine import ADDITIVE_TOL, Engine, make_engine
from entropylens.options import restore
from entropylens.tracing.config import TraceConfig
from entropylens.core.decode import DEFAULT_BLOCK_BYTES
from entropylens.tracing.shard import Shard
from entropylens.errors import UserError
from entropylens.model.load import LoadedModel
from entropylens.data.prompts import Prompt, load_prompts, prompts_sha256, render
from entropylens.model.remote import RemoteModel, connect
from entropylens.data.rewards import score, trace_references
from entropylens.store import RunWriter, new_run_id, read_manifest, resolve_run
from entropylens.store.cache import Cache

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- prompts and memory

def encode(loaded: LoadedModel, prompts: list[Prompt],
           cfg: TraceConfig) -> tuple[list[str], list[list[int]], list[int]]:
    """Rendered texts, token ids, and tokens dropped per prompt: a prompt that leaves no room for the response
    in the model's context is rejected, or with `long_prompts="truncate"` cut to its last tokens that fit."""
    tok = loaded.tokenizer
    texts = [render(p, tok, enable_thinking=cfg.enable_thinking) for p in prompts]
    templated = bool(getattr(tok, "chat_template", None))
    ids = [tok(t, add_special_tokens=not templated)["input_ids"] for t in texts]
    limit, new = loaded.info.max_positions, cfg.max_new_tokens if cfg.generate else 0
    room = limit - new if limit else None  # prompt tokens that fit
    dropped = [0] * len(ids)
    for i, seq in enumerate(ids):
        if not seq:
            raise UserError(f"prompt {i} is empty after tokenisation")
        if room is not None and len(seq) > room:
            if cfg.long_prompts == "reject" or room < 1:
                hint = f"--long-prompts truncate keeps its last {room}" if room > 0 else "lower --max-new-tokens"
                raise UserError(f"prompt {i} has {len(seq)} tokens; with {new} new tokens it exceeds the model's "
                                f"context of {limit} ({hint})")
            dropped[i], ids[i] = len(seq) - room, seq[-room:]
            texts[i] = tok.decode(ids[i])  # the text the model actually reads
    return texts, ids, dropped


def available_bytes(device: torch.device) -> int:
    """Memory free for a batch now (the weights are already loaded): CUDA free memory, else host RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def batch_bytes(loaded: LoadedModel, batch_size: int, seq_len: int) -> int:
    """Peak extra memory of one batch: the captured sites ((5L + 2) x B x T x d, held twice: as captured and
    packed for the decode), the forward's own logits (B x T x V) and the decode buffers (fixed)."""
    info = loaded.info
    elem = max(4, next(loaded.model.parameters()).element_size())
    per_token = (5 * info.n_layers + 2) * info.d_model * elem * 2 + info.vocab_size * 4
    return batch_size * seq_len * per_token + DEFAULT_BLOCK_BYTES


def check_memory(loaded: LoadedModel, cfg: TraceConfig, seq_len: int) -> None:
    """Refuse before the first batch when one batch cannot fit, suggesting a batch size that does."""
    dev = loaded.model.get_output_embeddings().weight.device  # the sites are decoded where W_U lives
    need, free = batch_bytes(loaded, cfg.batch_size, seq_len), available_bytes(dev)
    log.debug("memory: a batch of %d x %d tokens needs ~%.2f GiB, %s has %.2f GiB free", cfg.batch_size, seq_len,
              need / (1 << 30), dev, free / (1 << 30))
    if need <= free:
        return
    fits = (free - DEFAULT_BLOCK_BYTES) // (batch_bytes(loaded, 1, seq_len) - DEFAULT_BLOCK_BYTES)
    gib = 1 << 30
    what = f"--batch-size {fits} fits" if fits >= 1 else "even one prompt does not fit: lower --max-new-tokens"
    raise UserError(f"a batch of {cfg.batch_size} x {seq_len} tokens needs ~{need / gib:.2f} GiB but {dev} has "
                    f"{free / gib:.2f} GiB free; {what}")


# ---------------------------------------------------------------- run

def versions() -> dict:
    """Package versions for the manifest, read from metadata: importing nnsight would patch Tensor.backward."""
    from importlib.metadata import version

    return {"entropylens": __version__, "torch": torch.__version__, "transformers": version("transformers"),
            "nnsight": version("nnsight"), "python": platform.python_version()}


class TraceInterrupted(KeyboardInterrupt):
    """Ctrl-C during a trace; carries the run id so the CLI can say how to resume."""

    def __init__(self, run_id: str):
        super().__init__(run_id)
        self.run_id = run_id


@contextlib.contextmanager
def _guarded(run_id: str, run_dir: Path) -> Iterator[None]:
    """Ctrl-C -> TraceInterrupted; a failed write (disk full, permissions) -> a one-line UserError."""
    try:
        yield
    except KeyboardInterrupt:
        raise TraceInterrupted(run_id) from None
    except OSError as e:
        raise UserError(f"cannot write run folder {run_dir}: [Errno {e.errno}] {e.strerror or e}; free space or "
                        f"fix permissions, then `entropylens trace --resume {run_id}`") from None


def _new_writer(cfg: TraceConfig, run_id: str, manifest: dict, resume: bool) -> RunWriter:
    """A RunWriter; a default (timestamped) name taken by a trace started in the same second gets a suffix."""
    folders = cfg.folders()
    if resume or cfg.name is not None:
        return RunWriter(folders, run_id, manifest, resume=resume)
    for n in range(1, 100):
        rid = run_id if n == 1 else f"{run_id[:120]}-{n}"
        try:
            return RunWriter(folders, rid, manifest)
        except UserError:
            if not folders.run_dir(rid).exists():
                raise
    raise UserError(f"99 runs named {run_id}-*: pass --name")


def _open_writer(cfg: TraceConfig, run_id: str, manifest: dict, resume: bool, shard: Shard | None) -> RunWriter:
    """Rank 0 creates (or reopens, checking the prompts) the run folder; the other ranks join it."""
    writer = None
    if shard is None or shard.is_main:
        writer = _new_writer(cfg, run_id, manifest, resume)
        run_id = writer.run_dir.name
        if resume and writer.previous_manifest["prompts"]["sha256"] != manifest["prompts"]["sha256"]:
            raise UserError(f"run {run_id!r} was traced on different prompts; cannot resume it with these")
    if shard is not None:
        shard.barrier()  # rank 0 has created the folder and cleared a killed run's half-written parts
        if writer is None:
            writer = RunWriter.join(cfg.folders(), run_id)
    return writer


def _load(cfg: TraceConfig, console, shard: Shard | None, loaded: LoadedModel | None,
          remote: RemoteModel | None) -> tuple[LoadedModel, RemoteModel | None]:
    """The model (given, loaded here, or NDIF's through `connect`) with its remote handle, if any."""
    if cfg.remote and remote is None:
        with console.status(f"connecting to NDIF for {cfg.model} ..."):
            loaded, remote = connect(cfg.model)
    if loaded is None:
        with console.status(f"loading model {cfg.model} ..."):
            loaded = cfg.load(_rank_device(cfg.device, shard), cfg.device_map)
    return loaded, remote


def config_from_run(cache: str, run_id: str, runs_dir: str | None = None) -> TraceConfig:
    """The config a run was started with, for `--resume` (found under `runs_dir`, default `<cache>/runs`)."""
    manifest = read_manifest(resolve_run(Cache(cache, runs=runs_dir), run_id))
    if manifest.get("kind") != "trace" or "config" not in manifest:
        raise UserError(f"run {run_id!r} is not a resumable trace run")
    stored = {"topk": 0} | manifest["config"]  # a run from before top-K stored none: its resumed batches must match
    return restore(TraceConfig, stored, cache=cache, runs_dir=runs_dir, name=run_id)


def _rank_device(device: str, shard: Shard | None) -> str:
    """Under torchrun each rank of a GPU node takes its own GPU: cuda / auto -> cuda:<local_rank>."""
    if shard is None or device not in ("cuda", "auto") or not torch.cuda.is_available():
        return device
    return f"cuda:{shard.local_rank}"


def _merge_timings(by_rank: list[dict]) -> dict:
    """Work summed over ranks (CPU/GPU seconds); load is the slowest rank's; total is rank 0's wall time."""
    out = {k: round(sum(t[k] for t in by_rank), 3) for k in ("generate_s", "trace_s", "decode_s")}
    return {"load_s": round(max(t["load_s"] for t in by_rank), 3), **out}


def _records(loaded: LoadedModel, cfg: TraceConfig, seqs: Sequences, src: list[int], responses: list[list[int]],
             prompts: list[Prompt], refs: list) -> list[dict]:
    """responses.jsonl rows of one batch, each response scored against its prompt's reference."""
    records = []
    for q, i, p, r, text in zip(seqs.prompt_idx, src, seqs.prompt_ids, responses, seqs.texts):
        response = loaded.tokenizer.decode(r, skip_special_tokens=True)
        reward, correct = score(response, refs[i], cfg.reward) if cfg.generate else (None, None)
        records.append({"prompt_idx": q, "prompt": text, "response": response, "answer": prompts[i].answer,
                        "n_prompt_tokens": len(p), "n_response_tokens": len(r), "source_idx": i,
                        "sample": q % cfg.samples, "reward": reward, "correct": correct})
    return records


def _stored_config(cfg: TraceConfig) -> dict:
    """The manifest's `config`: what `--resume` rebuilds. Not the runs folder: a run may be moved, and is resumed
    from wherever `--runs` finds it."""
    return {k: v for k, v in asdict(cfg).items() if k != "runs_dir"} | {"sites": list(cfg.sites)}


def _manifest(cfg: TraceConfig, engine: Engine, prompts: list[Prompt], refs: list, dropped: list[int],
              shard: Shard | None) -> dict:
    """The run's manifest as the trace starts (docs/storage.md); timings and checks are added at the end.
    The engine says where and how it computes (backend, precision, device, top-K, the decode kernel `auto` chose)."""
    where = engine.manifest()
    return {
        "kind": "trace", "model": engine.loaded.info.to_dict(), "lens": engine.lens_names, "sites": list(cfg.sites),
        "layout": engine.layout.describe(),  # what each site is in this model (model/layout.py)
        "backend": where["backend"], "precision": where["precision"], "device": where["device"],
        "positions": cfg.positions,
        "prompts": {"source": cfg.prompts, "sha256": prompts_sha256(prompts), "n": len(prompts),
                    "limit": cfg.limit, "split": cfg.split},
        "generation": {"generate": cfg.generate, "max_new_tokens": cfg.max_new_tokens,
                       "temperature": cfg.temperature, "top_p": cfg.top_p},
        "seed": cfg.seed, "batch_size": cfg.batch_size, "parent_run": cfg.parent_run,
        "samples": cfg.samples, "n_sequences": len(prompts) * cfg.samples,
        "outcome": {"reward": cfg.reward, "bad_references": cfg.bad_references,
                    "scored_null": [i for i, r in enumerate(refs) if r is None]},
        "shards": {"world_size": shard.world_size if shard else 1, "batch_to_rank": "batch mod world_size"},
        "long_prompts": {"mode": cfg.long_prompts, "truncated": [
            {"prompt_idx": i, "dropped_tokens": n} for i, n in enumerate(dropped) if n]},
        "versions": versions(), "config": _stored_config(cfg), "extra": cfg.extra,
        "topk": where["topk"], "decode_kernel": where["decode_kernel"],
    }


def run_trace(cfg: TraceConfig, resume: bool = False, progress: bool = True, loaded: LoadedModel | None = None,
              shard: Shard | None = None, remote: RemoteModel | None = None) -> Path:
    """Run (or resume) a trace; returns the complete run folder.

    With `shard` (entropylens.tracing.shard, set up by torchrun) this process traces only the batches it owns;
    rank 0 writes the manifest and merges every rank's parts once all are written, so the run folder
    holds exactly the rows of a one-process run. Resume works per shard, with any number of ranks.
    With `cfg.remote` the model runs on NDIF (entropylens.model.remote); `remote` passes a RemoteModel in
    directly (with `loaded`), e.g. one that simulates NDIF locally.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    main = shard is None or shard.is_main
    console = Console(stderr=True, quiet=not progress or not main)
    cfg.validate()
    t_start = time.perf_counter()
    prompts = load_prompts(cfg.prompts, limit=cfg.limit, seed=cfg.seed, split=cfg.split)
    refs = trace_references(prompts, cfg.reward, cfg.bad_references)
    runs = cfg.folders().runs
    try:  # fail before the slow model load, not after it
        runs.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"runs folder {runs} is not writable: {e.strerror or e}") from None
    t0 = time.perf_counter()
    loaded, remote = _load(cfg, console, shard, loaded, remote)
    load_s = time.perf_counter() - t0
    info = loaded.info
    engine = make_engine(cfg, loaded, remote)  # chosen once: this machine or NDIF
    texts, prompt_ids, dropped = encode(loaded, prompts, cfg)
    if remote is None:
        check_memory(loaded, cfg, max(map(len, prompt_ids)) + (cfg.max_new_tokens if cfg.generate else 0))
    run_id = cfg.name if resume else new_run_id(cfg.name, tag=f"{info.family}-{Path(cfg.prompts).stem}")
    if shard is not None:
        run_id = shard.broadcast(run_id)  # a timestamped name must be the same on every rank
    manifest = _manifest(cfg, engine, prompts, refs, dropped, shard)
    writer = _open_writer(cfg, run_id, manifest, resume, shard)
    run_id = writer.run_dir.name
    done = writer.done_batches()
    n = cfg.samples  # sequence q is sample q % n of prompt q // n (with n = 1: the prompt itself)
    batches = [list(range(i, min(i + cfg.batch_size, len(prompts) * n)))
               for i in range(0, len(prompts) * n, cfg.batch_size)]
    sampler = GroupSampler(engine, prompt_ids, n) if n > 1 else None
    log.info("run %s: %d prompts x %d samples = %d sequences in %d batches of <= %d%s", run_id, len(prompts), n,
             len(prompts) * n, len(batches), cfg.batch_size,
             f"; {len(done)} done before, {len(batches) - len(done)} to trace" if resume else "")
    worst_err, n_tok = 0.0, 0
    with _guarded(run_id, writer.run_dir), writer, Progress(
            TextColumn("[bold]trace"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("trace", total=len(batches), completed=len(done), info="")
        for b, idx in enumerate(batches):
            if b in done or (shard is not None and not shard.owns(b)):
                continue
            src = [q // n for q in idx]
            batch_ids = [prompt_ids[i] for i in src]
            responses = (engine.generate(batch_ids, seed=cfg.seed * 1_000_003 + b)
                         if sampler is None else [sampler(q // n, q % n) for q in idx])  # per batch / per prompt
            seqs = Sequences(idx, [texts[i] for i in src], batch_ids, responses, [prompts[i].answer for i in src])
            rows = trace_batch(engine, seqs)
            worst_err, n_tok = max(worst_err, rows.additivity_error), n_tok + len(rows.tokens)
            writer.write_batch(b, rows.tokens, rows.entropy,
                               _records(loaded, cfg, seqs, src, responses, prompts, refs), rows.topk)
            rate = n_tok / max(engine.timings["trace_s"] + engine.timings["decode_s"], 1e-9)
            completed = len(writer.done_batches()) if shard is not None else None  # every rank's batches
            bar.update(task, advance=None if completed else 1, completed=completed,
                       info=f"{n_tok} tokens · {rate:.1f} tok/s decoded" + (" (rank 0)" if shard else ""))
        extra, timings = {}, {"load_s": load_s, **engine.timings}
        if shard is not None:  # every rank has written its parts once this returns
            by_rank = shard.gather({**timings, "worst_err": worst_err})
            worst_err = max(t.pop("worst_err") for t in by_rank)
            timings = _merge_timings(by_rank)
            extra["shards"] = manifest["shards"] | {"timings_by_rank": [
                {k: round(v, 3) for k, v in t.items()} for t in by_rank]}
        if main:
            log.info("run %s: layer decode %s (worst additivity error %.1e); the exactness guard redid %d vectors in "
                     "fp64%s", run_id, "additive" if worst_err < ADDITIVE_TOL and remote is None else "direct",
                     worst_err, engine.redone, " on this rank" if shard is not None else "")
            timings["total_s"] = time.perf_counter() - t_start
            writer.update_manifest(
                timings={k: round(v, 3) for k, v in timings.items()},
                layer_decode="additive" if worst_err < ADDITIVE_TOL and remote is None else "direct",
                additivity_error=None if remote else worst_err, **extra,
            )
            writer.finalize(vocab_size=info.vocab_size, n_layers=info.n_layers)
    if shard is not None:
        shard.barrier()  # the run is complete for every rank
    return writer.run_dir


