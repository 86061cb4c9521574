"""Scores computed from label and prediction arrays (numpy only, no scikit-learn import)."""
from __future__ import annotations

import numpy as np


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
