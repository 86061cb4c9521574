"""Loaders for the real audio-visual sets, reading what data/<NAME>/ preprocessing writes.

On disk (``--data-root``): CREMA-D ``AudioWAV/<clip>.wav``, the others ``audio/<clip>.wav``;
frames in ``Image-01-FPS/<clip>/00000.jpg, ...``. Split files are looked up in the root,
then in the repository's ``data/<NAME>/`` folder. Class lists come from the training clips,
sorted, so an index means the same class in every run. Where a dataset has no validation
split, one is carved once (seeded, stratified) and kept in ``<root>/splits/``.
"""
from __future__ import annotations

import csv
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from config import Config, DatasetSpec, cache_home
from datasets.builders import DataBundle, av_bundle, frames_folder
from datasets.splits import read_clip_labels
from utils.errors import UserError

log = logging.getLogger(__name__)
REPOSITORY_DATA = Path(__file__).resolve().parents[1] / "data"
Rows = list[tuple[str, str]]
VAL_SEED = 0  # fixed, not --seed: the carved validation split must not change between runs


def dataset_root(cfg: Config, spec: DatasetSpec) -> Path:
    root = Path(cfg.data_root).expanduser() if cfg.data_root else spec.default_root()
    if not root.is_dir():
        raise UserError(f"{spec.name} folder {root} does not exist; pass --data-root "
                        f"(or set ${spec.root_env}) to where preprocessing wrote it")
    return root


def find_split_file(root: Path, spec: DatasetSpec, filename: str) -> Path:
    for folder in (root, REPOSITORY_DATA / spec.name):
        if (folder / filename).is_file():
            return folder / filename
    raise UserError(f"split file {root / filename} does not exist (nor data/{spec.name}/{filename} "
                    f"in the repository); put it in --data-root {root}")


def split_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of a split file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read split file {path}: {error}") from None
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UserError(f"split file {path} is empty")
    return lines


def read_ave_split(path: Path) -> Rows:
    """``Category&VideoID&Quality&Start&End`` lines (a header line is skipped)."""
    rows = []
    for number, line in split_lines(path):
        fields = line.split("&")
        if len(fields) < 2 or not fields[1].strip():
            raise UserError(f"split file {path} line {number} is not Category&VideoID&...: {line[:60]!r}")
        if fields[1].strip() != "VideoID":
            rows.append((fields[1].strip(), fields[0].strip()))
    return non_empty(rows, path)


def read_kinetics_split(path: Path) -> Rows:
    """``clip,10,label_index`` lines (the middle field is unused)."""
    rows = []
    for number, line in split_lines(path):
        fields = [field.strip() for field in line.split(",")]
        if len(fields) < 3 or not fields[0] or not fields[2]:
            raise UserError(f"split file {path} line {number} is not clip,10,label_index: {line[:60]!r}")
        rows.append((fields[0], fields[2]))
    return non_empty(rows, path)


def read_vggsound_csv(path: Path) -> dict[str, Rows]:
    """``ytid,start_seconds,label,train|test`` rows -> {"train": rows, "test": rows}; the clip
    is named ``<ytid>_<start:06d>`` as the preprocessing names its files."""
    splits: dict[str, Rows] = {"train": [], "test": []}
    for position, (number, line) in enumerate(split_lines(path)):
        fields = [field.strip() for field in next(csv.reader([line]))]
        if position == 0 and len(fields) >= 2 and not fields[1].isdigit():
            continue  # header row (vggsound_with_head.csv)
        if len(fields) < 4 or not fields[1].isdigit() or fields[3] not in splits:
            raise UserError(f"split file {path} line {number} is not ytid,start_seconds,label,"
                            f"train|test: {line[:60]!r}")
        splits[fields[3]].append((f"{fields[0]}_{int(fields[1]):06d}", fields[2]))
    for split, rows in splits.items():
        if not rows:
            raise UserError(f"split file {path} has no {split} rows")
    return splits


def non_empty(rows: Rows, path: Path) -> Rows:
    if not rows:
        raise UserError(f"split file {path} lists no clips")
    return rows


