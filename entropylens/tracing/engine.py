"""Where a trace's model runs: on this machine (`LocalEngine`) or on NDIF (`RemoteEngine`).

The job chooses one engine, once (`make_engine`); a batch only asks it to sample responses and to turn padded
token ids into per-token statistics. Everything an engine needs is built when it is made — the backend, the
site layout, every lens of the run and the head lens of the model's own output, the decode kernel — and each
engine adds up its own timings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from entropylens.core.decode import Stats, decode_layers, decode_rows, exact_matmul, resolve_kernel
from entropylens.core.lens import make_lens
from entropylens.model.backends import make_backend
from entropylens.model.generation import eos_ids
from entropylens.model.layout import Activations, additivity_error, find_layout
from entropylens.model.load import LoadedModel
from entropylens.model.remote import RemoteModel
from entropylens.tracing.config import TraceConfig

ADDITIVE_TOL = 1e-5  # relative; fp32 residual streams measure ~1e-7

log = logging.getLogger(__name__)


@dataclass
class Decoded:
    """One batch decoded: the output policy per position, every lens's sites per kept row, H^l additivity."""

    final: Stats  # (N,) every position, with log p(next token)
    per_lens: dict[str, dict[str, Stats]]  # lens -> site -> (L or L + 1, n kept rows)
    additivity_error: float  # relative |H^l - (H^{l-1} + A^l + F^l)|; 0 when not measured (remote)


class Engine:
    """What the job and a batch need of a model, wherever it runs."""

    topk: int  # top-K lists kept per (lens, site, layer, position); 0 = none

    def __init__(self, loaded: LoadedModel, cfg: TraceConfig):
        self.loaded, self.cfg = loaded, cfg
        self.layout = find_layout(loaded.model)
        self.lens_names = cfg.lenses()
        self.timings = {"generate_s": 0.0, "trace_s": 0.0, "decode_s": 0.0}
        self.redone = 0  # vectors the exactness guard recomputed in fp64, over the run so far
        log.info("layout %s: %s", self.layout.kind,
                 ", ".join(f"{site}={name}" for site, name in self.layout.site_names.items()))

    @property
    def input_device(self) -> torch.device | str:
        return self.loaded.device

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], seed: int) -> list[list[int]]:
        """Seeded sampling with a KV cache, left-padded; each response is cut after its first stop token."""
        cfg = self.cfg
        if not cfg.generate or cfg.max_new_tokens == 0:
            return [[] for _ in prompt_ids]
        t0 = time.perf_counter()
        pad = self.loaded.tokenizer.pad_token_id
        T = max(map(len, prompt_ids))
        ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompt_ids], device=self.input_device)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompt_ids], device=self.input_device)
        sample = cfg.temperature > 0
        kw = dict(max_new_tokens=cfg.max_new_tokens, do_sample=sample, temperature=cfg.temperature if sample else None,
                  top_p=cfg.top_p if sample else None, top_k=None, pad_token_id=pad, use_cache=True)
        out = self._sample(ids, mask, seed, kw)
        stops, responses = set(eos_ids(self.loaded.model, self.loaded.tokenizer)), []
        for row in out[:, T:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            responses.append(row[:cut])
        self.timings["generate_s"] += time.perf_counter() - t0
        return responses

    def _sample(self, ids: torch.Tensor, mask: torch.Tensor, seed: int, kw: dict) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, ids: torch.Tensor, bi: torch.Tensor, ti: torch.Tensor, tgt: torch.Tensor,
               keep: np.ndarray) -> Decoded:
        """Statistics of the real positions (bi, ti) of padded ids (B, T); the sites of rows `keep` only."""
        raise NotImplementedError

    def manifest(self) -> dict:
        """What the manifest records about where and how the run was computed."""
        raise NotImplementedError


