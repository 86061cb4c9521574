"""Data-side helpers for one or many processes: per-rank samplers and batch sizes."""
from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler

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

    ``min_last`` (with ``pad=True``): the last global batch is left out of the pass when it
    would give each rank fewer than ``min_last`` samples. Training passes 2: BatchNorm cannot
    take batch statistics of one sample whose feature maps are 1x1 (ResNet18 at small input
    sizes), so a trailing batch of one would stop the run; the order is drawn afresh every
    pass, so the left-out sample differs from pass to pass. The held-out loader passes its
    batch size: every held-out batch is full.
    """

    def __init__(self, size: int, generator: torch.Generator | None = None, pad: bool = True,
                 global_batch: int | None = None, rank: int | None = None, world: int | None = None,
                 min_last: int = 1):
        self.size = int(size)
        self.generator = generator
        self.pad = pad
        self.rank = distributed.rank() if rank is None else rank
        self.world = distributed.world_size() if world is None else world
        self.global_batch = self.world if global_batch is None else int(global_batch)
        self.min_last = int(min_last)
        if pad and self.global_batch % self.world:
            raise ValueError(f"global batch {self.global_batch} is not divisible by {self.world} ranks")

    def padded_total(self) -> int:
        """Indices drawn per pass over all ranks: padded to a multiple of the world size, less a
        last global batch below ``min_last`` samples per rank."""
        total = math.ceil(self.size / self.world) * self.world
        last = total % self.global_batch
        if last and last // self.world < self.min_last and total > last:
            total -= last
        return total

    def __len__(self) -> int:
        if self.pad:
            return self.padded_total() // self.world
        return len(range(self.rank, self.size, self.world))

    def __iter__(self):
        if self.size == 0:
            return iter(())
        order = torch.randperm(self.size, generator=self.generator) if self.generator is not None \
            else torch.arange(self.size)
        if not self.pad:
            return iter(order[self.rank::self.world].tolist())
        total = self.padded_total()
        if self.world == 1:
            return iter(order[:total].tolist())
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
