"""Data-parallel BuPO under `torchrun` / `accelerate launch` (docs/scaling.md): one Accelerator, shards, rank-0 work.

A plain `entropylens bupo` (WORLD_SIZE unset or 1) never builds an Accelerator: `accelerator()` is None
and every helper here falls back to the one-process behaviour. Under a launcher each rank holds a
replica (DDP; gloo on CPU, NCCL on GPUs) or a shard (FSDP 2, from the user's accelerate config) of the
model, samples the rollouts of its own block of the step's prompts, and the wrapper's backward averages
the gradients. Rank 0 alone writes files, traces and evaluates; the others wait for it.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist

from entropylens.errors import UserError
from entropylens.tracing.shard import rank, world_size  # noqa: F401  (the launcher's view, read in one place)

if TYPE_CHECKING:
    from accelerate import Accelerator

T = TypeVar("T")
# ranks idle at a barrier while rank 0 traces and evaluates (tens of minutes on CPUs for SmolLM2)
BARRIER_TIMEOUT = timedelta(hours=3)
_ACCELERATOR: Accelerator | None = None


def accelerator(cpu: bool) -> Accelerator | None:
    """The job's Accelerator (created once, on first use), or None when running as a single process.

    `cpu` asks for the gloo backend on CPUs (accelerate would otherwise treat a CPU-only rank as a
    lone process). DDP looks for unused parameters because the internal phase freezes layers > k and
    the final norm: their gradients stay None (as in one process) instead of stalling the all-reduce.
    """
    global _ACCELERATOR
    if world_size() <= 1:
        return None
    if _ACCELERATOR is None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        acc = Accelerator(cpu=cpu or not torch.cuda.is_available(), kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=True),
            InitProcessGroupKwargs(timeout=BARRIER_TIMEOUT),
        ])
        check_supported(acc)
        _ACCELERATOR = acc
    return _ACCELERATOR


def close() -> None:
    """Leave the process group once the job is done, on every rank.

    Without it gloo's worker threads outlive the interpreter and a rank can abort at exit (SIGABRT,
    "terminate called without an active exception") after all its work succeeded. Call it only on
    success: a rank that fails while others sit in a collective would hang here instead of exiting.
    """
    global _ACCELERATOR
    if _ACCELERATOR is not None:
        _ACCELERATOR.wait_for_everyone()
        dist.destroy_process_group()
        _ACCELERATOR = None


def check_supported(acc: Accelerator) -> None:
    """One-line errors for launch setups the trainer cannot run correctly."""
    from accelerate.utils import DistributedType

    kind = acc.distributed_type
    if acc.num_processes != world_size():
        raise UserError(f"WORLD_SIZE is {world_size()} but accelerate set up {acc.num_processes} process(es) "
                        f"({kind}); launch with torchrun or `accelerate launch --multi_gpu`")
    if kind == DistributedType.FSDP and not getattr(acc, "is_fsdp2", False):
        raise UserError("FSDP needs `fsdp_version: 2` in the accelerate config (under FSDP 1 generate() on the "
                        "unwrapped model would find the root's parameters sharded)")
    if kind in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA):
        raise UserError(f"{kind} is not supported by the BuPO trainer; use DDP (multi_gpu / CPU) or FSDP 2")


def is_main(acc: Accelerator | None) -> bool:
    return acc is None or acc.is_main_process


def shards_parameters(acc: Accelerator | None) -> bool:
    """FSDP: every forward all-gathers parameters, so ranks must run the same number of forwards."""
    from accelerate.utils import DistributedType

    return acc is not None and acc.distributed_type == DistributedType.FSDP


def shard(n: int, index: int, world: int) -> slice:
    """Rank `index`'s contiguous block of n items (n divisible by world): the blocks in rank order are the n."""
    if n % world:
        raise ValueError(f"{n} items do not split evenly over {world} ranks")
    per = n // world
    return slice(index * per, (index + 1) * per)


def gather_rows(acc: Accelerator | None, rows: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (n, ...) rows in rank order; the rows themselves in one process."""
    return rows if acc is None else acc.gather(rows.to(acc.device)).cpu()


def barrier(acc: Accelerator | None) -> None:
    if acc is not None:
        acc.wait_for_everyone()


def _outcome(acc: Accelerator, fn: Callable[[], T], share: bool) -> tuple[bool, T | None]:
    """Run fn on rank 0 and tell every rank how it went (with its result if `share`): (is rank 0, result).

    A failure re-raises on rank 0 and raises on the others: without this they would stay blocked in
    their next collective call until the launcher tears the job down.
    """
    from accelerate.utils import broadcast_object_list

    box: list = [None]
    if acc.is_main_process:
        try:
            result = fn()
            box = [("ok", result if share else None)]
        except BaseException as e:
            box = [("user" if isinstance(e, UserError) else "error", f"{type(e).__name__}: {e}", str(e))]
            broadcast_object_list(box, from_process=0)
            raise
    broadcast_object_list(box, from_process=0)
    kind, *rest = box[0]
    if kind == "user":
        raise UserError(rest[1])
    if kind == "error":
        raise RuntimeError(f"rank 0 failed: {rest[0]}")
    return acc.is_main_process, result if acc.is_main_process else rest[0]


def main_only(acc: Accelerator | None, fn: Callable[[], T]) -> T:
    """fn() on rank 0 only; every rank gets its (picklable) result, or its error."""
    if acc is None:
        return fn()
    return _outcome(acc, fn, share=True)[1]


def main_first(acc: Accelerator | None, fn: Callable[[], T]) -> T:
    """fn() on rank 0, then on every other rank (e.g. a load that fills a cache the others then read)."""
    if acc is None:
        return fn()
    done, result = _outcome(acc, fn, share=False)
    return result if done else fn()
