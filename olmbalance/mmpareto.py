"""MMPareto (Wei, Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal
Assistance", ICML 2024), on top of ``joint``.

Follows the authors' released code, github GeWu-Lab/MMPareto_ICML2024: ``code/MMPareto.py``
``train_epoch`` (per-loss gradients, the conflict test, the weights, the magnitude restoration
and ``gamma``), ``code/min_norm_solvers.py`` ``MinNormSolver._min_norm_element_from2`` (the
two-gradient min-norm weights) and ``main``/``get_arguments`` for the recipe. BalanceBenchmark's
``balancemm/trainer/MMPareto_trainer.py`` was read too (it names gamma ``alpha``, 1.5).

The network loss is ``joint``'s: the fusion CE plus each modality's unimodal CE, the unimodal
heads reading the encoders' features. For the encoder of modality m (every parameter of it:
the released code takes every ``audio``/``visual`` parameter that is not a head's) the two
gradients ``g_mm`` and ``g_m`` are taken separately, and:

- if they do not conflict (cosine over the whole encoder > 0) they get equal weights 1/2;
- if they conflict, the Pareto (min-norm) weights of the two, as ``_min_norm_element_from2``
  gives them: ``w_mm = ((g_m - g_mm) . g_m) / ||g_mm - g_m||^2``, or 0.999 when
  ``g_mm . g_m >= ||g_mm||^2`` and 0.001 when ``g_mm . g_m >= ||g_m||^2``; ``w_m = 1 - w_mm``;
- per parameter tensor, ``g = 2 (w_mm g_mm + w_m g_m)``, its norm raised to that of the plain
  sum ``g_mm + g_m`` when it is smaller (the magnitude is restored), then multiplied by
  ``gamma = 1.5`` (the released code's constant).

Fusion and unimodal heads keep their ordinary gradients.

The authors' recipe (``--recipe authors``; ``get_arguments`` and ``main``): SGD lr 2e-3,
momentum 0.9, weight decay 1e-4, StepLR(30, 0.1), batch 64, 50 epochs, batch-mean CE. By
default a run takes the dataset's recipe (Adam on every set): there, ``gamma`` and the
magnitude restoration are largely normalized away, since Adam divides each parameter's step
by the running root mean square of its own gradient, so a constant factor such as ``gamma``
cancels exactly (up to Adam's epsilon) and the per-tensor rescaling only matters through how
it varies from step to step; the direction rule (the Pareto weights) remains. Under SGD both
act on the step size, as the authors ran it.

Where we differ, and why:

- The released code runs one backward per loss. Here one backward of the total loss gives the
  sum ``g_mm + g_m`` on each encoder (the other modalities' unimodal losses do not reach it),
  and one extra backward of m's unimodal loss through its own encoder gives ``g_m``; then
  ``g_mm = sum - g_m``. Same gradients up to float rounding, fewer passes.
- Where the combination is zero the released code divides by its zero norm (NaN gradients);
  here the gradient is left at zero.
- With more than two modalities each encoder is treated the same way against its own
  unimodal loss (the released code has two).
- Under DDP the extra gradient ``g_m`` is averaged over ranks (DDP averages the total), so
  the conflict test and the weights are identical on every rank.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from olmbalance.base import Method
from olmbalance.registry import RunContext, Setting, register_method
from olmbalance.model_access import encoder_parameters
from olmbalance import distributed
from olmbalance.errors import UserError

MMPARETO_GAMMA = 1.5


def min_norm_weights(g_mm: torch.Tensor, g_m: torch.Tensor) -> tuple[float, float]:
    """Weights (w_mm, w_m), summing to 1, of the min-norm point of the two gradients' hull,
    with the released solver's ends (0.999 and 0.001, never exactly 1 and 0)."""
    mm_mm, mm_m, m_m = float(g_mm.dot(g_mm)), float(g_mm.dot(g_m)), float(g_m.dot(g_m))
    if mm_m >= mm_mm:
        return 0.999, 0.001
    if mm_m >= m_m:
        return 0.001, 0.999
    w_mm = (m_m - mm_m) / (mm_mm + m_m - 2 * mm_m)
    return w_mm, 1.0 - w_mm


