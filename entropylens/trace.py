"""`entropylens trace`: prompts -> (seeded generation) -> one traced forward per batch -> decode -> Parquet.

Rows follow docs/storage.md. Position t's distribution predicts token t+1, so a row's `role` is the role
of the token it predicts: the paper's averages over response tokens use the policies that produced them.
"""

from __future__ import annotations

import contextlib
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch

from entropylens import __version__
from entropylens.backends import BACKENDS, make_backend
from entropylens.decode import DEFAULT_BLOCK_BYTES, Stats, decode_layers, decode_rows
from entropylens.dist import Shard
from entropylens.errors import UserError
from entropylens.lens import make_lens
from entropylens.models import LoadedModel, load_model
from entropylens.remote import RemoteModel, connect
from entropylens.prompts import Prompt, load_prompts, prompts_sha256, render
from entropylens.sites import SITES, Activations, additivity_error, find_layout
from entropylens.store import RunWriter, new_run_id, read_manifest, resolve_run

ADDITIVE_TOL = 1e-5  # relative; fp32 residual streams measure ~1e-7
POSITIONS = ("all", "response")
LONG_PROMPTS = ("reject", "truncate")


@dataclass
class TraceConfig:
    """Everything that defines a trace run; stored in the manifest so `--resume` can rebuild it."""

    model: str = "smollm2"  # `smollm2` (embedded), a local folder, a .gguf file or a hub id
    prompts: str = "arith"  # built-in set name or a prompt file (.jsonl/.parquet/.csv/.txt)
    limit: int | None = 8  # first N prompts; None = all
    generate: bool = True  # sample a response per prompt before tracing
    max_new_tokens: int = 32  # response length cap
    temperature: float = 1.0  # sampling temperature (0 = greedy)
    top_p: float = 1.0  # nucleus sampling
    lens: str = "bupo"  # bupo | logit | both
    sites: tuple[str, ...] = SITES  # which of attn_in, attn, ffn_in, ffn, layer to decode
    positions: str = "all"  # all | response: decode every position or only those predicting response tokens
    backend: str = "nnsight"  # nnsight | transformer-lens
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    device_map: str | None = None  # accelerate placement over several devices: auto | balanced | sequential | x.json
    remote: bool = False  # run the model on NDIF (nnsight); entropies are reduced there, only statistics return
    dtype: str = "float32"  # model weights/activations dtype
    batch_size: int = 4  # prompts per traced forward
    name: str | None = None  # run folder name (default: timestamp + model + prompts)
    seed: int = 0  # prompt shuffling (built-ins) and sampling
    cache: str = "cache"  # root folder holding runs/ and models/
    enable_thinking: bool = False  # Qwen3 chat templates: thinking mode
    trust_remote_code: bool = False  # only when asked
    compile: bool = False  # fused torch.compile decode kernel: ~1.4x faster decode, ~20-50 s one-off compile
    parent_run: str | None = None  # link to a parent run (BuPO before/after)
    split: str = "all"  # all | train | test (built-in sets)
    long_prompts: str = "reject"  # reject | truncate: prompts beyond the context (truncate keeps the last tokens)
    extra: dict = field(default_factory=dict)  # free-form provenance recorded in the manifest

    def lenses(self) -> list[str]:
        return ["bupo", "logit"] if self.lens == "both" else [self.lens]

    def validate(self) -> None:
        if self.lens not in ("bupo", "logit", "both"):
            raise UserError(f"unknown --lens {self.lens!r}; choose bupo, logit or both")
        bad = [s for s in self.sites if s not in SITES]
        if bad or not self.sites:
            raise UserError(f"unknown site {bad[0] if bad else '(none)'}; choose from {', '.join(SITES)}")
        if self.backend not in BACKENDS:
            raise UserError(f"unknown --backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.positions not in POSITIONS:
            raise UserError(f"unknown --positions {self.positions!r}; choose all or response")
        if self.long_prompts not in LONG_PROMPTS:
            raise UserError(f"unknown --long-prompts {self.long_prompts!r}; choose reject or truncate")
        for name in ("max_new_tokens",):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "limit"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UserError("--temperature must be >= 0 and --top-p in (0, 1]")
        if self.remote and (self.backend != "nnsight" or self.device_map):
            raise UserError("--remote runs through nnsight on NDIF's machines: drop --backend/--device-map")
        if self.positions == "response" and not self.generate:
            raise UserError("--positions response needs --generate (there is no response to decode)")


# ---------------------------------------------------------------- batches

@dataclass
class Sequences:
    """One batch of prompt + response token ids (unpadded)."""

    prompt_idx: list[int]
    texts: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    answers: list[str | None]


def stop_ids(loaded: LoadedModel) -> set[int]:
    ids = {loaded.tokenizer.eos_token_id}
    gen = getattr(loaded.model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return {i for i in ids if i is not None}


@torch.no_grad()
def generate(loaded: LoadedModel, prompt_ids: list[list[int]], cfg: TraceConfig, seed: int,
             remote: RemoteModel | None = None) -> list[list[int]]:
    """Seeded sampling with a KV cache, left-padded; each response is cut after its first stop token."""
    if not cfg.generate or cfg.max_new_tokens == 0:
        return [[] for _ in prompt_ids]
    tok, model = loaded.tokenizer, loaded.model
    dev = "cpu" if remote else loaded.device
    T = max(map(len, prompt_ids))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompt_ids], device=dev)
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompt_ids], device=dev)
    sample = cfg.temperature > 0
    kw = dict(max_new_tokens=cfg.max_new_tokens, do_sample=sample, temperature=cfg.temperature if sample else None,
              top_p=cfg.top_p if sample else None, top_k=None, pad_token_id=pad, use_cache=True)
    if remote is not None:
        out = remote.generate(ids, mask, seed, **kw)
    else:
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    stops, responses = stop_ids(loaded), []
    for row in out[:, T:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        responses.append(row[:cut])
    return responses


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
    dev = loaded.device
    need, free = batch_bytes(loaded, cfg.batch_size, seq_len), available_bytes(dev)
    if need <= free:
        return
    fits = (free - DEFAULT_BLOCK_BYTES) // (batch_bytes(loaded, 1, seq_len) - DEFAULT_BLOCK_BYTES)
    gib = 1 << 30
    what = f"--batch-size {fits} fits" if fits >= 1 else "even one prompt does not fit: lower --max-new-tokens"
    raise UserError(f"a batch of {cfg.batch_size} x {seq_len} tokens needs ~{need / gib:.2f} GiB but {dev} has "
                    f"{free / gib:.2f} GiB free; {what}")


def roles_for(n_prompt: int, n_total: int) -> list[str]:
    """Role of the token each position predicts: prompt, response, or `next` (beyond the sequence)."""
    return ["prompt" if t + 1 < n_prompt else "response" if t + 1 < n_total else "next" for t in range(n_total)]


# ---------------------------------------------------------------- rows

def entropy_frame(lens: str, prompt_idx: np.ndarray, position: np.ndarray, roles: np.ndarray,
                  stats: dict[str, Stats], n_layers: int) -> pd.DataFrame:
    """Stats (L, N) per site (layer: (L+1, N)) -> rows (lens, prompt, position, layer) per docs/storage.md."""
    L1, N = n_layers + 1, len(position)
    cols: dict[str, np.ndarray] = {
        "lens": np.full(L1 * N, lens),
        "prompt_idx": np.tile(prompt_idx, L1),
        "position": np.tile(position, L1),
        "layer": np.repeat(np.arange(L1, dtype=np.int16), N),
        "role": np.tile(roles, L1),
    }
    H = {}
    for site in SITES:
        h = np.full((L1, N), np.nan)
        top = np.full((L1, N), -1, dtype=np.int64)
        p1 = np.full((L1, N), np.nan)
        if site in stats:
            st = stats[site]
            sl = slice(0, L1) if site == "layer" else slice(1, L1)
            h[sl], top[sl], p1[sl] = st.entropy.numpy(), st.top1.numpy(), st.p1.numpy()
        H[site] = h
        cols[f"H_{site}"], cols[f"top1_{site}"], cols[f"p1_{site}"] = h.ravel(), top.ravel(), p1.ravel()
    cols["dH_attn"] = (H["attn"] - H["attn_in"]).ravel()
    cols["dH_ffn"] = (H["ffn"] - H["ffn_in"]).ravel()
    dl = np.full((L1, N), np.nan)
    dl[1:] = H["layer"][1:] - H["layer"][:-1]
    cols["dH_layer"] = dl.ravel()
    return pd.DataFrame(cols)


def _decode_local(loaded: LoadedModel, backend, layout, lenses, cfg: TraceConfig, ids: torch.Tensor,
                  bi: torch.Tensor, ti: torch.Tensor, tgt: torch.Tensor, keep: np.ndarray,
                  timings: dict) -> tuple[Stats, dict[str, dict[str, Stats]], float]:
    """Capture every site in one forward, then the streaming decode engine on the packed rows."""
    t0 = time.perf_counter()
    acts = backend.capture(ids)
    timings["trace_s"] += time.perf_counter() - t0
    dev = lenses[0][1].W.device  # decode where W_U lives (under a device map, sites come from several devices)
    acts = Activations(acts.h0.to(dev), {s: [x.to(dev) for x in xs] for s, xs in acts.sites.items()},
                       acts.final_normed.to(dev))
    err = additivity_error(acts)
    t0 = time.perf_counter()
    bi, ti, tgt = bi.to(dev), ti.to(dev), tgt.to(dev)
    final = decode_rows(acts.final_normed[bi, ti], make_lens("bupo", loaded.model, layout.final_norm(loaded.model)),
                        targets=tgt.clamp_min(0))
    kb, kt = bi[keep], ti[keep]
    h0 = acts.h0[kb, kt]  # (N, d): packed, no padding decoded
    site_acts = {s: torch.stack([x[kb, kt] for x in xs]) for s, xs in acts.sites.items()}  # (L, N, d)
    per_lens = {}
    for name, lens in lenses:
        stats = decode_layers(h0, site_acts, tuple(cfg.sites), lens, additive=err < ADDITIVE_TOL,
                              compile=cfg.compile)
        per_lens[name] = {s: st.to_cpu() for s, st in stats.items()}
    timings["decode_s"] += time.perf_counter() - t0
    return final.to_cpu(), per_lens, err


def _decode_remote(remote: RemoteModel, cfg: TraceConfig, ids: torch.Tensor, bi: torch.Tensor, ti: torch.Tensor,
                   tgt: torch.Tensor, keep: np.ndarray, timings: dict) -> tuple[Stats, dict, float]:
    """One remote forward that returns per-token statistics of every (B, T) position; keep the rows asked for."""
    t0 = time.perf_counter()
    targets = torch.full(ids.shape, -1, dtype=torch.long)
    targets[bi, ti] = tgt
    final, per_lens = remote.decode(ids, targets, cfg.lenses(), tuple(cfg.sites))
    timings["trace_s"] += time.perf_counter() - t0

    def rows(st: Stats, b, t) -> Stats:
        lt = None if st.logp_target is None else st.logp_target[..., b, t]
        return Stats(st.entropy[..., b, t], st.top1[..., b, t], st.p1[..., b, t], lt)

    kb, kt = bi[keep], ti[keep]
    return rows(final, bi, ti), {n: {s: rows(st, kb, kt) for s, st in d.items()} for n, d in per_lens.items()}, 0.0


def trace_batch(loaded: LoadedModel, backend, layout, lenses, seqs: Sequences, cfg: TraceConfig,
                timings: dict, remote: RemoteModel | None = None) -> tuple[pd.DataFrame, pd.DataFrame, float]:
    """One traced forward + decode for a batch -> (tokens rows, entropy rows, additivity error)."""
    tok = loaded.tokenizer
    full = [p + r for p, r in zip(seqs.prompt_ids, seqs.response_ids)]
    T = max(map(len, full))
    # Right padding: causal attention keeps real positions blind to the pads after them.
    ids = torch.tensor([s + [tok.pad_token_id] * (T - len(s)) for s in full],
                       device="cpu" if remote else loaded.device)
    b_idx, t_idx, roles, targets, pidx = [], [], [], [], []
    for b, (p, s) in enumerate(zip(seqs.prompt_ids, full)):
        b_idx += [b] * len(s)
        t_idx += list(range(len(s)))
        roles += roles_for(len(p), len(s))
        targets += s[1:] + [-1]
        pidx += [seqs.prompt_idx[b]] * len(s)
    bi, ti, tgt = torch.tensor(b_idx), torch.tensor(t_idx), torch.tensor(targets)
    keep = np.arange(len(roles)) if cfg.positions == "all" else np.flatnonzero(np.array(roles) == "response")
    if remote is None:
        final, per_lens, err = _decode_local(loaded, backend, layout, lenses, cfg, ids, bi, ti, tgt, keep, timings)
    else:
        final, per_lens, err = _decode_remote(remote, cfg, ids, bi, ti, tgt, keep, timings)
    ids_flat = [s[t] for s, t in zip((full[b] for b in b_idx), t_idx)]
    tokens = pd.DataFrame({
        "prompt_idx": pidx, "position": t_idx, "token_id": ids_flat,
        "token_text": tok.batch_decode([[i] for i in ids_flat]), "role": roles, "target_id": targets,
        "H_final": final.entropy.numpy(),
        "logprob_target": np.where(tgt.numpy() >= 0, final.logp_target.numpy(), np.nan),
    })
    frames = [entropy_frame(name, np.array(pidx)[keep], np.array(t_idx)[keep], np.array(roles)[keep],
                            per_lens[name], layout.n_layers) for name in cfg.lenses()]
    return tokens, pd.concat(frames, ignore_index=True), err


# ---------------------------------------------------------------- run

def versions() -> dict:
    import nnsight
    import transformers

    return {"entropylens": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "nnsight": nnsight.__version__, "python": platform.python_version()}


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


def _open_writer(cfg: TraceConfig, run_id: str, manifest: dict, resume: bool) -> RunWriter:
    """A RunWriter; a default (timestamped) name taken by a trace started in the same second gets a suffix."""
    if resume or cfg.name is not None:
        return RunWriter(cfg.cache, run_id, manifest, resume=resume)
    for n in range(1, 100):
        rid = run_id if n == 1 else f"{run_id[:120]}-{n}"
        try:
            return RunWriter(cfg.cache, rid, manifest)
        except UserError:
            if not Path(cfg.cache, "runs", rid).exists():
                raise
    raise UserError(f"99 runs named {run_id}-*: pass --name")


def config_from_run(cache: str, run_id: str) -> TraceConfig:
    """The config a run was started with, for `--resume`."""
    manifest = read_manifest(resolve_run(cache, run_id))
    if manifest.get("kind") != "trace" or "config" not in manifest:
        raise UserError(f"run {run_id!r} is not a resumable trace run")
    stored = dict(manifest["config"])
    stored["sites"] = tuple(stored["sites"])
    stored.update(cache=cache, name=run_id)
    return TraceConfig(**stored)


def _rank_device(device: str, shard: Shard | None) -> str:
    """Under torchrun each rank of a GPU node takes its own GPU: cuda / auto -> cuda:<local_rank>."""
    if shard is None or device not in ("cuda", "auto") or not torch.cuda.is_available():
        return device
    return f"cuda:{shard.local_rank}"


def _merge_timings(by_rank: list[dict]) -> dict:
    """Work summed over ranks (CPU/GPU seconds); load is the slowest rank's; total is rank 0's wall time."""
    out = {k: round(sum(t[k] for t in by_rank), 3) for k in ("generate_s", "trace_s", "decode_s")}
    return {"load_s": round(max(t["load_s"] for t in by_rank), 3), **out}


def run_trace(cfg: TraceConfig, resume: bool = False, progress: bool = True, loaded: LoadedModel | None = None,
              shard: Shard | None = None, remote: RemoteModel | None = None) -> Path:
    """Run (or resume) a trace; returns the complete run folder.

    With `shard` (entropylens.dist, set up by torchrun) this process traces only the batches it owns;
    rank 0 writes the manifest and merges every rank's parts once all are written, so the run folder
    holds exactly the rows of a one-process run. Resume works per shard, with any number of ranks.
    With `cfg.remote` the model runs on NDIF (entropylens.remote); `remote` passes a RemoteModel in
    directly (with `loaded`), e.g. one that simulates NDIF locally.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    main = shard is None or shard.is_main
    console = Console(stderr=True, quiet=not progress or not main)
    cfg.validate()
    t_start = time.perf_counter()
    prompts = load_prompts(cfg.prompts, limit=cfg.limit, seed=cfg.seed, split=cfg.split)
    try:  # fail before the slow model load, not after it
        Path(cfg.cache, "runs").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cache folder {cfg.cache} is not writable: {e.strerror or e}") from None
    timings = {"load_s": 0.0, "generate_s": 0.0, "trace_s": 0.0, "decode_s": 0.0}
    t0 = time.perf_counter()
    if cfg.remote and remote is None:
        with console.status(f"connecting to NDIF for {cfg.model} ..."):
            loaded, remote = connect(cfg.model)
    if loaded is None:
        with console.status(f"loading model {cfg.model} ..."):
            loaded = load_model(cfg.model, cfg.dtype, _rank_device(cfg.device, shard), Path(cfg.cache),
                                cfg.trust_remote_code, cfg.device_map)
    timings["load_s"] = time.perf_counter() - t0
    info = loaded.info
    layout = find_layout(loaded.model)
    backend, lenses = None, []  # remotely, the serving side holds the weights and builds the lenses
    if remote is None:
        backend = make_backend(cfg.backend, loaded.model, loaded.tokenizer, layout)
        lenses = [(name, make_lens(name, loaded.model, layout.final_norm(loaded.model))) for name in cfg.lenses()]
    texts, prompt_ids, dropped = encode(loaded, prompts, cfg)
    if remote is None:
        check_memory(loaded, cfg, max(map(len, prompt_ids)) + (cfg.max_new_tokens if cfg.generate else 0))
    run_id = cfg.name if resume else new_run_id(cfg.name, tag=f"{info.family}-{Path(cfg.prompts).stem}")
    if shard is not None:
        run_id = shard.broadcast(run_id)  # a timestamped name must be the same on every rank
    manifest = {
        "kind": "trace", "model": info.to_dict(), "lens": cfg.lenses(), "sites": list(cfg.sites),
        "backend": f"nnsight-remote ({remote.mode})" if remote else cfg.backend,
        "precision": "exact (fp64 on the serving side)" if remote else "exact",
        "device": "remote" if remote else str(getattr(loaded.model, "hf_device_map", None) or loaded.device),
        "positions": cfg.positions,
        "prompts": {"source": cfg.prompts, "sha256": prompts_sha256(prompts), "n": len(prompts),
                    "limit": cfg.limit, "split": cfg.split},
        "generation": {"generate": cfg.generate, "max_new_tokens": cfg.max_new_tokens,
                       "temperature": cfg.temperature, "top_p": cfg.top_p},
        "seed": cfg.seed, "batch_size": cfg.batch_size, "parent_run": cfg.parent_run,
        "shards": {"world_size": shard.world_size if shard else 1, "batch_to_rank": "batch mod world_size"},
        "long_prompts": {"mode": cfg.long_prompts, "truncated": [
            {"prompt_idx": i, "dropped_tokens": n} for i, n in enumerate(dropped) if n]},
        "versions": versions(), "config": asdict(cfg) | {"sites": list(cfg.sites)}, "extra": cfg.extra,
    }
    if main:
        writer = _open_writer(cfg, run_id, manifest, resume)
        run_id = writer.run_dir.name
        if resume and writer.previous_manifest["prompts"]["sha256"] != manifest["prompts"]["sha256"]:
            raise UserError(f"run {run_id!r} was traced on different prompts; cannot resume it with these")
    if shard is not None:
        shard.barrier()  # rank 0 has created the folder and cleared a killed run's half-written parts
        if not main:
            writer = RunWriter.join(cfg.cache, run_id)
    done = writer.done_batches()
    batches = [list(range(i, min(i + cfg.batch_size, len(prompts)))) for i in range(0, len(prompts), cfg.batch_size)]
    worst_err, n_tok = 0.0, 0
    with _guarded(run_id, writer.run_dir), writer, Progress(
            TextColumn("[bold]trace"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("trace", total=len(batches), completed=len(done), info="")
        for b, idx in enumerate(batches):
            if b in done or (shard is not None and not shard.owns(b)):
                continue
            t0 = time.perf_counter()
            batch_ids = [prompt_ids[i] for i in idx]
            responses = generate(loaded, batch_ids, cfg, seed=cfg.seed * 1_000_003 + b, remote=remote)
            timings["generate_s"] += time.perf_counter() - t0
            seqs = Sequences(idx, [texts[i] for i in idx], batch_ids, responses, [prompts[i].answer for i in idx])
            tokens, entropy, err = trace_batch(loaded, backend, layout, lenses, seqs, cfg, timings, remote)
            worst_err, n_tok = max(worst_err, err), n_tok + len(tokens)
            writer.write_batch(b, tokens, entropy, [
                {"prompt_idx": i, "prompt": t, "response": loaded.tokenizer.decode(r, skip_special_tokens=True),
                 "answer": a, "n_prompt_tokens": len(p), "n_response_tokens": len(r)}
                for i, t, p, r, a in zip(idx, seqs.texts, batch_ids, responses, seqs.answers)
            ])
            rate = n_tok / max(timings["trace_s"] + timings["decode_s"], 1e-9)
            completed = len(writer.done_batches()) if shard is not None else None  # every rank's batches
            bar.update(task, advance=None if completed else 1, completed=completed,
                       info=f"{n_tok} tokens · {rate:.1f} tok/s decoded" + (" (rank 0)" if shard else ""))
        extra = {}
        if shard is not None:  # every rank has written its parts once this returns
            by_rank = shard.gather({**timings, "worst_err": worst_err})
            worst_err = max(t.pop("worst_err") for t in by_rank)
            timings = _merge_timings(by_rank)
            extra["shards"] = manifest["shards"] | {"timings_by_rank": [
                {k: round(v, 3) for k, v in t.items()} for t in by_rank]}
        if main:
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
