"""AVDigitsFeatures: the embedded AV-Digits set turned into MER-style feature sequences, so
main_trans.py and the run_trans scripts work with no download.

Built once, atomically, from an AV-Digits folder (datasets/avdigits.py) into the layout that
datasets/mer.py reads:

    <root>/features/logmel-40/<clip>.npy    audio: 40 log-mel bands every 25 ms, trimmed to the
                                            loud part of the clip, so lengths vary (T, 40)
    <root>/features/rows-8/<clip>.npy       visual: the 8 rows of the clip's frames, averaged and
                                            brought back to the digit's native 8x8 grid (8, 8)
    <root>/features/noisy-tokens/<clip>.npy text: 3-8 noisy one-hot tokens, some naming the digit (T, 12)
    <root>/labels.csv, classes.txt          train = AV-Digits train + val (the fold pool), test1 = test
"""
from __future__ import annotations

import csv
import json
import logging
import os
import zlib
from pathlib import Path

import numpy as np

from datasets.registry import cache_home
from utils.atomic_dir import build_folder_atomically
from utils.errors import UserError

log = logging.getLogger(__name__)
FORMAT_VERSION = 1                   # bump when the features or the layout change
MARKER_NAME = ".features.json"
FEATURE_NAMES = {"audio": "logmel-40", "visual": "rows-8", "text": "noisy-tokens"}
SPLIT_OF = {"train": "train", "val": "train", "test": "test1"}

# Audio: 16 kHz wav -> 40 mel bands, 25 ms windows without overlap (about 40 steps a clip),
# then the steps within TRIM_DB of the loudest one, never fewer than MIN_AUDIO_STEPS.
N_MELS, N_FFT, HOP = 40, 512, 400
TRIM_DB, MIN_AUDIO_STEPS = 6.0, 8
# Visual: averaging the noisy views and returning to the 8x8 grid the digits were drawn on keeps
# the information in 8 row tokens; a transformer learned far slower from patches of each frame.
GRID = 8
# Text: tokens over 10 digit words + 2 fillers; a token names the true digit with this chance.
TEXT_VOCAB, TEXT_HIT, TEXT_NOISE, TEXT_STEPS = 12, 0.3, 0.2, (3, 8)


def audio_steps(wav_path: Path) -> np.ndarray:
    import librosa
    import soundfile as sf

    samples, rate = sf.read(str(wav_path), dtype="float32", always_2d=False)
    if samples.ndim != 1 or samples.size < N_FFT:
        raise ValueError(f"{wav_path} is not a mono clip of at least {N_FFT} samples")
    mel = librosa.feature.melspectrogram(y=samples, sr=rate, n_fft=N_FFT, win_length=HOP, hop_length=HOP,
                                         n_mels=N_MELS)
    energy_db = 10 * np.log10(mel.sum(axis=0) + 1e-10)
    loud = np.nonzero(energy_db >= energy_db.max() - TRIM_DB)[0]
    start, stop = int(loud[0]), int(loud[-1]) + 1
    while stop - start < min(MIN_AUDIO_STEPS, mel.shape[1]):  # widen short words symmetrically
        start, stop = max(0, start - 1), min(mel.shape[1], stop + 1)
    return np.log(mel[:, start:stop].T + 1e-6).astype(np.float32)


