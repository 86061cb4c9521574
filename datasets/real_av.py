"""Loaders of CREMA-D, AVE, Kinetics-Sounds and VGGSound, from the layouts users already have.

Each dataset reads both the layout the released preprocessing produced (and its loaders
read) and the layout of this project's ``data/<NAME>/`` scripts; docs/datasets.md has the
table. Wav folders are looked up under ``--audio-root``, frame folders under
``--frames-root`` (both default to ``--data-root``), split files in ``--splits-dir`` or else
the dataset root, then the repository's ``data/<NAME>/``. Where a dataset has no validation
split, one is carved once (seeded, stratified) and kept in ``<root>/splits/``.

Start-up is linear in the clips: presence is read from one listing per folder
(``av_base.FolderListing``), never a ``stat`` per clip.
"""
from __future__ import annotations

import csv
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np

from datasets.registry import DatasetSpec, cache_home
from datasets.av_base import FolderListing
from datasets.builders import DataBundle, av_bundle, frames_folder
from datasets import splits as fmt
from utils.errors import UserError

if TYPE_CHECKING:  # the run's options; datasets sit below config and never import it
    from config import Config

log = logging.getLogger(__name__)
REPOSITORY_DATA = Path(__file__).resolve().parents[1] / "data"
Rows = list[tuple[str, str]]
VAL_SEED = 0  # fixed, not --seed: the carved validation split must not change between runs

WHERE_TO_GET = {
    "CREMAD": "train.csv/test.csv ship in this repository's data/CREMAD/ (from github.com/GeWu-Lab/OGM-GE_CVPR2022)",
    "AVE": "trainSet.txt, valSet.txt and testSet.txt come with the AVE dataset "
           "(github.com/YapengTian/AVE-ECCV18); the released loader's my_train.txt/my_test.txt also work",
    "KineticSound": "my_train.txt/my_test.txt ship in this repository's data/KineticSound/ "
                    "(from github.com/GeWu-Lab/OGM-GE_CVPR2022)",
    "VGGSound": "vggsound.csv is published at https://www.robots.ox.ac.uk/~vgg/data/vggsound/ (CC BY 4.0)",
}


# ---------------------------------------------------------------- roots and split files

def dataset_root(cfg: Config, spec: DatasetSpec) -> Path:
    root = Path(cfg.data_root).expanduser() if cfg.data_root else spec.default_root()
    if root is None or not root.is_dir():
        raise UserError(f"{spec.name} folder {root} does not exist; pass --data-root "
                        f"(or set ${spec.root_env}) to where preprocessing wrote it")
    return root


def optional_root(value: str | None, flag: str, default: Path) -> Path:
    if not value:
        return default
    path = Path(value).expanduser()
    if not path.is_dir():
        raise UserError(f"{flag} {path} is not a folder")
    return path


def split_folders(cfg: Config, spec: DatasetSpec, root: Path) -> list[Path]:
    if cfg.splits_dir:
        return [optional_root(cfg.splits_dir, "--splits-dir", root)]
    return [root, REPOSITORY_DATA / spec.name]


def find_split_file(folders: list[Path], spec: DatasetSpec, filename: str) -> Path:
    for folder in folders:
        if (folder / filename).is_file():
            return folder / filename
    searched = " nor ".join(str(folder / filename) for folder in folders)
    raise UserError(f"split file {searched} does not exist; {WHERE_TO_GET[spec.name]}; put it in "
                    f"--data-root or pass --splits-dir")


def first_folder(candidates: Iterable[tuple[Path, str]]) -> tuple[Path, str]:
    """The first candidate (folder, name suffix) that exists, else the first one: the
    project layout's, so that missing clips are reported where its scripts write them."""
    candidates = list(candidates)
    return next((c for c in candidates if c[0].is_dir()), candidates[0])


def frame_root(root: Path) -> Path:
    """``Image-01-FPS``, or the only ``Image-NN-FPS`` folder when frames were kept at another rate."""
    default = frames_folder(root)
    if not default.is_dir():
        others = sorted(root.glob("Image-*-FPS"))
        if len(others) == 1:
            log.info("reading frames from %s (no %s)", others[0], default.name)
            return others[0]
    return default


