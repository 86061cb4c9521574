"""ReconBoost (Hua, Xu, Bao, Yang, Huang, "ReconBoost: Boosting Can Achieve Modality
Reconcilement", ICML 2024), as its authors released it.

Followed: github huacong/ReconBoost, ``train.py`` ``main`` (the stage loop: the modality that
``schedule.py`` ``schedule_model`` picks in its fixed order, the alternating stage with its
boosting loss and ``use_ga`` term, ``net_ensemble.add``, the global rectification), with
``models/dynamic_net.py`` (``DynamicNet.forward``: the other learners' ensemble, without
gradient, times the boost rate; ``forward_grad``; ``parameters``) and ``train_MSA.py`` (three
modalities); checked against GeWu-Lab BalanceBenchmark ``balancemm/trainer/ReconBoost_trainer.py``
(``train_loop``, ``training_step1``, ``training_step2``) with ``balancemm/models/avclassify_model.py``
``BaseClassifierReconBoostModel``; settings from ``configs/trainer_config.yaml`` ``ReconBoost``.

What the released code does, and this class:

- Each modality m has one learner ``f_m = h(phi_m(x_m))``; the head ``h`` is shared by every
  modality (the released ``common_space``: ``model.fc = net_ensemble.head``). Here the model's
  unimodal heads are tied into one linear head at setup; the model's fusion head is not used.
- Stages take the modalities in turn, in the model's order (audio, then visual): stage ``s``
  trains ``m = modalities[s mod M]``.
- Boosting: ``stage_epochs`` passes over the training data train ``phi_m`` and ``h`` on, per
  sample, ``-(w1/C) t.log p + (w2/C) (t * q).log p``, i.e. ``-(w1 - w2 q_y) log p_y / C``, with
  ``p = softmax(f_m)``, ``q = softmax(F_-m)``, ``F_-m = b * sum of the other ensemble members'
  f_k`` computed without gradient, ``t`` the one-hot label and ``C`` the classes (the released
  ``.mean(-1)``); batch mean. A learner the ensemble does not hold yet is not in ``F_-m``;
  when no other learner is in it (the first stage of a run without pretrained learners) the
  released ``F_-m`` is the constant ``c0`` with one column, so ``q_y = 1``. From the second
  stage on the loss adds ``alpha * MSE(softmax(f_m), softmax(f_pre))`` (memory consolidation
  against the previous modality's learner, run again on the batch) computed from detached
  outputs, as released: it changes the loss value, not the gradient.
- The trained learner joins the ensemble (once; afterwards the ensemble holds it as it trains).
- Global rectification: ``rectify_epochs`` passes train every member encoder and ``h`` on
  ``CE(b * sum over members of f_k, y)``.
- Evaluation: the ensemble, ``b * sum over members of f_k`` (the "fusion" head here).

How this maps onto the loop: one run epoch is one pass. Epochs run ``stage_epochs`` boosting
epochs, then ``rectify_epochs`` rectification epochs, stage after stage (defaults, two
modalities: epoch 1 boosts audio, 2 rectifies, 3 boosts visual, 4 rectifies, 5 boosts
audio, ...); ``--epochs`` counts passes, so a released stage of 4 + 4 passes is 8 epochs. The
position follows from the epoch (``start_epoch``) and is saved with the method's state.

Differences from the released code, and why:

- One optimizer, the run's, through every phase and stage (as BalanceBenchmark); the authors
  build a fresh SGD for each phase of each stage, so their momentum restarts at every phase.
  Without momentum the two are the same (the equivalence test runs that way).
- The boost rate ``b`` (starting at ``boost_rate``, the authors' 1.0) is registered on the
  model (``model_access.add_model_scalar``), so the run's optimizer trains it, from the
  rectification's gradient only, as the authors' ensemble SGD does; it is saved with the
  model, so a ``best.pt`` of this method loads only into a model that has it. The ensemble
  is formed outside the model's forward, where DDP cannot follow a parameter, so a
  rectification step multiplies by a leaf copy of ``b`` and ``backward`` hands its gradient
  (averaged over ranks) to ``b``: a loop that calls ``loss.backward()`` itself leaves ``b``
  untrained.
  ``train_boost_rate false`` keeps ``b`` fixed (held by the method) instead. Little rides on
  it: as long as ``b > 0`` it changes no evaluation decision, and in rectification it scales a
  linear head's logits, which the head can do itself; what remains is the temperature of
  ``q`` in boosting.
- The authors' head is a two-layer MLP (512-256-C); ours is the model's linear unimodal head
  (BalanceBenchmark's ``SharedHead``, one linear layer).
- No pretrained unimodal learners: the released commands load unimodal checkpoints
  (``--use_pretrain``), which puts every learner in the ensemble from the first stage; we
  follow the released path without it, where a modality joins after its first boosting
  passes. BalanceBenchmark keeps every modality in the ensemble from the start, with ``b``
  starting at 0.01, and skips the consolidation term in its whole first epoch (both
  modalities' stages) rather than in the first stage.
- Normalization statistics move as in the references: the ensemble's other members run in
  training mode (without gradient), the previous learner runs a second time for the
  consolidation term, and an encoder the references do not run (a modality not yet in the
  ensemble) runs with batch statistics without recording them (``heldout_forward``).
- Every epoch is evaluated, not every stage, and the best epoch is picked among all of them;
  during boosting the evaluated ensemble includes the learner being trained (the ensemble
  the stage ends with).
- The authors' learning-rate decay counts stages (CREMA-D: x0.1 every 30 stages; AVE: x0.5 at
  stage 40); the run's StepLR counts epochs, so the recipe below gives it in epochs (30
  stages of 8 epochs; on AVE StepLR decays again at twice the step).
- BalanceBenchmark's ``modulation_starts/ends`` window (outside it its step fails: ``loss``
  is undefined) has no counterpart in the authors' code, nor here.
- The released target is ``zeros(batch_size, C)``: full batches only (``drop_last``); ours
  takes each batch's size. Under DDP each rank's batch-mean loss is averaged by DDP, as is
  the gradient of ``b`` (a model parameter).
"""
from __future__ import annotations

