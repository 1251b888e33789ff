"""GRPO core as pure tensor functions (docs/definitions.md#bupo).

Shapes: N = B * G rollouts (B prompts, G generations each, grouped consecutively:
rollout i belongs to prompt i // G), T = completion length (padded), V = vocabulary.
Nothing here knows about models; the trainer feeds logits from either the output policy
or the internal layer policy pi^k, which is the whole difference between GRPO and BuPO.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from entropylens.bupo.config import LOSS_AGGS, OBJECTIVES

PAPER_CLIP_RATIO_C = 10.0  # their run_code/*.sh: actor.clip_ratio_c=10.0
PAPER_LOG_RATIO_CLAMP = 20.0  # verl core_algos.compute_policy_loss_vanilla: clamp(log_prob - old_log_prob, -20, 20)


def group_advantages(rewards: torch.Tensor, G: int, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean_g) / (std_g + eps) within each group of G rollouts of one prompt.

    std is the unbiased sample std (as TRL); a group of equal rewards gives exact zeros.
    """
    if G < 2 or rewards.ndim != 1 or rewards.numel() % G:
        raise ValueError(f"need 1-D rewards in groups of G >= 2, got shape {tuple(rewards.shape)}, G={G}")
    r = rewards.float().view(-1, G)  # (B, G)
    mean = r.mean(dim=1, keepdim=True)  # (B, 1)
    std = r.std(dim=1, keepdim=True)  # (B, 1)
    return ((r - mean) / (std + eps)).view(-1)  # (N,)


def completion_mask(completion_ids: torch.Tensor, eos_id: int | Sequence[int], pad_id: int) -> torch.Tensor:
    """1.0 for completion tokens up to and including the first EOS, 0.0 after it and on padding.

    eos_id may list several end tokens (chat models end turns with their own token). When the pad
    id is an EOS id, the first pad *is* the EOS and counts; later pads do not. Padding is the
    trailing run of pad tokens; a pad id sampled before the end is a real token and counts.
    """
    N, T = completion_ids.shape  # (N, T)
    eos = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    is_eos = torch.isin(completion_ids, torch.tensor(eos, device=completion_ids.device))  # (N, T)
    first_eos = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1), T)  # (N,)
    pos = torch.arange(T, device=completion_ids.device).expand(N, T)  # (N, T)
    mask = pos <= first_eos[:, None]  # (N, T)
    if pad_id not in eos:
        trailing = (completion_ids == pad_id).flip(1).int().cumprod(1).flip(1).bool()  # (N, T) trailing pads
        mask &= ~trailing
    return mask.float()