class Layout:
    """Where one dataset's wavs and frame folders are, per source split (the split of the
    published files: Kinetics-Sounds and VGGSound keep train and test in separate folders)."""

    def __init__(self, audio: Callable[[str], Iterable[Path]],
                 frames: Callable[[str], Iterable[tuple[Path, str]]]):
        self.audio_candidates, self.frame_candidates = audio, frames
        self.chosen: dict[str, tuple[Path, Path, str]] = {}

    def folders(self, source: str) -> tuple[Path, Path, str]:
        if source not in self.chosen:
            audio, _ = first_folder((folder, "") for folder in self.audio_candidates(source))
            frames, suffix = first_folder(self.frame_candidates(source))
            self.chosen[source] = (audio, frames, suffix)
            log.info("%s clips: wavs in %s, frames in %s", source, audio, frames)
        return self.chosen[source]

    def paths(self, rows_by_source: dict[str, Rows]) -> dict[str, tuple[str, str]]:
        """clip -> (wav file, frame folder) as strings (see av_base.AVClip: Path objects for
        200,000 clips would cost more than everything else at start-up)."""
        located = {}
        for source, rows in rows_by_source.items():
            audio_folder, frame_folder, suffix = self.folders(source)
            audio, frames = os.fspath(audio_folder), os.fspath(frame_folder)
            for clip, _ in rows:
                located[clip] = (f"{audio}{os.sep}{clip}.wav", f"{frames}{os.sep}{clip}{suffix}")
        return located


def roots(cfg: Config, root: Path) -> tuple[Path, Path]:
    return (optional_root(cfg.audio_root, "--audio-root", root),
            optional_root(cfg.frames_root, "--frames-root", root))


# ---------------------------------------------------------------- split checks and classes

def without_repeats(rows: Rows, where: str, keep: str = "first") -> tuple[Rows, int]:
    """One row per clip; ``keep`` says which line wins. Returns (rows, clips listed twice)."""
    chosen: dict[str, str] = {}
    for clip, label in rows:
        if keep == "last":
            chosen.pop(clip, None)  # re-inserted at the end: the last line's place and label
            chosen[clip] = label
        else:
            chosen.setdefault(clip, label)
    repeated = len(rows) - len(chosen)
    if repeated:
        log.warning("%s lists %d clip(s) more than once; keeping the %s line of each", where, repeated, keep)
    return list(chosen.items()), repeated


def check_disjoint(splits: dict[str, Rows], where: str) -> None:
    owner: dict[str, str] = {}
    for split, rows in splits.items():
        for clip, _ in rows:
            if owner.setdefault(clip, split) != split:
                raise UserError(f"clip {clip} is in both the {owner[clip]} and {split} splits "
                                f"({where}); a clip may sit in one split only")


def drop_evaluation_overlaps(splits: dict[str, Rows], where: str) -> dict[str, int]:
    """AVE lists some videos (more than one event) in two official splits, sometimes with
    different labels. Evaluation sets stay as published; a video is never trained on (nor
    validated on) when a later split holds it. Returns the counts removed."""
    counts = {}
    order = [split for split in ("train", "val", "test") if split in splits]
    for position, split in enumerate(order):
        later = {clip for other in order[position + 1:] for clip, _ in splits[other]}
        for other in order[position + 1:]:
            held = {clip for clip, _ in splits[other]}
            counts[f"{split}&{other}"] = sum(clip in held for clip, _ in splits[split])
        splits[split] = [row for row in splits[split] if row[0] not in later]
    removed = {key: value for key, value in counts.items() if value}
    if removed:
        log.warning("%s: videos in two splits, removed from the earlier one (never train on an "
                    "evaluation video): %s", where,
                    ", ".join(f"{n} in {key.replace('&', ' and ')}" for key, n in removed.items()))
    return counts


def keep_known_classes(splits: dict[str, Rows], class_names: list[str], where: str) -> dict[str, Rows]:
    """Drop (counted) clips whose class has no head: a class absent from training."""
    known = set(class_names)
    kept = {}
    for split, rows in splits.items():
        kept[split] = [row for row in rows if row[1] in known]
        dropped = len(rows) - len(kept[split])
        if dropped:
            log.warning("%s: dropped %d %s clip(s) whose class has no training clip", where, dropped, split)
        if not kept[split]:
            raise UserError(f"the {split} split of {where} has no clip of a class seen in training")
    return kept


def in_first_appearance(labels: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(labels))


def numeric_range(labels: Iterable[str]) -> list[str]:
    """Kinetics-Sounds labels are indices already: class i is index i, as released."""
    return [str(i) for i in range(max(int(label) for label in labels) + 1)]


