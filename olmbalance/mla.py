"""MLA: Multimodal Learning with Alternating unimodal adaptation (Zhang et al., "Multimodal
Representation Learning by Alternating Unimodal Adaptation", CVPR 2024), as its authors ran it.

Followed: github Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-Adaptation, ``main.py``
``train_epoch`` (its ``gs_flag`` branch) and ``valid`` (``gs_flag`` branch,
``calculate_gating_weights``), ``utils/utils.py`` ``GSPlugin.before_update``; and GeWu-Lab
BalanceBenchmark, ``balancemm/trainer/MLA_trainer.py`` (``MLATrainer.training_step``,
``GSPlugin.before_update``) with ``balancemm/models/avclassify_model.py``
(``BaseClassifierMLAModel.calculate_gating_weights``).

- One head ``h`` shared by every modality: the model's unimodal heads are tied into one linear
  layer at setup (the fusion head is never trained).
- Every batch trains each modality in turn (``modalities`` order: audio, then visual), each with
  its own optimizer step: the loss ``CE(h(phi_m(x_m)), y)`` (batch mean), backward (only
  ``phi_m`` and ``h`` get gradients), the gradient modification, ``optimizer.step()``. The
  loop takes these ``substeps()`` per batch; every sub-step runs its own forward, so the second
  modality's logits come from the head the first one just updated, as in the references.
- Gradient modification of the shared head, at every sub-step but the run's first (the
  released ``exp_count != 0``): with ``r`` the batch-mean feature of the trained modality, ``i``
  the batch index in the epoch and ``N`` the batches per epoch, ``a = alpha ** (1 + i/N)``
  (released ``1.0 * 0.1 ** (i/N + 1)``), ``k = P r^T``, ``P <- P - k k^T / (a + k r)``,
  ``P <- P / ||P||_F``, then the weight gradient ``G <- G + G P^T`` (the bias is untouched).
  ``P`` (D x D, identity at the start) is one matrix for all modalities and the whole run.
  Both references divide elementwise by the D x D matrix ``a + k r`` (``torch.mm(k, r)`` is
  an outer product), not by the paper's scalar ``a + r k``: ``denominator="outer"`` is that,
  ``"scalar"`` the paper's.
- Test time: ``fusion="sample"``: per sample, with ``H_m`` the entropy of softmax(h(phi_m)),
  ``g_m = exp(max_j H_j - H_m) / sum_j exp(max_j H_j - H_m)``, fused logits
  ``sum_m g_m h(phi_m)`` (the paper; BalanceBenchmark's ``calculate_gating_weights``).
  The training epoch's fusion metrics use the same rule on detached logits.

Settings where the references disagree (the released behaviour one choice away):

- ``gradient_modification``: ``add`` (default, BalanceBenchmark: ``G + G P^T``); ``replace``
  (``G P^T``: the authors' ``GSPlugin.before_update`` as written, and the paper); ``off``.
  The authors' ``main.py`` as released never modifies anything: its parameter-name check
  ``n == "module.weight"`` never matches the bare ``fc_out`` Linear it is handed (whose weight
  is named ``weight``; their commit "Fix bugs" dropped the ``or n == "weight"`` that matched),
  so a run of their code is ``off``.
- ``fusion``: ``sample`` (default, above); ``batch``: the released ``--dynamic`` code, whose
  ``calculate_entropy`` takes the softmax over the batch dimension (``dim=0``, the per-sample
  ``dim=1`` commented out beside it) and sums the entropy over the whole batch, so one weight
  per modality and batch: a sample's prediction then depends on the other samples in its
  evaluation batch (and on the batch size and the DDP sharding), which is why it is not the
  default; ``fixed``: the released default without ``--dynamic``, ``w * z_1 + (1 - w) * z_2``
  with ``w = fixed_weight`` (0.55, ``main(av_alpha=0.55)``), two modalities only.

Remaining differences, and why:

- The released run (torch 1.8.1, whose ``zero_grad()`` zeroes gradients instead of dropping
  them) also applies SGD's momentum and weight decay to the first modality's encoder during
  the second modality's sub-step (its gradient is a zero tensor, not None). BalanceBenchmark
  (torch 2) and we drop gradients (``set_to_none``), so an encoder moves only in its own sub-step.
- Our model computes every encoder in each forward; in a sub-step the idle encoders run in
  the state of a held-out forward (``heldout_forward(..., "batch")``: batch statistics, running
  statistics untouched, dropout off), so each encoder's normalization statistics move once per
  batch, as in the references, where each encoder runs once per batch.
- ``N`` is the run's ``steps_per_epoch`` (ceil(train size / batch)), the released
  ``len(dataloader)``; a batch the loop skips (nothing readable) does not advance ``i``.
- BalanceBenchmark trains the plain fusion loss outside its ``modulation_starts/ends`` window
  (0..80 of its epochs); the authors' code has no such window, nor do we.
- The references average ``r`` over one process's batch (DataParallel gathers the whole batch);
  under DDP ``r`` is averaged over ranks, so ``P`` stays identical everywhere.
- A loop that ignores ``substeps()`` (one step per batch) alternates modalities across batches.
"""
from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

