"""LFM: Learning-Fitted Modulation (Yang, Wan, Jiang, Xu, "Facilitating Multimodal Classification
via Dynamically Learning Modality Gap", NeurIPS 2024): the supervised fusion loss and an
unsupervised alignment of the modalities' predictions, mixed with weights that change over
training (alignment first, classification later).

Follows the authors' released code, github njustkmg/NeurIPS24-LFM: ``Crema_epoch.py`` (the
README's run: ``getAlpha_Learnable_Fitted``, ``train_audio_video``, ``Alignment``, the
``__main__`` loop and ``data/crema.json`` for the recipe) and ``Crema_epoch_learnable.py``
(``getAlpha_Learnable``: the learned weights the fitted curve was fitted to); with their
model, ``model/AudioVideo.py`` ``AVClassifier`` (one linear head per modality, no fusion
layer). GeWu-Lab BalanceBenchmark's ``balancemm/trainer/LFM_trainer.py`` (``LFMTrainer.fit``,
``training_step``, ``getAlpha_Learnable``; ``LFM`` in ``configs/trainer_config.yaml``) was read
too; where it differs, the released code is followed and the difference is a setting.

Per step (``train_audio_video``), with ``o_m`` the modality heads' logits:

- fused logits ``z = mean_m o_m`` (released ``0.5 * o_v + 0.5 * o_a``): what is trained, and
  what the model predicts at evaluation (``forward_eval``); the model's own fusion head is
  not used (the released model has none);
- alignment ``A = 0.5 (KL(q || p_a) + KL(q || p_v))`` with ``p_m = softmax(o_m)``, ``q`` their
  mean: the released ``Alignment`` (``F.kl_div(p.log(), m)`` is ``KL(m || p)``, so this is the
  reversed-KL form of the Jensen-Shannon divergence; the code is followed); over more than two
  modalities, the mean over pairs (BalanceBenchmark's ``manual_combinations``);
- loss ``2 (w_cls CE(z, y) + w_align A)``.

The weights (``method``):

- ``learning-fitted`` (default; the README's ``Crema_epoch.py`` and BalanceBenchmark's configured
  ``method``): ``w_cls`` and ``w_align`` are the released degree-5 polynomials of the 0-based
  epoch (``w_cls`` from 0.20 at epoch 0 to about 0.9 near epoch 200), fitted by the authors to the
  weights ``learnable`` gave on CREMA-D;
- ``learnable`` (``Crema_epoch_learnable.py``): before every epoch (the first included) the
  weights take one step on a fixed probe batch: with ``L = w_cls CE + w_align A`` on the probe
  and ``g_cls`` the gradient of the probe's CE, the Hessian-vector product
  ``d/dtheta (grad L . g_cls)`` is taken and ``h`` is the mean of its first parameter tensor's
  block (the released ``hessian_vector_prod[0].mean()``: the model's first parameter, the
  first encoder's first weight, as the released audio encoder's first convolution; parameters
  that do not reach the probe's loss, such as the unused fusion head, are left out); ``w_align <- clip(w_align - lr h, 0.05,
  0.95)``, ``w_cls = 1 - w_align``, starting from ``w_cls = 0.05`` (released ``cls_k = [0.05,
  0.95]``); ``lr`` is ``lr_alpha`` (1e-4) halved at every 0-based epoch that is a positive
  multiple of 20, cumulatively. The probe: the first ``probe_size`` (8) samples of the first
  validation batch, the same every epoch; the model in eval mode, in float32.

Where we differ from the released code, and why:

- The probe comes from the validation split (BalanceBenchmark does the same, with a quarter of
  its first validation batch). The released script takes 16 random training samples out of
  training as its "validation" set and probes with the first 8; our splits are fixed by the
  dataset, so the validation split plays that part (it then steers the weights, as in
  BalanceBenchmark, and is no longer a fully impartial judge of the best epoch under
  ``learnable``; ``learning-fitted`` reads no data).
- The released first probe (epoch 0) runs on the fresh model in training mode (its BatchNorm
  running statistics move by that batch); every later one runs after ``val`` left the model
  in eval mode. Every probe runs in eval mode here, and moves nothing.
- Under DDP each rank probes its own first validation batch and ``h`` is averaged over ranks.
- The fitted polynomials were fitted over the released 200 epochs and leave [0, 1] soon after
  (``w_cls`` is -0.12 at epoch 229); from epoch 200 on the weights stay at the epoch-199 value.
  Within the 200 epochs they are the released values (``w_align`` slightly below 0 around epoch
  183, as released).
- ``log_softmax`` replaces ``softmax(.).log()`` (equal up to rounding, finite where a
  probability underflows).

Settings where BalanceBenchmark differs (the released behaviour one choice away):

- ``logits="fusion"``: BalanceBenchmark's model has a fusion layer: the CE is the model's
  fusion logits', and ``o_m`` are the fusion head's per-modality shares (``modality_logits`` of a
  concat or sum head; BalanceBenchmark's ``unimodal_result``); the unimodal heads are then
  ``fusion_only``'s detached read-outs. Default ``heads``: the released model.
- ``initial_weight``: BalanceBenchmark starts ``learnable`` from ``w_cls = 0.95`` (its
  ``alpha = {1: 0.05, 0: 0.95}``), the released code from 0.05.
- BalanceBenchmark always runs ``learnable`` whatever its ``method`` setting says (the setting
  is stored and never read); its ``alpha: 1`` and ``trainer_probed`` are overwritten or unused by
  its LFM trainer, and its ``modulation_starts/ends`` are not read either, so none of them is a
  setting here.

A learned weight with an optimizer of its own would map to the loop's coefficient hooks, but
LFM's weight takes one hand-written step per epoch from a Hessian-vector product, not from a
per-step loss, so it is the method's own state: the weights in force are a buffer (saved in
checkpoints; a resumed run continues identically), updated in ``start_epoch``.

The authors' recipe (``--recipe authors``, ``data/crema.json`` and the script): SGD, lr 1e-2,
momentum 0.9, weight decay 1e-4, StepLR(70, 0.1), batch 64, 200 epochs, batch-mean CE. (The
released loop steps the scheduler before each epoch's training, so its lr drops one epoch
earlier than here.)
"""
from __future__ import annotations