# ---------------------------------------------------------------- validation carving

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
        kept_train, kept_val = fmt.read_clip_labels(train_file), fmt.read_clip_labels(val_file)
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


# ---------------------------------------------------------------- the shared tail

def finish(cfg: Config, spec: DatasetSpec, root: Path, splits: dict[str, Rows],
           located: dict[str, tuple[str, str]], class_names: list[str], where: str,
           extras: dict | None = None, split_files: dict[str, Path] | None = None) -> DataBundle:
    """Class filter, validation carving (where the dataset has none), datasets. ``split_files``
    (split -> the file its clip names were read from) is named when clips are missing."""
    splits = keep_known_classes(splits, class_names, where)
    named = {split: str(path) for split, path in (split_files or {}).items()}
    if "val" not in splits:
        store = split_store(root, spec)
        train, val = load_or_carve_validation(splits["train"], cfg.val_fraction, store)
        splits = {"train": train, "val": val, "test": splits["test"]}
        check_disjoint(splits, f"{where} with the carved validation split")
        if "train" in named:
            named["val"] = f"{store / 'val_split.csv'}, carved from {named['train']}"
    log.info("%s: %d classes; %s", spec.name, len(class_names),
             ", ".join(f"{len(rows)} {split}" for split, rows in splits.items()))
    try:
        bundle = av_bundle(cfg, root, splits, class_names,
                           audio_path=lambda clip: located[clip][0],
                           frame_dir=lambda clip: located[clip][1], split_files=named)
    except UserError as error:
        if str(root) in str(error):
            raise
        raise UserError(f"{spec.name} at --data-root {root}: {error} (or --audio-root / --frames-root)") from None
    bundle.extras.update(extras or {})
    return bundle


def read_two(folders: list[Path], spec: DatasetSpec, names: dict[str, str],
             reader: Callable[[Path], Rows]) -> tuple[dict[str, Rows], str, dict[str, Path]]:
    """Rows per split, the files as one string for messages, and split -> file."""
    files = {split: find_split_file(folders, spec, name) for split, name in names.items()}
    where = " / ".join(str(path) for path in files.values())
    rows = {split: without_repeats(reader(path), str(path))[0] for split, path in files.items()}
    return rows, where, files


# ---------------------------------------------------------------- the four datasets

def build_cremad(cfg: Config, spec: DatasetSpec) -> DataBundle:
    root = dataset_root(cfg, spec)
    audio_root, frames_root = roots(cfg, root)
    splits, where, files = read_two(split_folders(cfg, spec, root), spec,
                                    {"train": "train.csv", "test": "test.csv"}, fmt.read_cremad)
    check_disjoint(splits, where)
    layout = Layout(lambda source: (audio_root / "AudioWAV", audio_root / "audio"),
                    lambda source: [(frame_root(frames_root), "")])
    located = layout.paths({"all": [row for rows in splits.values() for row in rows]})
    return finish(cfg, spec, root, splits, located, list(fmt.CREMAD_CLASSES), where, split_files=files)


