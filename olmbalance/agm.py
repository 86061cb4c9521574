"""AGM: Adaptive Gradient Modulation (Li et al., "Boosting Multi-modal Model Performance with
Adaptive Gradient Modulation", ICCV 2023), on top of ``fusion_only``.

Follows the authors' released code, github lihong2303/AGM_ICCV2023: ``run/CREMAD_main.py``
``train`` (the ``methods == "AGM"`` branch: scores, running scores, coefficients, the window,
the conditional gradient-norm clipping) and ``model/CREMAD_net.py`` ``GradMod`` (the masked
forwards and the backward hooks that scale each modality's response), with ``tasks/
CREMAD_task.py`` ``build_optimizer`` and ``utils/config.py`` for the recipe. BalanceBenchmark's
``balancemm/trainer/AGM_trainer.py`` (``newGrad``/``AGMTrainer.training_step``) was read too;
where it differs from the released code (exponent cap 7, clipping at 5, coefficients on the
encoders' weight gradients, alpha 0.1) the released code is followed.

Per step:

- the model runs as usual (training mode); then each modality m is also *masked*: the
  released ``GradMod.forward`` feeds zero inputs for the masked modalities through the whole
  network in eval mode (``net.eval()``, gradients kept), and so does the default
  ``mask="input"`` here: every encoder runs once more in eval mode on its real input and once
  on a zero input (one sample, broadcast: in eval mode every sample is independent), and the
  fusion head in eval mode combines them. ``f(S)`` is the fusion output with the modalities
  of S present, ``f(all)`` the training-mode one;
- each modality's *response* is its Shapley share of the fusion logits plus ``f(empty)/M``,
  so that the responses add up to ``f(all)`` (two modalities: ``phi_a = (f(a,v) - f(0,v) +
  f(a,0)) / 2``, the released ``Modality_Audio``);
- score ``s_m``: the batch mean of ``-log p_m(label)`` under the response's softmax,
  probabilities floored at 1e-8, averaged over DDP ranks;
- discrepancy ``r_m = exp(M/(M-1) (mean_j s_j - s_m))`` (two modalities: ``exp(s_v - s_a)``
  for audio, the released ``ratio_a``) and its reference ``rbar_m``, the same formula on the
  running mean of the scores over every step before this one (the released ``train_score``,
  carried across epochs, updated after the coefficients are taken);
- coefficient ``k_m = exp(alpha min(rbar_m - r_m, 10))``;
- inside the modulation window (epochs ``modulation_starts..modulation_ends``, counted from 1
  as the released loop counts them) the coefficients are put in force (``update_scale``); the
  fusion logits entering the loss are ``sum_m phi_m`` with the gradient through ``phi_m``
  multiplied by the coefficient in force (the released backward hooks). Outside the window the
  released code stops calling ``update_scale`` but keeps its hooks, so the coefficients in
  force before the window are 1 and after it stay at their last values; so here too. Scores
  and running scores are updated at every step, window or not;
- after the backward pass, when any element of the fusion head's output-layer weight
  gradient exceeds ``grad_clip`` in magnitude, the gradients of the encoders and the fusion
  head are clipped to total norm ``grad_clip`` (released: threshold and max norm 1.0, every
  epoch); ``grad_clip=0`` turns it off.

The authors' recipe (``--recipe authors``): SGD, momentum 0.9, weight decay 1e-4 (hard-coded
in ``build_optimizer``), StepLR(70, 0.1), batch-mean CE, and the run of the README's command:
lr 1e-4, batch 64, 100 epochs (that command is for AV-MNIST; the repository publishes no
CREMA-D command, so the same values are declared for every dataset).

Where we still differ, and why:

- The unimodal heads are ``fusion_only``'s detached read-outs (the released model has none):
  they train only themselves and are left out of the clipped norm.
- ``mask="feature"`` zeroes the encoder features before the fusion head instead of the inputs,
  with the fusion head in its training mode: the masked forwards then cost fusion-head
  evaluations only (no extra encoder passes). It differs from the released masking by the
  encoders' response to a zero input and by the eval-mode normalization and dropout.
- With more than two modalities the responses are the general Shapley shares (BalanceBenchmark's
  ``Modality_Audio``/``Visual``/``Text`` for three); the released code has two modalities.
- With ``--loss-reduction sum`` (the dataset recipe of the real sets) gradients are batch-size
  times the released batch means, so the clipping threshold is crossed far more often; under
  Adam a whole-gradient rescale is largely normalized away.
- The running scores are kept in float64 (the released code keeps Python floats) and in the
  checkpoint, with the coefficients in force.
"""
from __future__ import annotations

import contextlib
import math
from itertools import combinations
from typing import Callable, Sequence

import torch
from torch import nn

from olmbalance import distributed
from olmbalance.errors import UserError
from olmbalance.fusion_only import FusionOnly
from olmbalance.model_access import keep_features
from olmbalance.modulation_log import ModulationLog
from olmbalance.registry import RunContext, Setting, register_method

