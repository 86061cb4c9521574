"""MER-MULTI feature sequences for the mid-fusion transformers (OLM-Trans).

Layout read here (any dataset in it works, the embedded AVDigitsFeatures included):

    <root>/features/<feature_name>/<sample>.npy   one (T, D) float array per sample and modality
    <root>/features_<split>/<feature_name>/...    a test set's own folder, where the released config
                                                  keeps them (features_test1/..3/); else features/
    <root>/labels.csv                             rows name,emo,val,split (split: train, test1, ...)
    <root>/classes.txt                            optional class order (default: the six MER emotions)

The released ``label-6way.npz`` is read only from a path named with --label-file, because
its dicts need pickle, which can run code hidden in the file.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from datasets.mer_labels import TRAIN_SPLIT, read_labels
from utils.errors import UserError

log = logging.getLogger(__name__)
MER_CLASSES = ("neutral", "angry", "happy", "sad", "worried", "surprise")
MODALITIES = ("audio", "visual", "text")
VALENCE_KEY = "valence"  # inputs["valence"]: (B,) targets, NaN where a sample has none


def parse_modalities(text: str) -> tuple[str, ...]:
    names = tuple(part.strip().lower() for part in str(text).split(",") if part.strip())
    unknown = [name for name in names if name not in MODALITIES]
    if unknown or len(names) < 2 or len(set(names)) != len(names):
        raise UserError(f"--modalities {text!r}: give two or three distinct names out of "
                        f"{', '.join(MODALITIES)}, e.g. audio,visual or audio,visual,text")
    return names


def header_shape(path: Path) -> tuple[int, ...] | None:
    """The array's shape from its .npy header (the data is memory-mapped, not read)."""
    try:
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    except (OSError, ValueError, EOFError):
        return None


@dataclass
class FeatureSample:
    name: str
    label: int
    paths: dict[str, Path]
    valence: float | None = None


def infer_dims(shapes: dict[str, list], feature_dim: int, folders: dict[str, Path]) -> dict[str, int]:
    """Each modality's width: --feature-dim when given, else the most common width of its files."""
    dims = {}
    for modality, found in shapes.items():
        widths = Counter(shape[1] for shape in found if shape is not None and len(shape) == 2)
        if feature_dim > 0:
            dims[modality] = feature_dim
        elif widths:
            dims[modality] = widths.most_common(1)[0][0]
        else:
            raise UserError(f"{folders[modality]} holds no readable (T, D) .npy file for the training samples")
    return dims


def problem(shape, dim: int) -> str | None:
    if shape is None:
        return "missing or unreadable"
    if len(shape) != 2 or shape[1] != dim:
        return f"shape {shape}, expected (T, {dim})"
    if shape[0] < 1:
        return "no time steps"
    return None


def keep_readable(split: str, samples: list[FeatureSample], shapes: dict[str, list], dims: dict[str, int],
                  max_missing: float) -> list[FeatureSample]:
    """Drop samples with a missing, unreadable or wrong-width file; one warning with the count;
    fatal beyond --max-missing, since that means a wrong folder or an unfinished extraction."""
    kept, first_bad = [], None
    for index, sample in enumerate(samples):
        issues = {m: problem(shapes[m][index], dims[m]) for m in dims}
        bad = {m: issue for m, issue in issues.items() if issue}
        if bad:
            first_bad = first_bad or next(f"{sample.paths[m]}: {issue}" for m, issue in bad.items())
        else:
            kept.append(sample)
    skipped = len(samples) - len(kept)
    if skipped:
        message = f"{split}: skipped {skipped} of {len(samples)} samples with a bad feature file (e.g. {first_bad})"
        if skipped / len(samples) > max_missing:
            raise UserError(message + f", more than --max-missing {max_missing:.0%}; check --data-root, the feature names and --feature-dim")
        log.warning(message)
    return kept


