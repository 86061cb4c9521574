"""predictions.npz: a run's per-sample softmax probabilities and labels (val and test) for its
selection head, written by the imbalance diagnostics and read by the comparison's
unimodal-ensemble row."""
from __future__ import annotations

from pathlib import Path

import numpy as np

PREDICTIONS_FILE = "predictions.npz"


def write_predictions(run_dir: Path, predictions: dict, head: str) -> Path:
    path = Path(run_dir) / PREDICTIONS_FILE
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, head=np.array(head), **predictions)
    tmp.replace(path)
    return path


def read_predictions(run_dir: Path) -> dict | None:
    """The run's saved probabilities, or None when it has none (diagnostics off, older run)."""
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.is_file():
        return None
    with np.load(path) as saved:
        return {key: saved[key] for key in saved.files}
