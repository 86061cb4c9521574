"""MMPareto (Wei, Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal
Assistance", ICML 2024), on top of ``joint``.

The network loss is ``joint``'s: the fusion CE plus each modality's unimodal CE, the unimodal
heads reading the encoders' features. For the encoder of modality m (the parameters both
the multimodal loss and m's unimodal loss reach) the two gradients ``g_mm`` and ``g_m`` are
taken separately, and:

- if they do not conflict (cosine over the whole encoder > 0) they get equal weights 1/2;
- if they conflict, the Pareto (min-norm, MGDA) weights of the two:
  ``w_mm = clip(((g_m - g_mm) . g_m) / ||g_mm - g_m||^2, 0, 1)``, ``w_m = 1 - w_mm``;
- per parameter tensor, ``g = 2 (w_mm g_mm + w_m g_m)``, its norm raised to that of the plain
  sum ``g_mm + g_m`` when it is smaller (the magnitude is restored), then multiplied by
  ``gamma = 1.5`` (the released code's constant).

Fusion and unimodal heads keep their ordinary gradients.

Where we differ, and why:

- The released code runs one backward per loss. Here one backward of the total loss gives the
  sum ``g_mm + g_m`` on each encoder (the other modalities' unimodal losses do not reach it),
  and one extra backward of m's unimodal loss through its own encoder gives ``g_m``; then
  ``g_mm = sum - g_m``. Same gradients, fewer passes.
- Under DDP the extra gradient ``g_m`` is averaged over ranks (DDP averages the total), so
  the conflict test and the weights are identical on every rank.
"""
from __future__ import annotations

from typing import Sequence

import torch

from engines.methods import Method, register_method
from engines.model_access import encoder_parameters
from utils import distributed
from utils.errors import UserError

MMPARETO_GAMMA = 1.5


def min_norm_weights(g_mm: torch.Tensor, g_m: torch.Tensor) -> tuple[float, float]:
    """Weights (w_mm, w_m), summing to 1, of the min-norm point of the two gradients' hull."""
    difference = g_mm - g_m
    denominator = float(difference.dot(difference))
    if denominator == 0.0:
        return 0.5, 0.5
    w_mm = min(max(float((g_m - g_mm).dot(g_m)) / denominator, 0.0), 1.0)
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

    def __init__(self, heads: Sequence[str], gamma: float = MMPARETO_GAMMA, **options):
        super().__init__(heads, **options)
        if "fusion" not in self.heads or len(self.heads) < 3:
            raise UserError(f"--method mmpareto needs a 'fusion' head and a unimodal head per modality; "
                            f"this model has {', '.join(self.heads)}")
        self.modalities = tuple(h for h in self.heads if h != "fusion")
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


@register_method("mmpareto")
def mmpareto(heads, gamma=MMPARETO_GAMMA, **options):
    return MMPareto(heads, gamma=gamma, **options)
