"""Online Logit Modulation: one learnable coefficient per head, trained towards logit-norm targets.

Plug-and-play contract (see README "Use LogitModulator in your own loop"):

    mod = LogitModulator(heads=("audio", "visual", "fusion"), target="rate")
    z_mod = mod.scale(logits)                       # head -> w_k * z_k, inside the CE
    loss = mod.norm_loss(logits, train_losses, heldout_losses)   # trains w only

Decisions that differ from the released snippet, and why:
- the reference losses are the mean over the last ``reference_tail`` calls of the first
  ``reference_steps`` calls (by default the last quarter of the first epoch), not the last
  batch of epoch 0 alone (one batch is a noisy reference for the whole run), nor the whole
  first epoch (that folds the near-chance losses of the first steps into G);
- held-out losses are measured like training losses (:func:`heldout_forward`): normalization
  layers use the held-out batch's own statistics, but their running statistics and dropout
  are left untouched;
- ``norm_loss`` is a mean over the batch; the released code sums it (and its CE) over the
  batch. Under Adam that matters only where a coupled weight decay is added to the
  gradient: the trainer multiplies both losses by the batch size (``--loss-reduction sum``,
  the default), which is the released sum exactly.
- ``scale`` and ``norm_loss`` compute in float32 whatever autocast is active: ``w_k * z_k``
  in fp16 or bf16 would also give w's gradient in that precision (under fp16 loss scaling it
  overflows while the network's gradient stays finite).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import contextlib

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

TARGETS = ("rate", "loss_ratio")
TARGET_SCALES = ("reference", "mean")
# G and C are clamped here before G / C, as in the released method.
CLAMP_MIN = 1e-6
# A softmax whose largest entry exceeds this is "one-hot": the rate target has saturated.
SATURATION = 0.99
# How a held-out forward normalizes (see heldout_forward).
HELDOUT_NORMS = ("batch", "running")


@contextlib.contextmanager
def heldout_forward(model: nn.Module, norm: str = "batch"):
    """Put ``model`` in the state a held-out forward needs, and restore it afterwards.

    ``norm="batch"``: the held-out loss is measured like the training loss: BatchNorm (and
    any running-statistics norm) normalizes with the held-out batch's own statistics, while
    its running mean/var and ``num_batches_tracked`` stay byte-identical, and dropout is off.
    ``norm="running"``: plain ``eval()``: normalization with the running statistics. Early
    in training those are far from the data, which inflates the held-out losses that become
    OLM's reference, so G and C then compare losses measured two different ways.
    Gradients are not disabled here: wrap the forward in ``torch.no_grad()``.
    """
    if norm not in HELDOUT_NORMS:
        raise ValueError(f"norm must be one of {HELDOUT_NORMS}, got {norm!r}")
    modes = {module: module.training for module in model.modules()}
    norms = [m for m in model.modules() if isinstance(m, _NormBase)] if norm == "batch" else []
    tracking = {m: m.track_running_stats for m in norms}
    model.eval()
    for module in norms:
        # training=True with track_running_stats=False: batch statistics, and the running
        # buffers are neither read nor written (num_batches_tracked included).
        module.training = True
        module.track_running_stats = False
    try:
        yield model
    finally:
        for module in norms:
            module.track_running_stats = tracking[module]
        for module, mode in modes.items():
            module.training = mode


def float32_region(tensor: torch.Tensor):
    """Autocast off on ``tensor``'s device: what runs inside keeps float32 inputs in float32."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


