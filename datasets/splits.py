"""Split files: reading ``clip,label`` lists and carving a seeded, stratified validation set."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from sklearn.model_selection import train_test_split

from utils.errors import UserError


def read_clip_labels(path: Path) -> list[tuple[str, str]]:
    """Rows ``clip,label`` (no header; extra columns ignored)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"split file {path} does not exist")
    with path.open(newline="") as handle:
        rows = [(r[0].strip(), r[1].strip()) for r in csv.reader(handle) if len(r) >= 2 and r[0].strip()]
    if not rows:
        raise UserError(f"split file {path} is empty")
    return rows


def write_clip_labels(path: Path, rows: Sequence[tuple[str, str]]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    tmp.replace(path)


def carve_validation(rows: Sequence[tuple[str, str]], fraction: float, seed: int):
    """Split ``rows`` into (train, val), stratified by label and seeded."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1, got {fraction}")
    labels = [label for _, label in rows]
    train, val = train_test_split(list(rows), test_size=fraction, random_state=seed, stratify=labels)
    return sorted(train), sorted(val)


def class_index(names: Sequence[str]) -> dict[str, int]:
    return {name: i for i, name in enumerate(names)}
