"""Gradient-Blending (Wang, Tran, Feiszli, "What Makes Training Multi-modal Classification
Networks Hard?", CVPR 2020), as BalanceBenchmark runs it.

Follows GeWu-Lab/BalanceBenchmark ``balancemm/trainer/GBlending_trainer.py``:
``GBlendingTrainer.fit`` (an estimate at every super-epoch boundary, then the main model's
epochs with the blended loss), ``GBlendingTrainer.super_epoch_origin`` (the estimate) and
``GBlendingTrainer.training_step`` (the blended loss); its settings are
``configs/trainer_config.yaml`` ``GBlending`` (online, super_epoch 10).

The estimate, before the first epoch and then every ``super_epoch`` epochs (``start_epoch``;
epochs 1, 11, 21, ... by default):

- for every head k (each modality, then the fusion head: BalanceBenchmark's ``output``), a copy
  of the current model (``copy.deepcopy``) with a fresh optimizer built like the run's
  (``RunContext``: optimizer, base lr, momentum, weight decay; BalanceBenchmark reloads one
  temporary optimizer's initial state for every copy) trains ``copy_epochs`` epochs (the
  super-epoch by default) on the training split;
- what a copy trains and is measured on (``copy_target="padded"``, released): the fusion
  head's cross-entropy with the other modalities' inputs zeroed (BalanceBenchmark's
  ``padding``; no padding for the fusion copy). ``copy_target="head"``: head k's own
  cross-entropy on the full inputs (the paper's unimodal network: encoder k and its head);
- after the copy's first and last epoch it records its train loss (its training pass, train
  mode) and its validation loss (a pass over the validation split in eval mode), each the sum
  of the batch-mean losses over the pass (``loss_total="sum"``, released; ``"mean"`` divides by
  the number of batches, the paper's mean losses);
- ``g = V_last - V_first``, ``o = (V_last - T_last) - (V_first - T_first)``,
  ``w_k = |g / o^2|``, normalized to sum to 1.

Between estimates every step trains on ``sum_k w_k CE_k`` over the heads (``network_loss``).
``mode="offline"`` is BalanceBenchmark's ``offline``: one estimate before the first epoch with
the super-epoch set to the run's epochs.

Differences from BalanceBenchmark that remain, and why:

- The per-modality terms of the main loss are our model's unimodal heads (a linear head on each
  encoder, the paper's multi-head architecture); BalanceBenchmark's ``unimodal_result`` for
  ``concat`` is each modality's slice of the fusion layer.
- The copies read the data through ``EpochData``: the training batches come in a seeded order
  of their own (the same order in every epoch of one estimate, drawn afresh per run epoch), not
  the training loader's reshuffled stream; a trailing training batch of one sample is skipped
  (BatchNorm cannot train on it; BalanceBenchmark drops every incomplete last batch).
- The copies' dropout draws from a generator seeded by the run's seed and the epoch, so the
  estimate leaves the run's random stream untouched; BalanceBenchmark draws from the global one.
- The copies train in float32 (no AMP), with the run's loss reduction (``--loss-reduction sum``
  multiplies each batch-mean loss by the batch size, as the main loop does) and without the
  run's StepLR (BalanceBenchmark's temporary optimizer has no scheduler either).
- ``o = 0`` is floored (``O_FLOOR``; BalanceBenchmark divides by zero), and if no head has any
  gain the weights in force are kept (BalanceBenchmark: 0/0).
- Under DDP each rank trains its copies on its shard of the data and the measured losses are
  averaged over ranks, so every rank takes the same weights.
- BalanceBenchmark's configured run is 30 epochs at a super-epoch of 10; the AV-Digits runs are
  10 epochs, so by default online equals offline there: one estimate (3 copies x 10 epochs)
  before the first epoch. Measured on AV-Digits (seed 0, 2 shared cores) it took 1.6 times the
  run's ten epochs of training and evaluation (320 s against 195 s), so the run took 2.7 times
  as long as its epochs alone; that is affordable,
  so the released super-epoch stays the default (``--gb-copy-epochs`` and ``--gb-copy-share``
  make an estimate cheaper).
- ``modulation_starts``/``modulation_ends`` of BalanceBenchmark's GBlending config are not
  read by its trainer, so they have no setting here.
- The authors' recipe is BalanceBenchmark's run (``olmbalance.recipes.BALANCEBENCHMARK_RUN``:
  AdamW 1e-3 with weight decay 0.01, StepLR(10, 0.1), batch 32, 30 epochs).

The weights in force, the losses of the last estimate and the next estimate's epoch are
buffers: saved in checkpoints, so a resumed run continues identically.
"""
from __future__ import annotations