class FeatureSequenceDataset(Dataset):
    """Yields ``({modality: (T, D) float tensor}, label)``, or ``None`` when a file cannot be
    read at load time (``collate_padded`` drops and counts those)."""

    def __init__(self, samples: Sequence[FeatureSample], dims: dict[str, int]):
        self.samples = list(samples)
        self.dims = dict(dims)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [s.label for s in self.samples]

    def subset(self, indices) -> "FeatureSequenceDataset":
        return FeatureSequenceDataset([self.samples[i] for i in indices], self.dims)

    @property
    def has_valence(self) -> bool:
        return bool(self.samples) and all(s.valence is not None for s in self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        features = {}
        try:
            for modality, dim in self.dims.items():
                array = np.load(sample.paths[modality], allow_pickle=False)
                if array.ndim != 2 or array.shape[1] != dim or array.shape[0] < 1:
                    raise ValueError(f"{sample.paths[modality]} has shape {array.shape}, expected (T, {dim})")
                if not np.isfinite(array).all():
                    raise ValueError(f"{sample.paths[modality]} holds NaN or infinite values")
                features[modality] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        except Exception as error:  # a corrupt file must cost one sample, not the run
            log.warning("skipping sample %s: %s", sample.name, error)
            return None
        valence = float("nan") if sample.valence is None else sample.valence
        features[VALENCE_KEY] = torch.tensor(valence, dtype=torch.float32)
        return features, sample.label


def collate_padded(batch):
    """Zero-pad each modality to the batch's longest sequence; masks are True on real steps.
    Returns (inputs, labels, skipped) like ``collate_skipping_bad``, so the loop accepts it."""
    good = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, skipped
    inputs = {"masks": {}}
    if VALENCE_KEY in good[0][0]:
        inputs[VALENCE_KEY] = torch.stack([features[VALENCE_KEY] for features, _ in good])
    for modality in (m for m in good[0][0] if m != VALENCE_KEY):
        sequences = [features[modality] for features, _ in good]
        lengths = torch.tensor([len(s) for s in sequences])
        inputs[modality] = pad_sequence(sequences, batch_first=True)
        inputs["masks"][modality] = torch.arange(inputs[modality].shape[1])[None, :] < lengths[:, None]
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return inputs, labels, skipped


@dataclass
class FeatureData:
    """The cross-validation pool, the labelled test sets and what the model needs to know."""

    pool: FeatureSequenceDataset
    tests: dict[str, FeatureSequenceDataset]
    class_names: list[str]
    modalities: tuple[str, ...]
    input_dims: dict[str, int]
    root: Path
    skipped: dict[str, int] = field(default_factory=dict)


def feature_names(cfg) -> dict[str, str]:
    return {"audio": cfg.audio_feature, "visual": cfg.visual_feature, "text": cfg.text_feature}


def split_folders(cfg, root: Path, modalities: Sequence[str], split: str) -> dict[str, Path]:
    """A test set's feature folders: ``features_<split>/<name>`` where that exists (the released
    layout for test1..3), else the shared ``features/<name>``."""
    names = feature_names(cfg)
    own = {m: Path(root) / f"features_{split}" / names[m] for m in modalities}
    return {m: own[m] if own[m].is_dir() else Path(root) / "features" / names[m] for m in modalities}


def feature_folders(cfg, root: Path, modalities: Sequence[str]) -> dict[str, Path]:
    names = feature_names(cfg)
    folders = {m: Path(root) / "features" / names[m] for m in modalities}
    for modality, folder in folders.items():
        if not folder.is_dir():
            raise UserError(f"feature folder {folder} does not exist (--{modality}-feature {names[modality]}, "
                            f"--data-root {root})")
    return folders


def read_class_names(root: Path) -> list[str]:
    path = Path(root) / "classes.txt"
    if path.is_file():
        return [line.strip().lower() for line in path.read_text().splitlines() if line.strip()]
    return list(MER_CLASSES)


def load_feature_data(cfg, root: Path) -> FeatureData:
    """Labels + feature folders under ``root`` -> the pool and test sets, bad files dropped."""
    root = Path(root)
    modalities = parse_modalities(cfg.modalities)
    folders = feature_folders(cfg, root, modalities)
    class_names = read_class_names(root)
    index = {name: i for i, name in enumerate(class_names)}
    by_split: dict[str, list[FeatureSample]] = {}
    folders_of: dict[str, dict[str, Path]] = {}
    for entry in read_labels(root, cfg.label_file):
        if entry.emotion not in index:
            raise UserError(f"sample {entry.name} has the label {entry.emotion!r}, not one of {', '.join(class_names)}")
        if entry.split not in folders_of:
            folders_of[entry.split] = split_folders(cfg, root, modalities, entry.split)
        where = folders if entry.split == TRAIN_SPLIT else folders_of[entry.split]
        paths = {m: where[m] / f"{entry.name}.npy" for m in modalities}
        by_split.setdefault(entry.split, []).append(
            FeatureSample(entry.name, index[entry.emotion], paths, entry.valence))
    shapes = {split: {m: [header_shape(s.paths[m]) for s in samples] for m in modalities}
              for split, samples in by_split.items()}
    dims = infer_dims({m: shapes[TRAIN_SPLIT][m] for m in modalities}, cfg.feature_dim, folders)
    datasets, skipped = {}, {}
    for split, samples in by_split.items():
        if split != TRAIN_SPLIT and all(s is None for m in modalities for s in shapes[split][m]):
            log.warning("%s: none of its %d samples has feature files; it is not scored", split, len(samples))
            continue
        kept = keep_readable(split, samples, shapes[split], dims, cfg.max_missing)
        skipped[split] = len(samples) - len(kept)
        datasets[split] = FeatureSequenceDataset(kept, dims)
    pool = datasets.pop(TRAIN_SPLIT)
    return FeatureData(pool=pool, tests=dict(sorted(datasets.items())), class_names=class_names,
                       modalities=modalities, input_dims=dims, root=root, skipped=skipped)


def build_mer(cfg, spec) -> FeatureData:
    """Builder named in config.py for MER-MULTI (root: --data-root, $OLM_MERMULTI_ROOT, $OLM_DATA_ROOT/MERMULTI)."""
    root = Path(cfg.data_root).expanduser() if cfg.data_root else spec.default_root()
    if not Path(root).is_dir():
        raise UserError(f"dataset folder {root} does not exist (--data-root or ${spec.root_env})")
    return load_feature_data(cfg, root)