class LogitModulator(nn.Module):
    """Learnable per-head logit coefficients with the OLM logit-norm loss.

    Args:
        heads: head names, at least two, in the order of ``coefficients``.
        target: ``"rate"`` (generalization/convergence rates; the method) or
            ``"loss_ratio"`` (current over reference training loss; the variant).
        target_scale: for ``rate`` only: ``"reference"`` keeps the released scale (the
            softmax sums to 1, so targets are 1/M of the mean norm); ``"mean"`` multiplies the
            ratios by M so they average 1 like ``loss_ratio``.
        reference_steps: how many first ``norm_loss`` calls make the reference window;
            during them the current losses are their own reference (uniform ratios).
        reference_tail: how many of the window's last calls are averaged into the reference
            losses (``None`` or >= ``reference_steps``: the whole window; 1: its last call,
            the released semantics).
    """

    def __init__(self, heads: Sequence[str], target: str = "rate",
                 target_scale: str = "reference", reference_steps: int = 1,
                 reference_tail: int | None = None):
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
        if reference_tail is not None and int(reference_tail) < 1:
            raise ValueError(f"reference_tail must be >= 1 or None, got {reference_tail}")
        self.heads = heads
        self.target = target
        self.target_scale = target_scale
        self.reference_steps = int(reference_steps)
        self.reference_tail = min(int(reference_tail or reference_steps), self.reference_steps)
        self.coefficients = nn.Parameter(torch.ones(len(heads)))
        # Buffers, so state_dict() carries them and a resumed run continues identically.
        self.register_buffer("reference_train", torch.zeros(len(heads)))
        self.register_buffer("reference_heldout", torch.zeros(len(heads)))
        self.register_buffer("reference_count", torch.zeros((), dtype=torch.long))
        self.last: dict[str, torch.Tensor] = {}
        # A host copy of reference_count: reading the buffer every step would make the host
        # wait for the device (a CUDA sync per step). Refreshed from the buffer after loading.
        self._host_count: int | None = 0

    def _count(self) -> int:
        if self._host_count is None:
            self._host_count = int(self.reference_count)
        return self._host_count

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_count = None

    @property
    def collecting_reference(self) -> bool:
        return self._count() < self.reference_steps

    @property
    def in_reference_tail(self) -> bool:
        """Will the next ``norm_loss`` call be averaged into the reference losses? A loop that
        reuses held-out losses between passes should measure fresh ones for these calls: the
        reference is what every later G is measured against."""
        count = self._count()
        return self.reference_steps - self.reference_tail <= count < self.reference_steps

    def coefficient(self, head: str) -> torch.Tensor:
        return self.coefficients[self.heads.index(head)]

    def scale(self, logits: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Return head -> w_k * z_k in float32, keeping autograd to both w and z."""
        with float32_region(self.coefficients):
            return {head: logits[head].float() * self.coefficients[k] for k, head in enumerate(self.heads)}

    def _stack(self, losses: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        missing = [h for h in self.heads if h not in losses]
        if missing:
            raise KeyError(f"{name} lacks heads {missing}")
        device = self.coefficients.device
        # One detach and one cast for all heads (this runs every training step); as_tensor
        # leaves a tensor already on the device as it is.
        return torch.stack([torch.as_tensor(losses[h], device=device).reshape(())
                            for h in self.heads]).detach().float()

    def _update_reference(self, train: torch.Tensor, heldout: torch.Tensor | None) -> None:
        count = self._count() + 1
        self.reference_count += 1
        self._host_count = count
        # Calls before the window's tail are counted but not averaged in.
        in_tail = count - (self.reference_steps - self.reference_tail)
        if in_tail < 1:
            return
        self.reference_train += (train - self.reference_train) / in_tail
        if heldout is not None:
            self.reference_heldout += (heldout - self.reference_heldout) / in_tail

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
            # One-hot on the head that took (almost) all the mass, zeros when not saturated:
            # its epoch mean is each head's share of saturated steps.
            self.last["saturated_head"] = (ratios > SATURATION).float()
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
        with float32_region(self.coefficients):
            raw_norms = torch.stack([logits[h].detach().float().norm(dim=1) for h in self.heads], dim=1)
            norms = raw_norms * self.coefficients  # (B, M): only w carries gradient
            targets = (norms.detach().mean(dim=1, keepdim=True) * ratios).detach()
            loss = (norms - targets).abs().sum(dim=1).mean()
        self.last.update(ratios=ratios, targets_mean=targets.mean(0), norms_mean=norms.detach().mean(0))
        return loss

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, target={self.target!r}, target_scale={self.target_scale!r}, "
                f"reference_steps={self.reference_steps}, reference_tail={self.reference_tail}")
