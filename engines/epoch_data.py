"""``olmbalance.base.EpochData`` over this project's loaders: what a method's ``start_epoch``
may read (training and validation batches; test data never)."""
from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Subset

from olmbalance.base import EpochData
from utils.distributed_data import ShardedSampler
from utils.seed import loader_generator, seed_worker

# Offsets the per-epoch seed of these passes away from the training loader's own.
EPOCH_DATA_SEED_OFFSET = 104729


class LoaderEpochData(EpochData):
    """Batches of the run's training and validation datasets, loaded like the training loader
    (same collate, batch and workers) but drawn from a generator seeded by the run's seed and
    the epoch: the training loader's random stream is untouched, and a resumed run reads what
    an uninterrupted one read. Under DDP each rank reads its shard; methods reduce over ranks."""

    def __init__(self, train: DataLoader, val: DataLoader, device: torch.device, seed: int, epoch: int,
                 to_device):
        self.train_loader, self.val_loader = train, val
        self.device, self.seed, self.epoch = device, seed, epoch
        self.to_device = to_device

    def _batches(self, loader: DataLoader, indices, generator):
        dataset = Subset(loader.dataset, indices) if indices is not None else loader.dataset
        sampler = ShardedSampler(len(dataset), generator, pad=False)
        batches = DataLoader(dataset, batch_size=max(1, (loader.batch_size or 1)), sampler=sampler,
                             num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                             worker_init_fn=seed_worker, generator=generator)
        for inputs, labels, _skipped in batches:
            if inputs is None:
                continue
            yield self.to_device(inputs), labels.to(self.device)

    def train_batches(self, share: float = 1.0):
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share}")
        generator = loader_generator(self.seed + EPOCH_DATA_SEED_OFFSET + self.epoch)
        size = len(self.train_loader.dataset)
        count = max(1, math.ceil(share * size))
        indices = torch.randperm(size, generator=generator)[:count].tolist() if count < size else None
        return self._batches(self.train_loader, indices, generator)

    def val_batches(self):
        return self._batches(self.val_loader, None, None)
