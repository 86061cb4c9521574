"""Sample-level modality valuation and re-sampling (Wei, Feng, Wang and Hu, "Enhancing Multimodal
Cooperation via Sample-level Modality Valuation", CVPR 2024), on top of ``fusion_only``.

Followed: github GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation, ``code/sample_level.py``
and ``code/modality_level.py`` (``execute_modulation``: the valuation and the modality-level
estimate; ``train_epoch``/``warmup_epoch``; ``main``: when each happens), ``code/datasets/
dataloader.py`` (``AV_KS_Dataset_sample_level`` and ``AV_KS_Dataset_modality_level``: which
copies the re-sampled training set holds) and ``code/models/models.py`` (``AVClassifier.forward``
with its ``drop`` flags and ``exec_drop``: the masking). Checked against GeWu-Lab/
BalanceBenchmark ``balancemm/trainer/Sample_trainer.py`` (``fit``), ``balancemm/evaluation/
modalitys.py`` (``Calculate_Shapley_Sample``) and ``balancemm/datasets/__init__.py``
(``create_dataset_sample_level``, ``create_dataset_modality_level``).

What the released code does:

- valuation, on the training split, model in eval mode, no gradients: the fusion head's
  prediction with every modality and with each modality's encoder features zeroed
  (``exec_drop``). The utility of a subset S of modalities is ``|S|`` when its prediction is
  right and 0 otherwise (``value_all = 2``, ``value_a = value_v = 1``), ``v(empty) = 0``; a
  modality's contribution is its Shapley value (two modalities: ``phi_a = (v(a) + v(a,v) -
  v(v)) / 2``). The contributions of a correctly predicted sample add up to ``|M|``: 1 is a
  modality's fair share;
- ``level="sample"`` (``sample_level.py``): each training sample gets, per modality m, copies in
  which only m's features are kept (the others zeroed after the encoders, ``drop``): 1 copy
  when ``0.4 < phi_m < 1``, 2 when ``-0.1 < phi_m < 0.4``, 3 when ``phi_m < -0.1``, none
  otherwise (``phi_m >= 1``: the modality does its share);
- ``level="modality"`` (``modality_level.py``): the mean contribution per modality over a random
  part of the training set (``part_ratio``, 0.2), its gap ``1 - mean phi_m``, and
  ``difference = alpha * 2/3 * |gap_a - gap_v|``; ``int(difference * N)`` samples drawn
  uniformly with replacement get one copy each, keeping only the modality with the larger gap
  (the one that contributes less);
- the epoch trains on the originals plus the copies, shuffled together, with the fusion head's
  batch-mean CE (no unimodal loss); the first ``warmup`` epochs train on the originals only,
  and from the end of epoch ``warmup - 1`` (0-based) on, every epoch's end values the training
  set and builds the next epoch's data from it.

Here: ``modulation_starts`` plain epochs (the authors' ``--warmup``, BalanceBenchmark's
``modulation_starts``; counted in whole epochs), then in every later epoch:

- ``level="modality"``: ``start_epoch`` values ``EpochData.train_batches(part_ratio)`` with the
  model in eval mode without gradients (the model as the previous epoch left it: the released
  code values it at that epoch's end), and takes the mean contributions, the gaps, the
  difference and the modality to copy. In the step, every row of the batch gets ``k ~
  Poisson(difference)`` copies of itself with only that modality's features kept;
- ``level="sample"``: in the step the batch is forwarded once more, in eval mode without
  gradients, and valued; every row then gets the released number of copies per modality.

Each copy is the row's own encoder features (the step's training forward) with the other
modalities' features zeroed, through the fusion head; the network loss is the fusion CE (batch
mean) plus ``sum over copies of CE(copy) / B``. Every original and every copy weighs ``1/B``,
as in the released epoch (batch-mean CE over batches mixing both), and the step's summed loss
is the authors' summed loss over a batch holding these rows and their copies (what the
equivalence test checks). The encoders learn from the fusion loss only: the unimodal heads are
``fusion_only``'s detached read-outs.

Differences from the released code, and why:

- The loop's batches are fixed (no method decides which samples a batch holds), so the copies
  ride with their original in its step instead of being shuffled into batches of their own:
  an epoch has the same steps as a plain one, and over it every original and every copy is
  met once with the weight it has in the released epoch (first order: equal summed gradients;
  the released epoch takes (N + K) / B steps of mixed batches, this one N / B larger ones).
  No loop hook is needed for this; one that let a method re-sample the epoch's data would
  allow the released batching.
- A copy shares its original's forward: the same augmented view, normalized with the loop
  batch's statistics; the released copy is a separate dataset item (its own random crop,
  normalized with its own batch) encoded again. Here no copy passes through an encoder.
- Sample level: no sample's identity (dataset index) reaches a method, in the step or in
  ``EpochData``, so a valuation made before the epoch cannot be matched to a sample when the
  loop meets it. The valuation is made in the step instead: the same eval-mode, no-gradient
  forward of the same training samples as the released pass (the same cost: one eval forward
  per training sample and epoch), by the weights of that step rather than those at the end of
  the previous epoch.
- Modality level: the part is ``ceil(part_ratio * N)`` samples drawn without replacement in a
  seeded order of its own (``EpochData``; released: ``int(part_ratio * N)`` drawn with
  replacement from a valuation of the whole training set, so only the part is valued here).
  The copies per row are Poisson(difference), drawn from a generator seeded by the run's seed,
  the epoch and the step, for the global batch and sliced per rank (two ranks draw what one
  process with the global batch draws): the released ``int(difference * N)`` uniform draws
  with replacement give each sample a Binomial(int(difference * N), 1/N) count, which is
  Poisson(difference) as N grows; and since the epoch's order is a uniform permutation drawn
  independently, counts assigned to the epoch's positions are distributed as counts assigned
  to samples.
- Masking zeroes encoder features, as the released ``drop``/``exec_drop``; with a fusion head
  other than concat the zeroed features pass through that head. The valuation's fusion passes
  run in float32 under AMP (a prediction flipped by rounding would flip a copy count).
- More than two modalities: the Shapley values of the ``|S|`` utility over every subset
  (``2^M - 1`` fusion-head passes per sample); the modality-level difference is ``alpha * 2/3 *
  sum over pairs |gap_i - gap_j| / (M - 1)`` (two modalities: the released value) and the copy
  keeps the modality with the largest gap (the first in model order on a tie; with two
  modalities a tie has difference 0 and no copy, as released).
- Under DDP the modality-level sums and counts are averaged over ranks, so every rank takes the
  same difference and modality; the sample level decides per sample from that sample alone (no
  statistic over samples drives it). Diagnostics are the rank's own.

BalanceBenchmark defects, fixed here by following the authors' code:

- ``Calculate_Shapley_Sample`` creates its cache of subset predictions once per pass, so every
  batch after the first is scored with the first batch's predictions;
- its utility is 1 for any correct subset, not ``|S|``: contributions shift (every prediction
  right: 0.5 instead of 1, one copy instead of none) and ``1 - phi`` is no longer the distance
  to the fair share;
- ``create_dataset_modality_level`` sums the gap differences over ordered pairs (twice the
  released difference with two modalities) and adds, per drawn sample, one copy per modality
  (the weak modality alone and a full copy);
- copies are made only for the first ``N - N mod 64`` samples;
- its ``alpha`` (0.5) and ``modulation_ends`` (80) are not read by its trainer: ``alpha`` here
  is the released multiplier with the released default 1, and there is no end setting (the
  released code has none either).

Default ``level``: ``modality``, BalanceBenchmark's configured one; the authors ship one script
per level and no single default. ``--recipe authors``: the scripts' Adam, lr 5e-5, weight decay
1e-4, StepLR(30, 0.1), batch 64, 60 epochs, 5 warm-up epochs (they ran Kinetics-Sounds).

State: the epoch, the step within it (the copies' seed) and the last modality-level valuation
are in ``state_dict()`` (extra state); each epoch's valuation is recomputed from the model at
its start, so a resumed run continues identically.
"""
from __future__ import annotations