def read_ave_splits(cfg: Config, spec: DatasetSpec, root: Path) -> tuple[dict[str, Rows], str, dict]:
    """The official ``*Set.txt`` files, else the released loader's ``my_*.txt`` lists."""
    folders = split_folders(cfg, spec, root)
    official = any((folder / "trainSet.txt").is_file() for folder in folders)
    released = not official and any((folder / "my_train.txt").is_file() for folder in folders)
    names = ({"train": "my_train.txt", "test": "my_test.txt"} if released else
             {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"})
    reader = fmt.read_ave_released if released else fmt.read_ave_official
    files = {split: find_split_file(folders, spec, name) for split, name in names.items()}
    where = f"the AVE split files in {files['train'].parent}"
    counts, splits, labels = {}, {}, set()
    for split, path in files.items():
        rows = reader(path)
        labels.update(label for _, label in rows)
        # A video with two events is listed twice; the released loader kept the last line.
        splits[split], counts[f"repeated in {split}"] = without_repeats(rows, str(path), keep="last")
    overlaps = drop_evaluation_overlaps(splits, where)
    # Every class the files name (the released stat.txt lists all 28), sorted as released, so
    # indices do not shift when duplicates leave a class without training clips.
    return splits, where, {"ave_duplicates": {**counts, **overlaps}, "classes": sorted(labels), "files": files}


def build_ave(cfg: Config, spec: DatasetSpec) -> DataBundle:
    root = dataset_root(cfg, spec)
    audio_root, frames_root = roots(cfg, root)
    splits, where, extras = read_ave_splits(cfg, spec, root)
    # The released loader reads visual/<VideoID>/; its frame script (and ours) writes Image-01-FPS/.
    layout = Layout(lambda source: (audio_root / "audio",),
                    lambda source: [(frame_root(frames_root), ""), (frames_root / "visual", "")])
    located = layout.paths({"all": [row for rows in splits.values() for row in rows]})
    class_names, files = extras.pop("classes"), extras.pop("files")
    return finish(cfg, spec, root, splits, located, class_names, where, extras, split_files=files)


def build_kinetics_sounds(cfg: Config, spec: DatasetSpec) -> DataBundle:
    root = dataset_root(cfg, spec)
    audio_root, frames_root = roots(cfg, root)
    # Train clips are named ytid_<start>_<end> (six digits each), test clips <ytid>_<N>: name the
    # wavs and frame folders exactly as the split file lists them.
    splits, where, files = read_two(split_folders(cfg, spec, root), spec,
                                    {"train": "my_train.txt", "test": "my_test.txt"}, fmt.read_kinetics)
    check_disjoint(splits, where)
    # The project's scripts: audio/; released: audio_train/ and audio_test/.
    layout = Layout(lambda source: (audio_root / "audio", audio_root / f"audio_{source}"),
                    lambda source: [(frame_root(frames_root), "")])
    located = layout.paths(splits)
    class_names = numeric_range(label for rows in splits.values() for _, label in rows)
    return finish(cfg, spec, root, splits, located, class_names, where, split_files=files)


def build_vggsound(cfg: Config, spec: DatasetSpec) -> DataBundle:
    root = dataset_root(cfg, spec)
    audio_root, frames_root = roots(cfg, root)
    path = find_split_file(split_folders(cfg, spec, root), spec, "vggsound.csv")
    catalogue = {split: without_repeats(rows, str(path))[0] for split, rows in fmt.read_vggsound(path).items()}
    check_disjoint(catalogue, str(path))
    # The project's scripts: audio/, Image-01-FPS/. Released: train-audios/train-set/<clip>.wav
    # and train-videos/train-set-img/Image-01-FPS/<clip>.mp4/ (the folder keeps the video's suffix).
    layout = Layout(
        lambda source: (audio_root / "audio", audio_root / f"{source}-audios" / f"{source}-set"),
        lambda source: [(frame_root(frames_root), ""),
                        (frames_root / f"{source}-videos" / f"{source}-set-img" / "Image-01-FPS", ".mp4")])
    located = layout.paths(catalogue)
    # Released class order: first appearance among the catalogue's training rows.
    class_names = in_first_appearance(label for _, label in catalogue["train"])
    catalogue = keep_known_classes(catalogue, class_names, str(path))
    # The validation split is carved from the whole catalogue, not from what is on disk, so it
    # does not change while extraction progresses.
    train, val = load_or_carve_validation(catalogue["train"], cfg.val_fraction, split_store(root, spec))
    splits = on_disk_only({"train": train, "val": val, "test": catalogue["test"]}, located, path)
    return finish(cfg, spec, root, splits, located, class_names, str(path),
                  split_files={split: path for split in splits})


def on_disk_only(splits: dict[str, Rows], located: dict[str, tuple[str, str]], listing_file: Path) -> dict[str, Rows]:
    """vggsound.csv lists the whole catalogue and many videos have left YouTube, so clips that
    were never downloaded are expected: drop them (counted) instead of failing --max-missing."""
    listing = FolderListing()
    present = {split: [row for row in rows if listing.has(located[row[0]][0]) or listing.has(located[row[0]][1])]
               for split, rows in splits.items()}
    listed, found = sum(map(len, splits.values())), sum(map(len, present.values()))
    if found == 0:
        audio, frames = next(iter(located.values()))
        raise UserError(f"none of the {listed} clips in {listing_file} has a wav in {Path(audio).parent} or "
                        f"frames in {Path(frames).parent}; check --data-root (or --audio-root / --frames-root)")
    if found < listed:
        log.info("VGGSound: %d of %d clips listed in %s are on disk", found, listed, listing_file)
    for split, rows in present.items():
        if not rows:
            raise UserError(f"none of the {split} clips in {listing_file} is on disk; check --data-root")
    return present
