"""Turning ``--device`` into a torch.device, with one clear sentence when it cannot be used."""
from __future__ import annotations

import torch

from utils.errors import UserError


def resolve_device(name: str) -> torch.device:
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UserError(f"--device {name!r} is not supported; use cpu, cuda or cuda:N")
    return device


def channels_last(cfg, device: torch.device) -> bool:
    """--channels-last / --no-channels-last, else on with CUDA (convolutions on tensor cores run
    in NHWC; measured 1.38x fp32 on an H100, docs/results/bench-gpu.md) and off on the CPU."""
    setting = getattr(cfg, "channels_last", None)
    return device.type == "cuda" if setting is None else bool(setting)


# The backend --compile uses; tests swap in "aot_eager", which needs no C compiler.
COMPILE_BACKEND = "inductor"


def compile_model(model: torch.nn.Module, backend: str | None = None) -> torch.nn.Module:
    """torch.compile ``model``'s forward in place (``nn.Module.compile``): the module, its
    attributes and its state_dict keys stay those of the eager model, so checkpoints, --resume
    and the methods that reach into the model see no difference. Returns ``model``."""
    model.compile(backend=backend or COMPILE_BACKEND)
    return model