def without_repeats(rows: Rows, where: str) -> Rows:
    first_label: dict[str, str] = {}
    for clip, label in rows:
        first_label.setdefault(clip, label)
    if len(first_label) < len(rows):
        log.warning("%s lists %d clip(s) more than once; keeping the first line of each",
                    where, len(rows) - len(first_label))
        return list(first_label.items())
    return rows


def check_disjoint(splits: dict[str, Rows], where: str) -> None:
    owner: dict[str, str] = {}
    for split, rows in splits.items():
        for clip, _ in rows:
            if owner.setdefault(clip, split) != split:
                raise UserError(f"clip {clip} is in both the {owner[clip]} and {split} splits "
                                f"({where}); a clip may sit in one split only")


def sorted_labels(labels) -> list[str]:
    """Sorted class names; integer labels (Kinetics-Sounds) sort as numbers."""
    labels = set(labels)
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def training_classes(splits: dict[str, Rows], where: str) -> tuple[list[str], dict[str, Rows]]:
    """Classes of the training clips; evaluation clips of a class never trained on are dropped
    (counted), since no head can predict a class absent from training."""
    class_names = sorted_labels(label for _, label in splits["train"])
    known = set(class_names)
    kept = {}
    for split, rows in splits.items():
        kept[split] = [row for row in rows if row[1] in known]
        dropped = len(rows) - len(kept[split])
        if dropped:
            log.warning("%s: dropped %d %s clip(s) whose class has no training clip", where, dropped, split)
        if not kept[split]:
            raise UserError(f"the {split} split of {where} has no clip of a class seen in training")
    return class_names, kept


def carve_validation(rows: Rows, fraction: float, seed: int = VAL_SEED) -> tuple[Rows, Rows]:
    """Seeded, stratified (train, val): about ``fraction`` of every class with two or more
    clips goes to val (at least one clip, never the last), so small classes keep training data."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    by_class: dict[str, Rows] = {}
    for row in sorted(rows):
        by_class.setdefault(row[1], []).append(row)
    val: set[tuple[str, str]] = set()
    for label in sorted(by_class):
        group = by_class[label]
        take = min(len(group) - 1, max(1, round(fraction * len(group))))
        val.update(group[i] for i in rng.permutation(len(group))[:take])
    return sorted(set(rows) - val), sorted(val)


def load_or_carve_validation(rows: Rows, fraction: float, store: Path) -> tuple[Rows, Rows]:
    """Reuse the split kept in ``store`` while it still partitions ``rows`` at ``fraction``;
    otherwise carve it (seed VAL_SEED, not the run seed: every run and method sees one split)."""
    train_file, val_file = store / "train_split.csv", store / "val_split.csv"
    train, val = carve_validation(rows, fraction)
    if train_file.is_file() and val_file.is_file():
        kept_train, kept_val = read_clip_labels(train_file), read_clip_labels(val_file)
        if (len(kept_val) == len(val) and not set(kept_train) & set(kept_val)
                and set(kept_train) | set(kept_val) == set(rows)):
            return kept_train, kept_val
        log.warning("the training list or --val-fraction changed since %s was written; carving "
                    "the validation split again", val_file)
    write_rows(train_file, train)
    write_rows(val_file, val)
    log.info("carved a %d-clip validation split from %d training clips into %s", len(val), len(rows), store)
    return train, val


def write_rows(path: Path, rows: Rows) -> None:
    """``clip,label`` rows via a unique temporary file, so concurrent runs never clash."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", newline="") as out:
            csv.writer(out).writerows(rows)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def frame_root(root: Path) -> Path:
    """``Image-01-FPS``, or the only ``Image-NN-FPS`` folder when frames were kept at another rate."""
    default = frames_folder(root)
    if not default.is_dir():
        others = sorted(root.glob("Image-*-FPS"))
        if len(others) == 1:
            log.info("reading frames from %s (no %s)", others[0], default.name)
            return others[0]
    return default


