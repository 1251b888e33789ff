"""Rollouts and policy forwards: the model-facing half of the trainer.

`generate_rollouts` samples G completions per prompt from the full model (KV cache, left
padding, pure temperature sampling: no top-k/top-p, so the sampling distribution is exactly
softmax(logits / T)). `policy_logits` re-scores them in one forward and returns both the
output policy's logits and the internal layer policy pi^k = softmax(H^k W_U^T) (lens `bupo` of
`entropylens.core.lens`, the tracer's: raw residual, no final norm, head bias and soft-cap applied), with
H^k read by a forward hook on decoder layer k (1-indexed; layers found by `entropylens.model.layout`).
The trainer samples with `generate_groups`: one seeded call per prompt, so that a batch sharded over
ranks samples what one process sampling it whole would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig

from entropylens.bupo.grpo import completion_mask
from entropylens.errors import UserError
from entropylens.core.lens import lens_spec, make_lens
from entropylens.model.generation import eos_and_pad_ids
from entropylens.model.layout import decoder_layers, final_norm


@dataclass
class Rollouts:
    """N = B * G sampled completions, grouped per prompt (rollout i answers prompt i // G)."""

    prompt_ids: torch.Tensor  # (N, P) left-padded
    prompt_mask: torch.Tensor  # (N, P) 1 on real prompt tokens
    completion_ids: torch.Tensor  # (N, T) right-padded
    mask: torch.Tensor  # (N, T) float, 1 up to and including the first EOS
    texts: list[str]  # decoded completions (special tokens skipped)
    scores: tuple[torch.Tensor, ...] | None = None  # T x (N, V) processed sampling scores if kept

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())

    def select(self, rows: slice) -> Rollouts:
        """The rollouts `rows` (whole groups when the slice is), padding widths kept: a PPO mini-batch."""
        scores = None if self.scores is None else tuple(s[rows] for s in self.scores)
        return Rollouts(self.prompt_ids[rows], self.prompt_mask[rows], self.completion_ids[rows], self.mask[rows],
                        self.texts[rows], scores)


def sampling_config(
    model: nn.Module, tokenizer, temperature: float, max_new_tokens: int, keep_scores: bool = False
) -> GenerationConfig:
    """Pure temperature sampling; every other logits warper/penalty neutralised explicitly."""
    eos, pad = eos_and_pad_ids(model, tokenizer)
    return GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, min_p=None, typical_p=1.0,
        repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=max_new_tokens,
        eos_token_id=eos, pad_token_id=pad, use_cache=True,
        return_dict_in_generate=True, output_scores=keep_scores,
    )


@torch.no_grad()
def generate_rollouts(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    G: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    keep_scores: bool = False,
    synced_gpus: bool | None = None,
) -> Rollouts:
    """Sample G completions for each rendered prompt text with the full model, seeded.

    `synced_gpus` (transformers' flag, set under FSDP) keeps every rank stepping until all are done.
    """
    eos, pad = eos_and_pad_ids(model, tokenizer)
    if tokenizer.pad_token_id is None:
        raise UserError("the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token")
    add_special = not getattr(tokenizer, "chat_template", None)  # chat templates carry their own BOS
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    ids = enc.input_ids.repeat_interleave(G, dim=0).to(device)  # (N, P)
    attn = enc.attention_mask.repeat_interleave(G, dim=0).to(device)  # (N, P)
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids, attention_mask=attn,
        generation_config=sampling_config(model, tokenizer, temperature, max_new_tokens, keep_scores),
        synced_gpus=synced_gpus,
    )
    model.train(was_training)
    comp = out.sequences[:, ids.shape[1] :]  # (N, T)
    mask = completion_mask(comp, eos, pad)  # (N, T)
    kept = comp.masked_fill(mask == 0, pad)  # (N, T) nothing after the first EOS
    decoded = tokenizer.batch_decode(kept, skip_special_tokens=True)
    return Rollouts(ids, attn, comp, mask, decoded, out.scores if keep_scores else None)


