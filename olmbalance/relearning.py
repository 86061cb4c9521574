"""Diagnosing & Re-learning (Wei, Li, Feng, Hu, "Diagnosing and Re-learning for Balanced Multimodal
Learning", ECCV 2024), on top of ``fusion_only``, as its authors released it.

Followed: github GeWu-Lab/Diagnosing_Relearning_ECCV2024, ``code/ours.py``: ``main`` (the
initial weights, saved as the model is built; the re-initialization check after every epoch),
``get_feature``, ``reinit_score``, ``purity_score``, ``reinit`` and ``train_epoch``, with
``code/script/ours.sh`` for the recipe; checked against GeWu-Lab BalanceBenchmark
``balancemm/trainer/ReLearning_trainer.py`` (``fit``, ``get_feature``, ``reinit_score``,
``reinit``); settings from its ``configs/trainer_config.yaml`` ``ReLearning``.

What the released code does, and this class:

- Training steps are the plain fusion cross-entropy (``fusion_only``: the unimodal heads here
  are read-outs on detached features and change nothing else).
- Diagnosis, at each re-initialization: every modality's encoder features (the fusion head's
  inputs), in eval mode without gradients, over the whole training split and the whole
  validation split; per split and modality the features are scaled to [-1, 1] per dimension
  (``MinMaxScaler((-1, 1))``), clustered by k-means into as many clusters as classes, and the
  clusters' purity against the labels measured (each cluster votes its most frequent label).
  A modality's weight is ``w = tanh(move_lambda * |purity_train - purity_val|)``: the more its
  representation's separability differs between seen and unseen data, the more it is reset.
- Re-initialization: every parameter of each modality's encoder becomes
  ``w * initial + (1 - w) * current``, ``initial`` being the weights the model was built with.
  Normalization statistics, the heads and the optimizer's state are left as they are.
- When: the released loop checks ``epoch % reinit_epoch == 0 and epoch > 0`` after training
  0-based epoch ``epoch`` and testing it, and re-initializes at the first ``reinit_num`` such
  epochs: after ``R + 1``, ``2R + 1``, ... completed epochs. Here that is ``start_epoch`` of the
  next epoch (the same point: after the epoch's evaluation, before the next epoch trains);
  ``reinit_offset`` is the ``+ 1`` (0 re-initializes after ``R``, ``2R``, ... epochs).

Differences from the released code, and why:

- k-means runs in torch (the package needs only torch), as scikit-learn's ``KMeans`` does it:
  k-means++ seeding with ``2 + ln k`` local trials, Lloyd's iterations (at most 300, stopping when
  the labels repeat or the centers move less than 1e-4 times the mean feature variance), an
  empty cluster taking the point farthest from its center, and ``kmeans_inits``
  initializations keeping the lowest inertia (1: ``n_init="auto"`` of scikit-learn >= 1.4,
  which BalanceBenchmark pins; older scikit-learn made 10). Its random draws come from a
  generator seeded by the run's seed and the epoch (never the global stream), not numpy's
  ``random_state=0``, so where a clustering is ambiguous the clusters may differ from
  scikit-learn's; on well-separated features they agree (tests). It runs in float32 on the
  training device (scikit-learn clusters float32 features in float32, on the CPU).
- The validation split is the run's, which also picks the best epoch: its labels steer the
  re-initializations, so its choice of the best epoch is no longer impartial. The released
  code diagnoses with its own validation split (CREMA-D's ``val.csv``) and selects on test.
- The training features come from ``EpochData.train_batches()``: the training split as the
  training loader reads it, in a seeded order of its own (the order does not change purity).
  The released pass over its shuffled training loader also draws a permutation from that
  loader's random stream, so every later epoch comes in another order than without it; ours
  leaves the training loader's stream alone.
- The initial weights are taken at ``setup`` (the model as built, before training: the
  released ``init_para.pkl``) and kept in the method's state, so a resumed run blends with
  the same ones; BalanceBenchmark snapshots them when ``fit`` starts (after any checkpoint
  load), and blends every parameter whose name contains the modality's name (heads named
  after a modality included); the authors blend the backbones only, as here.
- BalanceBenchmark re-initializes before the epoch's validation (its validation then sees
  the re-initialized model); the authors after testing, as here.
- Under DDP the features of every rank are gathered (each rank clusters the same rows, in
  rank order), and the weights and the initial weights are rank 0's, so every rank blends
  identically.
- The defaults are BalanceBenchmark's (``reinit_epoch`` 15, ``reinit_num`` 2, ``move_lambda``
  3); the authors' script (20, 3) is in the recipe. A run shorter than ``reinit_epoch +
  reinit_offset + 1`` epochs (a default 10-epoch AV-Digits run) never re-initializes and is
  ``fusion_only``.
"""
from __future__ import annotations

