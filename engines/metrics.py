"""Per-head loss, accuracy, macro-F1 and mean logit norm, accumulated over batches."""
from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import numpy as np
import torch


def f1_scores(labels: np.ndarray, predictions: np.ndarray) -> tuple[float, float]:
    """Macro and support-weighted F1 over the classes present in ``labels`` or ``predictions``,
    0 for a class never predicted correctly: scikit-learn's ``f1_score(average="macro" |
    "weighted", zero_division=0)`` (tests/test_guards.py checks the two agree), computed here
    because importing scikit-learn costs every training process about a second."""
    classes, indices = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    truth, guess = indices[:labels.size], indices[labels.size:]
    true_positives = np.bincount(truth[truth == guess], minlength=classes.size)
    support = np.bincount(truth, minlength=classes.size)
    predicted = np.bincount(guess, minlength=classes.size)
    # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (support + predicted); never 0/0 for these classes.
    per_class = 2 * true_positives / (support + predicted)
    return float(per_class.mean()), float((per_class * support).sum() / support.sum())


class HeadMetrics:
    """Collects raw logits' predictions per head. Predictions use the raw logits z (never the
    modulated ones): a coefficient driven to or below zero must not flip a prediction."""

    def __init__(self, heads):
        self.heads = tuple(heads)
        self.predictions = defaultdict(list)
        self.labels: list[np.ndarray] = []
        self.loss_sums = defaultdict(float)
        self.norm_sums = defaultdict(float)
        self.modulated_sums = defaultdict(float)  # the loss a method trained on, when given
        self.count = 0

    @torch.no_grad()
    def update(self, logits: Mapping[str, torch.Tensor], labels: torch.Tensor,
               losses: Mapping[str, torch.Tensor],
               modulated: Mapping[str, torch.Tensor] | None = None) -> None:
        """``losses``: per-head batch means of the raw logits' CE; ``modulated``: the same for
        the logits the method trained on (OLM's w_k z_k), logged as ``loss_modulated``."""
        batch = labels.shape[0]
        self.labels.append(labels.detach().cpu().numpy())
        for head in self.heads:
            z = logits[head].detach().float()
            self.predictions[head].append(z.argmax(dim=1).cpu().numpy())
            self.loss_sums[head] += float(losses[head]) * batch
            self.norm_sums[head] += float(z.norm(dim=1).sum())
            if modulated is not None:
                self.modulated_sums[head] += float(modulated[head]) * batch
        self.count += batch

    def merge_arrays(self):
        """Labels and per-head predictions as flat arrays (the distributed helper gathers these)."""
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0, dtype=np.int64)
        predictions = {h: np.concatenate(self.predictions[h]) if self.predictions[h]
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
