"""Process-group helpers that degrade to no-ops in a single process."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

# The methods package carries the primitives it needs; re-exported so the project has one copy.
from olmbalance.distributed import all_reduce_mean, collective_device, is_distributed, unwrap, world_size  # noqa: F401


def rank() -> int:
    """This process's rank; torchrun's RANK still counts after the group is gone, so code that
    reports after training (the summary table) runs on rank 0 only."""
    if is_distributed():
        return dist.get_rank()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("RANK", "0"))
    return 0


def is_main() -> bool:
    return rank() == 0

def all_reduce_sum(value: int) -> int:
    """Sum of a count over ranks."""
    if not is_distributed():
        return int(value)
    total = torch.tensor([int(value)], dtype=torch.long, device=collective_device())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one: lets all ranks take the same
    branch, since a rank that skips a collective the others enter hangs them."""
    if not is_distributed():
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.long, device=collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_buffers(module: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them before each training forward, but each rank then updates them with its
    own batch; evaluation and checkpoints must all see rank 0's, which is what gets saved.
    """
    if not is_distributed():
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)