AGM_DEFAULT_ALPHA = 1.0  # utils/config.py --alpha (BalanceBenchmark: 0.1)
# The released code caps rbar - r at 10 before the exponential.
AGM_EXPONENT_CAP = 10.0
PROBABILITY_FLOOR = 1e-8
AGM_GRAD_CLIP = 1.0  # run/CREMAD_main.py: threshold and max norm of the conditional clipping
AGM_MODULATION_EPOCHS = (0, 20)  # utils/config.py --modulation_starts / --modulation_ends
MASKS = ("input", "feature")


class ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by a constant."""

    @staticmethod
    def forward(ctx, tensor, factor: float):
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def shapley_shares(value: Callable[[frozenset], torch.Tensor], count: int) -> list[torch.Tensor]:
    """Each player's Shapley share of ``value(all)`` plus ``value(empty)/count``; ``value``
    maps the set of present players (indices) to an output. The shares sum to ``value(all)``."""
    cache: dict[frozenset, torch.Tensor] = {}

    def fused(present: frozenset) -> torch.Tensor:
        if present not in cache:
            cache[present] = value(present)
        return cache[present]

    responses = []
    for m in range(count):
        others = [i for i in range(count) if i != m]
        share = 0
        for size in range(count):
            weight = math.factorial(size) * math.factorial(count - size - 1) / math.factorial(count)
            for subset in combinations(others, size):
                share = share + weight * (fused(frozenset(subset) | {m}) - fused(frozenset(subset)))
        responses.append(share + fused(frozenset()) / count)
    return responses


def shapley_responses(fusion, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``shapley_shares`` of ``fusion`` over features, masked modalities given zero features."""
    return shapley_shares(
        lambda present: fusion([f if i in present else torch.zeros_like(f) for i, f in enumerate(features)]),
        len(features))


