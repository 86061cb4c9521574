"""MLA: Multimodal Learning with Alternating unimodal adaptation (Zhang et al., "Multimodal
Representation Learning by Alternating Unimodal Adaptation", CVPR 2024).

- One head shared by every modality: the model's unimodal heads are tied into one linear
  layer ``h`` at setup (the fusion head is never used).
- Alternating unimodal steps: step t trains only modality ``m = modalities[t mod M]``, with
  the loss ``CE(h(phi_m(x_m)), y)``; its encoder and ``h`` get gradients.
- Gradient modification against forgetting (the paper's orthogonal-weight-modification of
  the shared head): a projector ``P`` (D x D, starts at identity) shrinks the directions of
  the features the head has seen. At every step but the first, with ``r`` the batch-mean
  feature of the trained modality and ``a = 0.1 ** (1 + i/N)`` (i: step in the epoch, N:
  steps per epoch), ``k = P r``, ``P <- P - k k^T / (a + r^T k)``, ``P <- P / ||P||_F``, and
  the head's weight gradient ``G <- G + G P^T``.
- Test time: uncertainty-weighted fusion of the unimodal predictions, per sample:
  ``g_m = exp(max_j H_j - H_m) / sum_j exp(max_j H_j - H_m)`` with ``H`` the entropy of the
  softmax of ``h(phi_m)``; fusion logits ``sum_m g_m h(phi_m)``. The training epoch's fusion
  metrics use the same rule (on detached logits).

Where we differ, and why:

- The paper updates every modality on every batch (M optimizer steps per batch); the loop
  here takes one optimizer step per batch, so modalities alternate across batches: each
  encoder sees every M-th batch, and an MLA epoch costs about one joint epoch's forward but
  one encoder's backward. Both encoders still run forward every step (the DDP wrapper must
  see one forward per step); the idle one gets no gradient.
- The modification adds the projected gradient to the raw one, as in BalanceBenchmark's
  implementation, rather than replacing it.
- The step index i counts steps in the epoch (the paper: batches; the same here).
Under DDP the feature mean ``r`` is averaged over ranks, so ``P`` stays identical everywhere.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from engines.methods import Method, register_method
from engines.model_access import keep_features, last_features
from utils import distributed
from utils.errors import UserError


def entropy_weights(logits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-sample fusion weights (B, 1) per modality from the entropies of its prediction."""
    entropies = {}
    for m, z in logits.items():
        log_p = torch.log_softmax(z.float(), dim=1)
        entropies[m] = -(log_p.exp() * log_p).sum(dim=1, keepdim=True)
    most = torch.stack(list(entropies.values())).max(dim=0).values
    raw = {m: torch.exp(most - h) for m, h in entropies.items()}
    total = sum(raw.values())
    return {m: w / total for m, w in raw.items()}


def uncertainty_fusion(logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
    weights = entropy_weights(logits)
    return sum(weights[m] * logits[m].float() for m in logits)


def update_projector(projector: torch.Tensor, feature_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """One orthogonal-weight-modification update of P with the (1, D) feature mean r."""
    k = projector @ feature_mean.t()
    projector = projector - (k @ k.t()) / (alpha + feature_mean @ k)
    return projector / projector.norm(p="fro")


class AlternatingUnimodalAdaptation(Method):
    name = "mla"
    # The fusion head never trains, and the idle encoder gets no gradient in a step.
    leaves_parameters_unused = True

    def __init__(self, heads: Sequence[str], steps_per_epoch: int | None = None, **options):
        super().__init__(heads, **options)
        self.modalities = tuple(h for h in self.heads if h != "fusion")
        if "fusion" not in self.heads or len(self.modalities) < 2:
            raise UserError(f"--method mla needs a 'fusion' head and at least two modality heads; "
                            f"this model has {', '.join(self.heads)}")
        self.steps_per_epoch = max(1, int(steps_per_epoch or 1))
        self.register_buffer("turn", torch.zeros((), dtype=torch.long))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def setup(self, model) -> None:
        net = keep_features(model, self.name)
        heads = getattr(net, "unimodal_heads", None)
        if heads is None or set(heads.keys()) != set(self.modalities) or getattr(net, "detach_unimodal_heads", False):
            raise UserError(f"--method mla needs a late-fusion model with one trainable linear head per "
                            f"modality to share; {type(net).__name__} has none")
        shared = heads[self.modalities[0]]
        if any(tuple(heads[m].weight.shape) != tuple(shared.weight.shape) for m in self.modalities):
            raise UserError("--method mla shares one head between modalities, so every encoder must give "
                            "features of the same width")
        for m in self.modalities[1:]:
            heads[m] = shared  # one head: the optimizer sees its parameters once
        self.shared_head = [shared]  # a list, so the head is not registered as the method's own module
        width = shared.weight.shape[1]
        if "projector" not in self._buffers:
            self.register_buffer("projector", torch.eye(width, device=shared.weight.device))

    @property
    def active(self) -> str:
        return self.modalities[int(self.turn) % len(self.modalities)]

    def forward_train(self, model, inputs, labels):
        logits = model(inputs)
        with torch.no_grad():
            logits["fusion"] = uncertainty_fusion({m: logits[m] for m in self.modalities})
        return logits

    def forward_eval(self, model, inputs):
        logits = model(inputs)
        logits["fusion"] = uncertainty_fusion({m: logits[m] for m in self.modalities})
        return logits

    def network_loss(self, losses):
        return losses[self.active]

    def after_backward(self, model, logits, labels) -> None:
        head = self.shared_head[0]
        active = self.active
        feature_mean = last_features(model)[active].detach().float().mean(dim=0, keepdim=True)
        feature_mean = distributed.all_reduce_mean(feature_mean)
        if int(self.updates) > 0 and head.weight.grad is not None:
            step_in_epoch = int(self.updates) % self.steps_per_epoch
            alpha = 0.1 ** (1 + step_in_epoch / self.steps_per_epoch)
            self.projector.copy_(update_projector(self.projector, feature_mean.to(self.projector.device), alpha))
            grad = head.weight.grad
            grad.add_(grad @ self.projector.t().to(grad.dtype))
        self.updates += 1
        self.turn += 1

    def selection_head(self) -> str:
        return "fusion"


@register_method("mla")
def mla(heads, steps_per_epoch=None, **options):
    return AlternatingUnimodalAdaptation(heads, steps_per_epoch=steps_per_epoch, **options)
