"""On-disk cache of spectrograms, so only the first epoch pays for decoding and the STFT.

Layout: ``cache_home()/spectrograms/<root hash>/<recipe key>/<clip path>.npz``. Each entry
stores the spectrogram with the wav's size and modification time; an entry whose stamp no
longer matches its wav (the file was re-extracted or edited) is recomputed and replaced.
Entries are written to a unique temporary file and renamed into place, so DataLoader
workers (or several runs) filling the same cache never read a half-written file.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import numpy as np

from datasets import audio
from datasets.audio import AudioRecipe

log = logging.getLogger(__name__)

# Bump when datasets/audio.py changes what a recipe computes, so old entries stop matching.
FORMAT_VERSION = 2  # 2: reflect-padded STFT (librosa 0.8's default, as released)


def short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def wav_stamp(path: Path) -> np.ndarray:
    info = os.stat(path)
    return np.array([info.st_size, info.st_mtime_ns], dtype=np.int64)


class SpectrogramCache:
    """``(wav_path, recipe) -> np.ndarray``, computed once per clip and recipe.

    A plain class (not a closure) so it pickles into DataLoader worker processes.
    """

    def __init__(self, root: Path, cache_dir: Path | None = None):
        from datasets.registry import cache_home

        self.root = Path(root).expanduser().resolve()
        base = Path(cache_dir) if cache_dir is not None else cache_home() / "spectrograms"
        self.folder = base / short_hash(str(self.root))
        self.writable = True  # turned off after the first failed write (read-only cache, full disk)

    def entry_path(self, wav_path: Path, recipe: AudioRecipe) -> Path:
        wav_path = Path(wav_path).resolve()
        try:
            relative = wav_path.relative_to(self.root).with_suffix("")
        except ValueError:  # a wav outside the dataset root: keep it apart from the root's clips
            relative = Path("_outside") / f"{wav_path.stem}-{short_hash(str(wav_path))}"
        return self.folder / f"v{FORMAT_VERSION}-{recipe.key()}" / relative.parent / f"{relative.name}.npz"

    def __call__(self, wav_path, recipe: AudioRecipe) -> np.ndarray:
        stamp = wav_stamp(wav_path)  # a missing wav raises here, as the uncached path would
        entry = self.entry_path(wav_path, recipe)
        cached = self.read(entry, stamp)
        if cached is not None:
            return cached
        spectrogram = audio.wav_to_spectrogram(wav_path, recipe)
        if self.writable:
            self.write(entry, spectrogram, stamp)
        return spectrogram

    def has(self, wav_path, recipe: AudioRecipe) -> bool:
        """Is there an entry for this clip (stale or not)? A cheap check, no read."""
        return self.entry_path(wav_path, recipe).is_file()

    @staticmethod
    def read(entry: Path, stamp: np.ndarray) -> np.ndarray | None:
        try:
            with np.load(entry, allow_pickle=False) as stored:
                if np.array_equal(stored["stamp"], stamp):
                    return stored["spectrogram"]
        except FileNotFoundError:
            return None
        except Exception as error:  # a damaged entry only costs a recomputation
            log.warning("recomputing damaged spectrogram cache entry %s: %s", entry, error)
        return None

    def write(self, entry: Path, spectrogram: np.ndarray, stamp: np.ndarray) -> None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            self.describe_root()
            handle, temporary = tempfile.mkstemp(dir=entry.parent, prefix=f".{entry.stem}-", suffix=".tmp")
            try:
                with os.fdopen(handle, "wb") as out:
                    np.savez(out, spectrogram=spectrogram, stamp=stamp)
                os.replace(temporary, entry)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError as error:
            self.writable = False
            log.warning("spectrogram cache disabled: cannot write under %s (%s); set $OLM_CACHE "
                        "or pass --no-spec-cache", self.folder, error)

    def describe_root(self) -> None:
        """A note naming the dataset root, so a person can tell the hashed folders apart."""
        note = self.folder / "root.txt"
        if not note.exists():
            note.write_text(f"{self.root}\n")


def cached_spectrogram_fn(root) -> SpectrogramCache:
    """The spectrogram function the datasets use when ``--spec-cache`` is on (the default)."""
    return SpectrogramCache(Path(root))
