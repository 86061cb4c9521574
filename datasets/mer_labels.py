"""MER-MULTI label files: the plain CSV ``name,emo,val,split`` and the released
``label-6way.npz``. The npz holds pickled dicts, and unpickling can run code hidden in the
file, so ``read_labels`` opens it only when the user names it with --label-file."""
from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils.errors import UserError

log = logging.getLogger(__name__)
TRAIN_SPLIT = "train"
CSV_COLUMNS = ("name", "emo", "val", "split")


@dataclass(frozen=True)
class LabelledSample:
    name: str
    emotion: str
    valence: float | None
    split: str          # "train" (the cross-validation pool) or a test set name ("test1", ...)


def split_name(key: str) -> str:
    """``train_corpus`` -> ``train``: the npz names its arrays after the corpus."""
    key = key.strip().lower()
    return key[: -len("_corpus")] if key.endswith("_corpus") else key


def parse_valence(text) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def read_label_csv(path: Path) -> tuple[list[LabelledSample], int]:
    """Rows ``name,emo,val,split`` (header optional); returns (samples, unlabelled count)."""
    samples, unlabelled = [], 0
    try:
        with Path(path).open(newline="") as handle:
            rows = [[cell.strip() for cell in row] for row in csv.reader(handle) if row and row[0].strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read the label file {path}: {error}") from None
    if rows and tuple(cell.lower() for cell in rows[0][:4]) == CSV_COLUMNS:
        rows = rows[1:]
    for number, row in enumerate(rows, start=1):
        if len(row) < 4:
            raise UserError(f"label file {path} row {number} has {len(row)} columns; "
                            f"expected {','.join(CSV_COLUMNS)}")
        name, emotion, valence, split = row[:4]
        if not emotion:
            unlabelled += 1
            continue
        samples.append(LabelledSample(name, emotion.lower(), parse_valence(valence), split_name(split)))
    return samples, unlabelled


def read_label_npz(path: Path) -> tuple[list[LabelledSample], int]:
    """The released ``label-6way.npz``: arrays ``<split>_corpus`` each holding a dict
    ``sample -> {'emo': str, 'val': float}``. Needs pickle, so only a user-named path gets here."""
    samples, unlabelled = [], 0
    try:
        with np.load(path, allow_pickle=True) as archive:
            corpora = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError) as error:
        raise UserError(f"cannot read the label file {path}: {error}") from None
    for key, array in corpora.items():
        table = array.item() if array.dtype == object and array.shape == () else None
        if not isinstance(table, dict):
            raise UserError(f"label file {path}: array {key!r} is not a dict sample -> {{'emo', 'val'}}")
        for name, entry in table.items():
            emotion = entry.get("emo") if isinstance(entry, dict) else None
            if not emotion:
                unlabelled += 1
                continue
            samples.append(LabelledSample(str(name), str(emotion).strip().lower(),
                                          parse_valence(entry.get("val")), split_name(key)))
    return samples, unlabelled


def read_labels(root: Path, label_file: str | None) -> list[LabelledSample]:
    """--label-file (CSV, or .npz read with pickle) or else ``<root>/labels.csv``."""
    if label_file:
        path = Path(label_file).expanduser()
        if not path.is_file():
            raise UserError(f"--label-file {path} does not exist")
        reader = read_label_npz if path.suffix.lower() == ".npz" else read_label_csv
    else:
        path = Path(root) / "labels.csv"
        if not path.is_file():
            hint = ""
            if (Path(root) / "label-6way.npz").is_file():
                hint = (f"; {Path(root) / 'label-6way.npz'} exists but needs pickle to read: "
                        "pass it with --label-file if you trust it")
            raise UserError(f"no label file: {path} does not exist{hint}")
        reader = read_label_csv
    samples, unlabelled = reader(path)
    if unlabelled:
        log.warning("%s: ignored %d samples without an emotion label", path, unlabelled)
    if not any(s.split == TRAIN_SPLIT for s in samples):
        raise UserError(f"label file {path} has no samples in the '{TRAIN_SPLIT}' split")
    duplicates = [name for name, count in Counter((s.split, s.name) for s in samples).items() if count > 1]
    if duplicates:
        raise UserError(f"label file {path} lists samples twice in one split, e.g. {duplicates[0]}")
    return samples
