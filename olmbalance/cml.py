"""CML: Calibrating Multimodal Learning (Ma, Zhang et al., "Calibrating Multimodal Learning",
ICML 2023), on top of ``fusion_only``: the confidence of a prediction should not increase when
a modality is removed, so a regularizer penalizes every increase.

The authors' repository, github QingyangZhang/CML, releases the regularizer on two
missing-view models (no audio-visual late-fusion run): ``cpm/CPM_Nets.py`` ``rank_loss`` and
``miwae/train.py`` (stage 2 of the training loop, with ``get_multi_mask``). The late-fusion
training step is GeWu-Lab BalanceBenchmark's ``balancemm/trainer/CML_trainer.py``
(``CMLTrainer.train_loop``, ``training_step``, ``conf_loss``; settings ``CML`` of
``configs/trainer_config.yaml``: lam 0.1, modulation epochs 0..80). This module follows
BalanceBenchmark's step and the authors' regularizer; every switch between them is a setting.

Per step, inside the modulation epochs (0-based, inclusive, BalanceBenchmark's window):

- one forward gives the fusion logits ``z_0`` and the encoder features (the fusion head's
  inputs); the modalities are then removed one after another in a random order: ``z_k`` is the
  fusion head on the features with the first ``k`` removed modalities zeroed, for k = 1..M-1
  (the fusion head runs again; the encoders do not). For a concat head this is exactly
  BalanceBenchmark's ``out_s - unimodal_result[removed] + fc_out.bias / M`` (the removed
  modality's block of the layer taken out, the bias kept whole); for other heads it is their
  output on zeroed features;
- the removal order (``order``): ``sample`` (default), each sample its own order, drawn afresh
  at every step, as the authors' ``get_multi_mask`` draws one per sample and batch; ``epoch``,
  one order for the whole epoch and every sample, BalanceBenchmark's ``random.shuffle`` of the
  modality list at the start of ``train_loop`` (with two modalities: one modality is the removed
  one for a whole epoch);
- classification: the batch-mean cross-entropy of every ``z_k`` (the full one included),
  summed and divided by M (BalanceBenchmark's ``loss / 2`` and ``/ 3``; the authors'
  ``cls_loss /= train_input_num``);
- the regularizer, for each link ``z_{k-1} -> z_k`` of the chain, on the confidences
  ``c = max softmax`` and predictions ``y^ = argmax``:
  ``penalty="released"`` (default), the authors' ``rank_loss`` (CPM-Nets, "trick 1"): per
  sample ``max(0, c_k - c_{k-1})``, except samples whose prediction turned right by the
  removal (``y^_k = y`` and ``y^_{k-1} != y``), summed over the batch;
  ``penalty="balancemm"``, BalanceBenchmark's ``conf_loss``: ``max(0, sum_i (c_k - c_{k-1}))``,
  the hinge on the batch sum, without exemption (its ``sign`` is computed and never used);
- network loss: ``(sum_k CE(z_k)) / M + lam * sum of the links' penalties`` (plus the
  ``fusion_only`` read-outs, which train only themselves on detached features).

Outside the window a step trains the fusion cross-entropy alone (BalanceBenchmark's ``else``).

Where this differs from the references, and why:

- BalanceBenchmark's ``conf_loss`` applies ``max(0, .)`` to the batch sum and drops the
  exemption it computes: a batch where most samples lose confidence lets the others gain it
  unpenalized. That is a defect against the principle and the authors' code, so the default is
  the authors' per-sample hinge; ``--cml-penalty balancemm`` keeps BalanceBenchmark's form.
- The authors' MIWAE script holds a second form (the hinge only where the fuller prediction is
  right, plus a hinge against a detached confidence where both are wrong); the CPM-Nets form is
  the one BalanceBenchmark's ``conf_loss`` mirrors, so it is the one implemented.
- The authors impute removed views at the input (MIWAE: the training mean) for models built to
  reconstruct missing views; a late-fusion network has no such input model, and
  BalanceBenchmark's late-fusion step removes a modality from the fusion head's input, so
  features are zeroed here.
- The penalty is a sum over the batch, as in both references, while the cross-entropies are
  batch means. Under DDP each rank's sum is multiplied by the world size, so that the averaged
  gradient is the sum over the global batch; the batch-sum hinge of ``balancemm`` is gated on
  the sum reduced over ranks. ``--loss-reduction sum`` scales the whole loss (the penalty too)
  by the global batch size, as it does every method's loss: the balance between the terms stays
  the references'.
- The removal orders come from a generator seeded by the run's seed and the step (``sample``)
  or epoch (``epoch``), never from the global random stream; its position (the step count) is
  checkpointed, so a resumed run draws what an uninterrupted one would. Under DDP every rank
  draws from the same generator for its own samples.
- The authors' recipe (``--recipe authors``): the authors released no late-fusion run, so it is
  BalanceBenchmark's shared protocol (``olmbalance.recipes.BALANCEBENCHMARK_RUN``): AdamW 1e-3
  with weight decay 0.01, StepLR(10, 0.1), batch 32, 30 epochs, batch-mean CE.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from olmbalance import distributed
from olmbalance.errors import UserError
from olmbalance.fusion_only import FusionOnly
from olmbalance.model_access import fuse, keep_features
from olmbalance.recipes import BALANCEBENCHMARK_RUN
from olmbalance.registry import RunContext, Setting, register_method

CML_DEFAULT_LAM = 0.1  # configs/trainer_config.yaml CML.lam
CML_MODULATION = (0, 80)  # CML.modulation_starts / modulation_ends (0-based epochs, inclusive)
PENALTIES = ("released", "balancemm")
ORDERS = ("sample", "epoch")
# Offsets the removal-order generators away from the run's other seeded streams.
ORDER_SEED_OFFSET = 1_000_003
SEED_STRIDE = 2 ** 32


def confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Max softmax probability (with its gradient) and the predicted class, in float32."""
    return torch.softmax(logits.float(), dim=1).max(dim=1)


