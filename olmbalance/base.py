"""The hooks a training method plugs into the one loop with.

A method decides, per step, which logits enter the cross-entropies (``scale``), how the
per-head losses combine into the network loss (``network_loss``), what happens to gradients
before the optimizer step (``after_backward``), and whether it trains extra parameters with a
second optimizer (``coefficient_parameters`` + ``coefficient_loss``). The loop does the rest.
The loop gives ``end_epoch`` training and validation metrics only, never test metrics.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from olmbalance.registry import RunContext, register_method


class EpochData:
    """What ``Method.start_epoch`` may read: batches of the training split (in a seeded order
    of their own, without consuming the training loader's random stream) and of the
    validation split, already on the training device, as ``(inputs, labels)``.

    A loop outside this project implements the same two methods over its own loaders."""

    def train_batches(self, share: float = 1.0):
        """Batches covering about ``share`` (0-1] of the training split."""
        raise NotImplementedError

    def val_batches(self):
        raise NotImplementedError


class Method(nn.Module):
    """Base: joint training of every head with coefficients fixed at 1."""

    name = "joint"
    needs_heldout = False  # does coefficient_loss want held-out losses?

    def __init__(self, heads: Sequence[str], context: RunContext | None = None):
        super().__init__()
        self.heads = tuple(heads)
        self.context = context or RunContext()

    def setup(self, model: nn.Module) -> None:
        """Adjust the model once before training (e.g. detach read-out heads)."""

    def trained_heads(self) -> tuple[str, ...]:
        return self.heads

    def substeps(self) -> int:
        """Optimizer steps the loop takes on each batch, each with its own forward_train, losses,
        backward, after_backward and step (MLA: one per modality, the method keeping its turn)."""
        return 1

    def selection_head(self) -> str:
        """The head whose validation accuracy picks the best epoch."""
        return "fusion" if "fusion" in self.heads else self.heads[0]

    def scale(self, logits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(logits)

    def network_loss(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum(losses[h] for h in self.trained_heads())

    def forward_train(self, model: nn.Module, inputs, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The training step's logits: where a method adds forwards (AGM's masked-modality
        fusions), loss terms of its own (PMR) or replaces a head's logits."""
        return model(inputs)

    def backward(self, model: nn.Module, loss: torch.Tensor, losses: Mapping[str, torch.Tensor],
                 for_backward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Backward of the network loss. ``losses`` are the per-head losses with the loop's loss
        weight applied; ``for_backward`` applies the AMP loss scale (identity without it).
        MMPareto takes per-loss gradients here."""
        for_backward(loss).backward()

    def after_backward(self, model: nn.Module, logits: Mapping[str, torch.Tensor],
                       labels: torch.Tensor) -> None:
        """Hook between backward and the optimizer step (gradient modulation)."""

    def forward_eval(self, model: nn.Module, inputs) -> dict[str, torch.Tensor]:
        """Evaluation-time logits (MLA fuses its unimodal predictions here)."""
        return model(inputs)

    def start_epoch(self, epoch: int, model: nn.Module, data: "EpochData") -> None:
        """Called before each training epoch (1-based), on every rank, with the bare model and
        access to the training and validation data (``EpochData``), never to test data: where a
        method computes something from the data itself (PMR's prototypes, G-Blending's
        estimates). The model's training flag is restored by the caller."""

    def end_epoch(self, epoch: int, train: Mapping[str, dict], val: Mapping[str, dict]) -> None:
        """Called after each epoch's validation with the per-head metrics reduced over ranks
        (``train[head]["loss"]``, ``val[head]["loss"]``, ...), identical on every rank."""

    def coefficient_parameters(self) -> list[nn.Parameter]:
        return []

    def heldout_due(self) -> bool:
        """Does this step need fresh held-out losses whatever ``--heldout-every`` says?"""
        return False

    def coefficient_loss(self, logits, train_losses, heldout_losses=None) -> torch.Tensor | None:
        return None

    def coefficients(self) -> dict[str, float]:
        return {h: 1.0 for h in self.heads}

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Per-step tensors (one value per head, or a scalar) averaged by the loop per epoch."""
        return {}


class AddedLossTerms:
    """Mixin (listed before the method's base class) for a method whose ``forward_train``
    computes loss terms of its own: it sets ``self.extra_loss`` there and ``network_loss`` adds
    it to the heads' losses once (the next step computes its own); ``self.last`` holds the
    step's diagnostics until the loop reads them."""

    extra_loss: torch.Tensor | float = 0.0
    last: Mapping[str, torch.Tensor] = MappingProxyType({})

    def network_loss(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        loss = super().network_loss(losses) + self.extra_loss
        self.extra_loss = 0.0
        return loss

    def diagnostics(self) -> dict[str, torch.Tensor]:
        last, self.last = self.last, {}
        return dict(last)


@register_method("joint", summary="sum of every head's cross-entropy; the reference OLM is measured against")
def joint(heads, context):
    return Method(heads, context)
