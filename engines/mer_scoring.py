"""MER2023's metrics for the cross-validated mid-fusion runs, per fold and as a fold ensemble.

MER2023 (MER-MULTI) scores emotion by weighted F1 and valence by mean squared error, and
ranks test1/test2 by ``weighted F1 - 0.25 x MSE``; test3 carries no valence and is ranked
by weighted F1 alone. Its baseline averages the folds' predictions (class probabilities and
valence) per sample and scores that average: the *ensemble*. The per-fold scores'
mean +- std is reported beside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score, mean_squared_error

VALENCE_WEIGHT = 0.25                # MER2023: combined = weighted F1 - 0.25 x valence MSE
EMOTION_ONLY_SPLITS = ("test3",)     # ranked by weighted F1 alone
VALENCE_HEAD = "fusion"              # the valence regressor reads the fused features


@dataclass
class Predictions:
    """One model's outputs on one split, one row per readable sample."""

    names: list[str]
    labels: np.ndarray                                            # (N,) class indices
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)  # head -> (N, C) softmax
    valence_true: np.ndarray | None = None                        # (N,), NaN where unknown
    valence_pred: np.ndarray | None = None                        # (N,) when the model predicts it

    def save(self, path: Path) -> None:
        arrays = {"names": np.array(self.names, dtype=str), "labels": self.labels}
        arrays.update({f"prob_{h}": p for h, p in self.probabilities.items()})
        if self.valence_true is not None:
            arrays["valence_true"] = self.valence_true
        if self.valence_pred is not None:
            arrays["valence_pred"] = self.valence_pred
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: Path) -> "Predictions":
        with np.load(path, allow_pickle=False) as data:
            return cls(names=[str(n) for n in data["names"]], labels=data["labels"],
                       probabilities={k[len("prob_"):]: data[k] for k in data.files if k.startswith("prob_")},
                       valence_true=data["valence_true"] if "valence_true" in data.files else None,
                       valence_pred=data["valence_pred"] if "valence_pred" in data.files else None)


@torch.no_grad()
def predict(model, dataset, batch_size: int, device, collate_fn) -> Predictions:
    """Softmax of every head's raw logits (and the valence prediction) on ``dataset``; a sample
    whose files cannot be read is left out (the dataset logs it), keeping names aligned."""
    from datasets.mer import VALENCE_KEY
    from engines.engines_logits_com import StepContext, to_device

    ctx = StepContext(device=device, network_optimizer=None)
    was_training = model.training
    model.eval()
    names, labels, valence_true, valence_pred = [], [], [], []
    probabilities: dict[str, list] = {h: [] for h in model.heads}
    try:
        for start in range(0, len(dataset), batch_size):
            items = [(i, dataset[i]) for i in range(start, min(start + batch_size, len(dataset)))]
            kept = [(i, item) for i, item in items if item is not None]
            if not kept:
                continue
            inputs, batch_labels, _ = collate_fn([item for _, item in kept])
            outputs = model(to_device(inputs, ctx))
            names += [dataset.samples[i].name for i, _ in kept]
            labels.append(batch_labels.numpy())
            for head in model.heads:
                probabilities[head].append(torch.softmax(outputs[head].float(), dim=1).cpu().numpy())
            if VALENCE_KEY in inputs:
                valence_true.append(inputs[VALENCE_KEY].numpy())
            if VALENCE_KEY in outputs:
                valence_pred.append(outputs[VALENCE_KEY].float().cpu().numpy())
    finally:
        model.train(was_training)
    return Predictions(names=names, labels=np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64),
                       probabilities={h: np.concatenate(p) for h, p in probabilities.items() if p},
                       valence_true=np.concatenate(valence_true) if valence_true else None,
                       valence_pred=np.concatenate(valence_pred) if valence_pred else None)


def mer2023_scores(predictions: Predictions, split: str) -> dict:
    """head -> metrics; the valence head also gets ``valence_mse`` and ``combined`` where the
    split's samples carry valence (never for test3); ``mer2023`` is the score MER2023 ranks by."""
    labels = predictions.labels
    scores = {}
    for head, probs in predictions.probabilities.items():
        pred = probs.argmax(axis=1)
        scores[head] = {"acc": float((pred == labels).mean()) if labels.size else 0.0,
                        "f1_weighted": float(f1_score(labels, pred, average="weighted", zero_division=0)),
                        "f1_macro": float(f1_score(labels, pred, average="macro", zero_division=0))}
        scores[head]["mer2023"] = scores[head]["f1_weighted"]
    known = (None if predictions.valence_true is None or predictions.valence_pred is None
             else np.isfinite(predictions.valence_true))
    if (VALENCE_HEAD in scores and known is not None and known.all() and known.size
            and split not in EMOTION_ONLY_SPLITS):
        head = scores[VALENCE_HEAD]
        head["valence_mse"] = float(mean_squared_error(predictions.valence_true, predictions.valence_pred))
        head["combined"] = head["f1_weighted"] - VALENCE_WEIGHT * head["valence_mse"]
        head["mer2023"] = head["combined"]
    return scores


def ensemble(per_fold: list[Predictions]) -> Predictions:
    """Average the folds' probabilities and valence predictions per sample (as MER2023's
    baseline does), over the samples every fold could read."""
    common = set(per_fold[0].names).intersection(*(set(p.names) for p in per_fold[1:]))
    names = [n for n in per_fold[0].names if n in common]
    positions = [{n: i for i, n in enumerate(p.names)} for p in per_fold]
    rows = [[where[n] for n in names] for where in positions]
    first = per_fold[0]
    mean = {h: np.mean([p.probabilities[h][r] for p, r in zip(per_fold, rows)], axis=0)
            for h in first.probabilities}
    valence_pred = (np.mean([p.valence_pred[r] for p, r in zip(per_fold, rows)], axis=0)
                    if all(p.valence_pred is not None for p in per_fold) else None)
    return Predictions(names=names, labels=first.labels[rows[0]], probabilities=mean,
                       valence_true=None if first.valence_true is None else first.valence_true[rows[0]],
                       valence_pred=valence_pred)
