"""What every sampler in entropylens shares: which tokens end a response, the pad id, and the per-prompt seeds.

The trace (`entropylens trace`) and the trainer's rollouts both cut a response after its first stop token as
found here. Their sampling settings differ on purpose: a trace samples as the user asks (`--temperature`,
`--top-p`), the trainer samples pure temperature with every other warper off, because its log-probs must be
those of the policy that sampled.
"""

from __future__ import annotations

import hashlib

from entropylens.errors import UserError


def eos_ids(model, tokenizer) -> list[int]:
    """All ids that end a response: the tokenizer's EOS, then the generation config's, without repeats."""
    eos: list[int] = []
    gen = getattr(model, "generation_config", None)
    for src in (tokenizer.eos_token_id, getattr(gen, "eos_token_id", None)):
        eos += [src] if isinstance(src, int) else list(src or [])
    return list(dict.fromkeys(eos))


def eos_and_pad_ids(model, tokenizer) -> tuple[list[int], int]:
    """The stop ids and the pad id (the tokenizer's, else the first EOS); a model whose responses could never
    end is refused."""
    eos = eos_ids(model, tokenizer)
    if not eos:
        raise UserError("the tokenizer has no EOS token; completions could never end")
    return eos, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]


def sample_seed(seed: int, source_idx: int) -> int:
    """Seed of one traced prompt's samples (`--samples N`): a function of the run seed and the prompt only,
    never of the batch."""
    return (seed * 1_000_003 + 7_919 * (source_idx + 1)) % (1 << 62)


def group_seed(seed: int, step: int, index: int) -> int:
    """Sampling seed of one training prompt's group: a function of (run seed, step, the prompt's index in the
    step's global batch) only, so a group samples the same completions on any rank and next to any other prompts."""
    digest = hashlib.sha256(f"bupo-group/{seed}/{step}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: torch.manual_seed's range
