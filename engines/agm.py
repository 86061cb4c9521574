"""AGM: Adaptive Gradient Modulation (Li et al., "Boosting Multi-modal Model Performance with
Adaptive Gradient Modulation", ICCV 2023), on top of ``fusion_only``.

Per step, the fusion head is also run with modalities masked (their features set to zero), and
each modality's *mono-modal response* is its Shapley share of the fusion logits:
``phi_m = sum over subsets S of the other modalities of |S|!(M-|S|-1)!/M! (f(S+m) - f(S))``,
plus ``f(empty)/M`` so that the responses add up to the fusion logits exactly (for two
modalities: ``phi_a = (f(a,v) - f(0,v) + f(a,0) - f(0,0)) / 2``). Then:

- score ``s_m`` = mean cross-entropy of the response ``phi_m`` (probabilities floored at 1e-8),
  averaged over DDP ranks so every rank takes the same coefficients;
- discrepancy ``r_m = exp(M/(M-1) * (mean_j s_j - s_m))`` (two modalities: ``exp(s_v - s_a)``
  for audio; above 1 when m currently fits better than the others);
- its running reference ``rbar_m``, the same formula on the running mean of the scores over
  every step so far (taken before this step's score joins it);
- coefficient ``k_m = exp(alpha * min(rbar_m - r_m, 10))``: a modality pulling ahead of its
  usual standing gets k < 1, one falling behind gets k > 1;
- the fusion logits that enter the loss are ``sum_m phi_m`` with the gradient through
  ``phi_m`` multiplied by ``k_m`` (same value, modulated backward).

Where we differ, and why:

- Masking: the released code feeds zero *inputs* through the encoders (three extra encoder
  forwards in eval mode); here the encoder *features* are zeroed before the fusion head, so
  the masked forwards cost only fusion-head evaluations. With a linear fusion head the two
  agree up to the encoders' response to a zero input.
- ``AGM_DEFAULT_ALPHA = 1.0`` is the released code's default (BalanceBenchmark uses 0.1).
  Modulation runs in every epoch, as in the released default.
- The unimodal heads are ``fusion_only``'s detached read-outs (the released model has none).
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Sequence

import torch

from engines.baselines import FusionOnly
from engines.methods import register_method
from engines.model_access import keep_features, last_features
from utils import distributed
from utils.errors import UserError

AGM_DEFAULT_ALPHA = 1.0
# The released code caps rbar - r at 10 before the exponential.
AGM_EXPONENT_CAP = 10.0
PROBABILITY_FLOOR = 1e-8


class ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, tensor, factor: float):
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def shapley_responses(fusion, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each modality's Shapley share of ``fusion(features)`` plus 1/M of the all-masked output;
    masked modalities get zero features. The shares sum to ``fusion(features)``."""
    count = len(features)
    cache: dict[frozenset, torch.Tensor] = {}

    def fused(present: frozenset) -> torch.Tensor:
        if present not in cache:
            cache[present] = fusion([f if i in present else torch.zeros_like(f) for i, f in enumerate(features)])
        return cache[present]

    responses = []
    for m in range(count):
        others = [i for i in range(count) if i != m]
        share = 0
        for size in range(count):
            weight = math.factorial(size) * math.factorial(count - size - 1) / math.factorial(count)
            for subset in combinations(others, size):
                share = share + weight * (fused(frozenset(subset) | {m}) - fused(frozenset(subset)))
        responses.append(share + fused(frozenset()) / count)
    return responses


def response_scores(responses: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each response, probabilities floored as in the released code."""
    scores = []
    for response in responses:
        p = torch.softmax(response.detach().float(), dim=1).gather(1, labels.view(-1, 1))
        scores.append(-p.clamp(min=PROBABILITY_FLOOR).log().mean())
    return torch.stack(scores)


def discrepancy(scores: torch.Tensor) -> torch.Tensor:
    count = len(scores)
    return torch.exp(count / (count - 1) * (scores.mean() - scores))


def agm_coefficients(scores: torch.Tensor, running_scores: torch.Tensor, alpha: float) -> torch.Tensor:
    gap = (discrepancy(running_scores) - discrepancy(scores)).clamp(max=AGM_EXPONENT_CAP)
    return torch.exp(alpha * gap)


class AdaptiveGradientModulation(FusionOnly):
    name = "agm"

    def __init__(self, heads: Sequence[str], agm_alpha: float = AGM_DEFAULT_ALPHA, **options):
        super().__init__(heads, **options)
        if len(self.modalities) < 2:
            raise UserError(f"--method agm needs at least two modality heads besides 'fusion'; "
                            f"this model has {', '.join(self.heads)}")
        if not (math.isfinite(agm_alpha) and agm_alpha > 0):
            raise UserError(f"AGM alpha must be a positive number, got {agm_alpha!r}")
        self.alpha = float(agm_alpha)
        self.register_buffer("running_scores", torch.zeros(len(self.modalities)))
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        self.last: dict[str, torch.Tensor] = {}
        self._sums, self._count = torch.zeros(len(self.heads)), 0
        self._reported = {h: 1.0 for h in self.heads}

    def setup(self, model) -> None:
        super().setup(model)
        net = keep_features(model, self.name)
        if tuple(net.modalities) != self.modalities:
            raise UserError(f"--method agm: the model's modalities {net.modalities} do not match its heads {self.heads}")

    def forward_train(self, model, inputs, labels):
        logits = model(inputs)
        net = distributed.unwrap(model)
        features = [last_features(model)[m] for m in self.modalities]
        responses = shapley_responses(net.fusion, features)
        scores = distributed.all_reduce_mean(response_scores(responses, labels))
        running = self.running_scores.to(scores.device)
        coefficients = agm_coefficients(scores, running, self.alpha)
        n = int(self.steps_seen)
        self.running_scores.copy_((running * n + scores) / (n + 1))
        self.steps_seen += 1
        logits["fusion"] = sum(ScaleGradient.apply(r, float(k)) for r, k in zip(responses, coefficients.tolist()))
        self.record(discrepancy(scores), coefficients)
        return logits

    def record(self, ratios: torch.Tensor, coefficients: torch.Tensor) -> None:
        ratio, k = torch.ones(len(self.heads)), torch.ones(len(self.heads))
        for i, m in enumerate(self.modalities):
            ratio[self.heads.index(m)] = float(ratios[i])
            k[self.heads.index(m)] = float(coefficients[i])
        self.last = {"discrepancy": ratio, "modulation": k}
        self._sums += k
        self._count += 1

    def coefficients(self) -> dict[str, float]:
        """Mean gradient coefficient k per head since the previous call (once per epoch)."""
        if self._count:
            self._reported = {h: float(v) for h, v in zip(self.heads, self._sums / self._count)}
            self._sums.zero_()
            self._count = 0
        return dict(self._reported)

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return dict(self.last)


@register_method("agm")
def agm(heads, agm_alpha=AGM_DEFAULT_ALPHA, **options):
    return AdaptiveGradientModulation(heads, agm_alpha=agm_alpha, **options)
