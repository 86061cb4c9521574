"""Online Logit Modulation: one learnable coefficient per head, trained towards logit-norm targets.

Plug-and-play contract (see README "Use LogitModulator in your own loop"):

    mod = LogitModulator(heads=("audio", "visual", "fusion"), target="rate")
    z_mod = mod.scale(logits)                       # head -> w_k * z_k, inside the CE
    loss = mod.norm_loss(logits, train_losses, heldout_losses)   # trains w only

Decisions that differ from the released snippet, and why:
- the reference losses are the mean over the first ``reference_steps`` calls, not the last
  batch of epoch 0 (one batch is a noisy reference for the whole run);
- CE and the norm loss are both means over the batch, so their ratio (and so the dynamics of
  the coefficients) is the released one while the scale no longer depends on batch size.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

TARGETS = ("rate", "loss_ratio")
TARGET_SCALES = ("reference", "mean")
# G and C are clamped here before G / C, as in the released method.
CLAMP_MIN = 1e-6
# A softmax whose largest entry exceeds this is "one-hot": the rate target has saturated.
SATURATION = 0.99


class LogitModulator(nn.Module):
    """Learnable per-head logit coefficients with the OLM logit-norm loss.

    Args:
        heads: head names, at least two, in the order of ``coefficients``.
        target: ``"rate"`` (generalization/convergence rates; the method) or
            ``"loss_ratio"`` (current over reference training loss; the variant).
        target_scale: for ``rate`` only: ``"reference"`` keeps the released scale (the
            softmax sums to 1, so targets are 1/M of the mean norm); ``"mean"`` multiplies the
            ratios by M so they average 1 like ``loss_ratio``.
        reference_steps: how many ``norm_loss`` calls average into the reference losses;
            during them the current losses are their own reference (uniform ratios).
    """

    def __init__(self, heads: Sequence[str], target: str = "rate",
                 target_scale: str = "reference", reference_steps: int = 1):
        super().__init__()
        heads = tuple(heads)
        if len(heads) < 2 or len(set(heads)) != len(heads):
            raise ValueError(f"heads must be at least two distinct names, got {heads}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if target_scale not in TARGET_SCALES:
            raise ValueError(f"target_scale must be one of {TARGET_SCALES}, got {target_scale!r}")
        if int(reference_steps) < 1:
            raise ValueError(f"reference_steps must be >= 1, got {reference_steps}")
        self.heads = heads
        self.target = target
        self.target_scale = target_scale
        self.reference_steps = int(reference_steps)
        self.coefficients = nn.Parameter(torch.ones(len(heads)))
        # Buffers, so state_dict() carries them and a resumed run continues identically.
        self.register_buffer("reference_train", torch.zeros(len(heads)))
        self.register_buffer("reference_heldout", torch.zeros(len(heads)))
        self.register_buffer("reference_count", torch.zeros((), dtype=torch.long))
        self.last: dict[str, torch.Tensor] = {}

    @property
    def collecting_reference(self) -> bool:
        return int(self.reference_count) < self.reference_steps

    def coefficient(self, head: str) -> torch.Tensor:
        return self.coefficients[self.heads.index(head)]

    def scale(self, logits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return head -> w_k * z_k, keeping autograd to both w and z."""
        return {head: self.coefficients[k] * logits[head] for k, head in enumerate(self.heads)}

    def _stack(self, losses: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        missing = [h for h in self.heads if h not in losses]
        if missing:
            raise KeyError(f"{name} lacks heads {missing}")
        device = self.coefficients.device
        return torch.stack([torch.as_tensor(losses[h]).detach().float().to(device).reshape(())
                            for h in self.heads])

    def _update_reference(self, train: torch.Tensor, heldout: torch.Tensor | None) -> None:
        count = int(self.reference_count) + 1
        self.reference_train += (train - self.reference_train) / count
        if heldout is not None:
            self.reference_heldout += (heldout - self.reference_heldout) / count
        self.reference_count += 1

    def target_ratios(self, train: torch.Tensor, heldout: torch.Tensor | None) -> torch.Tensor:
        """Ratios r (one per head) from detached loss vectors; also fills ``last``."""
        collecting = self.collecting_reference
        # While collecting, the current losses are their own reference: G = C = 0 and
        # q = 1, so the ratios come out uniform exactly as the formulas below give them.
        ref_train = train if collecting else self.reference_train
        if self.target == "loss_ratio":
            q = train / ref_train
            ratios = q / q.mean()
        else:
            ref_heldout = heldout if collecting else self.reference_heldout
            gain_g = ref_heldout - heldout
            gain_c = (ref_train - train) - gain_g
            ratios = torch.softmax(gain_g.clamp(min=CLAMP_MIN) / gain_c.clamp(min=CLAMP_MIN), dim=0)
            self.last["G"], self.last["C"] = gain_g, gain_c
            self.last["saturated"] = (ratios.max() > SATURATION).float()
            if self.target_scale == "mean":
                ratios = ratios * len(self.heads)
        return ratios

    def norm_loss(self, logits: Mapping[str, torch.Tensor],
                  train_losses: Mapping[str, torch.Tensor],
                  heldout_losses: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The logit-norm loss mean_b sum_k |w_k ||z_bk|| - t_bk|; its graph reaches w only.

        ``train_losses``/``heldout_losses`` are the per-head CE of the modulated logits on a
        training batch and on a held-out batch (the latter required for ``rate``). Each call
        counts one step towards ``reference_steps``.
        """
        if self.target == "rate" and heldout_losses is None:
            raise ValueError("target='rate' needs heldout_losses (per-head held-out CE)")
        self.last = {}
        train = self._stack(train_losses, "train_losses")
        heldout = self._stack(heldout_losses, "heldout_losses") if self.target == "rate" else None
        with torch.no_grad():
            ratios = self.target_ratios(train, heldout)
            if self.collecting_reference:
                self._update_reference(train, heldout)
        raw_norms = torch.stack([logits[h].detach().float().norm(dim=1) for h in self.heads], dim=1)
        norms = raw_norms * self.coefficients  # (B, M): only w carries gradient
        targets = (norms.detach().mean(dim=1, keepdim=True) * ratios).detach()
        loss = (norms - targets).abs().sum(dim=1).mean()
        self.last.update(ratios=ratios, targets_mean=targets.mean(0), norms_mean=norms.detach().mean(0))
        return loss

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, target={self.target!r}, target_scale={self.target_scale!r}, "
                f"reference_steps={self.reference_steps}")