def concat_rollouts(parts: Sequence[Rollouts], pad_id: int) -> Rollouts:
    """Stack rollouts generated separately: prompts left-padded, completions right-padded to the longest.

    Padded completion positions get mask 0 whatever the pad id is (an EOS pad would otherwise count once).
    """
    P = max(r.prompt_ids.shape[1] for r in parts)
    T = max(r.completion_ids.shape[1] for r in parts)
    left = lambda x, v: F.pad(x, (P - x.shape[1], 0), value=v)  # noqa: E731  (n, P)
    right = lambda x, v: F.pad(x, (0, T - x.shape[1]), value=v)  # noqa: E731  (n, T)
    return Rollouts(
        prompt_ids=torch.cat([left(r.prompt_ids, pad_id) for r in parts]),  # (N, P)
        prompt_mask=torch.cat([left(r.prompt_mask, 0) for r in parts]),  # (N, P)
        completion_ids=torch.cat([right(r.completion_ids, pad_id) for r in parts]),  # (N, T)
        mask=torch.cat([right(r.mask, 0.0) for r in parts]),  # (N, T)
        texts=[t for r in parts for t in r.texts],
    )


def generate_groups(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    G: int,
    temperature: float,
    max_new_tokens: int,
    seeds: Sequence[int],
    synced_gpus: bool | None = None,
) -> Rollouts:
    """G completions per prompt, one `generate` call per prompt seeded with its own seed (see `group_seed`).

    One batched call couples the prompts (shared RNG stream, shared left padding), so its samples depend
    on which prompts share the batch; per-group calls make the sharded (multi-rank) batch sample exactly
    what one process sampling the whole batch does.
    """
    if len(seeds) != len(texts):
        raise ValueError(f"need one seed per prompt, got {len(seeds)} for {len(texts)}")
    parts = [generate_rollouts(model, tokenizer, [t], G, temperature, max_new_tokens, seed=s,
                               synced_gpus=synced_gpus) for t, s in zip(texts, seeds)]
    return concat_rollouts(parts, eos_and_pad_ids(model, tokenizer)[1])


def policy_logits(
    model: nn.Module, ro: Rollouts, layer: int, rows: slice = slice(None), runner: nn.Module | None = None,
    lens: str = "bupo",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of pi^layer (H^layer decoded by registered lens `lens`; the paper's: bupo) and of the output
    policy at every completion position, for rollouts `rows`.

    Position t of the result predicts completion token t. Gradients flow through both if enabled;
    freezing (see trainer) decides which parameters receive them. `runner` runs the forward instead of
    `model` when it wraps it (DDP/FSDP: the wrapper's forward is what synchronises gradients).
    """
    layers = decoder_layers(model)
    if not 1 <= layer <= len(layers):
        raise UserError(f"internal layer must be in 1..{len(layers)}, got {layer}")
    p_ids, p_mask, c_ids = ro.prompt_ids[rows], ro.prompt_mask[rows], ro.completion_ids[rows]
    P, T = p_ids.shape[1], c_ids.shape[1]
    input_ids = torch.cat([p_ids, c_ids], dim=1)  # (n, P+T)
    attn = torch.cat([p_mask, torch.ones_like(c_ids)], dim=1)  # (n, P+T) as during generation
    pos = (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 0)  # (n, P+T) as during generation

    norm = final_norm(model) if lens_spec(lens).reads_final_norm else None
    captured: list[torch.Tensor] = []
    hooks = [  # pi^k is read out inside the forward, while FSDP holds the unembedding unsharded
        layers[layer - 1].register_forward_hook(
            lambda _m, _i, out: captured.append((out[0] if isinstance(out, tuple) else out)[:, P - 1 : P + T - 1])
        ),  # (n, T, d) raw residual H^k
        model.get_output_embeddings().register_forward_hook(
            lambda _m, _i, _o: captured.append(make_lens(lens, model, norm, live=True).logits_fp32(captured[0]))
        ),  # (n, T, V) pi^k in fp32 on the parameters as the forward holds them
    ]
    try:
        out = (runner or model)(input_ids=input_ids, attention_mask=attn, position_ids=pos,
                                logits_to_keep=T + 1, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    if len(captured) != 2:
        raise UserError(f"{type(model).__name__}: the forward did not call layer {layer} and the output embedding once")
    return captured[1], out.logits[:, :-1]  # (n, T, V), (n, T, V)