import itertools
import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from olmbalance import distributed
from olmbalance.errors import UserError
from olmbalance.base import AddedLossTerms
from olmbalance.fusion_only import FusionOnly
from olmbalance.model_access import fuse, keep_features, last_features
from olmbalance.olm import float32_region, heldout_forward
from olmbalance.registry import RunContext, Setting, register_method

LEVELS = ("modality", "sample")
MV_DEFAULT_ALPHA = 1.0  # modality_level.py --alpha
MV_DEFAULT_STARTS = 1  # BalanceBenchmark's modulation_starts (the authors' --warmup is 5)
MV_DEFAULT_PART = 0.2  # modality_level.py --part_ratio, BalanceBenchmark's part_ratio
# AV_KS_Dataset_sample_level: contribution intervals (open) and the copies each gives.
SAMPLE_COPIES = ((0.4, 1.0, 1), (-0.1, 0.4, 2), (-math.inf, -0.1, 3))
# Offsets the copies' seed from the run's other seeded streams.
COPY_SEED_OFFSET = 2_750_159


def subset_values(correct: torch.Tensor) -> torch.Tensor:
    """(B, 2^M) correctness of each subset's prediction (column = bit mask of the subset) ->
    utilities ``|S| * correct`` (the released ``value_all = 2``, ``value_a = 1``)."""
    sizes = torch.tensor([bin(s).count("1") for s in range(correct.shape[1])], dtype=torch.float64,
                         device=correct.device)
    return correct.to(torch.float64) * sizes


