"""Data-side helpers for one or many processes: per-rank samplers and metrics reduced over ranks."""
from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler

from engines.metrics import HeadMetrics
from utils import distributed
from utils.errors import UserError


class ShardedSampler(Sampler[int]):
    """This process's share of a dataset's indices (all of them in a single process).

    Each pass draws a fresh order from ``generator`` (``None``: dataset order). Every rank
    holds its generator in the same state, so all ranks draw the same order and take parts:

    - ``pad=True`` (training, held-out): the order is padded with its first indices to a
      multiple of the world size, then each global batch (``global_batch`` indices) is cut
      into one contiguous slice per rank. Ranks get equal batch counts (DDP's collectives
      need that) and one step's slices together are the batch a single process would draw.
    - ``pad=False`` (validation, test): rank r takes positions r, r + W, ..., so every
      sample is scored exactly once (DistributedSampler repeats samples to even out ranks).

    With one process and a generator the order equals ``RandomSampler``'s for that generator.
    """

    def __init__(self, size: int, generator: torch.Generator | None = None, pad: bool = True,
                 global_batch: int | None = None, rank: int | None = None, world: int | None = None):
        self.size = int(size)
        self.generator = generator
        self.pad = pad
        self.rank = distributed.rank() if rank is None else rank
        self.world = distributed.world_size() if world is None else world
        self.global_batch = self.world if global_batch is None else int(global_batch)
        if pad and self.global_batch % self.world:
            raise ValueError(f"global batch {self.global_batch} is not divisible by {self.world} ranks")

    def __len__(self) -> int:
        if self.world == 1:
            return self.size
        if self.pad:
            return math.ceil(self.size / self.world)
        return len(range(self.rank, self.size, self.world))

    def __iter__(self):
        if self.size == 0:
            return iter(())
        order = torch.randperm(self.size, generator=self.generator) if self.generator is not None \
            else torch.arange(self.size)
        if self.world == 1:
            return iter(order.tolist())
        if not self.pad:
            return iter(order[self.rank::self.world].tolist())
        total = math.ceil(self.size / self.world) * self.world
        padded = order.repeat(math.ceil(total / self.size))[:total]
        mine = []
        for start in range(0, total, self.global_batch):
            chunk = padded[start:start + self.global_batch]
            share = len(chunk) // self.world
            mine.extend(chunk[self.rank * share:(self.rank + 1) * share].tolist())
        return iter(mine)


def per_rank_batch(global_batch: int, flag: str) -> int:
    """Batch sizes are global (summed over processes), so a run means the same thing on any
    number of processes; each process loads its equal share."""
    world = distributed.world_size()
    if global_batch < 1:
        raise UserError(f"{flag} must be at least 1, got {global_batch}")
    if global_batch % world:
        raise UserError(f"{flag} {global_batch} is the global batch and must be divisible by the "
                        f"{world} processes torchrun started")
    return global_batch // world


def reduce_metrics(metrics: HeadMetrics) -> dict:
    """Per-head metrics over every rank's samples."""
    if not distributed.is_distributed():
        return metrics.compute()
    import numpy as np
    import torch.distributed as dist

    labels, predictions = metrics.merge_arrays()
    local = (labels, predictions, dict(metrics.loss_sums), dict(metrics.norm_sums), metrics.count,
             dict(metrics.modulated_sums))
    gathered = [None] * distributed.world_size()
    dist.all_gather_object(gathered, local)
    all_labels = np.concatenate([g[0] for g in gathered])
    all_predictions = {h: np.concatenate([g[1][h] for g in gathered]) for h in metrics.heads}
    loss_sums = {h: sum(g[2].get(h, 0.0) for g in gathered) for h in metrics.heads}
    norm_sums = {h: sum(g[3].get(h, 0.0) for g in gathered) for h in metrics.heads}
    count = sum(g[4] for g in gathered)
    modulated = {h: sum(g[5][h] for g in gathered) for h in metrics.heads if h in metrics.modulated_sums}
    return metrics.compute(all_labels, all_predictions, loss_sums, norm_sums, count, modulated)
