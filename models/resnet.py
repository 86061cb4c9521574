"""ResNet18 encoders trained from scratch, for spectrograms and for stacks of frames."""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18

from models.frames import time_pooled
from models.mmtm import Stages

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


def resnet18_stages(net: nn.Module, clips: bool) -> Stages:
    """``resnet18_trunk`` cut after each residual stage (layer1-4), for the MMTM blocks Greedy
    places between encoders (models/mmtm.py); the same ops as torchvision's forward."""
    def stem(x):
        return net.maxpool(net.relu(net.bn1(net.conv1(x))))

    def pool(x):
        return net.fc(torch.flatten(net.avgpool(x), 1))

    blocks = (net.layer1, net.layer2, net.layer3, net.layer4)
    return Stages(stem, blocks, tuple(layer[-1].bn2.num_features for layer in blocks), pool, clips)


class AudioEncoder(nn.Module):
    """(B, 1, freq, time) spectrogram -> (B, 512)."""

    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.trunk = resnet18_trunk(in_channels)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        return self.trunk(spectrogram)

    def stages(self) -> Stages:  # where MMTM blocks may sit (Greedy; models/mmtm.py)
        return resnet18_stages(self.trunk, clips=False)


class VisualEncoder(nn.Module):
    """(B, T, 3, H, W) frames -> (B, 512): frames are folded into the batch, then the
    per-frame spatial averages are averaged over time (= pooling over time and space)."""

    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.trunk = resnet18_trunk(in_channels)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return time_pooled(self.trunk, frames)

    def stages(self) -> Stages:  # where MMTM blocks may sit (Greedy; models/mmtm.py)
        return resnet18_stages(self.trunk, clips=True)
