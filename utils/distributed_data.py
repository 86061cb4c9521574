"""Data-side helpers for torchrun: per-rank samplers and metrics reduced over ranks."""
from __future__ import annotations

from torch.utils.data import DistributedSampler

from engines.metrics import HeadMetrics
from utils import distributed


def sharded_sampler(dataset, shuffle: bool, seed: int):
    """None in a single process (the loader shuffles itself); a per-rank shard otherwise."""
    if not distributed.is_distributed():
        return None
    return DistributedSampler(dataset, shuffle=shuffle, seed=seed)


def reduce_metrics(metrics: HeadMetrics) -> dict:
    """Per-head metrics over every rank's samples."""
    if not distributed.is_distributed():
        return metrics.compute()
    import numpy as np
    import torch.distributed as dist

    labels, predictions = metrics.merge_arrays()
    local = (labels, predictions, dict(metrics.loss_sums), dict(metrics.norm_sums), metrics.count)
    gathered = [None] * distributed.world_size()
    dist.all_gather_object(gathered, local)
    all_labels = np.concatenate([g[0] for g in gathered])
    all_predictions = {h: np.concatenate([g[1][h] for g in gathered]) for h in metrics.heads}
    loss_sums = {h: sum(g[2].get(h, 0.0) for g in gathered) for h in metrics.heads}
    norm_sums = {h: sum(g[3].get(h, 0.0) for g in gathered) for h in metrics.heads}
    count = sum(g[4] for g in gathered)
    return metrics.compute(all_labels, all_predictions, loss_sums, norm_sums, count)
