"""What the balancing methods need from a late-fusion model, checked once with one clear
sentence when a model lacks it (encoder features, detachable or shareable unimodal heads)."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from olmbalance import distributed
from olmbalance.errors import UserError


def keep_features(model: nn.Module, method_name: str) -> nn.Module:
    """Ask the model to keep its last encoder features; returns the bare model."""
    net = distributed.unwrap(model)
    if not hasattr(net, "keep_features") or not hasattr(net, "encoders"):
        raise UserError(f"--method {method_name} needs a late-fusion model that exposes its encoder "
                        f"features (keep_features); {type(net).__name__} does not")
    net.keep_features = True
    return net


def last_features(model: nn.Module) -> dict[str, torch.Tensor]:
    return distributed.unwrap(model).last_features


def encoder_parameters(model: nn.Module, modality: str) -> list[nn.Parameter]:
    return [p for p in distributed.unwrap(model).encoders[modality].parameters() if p.requires_grad]


def modality_parts(fusion: nn.Module, features: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """Each modality's share of ``fusion``'s logits, or None where the head mixes modalities
    before classifying (film, gated, attention, bilinear) and no such share exists."""
    split = getattr(fusion, "modality_logits", None)
    return split(features) if split is not None else None


def fuse(model: nn.Module, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The fusion head's logits for the given encoder features (modality -> (B, D)): what a
    method gets for features it masked, scaled or replaced (the encoders are not run again)."""
    net = distributed.unwrap(model)
    return net.fusion([features[m] for m in net.modalities])
