"""One batch of a trace: sample responses, run the traced forward (locally or on NDIF), decode, make rows.

Rows follow docs/storage.md. Position t's distribution predicts token t+1, so a row's `role` is the role
of the token it predicts: the paper's averages over response tokens use the policies that produced them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
import numpy as np
import pandas as pd
import torch

from entropylens.tracing.config import TraceConfig
from entropylens.core.decode import Stats, decode_layers, decode_rows, exact_matmul
from entropylens.core.lens import make_lens
from entropylens.model.load import LoadedModel
from entropylens.model.remote import RemoteModel
from entropylens.model.layout import SITES, Activations, additivity_error

ADDITIVE_TOL = 1e-5  # relative; fp32 residual streams measure ~1e-7


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
        with exact_matmul():  # the same samples whatever matmul precision the caller set
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    stops, responses = stop_ids(loaded), []
    for row in out[:, T:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        responses.append(row[:cut])
    return responses


def sample_seed(seed: int, source_idx: int) -> int:
    """Seed of one prompt's samples: a function of the run seed and the prompt only, never of the batch."""
    return (seed * 1_000_003 + 7_919 * (source_idx + 1)) % (1 << 62)


class GroupSampler:
    """`--samples N`: a prompt's N responses come from one seeded generate over N copies of it (equal lengths,
    no padding), so they depend on neither the batch size nor the batch that asks. The last prompt's group is
    kept for a batch that starts mid-group."""

    def __init__(self, loaded: LoadedModel, prompt_ids: list[list[int]], cfg: TraceConfig, n: int,
                 remote: RemoteModel | None = None):
        self.loaded, self.prompt_ids, self.cfg, self.n, self.remote = loaded, prompt_ids, cfg, n, remote
        self._last: tuple[int, list[list[int]]] | None = None

    def __call__(self, source_idx: int, sample: int) -> list[int]:
        if self._last is None or self._last[0] != source_idx:
            group = generate(self.loaded, [self.prompt_ids[source_idx]] * self.n, self.cfg,
                             seed=sample_seed(self.cfg.seed, source_idx), remote=self.remote)
            self._last = (source_idx, group)
        return self._last[1][sample]


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


def topk_frame(lens: str, prompt_idx: np.ndarray, position: np.ndarray, stats: dict[str, Stats],
               texts: dict[int, str]) -> pd.DataFrame | None:
    """Stats' top-K lists per site -> topk.parquet rows (docs/storage.md): layer numbering as entropy.parquet
    (`layer` site 0..L with H^0 at 0, the other sites 1..L), rank 1 = most probable; None without top-K."""
    frames = []
    for site in SITES:
        st = stats.get(site)
        if st is None or st.topk_ids is None:
            continue
        ids, p = st.topk_ids.numpy(), st.topk_p.numpy()  # (L or L + 1, N, K)
        nl, N, K = ids.shape
        first = 0 if site == "layer" else 1
        frames.append(pd.DataFrame({
            "lens": lens, "prompt_idx": np.repeat(np.tile(prompt_idx, nl), K),
            "position": np.repeat(np.tile(position, nl), K),
            "layer": np.repeat(np.arange(first, first + nl, dtype=np.int16), N * K), "site": site,
            "rank": np.tile(np.arange(1, K + 1, dtype=np.int8), nl * N), "token_id": ids.ravel(),
            "token_text": [texts[i] for i in ids.ravel().tolist()], "prob": p.ravel(),
        }))
    return pd.concat(frames, ignore_index=True) if frames else None


def _decode_local(loaded: LoadedModel, backend, layout, lenses, cfg: TraceConfig, ids: torch.Tensor,
                  bi: torch.Tensor, ti: torch.Tensor, tgt: torch.Tensor, keep: np.ndarray,
                  timings: dict) -> tuple[Stats, dict[str, dict[str, Stats]], float]:
    """Capture every site in one forward, then the streaming decode engine on the packed rows."""
    t0 = time.perf_counter()
    with exact_matmul():  # the traced forward in true fp32 too, whatever precision the caller set for speed
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
                              compile=cfg.compile, kernel=cfg.kernel, topk=cfg.topk)
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
                timings: dict, remote: RemoteModel | None = None
                ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None, float]:
    """One traced forward + decode for a batch -> (tokens, entropy, topk rows or None, additivity error)."""
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
    topk = None
    if cfg.topk and remote is None:  # the remote decode returns top-1 only (manifest: topk 0)
        uniq = np.unique(np.concatenate([st.topk_ids.numpy().ravel() for d in per_lens.values()
                                         for st in d.values() if st.topk_ids is not None])).tolist()
        texts = dict(zip(uniq, tok.batch_decode([[i] for i in uniq])))
        parts = [topk_frame(name, np.array(pidx)[keep], np.array(t_idx)[keep], per_lens[name], texts)
                 for name in cfg.lenses()]
        topk = pd.concat([p for p in parts if p is not None], ignore_index=True)
    return tokens, pd.concat(frames, ignore_index=True), topk, err