def shapley_matrix(modalities: int, device=None) -> torch.Tensor:
    """(2^M, M) weights with ``phi = values @ W``: for each m and S without m,
    ``|S|! (M - |S| - 1)! / M!`` times ``v(S + m) - v(S)``."""
    weights = torch.zeros(2 ** modalities, modalities, dtype=torch.float64)
    for m in range(modalities):
        for subset in range(2 ** modalities):
            if subset >> m & 1:
                continue
            size = bin(subset).count("1")
            w = math.factorial(size) * math.factorial(modalities - size - 1) / math.factorial(modalities)
            weights[subset | 1 << m, m] += w
            weights[subset, m] -= w
    return weights.to(device)


def masked(features: Sequence[torch.Tensor], subset: int) -> list[torch.Tensor]:
    """The features with those outside ``subset`` (bit mask) zeroed (the released ``drop``)."""
    return [f if subset >> i & 1 else torch.zeros_like(f) for i, f in enumerate(features)]


@torch.no_grad()
def contributions(model: nn.Module, features: Mapping[str, torch.Tensor], labels: torch.Tensor,
                  modalities: Sequence[str]) -> torch.Tensor:
    """(B, M) Shapley contributions of each modality to each sample's prediction, from its
    encoder features, through the fusion head in float32."""
    feats = [features[m].detach().float() for m in modalities]
    columns = [torch.zeros_like(labels, dtype=torch.bool)]  # v(empty) = 0
    with float32_region(feats[0]):
        for subset in range(1, 2 ** len(modalities)):
            logits = fuse(model, dict(zip(modalities, masked(feats, subset)))).float()
            columns.append(logits.argmax(dim=1) == labels)
    values = subset_values(torch.stack(columns, dim=1))
    return values @ shapley_matrix(len(modalities), values.device)


def sample_copies(phi: torch.Tensor) -> torch.Tensor:
    """Copies per sample and modality from its contributions (AV_KS_Dataset_sample_level)."""
    copies = torch.zeros_like(phi)
    for low, high, count in SAMPLE_COPIES:
        copies = torch.where((phi > low) & (phi < high), torch.full_like(phi, count), copies)
    return copies


def modality_difference(mean_phi: torch.Tensor, alpha: float) -> tuple[float, int]:
    """(difference, index of the modality to copy) from the mean contributions of the part."""
    gaps = 1.0 - mean_phi.double()
    pairs = sum(abs(float(gaps[i] - gaps[j])) for i, j in itertools.combinations(range(len(gaps)), 2))
    return alpha * pairs / (len(gaps) - 1) / 3 * 2, int(torch.argmax(gaps))


def copy_seed(seed: int | None, epoch: int, step: int) -> int:
    return (COPY_SEED_OFFSET + (seed or 0) * 1_000_003 + epoch * 100_003 + step) % (2 ** 63)