def pareto_weights(g_mm: torch.Tensor, g_m: torch.Tensor) -> tuple[float, float, float]:
    """(w_mm, w_m, cosine): equal weights without conflict, min-norm weights with one."""
    cosine = float(torch.nn.functional.cosine_similarity(g_mm, g_m, dim=0))
    if cosine > 0:
        return 0.5, 0.5, cosine
    return (*min_norm_weights(g_mm, g_m), cosine)


def combine(g_mm: torch.Tensor, g_m: torch.Tensor, w_mm: float, w_m: float, gamma: float = MMPARETO_GAMMA) -> torch.Tensor:
    """One parameter tensor's new gradient, magnitude restored to at least that of the sum."""
    combined = 2 * (w_mm * g_mm + w_m * g_m)
    norm, summed_norm = combined.norm(), (g_mm + g_m).norm()
    if float(norm) > 0 and float(summed_norm) > float(norm):
        combined = combined * (summed_norm / norm)
    return combined * gamma


class MMPareto(Method):
    name = "mmpareto"

    def __init__(self, heads: Sequence[str], context: RunContext | None = None, gamma: float = MMPARETO_GAMMA):
        super().__init__(heads, context)
        if "fusion" not in self.heads or len(self.heads) < 3:
            raise UserError(f"--method mmpareto needs a 'fusion' head and a unimodal head per modality; "
                            f"this model has {', '.join(self.heads)}")
        self.modalities = tuple(h for h in self.heads if h != "fusion")
        if not (math.isfinite(gamma) and gamma > 0):
            raise UserError(f"--mmpareto-gamma must be a positive number, got {gamma!r}")
        self.gamma = float(gamma)
        self.last: dict[str, torch.Tensor] = {}

    def setup(self, model) -> None:
        net = distributed.unwrap(model)
        if not hasattr(net, "encoders") or getattr(net, "detach_unimodal_heads", False):
            raise UserError(f"--method mmpareto needs a late-fusion model whose unimodal heads train their "
                            f"encoders; {type(net).__name__} is not one")

    def backward(self, model, loss, losses, for_backward) -> None:
        for_backward(loss).backward(retain_graph=True)
        cosines, conflicts = torch.ones(len(self.heads)), torch.zeros(len(self.heads))
        for index, m in enumerate(self.modalities):
            parameters = [p for p in encoder_parameters(model, m) if p.grad is not None]
            if not parameters:
                continue
            unimodal = torch.autograd.grad(for_backward(losses[m]), parameters, allow_unused=True,
                                           retain_graph=index < len(self.modalities) - 1)
            unimodal = [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, unimodal)]
            flat_m = distributed.all_reduce_mean(torch.cat([g.flatten() for g in unimodal]))
            flat_sum = torch.cat([p.grad.flatten() for p in parameters])
            flat_mm = flat_sum - flat_m
            w_mm, w_m, cosine = pareto_weights(flat_mm, flat_m)
            offset = 0
            for p in parameters:
                size = p.numel()
                g_m = flat_m[offset:offset + size].view_as(p)
                g_mm = flat_mm[offset:offset + size].view_as(p)
                p.grad.copy_(combine(g_mm, g_m, w_mm, w_m, self.gamma))
                offset += size
            cosines[self.heads.index(m)] = cosine
            conflicts[self.heads.index(m)] = float(cosine <= 0)
        self.last = {"gradient_cosine": cosines, "conflict": conflicts}

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return dict(self.last)


@register_method("mmpareto", prefix="mmpareto",
                 settings=(Setting("gamma", float, MMPARETO_GAMMA,
                                   "factor on the combined encoder gradients (released 1.5; under Adam it cancels)"),),
                 recipes={"authors": {"*": dict(optimizer="sgd", lr=2e-3, momentum=0.9, weight_decay=1e-4, lr_step=30,
                                                lr_gamma=0.1, loss_reduction="mean", batch_size=64, epochs=50)}},
                 summary="MMPareto, Pareto integration of multimodal and unimodal gradients (Wei & Hu, ICML 2024)")
def mmpareto(heads, context, gamma):
    return MMPareto(heads, context, gamma=gamma)