def response_scores(responses: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Batch-mean cross-entropy of each response, probabilities floored as in the released code."""
    scores = []
    for response in responses:
        p = torch.softmax(response.detach().float(), dim=1).gather(1, labels.view(-1, 1))
        scores.append(-p.clamp(min=PROBABILITY_FLOOR).log().mean())
    return torch.stack(scores)


def discrepancy(scores: torch.Tensor) -> torch.Tensor:
    count = len(scores)
    return torch.exp(count / (count - 1) * (scores.mean() - scores))


def agm_coefficients(scores: torch.Tensor, running_scores: torch.Tensor, alpha: float) -> torch.Tensor:
    gap = (discrepancy(running_scores) - discrepancy(scores)).clamp(max=AGM_EXPONENT_CAP)
    return torch.exp(alpha * gap)


@contextlib.contextmanager
def evaluating(*modules: nn.Module):
    """Run ``modules`` in eval mode, then give every submodule its training flag back."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def output_weights(fusion: nn.Module) -> list[torch.Tensor]:
    """The fusion head's output-layer weights (the released ``fusion_module.fc_out.weight``)."""
    if isinstance(getattr(fusion, "classifier", None), nn.Linear):
        return [fusion.classifier.weight]
    if isinstance(getattr(fusion, "classifiers", None), nn.ModuleList):
        return [c.weight for c in fusion.classifiers]
    return [p for p in fusion.parameters() if p.dim() >= 2]


class AdaptiveGradientModulation(FusionOnly):
    """AGM as its authors released it; see the module docstring."""

    name = "agm"

    def __init__(self, heads: Sequence[str], context: RunContext | None = None, alpha: float = AGM_DEFAULT_ALPHA,
                 modulation_epochs: tuple[int, int] = AGM_MODULATION_EPOCHS, grad_clip: float = AGM_GRAD_CLIP,
                 mask: str = "input"):
        super().__init__(heads, context)
        if len(self.modalities) < 2:
            raise UserError(f"--method agm needs at least two modality heads besides 'fusion'; "
                            f"this model has {', '.join(self.heads)}")
        if not (math.isfinite(alpha) and alpha > 0):
            raise UserError(f"AGM alpha must be a positive number (--agm-alpha), got {alpha!r}")
        if not (math.isfinite(grad_clip) and grad_clip >= 0):
            raise UserError(f"--agm-grad-clip must be a number >= 0 (0: no clipping), got {grad_clip!r}")
        start, end = (int(e) for e in modulation_epochs)
        if start < 0 or end < start:
            raise UserError(f"AGM modulation epochs must satisfy 0 <= starts <= ends, got {start}..{end} "
                            "(--agm-modulation-starts, --agm-modulation-ends)")
        if mask not in MASKS:
            raise UserError(f"--agm-mask must be one of: {', '.join(MASKS)}; got {mask!r}")
        self.alpha = float(alpha)
        self.modulation_epochs = (start, end)
        self.grad_clip = float(grad_clip)
        self.mask = mask
        self.epoch = 1  # the loop's epoch (1-based), from start_epoch
        count = len(self.modalities)
        self.register_buffer("running_scores", torch.zeros(count, dtype=torch.float64))
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        # The coefficients in force (released GradMod.scale_a / scale_v): 1 until the window
        # opens, the last ones after it closes.
        self.register_buffer("applied", torch.ones(count, dtype=torch.float64))
        self.last: dict[str, torch.Tensor] = {}
        self.log = ModulationLog(self.heads, self.modalities)

    def setup(self, model) -> None:
        super().setup(model)
        net = keep_features(model, self.name)
        if tuple(net.modalities) != self.modalities:
            raise UserError(f"--method agm: the model's modalities {net.modalities} do not match its heads {self.heads}")
        net.keep_features = self.mask == "feature"  # input masking runs the encoders itself

    def start_epoch(self, epoch, model, data) -> None:
        self.epoch = int(epoch)

    def modulating(self) -> bool:
        start, end = self.modulation_epochs
        return start <= self.epoch <= end

    # -- the step ---------------------------------------------------------------------------------
    def responses(self, model, inputs, full: torch.Tensor) -> list[torch.Tensor]:
        """Each modality's response; ``full`` is the training forward's fusion output."""
        net = distributed.unwrap(model)
        count = len(self.modalities)
        if self.mask == "feature":
            features = [net.last_features[m] for m in self.modalities]
            return shapley_shares(lambda present: full if len(present) == count else net.fusion(
                [f if i in present else torch.zeros_like(f) for i, f in enumerate(features)]), count)
        with evaluating(net.encoders, net.fusion):  # the released GradMod: net.eval() for the masked forwards
            present_features = [net.encoders[m](inputs[m]) for m in self.modalities]
            absent_features = []
            for m, f in zip(self.modalities, present_features):
                zero = net.encoders[m](torch.zeros_like(inputs[m][:1]))
                absent_features.append(zero.expand(f.shape[0], *zero.shape[1:]))
            return shapley_shares(lambda present: full if len(present) == count else net.fusion(
                [present_features[i] if i in present else absent_features[i] for i in range(count)]), count)

    def forward_train(self, model, inputs, labels):
        logits = model(inputs)
        responses = self.responses(model, inputs, logits["fusion"])
        scores = distributed.all_reduce_mean(response_scores(responses, labels)).double()
        running = self.running_scores.to(scores.device)
        coefficients = agm_coefficients(scores, running, self.alpha)
        n = int(self.steps_seen)
        self.running_scores.copy_((running * n + scores) / (n + 1))  # after the coefficients: past steps only
        self.steps_seen += 1
        if self.modulating():
            self.applied.copy_(coefficients)
        logits["fusion"] = sum(ScaleGradient.apply(r, float(k)) for r, k in zip(responses, self.applied.tolist()))
        self.last = self.log.record(discrepancy(scores), self.applied)
        return logits

    def after_backward(self, model, logits, labels) -> None:
        """The released conditional clipping, on the parameters the released model has."""
        clipped = 0.0
        if self.grad_clip > 0:
            net = distributed.unwrap(model)
            grads = [w.grad for w in output_weights(net.fusion) if w.grad is not None]
            if grads and max(float(g.abs().max()) for g in grads) > self.grad_clip:
                parameters = [*net.encoders.parameters(), *net.fusion.parameters()]
                nn.utils.clip_grad_norm_(parameters, max_norm=self.grad_clip)
                clipped = 1.0
        self.last["clipped"] = torch.tensor(clipped)

    # -- what gets logged and checkpointed -------------------------------------------------------
    def coefficients(self) -> dict[str, float]:
        """Mean coefficient in force per head since the previous call (once per epoch)."""
        return self.log.mean_coefficients()

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return dict(self.last)


@register_method(
    "agm", prefix="agm",
    settings=(Setting("alpha", float, AGM_DEFAULT_ALPHA, "modulation strength alpha (released default 1.0)"),
              Setting("modulation_starts", int, AGM_MODULATION_EPOCHS[0],
                      "first epoch (counted from 1, as the released loop does) whose coefficients are put in force"),
              Setting("modulation_ends", int, AGM_MODULATION_EPOCHS[1],
                      "last such epoch (inclusive); afterwards the last coefficients stay in force, as released"),
              Setting("grad_clip", float, AGM_GRAD_CLIP,
                      "clip encoders+fusion to this gradient norm when a fusion output-weight gradient exceeds it; 0: off"),
              Setting("mask", str, "input", "what a masked modality loses: its input (released, eval-mode "
                      "encoder passes) or its feature (cheaper)", choices=MASKS)),
    recipes={"authors": {"*": dict(optimizer="sgd", lr=1e-4, momentum=0.9, weight_decay=1e-4, lr_step=70, lr_gamma=0.1,
                                   loss_reduction="mean", batch_size=64, epochs=100)}},
    summary="AGM, adaptive gradient modulation by Shapley-style modality responses (Li et al., ICCV 2023)")
def agm(heads, context, alpha, modulation_starts, modulation_ends, grad_clip, mask):
    return AdaptiveGradientModulation(heads, context, alpha=alpha, modulation_epochs=(modulation_starts, modulation_ends),
                                      grad_clip=grad_clip, mask=mask)