import logging
import math
from typing import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from olmbalance import distributed
from olmbalance.errors import UserError
from olmbalance.fusion_only import FusionOnly
from olmbalance.model_access import encoder_parameters, keep_features, last_features
from olmbalance.olm import float32_region
from olmbalance.registry import RunContext, Setting, register_method

log = logging.getLogger(__name__)

KMEANS_MAX_ITER = 300  # scikit-learn KMeans max_iter
KMEANS_TOL = 1e-4  # scikit-learn KMeans tol (times the mean feature variance)
# Offsets the k-means generator's seed from the run's other seeded streams.
KMEANS_SEED_OFFSET = 104729


# -- the diagnosis: scikit-learn's MinMaxScaler, KMeans and the released purity_score ---------------
def min_max_scale(x: torch.Tensor) -> torch.Tensor:
    """Each column mapped to [-1, 1] (``MinMaxScaler(feature_range=(-1, 1))``; a constant
    column, whose range is 0, maps to -1 as there)."""
    low, high = x.min(dim=0).values, x.max(dim=0).values
    span = high - low
    span = torch.where(span < 10 * torch.finfo(x.dtype).eps, torch.ones_like(span), span)
    scale = 2.0 / span
    return x * scale + (-1.0 - low * scale)


def squared_distances(x: torch.Tensor, centers: torch.Tensor, x_squared: torch.Tensor) -> torch.Tensor:
    """(n, k) squared Euclidean distances, clamped at 0 against rounding."""
    distances = x_squared[:, None] - 2.0 * (x @ centers.t()) + (centers * centers).sum(dim=1)[None, :]
    return distances.clamp_(min=0)


def kmeans_plusplus(x: torch.Tensor, x_squared: torch.Tensor, clusters: int, generator: torch.Generator):
    """Greedy k-means++ seeding (``2 + ln k`` candidates per center, the one lowering the
    potential most kept); draws from ``generator`` (a CPU generator)."""
    count = x.shape[0]
    trials = 2 + int(math.log(clusters))
    centers = x.new_empty(clusters, x.shape[1])
    first = int(torch.randint(count, (1,), generator=generator))
    centers[0] = x[first]
    closest = squared_distances(x, centers[:1], x_squared)[:, 0]
    potential = closest.sum()
    for c in range(1, clusters):
        draws = torch.rand(trials, generator=generator, dtype=torch.float64).to(x.device) * potential.double()
        candidates = torch.searchsorted(torch.cumsum(closest.double(), 0), draws).clamp_(max=count - 1)
        distances = torch.minimum(closest[None, :], squared_distances(x, x[candidates], x_squared).t())
        potentials = distances.sum(dim=1)
        best = torch.argmin(potentials)
        potential, closest = potentials[best], distances[best]
        centers[c] = x[candidates[best]]
    return centers


