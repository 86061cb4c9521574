"""PMR: Prototypical Modal Rebalance (Fan et al., "PMR: Prototypical Modal Rebalance for
Multimodal Learning", CVPR 2023), on top of ``fusion_only``.

Each modality m keeps one prototype per class, ``c_k^m``: the mean encoder feature of class k.
A training sample's distances to its modality's prototypes make a non-parametric classifier,
``p^m = softmax(-||phi^m(x) - c^m||)``. Per step:

- score ``s^m = sum_i p^m_i[y_i]`` (summed over the batch, averaged over DDP ranks) and the
  imbalance ratio ``rho^m = s^m / mean of the other modalities' scores``;
- the slow modality (rho < 1) gets the prototypical cross-entropy ``PCE^m = CE(-d^m, y)``
  with weight ``beta^m = alpha * (1/rho^m - 1)``, which pulls its features towards their
  class prototypes and so speeds it up;
- the dominant modality (rho > 1) gets the prototypical entropy regularizer, ``-mu^m H(p^m)``
  with ``mu^m = mu * (rho^m - 1)``, during the first ``entropy_epochs`` epochs, which keeps it
  from converging early;
- the network loss is ``fusion_only``'s plus ``sum_m beta^m PCE^m - sum_m mu^m H(p^m)``.

Where we differ, and why:

- The released code switches the PCE weight between 0 and ``alpha`` (on the modality with the
  lower score) and has no entropy term. The paper weights both terms by the degree of
  imbalance; the exact functions used here (``1/rho - 1`` and ``rho - 1``, zero when balanced)
  are our choice, not checked against the paper's equations. ``PMR_DEFAULT_ALPHA = 1`` and the
  prototype momentum 0.2 are the released defaults. The entropy weight ``mu = 0.01`` over the
  first 10 epochs is our choice (the released code gives no value).
- Prototypes: the released code recomputes them at every epoch start from a tenth of the
  training set in eval mode, then averages with the previous ones (momentum 0.2). Here they
  come free from the training forward: the detached features of every training step are
  summed per class, and at each epoch end the class means are blended with the previous
  prototypes the same way. The rebalancing terms therefore start in epoch 2 (epoch 1 builds
  the first prototypes: a one-epoch warm-up the paper does not have).
- Distances use every encoder feature, for any number of modalities (rho against the mean
  of the others; with two modalities it is the paper's ratio).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engines.baselines import FusionOnly
from engines.methods import register_method
from engines.model_access import keep_features, last_features
from utils import distributed
from utils.errors import UserError

PMR_DEFAULT_ALPHA = 1.0
PMR_DEFAULT_MOMENTUM = 0.2
PMR_DEFAULT_ENTROPY_WEIGHT = 0.01
PMR_DEFAULT_ENTROPY_EPOCHS = 10
# Inside the square root of a squared distance: keeps its gradient finite at distance 0.
DISTANCE_EPSILON = 1e-12


def prototype_distances(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(B, D) features, (C, D) prototypes -> (B, C) Euclidean distances."""
    squared = (features.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(dim=-1)
    return squared.clamp(min=DISTANCE_EPSILON).sqrt()


def rebalance_weights(ratios: torch.Tensor, alpha: float, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(PCE weights beta, entropy weights mu) per modality from the imbalance ratios rho."""
    beta = alpha * (1.0 / ratios - 1.0).clamp(min=0)
    entropy = mu * (ratios - 1.0).clamp(min=0)
    return beta, entropy


class PrototypicalModalRebalance(FusionOnly):
    name = "pmr"

    def __init__(self, heads: Sequence[str], pmr_alpha: float = PMR_DEFAULT_ALPHA,
                 momentum: float = PMR_DEFAULT_MOMENTUM, entropy_weight: float = PMR_DEFAULT_ENTROPY_WEIGHT,
                 entropy_epochs: int = PMR_DEFAULT_ENTROPY_EPOCHS, **options):
        super().__init__(heads, **options)
        for label, value in (("alpha", pmr_alpha), ("entropy weight", entropy_weight)):
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"PMR {label} must be a non-negative number, got {value!r}")
        if not 0 <= momentum < 1:
            raise UserError(f"PMR prototype momentum must be in [0, 1), got {momentum!r}")
        self.alpha, self.momentum = float(pmr_alpha), float(momentum)
        self.entropy_weight, self.entropy_epochs = float(entropy_weight), int(entropy_epochs)
        self.prototypes: dict[str, torch.Tensor] = {}
        self.class_sums: dict[str, torch.Tensor] = {}
        self.class_counts: torch.Tensor | None = None
        self.epochs_done = 0
        self.extra_loss: torch.Tensor | float = 0.0
        self.last: dict[str, torch.Tensor] = {}

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        keep_features(model, self.name)

    # -- the step ---------------------------------------------------------------------------
    def forward_train(self, model, inputs, labels):
        logits = model(inputs)
        features = {m: last_features(model)[m] for m in self.modalities}
        self.accumulate(features, labels, logits["fusion"].shape[1])
        self.extra_loss = self.rebalance_loss(features, labels) if self.prototypes else 0.0
        return logits

    def network_loss(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        loss = super().network_loss(losses) + self.extra_loss
        self.extra_loss = 0.0  # used once: the next step computes its own
        return loss

    def rebalance_loss(self, features: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        sims = {m: -prototype_distances(features[m].float(), self.prototypes[m].to(features[m].device))
                for m in self.modalities}
        scores = torch.stack([torch.softmax(sims[m].detach(), dim=1).gather(1, labels.view(-1, 1)).sum()
                              for m in self.modalities])
        scores = distributed.all_reduce_mean(scores)  # every rank takes the same weights
        others = (scores.sum() - scores) / (len(scores) - 1)
        ratios = scores / others.clamp(min=torch.finfo(scores.dtype).tiny)
        beta, mu = rebalance_weights(ratios, self.alpha, self.entropy_weight)
        if self.epochs_done + 1 > self.entropy_epochs:
            mu = torch.zeros_like(mu)
        loss = 0.0
        for i, m in enumerate(self.modalities):
            if float(beta[i]) > 0:
                loss = loss + float(beta[i]) * F.cross_entropy(sims[m], labels)
            if float(mu[i]) > 0:
                log_p = torch.log_softmax(sims[m], dim=1)
                entropy = -(log_p.exp() * log_p).sum(dim=1).mean()
                loss = loss - float(mu[i]) * entropy
        self.record(ratios, beta)
        return loss

    # -- prototypes ---------------------------------------------------------------------------
    def accumulate(self, features, labels: torch.Tensor, num_classes: int) -> None:
        if self.class_counts is None:
            self.class_counts = torch.zeros(num_classes, device=labels.device)
            self.class_sums = {m: torch.zeros(num_classes, f.shape[1], device=labels.device)
                               for m, f in features.items()}
        self.class_counts.index_add_(0, labels, torch.ones_like(labels, dtype=self.class_counts.dtype))
        for m, f in features.items():
            self.class_sums[m].index_add_(0, labels, f.detach().float())

    def end_epoch(self, epoch, train, val) -> None:
        if self.class_counts is not None:
            counts = distributed.all_reduce_mean(self.class_counts)
            seen = counts > 0
            for m in self.modalities:
                means = distributed.all_reduce_mean(self.class_sums[m]) / counts.clamp(min=1).unsqueeze(1)
                previous = self.prototypes.get(m)
                previous = previous.to(means.device) if previous is not None else None
                if previous is None:
                    updated = means
                else:  # a class no sample of this epoch had keeps its prototype
                    blended = (1 - self.momentum) * means + self.momentum * previous
                    updated = torch.where(seen.unsqueeze(1), blended, previous)
                self.prototypes[m] = updated
            self.class_counts = None
            self.class_sums = {}
        self.epochs_done = epoch

    # -- what gets logged and checkpointed --------------------------------------------------
    def record(self, ratios: torch.Tensor, beta: torch.Tensor) -> None:
        per_head_ratio, per_head_beta = torch.ones(len(self.heads)), torch.zeros(len(self.heads))
        for i, m in enumerate(self.modalities):
            per_head_ratio[self.heads.index(m)] = float(ratios[i])
            per_head_beta[self.heads.index(m)] = float(beta[i])
        self.last = {"pmr_ratio": per_head_ratio, "pmr_beta": per_head_beta}

    def diagnostics(self) -> dict[str, torch.Tensor]:
        last, self.last = self.last, {}
        return last

    def get_extra_state(self):
        return {"prototypes": {m: p.cpu() for m, p in self.prototypes.items()}, "epochs_done": self.epochs_done}

    def set_extra_state(self, state) -> None:
        # Checkpoints are written at epoch ends, where the class accumulator is empty.
        state = state or {}
        self.prototypes = dict(state.get("prototypes", {}))
        self.epochs_done = int(state.get("epochs_done", 0))


@register_method("pmr")
def pmr(heads, pmr_alpha=PMR_DEFAULT_ALPHA, momentum=PMR_DEFAULT_MOMENTUM,
        entropy_weight=PMR_DEFAULT_ENTROPY_WEIGHT, entropy_epochs=PMR_DEFAULT_ENTROPY_EPOCHS, **options):
    return PrototypicalModalRebalance(heads, pmr_alpha=pmr_alpha, momentum=momentum, entropy_weight=entropy_weight,
                                      entropy_epochs=entropy_epochs, **options)
