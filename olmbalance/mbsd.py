"""MBSD, BalanceBenchmark's "objective" method of modality-balanced self-distillation between
the unimodal predictions, on top of ``fusion_only``, as BalanceBenchmark runs it.

No code of the method's authors was found (searched by its name and what it computes;
BalanceBenchmark's README lists it among its objective methods without a reference, and
GeWu-Lab's repositories hold no other copy); this follows GeWu-Lab/BalanceBenchmark
``balancemm/trainer/MBSD_trainer.py`` (``MBSDTrainer.training_step``), with the unimodal
logits of ``balancemm/models/avclassify_model.py`` (``BaseClassifierModel.unimodality_calculate``)
and the settings of ``configs/trainer_config.yaml`` ``MBSD`` (modulation epochs 0..80).

The step, inside the modulation epochs (0-based, inclusive):

- each modality's logits ``z_m`` are its share of the fusion layer (``concat``: its block of
  the weight times its features plus an equal share of the bias, as ``unimodality_calculate``;
  ``sum``: its own classifier), ``p_m = softmax(z_m)``;
- per sample, for a pair of modalities, ``ps`` and ``pw`` are the larger and the smaller of
  their true-class probabilities; the sample's weight ``w = ps - pw`` if either modality
  predicts the label (argmax), else 0;
- ``RS = (1/C) sum_c (z_a - z_v)^2`` (C classes) and ``KL = F.kl_div(ps, pw)`` per sample;
- loss = fusion CE + every modality's CE on ``z_m`` + ``sum_i w_i RS_i / B`` +
  ``sum_i w_i KL_i / B`` (B the batch). Outside the epochs: the fusion CE alone.

As in BalanceBenchmark, nothing is detached: the gradient also flows through ``w``, ``ps``
and ``pw``, and ``F.kl_div`` gets the stronger probability itself as its ``input`` (torch
expects log-probabilities there: ``pw * (log pw - ps)``). Without the authors' code or a
statement of the intended form this is reproduced as written.

Differences from BalanceBenchmark, and why:

- its trainer calls ``model.Unimodality_Calculate()``, a name none of its models defines
  (theirs is ``unimodality_calculate``, which their ``forward`` already runs), so the trainer
  as committed stops with an AttributeError; this class takes the unimodal logits the forward
  gave, what the call evidently meant;
- the per-sample Python loop is vectorized (the same values; ties of the two probabilities,
  where ``w`` is 0, give the same gradients);
- with more than two modalities the RS and KL terms are averaged over all pairs, each pair
  as above; BalanceBenchmark's three-modality branch averages over the three pairs too but
  measures RS on the probabilities there (on the logits with two), one rule is kept here;
- only heads with per-modality shares (``concat``, ``sum``) are accepted; BalanceBenchmark's
  other heads have no unimodal logits (its ``unimodality_calculate`` fills them for concat
  only) and the trainer fails on them;
- the unimodal heads of our model are ``fusion_only``'s detached read-outs (they measure the
  encoders and change nothing else); the trained unimodal logits are the fusion layer's shares;
- the terms are computed in float32 under autocast;
- the authors' recipe is BalanceBenchmark's run (``olmbalance.recipes.BALANCEBENCHMARK_RUN``:
  AdamW 1e-3, weight decay 0.01, StepLR(10, 0.1), batch 32, 30 epochs): no authors' run was found.
"""
from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from olmbalance.distributed import unwrap
from olmbalance.errors import UserError
from olmbalance.base import AddedLossTerms
from olmbalance.fusion_only import FusionOnly
from olmbalance.model_access import keep_features, last_features, modality_parts
from olmbalance.recipes import BALANCEBENCHMARK_RUN
from olmbalance.registry import RunContext, Setting, register_method

MBSD_DEFAULT_MODULATION = (0, 80)  # configs/trainer_config.yaml MBSD.modulation_starts / ends