import contextlib
import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from olmbalance import distributed
from olmbalance.base import Method
from olmbalance.errors import UserError
from olmbalance.model_access import add_model_scalar, share_unimodal_head
from olmbalance.olm import heldout_forward
from olmbalance.registry import RunContext, Setting, register_method

BOOST, RECTIFY = "boost", "rectify"
RATE_NAME = "reconboost_boost_rate"  # the trained boost rate's name on the model


def boosting_loss(logits: torch.Tensor, others: torch.Tensor | None, labels: torch.Tensor, weight1: float,
                  weight2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The released per-sample boosting loss ``-(w1 - w2 q_y) log p_y / C`` (batch mean) and
    the mean ``q_y``; ``others`` are the other members' ensemble logits, None when there are
    none (then ``q_y = 1``, the released constant ``c0``)."""
    log_p = torch.log_softmax(logits.float(), dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
    if others is None:
        q = torch.ones_like(log_p)
    else:
        q = torch.softmax(others.float(), dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
    per_sample = -(weight1 - weight2 * q) * log_p / logits.shape[1]
    return per_sample.mean(), q.mean()


class ReconBoost(Method):
    """ReconBoost as released (see the module docstring); the settings are the registration's."""

    name = "reconboost"
    # The fusion head never trains, and idle encoders get no gradient in a step.
    leaves_parameters_unused = True

    def __init__(self, heads: Sequence[str], context: RunContext | None = None, weight1: float = 5.0,
                 weight2: float = 1.0, alpha: float = 0.5, stage_epochs: int = 1, rectify_epochs: int = 1,
                 boost_rate: float = 1.0, train_boost_rate: bool = True):
        super().__init__(heads, context)
        self.modalities = tuple(h for h in self.heads if h != "fusion")
        if "fusion" not in self.heads or len(self.modalities) < 2:
            raise UserError(f"--method reconboost needs a 'fusion' head and at least two modality heads; "
                            f"this model has {', '.join(self.heads)}")
        for flag, value in (("--reconboost-weight1", weight1), ("--reconboost-weight2", weight2),
                            ("--reconboost-alpha", alpha)):
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"{flag} must be a non-negative number, got {value!r}")
        if stage_epochs < 1 or rectify_epochs < 0:
            raise UserError(f"--reconboost-stage-epochs must be at least 1 and --reconboost-rectify-epochs at "
                            f"least 0, got {stage_epochs} and {rectify_epochs}")
        if not (math.isfinite(boost_rate) and boost_rate > 0):
            raise UserError(f"--reconboost-boost-rate must be a positive number, got {boost_rate!r}")
        self.weight1, self.weight2, self.alpha = float(weight1), float(weight2), float(alpha)
        self.stage_epochs, self.rectify_epochs = int(stage_epochs), int(rectify_epochs)
        self.train_boost_rate, self.initial_rate = bool(train_boost_rate), float(boost_rate)
        if not self.train_boost_rate:  # a fixed b is the method's (saved with its state)
            self.register_buffer("fixed_rate", torch.tensor(self.initial_rate))
        self.locate(1)
        self.pending_loss: torch.Tensor | None = None
        self.rate_leaf: torch.Tensor | None = None  # b's stand-in in a rectification step
        self.last: dict[str, torch.Tensor] = {}

    # -- the schedule ---------------------------------------------------------------------------
    def locate(self, epoch: int) -> None:
        """Stage, phase, trained modality and ensemble members of run epoch ``epoch`` (1-based)."""
        self.epoch = int(epoch)
        cycle = self.stage_epochs + self.rectify_epochs
        self.stage, within = divmod(self.epoch - 1, cycle)
        self.phase = BOOST if within < self.stage_epochs else RECTIFY
        self.active = self.modalities[self.stage % len(self.modalities)]
        # A modality joins the ensemble when its first boosting passes end: stages whose
        # boosting ended before this epoch, plus this one's in its rectification.
        joined = self.stage + (self.phase == RECTIFY)
        self.members = self.modalities[:min(joined, len(self.modalities))]

    def previous(self) -> str:
        """The previous stage's modality (the consolidation term's learner)."""
        return self.modalities[(self.stage - 1) % len(self.modalities)]

    def ensemble_members(self) -> tuple[str, ...]:
        """The learners the evaluated ensemble sums: the members and the learner in training."""
        return tuple(m for m in self.modalities if m in self.members or m == self.active)

    def start_epoch(self, epoch, model, data) -> None:
        self.locate(epoch)

    # -- the step -------------------------------------------------------------------------------
    def setup(self, model: nn.Module) -> None:
        # Lists: the model's modules and parameters must not become the method's own.
        self.shared_head = [share_unimodal_head(model, self.name, self.modalities)]
        if self.train_boost_rate:  # on the model: the run's optimizer trains it (rectification only)
            self.trained_rate = [add_model_scalar(model, RATE_NAME, self.initial_rate)]

    @property
    def boost_rate(self) -> torch.Tensor:
        return self.trained_rate[0] if self.train_boost_rate else self.fixed_rate

    def ensemble(self, logits: Mapping[str, torch.Tensor], members: Sequence[str],
                 rate: torch.Tensor | None = None) -> torch.Tensor:
        """``b * sum of the members' logits`` (float32); ``rate`` stands in for ``b`` when given."""
        total = sum(logits[m].float() for m in members)
        return (self.boost_rate.detach() if rate is None else rate).to(total.device) * total

    def forward_train(self, model, inputs, labels):
        boosting = self.phase == BOOST
        ran = set(self.members) | ({self.active} if boosting else set())  # encoders the references run
        encoders = distributed.unwrap(model).encoders
        with contextlib.ExitStack() as idle:
            for m in self.modalities:
                if m not in ran:
                    idle.enter_context(heldout_forward(encoders[m], "batch"))
            logits = model(inputs)
        trained = {self.active} if boosting else set(self.members)
        for m in self.modalities:
            if m not in trained:
                logits[m] = logits[m].detach()
        self.last = {}
        if boosting:
            others = [m for m in self.members if m != self.active]
            with torch.no_grad():
                joint = self.ensemble(logits, others) if others else None
            loss, q = boosting_loss(logits[self.active], joint, labels, self.weight1, self.weight2)
            self.last["reconboost_ensemble_prob"] = q.detach()
            if self.stage > 0:
                loss = loss + self.alpha * self.consolidation(model, inputs, logits[self.active])
            self.pending_loss = loss
            with torch.no_grad():
                logits["fusion"] = self.ensemble(logits, self.ensemble_members())
        else:
            rate = None
            if self.train_boost_rate:
                # b is a model parameter used outside the model's forward, which DDP cannot
                # follow: a leaf copy takes its gradient, and backward hands it to b.
                rate = self.rate_leaf = self.boost_rate.detach().clone().requires_grad_(True)
            logits["fusion"] = self.ensemble(logits, self.members, rate)
        return logits

    def backward(self, model, loss, losses, for_backward) -> None:
        for_backward(loss).backward()
        leaf, self.rate_leaf = self.rate_leaf, None
        if leaf is not None and leaf.grad is not None:
            # Averaged over ranks as DDP averages the model's gradients; scaled like them under
            # AMP (the loop unscales b with the network optimizer's parameters).
            grad = distributed.all_reduce_mean(leaf.grad).to(self.boost_rate.device)
            rate = self.boost_rate
            rate.grad = grad if rate.grad is None else rate.grad + grad

    @torch.no_grad()
    def consolidation(self, model, inputs, logits: torch.Tensor) -> torch.Tensor:
        """The released memory-consolidation term: the previous learner runs again (training
        mode, as released: its normalization statistics move a second time), and the MSE of
        the two softmaxes, detached."""
        previous = self.previous()
        net = distributed.unwrap(model)
        other = self.shared_head[0](net.encoders[previous](inputs[previous]))
        value = F.mse_loss(torch.softmax(logits.detach().float(), dim=1), torch.softmax(other.float(), dim=1))
        self.last["reconboost_consolidation"] = value
        return value

    def forward_eval(self, model, inputs):
        logits = model(inputs)
        logits["fusion"] = self.ensemble(logits, self.ensemble_members())
        return logits

    def network_loss(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.phase == RECTIFY:
            return losses["fusion"]
        loss, self.pending_loss = self.pending_loss, None  # used once: each step computes its own
        if loss is None:
            raise RuntimeError("ReconBoost's boosting loss is made by forward_train; call it first")
        return loss

    def selection_head(self) -> str:
        return "fusion"

    def coefficients(self) -> dict[str, float]:
        return {h: float(self.boost_rate.detach()) if h == "fusion" else 1.0 for h in self.heads}

    def diagnostics(self) -> dict[str, torch.Tensor]:
        last, self.last = self.last, {}
        return last

    def get_extra_state(self):
        return {"epoch": self.epoch, "stage": self.stage, "phase": self.phase, "active": self.active,
                "members": list(self.members)}

    def set_extra_state(self, state) -> None:
        self.locate(int(state["epoch"]))


# The authors' README commands: SGD lr 0.01 (m_lr = e_lr), momentum 0.9, weight decay 5e-4, batch
# 64, batch-mean CE, 4 boosting and 4 rectification passes per stage, weight1 5 (AVE: 4),
# weight2 1, boost rate 1; their learning rate drops x0.1 every 30 stages on CREMA-D and x0.5 at
# stage 40 on AVE (8 epochs a stage here). Their runs have no set length (up to 1001 stages).
_RECONBOOST_AUTHORS = dict(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, loss_reduction="mean",
                           batch_size=64, reconboost_stage_epochs=4, reconboost_rectify_epochs=4)


@register_method(
    "reconboost", prefix="reconboost",
    settings=(Setting("stage_epochs", int, 1,
                      "boosting epochs per stage (BalanceBenchmark T_epochs 1; the authors' 4)"),
              Setting("rectify_epochs", int, 1,
                      "global-rectification epochs after each stage's boosting (0: none; the authors' 4)"),
              Setting("weight1", float, 5.0, "weight of the learner's own cross-entropy in the boosting loss"),
              Setting("weight2", float, 1.0,
                      "weight of the reconcilement term: what the other learners' ensemble already predicts"),
              Setting("alpha", float, 0.5,
                      "weight of the memory-consolidation MSE (detached as released: changes the value only)"),
              Setting("boost_rate", float, 1.0, "the ensemble's boost rate b (its initial value when trained)"),
              Setting("train_boost_rate", bool, True,
                      "train b with the network (rectification's gradient, as released); false: keep it fixed")),
    recipes={"authors": {"*": _RECONBOOST_AUTHORS,
                         "CREMAD": dict(lr_step=240, lr_gamma=0.1),
                         "AVE": dict(lr_step=320, lr_gamma=0.5, reconboost_weight1=4.0)}},
    summary="ReconBoost, alternating boosting with reconcilement and global rectification (Hua et al., ICML 2024)")
def reconboost(heads, context, weight1, weight2, alpha, stage_epochs, rectify_epochs, boost_rate, train_boost_rate):
    return ReconBoost(heads, context, weight1=weight1, weight2=weight2, alpha=alpha, stage_epochs=stage_epochs,
                      rectify_epochs=rectify_epochs, boost_rate=boost_rate, train_boost_rate=train_boost_rate)