def flush_denormal_grad(x: torch.Tensor) -> torch.Tensor:
    """x, whose gradient has its entries below the dtype's smallest normal number set to 0.

    A peaked softmax (pi^k on raw residuals puts e^-100 on most tokens) backpropagates denormal values into
    the unembedding GEMMs, which then run ~200x slower on x86 CPUs (MKL ignores torch.set_flush_denormal
    in its worker threads). Such entries are below 1.2e-38 in fp32: zeroing them changes no update.
    """
    if not x.requires_grad:
        return x
    x = x.view_as(x)  # a node of its own: the hook sees this use of x only
    x.register_hook(lambda g: g.masked_fill(g.abs() < torch.finfo(g.dtype).tiny, 0.0))
    return x


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 at least (fp64 stays fp64: the references' precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature)[ids] in fp32: the policy the tokens were sampled from."""
    logits = flush_denormal_grad(logits)  # (N, T, V)
    logp = F.log_softmax(_fp32(logits) / temperature, dim=-1)  # (N, T, V)
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (N, T)


def token_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy in nats of softmax(logits / temperature), fp32."""
    logp = F.log_softmax(_fp32(logits) / temperature, dim=-1)  # (N, T, V)
    return -(logp.exp() * logp).sum(-1)  # (N, T)


def token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, temperature: float) -> torch.Tensor:
    """Exact KL(p || q) in nats per token, both distributions at the same temperature."""
    logp = F.log_softmax(_fp32(logits_p) / temperature, dim=-1)  # (N, T, V)
    logq = F.log_softmax(_fp32(logits_q) / temperature, dim=-1)  # (N, T, V)
    return (logp.exp() * (logp - logq)).sum(-1)  # (N, T)


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
    clip_ratio_c: float | None = None,
    log_ratio_clamp: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-clip per-token loss -min(r A, clip(r, 1-eps_low, 1+eps_high) A) and the clip indicator.

    logp, old_logp, mask: (N, T); adv: (N,). The indicator marks tokens whose clipped term is
    the active one (gradient cut), counted only where mask is 1. `clip_ratio_c` adds dual-clip PPO's
    bound for A < 0 (loss at most -c A: a ratio above c gets no gradient) and `log_ratio_clamp` clamps
    log r before the exp, both as verl does (the `paper` objective).
    """
    log_ratio = logp - old_logp  # (N, T)
    if log_ratio_clamp is not None:
        log_ratio = torch.clamp(log_ratio, -log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)  # (N, T)
    a = adv[:, None]  # (N, 1)
    unclipped = ratio * a  # (N, T)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * a  # (N, T)
    loss = -torch.minimum(unclipped, clipped)  # (N, T)
    is_clipped = ((ratio < 1.0 - eps_low) & (a < 0)) | ((ratio > 1.0 + eps_high) & (a > 0))  # (N, T)
    if clip_ratio_c is not None:
        neg = (a < 0).expand_as(loss)  # (N, T)
        loss = torch.where(neg, torch.minimum(loss, -a * clip_ratio_c), loss)
        is_clipped = is_clipped | (neg & (ratio > clip_ratio_c))
    return loss, is_clipped.float() * mask


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per sampled token: exp(d) - d - 1, d = ref - logp."""
    d = ref_logp - logp  # (N, T)
    return torch.exp(d) - d - 1.0


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, loss_agg: str = "token_mean") -> torch.Tensor:
    """Reduce a (N, T) per-token loss to a scalar the way TRL/verl name it.

    token_mean: sum over all tokens / number of tokens (DAPO, the paper's choice).
    seq_mean_token_mean: mean per sequence, then mean over sequences (original GRPO).
    seq_mean_token_sum_norm: sum per sequence / T (a constant), then mean (Dr. GRPO).
    """
    if loss_agg == "token_mean":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_agg == "seq_mean_token_mean":
        seq = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # (N,)
        return seq.mean()
    if loss_agg == "seq_mean_token_sum_norm":
        return ((per_token * mask).sum(-1) / mask.shape[-1]).mean()
    raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")


@dataclass(frozen=True)
class LossScale:
    """The global batch's loss denominators: tokens and sequences summed over ranks, T the longest padding.

    Under DDP every rank holds a shard of the batch and gradients are *averaged* over `world_size`
    ranks, so a rank's loss is its shard's sum over global denominators times world_size; local
    denominators would weight a rank's tokens by its own count instead of the batch's.
    """

    tokens: float  # mask.sum() over the global batch
    sequences: int  # rollouts in the global batch
    length: int  # T: the longest padded completion length of any rank (Dr. GRPO's constant)
    world_size: int = 1

    @staticmethod
    def local(mask: torch.Tensor) -> torch.Tensor:
        """This rank's (tokens, sequences, T) as a (3,) float64 tensor, to gather over ranks."""
        return torch.tensor([float(mask.sum()), mask.shape[0], mask.shape[1]], dtype=torch.float64)

    @classmethod
    def from_ranks(cls, per_rank: torch.Tensor) -> LossScale:
        """Combine the (W, 3) gathered `local` rows of all ranks."""
        tokens, sequences, length = per_rank.double().cpu().unbind(-1)  # (W,) each
        return cls(float(tokens.sum()), int(sequences.sum()), int(length.max()), per_rank.shape[0])

    @classmethod
    def of(cls, mask: torch.Tensor) -> LossScale:
        """One process holding the whole batch."""
        return cls.from_ranks(cls.local(mask)[None])


def chunk_weight(chunk_mask: torch.Tensor, full: torch.Tensor | LossScale, loss_agg: str,
                 objective: str = "entropylens") -> float:
    """Weight that makes sum_c weight_c * aggregate_loss(chunk_c) == aggregate_loss(full batch).

    Lets the trainer split N rollouts into micro-batches and accumulate gradients exactly. `full` is
    the batch's mask (one process) or the global `LossScale` of a batch sharded over ranks, where the
    ranks' weighted sums, averaged over ranks by DDP, equal the global batch's loss. Under the `paper`
    objective token_mean is verl's: each micro-batch's own token mean, weighted by its share of the
    sequences (dp_actor's loss_scale_factor), which equals the batch's token mean only for one micro-batch.
    """
    scale = LossScale.of(full) if isinstance(full, torch.Tensor) else full
    if loss_agg == "token_mean" and objective == "paper":
        return scale.world_size * chunk_mask.shape[0] / scale.sequences
    if loss_agg == "token_mean":
        return scale.world_size * float(chunk_mask.sum()) / max(scale.tokens, 1.0)
    if loss_agg == "seq_mean_token_mean":
        return scale.world_size * chunk_mask.shape[0] / scale.sequences
    if loss_agg == "seq_mean_token_sum_norm":  # the chunk divided its sums by its own T, not the global one
        return scale.world_size * chunk_mask.shape[0] / scale.sequences * chunk_mask.shape[1] / scale.length
    raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    loss_agg: str = "token_mean",
    objective: str = "entropylens",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scalar GRPO loss (clipped surrogate + beta * k3 KL to a reference) and the per-token clip flags.

    objective "paper" adds verl's dual-clip (c = 10, the authors' setting) and log-ratio clamp (see
    `clipped_surrogate`); with it, use `chunk_weight(..., objective="paper")` to accumulate micro-batches.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    paper = objective == "paper"
    per_token, clipped = clipped_surrogate(logp, old_logp, adv, mask, epsilon_low, epsilon_high,
                                           PAPER_CLIP_RATIO_C if paper else None,
                                           PAPER_LOG_RATIO_CLAMP if paper else None)  # (N, T)
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs ref_logp")
        per_token = per_token + beta * k3_kl(logp, ref_logp)
    return aggregate_loss(per_token, mask, loss_agg), clipped
