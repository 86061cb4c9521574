"""Training methods as small objects plugged into the one loop (engines/engines_logits_com.py).

A method decides, per step, which logits enter the cross-entropies (``scale``), how the
per-head losses combine into the network loss (``network_loss``), what happens to gradients
before the optimizer step (``after_backward``), and whether it trains extra parameters with a
second optimizer (``coefficient_parameters`` + ``coefficient_loss``). The loop does the rest.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from engines.olm import LogitModulator
from utils.errors import UserError

METHODS: dict[str, Callable[..., "Method"]] = {}


def register_method(name: str):
    def wrap(factory):
        METHODS[name] = factory
        return factory
    return wrap


class Method(nn.Module):
    """Base: joint training of every head with coefficients fixed at 1."""

    name = "joint"
    needs_heldout = False  # does coefficient_loss want held-out losses?

    def __init__(self, heads: Sequence[str], **options):
        super().__init__()
        self.heads = tuple(heads)
        self.options = options

    def setup(self, model: nn.Module) -> None:
        """Adjust the model once before training (e.g. detach read-out heads)."""

    def trained_heads(self) -> tuple[str, ...]:
        return self.heads

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


@register_method("joint")
class Joint(Method):
    """Sum of every head's CE; the reference OLM is measured against."""


class OLM(Method):
    """Online Logit Modulation with a ``LogitModulator`` over every head."""

    def __init__(self, heads: Sequence[str], target: str = "rate", target_scale: str = "reference",
                 reference_steps: int = 1, reference_tail: int | None = None, **options):
        super().__init__(heads, **options)
        self.name = "olm" if target == "rate" else "olm_loss_ratio"
        self.modulator = LogitModulator(heads, target=target, target_scale=target_scale,
                                        reference_steps=reference_steps, reference_tail=reference_tail)
        self.needs_heldout = target == "rate"

    def scale(self, logits):
        return self.modulator.scale(logits)

    def coefficient_parameters(self):
        return [self.modulator.coefficients]

    def heldout_due(self):
        # The reference window's tail is measured on a fresh held-out batch every step: every
        # later G is a difference from it, so its noise would bias G for the whole run, while
        # the noise of the losses reused between passes averages out over the steps.
        return self.needs_heldout and self.modulator.in_reference_tail

    def coefficient_loss(self, logits, train_losses, heldout_losses=None):
        return self.modulator.norm_loss(logits, train_losses, heldout_losses)

    def coefficients(self):
        return {h: float(w) for h, w in zip(self.heads, self.modulator.coefficients.detach().cpu())}

    def diagnostics(self):
        return dict(self.modulator.last)


@register_method("olm")
def olm(heads, target_scale="reference", **options):
    return OLM(heads, target="rate", target_scale=target_scale, **options)


@register_method("olm_loss_ratio")
def olm_loss_ratio(heads, target_scale="reference", **options):
    return OLM(heads, target="loss_ratio", target_scale=target_scale, **options)


def check_method_name(name: str) -> None:
    # Baselines and the balancing methods live in their own modules and register on import.
    import engines.agm  # noqa: F401
    import engines.baselines  # noqa: F401
    import engines.g_blending  # noqa: F401
    import engines.mla  # noqa: F401
    import engines.mmpareto  # noqa: F401
    import engines.pmr  # noqa: F401
    if name not in METHODS:
        raise UserError(f"unknown method {name!r} (--method); choose one of: {', '.join(sorted(METHODS))}")


def build_method(name: str, heads: Sequence[str], **options) -> Method:
    check_method_name(name)
    return METHODS[name](heads, **options)


def method_from_config(cfg, heads: Sequence[str], train_size: int) -> Method:
    """The method a run's config asks for; OLM's reference spans one epoch unless
    ``--reference-steps`` says otherwise."""
    steps_per_epoch = math.ceil(train_size / cfg.batch_size)
    reference_steps = cfg.reference_steps or steps_per_epoch
    # --reference-tail is a share of the window: its last ceil(share * steps) steps make L0.
    reference_tail = max(1, math.ceil(getattr(cfg, "reference_tail", 1.0) * reference_steps))
    return build_method(cfg.method, heads, target_scale=cfg.target_scale, reference_steps=reference_steps,
                        reference_tail=reference_tail, alpha=cfg.ogm_alpha, steps_per_epoch=steps_per_epoch,
                        modulation_epochs=(cfg.ogm_modulation_starts, cfg.ogm_modulation_ends))
