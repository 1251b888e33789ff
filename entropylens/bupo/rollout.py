"""Rollouts and policy forwards: the model-facing half of the trainer.

`generate_rollouts` samples G completions per prompt from the full model (KV cache, left
padding, pure temperature sampling: no top-k/top-p, so the sampling distribution is exactly
softmax(logits / T)). `policy_logits` re-scores them in one forward and returns both the
output policy's logits and the internal layer policy pi^k = softmax(H^k W_U^T) (lens `bupo`:
raw residual, no final norm, head bias and soft-cap applied), with H^k read by a forward hook
on decoder layer k (1-indexed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig

from entropylens.bupo.grpo import completion_mask
from entropylens.errors import UserError
from entropylens.sites import FINAL_NORMS, LAYER_LISTS


def _find(model: nn.Module, paths: tuple[str, ...], kind: type[nn.Module], what: str) -> nn.Module:
    for path in paths:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, kind):
            return obj
    raise UserError(f"{type(model).__name__}: found no {what} (tried {', '.join(paths)})")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, looked up where `entropylens.sites` looks for them."""
    return _find(model, LAYER_LISTS, nn.ModuleList, "decoder layer list")


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied after the last decoder layer (frozen with the upper layers in the internal phase)."""
    return _find(model, FINAL_NORMS, nn.Module, "final norm")


def unembed(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Lens `bupo`: h W_U^T (+ bias, + final soft-cap) in fp32, since raw residuals give logits near +-100."""
    head = model.get_output_embeddings()
    bias = None if getattr(head, "bias", None) is None else head.bias.float()
    logits = F.linear(h.float(), head.weight.float(), bias)  # (n, T, V)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if not cap else cap * torch.tanh(logits / cap)


def eos_and_pad_ids(model: nn.Module, tokenizer) -> tuple[list[int], int]:
    """All ids that end a completion (tokenizer's and generation config's EOS) and the pad id."""
    eos: list[int] = []
    for src in (tokenizer.eos_token_id, model.generation_config.eos_token_id):
        eos += [src] if isinstance(src, int) else list(src or [])
    eos = list(dict.fromkeys(eos))
    if not eos:
        raise UserError("the tokenizer has no EOS token; completions could never end")
    return eos, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]


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
) -> Rollouts:
    """Sample G completions for each rendered prompt text with the full model, seeded."""
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
    )
    model.train(was_training)
    comp = out.sequences[:, ids.shape[1] :]  # (N, T)
    mask = completion_mask(comp, eos, pad)  # (N, T)
    kept = comp.masked_fill(mask == 0, pad)  # (N, T) nothing after the first EOS
    decoded = tokenizer.batch_decode(kept, skip_special_tokens=True)
    return Rollouts(ids, attn, comp, mask, decoded, out.scores if keep_scores else None)


def policy_logits(
    model: nn.Module, ro: Rollouts, layer: int, rows: slice = slice(None)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of pi^layer and of the output policy at every completion position, for rollouts `rows`.

    Position t of the result predicts completion token t. Gradients flow through both if enabled;
    freezing (see trainer) decides which parameters receive them.
    """
    layers = decoder_layers(model)
    if not 1 <= layer <= len(layers):
        raise UserError(f"internal layer must be in 1..{len(layers)}, got {layer}")
    p_ids, p_mask, c_ids = ro.prompt_ids[rows], ro.prompt_mask[rows], ro.completion_ids[rows]
    P, T = p_ids.shape[1], c_ids.shape[1]
    input_ids = torch.cat([p_ids, c_ids], dim=1)  # (n, P+T)
    attn = torch.cat([p_mask, torch.ones_like(c_ids)], dim=1)  # (n, P+T) as during generation
    pos = (attn.long().cumsum(-1) - 1).masked_fill(attn == 0, 0)  # (n, P+T) as during generation

    captured: list[torch.Tensor] = []
    hook = layers[layer - 1].register_forward_hook(
        lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        out = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, logits_to_keep=T + 1,
                    use_cache=False)
    finally:
        hook.remove()
    h_k = captured[0][:, P - 1 : P + T - 1]  # (n, T, d) raw residual H^k
    return unembed(model, h_k), out.logits[:, :-1]  # (n, T, V), (n, T, V)
