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


def modality_weights(fusion: nn.Module, features: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """Each modality's block of ``fusion``'s classifier weight ((classes, D_m), with its graph),
    or None where the head mixes modalities before classifying and has no such blocks."""
    split = getattr(fusion, "modality_weights", None)
    return split(features) if split is not None else None


def add_mmtm(model: nn.Module, method_name: str, count: int, ratio: float) -> nn.Module:
    """Multimodal transfer modules after the last ``count`` stages of every encoder (Greedy's
    model; ``LateFusionClassifier.add_mmtm``); returns them, with ``frozen``/``track`` to set
    around a forward and ``bypass_parameters(i)``/``shared_parameters()``."""
    net = distributed.unwrap(model)
    add = getattr(net, "add_mmtm", None)
    if add is None:
        raise UserError(f"--method {method_name} needs a late-fusion model that takes multimodal transfer "
                        f"modules between its encoders' stages (add_mmtm); {type(net).__name__} does not")
    try:
        return add(count, ratio)
    except ValueError as error:
        raise UserError(f"--method {method_name} cannot put multimodal transfer modules in this model: {error}") from None


def has_modality_shares(model: nn.Module) -> bool:
    """Whether the fusion head's logits split into per-modality shares (``modality_parts``)."""
    return hasattr(getattr(distributed.unwrap(model), "fusion", None), "modality_logits")


def _through_output_layer(fusion: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    return fusion.output_layer(output)


def add_fusion_output_layer(model: nn.Module, method_name: str, seed: int) -> nn.Module:
    """A (classes x classes) linear layer after the fusion head (AMCo's ``linear_star``),
    returned. It is registered in the head as ``output_layer`` (saved with the model, trained by
    the network optimizer) and applied by a forward hook wherever the head runs: the model's
    forward, ``fuse`` and evaluation; ``modality_parts`` stays the head's own shares. Its
    weights come from ``seed`` (the global random stream is untouched). Once added it stays."""
    net = distributed.unwrap(model)
    fusion = getattr(net, "fusion", None)
    if fusion is None:
        raise UserError(f"--method {method_name} puts a layer after the late-fusion head; "
                        f"{type(net).__name__} has no fusion head")
    if getattr(fusion, "output_layer", None) is None:
        classes = next(m.out_features for m in reversed(list(fusion.modules())) if hasattr(m, "out_features"))
        reference = next(fusion.parameters())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layer = nn.Linear(classes, classes)
        fusion.add_module("output_layer", layer.to(device=reference.device, dtype=reference.dtype))
        fusion.register_forward_hook(_through_output_layer)
    return fusion.output_layer


def fusion_output_layer(model: nn.Module) -> nn.Module | None:
    """The layer ``add_fusion_output_layer`` put after the fusion head, or None."""
    return getattr(getattr(distributed.unwrap(model), "fusion", None), "output_layer", None)


def share_unimodal_head(model: nn.Module, method_name: str, modalities: Sequence[str]) -> nn.Module:
    """Tie every modality's unimodal head to the first one's, so one linear head reads each
    encoder's features (the optimizer sees it once); returns it. Refused in one sentence for a
    model without trainable unimodal heads of one width."""
    net = distributed.unwrap(model)
    heads = getattr(net, "unimodal_heads", None)
    if (heads is None or set(heads.keys()) != set(modalities) or getattr(net, "detach_unimodal_heads", False)
            or not all(isinstance(heads[m], nn.Linear) for m in modalities)):
        raise UserError(f"--method {method_name} needs a late-fusion model with one trainable linear head per "
                        f"modality to share; {type(net).__name__} has none")
    shared = heads[modalities[0]]
    if any(tuple(heads[m].weight.shape) != tuple(shared.weight.shape) for m in modalities):
        raise UserError(f"--method {method_name} shares one head between modalities, so every encoder must "
                        "give features of the same width")
    for m in modalities[1:]:
        heads[m] = shared
    return shared


def add_model_scalar(model: nn.Module, name: str, value: float) -> nn.Parameter:
    """A float32 scalar parameter registered on the model under ``name`` (so the network
    optimizer trains it, DDP averages its gradient and the model's checkpoint carries it);
    returned. Once added it stays, whatever ``value`` a later call gives."""
    net = distributed.unwrap(model)
    if getattr(net, name, None) is None:
        device = next(net.parameters()).device
        net.register_parameter(name, nn.Parameter(torch.tensor(float(value), device=device)))
    return getattr(net, name)
