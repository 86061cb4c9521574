"""Per-head loss, accuracy, macro-F1 and mean logit norm, accumulated over batches."""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import numpy as np
import torch

from utils import distributed
from utils.scores import f1_scores  # noqa: F401  (re-exported: the metrics' F1)


class HeadMetrics:
    """Collects raw logits' predictions per head. Predictions use the raw logits z (never the
    modulated ones): a coefficient driven to or below zero must not flip a prediction.

    ``update`` keeps what it is given on the logits' device, so a training step copies nothing
    to the host (on a GPU such a copy waits for every queued kernel); the values come to the
    host, all at once, when a sum, the labels or the predictions are read."""

    def __init__(self, heads):
        self.heads = tuple(heads)
        self._predictions = defaultdict(list)
        self._labels: list[np.ndarray] = []
        self._loss_sums = defaultdict(float)
        self._norm_sums = defaultdict(float)
        self._modulated_sums = defaultdict(float)  # the loss a method trained on, when given
        self._pending: list[tuple] = []  # (labels, predictions (H, B), values, modulated?) on device
        self.count = 0

    @torch.no_grad()
    def update(self, logits: Mapping[str, torch.Tensor], labels: torch.Tensor,
               losses: Mapping[str, torch.Tensor],
               modulated: Mapping[str, torch.Tensor] | None = None) -> None:
        """``losses``: per-head batch means of the raw logits' CE; ``modulated``: the same for
        the logits the method trained on (OLM's w_k z_k), logged as ``loss_modulated``."""
        z = [logits[head].detach().float() for head in self.heads]
        values = [losses[head].detach().float().reshape(()) for head in self.heads]
        values += [logit.norm(dim=1).sum() for logit in z]
        if modulated is not None:
            values += [modulated[head].detach().float().reshape(()) for head in self.heads]
        predictions = torch.stack([logit.argmax(dim=1) for logit in z])
        self._pending.append((labels.detach(), predictions, torch.stack(values), modulated is not None))
        self.count += labels.shape[0]

    def flush(self) -> None:
        """Copy the pending updates to the host: one wait for the device, whenever it is called."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        heads = len(self.heads)
        labels = torch.cat([p[0] for p in pending]).cpu()
        predictions = torch.cat([p[1] for p in pending], dim=1).cpu().numpy()
        values = torch.cat([p[2] for p in pending]).cpu().double().tolist()
        self._labels.append(labels.numpy())
        for k, head in enumerate(self.heads):
            self._predictions[head].append(predictions[k])
        start = 0
        for step_labels, _, step_values, has_modulated in pending:
            batch = step_labels.shape[0]
            row = values[start:start + step_values.numel()]
            start += step_values.numel()
            for k, head in enumerate(self.heads):
                # the float32 mean times the batch in float64, as a float() per step gave it
                self._loss_sums[head] += row[k] * batch
                self._norm_sums[head] += row[heads + k]
                if has_modulated:
                    self._modulated_sums[head] += row[2 * heads + k] * batch

    @property
    def labels(self) -> list[np.ndarray]:
        self.flush()
        return self._labels

    @property
    def predictions(self) -> dict[str, list[np.ndarray]]:
        self.flush()
        return self._predictions

    @property
    def loss_sums(self) -> dict[str, float]:
        self.flush()
        return self._loss_sums

    @property
    def norm_sums(self) -> dict[str, float]:
        self.flush()
        return self._norm_sums

    @property
    def modulated_sums(self) -> dict[str, float]:
        self.flush()
        return self._modulated_sums

    def merge_arrays(self):
        """Labels and per-head predictions as flat arrays (the distributed helper gathers these)."""
        self.flush()
        labels = np.concatenate(self._labels) if self._labels else np.zeros(0, dtype=np.int64)
        predictions = {h: np.concatenate(self._predictions[h]) if self._predictions[h]
                       else np.zeros(0, dtype=np.int64) for h in self.heads}
        return labels, predictions

    def compute(self, labels=None, predictions=None, loss_sums=None, norm_sums=None, count=None,
                modulated_sums=None):
        if labels is None:
            labels, predictions = self.merge_arrays()
        loss_sums = loss_sums if loss_sums is not None else self.loss_sums
        norm_sums = norm_sums if norm_sums is not None else self.norm_sums
        count = count if count is not None else self.count
        modulated_sums = modulated_sums if modulated_sums is not None else self.modulated_sums
        result = {}
        for head in self.heads:
            pred = predictions[head]
            macro, weighted = f1_scores(labels, pred) if labels.size else (0.0, 0.0)
            result[head] = {
                "loss": loss_sums[head] / max(count, 1),
                "acc": float((pred == labels).mean()) if labels.size else 0.0,
                "f1": macro,
                # MER2023's emotion metric (class-frequency weighted F1); main_trans.py selects on it
                "f1_weighted": weighted,
                "norm": norm_sums[head] / max(count, 1),
            }
            if head in modulated_sums:
                result[head]["loss_modulated"] = modulated_sums[head] / max(count, 1)
        return result


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
