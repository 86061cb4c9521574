"""The shared audio-visual clip dataset: a wav file and a folder of frames per clip.

Every late-fusion dataset (AV-Digits, CREMA-D, AVE, Kinetics-Sounds, VGGSound) reduces to a
list of ``AVClip`` records; this module turns them into tensors with the shared recipe.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import torch
from torch.utils.data import Dataset, default_collate
from torchvision.transforms import v2

from datasets.audio import AudioRecipe, warm_up, wav_to_spectrogram
from utils.errors import UserError

log = logging.getLogger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class AVClip:
    """One clip. The locations may be given as strings: a catalogue of 200,000 clips is
    built much faster without a Path object per file (the properties make one on use)."""

    name: str
    label: int
    audio_file: str | Path
    frame_folder: str | Path

    @property
    def audio_path(self) -> Path:
        return Path(self.audio_file)

    @property
    def frame_dir(self) -> Path:
        return Path(self.frame_folder)


@dataclass(frozen=True)
class VisualRecipe:
    frames_per_clip: int = 1
    image_size: int = 224
    augment: bool = True  # RandomResizedCrop + horizontal flip in training


def list_frames(frame_dir: Path) -> list[Path]:
    """Frame files of a clip, in time order (zero-padded names sort as time)."""
    try:
        return sorted(p for p in Path(frame_dir).iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    except OSError:
        return []


class FolderListing:
    """Names in a folder, read with one directory listing and remembered: checking 200,000
    clips costs one listing per folder instead of a ``stat`` per clip."""

    def __init__(self):
        self.names: dict[str, frozenset[str]] = {}

    def __call__(self, folder) -> frozenset[str]:
        key = os.fspath(folder)
        names = self.names.get(key)
        if names is None:
            try:
                with os.scandir(key) as entries:
                    names = frozenset(entry.name for entry in entries)
            except OSError:
                names = frozenset()
            self.names[key] = names
        return names

    def has(self, path) -> bool:
        # String splitting, not Path.parent: building Path objects would dominate at 200k clips.
        folder, _, name = os.fspath(path).rpartition(os.sep)
        return name in self(folder or os.sep)


def keep_available(clips: Sequence[AVClip], split: str, max_missing: float,
                   listing: FolderListing | None = None, split_file: str | Path | None = None) -> list[AVClip]:
    """Drop clips whose wav or frame folder is missing; warn once with the count; fail beyond
    ``max_missing`` (a fraction) since that means a wrong root or an unfinished extraction.
    ``split_file``, where the clip names came from, is named in the messages: a file whose
    names differ from the files on disk (Kinetics-Sounds' test clips are ``<ytid>_<N>``)
    shows up as every clip missing.

    Presence is read from the folders' listings (linear in the clips). A frame folder that
    exists but holds no image costs its sample at load time, skipped and counted there."""
    split = f"{split} split" + (f" (clip names from {split_file})" if split_file else "")
    listing = listing or FolderListing()
    kept, first_missing = [], None
    for clip in clips:
        if listing.has(clip.audio_file) and listing.has(clip.frame_folder):
            kept.append(clip)
        elif first_missing is None:
            first_missing = clip
    missing = len(clips) - len(kept)
    if not clips or not kept:
        where = f" (e.g. none of {clips[0].audio_path}, {clips[0].frame_dir})" if clips else ""
        raise UserError(f"the {split} has no usable clips{where}; check --data-root")
    if missing:
        message = (f"{split}: skipped {missing} of {len(clips)} clips with a missing wav or frame "
                   f"folder (e.g. {first_missing.audio_path} / {first_missing.frame_dir})")
        if missing / len(clips) > max_missing:
            raise UserError(message + f", more than --max-missing {max_missing:.0%}; check --data-root")
        log.warning(message)
    return kept


def frame_indices(available: int, wanted: int, train: bool, generator: torch.Generator | None) -> list[int]:
    """Training: random distinct frames in time order. Evaluation: the centre frame of each of
    ``wanted`` equal segments of the clip, the same on every run (the released code drew
    random frames here too; the first frame is often black or a fade-in)."""
    if train:
        if available >= wanted:
            return sorted(torch.randperm(available, generator=generator)[:wanted].tolist())
        return sorted(torch.randint(available, (wanted,), generator=generator).tolist())
    return [(2 * i + 1) * available // (2 * wanted) for i in range(wanted)]


def frame_transform(recipe: VisualRecipe, train: bool) -> Callable:
    size = recipe.image_size
    if train and recipe.augment:
        geometry = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize((size, size), antialias=True)]
    # Crop and resize the uint8 image before converting: several times cheaper than resizing floats.
    return v2.Compose([*geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def read_frame(path: Path) -> torch.Tensor:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"unreadable image {path}")
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    # uint8 (3, H, W) left in the decoder's pixel-interleaved memory (a channels-last view):
    # torch's antialiased uint8 resize works in that layout, so RandomResizedCrop skips a copy
    # (bench_loader.py: the training frame transform about 1.5x faster; identical output).
    return torch.from_numpy(image).permute(2, 0, 1)


class AVClipDataset(Dataset):
    """Yields ``({"audio": (1, F, T), "visual": (K, 3, S, S)}, label)``, or ``None`` for a
    clip whose files cannot be read (``collate_skipping_bad`` drops and counts those)."""

    def __init__(self, clips: Sequence[AVClip], audio: AudioRecipe, visual: VisualRecipe,
                 train: bool, spectrogram_fn: Callable | None = None):
        self.clips = list(clips)
        self.audio = audio
        self.visual = visual
        self.train = train
        self.transform = frame_transform(visual, train)
        # The spectrogram function is swappable so a disk cache can wrap the recipe.
        self.spectrogram_fn = spectrogram_fn or wav_to_spectrogram

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def labels(self) -> list[int]:
        return [c.label for c in self.clips]

    def prepare_for_workers(self) -> None:
        """Called where the loader workers will be started: when spectrograms still have to be
        computed (judged by the first clip's cache entry), load the decoding libraries here."""
        has = getattr(self.spectrogram_fn, "has", None)
        if self.clips and not (has and has(self.clips[0].audio_path, self.audio)):
            warm_up(self.audio)

    def load_frames(self, clip: AVClip) -> torch.Tensor:
        frames = list_frames(clip.frame_dir)
        if not frames:
            raise ValueError(f"no frames in {clip.frame_dir}")
        picks = frame_indices(len(frames), self.visual.frames_per_clip, self.train, None)
        return torch.stack([self.transform(read_frame(frames[i])) for i in picks])

    def __getitem__(self, index: int):
        clip = self.clips[index]
        try:
            spectrogram = torch.from_numpy(self.spectrogram_fn(clip.audio_path, self.audio))
            frames = self.load_frames(clip)
        except Exception as error:  # a corrupt file must cost one sample, not the run
            log.warning("skipping clip %s: %s", clip.name, error)
            return None
        return {"audio": spectrogram.unsqueeze(0), "visual": frames}, clip.label


def collate_skipping_bad(batch):
    """default_collate over the readable samples; returns (inputs, labels, skipped)."""
    good = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(good)
    if not good:
        return None, None, skipped
    inputs, labels = default_collate(good)
    return inputs, labels, skipped