def released_penalty(fuller: tuple[torch.Tensor, torch.Tensor], fewer: tuple[torch.Tensor, torch.Tensor],
                     labels: torch.Tensor) -> torch.Tensor:
    """The authors' rank_loss on one link, per sample: max(0, c_fewer - c_fuller), zero where
    removing the modality turned a wrong prediction right. Summed by the caller."""
    (c_fuller, y_fuller), (c_fewer, y_fewer) = fuller, fewer
    exempt = (y_fewer == labels) & (y_fuller != labels)
    return torch.relu(c_fewer - c_fuller) * (~exempt).to(c_fewer.dtype)


def removal_keeps(order: torch.Tensor) -> list[torch.Tensor]:
    """(B, M) removal orders (modality indices, first removed first) -> for k = 1..M-1 the
    (B, M) 0/1 mask of the modalities still present after k removals."""
    batch, count = order.shape
    present = torch.ones(batch, count, device=order.device)
    rows = torch.arange(batch, device=order.device)
    keeps = []
    for k in range(count - 1):
        present = present.clone()
        present[rows, order[:, k]] = 0.0
        keeps.append(present)
    return keeps


class CalibratingMultimodalLearning(FusionOnly):
    """CML on a late-fusion model; see the module docstring."""

    name = "cml"

    def __init__(self, heads: Sequence[str], context: RunContext | None = None, lam: float = CML_DEFAULT_LAM,
                 modulation_epochs: tuple[int, int] = CML_MODULATION, penalty: str = "released",
                 order: str = "sample"):
        super().__init__(heads, context)
        if len(self.modalities) < 2:
            raise UserError(f"--method cml needs at least two modality heads besides 'fusion'; "
                            f"this model has {', '.join(self.heads)}")
        if not (math.isfinite(lam) and lam >= 0):
            raise UserError(f"--cml-lam must be a non-negative number, got {lam!r}")
        start, end = (int(e) for e in modulation_epochs)
        if start < 0 or end < start:
            raise UserError(f"CML modulation epochs must satisfy 0 <= starts <= ends, got {start}..{end} "
                            "(--cml-modulation-starts, --cml-modulation-ends)")
        if penalty not in PENALTIES or order not in ORDERS:
            raise UserError(f"CML got penalty {penalty!r} and order {order!r}; they must be one of "
                            f"{', '.join(PENALTIES)} (--cml-penalty) and of {', '.join(ORDERS)} (--cml-order)")
        self.lam, self.modulation_epochs, self.penalty, self.order = float(lam), (start, end), penalty, order
        self.epoch = 1  # the epoch being trained (1-based), from start_epoch
        # Training steps taken over the run: the position of the per-step order generator. A host
        # counter (checkpointed as extra state), so that no step reads the device.
        self.steps = 0
        self.epoch_order: torch.Tensor | None = None
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.last_order: torch.Tensor | None = None  # the removal orders of the last modulated step
        self.last: dict[str, torch.Tensor] = {}

    def setup(self, model) -> None:
        super().setup(model)
        net = keep_features(model, self.name)
        if tuple(net.modalities) != self.modalities:
            raise UserError(f"--method cml: the model's modalities {net.modalities} do not match its heads {self.heads}")

    def modulating(self) -> bool:
        start, end = self.modulation_epochs
        return start <= self.epoch - 1 <= end

    def seed(self, index: int, stream: int) -> int:
        return ((self.context.seed or 0) * SEED_STRIDE + ORDER_SEED_OFFSET * (stream + 1) + index) % 2 ** 63

    def start_epoch(self, epoch, model, data) -> None:
        self.epoch = int(epoch)
        self.epoch_order = None  # drawn for this epoch when first needed

    def removal_orders(self, batch: int, device: torch.device, step: int) -> torch.Tensor:
        """(B, M) modality indices in the order they are removed at the run's ``step`` (0-based)."""
        count = len(self.modalities)
        if self.order == "epoch":
            if self.epoch_order is None:
                generator = torch.Generator().manual_seed(self.seed(self.epoch, stream=1))
                self.epoch_order = torch.randperm(count, generator=generator)
            return self.epoch_order.to(device).expand(batch, count)
        generator = torch.Generator().manual_seed(self.seed(step, stream=0))
        return torch.rand(batch, count, generator=generator).argsort(dim=1).to(device)

    # -- the step ---------------------------------------------------------------------------------
    def forward_train(self, model, inputs, labels):
        logits = model(inputs)
        net = distributed.unwrap(model)
        features, net.last_features = net.last_features, {}  # frees the graph after this step
        step, self.steps = self.steps, self.steps + 1
        if not self.modulating():
            return logits
        order = self.removal_orders(labels.shape[0], labels.device, step)
        self.last_order = order
        # Each rank's batch sum, times the world size: averaged over ranks by DDP it is the sum
        # over the global batch, as the references' single process computes it.
        ranks = distributed.world_size()
        previous = confidence(logits["fusion"])
        reduced_ce = torch.zeros((), device=labels.device)
        penalty = torch.zeros((), device=labels.device)
        for keep in removal_keeps(order):
            masked = {m: features[m] * keep[:, i:i + 1].to(features[m].dtype) for i, m in enumerate(self.modalities)}
            reduced = fuse(model, masked)
            reduced_ce = reduced_ce + F.cross_entropy(reduced.float(), labels)
            current = confidence(reduced)
            if self.penalty == "released":
                penalty = penalty + ranks * released_penalty(previous, current, labels).sum()
            else:  # max(0, batch sum), the hinge decided on the sum over every rank's samples
                total = (current[0] - previous[0]).sum()
                gate = (distributed.all_reduce_mean(total.detach()) > 0).to(total.dtype)
                penalty = penalty + ranks * gate * total
            previous = current
        self.pending = (reduced_ce, penalty)
        self.last = {"cml_penalty": penalty.detach() / ranks, "cml_reduced_ce": reduced_ce.detach()}
        return logits

    def network_loss(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        readouts = sum(losses[m] for m in self.modalities)
        if self.pending is None:
            return readouts + losses["fusion"]
        (reduced_ce, penalty), self.pending = self.pending, None  # used once
        return readouts + (losses["fusion"] + reduced_ce) / len(self.modalities) + self.lam * penalty

    # -- what gets logged and checkpointed -------------------------------------------------------
    def diagnostics(self) -> dict[str, torch.Tensor]:
        last, self.last = self.last, {}
        return last

    def get_extra_state(self):
        return {"steps": self.steps, "epoch": self.epoch}

    def set_extra_state(self, state) -> None:
        state = state or {}
        self.steps, self.epoch = int(state.get("steps", 0)), int(state.get("epoch", 1))
        self.epoch_order = None


# No late-fusion run was released by the authors: BalanceBenchmark's shared protocol (see the docstring).


@register_method(
    "cml", prefix="cml",
    settings=(Setting("lam", float, CML_DEFAULT_LAM, "weight of the confidence regularizer (a sum over the batch)"),
              Setting("modulation_starts", int, CML_MODULATION[0], "first epoch (0-based) with the CML terms"),
              Setting("modulation_ends", int, CML_MODULATION[1], "last epoch (0-based, inclusive) with the CML terms"),
              Setting("penalty", str, "released",
                      "released: per-sample hinge, exempting predictions the removal made right (authors); "
                      "balancemm: hinge on the batch sum (BalanceBenchmark)", choices=PENALTIES),
              Setting("order", str, "sample",
                      "modality removal order: per sample and step (authors) or one per epoch (BalanceBenchmark)",
                      choices=ORDERS)),
    recipes={"authors": {"*": BALANCEBENCHMARK_RUN}},
    summary="CML, calibrating multimodal learning: confidence must not grow when a modality is removed "
            "(Ma et al., ICML 2023)")
def cml(heads, context, lam, modulation_starts, modulation_ends, penalty, order):
    return CalibratingMultimodalLearning(heads, context, lam=lam, modulation_epochs=(modulation_starts, modulation_ends),
                                         penalty=penalty, order=order)