def split_store(root: Path, spec: DatasetSpec) -> Path:
    """``<root>/splits`` where the root is writable, else a per-root folder in the cache."""
    folder = root / "splits"
    try:
        folder.mkdir(exist_ok=True)
        probe = folder / ".write-test"
        probe.touch()
        probe.unlink()
        return folder
    except OSError:
        from datasets.spec_cache import short_hash

        fallback = cache_home() / "splits" / f"{spec.name}-{short_hash(str(root.resolve()))}"
        fallback.mkdir(parents=True, exist_ok=True)
        log.info("%s is read-only; keeping the carved validation split in %s", root, fallback)
        return fallback


def finish(cfg: Config, spec: DatasetSpec, root: Path, splits: dict[str, Rows], where: str,
           audio_folder: str) -> DataBundle:
    """Shared tail of every builder: checks, class list, validation carving, datasets."""
    splits = {split: without_repeats(rows, f"{where} ({split})") for split, rows in splits.items()}
    check_disjoint(splits, where)
    class_names, splits = training_classes(splits, where)
    if "val" not in splits:
        train, val = load_or_carve_validation(splits["train"], cfg.val_fraction, split_store(root, spec))
        splits = {"train": train, "val": val, "test": splits["test"]}
        check_disjoint(splits, f"{where} with the carved validation split")
    log.info("%s: %d classes; %s", spec.name, len(class_names),
             ", ".join(f"{len(rows)} {split}" for split, rows in splits.items()))
    frames = frame_root(root)
    audio = root / audio_folder
    try:
        return av_bundle(cfg, root, splits, class_names,
                         audio_path=lambda clip: audio / f"{clip}.wav",
                         frame_dir=lambda clip: frames / clip)
    except UserError as error:
        if str(root) in str(error):
            raise
        raise UserError(f"{spec.name} at --data-root {root}: {error}") from None


def build_cremad(cfg: Config, spec: DatasetSpec) -> DataBundle:
    root = dataset_root(cfg, spec)
    files = {split: find_split_file(root, spec, f"{split}.csv") for split in ("train", "test")}
    splits = {split: read_clip_labels(path) for split, path in files.items()}
    return finish(cfg, spec, root, splits, f"{files['train']} / {files['test']}", "AudioWAV")


def build_ave(cfg: Config, spec: DatasetSpec) -> DataBundle:
    root = dataset_root(cfg, spec)
    files = {split: find_split_file(root, spec, f"{split}Set.txt") for split in ("train", "val", "test")}
    splits = {split: read_ave_split(path) for split, path in files.items()}
    return finish(cfg, spec, root, splits, f"the AVE split files in {files['train'].parent}", "audio")


def build_kinetics_sounds(cfg: Config, spec: DatasetSpec) -> DataBundle:
    root = dataset_root(cfg, spec)
    files = {split: find_split_file(root, spec, f"my_{split}.txt") for split in ("train", "test")}
    splits = {split: read_kinetics_split(path) for split, path in files.items()}
    return finish(cfg, spec, root, splits, f"{files['train']} / {files['test']}", "audio")


def build_vggsound(cfg: Config, spec: DatasetSpec) -> DataBundle:
    root = dataset_root(cfg, spec)
    path = find_split_file(root, spec, "vggsound.csv")
    splits = on_disk_only(read_vggsound_csv(path), root, path)
    return finish(cfg, spec, root, splits, str(path), "audio")


def on_disk_only(splits: dict[str, Rows], root: Path, listing: Path) -> dict[str, Rows]:
    """vggsound.csv lists the whole catalogue and many videos have left YouTube, so clips that
    were never downloaded are expected: drop them (counted) instead of failing --max-missing."""
    frames = frame_root(root)
    present = {split: [row for row in rows if (root / "audio" / f"{row[0]}.wav").is_file()
                       or (frames / row[0]).is_dir()] for split, rows in splits.items()}
    listed, found = sum(map(len, splits.values())), sum(map(len, present.values()))
    if found == 0:
        raise UserError(f"none of the {listed} clips in {listing} has a wav in {root / 'audio'} or "
                        f"frames in {frames}; check --data-root")
    if found < listed:
        log.info("VGGSound: %d of %d clips listed in %s are on disk under %s", found, listed, listing, root)
    return present