def lloyd(x: torch.Tensor, x_squared: torch.Tensor, centers: torch.Tensor, tolerance: float):
    """Lloyd's iterations as scikit-learn runs them; returns (labels, inertia)."""
    clusters = centers.shape[0]
    previous = None
    converged = False
    for _ in range(KMEANS_MAX_ITER):
        distances = squared_distances(x, centers, x_squared)
        labels = distances.argmin(dim=1)
        counts = torch.bincount(labels, minlength=clusters).to(x.dtype)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        empty = torch.nonzero(counts == 0).flatten().tolist()
        if empty:  # each empty cluster takes the point farthest from its center
            far = distances.gather(1, labels[:, None]).squeeze(1).topk(len(empty)).indices.tolist()
            for cluster, index in zip(empty, far):
                old = int(labels[index])
                sums[old] -= x[index]
                counts[old] -= 1
                sums[cluster] = x[index]
                counts[cluster] = 1
        updated = sums / counts.clamp(min=1)[:, None]
        shift = float(((updated - centers) ** 2).sum())
        centers = updated
        if previous is not None and torch.equal(labels, previous):
            converged = True
            break
        if shift <= tolerance:
            break
        previous = labels
    distances = squared_distances(x, centers, x_squared)
    if not converged:  # labels that match the final centers
        labels = distances.argmin(dim=1)
    return labels, float(distances.gather(1, labels[:, None]).sum())


