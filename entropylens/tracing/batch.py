"""One batch of a trace: its sequences, the engine's statistics of them, and the rows they become.

Rows follow docs/storage.md. Position t's distribution predicts token t+1, so a row's `role` is the role
of the token it predicts: the paper's averages over response tokens use the policies that produced them.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import pandas as pd
import torch

from entropylens.core.decode import Stats
from entropylens.model.generation import sample_seed
from entropylens.store.vocab import SITES
from entropylens.tracing.engine import Engine


@dataclass
class Sequences:
    """One batch of prompt + response token ids (unpadded)."""

    prompt_idx: list[int]
    texts: list[str]
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    answers: list[str | None]


class GroupSampler:
    """`--samples N`: a prompt's N responses come from one seeded generate over N copies of it (equal lengths,
    no padding), so they depend on neither the batch size nor the batch that asks. The last prompt's group is
    kept for a batch that starts mid-group."""

    def __init__(self, engine: Engine, prompt_ids: list[list[int]], n: int):
        self.engine, self.prompt_ids, self.n = engine, prompt_ids, n
        self._last: tuple[int, list[list[int]]] | None = None

    def __call__(self, source_idx: int, sample: int) -> list[int]:
        if self._last is None or self._last[0] != source_idx:
            group = self.engine.generate([self.prompt_ids[source_idx]] * self.n,
                                         seed=sample_seed(self.engine.cfg.seed, source_idx))
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


@dataclass
class Frames:
    """One batch's rows: tokens.parquet, entropy.parquet and topk.parquet (None without top-K)."""

    tokens: pd.DataFrame
    entropy: pd.DataFrame
    topk: pd.DataFrame | None
    additivity_error: float


def trace_batch(engine: Engine, seqs: Sequences) -> Frames:
    """One traced forward + decode of a batch of sequences -> its rows."""
    cfg, tok = engine.cfg, engine.loaded.tokenizer
    full = [p + r for p, r in zip(seqs.prompt_ids, seqs.response_ids)]
    T = max(map(len, full))
    # Right padding: causal attention keeps real positions blind to the pads after them.
    ids = torch.tensor([s + [tok.pad_token_id] * (T - len(s)) for s in full], device=engine.input_device)
    b_idx, t_idx, roles, targets, pidx = [], [], [], [], []
    for b, (p, s) in enumerate(zip(seqs.prompt_ids, full)):
        b_idx += [b] * len(s)
        t_idx += list(range(len(s)))
        roles += roles_for(len(p), len(s))
        targets += s[1:] + [-1]
        pidx += [seqs.prompt_idx[b]] * len(s)
    bi, ti, tgt = torch.tensor(b_idx), torch.tensor(t_idx), torch.tensor(targets)
    keep = np.arange(len(roles)) if cfg.positions == "all" else np.flatnonzero(np.array(roles) == "response")
    out = engine.decode(ids, bi, ti, tgt, keep)
    final, per_lens = out.final, out.per_lens
    ids_flat = [s[t] for s, t in zip((full[b] for b in b_idx), t_idx)]
    tokens = pd.DataFrame({
        "prompt_idx": pidx, "position": t_idx, "token_id": ids_flat,
        "token_text": tok.batch_decode([[i] for i in ids_flat]), "role": roles, "target_id": targets,
        "H_final": final.entropy.numpy(),
        "logprob_target": np.where(tgt.numpy() >= 0, final.logp_target.numpy(), np.nan),
    })
    frames = [entropy_frame(name, np.array(pidx)[keep], np.array(t_idx)[keep], np.array(roles)[keep],
                            per_lens[name], engine.layout.n_layers) for name in engine.lens_names]
    topk = None
    if engine.topk:
        uniq = np.unique(np.concatenate([st.topk_ids.numpy().ravel() for d in per_lens.values()
                                         for st in d.values() if st.topk_ids is not None])).tolist()
        texts = dict(zip(uniq, tok.batch_decode([[i] for i in uniq])))
        parts = [topk_frame(name, np.array(pidx)[keep], np.array(t_idx)[keep], per_lens[name], texts)
                 for name in engine.lens_names]
        topk = pd.concat([p for p in parts if p is not None], ignore_index=True)
    return Frames(tokens, pd.concat(frames, ignore_index=True), topk, out.additivity_error)
