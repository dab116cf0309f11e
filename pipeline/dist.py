"""Scale-out with torch.distributed (launched by torchrun): who owns which samples and output shards.

Input shards are split across ranks in their canonical (by name) order, or, with fewer shards than ranks,
samples by a keyed hash of their key (so every copy of a key meets in one rank). Each
rank draws, scores and ranks what it owns; the per-class bottom-k draws and top-k heaps are merged
exactly (the top-k of a union is the top-k of the parts' top-ks), so every rank ends with the same plan,
and output shards are split across ranks. One process is the same code with a world of one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

from .heap import TopK
from .keyed import keyed_u64

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    split_by_shard: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard_positions(self, num_shards: int) -> list[int]:
        """The input shards this rank reads, as positions in the canonical (by name) shard order."""
        if self.split_by_shard:
            return list(range(self.rank, num_shards, self.world))
        return list(range(num_shards))

    def owns_sample(self, position: int, key: str) -> bool:
        if self.split_by_shard:
            return position % self.world == self.rank
        return keyed_u64(0, "owner", key) % self.world == self.rank

    def owns_output(self, shard_no: int) -> bool:
        return shard_no % self.world == self.rank

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def merge_top(self, local: dict[Hashable, Sequence[T]], k: int,
                  order: Callable[[T], Any]) -> dict[Hashable, Sequence[T]]:
        """Every rank's per-class top-k merged exactly, on every rank: the top-k of a union is the top-k
        of the parts' top-ks, so the result is the single-process one. Classes in sorted order. With one
        rank that is `local` itself, not copied (it may be numpy rows: copying would rebuild every item)."""
        if self.world == 1:
            return {c: local[c] for c in sorted(local)}
        heaps: dict[Hashable, TopK[T]] = {}
        for part in self.gather(local):
            for c, items in part.items():
                heap = heaps.setdefault(c, TopK(k, order))
                for item in items:
                    heap.push(item)
        return {c: heaps[c].finish()[0] for c in sorted(heaps)}

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def from_environment(num_shards: int, use_cuda: bool, timeout_s: float = 1800.0) -> Ranks:
    """The ranks torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK), else one process.
    `timeout_s` bounds every collective: a dead peer fails the run instead of blocking the others."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, split_by_shard=num_shards >= world)


def restarts_share_the_agent_store() -> bool:
    """torchrun restarts workers (--max-restarts) while sharing its rendezvous TCP store with them: a
    restarted worker can then read a dead peer's address and fail or hang (pytorch/pytorch#135712).
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment avoids it."""
    return (int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0
            and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True")


def shutdown(ranks: Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
