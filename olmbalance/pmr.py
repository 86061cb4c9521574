"""PMR: Prototypical Modal Rebalance (Fan et al., "PMR: Prototypical Modal Rebalance for
Multimodal Learning", CVPR 2023), on top of ``fusion_only``, as its authors ran it.

Followed: github fanyunfeng-bit/Modal-Imbalance-PMR, ``main_Prototype_grad.py``: ``train_epoch``
(the step), ``calculate_prototype`` (the prototypes) and ``main`` (when they are computed), with
its ``bash.sh`` for the recipe; checked against GeWu-Lab/BalanceBenchmark
``balancemm/trainer/PMR_trainer.py`` (``training_step``, ``calculate_prototype``).

What the released code does, and this class by default:

- prototypes: class means of the encoder features (the fusion head's inputs) of a tenth of
  the training set, encoded in eval mode without gradients (``start_epoch`` with
  ``EpochData.train_batches(0.1)``), computed before the first epoch and again before every
  later one (the released code computes them after each epoch: the same point in time). Each
  new set is blended with the previous one, ``(1 - momentum) * new + momentum * previous``
  (momentum 0.2), except the first two: the released ``calculate_prototype`` gets epoch 0 both
  before and after the first epoch, and blends only for epochs > 0;
- per step, inside the modulation epochs (0-based, inclusive, released 0..100): each
  modality's prototype classifier ``softmax(-||phi^m(x) - c^m||)``; its score ``s^m``, the
  summed probability of the true class over the batch; the ratio ``rho^m = s^m / s^other``;
- the modality with the lower score (``rho < 1``) gets ``alpha * CE(-distances, y)``, the
  other none (the released 0/alpha switch); nothing when the scores tie;
- network loss: the fusion CE plus that term (the unimodal read-outs of ``fusion_only`` train
  only themselves, on detached features, so they change no parameter of the released model).

The defaults (alpha 1, momentum 0.2, epochs 0..100) are the script's argparse defaults; the
authors' own runs (``bash.sh``; ``--recipe authors``) used momentum 0, epochs 0..70, alpha 2
for concat on CREMA-D and AVE, and SGD 1e-3 (see the recipe below).

Settings beyond the released behaviour, off by default:

- ``weighting="paper"``: the paper weights both terms by the degree of imbalance: PCE weight
  ``alpha * clip(1/rho - 1, 0, 1)`` on the slow modality, entropy weight
  ``entropy_weight * clip(rho - 1, 0, 1)`` on the dominant one. The paper's text was not
  available here; this form is taken from secondary sources (a third-party re-implementation
  citing the paper's Eqs. 11 and 13, and the ``clip(a, b, c)`` helper BalanceBenchmark's PMR
  trainer defines without using), so check it against the paper before relying on it;
- ``entropy_weight > 0``: the paper's prototype-entropy regularizer, ``-mu * H(p^m)`` on the
  dominant modality (``rho > 1``; weight ``mu`` under the released switch, scaled as above
  under ``paper``), in the first ``entropy_epochs`` epochs only. The released code has no
  such term and gives no value for ``mu``; the default 0 keeps it off;
- ``prototype_data="val"``: prototypes from the whole validation split, what the released
  code does on AVE (and the authors' recipe below sets there). It lets validation labels
  steer training, so validation no longer picks the best epoch impartially.

Remaining differences from the released code, and why:

- a tenth is ``ceil(0.1 * N)`` samples in a seeded order of its own (``EpochData``), not the
  first ``len(loader) // 10`` batches of the shuffled training loader (that would consume the
  training loader's random stream and change its order);
- a class with no sample in a pass keeps its previous prototype, or, before it has one, takes
  the mean feature of the pass; the released code divides by zero there and its loss is NaN;
- distances clamp the squared distance at 1e-12 before the square root (finite gradient at a
  prototype; the released ``EU_dist`` gives NaN there);
- with more than two modalities, ``rho`` is a modality's score over the mean of the others'
  (BalanceBenchmark switches to OGM-style gradient scaling there instead); with two it is the
  released ratio;
- under DDP, scores and class sums are reduced over ranks (every rank takes the same
  decision and the same prototypes); the released code runs on one GPU;
- BalanceBenchmark blends from the second epoch's prototypes on (its ``current_epoch``
  counts from the first pass); we follow the authors' repository, which blends from the third;
- passes after the modulation window are skipped (their prototypes would never be used);
- without ``--recipe authors`` a run keeps the dataset's optimizer, batch and epochs (the
  comparison's shared protocol), not the authors' SGD recipe.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from olmbalance import distributed
from olmbalance.errors import UserError
from olmbalance.base import AddedLossTerms
from olmbalance.fusion_only import FusionOnly
from olmbalance.model_access import keep_features, last_features
from olmbalance.registry import RunContext, Setting, register_method

PMR_DEFAULT_ALPHA = 1.0  # released --alpha
PMR_DEFAULT_MOMENTUM = 0.2  # released --momentum_coef
PMR_DEFAULT_MODULATION = (0, 100)  # released --modulation_starts, --modulation_ends (0-based, inclusive)
PMR_DEFAULT_SHARE = 0.1  # calculate_prototype stops after len(loader) // 10 batches
PMR_DEFAULT_ENTROPY_EPOCHS = 10
WEIGHTINGS = ("released", "paper")
PROTOTYPE_DATA = ("train", "val")
# calculate_prototype(epoch=0) runs before the first epoch and after it: no blend for those two.
FRESH_PASSES = 2
# Inside the square root of a squared distance: keeps its gradient finite at distance 0.
DISTANCE_EPSILON = 1e-12


def prototype_distances(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(B, D) features, (C, D) prototypes -> (B, C) Euclidean distances."""
    squared = (features.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(dim=-1)
    return squared.clamp(min=DISTANCE_EPSILON).sqrt()


def imbalance_ratios(scores: torch.Tensor) -> torch.Tensor:
    """rho per modality: its score over the mean of the others' (two modalities: s_a / s_v)."""
    others = (scores.sum() - scores) / (len(scores) - 1)
    return scores / others.clamp(min=torch.finfo(scores.dtype).tiny)


def rebalance_weights(ratios: torch.Tensor, alpha: float, mu: float,
                      weighting: str = "released") -> tuple[torch.Tensor, torch.Tensor]:
    """(PCE weights, entropy weights) per modality from the imbalance ratios rho.

    ``released``: alpha on every modality with rho < 1, mu on every one with rho > 1 (ties: 0).
    ``paper``: alpha * clip(1/rho - 1, 0, 1) and mu * clip(rho - 1, 0, 1)."""
    if weighting == "released":
        return alpha * (ratios < 1).to(ratios.dtype), mu * (ratios > 1).to(ratios.dtype)
    return alpha * (1.0 / ratios - 1.0).clamp(0, 1), mu * (ratios - 1.0).clamp(0, 1)


def class_means(sums: torch.Tensor, counts: torch.Tensor, previous: torch.Tensor | None,
                momentum: float, blend: bool) -> torch.Tensor:
    """New prototypes from per-class feature sums and counts (see the module docstring for
    classes without a sample); blended with ``previous`` when ``blend``."""
    seen = (counts > 0).unsqueeze(1)
    means = sums / counts.clamp(min=1).unsqueeze(1)
    fallback = previous if previous is not None else (sums.sum(0) / counts.sum().clamp(min=1)).expand_as(sums)
    if previous is not None and blend:
        means = (1 - momentum) * means + momentum * previous
    return torch.where(seen, means, fallback)


class PrototypicalModalRebalance(AddedLossTerms, FusionOnly):
    """PMR as released (see the module docstring); the settings are the registration's."""

    name = "pmr"

    def __init__(self, heads: Sequence[str], context: RunContext | None = None, alpha: float = PMR_DEFAULT_ALPHA,
                 momentum: float = PMR_DEFAULT_MOMENTUM, modulation_epochs: tuple[int, int] = PMR_DEFAULT_MODULATION,
                 prototype_share: float = PMR_DEFAULT_SHARE, prototype_data: str = "train",
                 weighting: str = "released", entropy_weight: float = 0.0,
                 entropy_epochs: int = PMR_DEFAULT_ENTROPY_EPOCHS):
        super().__init__(heads, context)
        if len(self.modalities) < 2:
            raise UserError(f"--method {self.name} needs at least two modality heads besides 'fusion'; "
                            f"this model has {', '.join(self.heads)}")
        for flag, value in (("--pmr-alpha", alpha), ("--pmr-entropy-weight", entropy_weight)):
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"{flag} must be a non-negative number, got {value!r}")
        if not 0 <= momentum < 1:
            raise UserError(f"--pmr-momentum must be in [0, 1), got {momentum!r}")
        if not 0 < prototype_share <= 1:
            raise UserError(f"--pmr-prototype-share must be in (0, 1], got {prototype_share!r}")
        start, end = (int(e) for e in modulation_epochs)
        if start < 0 or end < start:
            raise UserError(f"PMR modulation epochs must satisfy 0 <= starts <= ends, got {start}..{end} "
                            "(--pmr-modulation-starts, --pmr-modulation-ends)")
        if weighting not in WEIGHTINGS or prototype_data not in PROTOTYPE_DATA or entropy_epochs < 0:
            raise UserError(f"PMR got weighting {weighting!r}, prototype data {prototype_data!r}, entropy epochs "
                            f"{entropy_epochs!r}; they must be one of {WEIGHTINGS}, one of {PROTOTYPE_DATA}, >= 0")
        self.alpha, self.momentum, self.modulation_epochs = float(alpha), float(momentum), (start, end)
        self.prototype_share, self.prototype_data, self.weighting = float(prototype_share), prototype_data, weighting
        self.entropy_weight, self.entropy_epochs = float(entropy_weight), int(entropy_epochs)
        self.prototypes: dict[str, torch.Tensor] = {}
        self.epoch = 0  # the epoch being trained (1-based), set by start_epoch
        self.last: dict[str, torch.Tensor] = {}

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        keep_features(model, self.name)

    def modulating(self) -> bool:
        """Whether the epoch being trained lies in the modulation epochs (0-based, inclusive)."""
        start, end = self.modulation_epochs
        return bool(self.prototypes) and start <= self.epoch - 1 <= end

    # -- prototypes: calculate_prototype --------------------------------------------------------
    def start_epoch(self, epoch: int, model: nn.Module, data) -> None:
        self.epoch = epoch
        if epoch - 1 > self.modulation_epochs[1]:
            return
        batches = data.val_batches() if self.prototype_data == "val" else data.train_batches(self.prototype_share)
        sums: dict[str, torch.Tensor] = {}
        counts = None
        model.eval()  # the trainer sets training mode again afterwards
        with torch.no_grad():
            for inputs, labels in batches:
                logits = model(inputs)
                if counts is None:
                    counts = torch.zeros(logits["fusion"].shape[1], device=labels.device)
                counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))
                features = last_features(model)
                for m in self.modalities:
                    if m not in sums:
                        sums[m] = torch.zeros(len(counts), features[m].shape[1], device=labels.device)
                    sums[m].index_add_(0, labels, features[m].float())
        # Every rank must read something for the reductions below; if one read nothing, all skip.
        if float(distributed.all_reduce_mean(torch.tensor(float(counts is not None),
                                                          device=distributed.collective_device()))) < 1:
            return  # the prototypes there are stay
        counts = distributed.all_reduce_mean(counts)  # means of sums over means of counts: global means
        for m in self.modalities:
            previous = self.prototypes.get(m)
            previous = previous.to(counts.device) if previous is not None else None
            self.prototypes[m] = class_means(distributed.all_reduce_mean(sums[m]), counts, previous, self.momentum,
                                             blend=epoch > FRESH_PASSES)

    # -- the step: train_epoch ------------------------------------------------------------------
    def forward_train(self, model, inputs, labels):
        logits = model(inputs)
        if self.modulating():
            features = last_features(model)
            self.extra_loss = self.rebalance_loss({m: features[m] for m in self.modalities}, labels)
        return logits

    def rebalance_loss(self, features: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """alpha-weighted prototypical CE (and the optional entropy term) of one batch."""
        sims = {m: -prototype_distances(features[m].float(), self.prototypes[m].to(features[m].device))
                for m in self.modalities}
        scores = torch.stack([torch.softmax(sims[m].detach(), dim=1).gather(1, labels.view(-1, 1)).sum()
                              for m in self.modalities])
        ratios = imbalance_ratios(distributed.all_reduce_mean(scores))  # every rank takes the same weights
        entropy_on = self.entropy_weight > 0 and self.epoch <= self.entropy_epochs
        beta, mu = rebalance_weights(ratios, self.alpha, self.entropy_weight if entropy_on else 0.0, self.weighting)
        loss = torch.zeros((), device=labels.device)
        for i, m in enumerate(self.modalities):
            if float(beta[i]) > 0:
                loss = loss + float(beta[i]) * F.cross_entropy(sims[m], labels)
            if float(mu[i]) > 0:
                log_p = torch.log_softmax(sims[m], dim=1)
                loss = loss + float(mu[i]) * (log_p.exp() * log_p).sum(dim=1).mean()  # - mu * entropy
        self.record(ratios, beta, mu)
        return loss

    # -- what gets logged and checkpointed --------------------------------------------------
    def record(self, ratios: torch.Tensor, beta: torch.Tensor, mu: torch.Tensor) -> None:
        rows = {"pmr_ratio": (ratios, 1.0), "pmr_beta": (beta, 0.0)}
        if self.entropy_weight > 0:
            rows["pmr_mu"] = (mu, 0.0)
        self.last = {}
        for key, (values, fill) in rows.items():
            per_head = torch.full((len(self.heads),), fill)
            for i, m in enumerate(self.modalities):
                per_head[self.heads.index(m)] = float(values[i])
            self.last[key] = per_head


    def get_extra_state(self):
        return {"prototypes": {m: p.cpu() for m, p in self.prototypes.items()}, "epoch": self.epoch}

    def set_extra_state(self, state) -> None:
        state = state or {}
        self.prototypes = dict(state.get("prototypes", {}))
        self.epoch = int(state.get("epoch", 0))


# The authors' runs (bash.sh, every main_Prototype_grad.py line): lr 1e-3 on the script's
# default optimizer, SGD with momentum 0.9 and weight decay 1e-4, StepLR(70, 0.1), batch 64,
# batch-mean CE; mostly 130 epochs, --momentum_coef 0.0 and --modulation_ends 70; alpha 2.0 in
# the concat runs on CREMA-D and AVE. On AVE the script takes the prototypes from the
# validation split.
_PMR_AUTHORS = dict(optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=1e-4, lr_step=70, lr_gamma=0.1,
                    loss_reduction="mean", batch_size=64, epochs=130, pmr_momentum=0.0, pmr_modulation_ends=70)


@register_method(
    "pmr", prefix="pmr",
    settings=(Setting("alpha", float, PMR_DEFAULT_ALPHA, "weight of the prototypical CE on the slower modality"),
              Setting("momentum", float, PMR_DEFAULT_MOMENTUM, "share of the previous prototypes kept at each pass"),
              Setting("modulation_starts", int, PMR_DEFAULT_MODULATION[0], "first epoch (0-based) with the PMR terms"),
              Setting("modulation_ends", int, PMR_DEFAULT_MODULATION[1],
                      "last epoch (0-based, inclusive) with the PMR terms"),
              Setting("prototype_share", float, PMR_DEFAULT_SHARE, "share of the training split the prototypes read"),
              Setting("prototype_data", str, "train", "split the prototypes come from (val: released on AVE)",
                      choices=PROTOTYPE_DATA),
              Setting("weighting", str, "released", "released: 0/alpha switch; paper: weights grow with the imbalance",
                      choices=WEIGHTINGS),
              Setting("entropy_weight", float, 0.0, "prototype-entropy weight on the dominant modality (0: none, released)"),
              Setting("entropy_epochs", int, PMR_DEFAULT_ENTROPY_EPOCHS, "first epochs in which the entropy term applies")),
    recipes={"authors": {"*": _PMR_AUTHORS, "CREMAD": dict(pmr_alpha=2.0),
                         "AVE": dict(pmr_alpha=2.0, pmr_prototype_data="val")}},
    summary="PMR, prototypical modal rebalance (Fan et al., CVPR 2023)")
def pmr(heads, context, alpha, momentum, modulation_starts, modulation_ends, prototype_share, prototype_data,
        weighting, entropy_weight, entropy_epochs):
    return PrototypicalModalRebalance(heads, context, alpha=alpha, momentum=momentum,
                                      modulation_epochs=(modulation_starts, modulation_ends),
                                      prototype_share=prototype_share, prototype_data=prototype_data,
                                      weighting=weighting, entropy_weight=entropy_weight,
                                      entropy_epochs=entropy_epochs)