def drawn_copies(rate: float, rows: int, seed: int | None, epoch: int, step: int,
                 world: int = 1, rank: int = 0) -> torch.Tensor:
    """Poisson(rate) copies for each of this rank's ``rows``: drawn for the global batch
    (``world * rows``) from the step's own generator, this rank's contiguous slice (the rows
    ``ShardedSampler`` gives it)."""
    generator = torch.Generator().manual_seed(copy_seed(seed, epoch, step))
    counts = torch.poisson(torch.full((world * rows,), float(rate), dtype=torch.float64), generator=generator)
    return counts[rank * rows:(rank + 1) * rows]


def _rank() -> int:
    return torch.distributed.get_rank() if distributed.is_distributed() else 0


class ModalityValuation(AddedLossTerms, FusionOnly):
    """Valuate-and-Enhance (see the module docstring); the settings are the registration's."""

    name = "modality_valuation"

    def __init__(self, heads: Sequence[str], context: RunContext | None = None, level: str = "modality",
                 alpha: float = MV_DEFAULT_ALPHA, modulation_starts: int = MV_DEFAULT_STARTS,
                 part_ratio: float = MV_DEFAULT_PART):
        super().__init__(heads, context)
        if len(self.modalities) < 2:
            raise UserError(f"--method {self.name} needs at least two modality heads besides 'fusion'; "
                            f"this model has {', '.join(self.heads)}")
        if level not in LEVELS:
            raise UserError(f"--modality-valuation-level must be one of {', '.join(LEVELS)}, got {level!r}")
        if not (math.isfinite(alpha) and alpha >= 0):
            raise UserError(f"--modality-valuation-alpha must be a non-negative number, got {alpha!r}")
        if modulation_starts < 0:
            raise UserError(f"--modality-valuation-modulation-starts must be >= 0, got {modulation_starts!r}")
        if not 0 < part_ratio <= 1:
            raise UserError(f"--modality-valuation-part-ratio must be in (0, 1], got {part_ratio!r}")
        self.level, self.alpha = level, float(alpha)
        self.modulation_starts, self.part_ratio = int(modulation_starts), float(part_ratio)
        self.epoch = 0  # the epoch being trained (1-based), set by start_epoch
        self.step = 0  # steps taken in it: seeds the modality-level copies
        # The last modality-level valuation: mean contribution per modality, difference, copied modality.
        self.mean_contribution = [0.0] * len(self.modalities)
        self.difference = 0.0
        self.weak = -1
        self.last: dict[str, torch.Tensor] = {}

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        keep_features(model, self.name)

    def modulating(self) -> bool:
        return self.epoch > self.modulation_starts

    # -- modality level: the part's valuation (execute_modulation) -------------------------------
    def start_epoch(self, epoch: int, model: nn.Module, data) -> None:
        self.epoch, self.step = epoch, 0
        if not self.modulating() or self.level != "modality":
            return
        sums, count = None, 0
        model.eval()  # the trainer sets training mode again afterwards
        with torch.no_grad():
            for inputs, labels in data.train_batches(self.part_ratio):
                model(inputs)
                phi = contributions(model, last_features(model), labels, self.modalities)
                sums = phi.sum(dim=0) if sums is None else sums + phi.sum(dim=0)
                count += labels.shape[0]
        device = distributed.collective_device()
        local = torch.zeros(len(self.modalities) + 1, dtype=torch.float64, device=device)
        if sums is not None:
            local[:-1] = sums.to(device)
        local[-1] = count
        reduced = distributed.all_reduce_mean(local).cpu()  # means of sums over means of counts
        if float(reduced[-1]) <= 0:
            self.mean_contribution, self.difference, self.weak = [0.0] * len(self.modalities), 0.0, -1
            return
        mean = reduced[:-1] / reduced[-1]
        self.mean_contribution = mean.tolist()
        self.difference, self.weak = modality_difference(mean, self.alpha)

    # -- the step (train_epoch on the re-sampled data) ------------------------------------------
    def forward_train(self, model, inputs, labels):
        if not self.modulating():
            return model(inputs)
        copies, phi = self.copies_for(model, inputs, labels)
        logits = model(inputs)
        self.step += 1
        if copies is None:
            return logits
        features = last_features(model)
        feats = [features[m] for m in self.modalities]
        extra = torch.zeros((), device=labels.device)
        for i, m in enumerate(self.modalities):
            if self.level == "modality" and i != self.weak:
                continue
            only = fuse(model, dict(zip(self.modalities, masked(feats, 1 << i))))
            ce = F.cross_entropy(only.float(), labels, reduction="none")
            extra = extra + (copies[:, i].to(ce.dtype) * ce).sum()
        self.extra_loss = extra / labels.shape[0]
        self.record(copies, phi)
        return logits

    def copies_for(self, model, inputs, labels) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(B, M) copies of each row per modality (None: none this step) and, at the sample
        level, the rows' contributions."""
        rows = labels.shape[0]
        if self.level == "sample":
            net = distributed.unwrap(model)
            with torch.no_grad(), heldout_forward(net, "running"):  # eval mode, as released
                net(inputs)
                phi = contributions(net, last_features(net), labels, self.modalities)
            return sample_copies(phi), phi
        if self.weak < 0 or self.difference <= 0:
            return None, None
        counts = drawn_copies(self.difference, rows, self.context.seed, self.epoch, self.step,
                              distributed.world_size(), _rank())
        copies = torch.zeros(rows, len(self.modalities), dtype=torch.float64)
        copies[:, self.weak] = counts
        return copies.to(labels.device, non_blocking=True), None

    # -- what gets logged and checkpointed --------------------------------------------------
    def record(self, copies: torch.Tensor, phi: torch.Tensor | None) -> None:
        """Per head (fusion: 0): the copies per row, and the contributions that decided them
        (sample level: this batch's, eval mode; modality level: the epoch's part)."""
        index = torch.tensor([self.heads.index(m) for m in self.modalities], device=copies.device)
        mean_phi = phi.mean(dim=0) if phi is not None else \
            torch.tensor(self.mean_contribution, dtype=torch.float64, device=copies.device)
        self.last = {}
        for key, values in (("valuation_copies", copies.mean(dim=0)), ("valuation_contribution", mean_phi)):
            per_head = torch.zeros(len(self.heads), dtype=torch.float32, device=copies.device)
            self.last[key] = per_head.index_copy(0, index, values.float())


    def get_extra_state(self):
        return {"epoch": self.epoch, "step": self.step, "mean_contribution": list(self.mean_contribution),
                "difference": self.difference, "weak": self.weak}

    def set_extra_state(self, state) -> None:
        state = state or {}
        self.epoch, self.step = int(state.get("epoch", 0)), int(state.get("step", 0))
        self.mean_contribution = [float(v) for v in state.get("mean_contribution", [0.0] * len(self.modalities))]
        self.difference, self.weak = float(state.get("difference", 0.0)), int(state.get("weak", -1))


