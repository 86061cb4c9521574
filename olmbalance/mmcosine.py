"""MMCosine: multi-modal cosine loss (Xu, Feng, Zhang, Hu, "MMCosine: Multi-Modal Cosine Loss
Towards Balanced Audio-Visual Fine-Grained Learning", ICASSP 2023), on top of ``fusion_only``,
as its authors ran it.

Followed: github GeWu-Lab/MMCosine_ICASSP23, ``main_CD.py`` (``train_epoch`` with
``--mmcosine True``, ``valid``, ``get_arguments`` for the defaults) and ``main_vox2.py``
(``valid``); checked against GeWu-Lab/BalanceBenchmark ``balancemm/trainer/MMCosine_trainer.py``
(``training_step``, ``validation_step``).

What the released step does, and this class:

- the fusion layer's weight ``W`` (classes x sum of feature widths) is cut into each
  modality's block ``W_m`` (the released ``fc_out.weight[:, :512]`` and ``[:, 512:]``); each
  row of ``W_m`` (one class) and each feature vector ``f_m`` are L2-normalized, and the
  modality's logits are ``s * cos(f_m, W_m[c])`` (``F.normalize(f, dim=1)`` times
  ``F.normalize(W_m^T, dim=0)``, times ``scaling``);
- the fused logits are the sum over modalities, and the network loss is their
  cross-entropy alone (batch mean). The fusion layer's bias enters no logit, so it never
  moves (the released code never reads it either);
- evaluation scores the same cosine logits (``forward_eval``; ``eval_logits="cosine"``).

Settings: ``scaling`` (released ``--scaling``, default 10, also the README's command;
BalanceBenchmark's config uses 15); ``eval_logits``: ``cosine`` (default) or ``linear``.
The released ``main_CD.py`` ``valid`` scores its modalities with the cosine logits but its
fused prediction with the plain fusion layer (``softmax(out)``, weight and bias on the
unnormalized features, a prediction that was never trained); ``main_vox2.py`` ``valid`` and
BalanceBenchmark score the fused cosine logits, which is the trained prediction and the
default here; ``linear`` gives ``main_CD.py``'s fused prediction.

The fusion head must have per-modality weight blocks (``concat``, ``sum``: each modality's own
classifier there); the heads that mix modalities before their classifier (``bilinear``,
``film``, ``gated``, ``attention``) are refused. The released ``film``/``gated`` runs
normalize the halves of their last layer, whose inputs are already mixed; our ``film`` and
``gated`` heads have no such halves.

Remaining differences from the released code, and why:

- the unimodal heads are ``fusion_only``'s linear read-outs on detached features (they
  measure the encoders and change nothing else); the released ``valid`` reports each
  modality's accuracy from its cosine logits instead. Those logits' mean true-class value is
  logged per modality (``mmcosine_true_logit``, the released tensorboard ``logit_a/logit_v``);
- the released NCE term of the supplementary material (``--lam``, default 0) is not offered;
- BalanceBenchmark applies the cosine loss only in its ``modulation_starts..ends`` epochs
  (0..80) and the plain fusion loss outside; the authors' code has no such window, nor does
  this class;
- the cosine logits are computed in float32 under autocast (unit vectors times 10-15 need
  the precision); the released code runs in float32 throughout;
- without ``--recipe authors`` a run keeps the dataset's optimizer, batch and epochs.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from olmbalance.distributed import unwrap
from olmbalance.errors import UserError
from olmbalance.base import AddedLossTerms
from olmbalance.fusion_only import FusionOnly
from olmbalance.model_access import keep_features, last_features, modality_weights
from olmbalance.registry import RunContext, Setting, register_method

MMCOSINE_DEFAULT_SCALING = 10.0  # released --scaling (argparse default and the README's run)
EVAL_LOGITS = ("cosine", "linear")


def cosine_logits(features: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], scaling: float) -> list[torch.Tensor]:
    """Per modality ``scaling * cos(f, w_c)``: unit features times unit class rows of its block."""
    return [torch.mm(F.normalize(f, dim=1), F.normalize(w.t(), dim=0)) * scaling for f, w in zip(features, weights)]


class MultiModalCosine(AddedLossTerms, FusionOnly):
    """MMCosine as released (see the module docstring); the settings are the registration's."""

    name = "mmcosine"
    # The fusion layer's bias enters no cosine logit: DDP must not wait for its gradient.
    leaves_parameters_unused = True

    def __init__(self, heads: Sequence[str], context: RunContext | None = None,
                 scaling: float = MMCOSINE_DEFAULT_SCALING, eval_logits: str = "cosine"):
        super().__init__(heads, context)
        if len(self.modalities) < 2:
            raise UserError(f"--method {self.name} needs at least two modality heads besides 'fusion'; "
                            f"this model has {', '.join(self.heads)}")
        if not (math.isfinite(scaling) and scaling > 0):
            raise UserError(f"--mmcosine-scaling must be a positive number, got {scaling!r}")
        if eval_logits not in EVAL_LOGITS:
            raise UserError(f"--mmcosine-eval-logits must be one of {', '.join(EVAL_LOGITS)}, got {eval_logits!r}")
        self.scaling, self.eval_logits = float(scaling), eval_logits
        self.last: dict[str, torch.Tensor] = {}

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        net = keep_features(model, self.name)
        if not hasattr(getattr(net, "fusion", None), "modality_weights"):
            raise UserError(f"--method {self.name} normalizes each modality's block of the fusion layer, which "
                            f"the {type(getattr(net, 'fusion', None)).__name__} head has not; use --fusion concat or sum")

    def cosine_parts(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Each modality's scaled cosine logits from the last forward's features (float32)."""
        net = unwrap(model)
        features = last_features(model)
        net.last_features = {}  # the logits below hold what they need; no graph kept past the step
        ordered = [features[m] for m in net.modalities]
        with torch.autocast(device_type=ordered[0].device.type, enabled=False):
            ordered = [f.float() for f in ordered]
            weights = [w.float() for w in modality_weights(net.fusion, ordered)]
            parts = cosine_logits(ordered, weights, self.scaling)
        return dict(zip(net.modalities, parts))

    def forward_train(self, model, inputs, labels):
        logits = model(inputs)
        parts = self.cosine_parts(model)
        logits["fusion"] = sum(parts.values())
        with torch.no_grad():  # per head, the mean true-class cosine logit (fusion: their sum)
            index = labels.view(-1, 1)
            self.last = {"mmcosine_true_logit": torch.stack([
                (parts[h] if h in parts else logits[h]).float().gather(1, index).mean() for h in self.heads])}
        return logits

    def forward_eval(self, model, inputs):
        logits = model(inputs)
        parts = self.cosine_parts(model)
        if self.eval_logits == "cosine":
            logits["fusion"] = sum(parts.values())
        return logits



# The authors' main_CD.py defaults: SGD lr 1e-3, momentum 0.9, weight decay 1e-4, StepLR(100, 0.1),
# batch 32, 200 epochs, batch-mean CE (nn.CrossEntropyLoss()); concat fusion by default.
_MMCOSINE_AUTHORS = dict(optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4, lr_step=100, lr_gamma=0.1,
                         loss_reduction="mean", batch_size=32, epochs=200)


@register_method(
    "mmcosine", prefix="mmcosine",
    settings=(Setting("scaling", float, MMCOSINE_DEFAULT_SCALING,
                      "s: each modality's logits are s times the cosine of its features and class weights "
                      "(released 10; BalanceBenchmark 15)"),
              Setting("eval_logits", str, "cosine",
                      "fused prediction at evaluation: the cosine logits trained on, or the plain fusion layer "
                      "(the released main_CD.py valid)", EVAL_LOGITS)),
    recipes={"authors": {"*": _MMCOSINE_AUTHORS}},
    summary="MMCosine, modality-wise cosine logits of the fusion layer (Xu et al., ICASSP 2023)")
def mmcosine(heads, context, scaling, eval_logits):
    return MultiModalCosine(heads, context, scaling=scaling, eval_logits=eval_logits)
