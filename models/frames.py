"""Visual encoders see clips as several frames: each frame goes through a per-image trunk."""
from __future__ import annotations

import torch
from torch import nn


def time_pooled(trunk: nn.Module, frames: torch.Tensor) -> torch.Tensor:
    """(B, T, C, H, W) frames (or (B, C, H, W), one per clip) -> (B, D): frames are folded into
    the batch for ``trunk`` ((N, C, H, W) -> (N, D)), then averaged over time."""
    if frames.dim() == 4:  # a single frame per clip
        frames = frames.unsqueeze(1)
    batch, steps = frames.shape[:2]
    return trunk(frames.flatten(0, 1)).view(batch, steps, -1).mean(dim=1)
