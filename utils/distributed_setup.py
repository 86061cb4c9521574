"""Process-group lifetime for torchrun and the DDP wrapper (no-ops in a single process).

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; nothing else is
needed here. The backend is NCCL when the run trains on CUDA and gloo on CPU.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from utils.errors import UserError


def wants_cuda(device: str) -> bool:
    device = (device or "auto").strip().lower()
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


@contextlib.contextmanager
def distributed_session(cfg):
    """Join the process group when launched by torchrun (WORLD_SIZE > 1). On CUDA every
    process takes the GPU of its LOCAL_RANK, whatever ``--device`` named."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    backend = "nccl" if wants_cuda(cfg.device) else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise UserError(f"--device {cfg.device}: CUDA is not available on this machine; use --device cpu")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started process {local_rank} on a machine with "
                            f"{torch.cuda.device_count()} visible GPU(s); lower --nproc_per_node "
                            "or CUDA_VISIBLE_DEVICES")
        torch.cuda.set_device(local_rank)
        cfg.device = f"cuda:{local_rank}"
    dist.init_process_group(backend=backend)
    try:
        yield
    finally:
        dist.destroy_process_group()


def leaves_parameters_unused(model, method) -> bool:
    """Whether some parameters get no gradient in a step, which DDP must be told about:
    a method that trains only some heads (e.g. audio_only) leaves the other encoders idle."""
    if method is None:
        return False
    declared = getattr(method, "leaves_parameters_unused", None)
    if declared is not None:
        return bool(declared)
    heads = getattr(model, "heads", method.heads)
    return set(method.trained_heads()) != set(heads)


def wrap_model(model, device, method=None):
    """DistributedDataParallel around ``model`` under torchrun; the model itself otherwise
    (and a model that is already wrapped is returned as it is)."""
    if not (dist.is_available() and dist.is_initialized()) or isinstance(model, DistributedDataParallel):
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids,
                                   find_unused_parameters=leaves_parameters_unused(model, method))
