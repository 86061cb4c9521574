"""Baselines that run in the same loop as OLM, so every method is compared on one protocol.

- ``audio_only`` / ``visual_only``: only that modality's head loss trains (its encoder and
  linear head); the unimodal reference a multimodal model has to beat.
- ``fusion_only``: the classical joint training of the modality-imbalance literature. The
  encoders learn from the fusion loss alone; the unimodal heads are linear read-outs on
  detached features, trained only to measure what each encoder learned.
- ``ogm_ge``: On-the-fly Gradient Modulation with Generalization Enhancement (Peng et al.,
  CVPR 2022) on top of ``fusion_only``, as in its paper.
- ``olm_mean``: OLM's rate target with ``target_scale="mean"`` (ratios average 1).

Registering here is enough: ``engines.methods.build_method`` imports this module.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from torch import nn

from engines.methods import OLM, Method, register_method
from utils import distributed
from utils.errors import UserError

# The paper's default setting (and its recommendation for VGGSound); it recommends 0.8 for
# CREMA-D. Larger alpha slows the dominant encoder more.
OGM_DEFAULT_ALPHA = 0.1
# Added to the gradient's std so an all-zero gradient still gets a well-defined noise scale.
GE_STD_EPSILON = 1e-8


def unwrap(model: nn.Module) -> nn.Module:
    """The model itself when DistributedDataParallel wraps it."""
    return getattr(model, "module", model)


class UnimodalOnly(Method):
    """Train one modality's encoder and head alone; the other heads are never trained."""

    # Under DDP the other encoder and the fusion head get no gradient at all; a wrapper that
    # reads this flag can pass find_unused_parameters=True.
    leaves_parameters_unused = True

    def __init__(self, heads: Sequence[str], modality: str, **options):
        super().__init__(heads, **options)
        if modality not in self.heads:
            raise UserError(f"--method {modality}_only needs a model with a {modality!r} head; "
                            f"this one has {', '.join(self.heads)}")
        self.modality = modality
        self.name = f"{modality}_only"

    def trained_heads(self) -> tuple[str, ...]:
        return (self.modality,)

    def selection_head(self) -> str:
        return self.modality


@register_method("audio_only")
def audio_only(heads, **options):
    return UnimodalOnly(heads, "audio", **options)


@register_method("visual_only")
def visual_only(heads, **options):
    return UnimodalOnly(heads, "visual", **options)


class FusionOnly(Method):
    """Encoders trained by the fusion loss only; unimodal heads are detached read-outs.

    The network loss still sums every head's CE: the read-outs' CE reaches only their own
    linear layers because the model detaches the features they read.
    """

    name = "fusion_only"

    def __init__(self, heads: Sequence[str], **options):
        super().__init__(heads, **options)
        if "fusion" not in self.heads:
            raise UserError(f"--method {self.name} needs a model with a 'fusion' head; "
                            f"this one has {', '.join(self.heads)}")
        self.modalities = tuple(h for h in self.heads if h != "fusion")

    def setup(self, model: nn.Module) -> None:
        net = unwrap(model)
        if not hasattr(net, "detach_unimodal_heads"):
            raise UserError(f"--method {self.name} needs a late-fusion model with detachable "
                            f"unimodal heads; {type(net).__name__} has none")
        net.detach_unimodal_heads = True


@register_method("fusion_only")
def fusion_only(heads, **options):
    return FusionOnly(heads, **options)


