"""entropylens as a library: `trace`, `load` and `decode` from Python (docs/api.md).

Why: researchers work in notebooks with a model already in memory. These functions drive the very code the
command line drives — `trace` fills a `TraceConfig` and calls `run_trace`, `decode` calls the decode engine
with its exactness guard — so a run traced here is the run `entropylens trace` writes, and `decode` gives the
numbers a trace would store. nnsight and TransformerLens are imported only when one of their objects is passed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from entropylens.core.decode import DEFAULT_BLOCK_BYTES, DEFAULT_CHUNK, decode_rows
from entropylens.errors import UserError
from entropylens.core.lens import lens_spec, make_lens
from entropylens.core.lse import Stats
from entropylens.model.load import DTYPES, LoadedModel, describe_model, load_model
from entropylens.data.prompts import load_prompts
from entropylens.analysis.run import Run, load
from entropylens.model.layout import find_layout
from entropylens.tracing.job import TraceConfig, config_from_run, run_trace
from entropylens.store.cache import Cache
from entropylens.store.folder import write_text

__all__ = ["trace", "load", "decode", "Decoded", "Run", "as_transformers"]

MODEL_KINDS = "a model spec string ('smollm2', a folder, a .gguf file, a hub id), a transformers model " \
              "(with tokenizer=), an nnsight LanguageModel or a TransformerLens TransformerBridge"
_OPTIONS = [f for f in dataclasses.fields(TraceConfig) if f.name not in ("model", "prompts")]
_SPEC_ONLY = ("device_map", "remote", "trust_remote_code")  # options that only make sense when we load the model


# ---------------------------------------------------------------- models in memory

def _instance_of(obj: Any, module: str, name: str) -> bool:
    """isinstance against an optional library's class without importing it: if the library was never
    imported, no object of it can exist."""
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return isinstance(cls, type) and isinstance(obj, cls)


def _unwrap_bridge(module: torch.nn.Module) -> torch.nn.Module:
    """The plain transformers module tree inside a TransformerBridge.

    `boot_transformers` rewires the HF model in place, each module replaced by a bridge component holding
    the original as `_original_component`. This rebuilds the original tree from shallow copies: parameters
    are shared, nothing is copied, the bridge keeps working.
    """
    inner = getattr(module, "_original_component", None)
    if isinstance(inner, torch.nn.Module):
        return _unwrap_bridge(inner)
    children = {n: _unwrap_bridge(c) for n, c in module._modules.items() if c is not None}
    if all(children[n] is module._modules[n] for n in children):
        return module
    clone = copy.copy(module)
    clone._modules = {**module._modules, **children}
    return clone


def as_transformers(model: Any, tokenizer: Any = None) -> tuple[torch.nn.Module, Any, str]:
    """(transformers model, tokenizer, kind) of an in-memory model of any supported kind; a UserError otherwise."""
    if _instance_of(model, "nnsight", "LanguageModel"):
        if not getattr(model, "dispatched", True):
            model.dispatch()  # a lazily loaded LanguageModel holds meta tensors until dispatched
        return model._module, model.tokenizer if tokenizer is None else tokenizer, "nnsight"
    if _instance_of(model, "transformer_lens.model_bridge", "TransformerBridge"):
        hf = _unwrap_bridge(model.original_model)
        left = sorted({type(m).__name__ for m in hf.modules() if type(m).__module__.startswith("transformer_lens")})
        if left:
            raise UserError(f"cannot recover the transformers model inside this TransformerBridge ({left[0]} "
                            "remains); pass the transformers model itself")
        return hf, model.tokenizer if tokenizer is None else tokenizer, "transformer-lens"
    if _instance_of(model, "transformers", "PreTrainedModel"):
        return model, tokenizer, "transformers"
    raise UserError(f"model must be {MODEL_KINDS}; got a {type(model).__module__}.{type(model).__name__}")


def _fingerprint(model: torch.nn.Module) -> str:
    """Cheap content fingerprint of weights in memory (names, shapes, a strided sample of values)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}".encode())
        if t.device.type != "meta" and t.numel():
            flat = t.detach().reshape(-1)
            h.update(flat[:: max(1, flat.numel() // 4096)].float().cpu().numpy().tobytes())
    return "mem:" + h.hexdigest()[:16]


def _loaded(model: Any, tokenizer: Any, cfg: TraceConfig, given: dict) -> LoadedModel:
    """A LoadedModel for an in-memory model; records its real dtype and device in `cfg`."""
    hf, tok, kind = as_transformers(model, tokenizer)
    if tok is None:
        raise UserError("a transformers model needs its tokenizer: entropylens.trace(model, prompts, tokenizer=tok)")
    spec_only = [k for k in _SPEC_ONLY if k in given and given[k] != TraceConfig.__dataclass_fields__[k].default]
    if spec_only:
        raise UserError(f"{spec_only[0]}= applies when entropylens loads the model from a spec string; "
                        "this model is already loaded")
    param = next(hf.parameters())
    dtype = next((n for n, d in DTYPES.items() if d == param.dtype), str(param.dtype).removeprefix("torch."))
    device = str(param.device)
    asked = {k: str(given[k]) for k in ("dtype", "device") if k in given}
    if asked.get("dtype", dtype) != dtype or asked.get("device", "auto") not in ("auto", device, param.device.type):
        key = "dtype" if asked.get("dtype", dtype) != dtype else "device"
        raise UserError(f"{key}={asked[key]!r}, but the model in memory is on {device} in {dtype}; move it yourself "
                        f"(model.to(...)) or drop {key}=")
    name = getattr(hf.config, "_name_or_path", "") or type(hf).__name__
    cfg.model, cfg.dtype, cfg.device = f"memory:{name}", dtype, device
    info = describe_model(hf, name, f"memory:{kind}", _fingerprint(hf), dtype)
    return LoadedModel(model=hf, tokenizer=tok, info=info)


@contextlib.contextmanager
def _borrowed(loaded: LoadedModel) -> Iterator[None]:
    """Eval mode and a pad token for the trace, the user's settings restored afterwards."""
    model, tok = loaded.model, loaded.tokenizer
    training, pad = model.training, tok.pad_token
    model.eval()
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    try:
        yield
    finally:
        model.train(training)
        if pad is None:
            tok.pad_token = None


# ---------------------------------------------------------------- prompts

def _prompt_source(prompts: Any, folder: Path) -> tuple[str, int | None]:
    """A prompt source string for TraceConfig, and the number of prompts when they were given in memory.

    In-memory prompts are written once to `<cache>/prompts/prompts-<sha>.jsonl` (content-addressed), so the
    manifest names a file that exists, `--resume` works, and the CLI given that file traces the same run."""
    if isinstance(prompts, (str, os.PathLike)):
        return str(prompts), None
    if isinstance(prompts, pd.DataFrame):
        what, n = "the prompt DataFrame", len(prompts)
        text = prompts.to_json(orient="records", lines=True, force_ascii=False) if n else ""
    elif isinstance(prompts, Sequence):
        what, n = "the prompt list", len(prompts)
        rows = [{"prompt": p} if isinstance(p, str) else p for p in prompts]
        bad = next((r for r in rows if not isinstance(r, dict)), None)
        if bad is not None:
            raise UserError(f"{what} holds {type(bad).__name__} items; give strings or dicts like "
                            "{'prompt': ..., 'answer': ...}")
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        raise UserError(f"prompts must be a built-in set name, a file path, a list of strings or a DataFrame; "
                        f"got a {type(prompts).__name__}")
    if n == 0:
        raise UserError(f"{what} is empty; give at least one prompt")
    path = Cache.of(folder).prompts / f"prompts-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, text)
    try:
        load_prompts(str(path))  # the CLI's checks, with messages that name the user's object, not our file
    except UserError as e:
        raise UserError(str(e).replace(str(path), what)) from None
    return str(path), n


# ---------------------------------------------------------------- trace

def _config(options: dict) -> TraceConfig:
    """TraceConfig from keyword options named as on the command line (sites may be 'a,b'; limit may be 'all')."""
    known = {f.name for f in _OPTIONS}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"unknown option {unknown[0]!r} for entropylens.trace; options: "
                        f"{', '.join(sorted(known))}")
    opts = dict(options)
    if isinstance(opts.get("sites"), str):
        opts["sites"] = tuple(s.strip() for s in opts["sites"].split(",") if s.strip())
    elif "sites" in opts:
        opts["sites"] = tuple(opts["sites"])
    if opts.get("limit") == "all":
        opts["limit"] = None
    cfg = TraceConfig(**opts)
    cfg.validate()
    return cfg


def trace(model: Any = "smollm2", prompts: Any = "arith", *, tokenizer: Any = None, save: bool = True,
          quiet: bool = False, resume: str | None = None, **options: Any) -> Run:
    """Trace a model's internal-policy entropies over prompts, as `entropylens trace` does; returns the Run.

    model: a spec string as the CLI takes (loaded by entropylens), or a model already in memory — a
    transformers model with `tokenizer=`, an nnsight LanguageModel or a TransformerLens TransformerBridge (the
    transformers model inside is traced, in its own dtype and on its own device; it is left as it was found).
    prompts: a built-in set name or a prompt file (as --prompts), a list of strings (or of dicts with the file
    columns: prompt, answer, ...) or a DataFrame with those columns. Prompts given in memory are written to
    `<cache>/prompts/prompts-<sha>.jsonl`, the source the manifest records. `limit` keeps its CLI default of
    8 for them too (a warning says when that drops prompts; pass limit=None for all).
    options: every `entropylens trace` option under the same name and default (TraceConfig's fields, e.g.
    max_new_tokens=32, lens="bupo", sites="attn_in,attn,ffn_in,ffn,layer", backend="nnsight", seed=0,
    cache="cache"; `--runs` is runs_dir=, default None: `<cache>/runs`).
    save=True writes `<runs_dir>/<run_id>/` exactly as the CLI does (same files, same bytes for the same inputs),
    so `entropylens runs` and the dashboard see it. save=False traces into a temporary cache folder,
    reads every file into the returned Run and deletes the folder: nothing stays on disk (a model spec is still
    loaded through, and cached in, `cache`), so keep such runs small.
    resume: finish an interrupted run with its stored settings (as --resume); pass the model again when it
    was traced from memory.
    """
    given = dict(options)
    if resume is not None:
        return _resume(resume, model, tokenizer, quiet, given)
    if isinstance(model, str) and tokenizer is not None:
        raise UserError("tokenizer= goes with a model in memory; a model spec loads its own tokenizer")
    cfg = _config(given)
    models_cache = Path(cfg.cache)
    with contextlib.ExitStack() as stack:
        if not save:
            tmp = Path(tempfile.mkdtemp(prefix="entropylens-"))
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
            cfg.cache, cfg.runs_dir = str(tmp), None
        loaded, load_s = None, None
        if not isinstance(model, str):
            loaded = _loaded(model, tokenizer, cfg, given)
            stack.enter_context(_borrowed(loaded))
        else:
            cfg.model = model
            if not save and not cfg.remote:  # load here, so the weights cache stays in `cache`, not the temp folder
                t0 = time.perf_counter()
                loaded = load_model(model, cfg.dtype, cfg.device, models_cache, cfg.trust_remote_code, cfg.device_map)
                load_s = time.perf_counter() - t0
        cfg.prompts, n = _prompt_source(prompts, Path(cfg.cache))
        if n is not None and cfg.limit is not None and n > cfg.limit and "limit" not in given:
            warnings.warn(f"tracing the first {cfg.limit} of {n} prompts (limit={cfg.limit}, the CLI's default); "
                          "pass limit=None for all", UserWarning, stacklevel=2)
        run_dir = run_trace(cfg, progress=not quiet, loaded=loaded)
        if save:
            return Run(run_dir)
        run = Run.read_into_memory(run_dir)
        if load_s is not None:
            run.manifest["timings"]["load_s"] = round(load_s, 3)
        return run


def _resume(run_id: str, model: Any, tokenizer: Any, quiet: bool, given: dict) -> Run:
    extra = sorted(set(given) - {"cache", "runs_dir"})
    if extra:
        raise UserError(f"resume= finishes a run with its stored settings; drop {extra[0]}=")
    cfg = config_from_run(given.get("cache", TraceConfig.cache), run_id, given.get("runs_dir"))
    loaded = None
    if not isinstance(model, str):
        loaded = _loaded(model, tokenizer, cfg, {})
    elif cfg.model.startswith("memory:"):
        raise UserError(f"run {run_id!r} was traced from a model in memory; pass it again: "
                        f"entropylens.trace(model, tokenizer=..., resume={run_id!r})")
    with _borrowed(loaded) if loaded else contextlib.nullcontext():
        return Run(run_trace(cfg, resume=True, progress=not quiet, loaded=loaded))


def _signature() -> inspect.Signature:
    """trace's signature with every TraceConfig option spelled out, so help() and notebooks show them all."""
    kw = inspect.Parameter.KEYWORD_ONLY
    head = [p for p in inspect.signature(trace).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    opts = [inspect.Parameter(f.name, kw, default=f.default if f.default is not dataclasses.MISSING
                              else f.default_factory(), annotation=f.type) for f in _OPTIONS]
    return inspect.Signature(head[:2] + opts + head[2:], return_annotation="Run")


trace.__signature__ = _signature()


# ---------------------------------------------------------------- decode

@dataclass
class Decoded:
    """What `decode` returns; every tensor is shaped like `hidden.shape[:-1]`, on the unembedding's device."""

    entropy: torch.Tensor  # float64, nats
    top1: torch.Tensor  # int64 token id of the most probable token
    p1: torch.Tensor  # float64 probability of top1
    logprob_target: torch.Tensor | None  # float64 log p(target), NaN where the target is -1; None without targets
    lens: str
    redone: int  # vectors the exactness guard recomputed in fp64 (fp32 error bound beyond decode.GUARD_NATS)
    topk_ids: torch.Tensor | None = None  # (..., K) int64 the K most probable ids, best first (ties: lowest id)
    topk_p: torch.Tensor | None = None  # (..., K) float64 their probabilities; None unless topk=K was asked


class _BareHead(torch.nn.Module):
    """A bare (V, d) unembedding dressed as a model head, so the lens registry builds from it like from a model."""

    def __init__(self, W: torch.Tensor):
        super().__init__()
        if W.dim() != 2:
            raise UserError(f"an unembedding matrix is (V, d); got shape {tuple(W.shape)}")
        self.head = torch.nn.Linear(W.shape[1], W.shape[0], bias=False, device="meta")
        self.head.weight = torch.nn.Parameter(W.detach(), requires_grad=False)
        self.config = object()  # no soft-cap

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head


def decode(hidden: torch.Tensor, model_or_unembedding: Any, lens: str = "bupo",
           targets: torch.Tensor | None = None, topk: int = 0) -> Decoded:
    """Exact entropy, top-1 token and its probability (and log p of `targets`) of any hidden states (..., d).

    Why: activations you captured yourself get the numbers a trace stores — the same vocabulary-streamed
    engine (never a (rows, V) tensor, memory independent of V) and the same fp64 guard for rows whose fp32
    rounding could matter, within 1e-4 nats of fp64 at any |z| (a plain fp32 softmax drifts with |z|: 2.4e-4
    nats at 3e4).
    model_or_unembedding: a model of any kind `trace` takes (its unembedding, head bias, soft-cap and, for
    lens "logit", final norm are used) or a bare (V, d) unembedding matrix (lens "bupo" only).
    targets: token ids shaped like hidden.shape[:-1] (-1 = none) for `logprob_target`.
    topk: K >= 1 adds `topk_ids` / `topk_p` (..., K), the numbers `trace --topk K` stores.
    """
    lens_spec(lens)
    if isinstance(model_or_unembedding, (str, os.PathLike)):
        raise UserError("decode needs the model object or its (V, d) unembedding, not a spec: load it first "
                        "(transformers, nnsight, or entropylens.model.load.load_model)")
    if isinstance(model_or_unembedding, torch.Tensor):
        ln = make_lens(lens, _BareHead(model_or_unembedding))
    else:
        hf, _, _ = as_transformers(model_or_unembedding)
        ln = make_lens(lens, hf, find_layout(hf).final_norm(hf))
    if not isinstance(topk, int) or not 0 <= topk <= 100:
        raise UserError(f"topk must be an int between 0 and 100, got {topk!r}")
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise UserError(f"hidden states must be a tensor (..., d); got {type(hidden).__name__}")
    V, d = ln.W.shape
    if hidden.shape[-1] != d:
        raise UserError(f"hidden size {hidden.shape[-1]} does not match the unembedding's d = {d} "
                        f"(hidden states are (..., d); got shape {tuple(hidden.shape)})")
    shape, dev = hidden.shape[:-1], ln.W.device
    x = hidden.detach().reshape(-1, d).to(dev)
    t = None
    if targets is not None:
        t = torch.as_tensor(targets, device=dev)
        if t.shape != shape or t.is_floating_point():
            raise UserError(f"targets must be integer token ids shaped like hidden.shape[:-1] = {tuple(shape)}; "
                            f"got {t.dtype} {tuple(t.shape)}")
        t = t.reshape(-1).long()
        if len(t) and (t.min() < -1 or t.max() >= V):
            raise UserError(f"targets must be token ids in [0, {V}) or -1 for none")
    block = max(1, DEFAULT_BLOCK_BYTES // (2 * DEFAULT_CHUNK * 4))  # rows per pass: buffers stay ~16 MiB
    parts = [decode_rows(x[i : i + block], ln, None if t is None else t[i : i + block], topk=topk)
             for i in range(0, x.shape[0], block)]
    if not parts:  # no vectors at all
        empty = torch.empty(shape, dtype=torch.float64, device=dev)
        ek = (torch.empty(*shape, topk, dtype=torch.long, device=dev),
              torch.empty(*shape, topk, dtype=torch.float64, device=dev)) if topk else (None, None)
        return Decoded(empty, empty.long(), empty.clone(), None if t is None else empty.clone(), lens, 0, *ek)
    cat = Stats(*(torch.cat([getattr(p, k) for p in parts]) for k in ("entropy", "top1", "p1")),
                None if t is None else torch.cat([p.logp_target for p in parts]),
                topk_ids=torch.cat([p.topk_ids for p in parts]) if topk else None,
                topk_p=torch.cat([p.topk_p for p in parts]) if topk else None)
    res = cat.reshape(*shape)
    return Decoded(res.entropy, res.top1, res.p1, res.logp_target, lens, sum(p.redone for p in parts),
                   res.topk_ids, res.topk_p)
