"""Dataset builders: config -> DataBundle (train/val/test datasets and class names).

``config.py`` names a builder per dataset as "module:function"; it is imported only when that
dataset is used, so a missing optional dependency of one dataset never breaks another.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from torch.utils.data import Dataset

from datasets.registry import DatasetSpec, cache_home
from datasets.audio import AudioRecipe
from datasets.av_base import AVClip, AVClipDataset, VisualRecipe, collate_skipping_bad, keep_available
from datasets.splits import class_index, read_clip_labels
from utils.errors import UserError

if TYPE_CHECKING:  # the run's options; datasets sit below config and never import it
    from config import Config


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset
    test: Dataset
    class_names: list[str]
    modalities: tuple[str, ...] = ("audio", "visual")
    collate_fn: Callable = collate_skipping_bad
    root: Path | None = None
    extras: dict = field(default_factory=dict)


def build_data(cfg: Config, spec: DatasetSpec) -> DataBundle:
    module_name, function_name = spec.builder.split(":")
    builder = getattr(importlib.import_module(module_name), function_name)
    return builder(cfg, spec)


def audio_recipe(cfg: Config) -> AudioRecipe:
    return AudioRecipe(sample_rate=cfg.sample_rate, seconds=cfg.audio_seconds, n_fft=cfg.n_fft,
                       hop_length=cfg.hop_length, num_frames=cfg.spec_frames)


def visual_recipe(cfg: Config) -> VisualRecipe:
    return VisualRecipe(frames_per_clip=cfg.fps, image_size=cfg.image_size, augment=cfg.augment)


def spectrogram_function(cfg: Config, root: Path):
    """The recipe's STFT, wrapped in the on-disk cache when it is enabled and available."""
    if not cfg.spec_cache:
        return None
    try:
        from datasets.spec_cache import cached_spectrogram_fn
    except ImportError:
        return None
    return cached_spectrogram_fn(root)


def av_bundle(cfg: Config, root: Path, splits: dict[str, Sequence[tuple[str, str]]],
              class_names: Sequence[str], audio_path: Callable[[str], Path],
              frame_dir: Callable[[str], Path], split_files: dict[str, str] | None = None) -> DataBundle:
    """Turn ``split -> [(clip, label_name)]`` into AV datasets on the shared recipe;
    ``split_files`` (split -> the file its clip names came from) goes into missing-clip messages."""
    index = class_index(class_names)
    audio, visual = audio_recipe(cfg), visual_recipe(cfg)
    spec_fn = spectrogram_function(cfg, root)
    datasets = {}
    for split, rows in splits.items():
        unknown = sorted({label for _, label in rows if label not in index})
        if unknown:
            raise UserError(f"the {split} split has labels absent from the class list: {unknown[:5]}")
        clips = [AVClip(name, index[label], audio_path(name), frame_dir(name)) for name, label in rows]
        clips = keep_available(clips, split, cfg.max_missing, split_file=(split_files or {}).get(split))
        datasets[split] = AVClipDataset(clips, audio, visual, train=(split == "train"), spectrogram_fn=spec_fn)
    return DataBundle(datasets["train"], datasets["val"], datasets["test"], list(class_names), root=root)


def frames_folder(root: Path, fps_kept: int = 1) -> Path:
    """Where preprocessing wrote frames: ``Image-01-FPS`` for one frame per second kept."""
    return Path(root) / f"Image-{fps_kept:02d}-FPS"


def build_avdigits(cfg: Config, spec: DatasetSpec, params: dict | None = None) -> DataBundle:
    """AV-Digits (``params``: materialization knobs, the defaults when None) built once under
    the cache; a --data-root holding a materialized AV-Digits is read with its own knobs."""
    from datasets import avdigits

    params = dict(params or {})
    root = Path(cfg.data_root).expanduser() if cfg.data_root else spec.default_root()
    if root is None:
        root = cache_home() / f"{spec.name}-{avdigits.params_key(**params)}"
    else:
        saved = avdigits.read_marker(root)
        params = avdigits.params_from_marker(saved) if saved else params
    root = avdigits.materialize(root, **params)
    class_names = [line.strip() for line in (root / "classes.txt").read_text().splitlines() if line.strip()]
    splits = {split: read_clip_labels(root / f"{split}.csv") for split in ("train", "val", "test")}
    frames = frames_folder(root)
    return av_bundle(cfg, root, splits, class_names,
                     audio_path=lambda clip: root / "audio" / f"{clip}.wav",
                     frame_dir=lambda clip: frames / clip)


def build_avdigits_imbalanced(cfg: Config, spec: DatasetSpec) -> DataBundle:
    """AV-Digits with a slow visual modality and a fast audio one (``avdigits.IMBALANCED``)."""
    from datasets import avdigits

    return build_avdigits(cfg, spec, avdigits.IMBALANCED)