def visual_steps(frame_dir: Path) -> np.ndarray:
    import cv2

    frames = sorted(p for p in Path(frame_dir).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not frames:
        raise ValueError(f"no frames in {frame_dir}")
    images = []
    for path in frames:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise ValueError(f"unreadable image {path}")
        images.append(image.astype(np.float32) / 255.0)
    mean = np.mean(images, axis=0)
    return cv2.resize(mean, (GRID, GRID), interpolation=cv2.INTER_AREA).astype(np.float32)


def text_steps(clip: str, label: int) -> np.ndarray:
    # Seeded by the clip name so the tokens do not depend on the order clips are converted in.
    rng = np.random.default_rng([FORMAT_VERSION, zlib.crc32(clip.encode())])
    length = int(rng.integers(TEXT_STEPS[0], TEXT_STEPS[1] + 1))
    tokens = np.where(rng.random(length) < TEXT_HIT, label, rng.integers(0, TEXT_VOCAB, length))
    steps = np.eye(TEXT_VOCAB, dtype=np.float32)[tokens]
    return steps + rng.normal(0.0, TEXT_NOISE, steps.shape).astype(np.float32)


def source_rows(source: Path) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(class names, [(clip, label, MER split)]) from an AV-Digits folder."""
    classes_file = source / "classes.txt"
    if not classes_file.is_file():
        raise UserError(f"{source} is not an AV-Digits folder: {classes_file} is missing")
    class_names = [line.strip() for line in classes_file.read_text().splitlines() if line.strip()]
    rows = []
    for split, target in SPLIT_OF.items():
        with (source / f"{split}.csv").open(newline="") as handle:
            rows += [(r[0].strip(), r[1].strip(), target) for r in csv.reader(handle) if len(r) >= 2]
    return class_names, rows


def write_features(source: Path, folder: Path) -> dict:
    """Convert every clip into ``folder`` (empty, not yet visible under its final name)."""
    from tqdm import tqdm

    class_names, rows = source_rows(source)
    index = {name: i for i, name in enumerate(class_names)}
    features, kept, skipped = {m: {} for m in FEATURE_NAMES}, [], []
    for clip, label, split in tqdm(rows, desc="AV-Digits -> feature sequences", unit="clip"):
        try:
            features["audio"][clip] = audio_steps(source / "audio" / f"{clip}.wav")
            features["visual"][clip] = visual_steps(source / "Image-01-FPS" / clip)
            features["text"][clip] = text_steps(clip, index[label])
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            skipped.append(f"{clip}: {error}")
            continue
        kept.append((clip, label, split))
    if skipped:
        log.warning("AV-Digits features: skipped %d unreadable clips (first: %s)", len(skipped), skipped[0])
    # Standardise audio and visual with the fold pool's statistics: log energies and pixel
    # intensities sit far from zero, which slowed learning.
    stats = {}
    for modality in ("audio", "visual"):
        pool = np.concatenate([features[modality][c] for c, _, s in kept if s == "train"])
        stats[modality] = pool.mean(axis=0), pool.std(axis=0) + 1e-6
    for modality, name in FEATURE_NAMES.items():
        (folder / "features" / name).mkdir(parents=True)
        for clip, array in features[modality].items():
            if modality in stats:
                array = (array - stats[modality][0]) / stats[modality][1]
            np.save(folder / "features" / name / f"{clip}.npy", array.astype(np.float32))
    with (folder / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["name", "emo", "val", "split"])
        writer.writerows((clip, label, "", split) for clip, label, split in kept)
    (folder / "classes.txt").write_text("".join(f"{name}\n" for name in class_names))
    return {"samples": len(kept), "skipped": len(skipped)}


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def expected_marker(source: Path) -> dict:
    # The source's own marker names its knobs and asset fingerprint: a rebuilt source rebuilds this.
    return {"format_version": FORMAT_VERSION, "source": str(source),
            "source_marker": read_json(source / ".materialized.json")}


def is_current(marker, expected: dict) -> bool:
    return marker is not None and all(marker.get(k) == v for k, v in expected.items())


def convert(source: Path, root: Path, force: bool = False) -> Path:
    """Write the features of AV-Digits folder ``source`` into ``root`` once; later calls return
    at once. Built in a hidden sibling folder and renamed, so ``root`` is never half-written."""
    source, root = Path(source), Path(root).expanduser()
    expected = expected_marker(source)
    marker = read_json(root / MARKER_NAME)
    if not force and is_current(marker, expected):
        return root
    if root.exists() and (not root.is_dir() or (marker is None and any(root.iterdir()))):
        raise UserError(f"refusing to replace {root}: it exists and holds no {MARKER_NAME}; choose another --data-root")

    def build(staging: Path) -> None:
        counts = write_features(source, staging)
        (staging / MARKER_NAME).write_text(json.dumps({**expected, **counts}, indent=2) + "\n")

    return build_folder_atomically(root, build, lambda: is_current(read_json(root / MARKER_NAME), expected))


def build_avdigits_features(cfg, spec):
    """Builder named in config.py: materialize AV-Digits, convert it, load it as MER features."""
    from datasets import avdigits
    from datasets.mer import load_feature_data

    try:
        source = avdigits.materialize(cache_home() / f"AVDigits-{avdigits.params_key()}")
    except avdigits.AVDigitsError as error:
        raise UserError(str(error)) from None
    if cfg.data_root:
        root = Path(cfg.data_root).expanduser()
    elif os.environ.get(spec.root_env):
        root = Path(os.environ[spec.root_env]).expanduser()
    else:
        root = cache_home() / f"AVDigitsFeatures-{avdigits.params_key()}-v{FORMAT_VERSION}"
    return load_feature_data(cfg, convert(source, root))