# The authors' scripts (sample_level.py, modality_level.py argparse defaults; run on
# Kinetics-Sounds): Adam(betas 0.9/0.999, weight decay 1e-4), lr 5e-5, StepLR(30, 0.1), batch 64,
# 60 epochs, batch-mean CE, 5 warm-up epochs.
_AUTHORS = dict(optimizer="adam", lr=5e-5, weight_decay=1e-4, lr_step=30, lr_gamma=0.1, loss_reduction="mean",
                batch_size=64, epochs=60, modality_valuation_modulation_starts=5)


@register_method(
    "modality_valuation", prefix="modality_valuation",
    settings=(Setting("level", str, "modality",
                      "modality: copy the modality that contributes less, on a random share of samples; "
                      "sample: copy each sample's low-contributing modalities", choices=LEVELS),
              Setting("alpha", float, MV_DEFAULT_ALPHA, "modality level: multiplier of the share of copied samples"),
              Setting("modulation_starts", int, MV_DEFAULT_STARTS,
                      "plain epochs before the first valuation (the authors' warm-up)"),
              Setting("part_ratio", float, MV_DEFAULT_PART,
                      "modality level: share of the training split valued before each epoch")),
    recipes={"authors": {"*": _AUTHORS}},
    summary="sample-level modality valuation: Shapley contributions, re-sampled low contributors "
            "(Wei et al., CVPR 2024)")
def modality_valuation(heads, context, level, alpha, modulation_starts, part_ratio):
    return ModalityValuation(heads, context, level=level, alpha=alpha, modulation_starts=modulation_starts,
                             part_ratio=part_ratio)
