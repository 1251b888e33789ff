"""Synthetic run folders that follow docs/storage.md exactly.

Why: the dashboard, its tests and its benchmark need runs of any size (a tiny Llama-like
and Qwen3-like run, a >= 10M-row run) without running a model. Entropy values follow a
plausible paper-like shape (high at the bottom, converging at the top, FFN exploring up
to a chosen boundary layer) plus seeded noise; summaries are computed from the written
entropy.parquet with DuckDB, so they are consistent with the token-level rows.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from entropylens.store import ENTROPY_SCHEMA, QUANTITIES, SITES, SUMMARY_SCHEMA, TOKENS_SCHEMA

_WORDS = ("the cat sat on a mat and then it ran to see what was in box red blue two three "
          "four five plus minus equals answer is so we get boxed { } . , ? ! : = + - 0 1 2 3 "
          "4 5 6 7 8 9 hello world model token layer step").split()


@dataclass
class SyntheticRun:
    """What to write; every field shapes one aspect of the fake trace."""

    run_id: str  # folder name under cache/runs
    family: str = "llama"  # model family: sets the entropy profile and the manifest's architecture
    n_layers: int = 4  # L decoder layers (entropy.parquet holds layers 0..L)
    n_prompts: int = 3  # prompts in the run
    prompt_len: int = 6  # tokens per prompt
    response_len: int = 5  # generated tokens per prompt (0 = --no-generate)
    vocab_size: int = 64  # V; sets log V for the normalised entropy
    lenses: tuple[str, ...] = ("bupo",)  # lenses stored in entropy.parquet
    boundary: int | None = None  # last layer whose FFN dH is positive (default: ~60 % depth)
    parent_run: str | None = None  # manifest parent_run (BuPO before/after)
    created: str = "2026-01-01T00:00:00+00:00"  # manifest created timestamp
    seed: int = 0  # RNG seed for the noise
    chunk_prompts: int = 64  # prompts per Parquet row group (bounds memory for huge runs)
    extra_manifest: dict = field(default_factory=dict)  # merged into the manifest (tests)
    correct_frac: float | None = None  # scored run: this share of responses correct (seeded); None = unscored
    wrong_shift: float = 0.08  # scored run: FFN entropy of wrong responses raised by this share of log V (upper half)


def _token_text(ids: np.ndarray) -> list[str]:
    n = len(_WORDS)
    return [_WORDS[i % n] if i < n else f"{_WORDS[i % n]}{i // n}" for i in ids.tolist()]


def _profiles(spec: SyntheticRun) -> dict[str, np.ndarray]:
    """Mean entropy per layer (index 0..L) for each site, in nats."""
    L, logv = spec.n_layers, math.log(spec.vocab_size)
    depth = np.arange(L + 1) / L
    if spec.family.startswith("qwen"):
        layer = logv * (0.92 - 0.25 * depth - 0.55 * depth**3)
    else:
        layer = logv * (0.97 - 0.75 * depth**1.6)
    b = spec.boundary if spec.boundary is not None else max(1, round(0.6 * L))
    l_idx = np.arange(L + 1)
    dffn = np.where(l_idx <= b, 0.06, -0.12) * logv  # exploration then convergence
    dattn = 0.02 * logv * np.cos(np.pi * depth)
    prev = np.r_[layer[0], layer[:-1]]
    return {"attn_in": prev, "attn": prev + dattn, "ffn_in": prev + 0.5 * dattn, "dffn": dffn, "layer": layer}


def _entropy_chunk(spec: SyntheticRun, lens: str, prompt_ids: np.ndarray, token_ids: np.ndarray,
                   roles: np.ndarray, rng: np.random.Generator, wrong: np.ndarray | None = None) -> pa.Table:
    """Rows for a block of prompts: (P, T) tokens x (L+1) layers, prompt-major then position, layer."""
    P, T = token_ids.shape
    L1, logv = spec.n_layers + 1, math.log(spec.vocab_size)
    prof = _profiles(spec)
    shift = 0.03 * logv if lens == "logit" else 0.0
    shape = (P, T, L1)
    noise = lambda s: rng.normal(0.0, s * logv, size=shape).astype(np.float32)  # noqa: E731
    clip = lambda x: np.clip(x, 0.0, logv).astype(np.float32)  # noqa: E731
    h_layer = clip(prof["layer"][None, None, :] - shift + noise(0.05))
    h_attn_in = clip(np.concatenate([h_layer[:, :, :1], h_layer[:, :, :-1]], axis=2) + noise(0.01))
    h_attn = clip(prof["attn"][None, None, :] + noise(0.06))
    h_ffn_in = clip(prof["ffn_in"][None, None, :] + noise(0.04))
    h_ffn = clip(h_ffn_in + prof["dffn"][None, None, :] + noise(0.03))
    if wrong is not None:  # wrong responses explore more in the upper FFNs: something for AUROC to find
        upper = (np.arange(L1) >= L1 // 2)[None, None, :]
        h_ffn = clip(h_ffn + spec.wrong_shift * logv * (wrong[:, None, None] & upper))
    d_layer = h_layer - np.concatenate([h_layer[:, :, :1], h_layer[:, :, :-1]], axis=2)
    sites = {"attn_in": h_attn_in, "attn": h_attn, "ffn_in": h_ffn_in, "ffn": h_ffn, "layer": h_layer}
    nan = np.float32("nan")
    for name in ("attn_in", "attn", "ffn_in", "ffn"):
        sites[name][:, :, 0] = nan  # layer 0 holds only H^0
    d_layer[:, :, 0] = nan
    cols: dict[str, pa.Array] = {
        "lens": pa.array(np.full(P * T * L1, lens)),
        "prompt_idx": pa.array(np.repeat(prompt_ids, T * L1).astype(np.int32)),
        "position": pa.array(np.tile(np.repeat(np.arange(T, dtype=np.int32), L1), P)),
        "layer": pa.array(np.tile(np.arange(L1, dtype=np.int16), P * T)),
        "role": pa.array(np.repeat(roles.reshape(-1), L1)),
    }
    for name in SITES:
        cols[f"H_{name}"] = pa.array(sites[name].reshape(-1))
    cols["dH_attn"] = pa.array((sites["attn"] - sites["attn_in"]).reshape(-1))
    cols["dH_ffn"] = pa.array((sites["ffn"] - sites["ffn_in"]).reshape(-1))
    cols["dH_layer"] = pa.array(d_layer.reshape(-1))
    for name in SITES:
        # top-1 ids drawn from the prompt's own tokens so the dashboard can show their text
        pick = rng.integers(0, T, size=shape)
        top1 = np.take_along_axis(token_ids[:, :, None].repeat(L1, 2), pick, axis=1).astype(np.int32)
        p1 = np.exp(-sites[name]).astype(np.float32)  # a confident site has a large top-1 probability
        if name != "layer":
            top1[:, :, 0], p1[:, :, 0] = -1, nan
        cols[f"top1_{name}"] = pa.array(top1.reshape(-1))
        cols[f"p1_{name}"] = pa.array(p1.reshape(-1))
    return pa.table({name: cols[name] for name in ENTROPY_SCHEMA.names}).cast(ENTROPY_SCHEMA)


def summarize(entropy_path: Path, n_layers: int, vocab_size: int) -> pa.Table:
    """summary.parquet rows from entropy.parquet via DuckDB (streams huge files; NaNs skipped, std ddof=1)."""
    qcols = ", ".join(QUANTITIES)
    stats = ("avg(v) AS mean, stddev_samp(v) AS std, quantile_cont(v, 0.25) AS q25, "
             "median(v) AS median, quantile_cont(v, 0.75) AS q75, count(*)::BIGINT AS count")
    sql = f"""
    WITH long AS (
      UNPIVOT (SELECT lens, layer, role, {qcols} FROM read_parquet('{entropy_path.as_posix()}'))
      ON {qcols} INTO NAME quantity VALUE v),
    ok AS (SELECT * FROM long WHERE NOT isnan(v))
    SELECT lens, layer, quantity, role, {stats} FROM ok WHERE role IN ('prompt', 'response')
      GROUP BY lens, layer, quantity, role
    UNION ALL
    SELECT lens, layer, quantity, 'all' AS role, {stats} FROM ok GROUP BY lens, layer, quantity
    ORDER BY lens, layer, quantity, role"""
    df = duckdb.sql(sql).df()
    df["mean_norm"] = df["mean"] / math.log(vocab_size)
    df["rel_depth"] = df["layer"] / n_layers
    df["outcome"] = "all"
    return pa.Table.from_pandas(df[SUMMARY_SCHEMA.names], preserve_index=False).cast(SUMMARY_SCHEMA)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_run(cache: Path, spec: SyntheticRun) -> Path:
    """Write a complete trace run folder under cache/runs/<run_id>; returns the folder."""
    run_dir = Path(cache) / "runs" / spec.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(spec.seed)
    T = spec.prompt_len + spec.response_len
    pos = np.arange(T)
    role_row = np.where(pos + 1 < spec.prompt_len, "prompt", np.where(pos + 1 < T, "response", "next"))
    ent_tmp, tok_tmp = run_dir / "entropy.parquet.tmp", run_dir / "tokens.parquet.tmp"
    ent_writer = tok_writer = None
    logv = math.log(spec.vocab_size)
    correct = (None if spec.correct_frac is None else  # its own generator: unscored runs stay as they were
               np.random.default_rng([spec.seed, 7]).random(spec.n_prompts) < spec.correct_frac)
    for start in range(0, spec.n_prompts, spec.chunk_prompts):
        prompts = np.arange(start, min(start + spec.chunk_prompts, spec.n_prompts), dtype=np.int32)
        ids = rng.integers(0, spec.vocab_size, size=(len(prompts), T)).astype(np.int32)
        roles = np.broadcast_to(role_row, ids.shape)
        target = np.concatenate([ids[:, 1:], np.full((len(prompts), 1), -1, np.int32)], axis=1)
        h_final = rng.uniform(0.1, 0.5, size=ids.shape).astype(np.float32) * logv
        lp = -rng.exponential(1.5, size=ids.shape).astype(np.float32)
        lp[:, -1] = np.nan
        tok = pa.table({
            "prompt_idx": pa.array(np.repeat(prompts, T)),
            "position": pa.array(np.tile(pos.astype(np.int32), len(prompts))),
            "token_id": pa.array(ids.reshape(-1)), "token_text": pa.array(_token_text(ids.reshape(-1))),
            "role": pa.array(roles.reshape(-1)), "target_id": pa.array(target.reshape(-1)),
            "H_final": pa.array(h_final.reshape(-1)), "logprob_target": pa.array(lp.reshape(-1)),
        }).cast(TOKENS_SCHEMA)
        tok_writer = tok_writer or pq.ParquetWriter(tok_tmp, tok.schema)
        tok_writer.write_table(tok)
        for lens in spec.lenses:
            wrong = None if correct is None else ~correct[prompts]
            ent = _entropy_chunk(spec, lens, prompts, ids, roles, rng, wrong)
            ent_writer = ent_writer or pq.ParquetWriter(ent_tmp, ent.schema)
            ent_writer.write_table(ent, row_group_size=len(ent))
    tok_writer.close()
    ent_writer.close()
    os.replace(tok_tmp, run_dir / "tokens.parquet")
    os.replace(ent_tmp, run_dir / "entropy.parquet")
    responses = [{"prompt_idx": int(p), "prompt": f"synthetic prompt {p}", "response": "synthetic response",
                  "answer": None, "n_prompt_tokens": spec.prompt_len, "n_response_tokens": spec.response_len,
                  "source_idx": int(p), "sample": 0, "reward": None, "correct": None} for p in range(spec.n_prompts)]
    if correct is None:
        summary = summarize(run_dir / "entropy.parquet", spec.n_layers, spec.vocab_size)
    else:
        summary = _scored(run_dir, spec, responses, correct)
    pq.write_table(summary, run_dir / "summary.parquet")
    _atomic_write_text(run_dir / "responses.jsonl", "".join(json.dumps(r) + "\n" for r in responses))
    _atomic_write_text(run_dir / "manifest.json", json.dumps(_manifest(spec), indent=2))
    return run_dir


def _scored(run_dir: Path, spec: SyntheticRun, responses: list[dict], correct: np.ndarray) -> pa.Table:
    """Score the responses (reference 42; correct ones answer it), write outcomes.parquet, return the summary by
    outcome (pandas: scored synthetic runs are small)."""
    from entropylens.store import OUTCOMES_SCHEMA, outcomes_table, summary_by_outcome

    for r, ok in zip(responses, correct):
        r.update(answer="42", response="so \\boxed{42}" if ok else "so \\boxed{41}", reward=float(ok),
                 correct=bool(ok))
    outcomes = outcomes_table(responses)
    pq.write_table(outcomes.cast(OUTCOMES_SCHEMA), run_dir / "outcomes.parquet")
    ent = pq.read_table(run_dir / "entropy.parquet", columns=["lens", "prompt_idx", "layer", "role", *QUANTITIES])
    df = summary_by_outcome(ent.to_pandas(), outcomes.to_pandas(), spec.vocab_size, spec.n_layers)
    return pa.Table.from_pandas(df[SUMMARY_SCHEMA.names], preserve_index=False).cast(SUMMARY_SCHEMA)


def _manifest(spec: SyntheticRun) -> dict:
    arch = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(spec.family, "SyntheticForCausalLM")
    n_tok = spec.n_prompts * (spec.prompt_len + spec.response_len)
    m = {
        "run_id": spec.run_id, "status": "complete", "error": None, "created": spec.created,
        "finished": spec.created, "kind": "trace",
        "model": {"id": f"synthetic/{spec.family}-{spec.n_layers}L", "source": "folder", "revision": "synthetic",
                  "architecture": arch, "family": spec.family, "n_layers": spec.n_layers, "d_model": 32,
                  "vocab_size": spec.vocab_size, "tie_word_embeddings": False, "dtype": "float32"},
        "lens": list(spec.lenses), "sites": list(SITES), "backend": "synthetic", "device": "cpu",
        "precision": "exact", "prompts": {"source": "synthetic", "sha256": "0" * 64, "n": spec.n_prompts,
                                          "limit": spec.n_prompts},
        "generation": {"generate": spec.response_len > 0, "max_new_tokens": spec.response_len,
                       "temperature": 1.0, "top_p": 1.0},
        "seed": spec.seed, "batch_size": spec.chunk_prompts, "n_tokens": n_tok,
        "n_response_tokens": spec.n_prompts * max(spec.response_len - 1, 0),
        "parent_run": spec.parent_run, "versions": {"entropylens": "synthetic"},
        "timings": {"load_s": 0.0, "generate_s": 0.0, "trace_s": 0.0, "decode_s": 0.0, "total_s": 0.0},
    }
    m.update(spec.extra_manifest)
    return m


def write_bupo_run(cache: Path, run_id: str, steps: int = 20, internal_steps: int = 8, layer_k: int = 3,
                   parent_run: str | None = None, seed: int = 0) -> Path:
    """Write a trainer run folder (manifest kind "bupo" + metrics.jsonl, one row per step)."""
    run_dir = Path(cache) / "runs" / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(steps):
        internal = step < internal_steps
        rows.append({
            "step": step, "phase": "internal" if internal else "output",
            "reward/mean": float(min(1.0, 0.1 + 0.03 * step + rng.normal(0, 0.02))),
            "reward/std": float(abs(rng.normal(0.3, 0.05))),
            "entropy/layer_k": float(3.0 - 0.08 * step + rng.normal(0, 0.05)),
            "entropy/output": float(2.0 - 0.03 * step + rng.normal(0, 0.05)),
            "kl/output_vs_internal": float(abs(rng.normal(0.5, 0.1))),
            "clip/frac": float(abs(rng.normal(0.05, 0.02))),
            "optim/grad_norm": float(abs(rng.normal(1.0, 0.3))),
            "completion/len_mean": float(40 + rng.normal(0, 3)),
            "perf/tokens_per_s": float(500 + rng.normal(0, 20)),
            "signal/groups_frac": float(rng.integers(0, 5) / 4), "signal/tokens": int(rng.integers(0, 200)),
            "update/logp_before": float(-1.5 + 0.02 * step + rng.normal(0, 0.05)),
            "update/logp_after": float(-1.45 + 0.02 * step + rng.normal(0, 0.05)) if internal else None,
        })
    _atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    now = datetime(2026, 1, 2, tzinfo=timezone.utc).isoformat()
    manifest = {"run_id": run_id, "status": "complete", "error": None, "created": now, "finished": now,
                "kind": "bupo", "model": {"id": "synthetic/llama-4L", "architecture": "LlamaForCausalLM",
                                          "family": "llama", "n_layers": 4},
                "lens": ["bupo"], "parent_run": parent_run, "seed": seed,
                "bupo": {"layer": layer_k, "internal_steps": internal_steps, "steps": steps}}
    _atomic_write_text(run_dir / "manifest.json", json.dumps(manifest, indent=2))
    return run_dir
