"""Sharded tracing under `torchrun`: which rank owns which batch, and the few sync points between ranks.

torchrun (or any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, multi-node
rendezvous included) starts one process per rank; each traces the batches it owns and writes their
Parquet parts into the same run folder. Ranks exchange only small Python objects (run id, timings),
so the process group is always gloo, on CPU and GPU machines alike. Batches go round-robin
(batch b -> rank b mod N): the batches, their seeds and so their rows are those of a one-process run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class Shard:
    """This process's place in a sharded run."""

    rank: int  # global rank, 0 .. world_size - 1; rank 0 owns the manifest and the final merge
    world_size: int
    local_rank: int  # rank on this node: picks cuda:<local_rank> on GPU nodes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, batch: int) -> bool:
        return batch % self.world_size == self.rank

    def barrier(self) -> None:
        dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def world_size() -> int:
    """Processes in this job, as the launcher (torchrun, accelerate launch) says; 1 without one. The one
    place entropylens reads the launcher's environment (the trainer's ranks too)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank as the launcher says; 0 without one."""
    return int(os.environ.get("RANK", "0"))


def shard_from_env() -> Shard | None:
    """The Shard of a process started by torchrun with WORLD_SIZE > 1, else None (a plain run)."""
    if world_size() <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Shard(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def close(shard: Shard | None) -> None:
    """Leave the process group (torch warns at exit otherwise)."""
    if shard is not None and dist.is_initialized():
        dist.destroy_process_group()
