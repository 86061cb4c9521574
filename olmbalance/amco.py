"""AMCo: Adaptive Mask Co-Optimization (Zhou, Liang, Zheng, Xuan, Kumada, "Adaptive Mask
Co-Optimization for Modal Dependence in Multimodal Learning", ICASSP 2023).

The authors released no code (searched: none found under the paper's title, the authors or
"AMCo"), so this follows GeWu-Lab BalanceBenchmark: ``balancemm/trainer/AMCo_trainer.py``
(``AMCoTrainer.train_loop``: the mask schedule and draw; ``AMCoTrainer.training_step``: the
losses and the dependence monitor) and ``balancemm/models/avclassify_model.py``
(``BaseClassifierAMCoModel.forward`` and ``unimodality_calculate``), settings from
``configs/trainer_config.yaml`` ``AMCo`` (sigma 0.5, eps 0.3, window 0..80). For the feature
mask (the default, below) it follows BalanceBenchmark's first AMCo implementation, the
``AVClassifierModel.forward`` of the commit before 2f2b8b5 ("AMCo方法的实现"), which masked
``U`` (512: the ResNet18 feature width) feature units.

Per epoch (counted from 0, BalanceBenchmark's ``current_epoch``) the dependence flags are
cleared and the progress ``l`` starts at 0. Per batch:

- mask ratio ``p = sin(pi/2 min(eps, l) / eps)``, then ``l += epoch / 10`` (so no masking in
  epoch 0, and from epoch 1 on ``p`` reaches 1 within a few batches); a mask with
  ``int(p * size)`` zeros at random positions (one mask for the whole batch);
- every modality's *unimodal output* ``u_m`` (BalanceBenchmark's ``unimodal_result``): its
  share of the fusion logits (concat: its weight block on its features plus bias/M; ``sum``:
  its own classifier); the fusion output is ``W* (fusion logits)``, with ``W*`` a
  (classes x classes) linear layer after the fusion head (``linear_star``; ``output_layer``);
- a modality flagged *dependent* by the previous batch is masked:
  ``mask="features"`` (default; the first implementation): its feature units are multiplied by
  the mask and by ``1 / (1 - p)`` (10 once ``|p - 1| <= 0.1``), before the fusion head and its
  shares; ``mask="logits"`` (BalanceBenchmark now): its share of the fusion logits has the
  masked classes zeroed, and the fusion output is ``W* sum_m u_m``;
- loss: ``CE(fusion output) + sum_m CE(u_m)`` (the co-optimization), batch means;
- dependence monitor: the softmax over the concatenated unimodal outputs (B x M*classes); a
  modality is dependent for the next batch when the batch mean of its block's mass exceeds
  ``sigma``.

Outside ``modulation_starts..modulation_ends`` (0..80) the step is plain: the fusion output
through ``W*`` and its cross-entropy alone.

Where this differs from BalanceBenchmark, and why:

- BalanceBenchmark's mask is ``expand(2, -1)``-ed to two rows before multiplying the (B x
  classes) share, which fails for every batch size but 2 once a modality is dependent (the
  second batch): a defect, fixed here by broadcasting the one mask over the batch.
- The unimodal outputs need per-modality shares of the fusion logits (``concat``, ``sum``);
  BalanceBenchmark has them for ``concat`` only. Heads that mix modalities (``bilinear``,
  ``film``, ``gated``, ``attention``) have none: there the model's linear unimodal heads on the
  (masked) features are the unimodal outputs, and only ``mask="features"`` is possible.
- Under DDP the dependence mass is averaged over ranks, so every rank masks the same modality.
- The masks come from a generator seeded with the run's seed and saved in checkpoints
  (BalanceBenchmark: numpy's global stream): a permutation per step of the classes
  (``logits``) or of each modality's feature units (``features``), drawn whether or not a
  modality is dependent, so the draws never depend on the device's values.
- With ``mask="features"`` the monitor is BalanceBenchmark's current one (recomputed every
  batch, strict ``>``); the first implementation only ever set flags within an epoch, with
  ``>=``, and added no ``W*`` (``output_layer=false``).
- BalanceBenchmark's ``alpha`` and ``U`` are not read by its trainer (the mask spans the
  classes, or here the modality's feature width), so they are no settings.
- The logged unimodal heads are the unimodal outputs (as BalanceBenchmark logs them); with
  shares, the model's own unimodal heads are not trained.

The layer ``W*`` belongs to the model (``model_access.add_fusion_output_layer``): it is saved in
``best.pt`` and used at evaluation, so a fresh model built without it cannot load an amco
checkpoint. The flags, the progress and the generator are saved with the method.

``--recipe authors``: BalanceBenchmark's run (``configs/global_config.yaml``;
``olmbalance.recipes.BALANCEBENCHMARK_RUN``): AdamW 1e-3 with weight decay 0.01, StepLR(10,
0.1), batch 32, 30 epochs.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from olmbalance import distributed
from olmbalance.base import Method
from olmbalance.errors import UserError
from olmbalance.model_access import (add_fusion_output_layer, fuse, fusion_output_layer, has_modality_shares,
                                     keep_features, modality_parts)
from olmbalance.modulation_log import ModulationLog
from olmbalance.recipes import BALANCEBENCHMARK_RUN
from olmbalance.registry import RunContext, Setting, register_method

AMCO_SIGMA = 0.5
AMCO_EPS = 0.3
AMCO_MODULATION_EPOCHS = (0, 80)
MASKS = ("features", "logits")
# The first implementation's feature rescale once p is within 0.1 of 1 (1 / (1 - p) would
# diverge there).
FULL_MASK_SCALE = 10.0


def mask_ratio(progress: float, eps: float) -> float:
    """BalanceBenchmark's ``pt = sin(pi/2 min(eps, l) / eps)``."""
    return math.sin(math.pi / 2 * (min(eps, progress) / eps))