import torch

from olmbalance import distributed
from olmbalance.base import Method
from olmbalance.errors import UserError
from olmbalance.model_access import keep_features, last_features
from olmbalance.olm import heldout_forward
from olmbalance.registry import RunContext, Setting, register_method

FUSIONS = ("sample", "batch", "fixed")
MODIFICATIONS = ("add", "replace", "off")
DENOMINATORS = ("outer", "scalar")


def entropy_weights(logits: Mapping[str, torch.Tensor], per: str = "sample") -> dict[str, torch.Tensor]:
    """Fusion weights per modality from the entropy of its prediction: (B, 1) per sample, or
    (1, 1) for ``per="batch"`` (the released code: softmax over the batch, entropy summed)."""
    dim = 1 if per == "sample" else 0
    entropies = {}
    for m, z in logits.items():
        log_p = torch.log_softmax(z.float(), dim=dim)
        entropy = -(log_p.exp() * log_p)
        entropies[m] = entropy.sum(dim=1, keepdim=True) if per == "sample" else entropy.sum().reshape(1, 1)
    most = torch.stack(list(entropies.values())).max(dim=0).values
    raw = {m: torch.exp(most - h) for m, h in entropies.items()}
    total = sum(raw.values())
    return {m: w / total for m, w in raw.items()}


def uncertainty_fusion(logits: Mapping[str, torch.Tensor], per: str = "sample") -> torch.Tensor:
    weights = entropy_weights(logits, per)
    return sum(weights[m] * logits[m].float() for m in logits)


def update_projector(projector: torch.Tensor, feature_mean: torch.Tensor, alpha: float,
                     denominator: str = "outer") -> torch.Tensor:
    """One update of P with the (1, D) feature mean r: ``P - k k^T / (alpha + k r)`` divided
    elementwise by the D x D outer product (released), or by the scalar ``alpha + r k``."""
    k = projector @ feature_mean.t()
    scale = k @ feature_mean if denominator == "outer" else feature_mean @ k
    projector = projector - (k @ k.t()) / (alpha + scale)
    return projector / projector.norm(p="fro")