def ogm_coefficient(ratio: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 10 of the OGM-GE paper: 1 - tanh(alpha * ratio) where the ratio exceeds 1, else 1.

    The paper (and its released code) uses ``alpha * ratio``, not ``alpha * (ratio - 1)``, so
    the coefficient jumps from 1 to 1 - tanh(alpha) as a modality becomes dominant.
    """
    return torch.where(ratio > 1, 1 - torch.tanh(alpha * ratio), torch.ones_like(ratio))


class OGMGE(FusionOnly):
    """OGM-GE: slow the dominant encoder's gradients, then add Gaussian noise (GE).

    Per step, the score of modality m is the sum over the batch of its read-out head's
    softmax probability of the true class. Its discrepancy ratio is its score over the mean
    score of the other modalities (s_a / s_v for two). A modality whose ratio exceeds 1 has
    every encoder gradient multiplied by ``ogm_coefficient``; with ``generalization=True``
    every encoder gradient then receives zero-mean Gaussian noise whose std is that
    (modulated) gradient tensor's own std, for both modalities, as in the paper's algorithm
    and its released code. The released code touches only conv weights; here every encoder
    parameter is modulated, which is what the paper's update rule writes.

    The noise comes from a generator seeded with the run's torch seed, so every DDP rank
    draws the same noise and a resumed run continues the same stream.
    """

    name = "ogm_ge"

    def __init__(self, heads: Sequence[str], alpha: float = OGM_DEFAULT_ALPHA,
                 generalization: bool = True, noise_seed: int | None = None, **options):
        super().__init__(heads, **options)
        if len(self.modalities) < 2:
            raise UserError(f"--method {self.name} needs at least two modality heads besides "
                            f"'fusion'; this model has {', '.join(self.heads)}")
        if not (math.isfinite(alpha) and alpha > 0):
            raise UserError(f"OGM-GE alpha must be a positive number, got {alpha!r}")
        self.alpha = float(alpha)
        self.generalization = bool(generalization)
        self.noise_seed = noise_seed
        self._generator: torch.Generator | None = None
        self._pending_generator_state: torch.Tensor | None = None
        self.last: dict[str, torch.Tensor] = {}
        self._coefficient_sums = torch.zeros(len(self.heads))
        self._coefficient_steps = 0
        self._reported = {h: 1.0 for h in self.heads}

    # -- the modulation -----------------------------------------------------------------
    def discrepancy_ratios(self, logits: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """One ratio per modality (order of ``self.modalities``), identical on every rank."""
        scores = torch.stack([
            torch.softmax(logits[m].detach().float(), dim=1).gather(1, labels.view(-1, 1)).sum()
            for m in self.modalities])
        scores = distributed.all_reduce_mean(scores)
        count = len(self.modalities)
        others_mean = (scores.sum() - scores) / (count - 1)
        return scores / others_mean.clamp(min=torch.finfo(scores.dtype).tiny)

    def after_backward(self, model: nn.Module, logits: Mapping[str, torch.Tensor],
                       labels: torch.Tensor) -> None:
        net = unwrap(model)
        ratios = self.discrepancy_ratios(logits, labels)
        coefficients = ogm_coefficient(ratios, self.alpha)
        for m, k in zip(self.modalities, coefficients.tolist()):
            for parameter in net.encoders[m].parameters():
                if parameter.grad is None:
                    continue
                if k != 1.0:
                    parameter.grad.mul_(k)
                if self.generalization and parameter.grad.numel() > 1:
                    parameter.grad.add_(self.gaussian_like(parameter.grad)
                                        * (parameter.grad.std() + GE_STD_EPSILON))
        self.record(ratios, coefficients)

    def gaussian_like(self, tensor: torch.Tensor) -> torch.Tensor:
        generator = self.noise_generator(tensor.device)
        return torch.randn(tensor.shape, generator=generator, device=tensor.device, dtype=tensor.dtype)

    def noise_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            generator = torch.Generator(device=device)
            seed = self.noise_seed if self.noise_seed is not None else torch.initial_seed()
            generator.manual_seed(int(seed))
            if self._pending_generator_state is not None:
                generator.set_state(self._pending_generator_state)
                self._pending_generator_state = None
            self._generator = generator
        return self._generator

    # -- what gets logged and checkpointed ----------------------------------------------
    def record(self, ratios: torch.Tensor, coefficients: torch.Tensor) -> None:
        per_head_ratio = torch.ones(len(self.heads))
        per_head_k = torch.ones(len(self.heads))
        for i, m in enumerate(self.modalities):
            per_head_ratio[self.heads.index(m)] = float(ratios[i])
            per_head_k[self.heads.index(m)] = float(coefficients[i])
        self.last = {"discrepancy": per_head_ratio, "modulation": per_head_k}
        self._coefficient_sums += per_head_k
        self._coefficient_steps += 1

    def coefficients(self) -> dict[str, float]:
        """Mean gradient coefficient k per head over the steps since the previous call (the
        trainer asks once per epoch); the fusion head is never modulated."""
        if self._coefficient_steps:
            means = self._coefficient_sums / self._coefficient_steps
            self._reported = {h: float(v) for h, v in zip(self.heads, means)}
            self._coefficient_sums.zero_()
            self._coefficient_steps = 0
        return dict(self._reported)

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return dict(self.last)

    def get_extra_state(self):
        generator = self._generator
        state = generator.get_state() if generator is not None else self._pending_generator_state
        return {"noise_generator": state}

    def set_extra_state(self, state) -> None:
        # Restored lazily: the generator is created on the gradients' device at first use.
        self._generator = None
        self._pending_generator_state = state.get("noise_generator") if state else None


@register_method("ogm_ge")
def ogm_ge(heads, alpha=OGM_DEFAULT_ALPHA, generalization=True, noise_seed=None, **options):
    return OGMGE(heads, alpha=alpha, generalization=generalization, noise_seed=noise_seed, **options)


@register_method("olm_mean")
def olm_mean(heads, target_scale=None, **options):
    """OLM's rate target with ratios that average 1; ``target_scale`` is fixed to "mean"."""
    method = OLM(heads, target="rate", target_scale="mean", **options)
    method.name = "olm_mean"
    return method