def distillation_terms(logits: Mapping[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """BalanceBenchmark's RS and KL terms over the modality pairs (averaged), and the mean
    sample weight; ``logits`` are each modality's (B, C) logits, with their graph."""
    names = list(logits)
    batch, classes = labels.shape[0], logits[names[0]].shape[1]
    index = labels.view(-1, 1)
    probs = {m: torch.softmax(z, dim=1) for m, z in logits.items()}
    true = {m: p.gather(1, index).squeeze(1) for m, p in probs.items()}
    right = {m: p.argmax(dim=1) == labels for m, p in probs.items()}
    pairs = list(itertools.combinations(names, 2))
    rs_total, kl_total, weight_total = 0.0, 0.0, 0.0
    for first, second in pairs:
        strong, weak = torch.maximum(true[first], true[second]), torch.minimum(true[first], true[second])
        weight = torch.where(right[first] | right[second], strong - weak, torch.zeros_like(strong))
        rs = (logits[first] - logits[second]).pow(2).sum(dim=1) / classes
        kl = F.kl_div(strong, weak, reduction="none")
        rs_total = rs_total + (weight * rs).sum() / batch
        kl_total = kl_total + (weight * kl).sum() / batch
        weight_total = weight_total + weight.detach().mean()
    count = len(pairs)
    return {"rs": rs_total / count, "kl": kl_total / count, "weight": weight_total / count}


class ModalityBalancedSelfDistillation(AddedLossTerms, FusionOnly):
    """MBSD as BalanceBenchmark runs it (see the module docstring)."""

    name = "mbsd"

    def __init__(self, heads: Sequence[str], context: RunContext | None = None,
                 modulation_epochs: tuple[int, int] = MBSD_DEFAULT_MODULATION):
        super().__init__(heads, context)
        if len(self.modalities) < 2:
            raise UserError(f"--method {self.name} needs at least two modality heads besides 'fusion'; "
                            f"this model has {', '.join(self.heads)}")
        start, end = (int(e) for e in modulation_epochs)
        if start < 0 or end < start:
            raise UserError(f"MBSD modulation epochs must satisfy 0 <= starts <= ends, got {start}..{end} "
                            "(--mbsd-modulation-starts, --mbsd-modulation-ends)")
        self.modulation_epochs = (start, end)
        self.epoch = 1  # the epoch being trained (1-based), set by start_epoch
        self.last: dict[str, torch.Tensor] = {}

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        net = keep_features(model, self.name)
        if not hasattr(getattr(net, "fusion", None), "modality_logits"):
            raise UserError(f"--method {self.name} distils between each modality's share of the fusion logits, "
                            f"which the {type(getattr(net, 'fusion', None)).__name__} head has not; "
                            "use --fusion concat or sum")

    def start_epoch(self, epoch: int, model: nn.Module, data) -> None:
        self.epoch = epoch

    def modulating(self) -> bool:
        start, end = self.modulation_epochs
        return start <= self.epoch - 1 <= end

    def unimodal_logits(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Each modality's share of the fusion logits for the last forward (float32, with graph)."""
        net = unwrap(model)
        features = last_features(model)
        net.last_features = {}  # the shares hold what they need; no graph kept past the step
        ordered = [features[m] for m in net.modalities]
        with torch.autocast(device_type=ordered[0].device.type, enabled=False):
            parts = modality_parts(net.fusion, [f.float() for f in ordered])
        return dict(zip(net.modalities, parts))

    def forward_train(self, model, inputs, labels):
        logits = model(inputs)
        if not self.modulating():
            unwrap(model).last_features = {}
            return logits
        parts = self.unimodal_logits(model)
        terms = distillation_terms(parts, labels)
        unimodal_ce = sum(F.cross_entropy(z, labels) for z in parts.values())
        self.extra_loss = unimodal_ce + terms["rs"] + terms["kl"]
        self.last = {f"mbsd_{k}": v.detach() for k, v in terms.items()}
        return logits





@register_method(
    "mbsd", prefix="mbsd",
    settings=(Setting("modulation_starts", int, MBSD_DEFAULT_MODULATION[0],
                      "first epoch (0-based) with the unimodal and distillation terms"),
              Setting("modulation_ends", int, MBSD_DEFAULT_MODULATION[1],
                      "last epoch (0-based, inclusive) with the unimodal and distillation terms")),
    recipes={"authors": {"*": BALANCEBENCHMARK_RUN}},
    summary="MBSD, confidence-weighted self-distillation between the unimodal predictions (BalanceBenchmark)")
def mbsd(heads, context, modulation_starts, modulation_ends):
    return ModalityBalancedSelfDistillation(heads, context, modulation_epochs=(modulation_starts, modulation_ends))