class AlternatingUnimodalAdaptation(Method):
    name = "mla"
    # The fusion head never trains, and the idle encoders get no gradient in a sub-step.
    leaves_parameters_unused = True

    def __init__(self, heads: Sequence[str], context: RunContext | None = None, alpha: float = 0.1,
                 gradient_modification: str = "add", denominator: str = "outer", fusion: str = "sample",
                 fixed_weight: float = 0.55):
        super().__init__(heads, context)
        self.modalities = tuple(h for h in self.heads if h != "fusion")
        if "fusion" not in self.heads or len(self.modalities) < 2:
            raise UserError(f"--method mla needs a 'fusion' head and at least two modality heads; "
                            f"this model has {', '.join(self.heads)}")
        if alpha <= 0:
            raise UserError(f"--mla-alpha must be positive, got {alpha}")
        if fusion == "fixed" and (len(self.modalities) != 2 or not 0 <= fixed_weight <= 1):
            raise UserError(f"--mla-fusion fixed takes two modalities and --mla-fixed-weight in [0, 1]; "
                            f"got {len(self.modalities)} modalities and weight {fixed_weight}")
        self.alpha, self.gradient_modification, self.denominator = alpha, gradient_modification, denominator
        self.fusion, self.fixed_weight = fusion, fixed_weight
        self.steps_per_epoch = max(1, int(self.context.steps_per_epoch or 1))
        # Sub-steps taken this epoch (the turn and the batch index), and over the run (the
        # released exp_count: its first sub-step is not modified); host counters, checkpointed
        # as extra state, so that no step reads the device.
        self.substep = 0
        self.updates = 0

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

    def substeps(self) -> int:
        return len(self.modalities)

    def start_epoch(self, epoch, model, data) -> None:
        self.substep = 0

    @property
    def active(self) -> str:
        return self.modalities[self.substep % len(self.modalities)]

    def fuse(self, logits: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The evaluation-time fusion of the unimodal logits (``fusion`` setting)."""
        unimodal = {m: logits[m] for m in self.modalities}
        if self.fusion == "fixed":
            first, second = (unimodal[m].float() for m in self.modalities)
            return self.fixed_weight * first + (1 - self.fixed_weight) * second
        return uncertainty_fusion(unimodal, self.fusion)

    def forward_train(self, model, inputs, labels):
        active = self.active
        encoders = distributed.unwrap(model).encoders
        with contextlib.ExitStack() as idle:  # idle encoders: batch statistics, none recorded
            for m in self.modalities:
                if m != active:
                    idle.enter_context(heldout_forward(encoders[m], "batch"))
            logits = model(inputs)
        with torch.no_grad():
            for m in self.modalities:
                if m != active:  # logged only; detached, so the idle graph is freed early
                    logits[m] = logits[m].detach()
            logits["fusion"] = self.fuse(logits)
        return logits

    def forward_eval(self, model, inputs):
        logits = model(inputs)
        logits["fusion"] = self.fuse(logits)
        return logits

    def network_loss(self, losses):
        return losses[self.active]

    def after_backward(self, model, logits, labels) -> None:
        head = self.shared_head[0]
        features = last_features(model)[self.active]
        distributed.unwrap(model).last_features = {}  # frees the idle encoders' graph
        if self.gradient_modification != "off" and self.updates > 0 and head.weight.grad is not None:
            feature_mean = distributed.all_reduce_mean(features.detach().float().mean(dim=0, keepdim=True))
            batch = (self.substep // len(self.modalities)) % self.steps_per_epoch
            alpha = self.alpha ** (1 + batch / self.steps_per_epoch)
            self.projector.copy_(update_projector(self.projector, feature_mean.to(self.projector.device), alpha,
                                                  self.denominator))
            grad = head.weight.grad
            projected = grad @ self.projector.t().to(grad.dtype)
            if self.gradient_modification == "add":
                grad.add_(projected)
            else:
                grad.copy_(projected)
        self.updates += 1
        self.substep += 1

    def selection_head(self) -> str:
        return "fusion"

    def get_extra_state(self):
        return {"substep": self.substep, "updates": self.updates}

    def set_extra_state(self, state) -> None:
        self.substep, self.updates = int(state["substep"]), int(state["updates"])


# The authors' README command and main.py defaults: SGD lr 1e-3, momentum 0.9, weight decay 1e-4,
# StepLR(70, 0.1), batch 64, 100 epochs, batch-mean CE (nn.CrossEntropyLoss()).
_MLA_AUTHORS = dict(optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4, lr_step=70, lr_gamma=0.1,
                    loss_reduction="mean", batch_size=64, epochs=100)


@register_method(
    "mla", prefix="mla",
    settings=(Setting("alpha", float, 0.1, "base a of the projector's regularizer a ** (1 + i/N) at batch i of N"),
              Setting("gradient_modification", str, "add",
                      "shared head's weight gradient G: add G P^T (BalanceBenchmark), replace it by G P^T, or off "
                      "(the authors' main.py as released)", MODIFICATIONS),
              Setting("denominator", str, "outer",
                      "projector update divides by the outer a + k r (released) or the scalar a + r k (paper)",
                      DENOMINATORS),
              Setting("fusion", str, "sample",
                      "evaluation fusion: per-sample entropy weights, per-batch ones (released --dynamic), or fixed",
                      FUSIONS),
              Setting("fixed_weight", float, 0.55, "first modality's weight under --mla-fusion fixed (released 0.55)")),
    recipes={"authors": {"*": _MLA_AUTHORS}},
    summary="MLA, multimodal learning with alternating unimodal adaptation (Zhang et al., CVPR 2024)")
def mla(heads, context, alpha, gradient_modification, denominator, fusion, fixed_weight):
    return AlternatingUnimodalAdaptation(heads, context, alpha=alpha, gradient_modification=gradient_modification,
                                         denominator=denominator, fusion=fusion, fixed_weight=fixed_weight)