def feature_scale(ratio: float) -> float:
    return 1.0 / (1.0 - ratio) if abs(ratio - 1.0) > 0.1 else FULL_MASK_SCALE


def random_mask(size: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """``int(ratio * size)`` zeros at random positions, ones elsewhere (float32, host)."""
    mask = torch.ones(size)
    mask[torch.randperm(size, generator=generator)[:int(ratio * size)]] = 0.0
    return mask


def dependence(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each output's block of the softmax over the concatenated outputs, summed over its
    classes and averaged over the batch (BalanceBenchmark's ``sft_uni``)."""
    probabilities = F.softmax(torch.cat([u.detach().float() for u in outputs], dim=1), dim=1)
    blocks = probabilities.split([u.shape[1] for u in outputs], dim=1)
    return torch.stack([block.sum() / probabilities.shape[0] for block in blocks])


class ZeroGradientLink(torch.autograd.Function):
    """Identity on ``tensor``; ``anchor`` gets a zero gradient. AMCo replaces every output of
    the model's forward; under DDP the loss must still reach that forward's outputs, or the
    parameters behind them (found in the graph at the forward) wait for gradients forever."""

    @staticmethod
    def forward(ctx, tensor, anchor):
        ctx.anchor = (anchor.shape, anchor.dtype, anchor.device)
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.anchor
        return grad, torch.zeros(shape, dtype=dtype, device=device)


class AdaptiveMaskCoOptimization(Method):
    """AMCo as BalanceBenchmark runs it; see the module docstring."""

    name = "amco"
    # With shares the model's unimodal heads never train; outside the window no unimodal output does.
    leaves_parameters_unused = True

    def __init__(self, heads: Sequence[str], context: RunContext | None = None, sigma: float = AMCO_SIGMA,
                 eps: float = AMCO_EPS, mask: str = "features", output_layer: bool = True,
                 modulation_epochs: tuple[int, int] = AMCO_MODULATION_EPOCHS):
        super().__init__(heads, context)
        self.modalities = tuple(h for h in self.heads if h != "fusion")
        if "fusion" not in self.heads or len(self.modalities) < 2:
            raise UserError(f"--method amco needs a 'fusion' head and at least two modality heads; "
                            f"this model has {', '.join(self.heads)}")
        if not (math.isfinite(sigma) and 0 <= sigma <= 1):
            raise UserError(f"--amco-sigma is a share of probability mass, so it must lie in [0, 1]; got {sigma!r}")
        if not (math.isfinite(eps) and eps > 0):
            raise UserError(f"--amco-eps must be a positive number, got {eps!r}")
        if mask not in MASKS:
            raise UserError(f"--amco-mask must be one of: {', '.join(MASKS)}; got {mask!r}")
        start, end = (int(e) for e in modulation_epochs)
        if start < 0 or end < start:
            raise UserError(f"AMCo modulation epochs must satisfy 0 <= starts <= ends, got {start}..{end} "
                            "(--amco-modulation-starts, --amco-modulation-ends)")
        self.sigma, self.eps, self.mask = float(sigma), float(eps), mask
        self.output_layer = bool(output_layer)
        self.modulation_epochs = (start, end)
        self.seed = int(self.context.seed if self.context.seed is not None else torch.initial_seed())
        self.generator = torch.Generator().manual_seed(self.seed)
        self.epoch = 0  # BalanceBenchmark's current_epoch: the loop's epoch minus 1
        self.progress = 0.0  # l: a host number, so that no step reads the device for it
        self.shares = True  # does the fusion head split into per-modality shares? (setup)
        # Which modalities the previous batch found dependent (all-reduced, identical on every rank).
        self.register_buffer("dependent", torch.zeros(len(self.modalities), dtype=torch.bool))
        self.last: dict[str, torch.Tensor] = {}
        self.log = ModulationLog(self.heads, self.modalities)

    def setup(self, model) -> None:
        net = keep_features(model, self.name)
        if set(net.modalities) != set(self.modalities):
            raise UserError(f"--method amco: the model's modalities {net.modalities} do not match its heads {self.heads}")
        self.shares = has_modality_shares(net)
        if not self.shares and self.mask == "logits":
            raise UserError("--amco-mask logits masks each modality's share of the fusion logits, which only "
                            "--fusion concat and sum have; use --amco-mask features with this fusion head")
        if not self.shares and not hasattr(net, "unimodal_heads"):
            raise UserError(f"--method amco needs per-modality fusion shares or unimodal heads; "
                            f"{type(net).__name__} has neither")
        if self.output_layer:
            add_fusion_output_layer(net, self.name, self.seed)

    def start_epoch(self, epoch, model, data) -> None:
        self.epoch = int(epoch) - 1
        self.progress = 0.0
        self.dependent.zero_()

    def modulating(self) -> bool:
        start, end = self.modulation_epochs
        return start <= self.epoch <= end

    def unimodal_outputs(self, net, features) -> dict[str, torch.Tensor]:
        """``u_m``: the fusion head's per-modality shares, else the model's unimodal heads."""
        if self.shares:
            return dict(zip(net.modalities, modality_parts(net.fusion, [features[m] for m in net.modalities])))
        return {m: net.unimodal_heads[m](features[m]) for m in self.modalities}

    def draw_masks(self, features, classes: int, ratio: float) -> list[torch.Tensor]:
        """This step's masks, drawn whatever is dependent: one over the classes (``logits``)
        or one per modality over its feature units (``features``)."""
        if self.mask == "logits":
            return [random_mask(classes, ratio, self.generator)]
        return [random_mask(features[m].shape[1], ratio, self.generator) for m in self.modalities]

    def forward_train(self, model, inputs, labels):
        logits = model(inputs)
        net = distributed.unwrap(model)
        features = net.last_features
        net.last_features = {}  # nothing of this step's graph is held past it
        ratio = mask_ratio(self.progress, self.eps)
        self.progress += self.epoch / 10  # BalanceBenchmark: every batch, in the window or not
        masks = self.draw_masks(features, logits["fusion"].shape[1], ratio)
        kept = torch.ones(len(self.modalities))
        if not self.modulating():  # the plain step: only the fusion loss trains (network_loss)
            outputs = self.unimodal_outputs(net, features)
            logits.update({m: outputs[m].detach() for m in self.modalities})
        else:
            dependent = self.dependent.clone()  # the graph keeps it; the buffer changes below
            if self.mask == "features":
                scale = feature_scale(ratio)
                masked = {}
                for i, m in enumerate(self.modalities):
                    f = features[m]
                    unit = masks[i].to(device=f.device, dtype=f.dtype)
                    masked[m] = torch.where(dependent[i], f * unit * scale, f)
                outputs = self.unimodal_outputs(net, masked)
                fused = fuse(net, masked)  # through W* (the head's output layer) when it has one
            else:
                outputs = self.unimodal_outputs(net, features)
                for i, m in enumerate(self.modalities):
                    u = outputs[m]
                    outputs[m] = torch.where(dependent[i], u * masks[0].to(device=u.device, dtype=u.dtype), u)
                fused = sum(outputs[m] for m in self.modalities)
                layer = fusion_output_layer(net)
                fused = layer(fused) if layer is not None else fused
            logits.update(outputs)
            logits["fusion"] = ZeroGradientLink.apply(fused, logits["fusion"])
            sizes = [mask.numel() for mask in masks] * (len(self.modalities) if self.mask == "logits" else 1)
            kept = torch.where(self.dependent.cpu(), torch.tensor([1.0 - int(ratio * s) / s for s in sizes]), kept)
        mass = distributed.all_reduce_mean(dependence([logits[m] for m in self.modalities]))
        if self.modulating():
            self.dependent.copy_(mass > self.sigma)  # for the next batch
        self.last = self.log.record(mass, kept)
        return logits

    def network_loss(self, losses):
        """Every head's CE in the window (the co-optimization), the fusion head's alone outside it."""
        if self.modulating():
            return sum(losses[h] for h in self.heads)
        return losses["fusion"]

    def forward_eval(self, model, inputs):
        logits = model(inputs)
        if self.shares:  # the unimodal outputs are the fusion head's shares, as in training
            net = distributed.unwrap(model)
            features, net.last_features = net.last_features, {}
            logits.update(self.unimodal_outputs(net, features))
        return logits

    # -- what gets logged and checkpointed -------------------------------------------------------
    def coefficients(self) -> dict[str, float]:
        """Mean share of each head's mask kept per step since the previous call (once per
        epoch): 1 where the modality was not dependent."""
        return self.log.mean_coefficients()

    def diagnostics(self) -> dict[str, torch.Tensor]:
        return dict(self.last)

    def get_extra_state(self):
        return {"generator": self.generator.get_state(), "progress": self.progress}

    def set_extra_state(self, state) -> None:
        self.generator.set_state(state["generator"])
        self.progress = float(state["progress"])


@register_method(
    "amco", prefix="amco",
    settings=(Setting("sigma", float, AMCO_SIGMA,
                      "a modality is dependent (masked at the next batch) when its share of the softmax mass over "
                      "all unimodal outputs exceeds sigma"),
              Setting("eps", float, AMCO_EPS,
                      "the mask ratio sin(pi/2 min(eps, l)/eps) reaches 1 once the progress l (epoch/10 per batch) "
                      "reaches eps"),
              Setting("mask", str, "features",
                      "what a dependent modality loses: feature units (BalanceBenchmark's first AMCo, any fusion "
                      "head) or classes of its share of the fusion logits (BalanceBenchmark now; concat, sum)", MASKS),
              Setting("output_layer", bool, True,
                      "a classes x classes linear layer after the fusion head (BalanceBenchmark's linear_star)"),
              Setting("modulation_starts", int, AMCO_MODULATION_EPOCHS[0],
                      "first epoch (0-based) of masking and co-optimization"),
              Setting("modulation_ends", int, AMCO_MODULATION_EPOCHS[1],
                      "last epoch (0-based, inclusive) of masking and co-optimization")),
    recipes={"authors": {"*": BALANCEBENCHMARK_RUN}},
    summary="AMCo, adaptive mask co-optimization of the dependent modality (Zhou et al., ICASSP 2023)")
def amco(heads, context, sigma, eps, mask, output_layer, modulation_starts, modulation_ends):
    return AdaptiveMaskCoOptimization(heads, context, sigma=sigma, eps=eps, mask=mask, output_layer=output_layer,
                                      modulation_epochs=(modulation_starts, modulation_ends))