import math
from itertools import combinations
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

from olmbalance import distributed
from olmbalance.agm import evaluating
from olmbalance.base import Method
from olmbalance.errors import UserError
from olmbalance.model_access import keep_features, modality_parts
from olmbalance.registry import RunContext, Setting, register_method

LFM_METHODS = ("learning-fitted", "learnable")
LOGITS = ("heads", "fusion")
# Crema_epoch.py getAlpha_Learnable_Fitted: the CE weight's and the alignment weight's
# polynomials in the 0-based epoch (lowest degree first).
FITTED_CLS = (2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11)
FITTED_ALIGN = (7.95376296e-01, -3.35472727e-03, -1.22989557e-04, 2.92947416e-06, -2.23835486e-08, 5.39717505e-11)
FITTED_EPOCHS = 200  # the released run the curves were fitted over
LFM_LR_ALPHA = 1e-4  # configs/trainer_config.yaml LFM.lr_alpha; the released lr_alpha
LFM_INITIAL_WEIGHT = 0.05  # released cls_k[0] (BalanceBenchmark: 0.95)
LFM_PROBE_SIZE = 8  # released: half of its 16-sample validation batch
ALIGN_BOUNDS = (0.05, 0.95)  # released clip of the alignment weight
HALVING_EPOCHS = 20  # released: lr_alpha halves at every 0-based epoch that is a positive multiple


def fitted_weights(epoch: int) -> tuple[float, float]:
    """(w_cls, w_align) of the released fitted curves at the 0-based ``epoch``."""
    e = min(int(epoch), FITTED_EPOCHS - 1)
    return (sum(c * e ** i for i, c in enumerate(FITTED_CLS)), sum(c * e ** i for i, c in enumerate(FITTED_ALIGN)))