import copy
import logging
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from olmbalance import distributed
from olmbalance.base import EpochData, Method
from olmbalance.errors import UserError
from olmbalance.recipes import BALANCEBENCHMARK_RUN, run_optimizer
from olmbalance.registry import RunContext, Setting, register_method

log = logging.getLogger(__name__)

GB_DEFAULT_SUPER_EPOCH = 10  # configs/trainer_config.yaml, GBlending.super_epoch
# Floor of o^2 (losses in nats): a head whose overfitting did not move gets a large, finite weight.
O_FLOOR = 1e-12
# Offsets the copies' dropout seed from the run's other seeded streams.
COPY_SEED_OFFSET = 15485863
FUSION = "fusion"
NEVER = 2 ** 62  # next_estimate of an offline run after its one estimate


def blending_weights(train_first: torch.Tensor, val_first: torch.Tensor, train_last: torch.Tensor,
                     val_last: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """BalanceBenchmark's weights from each head's losses after a copy's first and last epoch:
    ``|g / o^2|`` normalized to sum to 1, ``g`` the change of the validation loss and ``o`` the
    change of the overfitting (validation minus train loss). ``previous`` if no head gained."""
    gain = val_last - val_first
    overfit = (val_last - train_last) - (val_first - train_first)
    raw = (gain / overfit.pow(2).clamp(min=O_FLOOR)).abs()
    if not float(raw.sum()) > 0:
        return previous.clone()
    return raw / raw.sum()


class GradientBlending(Method):
    name = "g_blending"

    def __init__(self, heads: Sequence[str], context: RunContext | None = None, mode: str = "online",
                 super_epoch: int = GB_DEFAULT_SUPER_EPOCH, copy_epochs: int = 0, copy_share: float = 1.0,
                 copy_target: str = "padded", loss_total: str = "sum"):
        super().__init__(heads, context)
        self.modalities = tuple(h for h in self.heads if h != FUSION)
        if mode not in ("online", "offline"):
            raise UserError(f"G-Blending mode must be online or offline, got {mode!r}")
        if mode == "offline" and not self.context.epochs:
            raise UserError("G-Blending's offline mode needs the run's epochs (RunContext.epochs)")
        self.mode = mode
        self.super_epoch = int(self.context.epochs if mode == "offline" else super_epoch)
        if self.super_epoch < 1:
            raise UserError(f"G-Blending super-epoch must be at least one epoch, got {super_epoch!r}")
        self.copy_epochs = int(copy_epochs) or self.super_epoch
        if self.copy_epochs < 2:
            raise UserError(f"G-Blending copies must train at least 2 epochs (their first and last are compared), "
                            f"got {self.copy_epochs} (--gb-copy-epochs, or the super-epoch when it is 0)")
        if not 0 < copy_share <= 1:
            raise UserError(f"G-Blending copy share must be in (0, 1], got {copy_share!r}")
        self.copy_share = float(copy_share)
        if copy_target not in ("padded", "head"):
            raise UserError(f"G-Blending copy target must be padded or head, got {copy_target!r}")
        if copy_target == "padded" and FUSION not in self.heads:
            raise UserError("G-Blending's padded copies train the fusion head; this model has no 'fusion' head "
                            "(use --gb-copy-target head)")
        self.copy_target = copy_target
        if loss_total not in ("sum", "mean"):
            raise UserError(f"G-Blending loss total must be sum or mean, got {loss_total!r}")
        self.loss_total = loss_total
        count = len(self.heads)
        # Buffers: saved in method.state_dict(), so a resumed run continues identically.
        self.register_buffer("weights", torch.full((count,), 1.0 / count))
        # The last estimate's losses per head: train and val after the copy's first and last epoch.
        self.register_buffer("estimate", torch.zeros(count, 4))
        self.register_buffer("estimated_at", torch.zeros((), dtype=torch.long))  # epoch; 0: never
        self.register_buffer("next_estimate", torch.ones((), dtype=torch.long))  # epoch of the next one

    # -- the main step --------------------------------------------------------------------------
    def network_loss(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum(w * losses[h] for h, w in zip(self.heads, self.weights.tolist()))

    # -- the super-epoch estimate ---------------------------------------------------------------
    def start_epoch(self, epoch: int, model: nn.Module, data: EpochData) -> None:
        if epoch < int(self.next_estimate):
            return
        losses = self.measure(model, data, epoch)
        self.estimate.copy_(losses)
        self.weights.copy_(blending_weights(*losses.t(), self.weights.cpu().double()))
        self.estimated_at.fill_(epoch)
        # Offline: one estimate, whatever epochs a resumed run adds.
        self.next_estimate.fill_(epoch + self.super_epoch if self.mode == "online" else NEVER)
        if not distributed.is_distributed() or torch.distributed.get_rank() == 0:
            log.info("G-Blending weights before epoch %d: %s", epoch, self.coefficients())

    def measure(self, model: nn.Module, data: EpochData, epoch: int) -> torch.Tensor:
        """Per head: (train first, val first, train last, val last) of its copy, averaged over ranks."""
        device = next(model.parameters()).device
        forked = [device] if device.type == "cuda" else []
        rows = []
        with torch.random.fork_rng(devices=forked):
            seed = (self.context.seed or 0) + COPY_SEED_OFFSET + epoch
            torch.default_generator.manual_seed(seed)
            if forked:
                torch.cuda.manual_seed(seed)
            for head in self.heads:
                rows.append(self.train_copy(model, data, head))
        # Float64 where the collective allows it (NCCL reduces CUDA tensors only).
        return distributed.all_reduce_mean(torch.stack(rows).to(distributed.collective_device())).cpu().double()

    def train_copy(self, model: nn.Module, data: EpochData, head: str) -> torch.Tensor:
        zeroed = [m for m in self.modalities if m != head] if self.copy_target == "padded" and head != FUSION else []
        read = FUSION if self.copy_target == "padded" else head
        replica = copy.deepcopy(model)
        optimizer = run_optimizer(replica.parameters(), self.context)
        measured = []
        for copy_epoch in range(self.copy_epochs):
            replica.train()
            total, batches = torch.zeros((), dtype=torch.float64), 0
            for inputs, labels in data.train_batches(self.copy_share):
                if labels.shape[0] < 2:  # BatchNorm cannot train on one sample
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(replica(self.padded(inputs, zeroed))[read].float(), labels)
                scale = labels.shape[0] if self.context.loss_reduction == "sum" else 1
                (loss * scale).backward()
                optimizer.step()
                total += loss.detach().double().cpu()
                batches += 1
            if copy_epoch in (0, self.copy_epochs - 1):
                measured += [self.total(total, batches), self.validation_loss(replica, data, zeroed, read)]
        del replica, optimizer
        return torch.stack(measured)

    @torch.no_grad()
    def validation_loss(self, replica: nn.Module, data: EpochData, zeroed, read: str) -> torch.Tensor:
        replica.eval()
        total, batches = torch.zeros((), dtype=torch.float64), 0
        for inputs, labels in data.val_batches():
            logits = replica(self.padded(inputs, zeroed))[read].float()
            total += F.cross_entropy(logits, labels).double().cpu()
            batches += 1
        return self.total(total, batches)

    def total(self, loss_sum: torch.Tensor, batches: int) -> torch.Tensor:
        if batches == 0:
            raise UserError("G-Blending's copies found no batch to train or validate on; check the splits")
        return loss_sum if self.loss_total == "sum" else loss_sum / batches

    def padded(self, inputs, zeroed):
        """``inputs`` with the zeroed modalities' tensors replaced by zeros (BalanceBenchmark's padding)."""
        if not zeroed:
            return inputs
        if not isinstance(inputs, Mapping) or any(m not in inputs for m in zeroed):
            raise UserError("G-Blending's padded copies zero other modalities' inputs, so they need inputs keyed "
                            f"by modality ({', '.join(self.modalities)}); use --gb-copy-target head")
        return {k: torch.zeros_like(v) if k in zeroed else v for k, v in inputs.items()}

    def coefficients(self) -> dict[str, float]:
        """The loss weights in force for the next epoch."""
        return {h: float(w) for h, w in zip(self.heads, self.weights.cpu())}


@register_method(
    "g_blending", prefix="gb",
    settings=(Setting("mode", str, "online", "online: re-estimate every super-epoch; offline: once, before epoch 1",
                      choices=("online", "offline")),
              Setting("super_epoch", int, GB_DEFAULT_SUPER_EPOCH, "epochs between weight estimates (online)"),
              Setting("copy_epochs", int, 0, "epochs each copy trains per estimate (0: the super-epoch, as released)"),
              Setting("copy_share", float, 1.0, "share of the training split each copy epoch reads"),
              Setting("copy_target", str, "padded",
                      "padded: fusion head, other inputs zeroed (released); head: the head's own loss (paper)",
                      choices=("padded", "head")),
              Setting("loss_total", str, "sum",
                      "a pass's loss: sum of batch-mean losses (released) or their mean (paper)",
                      choices=("sum", "mean"))),
    recipes={"authors": {"*": BALANCEBENCHMARK_RUN}},
    summary="G-Blending, gradient blending by overfitting-to-generalization ratio (Wang et al., CVPR 2020)")
def g_blending(heads, context, mode, super_epoch, copy_epochs, copy_share, copy_target, loss_total):
    return GradientBlending(heads, context, mode=mode, super_epoch=super_epoch, copy_epochs=copy_epochs,
                            copy_share=copy_share, copy_target=copy_target, loss_total=loss_total)
