"""Gradient-Blending (Wang, Tran, Feiszli, "What Makes Training Multi-modal Classification
Networks Hard?", CVPR 2020), online variant.

Every head (each modality's and the fusion head) trains with its own loss weight ``w_k``.
Every ``window`` epochs the weights are re-estimated from how each head's losses moved over
the window, between a reference point (end of an earlier epoch) and now:

- generalization gain ``dG_k = L_val_ref - L_val_now`` (held-out loss fall),
- overfitting ``O = L_val - L_train`` and its growth ``dO_k = O_now - O_ref``,
- ``w_k`` proportional to ``dG_k / dO_k^2`` (the paper's overfitting-to-generalization ratio,
  inverted: heads that generalize much per unit of overfitting get more weight).

Where we differ from the paper, and why:

- The paper estimates dG and dO by training a copy of each unimodal model and the multimodal
  model for a super-epoch from the current checkpoint. Here every head already trains in the
  same multi-head network (as in the paper's multi-head G-Blend architecture), so the
  estimates are read from that one run: the train loss is the epoch's running mean of each
  head's batch losses, the held-out loss is each head's validation loss (the validation
  split is the held-out set everywhere in this project; test is never read). This costs
  nothing per step, at the price of estimates made under the current weights.
- Weights are normalized to sum to the number of heads (the paper: to 1), so uniform weights
  equal ``joint``'s and Adam's coupled weight decay keeps joint's strength.
- A negative generalization gain gives weight 0 (the paper's formula would give a negative
  weight); if every head has zero gain the previous weights are kept. dO^2 is floored at
  ``DO_FLOOR`` so a head whose overfitting did not change does not take all the weight.
- Until the first estimate (end of epoch 1 + window) the weights are uniform.
- Window: ``GB_DEFAULT_WINDOW`` epochs (BalanceBenchmark's online default is a super-epoch of
  10 in 30 epochs; our runs are about 10 epochs long, so the window is a fifth of that).

Under DDP the metrics handed to ``end_epoch`` are already reduced over ranks, so every rank
computes the same weights.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from engines.methods import Method, register_method
from utils.errors import UserError

GB_DEFAULT_WINDOW = 2
# Floor of dO^2 (losses in nats): below it a head's overfitting is taken as unchanged.
DO_FLOOR = 1e-4


def blending_weights(train_ref: torch.Tensor, val_ref: torch.Tensor, train_now: torch.Tensor,
                     val_now: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """G-Blend weights (summing to the number of heads) from per-head losses at two points."""
    gain = (val_ref - val_now).clamp(min=0)
    overfit_growth = (val_now - train_now) - (val_ref - train_ref)
    raw = gain / overfit_growth.pow(2).clamp(min=DO_FLOOR)
    if float(raw.sum()) <= 0:
        return previous.clone()
    return raw / raw.sum() * len(raw)


class GradientBlending(Method):
    name = "g_blending"

    def __init__(self, heads: Sequence[str], window: int = GB_DEFAULT_WINDOW, **options):
        super().__init__(heads, **options)
        if int(window) < 1:
            raise UserError(f"G-Blending window must be at least one epoch, got {window!r}")
        self.window = int(window)
        count = len(self.heads)
        # Buffers: saved in method.state_dict(), so a resumed run continues the same estimate.
        self.register_buffer("weights", torch.ones(count))
        self.register_buffer("reference", torch.zeros(2, count))  # rows: train, val losses
        self.register_buffer("reference_epoch", torch.zeros((), dtype=torch.long))

    def network_loss(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum(w * losses[h] for h, w in zip(self.heads, self.weights.tolist()))

    def end_epoch(self, epoch, train, val) -> None:
        now = torch.tensor([[train[h]["loss"] for h in self.heads], [val[h]["loss"] for h in self.heads]],
                           dtype=self.reference.dtype, device=self.reference.device)
        if int(self.reference_epoch) == 0:
            self.reference.copy_(now)
            self.reference_epoch.fill_(epoch)
            return
        if epoch - int(self.reference_epoch) < self.window:
            return
        self.weights.copy_(blending_weights(self.reference[0], self.reference[1], now[0], now[1], self.weights))
        self.reference.copy_(now)
        self.reference_epoch.fill_(epoch)

    def coefficients(self) -> dict[str, float]:
        """The loss weights in force for the next epoch."""
        return {h: float(w) for h, w in zip(self.heads, self.weights.cpu())}


@register_method("g_blending")
def g_blending(heads, window=GB_DEFAULT_WINDOW, **options):
    return GradientBlending(heads, window=window, **options)
