"""The few collective operations the methods need; each is a no-op in a single process, so
a method written against them runs unchanged alone or under torchrun (torch only)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself when DistributedDataParallel wraps it."""
    return getattr(model, "module", model)


def collective_device() -> torch.device:
    """Where small tensors must live for a collective: NCCL only reduces CUDA tensors."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (returns it unchanged in a single process)."""
    if not is_distributed():
        return tensor
    reduced = tensor.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / world_size()
