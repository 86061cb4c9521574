"""ResNet18 encoders trained from scratch, for spectrograms and for stacks of frames."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18

from models.frames import time_pooled

FEATURE_DIM = 512


def resnet18_trunk(in_channels: int) -> nn.Module:
    """torchvision's ResNet18 without its classifier: (N, C, H, W) -> (N, 512), any H, W.

    Global average pooling makes it work at any input size; conv1 is rebuilt when the input
    is not RGB (a spectrogram has one channel).
    """
    net = resnet18(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    return net


class AudioEncoder(nn.Module):
    """(B, 1, freq, time) spectrogram -> (B, 512)."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.trunk = resnet18_trunk(in_channels)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        return self.trunk(spectrogram)


class VisualEncoder(nn.Module):
    """(B, T, 3, H, W) frames -> (B, 512): frames are folded into the batch, then the
    per-frame spatial averages are averaged over time (= pooling over time and space)."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.trunk = resnet18_trunk(in_channels)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return time_pooled(self.trunk, frames)
