"""Multimodal transfer modules (MMTM; Vaezi Joze et al., "MMTM: Multimodal Transfer Module for
CNN Fusion", CVPR 2020) between the stages of a late-fusion model's encoders, in the variant
Greedy trains with (Wu et al., ICML 2022; github nyukat/greedy_multimodal_learning,
``src/balanced_mmtm.py`` ``MMTM_mitigate``; the method is ``olmbalance/greedy.py``).

An encoder opts in by a ``stages()`` method describing where it can be cut (``Stages``: its
stem, its stages and their output channels, its pooling). ``LateFusionClassifier.add_mmtm``
attaches an ``MMTMExchange``: one MMTM after each of the last ``count`` stages of every
encoder (counted from the end, so encoders of different depth pair their deepest stages).
Without it the model's forward is what it always was.

One MMTM: squeeze each modality's map to per-channel means (over space, and over the frames
of a clip), ``hidden = relu(W_s [s_0, s_1])`` with ``W_s`` of width ``2 (C_0 + C_1) / ratio``,
per modality the scale ``sigmoid(W_m hidden)``, and each map multiplied channelwise by its
scale. During the steps Greedy trains with ``track`` on, each modality's batch-mean scale is
folded into a running mean over the run's training steps (``running_scale``, a buffer); when a
modality is ``frozen``, its scale is that running mean instead, a constant: its branch then
receives nothing from the other modality (the authors' "re-balancing" step).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from olmbalance import distributed


@dataclass(frozen=True)
class Stages:
    """An encoder cut at its stage boundaries: ``pool(blocks[-1](...blocks[0](stem(x))))`` is
    its forward, op for op. With ``clips`` the input is (B, T, C, H, W) frames (or one frame,
    (B, C, H, W)), folded into the batch before the stem and averaged over time after ``pool``,
    as ``models.frames.time_pooled`` does."""

    stem: Callable[[torch.Tensor], torch.Tensor]
    blocks: tuple[nn.Module, ...]
    channels: tuple[int, ...]  # output channels of each block
    pool: Callable[[torch.Tensor], torch.Tensor]  # last map -> (N, D)
    clips: bool = False


def clip_means(maps: torch.Tensor, batch: int) -> torch.Tensor:
    """(B*T, C, ...) -> (B, C): each channel's mean over a clip's frames and positions."""
    channels = maps.shape[1]
    frames = maps.shape[0] // batch
    if frames == 1:  # the released squeeze: a view (B, C, -1) and its mean
        return maps.reshape(batch, channels, -1).mean(dim=-1)
    per_clip = maps.reshape(batch, frames, channels, -1).transpose(1, 2)
    return per_clip.reshape(batch, channels, -1).mean(dim=-1)


def rescale(maps: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(B*T, C, ...) maps times their clip's (B, C) scale, channelwise."""
    frames = maps.shape[0] // scale.shape[0]
    if frames > 1:
        scale = scale.repeat_interleave(frames, dim=0)
    return maps * scale.view(*scale.shape, *(1,) * (maps.dim() - 2))


class MMTM(nn.Module):
    """One multimodal transfer module over the maps of every modality (see the module docstring)."""

    def __init__(self, channels: Sequence[int], ratio: float = 4):
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        total = sum(self.channels)
        hidden = int(2 * total / ratio)  # the released width
        if hidden < 1:
            raise ValueError(f"ratio {ratio} leaves no squeeze units for {total} channels")
        self.squeeze = nn.Linear(total, hidden)
        self.excite = nn.ModuleList(nn.Linear(hidden, c) for c in self.channels)
        # Every modality's running mean scale, one after the other, and the steps it averages.
        self.register_buffer("running_scale", torch.zeros(total))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def forward(self, maps: Sequence[torch.Tensor], batch: int, frozen: int | None = None,
                track: bool = False) -> list[torch.Tensor]:
        squeezed = torch.cat([clip_means(x, batch) for x in maps], dim=1)
        hidden = F.relu(self.squeeze(squeezed))
        scales = [torch.sigmoid(excite(hidden)) for excite in self.excite]
        if track:
            with torch.no_grad():
                # Under DDP the mean over every rank's batch, so the running means (and the
                # re-balancing steps that use them) are identical on every rank.
                batch_mean = distributed.all_reduce_mean(torch.cat([s.detach().float().mean(dim=0) for s in scales]))
                steps = self.updates.to(batch_mean.dtype)
                self.running_scale.copy_((batch_mean + self.running_scale * steps) / (steps + 1))
                self.updates += 1
        if frozen is not None:  # this batch's mean already folded in, as released
            constant = self.running_scale.split(self.channels)[frozen]
            scales[frozen] = constant.to(scales[frozen].dtype).expand(batch, -1)
        return [rescale(x, s) for x, s in zip(maps, scales)]


