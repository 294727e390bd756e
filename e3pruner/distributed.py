"""Data parallelism under `torchrun`: which rank am I, which rows of a batch are mine, and
the few collectives the search and recovery loops need.

A global batch of B rows is split into `world_size` contiguous shards of B / world_size
rows (B must divide evenly, so every rank's per-token mean has the same weight and the
mean of the ranks' gradients is the gradient of the whole batch). Every rank draws the
same masks and noise (counter-based RNG keyed by row), so only losses and gradients are
exchanged. Rank 0 alone writes files (checkpoints, metrics, state, export, report).

Strategies for recovery: "ddp" (torch DistributedDataParallel over the trainable
student) and "fsdp" (FSDP2 `fully_shard` of each trainable decoder layer and the final
norm: parameters, gradients and optimizer state sharded across ranks; the frozen
embedding and head stay replicated because the fused KD kernel reads the head whole).
Backend: gloo on CPU, nccl on CUDA.

The "entropy" KD weighting divides by the mean teacher entropy of the tokens in one
forward, so under torchrun it normalizes per rank (as it does per micro-batch under
gradient accumulation); per-token weightings ("none", "normalized_entropy",
"confidence") give the single-process update exactly (tested).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    strategy: str = "ddp"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_divides(self, rows: int, what: str) -> None:
        if rows % self.world_size:
            raise ValueError(f"{what} ({rows}) must be divisible by the number of processes "
                             f"({self.world_size}) so every rank gets the same share")

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of dim 0 (B / world_size rows)."""
        if not self.enabled:
            return batch
        self.check_divides(batch.shape[0], "the batch size")
        per = batch.shape[0] // self.world_size
        return batch[self.rank * per:(self.rank + 1) * per]

    def strided(self, n: int) -> range:
        """Indices of n work items owned by this rank (round robin; any n)."""
        return range(self.rank, n, self.world_size)

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's equal-shape `t` along dim 0, in rank order."""
        if not self.enabled:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, 0)

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def average_grads_(self, params) -> None:
        if not self.enabled:
            return
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= self.world_size

    def broadcast(self, obj):
        """Rank 0's value of a picklable object, on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. builds a cache), the others after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


SINGLE = DistContext()


def init_distributed(env: Mapping[str, str], device: str = "cpu",
                     strategy: str = "ddp") -> DistContext:
    """The context for this process: a single process unless `torchrun` set WORLD_SIZE."""
    if strategy not in STRATEGIES:
        raise ValueError(f"--parallel must be one of {STRATEGIES}, got {strategy!r}")
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(strategy=strategy)
    rank = int(env["RANK"])
    if not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(env.get("LOCAL_RANK", rank)))
        dist.init_process_group("nccl" if cuda else "gloo")
    return DistContext(rank=rank, world_size=world, strategy=strategy)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
