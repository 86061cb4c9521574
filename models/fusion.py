"""Late-fusion heads: a list of per-modality features (B, D_m) -> fusion logits (B, C).

Heads whose logits are a sum of per-modality terms (``sum``, ``concat``) also expose
``modality_logits(features)``: each modality's own share of the fusion logits, which OGM-GE
scores modalities by (``modality_parts`` returns None for the heads that mix modalities), and
``modality_weights(features)``: each modality's block of the classifier weight, which MMCosine
normalizes (``olmbalance.model_access.modality_weights``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

# What the methods need from a fusion head lives with them (olmbalance, torch only).
from olmbalance.model_access import modality_parts  # noqa: F401

FUSIONS = ("sum", "concat", "film", "gated", "attention", "bilinear", "bilinear_full")


class SumFusion(nn.Module):
    """Each modality gets its own linear classifier; the fusion logits are their sum."""

    def __init__(self, dims: Sequence[int], num_classes: int):
        super().__init__()
        self.classifiers = nn.ModuleList(nn.Linear(d, num_classes) for d in dims)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return sum(fc(f) for fc, f in zip(self.classifiers, features))

    def modality_logits(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each modality's own classifier, bias included (they add up to the fusion logits)."""
        return [fc(f) for fc, f in zip(self.classifiers, features)]

    def modality_weights(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each modality's classifier weight, (classes, D_m); the biases are not part of it."""
        return [fc.weight for fc in self.classifiers]


class ConcatFusion(nn.Module):
    def __init__(self, dims: Sequence[int], num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(sum(dims), num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.classifier(torch.cat(list(features), dim=1))

    def modality_logits(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each modality's block of the weight applied to its features, plus an equal share
        of the bias (half of it with two modalities); the parts add up to the fusion logits."""
        weights = self.classifier.weight.split([f.shape[1] for f in features], dim=1)
        bias = self.classifier.bias / len(features)
        return [f @ w.t() + bias for f, w in zip(features, weights)]

    def modality_weights(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each modality's block of the weight, (classes, D_m), cut at the features' widths (the
        bias is shared by all modalities and belongs to none)."""
        return list(self.classifier.weight.split([f.shape[1] for f in features], dim=1))


class FiLMFusion(nn.Module):
    """The first modality's features are scaled and shifted by the other modalities'."""

    def __init__(self, dims: Sequence[int], num_classes: int):
        super().__init__()
        self.film = nn.Linear(sum(dims[1:]), 2 * dims[0])
        self.classifier = nn.Linear(dims[0], num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        gamma, beta = self.film(torch.cat(list(features[1:]), dim=1)).chunk(2, dim=1)
        return self.classifier(gamma * features[0] + beta)


class GatedFusion(nn.Module):
    """Per-modality projections mixed by sigmoid gates computed from all modalities."""

    def __init__(self, dims: Sequence[int], num_classes: int, hidden: int = 512):
        super().__init__()
        self.projections = nn.ModuleList(nn.Linear(d, hidden) for d in dims)
        self.gates = nn.Linear(sum(dims), len(dims))
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        gates = torch.sigmoid(self.gates(torch.cat(list(features), dim=1)))
        projected = torch.stack([p(f) for p, f in zip(self.projections, features)], dim=1)
        return self.classifier((gates.unsqueeze(-1) * projected).sum(dim=1))


class AttentionFusion(nn.Module):
    """Self-attention over one token per modality, then mean over the tokens."""

    def __init__(self, dims: Sequence[int], num_classes: int, hidden: int = 512, num_heads: int = 8):
        super().__init__()
        self.projections = nn.ModuleList(nn.Linear(d, hidden) for d in dims)
        self.attention = nn.MultiheadAttention(hidden, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        tokens = torch.stack([p(f) for p, f in zip(self.projections, features)], dim=1)
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.classifier(self.norm(tokens + attended).mean(dim=1))


class BilinearFusion(nn.Module):
    """The released ``bilinear`` head: each modality projected by its own ``Linear(D, D)``, the
    projections multiplied elementwise, then ``Linear(D, classes)``; exactly two modalities."""

    def __init__(self, dims: Sequence[int], num_classes: int):
        super().__init__()
        if len(dims) != 2:
            raise ValueError(f"fusion 'bilinear' takes exactly two modalities, got {len(dims)}")
        if dims[0] != dims[1]:
            raise ValueError(f"fusion 'bilinear' needs equal feature widths, got {dims[0]} and {dims[1]}")
        self.projections = nn.ModuleList(nn.Linear(d, d) for d in dims)
        self.classifier = nn.Linear(dims[0], num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        first, second = (p(f) for p, f in zip(self.projections, features))
        return self.classifier(first * second)


class FullBilinearFusion(nn.Module):
    """z = x1^T W x2 + b with a full ``nn.Bilinear``: D1 x D2 weights per class (81M parameters
    at 512 x 512 x 309 classes); not the released head, kept as ``bilinear_full``."""

    def __init__(self, dims: Sequence[int], num_classes: int):
        super().__init__()
        if len(dims) != 2:
            raise ValueError(f"fusion 'bilinear_full' takes exactly two modalities, got {len(dims)}")
        self.bilinear = nn.Bilinear(dims[0], dims[1], num_classes)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.bilinear(features[0], features[1])


_BUILDERS = {"sum": SumFusion, "concat": ConcatFusion, "film": FiLMFusion,
             "gated": GatedFusion, "attention": AttentionFusion, "bilinear": BilinearFusion,
             "bilinear_full": FullBilinearFusion}


def build_fusion(name: str, dims: Sequence[int], num_classes: int) -> nn.Module:
    if name not in _BUILDERS:
        raise ValueError(f"unknown fusion {name!r}; choose one of {', '.join(FUSIONS)}")
    if len(dims) < 2:
        raise ValueError("late fusion needs at least two modalities")
    return _BUILDERS[name](list(dims), num_classes)