class MMTMExchange(nn.Module):
    """MMTM blocks after each encoder's last ``len(blocks)`` stages; ``forward(encoders,
    inputs)`` runs the encoders stage by stage and returns their features (modality -> (B, D)).

    ``frozen`` (a modality's index, or None) and ``track`` are set by the training method
    around one forward (olmbalance.greedy) and are off otherwise: evaluation, and any other
    forward, neither freezes a scale nor moves the running means."""

    def __init__(self, modalities: Sequence[str], channels: Sequence[Sequence[int]], ratio: float = 4):
        super().__init__()
        self.modalities = tuple(modalities)
        self.blocks = nn.ModuleList(MMTM(c, ratio) for c in channels)
        self.frozen: int | None = None
        self.track = False

    @staticmethod
    def stages_of(encoders: Mapping[str, nn.Module], modalities: Sequence[str], count: int) -> dict[str, Stages]:
        """Each encoder's ``Stages``; ValueError (one clause) when one cannot take ``count`` blocks."""
        found = {}
        for m in modalities:
            describe = getattr(encoders[m], "stages", None)
            if describe is None:
                raise ValueError(f"its {m} encoder ({type(encoders[m]).__name__}) does not expose stages")
            found[m] = describe()
            if len(found[m].blocks) < count:
                raise ValueError(f"its {m} encoder has {len(found[m].blocks)} stages, fewer than the {count} asked for")
        return found

    @classmethod
    def between(cls, encoders: Mapping[str, nn.Module], modalities: Sequence[str], count: int,
                ratio: float = 4) -> "MMTMExchange":
        if count < 1:
            raise ValueError(f"the number of stages with an MMTM block must be at least 1, got {count}")
        stages = cls.stages_of(encoders, modalities, count)
        channels = [[stages[m].channels[len(stages[m].blocks) - count + i] for m in modalities] for i in range(count)]
        exchange = cls(modalities, channels, ratio)
        reference = next(encoders[modalities[0]].parameters(), None)
        return exchange.to(reference.device) if reference is not None else exchange

    def forward(self, encoders: Mapping[str, nn.Module], inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        count = len(self.blocks)
        stages = self.stages_of(encoders, self.modalities, count)
        batch = inputs[self.modalities[0]].shape[0]
        maps = {}
        for m in self.modalities:
            x = inputs[m]
            if stages[m].clips:  # frames folded into the batch, as models.frames.time_pooled
                x = (x.unsqueeze(1) if x.dim() == 4 else x).flatten(0, 1)
            x = stages[m].stem(x)
            for block in stages[m].blocks[:len(stages[m].blocks) - count]:  # stages before the first MMTM
                x = block(x)
            maps[m] = x
        for i, mmtm in enumerate(self.blocks):
            for m in self.modalities:
                maps[m] = stages[m].blocks[len(stages[m].blocks) - count + i](maps[m])
            exchanged = mmtm([maps[m] for m in self.modalities], batch, self.frozen, self.track and self.training)
            maps = dict(zip(self.modalities, exchanged))
        features = {}
        for m in self.modalities:
            pooled = stages[m].pool(maps[m])
            features[m] = pooled.view(batch, -1, pooled.shape[-1]).mean(dim=1) if stages[m].clips else pooled
        return features

    def bypass_parameters(self, index: int) -> list[nn.Parameter]:
        """Modality ``index``'s own excitation layers, over every block."""
        return [p for block in self.blocks for p in block.excite[index].parameters()]

    def shared_parameters(self) -> list[nn.Parameter]:
        """The squeeze layers every modality's scale depends on."""
        return [p for block in self.blocks for p in block.squeeze.parameters()]