def kmeans(x: torch.Tensor, clusters: int, generator: torch.Generator, inits: int = 1) -> torch.Tensor:
    """Cluster labels of the rows of ``x`` (the lowest inertia of ``inits`` seedings)."""
    x = x - x.mean(dim=0)  # as scikit-learn: centered data, for precision
    x_squared = (x * x).sum(dim=1)
    tolerance = float(x.var(dim=0, unbiased=False).mean()) * KMEANS_TOL
    best, best_inertia = None, math.inf
    for _ in range(inits):
        labels, inertia = lloyd(x, x_squared, kmeans_plusplus(x, x_squared, clusters, generator), tolerance)
        if best is None or inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def purity(clusters: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples whose label is their cluster's most frequent one (``purity_score``)."""
    table = torch.zeros(int(clusters.max()) + 1, int(labels.max()) + 1, device=labels.device)
    table.index_put_((clusters, labels), torch.ones_like(labels, dtype=table.dtype), accumulate=True)
    return float(table.max(dim=1).values.sum()) / len(labels)


def split_purity(features: torch.Tensor, labels: torch.Tensor, classes: int, generator: torch.Generator,
                 inits: int) -> float:
    with float32_region(features):  # distances in float32 even where a caller runs autocast
        return purity(kmeans(min_max_scale(features.float()), classes, generator, inits), labels)


# -- collectives for the diagnosis ----------------------------------------------------------------------
def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order, on every rank (``rows`` alone in a single process)."""
    if not distributed.is_distributed():
        return rows
    parts: list = [None] * distributed.world_size()
    dist.all_gather_object(parts, rows.cpu())
    return torch.cat(parts).to(rows.device)


def from_rank_zero(values: list[float]) -> list[float]:
    if not distributed.is_distributed():
        return values
    box = [values]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class Relearning(FusionOnly):
    """Diagnosing & Re-learning as released (see the module docstring); the settings are the registration's."""

    name = "relearning"

    def __init__(self, heads: Sequence[str], context: RunContext | None = None, move_lambda: float = 3.0,
                 reinit_epoch: int = 15, reinit_num: int = 2, reinit_offset: int = 1, kmeans_inits: int = 1):
        super().__init__(heads, context)
        if len(self.modalities) < 1:
            raise UserError(f"--method relearning needs modality heads besides 'fusion'; this model has "
                            f"{', '.join(self.heads)}")
        if not (math.isfinite(move_lambda) and move_lambda >= 0):
            raise UserError(f"--relearning-move-lambda must be a non-negative number, got {move_lambda!r}")
        if reinit_epoch < 1 or reinit_num < 0 or reinit_offset < 0 or kmeans_inits < 1:
            raise UserError(f"--relearning-reinit-epoch and --relearning-kmeans-inits must be at least 1, "
                            f"--relearning-reinit-num and --relearning-reinit-offset at least 0; got "
                            f"{reinit_epoch}, {kmeans_inits}, {reinit_num}, {reinit_offset}")
        self.move_lambda, self.reinit_epoch, self.reinit_num = float(move_lambda), int(reinit_epoch), int(reinit_num)
        self.reinit_offset, self.kmeans_inits = int(reinit_offset), int(kmeans_inits)
        self.diagnoses: list[dict] = []  # one per re-initialization: purities and weights
        self.pending: dict[str, torch.Tensor] = {}

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        net = keep_features(model, self.name)  # checks the model can; kept only while diagnosing
        net.keep_features = False
        # The weights the model was built with (buffers: saved in the method's state, and
        # restored over these on resume).
        for m in self.modalities:
            for i, parameter in enumerate(encoder_parameters(net, m)):
                if f"initial_{m}_{i}" not in self._buffers:
                    self.register_buffer(f"initial_{m}_{i}", parameter.detach().clone())
        if distributed.is_distributed():  # rank 0's, as DDP starts every rank from rank 0's weights
            for name, buffer in self._buffers.items():
                if name.startswith("initial_"):
                    dist.broadcast(buffer, src=0)

    def initial(self, modality: str, index: int) -> torch.Tensor:
        return self._buffers[f"initial_{modality}_{index}"]

    def reinit_due(self, epoch: int) -> bool:
        """Whether the re-initialization happens before run epoch ``epoch`` (1-based): after
        ``j * reinit_epoch + reinit_offset`` completed epochs, j = 1 .. reinit_num."""
        turn, rest = divmod(epoch - 1 - self.reinit_offset, self.reinit_epoch)
        return rest == 0 and 1 <= turn <= self.reinit_num

    # -- get_feature, reinit_score, reinit -----------------------------------------------------
    def features(self, model: nn.Module, batches: Iterable) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        """Encoder features (float32) and labels of ``batches``, gathered over ranks, and the classes."""
        rows: dict[str, list[torch.Tensor]] = {m: [] for m in self.modalities}
        labels, classes = [], 0
        net = distributed.unwrap(model)
        net.keep_features = True
        try:
            with torch.no_grad():
                for inputs, batch_labels in batches:
                    classes = model(inputs)["fusion"].shape[1]
                    features = last_features(model)
                    for m in self.modalities:
                        rows[m].append(features[m].detach().float())
                    labels.append(batch_labels)
        finally:
            net.keep_features, net.last_features = False, {}
        if not labels:
            raise UserError("--method relearning diagnoses on the training and validation splits; one of them "
                            "gave this process no batch")
        gathered = {m: gather_rows(torch.cat(rows[m])) for m in self.modalities}
        return gathered, gather_rows(torch.cat(labels)), classes

    def diagnose(self, model: nn.Module, data, generator: torch.Generator) -> dict[str, dict[str, float]]:
        """Train and validation purity and the re-initialization weight of every modality."""
        split_rows = {"train": self.features(model, data.train_batches()),
                      "val": self.features(model, data.val_batches())}
        result: dict[str, dict[str, float]] = {"train": {}, "val": {}, "weight": {}}
        for split, (features, labels, classes) in split_rows.items():
            if len(labels) < classes:
                raise UserError(f"--method relearning clusters the {split} split into one cluster per class: it "
                                f"needs at least {classes} samples, it has {len(labels)}")
            for m in self.modalities:
                result[split][m] = split_purity(features[m], labels, classes, generator, self.kmeans_inits)
        weights = [math.tanh(self.move_lambda * abs(result["train"][m] - result["val"][m])) for m in self.modalities]
        result["weight"] = dict(zip(self.modalities, from_rank_zero(weights)))
        return result

    @torch.no_grad()
    def reinit(self, model: nn.Module, weights: Mapping[str, float]) -> None:
        """``w * initial + (1 - w) * current`` for every parameter of each modality's encoder."""
        net = distributed.unwrap(model)
        for m in self.modalities:
            for i, parameter in enumerate(encoder_parameters(net, m)):
                weight = torch.tensor(weights[m], dtype=torch.float64, device=parameter.device)
                parameter.copy_(weight * self.initial(m, i) + (1 - weight) * parameter)

    def start_epoch(self, epoch: int, model: nn.Module, data) -> None:
        if not self.reinit_due(epoch):
            return
        seed = (self.context.seed or 0) + KMEANS_SEED_OFFSET + epoch
        generator = torch.Generator().manual_seed(seed)
        model.eval()  # the trainer sets training mode again afterwards
        diagnosis = self.diagnose(model, data, generator)
        self.reinit(model, diagnosis["weight"])
        self.diagnoses.append({"epoch": epoch, **diagnosis})
        log.info("relearning before epoch %d: purity train %s, val %s; re-initialization weights %s", epoch,
                 diagnosis["train"], diagnosis["val"], diagnosis["weight"])
        self.pending = {}
        for key, values in (("relearning_purity_train", diagnosis["train"]),
                            ("relearning_purity_val", diagnosis["val"]),
                            ("relearning_weight", diagnosis["weight"])):
            self.pending[key] = torch.tensor([values.get(h, 0.0) for h in self.heads])

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """The last diagnosis, in the epoch after it (once: the epoch mean is its value)."""
        pending, self.pending = self.pending, {}
        return pending

    def get_extra_state(self):
        return {"diagnoses": [dict(d) for d in self.diagnoses]}

    def set_extra_state(self, state) -> None:
        self.diagnoses = [dict(d) for d in (state or {}).get("diagnoses", [])]


# The authors' script (code/script/ours.sh with ours.py's defaults): SGD lr 0.002, momentum 0.9,
# weight decay 1e-4, no learning-rate decay (ours.py builds no scheduler), batch 64, batch-mean CE,
# 90 epochs, re-initialization every 20 epochs, 3 times, move_lambda 3.
_RELEARNING_AUTHORS = dict(optimizer="sgd", lr=0.002, momentum=0.9, weight_decay=1e-4, lr_step=0,
                           loss_reduction="mean", batch_size=64, epochs=90, relearning_reinit_epoch=20,
                           relearning_reinit_num=3)


@register_method(
    "relearning", prefix="relearning",
    settings=(Setting("move_lambda", float, 3.0,
                      "re-initialization weight tanh(move_lambda * |train purity - validation purity|)"),
              Setting("reinit_epoch", int, 15, "epochs between re-initializations"),
              Setting("reinit_num", int, 2, "how many re-initializations (the first ones due)"),
              Setting("reinit_offset", int, 1,
                      "re-initialize after k * reinit_epoch + offset completed epochs (released: 1)"),
              Setting("kmeans_inits", int, 1,
                      "k-means++ seedings per clustering, lowest inertia kept (scikit-learn >= 1.4: 1)")),
    # The embedded sets' 10-epoch protocol: BalanceBenchmark's schedule (one re-initialization,
    # after epoch 16 of its 30) scaled to 10 epochs, so that the method acts at all there.
    recipes={"authors": {"*": _RELEARNING_AUTHORS},
             "default": {"AVDigits": dict(relearning_reinit_epoch=5, relearning_reinit_num=1),
                         "AVDigitsImbalanced": dict(relearning_reinit_epoch=5, relearning_reinit_num=1)}},
    summary="Diagnosing & Re-learning, purity-gap soft re-initialization of encoders (Wei et al., ECCV 2024)")
def relearning(heads, context, move_lambda, reinit_epoch, reinit_num, reinit_offset, kmeans_inits):
    return Relearning(heads, context, move_lambda=move_lambda, reinit_epoch=reinit_epoch, reinit_num=reinit_num,
                      reinit_offset=reinit_offset, kmeans_inits=kmeans_inits)