class LocalEngine(Engine):
    """The model on this machine: one traced forward captures every site, the streaming decode engine decodes."""

    def __init__(self, loaded: LoadedModel, cfg: TraceConfig):
        super().__init__(loaded, cfg)
        model, norm = loaded.model, self.layout.final_norm(loaded.model)
        self.backend = make_backend(cfg.backend, model, loaded.tokenizer, self.layout)
        self.lenses = {name: make_lens(name, model, norm) for name in self.lens_names}
        self.head = make_lens("bupo", model, norm)  # the model's own output policy, from its final-normed H^L
        self.device = self.head.W.device  # decode where W_U lives (under a device map, sites come from several)
        self.kernel = resolve_kernel(cfg.kernel, cfg.compile, self.device, torch.float32)
        self.topk = cfg.topk
        log.info("trace on this machine: backend %s, decode kernel %s (asked %s) on %s, lenses %s, top-K %d",
                 cfg.backend, self.kernel, "compiled" if cfg.compile else cfg.kernel, self.device,
                 ",".join(self.lens_names), self.topk)

    def _sample(self, ids: torch.Tensor, mask: torch.Tensor, seed: int, kw: dict) -> torch.Tensor:
        torch.manual_seed(seed)
        with exact_matmul():  # the same samples whatever matmul precision the caller set
            return self.loaded.model.generate(input_ids=ids, attention_mask=mask, **kw)

    def decode(self, ids: torch.Tensor, bi: torch.Tensor, ti: torch.Tensor, tgt: torch.Tensor,
               keep: np.ndarray) -> Decoded:
        t0 = time.perf_counter()
        with exact_matmul():  # the traced forward in true fp32 too, whatever precision the caller set for speed
            acts = self.backend.capture(ids)
        self.timings["trace_s"] += time.perf_counter() - t0
        dev = self.device
        acts = Activations(acts.h0.to(dev), {s: [x.to(dev) for x in xs] for s, xs in acts.sites.items()},
                           acts.final_normed.to(dev))
        err = additivity_error(acts)
        t0 = time.perf_counter()
        bi, ti, tgt = bi.to(dev), ti.to(dev), tgt.to(dev)
        final = decode_rows(acts.final_normed[bi, ti], self.head, targets=tgt.clamp_min(0))
        kb, kt = bi[keep], ti[keep]
        h0 = acts.h0[kb, kt]  # (N, d): packed, no padding decoded
        site_acts = {s: torch.stack([x[kb, kt] for x in xs]) for s, xs in acts.sites.items()}  # (L, N, d)
        per_lens = {}
        for name, lens in self.lenses.items():
            stats = decode_layers(h0, site_acts, tuple(self.cfg.sites), lens, additive=err < ADDITIVE_TOL,
                                  kernel=self.kernel, topk=self.cfg.topk)
            per_lens[name] = {s: st.to_cpu() for s, st in stats.items()}
        self.timings["decode_s"] += time.perf_counter() - t0
        redone = final.redone + sum(st.redone for d in per_lens.values() for st in d.values())
        self.redone += redone
        log.debug("batch of %d sequences x %d positions: %d rows decoded per site, additivity error %.1e, %d vectors "
                  "redone in fp64 by the exactness guard", ids.shape[0], ids.shape[1], len(kb), err, redone)
        return Decoded(final.to_cpu(), per_lens, err)

    def manifest(self) -> dict:
        model = self.loaded.model
        return {"backend": self.cfg.backend, "precision": "exact",
                "device": str(getattr(model, "hf_device_map", None) or self.loaded.device),
                "topk": self.topk, "decode_kernel": self.kernel}


class RemoteEngine(Engine):
    """The model on NDIF (or its local simulation): one remote forward returns per-token statistics only."""

    def __init__(self, loaded: LoadedModel, remote: RemoteModel, cfg: TraceConfig):
        super().__init__(loaded, cfg)
        self.remote = remote
        self.topk = 0  # the remote decode returns top-1 only
        log.info("trace on NDIF (%s): entropies reduced remotely, top-1 only, lenses %s", remote.mode,
                 ",".join(self.lens_names))

    @property
    def input_device(self) -> str:
        return "cpu"

    def _sample(self, ids: torch.Tensor, mask: torch.Tensor, seed: int, kw: dict) -> torch.Tensor:
        return self.remote.generate(ids, mask, seed, **kw)

    def decode(self, ids: torch.Tensor, bi: torch.Tensor, ti: torch.Tensor, tgt: torch.Tensor,
               keep: np.ndarray) -> Decoded:
        t0 = time.perf_counter()
        targets = torch.full(ids.shape, -1, dtype=torch.long)
        targets[bi, ti] = tgt
        final, per_lens = self.remote.decode(ids, targets, self.lens_names, tuple(self.cfg.sites))
        self.timings["trace_s"] += time.perf_counter() - t0

        def rows(st: Stats, b, t) -> Stats:
            lt = None if st.logp_target is None else st.logp_target[..., b, t]
            return Stats(st.entropy[..., b, t], st.top1[..., b, t], st.p1[..., b, t], lt)

        kb, kt = bi[keep], ti[keep]
        return Decoded(rows(final, bi, ti), {n: {s: rows(st, kb, kt) for s, st in d.items()}
                                             for n, d in per_lens.items()}, 0.0)

    def manifest(self) -> dict:
        return {"backend": f"nnsight-remote ({self.remote.mode})", "precision": "exact (fp64 on the serving side)",
                "device": "remote", "topk": self.topk, "decode_kernel": None}


def make_engine(cfg: TraceConfig, loaded: LoadedModel, remote: RemoteModel | None = None) -> Engine:
    """The engine of a run: NDIF's when the model came with a remote handle, else this machine's."""
    return LocalEngine(loaded, cfg) if remote is None else RemoteEngine(loaded, remote, cfg)