def alpha_lr(lr_alpha: float, epoch: int) -> float:
    """The released lr of the learnable weight at the 0-based ``epoch`` (halved every 20 epochs)."""
    return lr_alpha / 2 ** (int(epoch) // HALVING_EPOCHS)


def alignment(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The released ``Alignment``: 0.5 (KL(m || p) + KL(m || q)), m the mean of the two
    softmaxes, each KL a batch mean; in float32."""
    log_p, log_q = torch.log_softmax(p.float(), dim=-1), torch.log_softmax(q.float(), dim=-1)
    middle = 0.5 * log_p.exp() + 0.5 * log_q.exp()
    return 0.5 * (F.kl_div(log_p, middle, reduction="batchmean") + F.kl_div(log_q, middle, reduction="batchmean"))


def pairwise_alignment(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean alignment over every pair of modalities (two modalities: the one pair)."""
    pairs = list(combinations(range(len(parts)), 2))
    return sum(alignment(parts[i], parts[j]) for i, j in pairs) / len(pairs)


def first_samples(inputs, count: int):
    """The first ``count`` samples of a (nested) mapping of batched tensors."""
    if isinstance(inputs, Mapping):
        return {k: first_samples(v, count) for k, v in inputs.items()}
    return inputs[:count] if torch.is_tensor(inputs) else inputs


class LearningFittedModulation(Method):
    """LFM as released; see the module docstring."""

    name = "lfm"

    def __init__(self, heads: Sequence[str], context: RunContext | None = None, method: str = "learning-fitted",
                 lr_alpha: float = LFM_LR_ALPHA, initial_weight: float = LFM_INITIAL_WEIGHT,
                 probe_size: int = LFM_PROBE_SIZE, logits: str = "heads"):
        super().__init__(heads, context)
        self.modalities = tuple(h for h in self.heads if h != "fusion")
        if "fusion" not in self.heads or len(self.modalities) < 2:
            raise UserError(f"--method lfm needs a 'fusion' head and at least two modality heads; "
                            f"this model has {', '.join(self.heads)}")
        if method not in LFM_METHODS or logits not in LOGITS:
            raise UserError(f"LFM got method {method!r} and logits {logits!r}; they must be one of "
                            f"{', '.join(LFM_METHODS)} (--lfm-method) and of {', '.join(LOGITS)} (--lfm-logits)")
        if not (math.isfinite(lr_alpha) and lr_alpha >= 0):
            raise UserError(f"--lfm-lr-alpha must be a non-negative number, got {lr_alpha!r}")
        if not 0 <= initial_weight <= 1:
            raise UserError(f"--lfm-initial-weight (the CE's starting weight) must be in [0, 1], got {initial_weight!r}")
        if probe_size < 1:
            raise UserError(f"--lfm-probe-size must be at least 1 sample, got {probe_size!r}")
        self.method, self.lr_alpha, self.initial_weight = method, float(lr_alpha), float(initial_weight)
        self.probe_size, self.logits = int(probe_size), logits
        # The released model has no fusion layer: with the heads' mean as the prediction, the
        # model's fusion head gets no gradient (DDP must be told).
        self.leaves_parameters_unused = logits == "heads"
        start = fitted_weights(0) if method == "learning-fitted" else (initial_weight, 1.0 - initial_weight)
        # (w_cls, w_align) in force: a buffer (checkpointed), and a host copy read by the steps.
        self.register_buffer("weights", torch.tensor(start, dtype=torch.float64))
        self.in_force = tuple(float(w) for w in start)
        self.epoch = 1
        self.probe = None  # (inputs, labels): the learnable weights' fixed probe batch, on the device
        self.pending: torch.Tensor | None = None
        self.last: dict[str, torch.Tensor] = {}

    def setup(self, model) -> None:
        net = distributed.unwrap(model)
        if self.logits == "heads":
            heads = getattr(net, "unimodal_heads", None)
            if heads is None or set(heads.keys()) != set(self.modalities):
                raise UserError(f"--method lfm needs a late-fusion model with a linear head per modality "
                                f"(or --lfm-logits fusion); {type(net).__name__} has none")
            if hasattr(net, "detach_unimodal_heads"):
                net.detach_unimodal_heads = False  # the heads train their encoders (the released model)
            return
        net = keep_features(model, self.name)
        if getattr(net.fusion, "modality_logits", None) is None or not hasattr(net, "detach_unimodal_heads"):
            raise UserError(f"--method lfm --lfm-logits fusion needs a fusion head made of per-modality parts "
                            f"(concat or sum) and detachable unimodal heads; {type(net.fusion).__name__} is not one")
        net.detach_unimodal_heads = True  # fusion_only's read-outs

    # -- the predictions: each modality's logits and the fused ones -------------------------------
    def parts(self, model, logits) -> list[torch.Tensor]:
        if self.logits == "heads":
            return [logits[m] for m in self.modalities]
        net = distributed.unwrap(model)
        features, net.last_features = net.last_features, {}
        return modality_parts(net.fusion, [features[m] for m in self.modalities])

    def fused(self, logits, parts) -> torch.Tensor:
        return sum(p.float() for p in parts) / len(parts) if self.logits == "heads" else logits["fusion"]

    def forward_train(self, model, inputs, labels):
        logits = model(inputs)
        parts = self.parts(model, logits)
        logits["fusion"] = self.fused(logits, parts)
        self.pending = pairwise_alignment(parts)
        self.last = {"lfm_alignment": self.pending.detach(), "lfm_cls_weight": torch.tensor(self.in_force[0]),
                     "lfm_align_weight": torch.tensor(self.in_force[1])}
        return logits

    def forward_eval(self, model, inputs):
        logits = model(inputs)
        if self.logits == "heads":
            logits["fusion"] = self.fused(logits, self.parts(model, logits))
        return logits

    def network_loss(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        w_cls, w_align = self.in_force
        alignment_loss, self.pending = self.pending, None  # used once
        loss = 2 * (w_cls * losses["fusion"] + w_align * alignment_loss)
        if self.logits == "fusion":
            loss = loss + sum(losses[m] for m in self.modalities)  # the read-outs train themselves
        return loss

    # -- the weights: getAlpha_Learnable_Fitted / getAlpha_Learnable -------------------------------
    def start_epoch(self, epoch, model, data) -> None:
        self.epoch = int(epoch)
        if self.method == "learning-fitted":
            weights = fitted_weights(self.epoch - 1)
        else:
            weights = self.learned_weights(self.epoch - 1, model, data)
        self.weights.copy_(torch.tensor(weights, dtype=torch.float64))
        self.in_force = tuple(float(w) for w in weights)

    def probe_batch(self, data):
        if self.probe is None:
            if data is None:
                raise UserError("--lfm-method learnable needs the validation data in start_epoch (EpochData)")
            for inputs, labels in data.val_batches():
                self.probe = (first_samples(inputs, self.probe_size), labels[:self.probe_size])
                break
        return self.probe

    def hessian_step(self, model, inputs, labels) -> torch.Tensor:
        """The released alpha gradient on the probe: the mean of the first parameter's block of
        the Hessian of ``w_cls CE + w_align A`` times the CE's gradient."""
        net = distributed.unwrap(model)
        w_cls, w_align = self.in_force
        device = labels.device
        with evaluating(net), torch.autocast(device_type=device.type, enabled=False):
            logits = net(inputs)
            parts = self.parts(net, logits)
            cls = F.cross_entropy(self.fused(logits, parts).float(), labels)
            total = w_cls * cls + w_align * pairwise_alignment(parts)
            params = [p for p in net.parameters() if p.requires_grad]
            theta = torch.autograd.grad(total, params, create_graph=True, allow_unused=True)
            cls_grads = torch.autograd.grad(cls, params, retain_graph=True, allow_unused=True)
            kept = [(t, g) for t, g in zip(theta, cls_grads) if t is not None and g is not None and t.requires_grad]
            block = torch.autograd.grad([t for t, _ in kept], [params[0]], grad_outputs=[g for _, g in kept],
                                        allow_unused=True)[0]
        if block is None:  # the first parameter does not reach the loss
            return torch.zeros((), device=device)
        return block.detach().float().mean()

    def learned_weights(self, epoch: int, model, data) -> tuple[float, float]:
        probe = self.probe_batch(data)
        device = distributed.collective_device()
        if probe is not None:
            inputs, labels = probe
            found = torch.stack([self.hessian_step(model, inputs, labels).to(device), torch.ones((), device=device)])
        else:  # this rank read no validation sample: it joins the reduction with nothing
            found = torch.zeros(2, device=device)
        found = distributed.all_reduce_mean(found).tolist()
        w_cls, w_align = self.in_force
        if found[1] <= 0:
            return w_cls, w_align
        gradient = found[0] / found[1]
        low, high = ALIGN_BOUNDS
        w_align = max(low, min(high, w_align - alpha_lr(self.lr_alpha, epoch) * gradient))
        return 1.0 - w_align, w_align

    # -- what gets logged and checkpointed -------------------------------------------------------
    def diagnostics(self) -> dict[str, torch.Tensor]:
        last, self.last = self.last, {}
        return last

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.in_force = tuple(float(w) for w in self.weights.tolist())


@register_method(
    "lfm", prefix="lfm",
    settings=(Setting("method", str, "learning-fitted",
                      "the weights: the released curves of the epoch (learning-fitted) or learned per epoch on a "
                      "validation probe (learnable)", choices=LFM_METHODS),
              Setting("lr_alpha", float, LFM_LR_ALPHA, "learnable: the alignment weight's lr, halved every 20 epochs"),
              Setting("initial_weight", float, LFM_INITIAL_WEIGHT,
                      "learnable: the CE's starting weight (released 0.05; BalanceBenchmark 0.95)"),
              Setting("probe_size", int, LFM_PROBE_SIZE, "learnable: samples of the first validation batch probed"),
              Setting("logits", str, "heads",
                      "heads: the modality heads and their mean (released model); fusion: the fusion head and its "
                      "per-modality parts (BalanceBenchmark)", choices=LOGITS)),
    recipes={"authors": {"*": dict(optimizer="sgd", lr=1e-2, momentum=0.9, weight_decay=1e-4, lr_step=70, lr_gamma=0.1,
                                   loss_reduction="mean", batch_size=64, epochs=200)}},
    summary="LFM, fusion CE and prediction alignment mixed by learned-then-fitted weights (Yang et al., NeurIPS 2024)")
def lfm(heads, context, method, lr_alpha, initial_weight, probe_size, logits):
    return LearningFittedModulation(heads, context, method=method, lr_alpha=lr_alpha, initial_weight=initial_weight,
                                    probe_size=probe_size, logits=logits)
