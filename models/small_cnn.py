"""A light convolutional encoder for the embedded AV-Digits set (``--encoder small_cnn``).

ResNet18 at AV-Digits' 64x64 spectrograms costs about 12x more per sample than this four-block
CNN; with it the main job could not make the ~1,000 coefficient steps OLM needs within a few
minutes on a 2-core CPU. The real datasets keep the released ResNet18.
"""
from __future__ import annotations

import torch
from torch import nn

from models.frames import time_pooled
from models.mmtm import Stages

SMALL_FEATURE_DIM = 128
WIDTHS = (32, 64, 128, SMALL_FEATURE_DIM)


def small_cnn_trunk(in_channels: int, widths=WIDTHS) -> nn.Sequential:
    """(N, C, H, W) -> (N, widths[-1]): stride-2 conv-BN-ReLU blocks, then global average pooling."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False),
                   nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


def small_cnn_stages(trunk: nn.Sequential, clips: bool) -> Stages:
    """``small_cnn_trunk`` cut after each conv-BN-ReLU block, for the MMTM blocks Greedy places
    between encoders (models/mmtm.py); the same modules in the same order as its forward."""
    blocks = tuple(trunk[i:i + 3] for i in range(0, len(trunk) - 2, 3))
    return Stages(nn.Identity(), blocks, tuple(block[1].num_features for block in blocks), trunk[-2:], clips)


class SmallAudioEncoder(nn.Module):
    """(B, 1, freq, time) spectrogram -> (B, 128)."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.trunk = small_cnn_trunk(in_channels)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        return self.trunk(spectrogram)

    def stages(self) -> Stages:  # where MMTM blocks may sit (Greedy; models/mmtm.py)
        return small_cnn_stages(self.trunk, clips=False)


class SmallVisualEncoder(nn.Module):
    """(B, T, 3, H, W) frames -> (B, 128), frames folded into the batch and averaged over time.
    Three blocks: a 16x16 frame is 2x2 after them."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.trunk = small_cnn_trunk(in_channels, WIDTHS[1:])

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return time_pooled(self.trunk, frames)

    def stages(self) -> Stages:  # where MMTM blocks may sit (Greedy; models/mmtm.py)
        return small_cnn_stages(self.trunk, clips=True)
