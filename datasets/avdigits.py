"""AV-Digits: the small audio-visual digit set that ships with the project.

Each of scikit-learn's 1,797 handwritten 8x8 digit images becomes one sample, paired
with a spoken clip of the same digit from the espeak-ng recordings kept under
`data/AVDigits/` (made once by `data/AVDigits/synthesize.py`). `materialize` writes
the samples in the layout of the real audio-visual datasets:

    <root>/audio/<clip>.wav                 16 kHz mono PCM16, 1.0 s
    <root>/Image-01-FPS/<clip>/00000.jpg    frames_per_clip noisy views of the image
    <root>/train.csv, val.csv, test.csv     lines `clip,label` (no header)
    <root>/classes.txt, meta.csv, .materialized.json

Recordings are split by voice, so val/test audio always comes from voices that the
training split never hears. The noise knobs set how informative each modality is.
"""

import csv
import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np

from datasets.audio import write_wav
from utils.atomic_dir import build_folder_atomically
from utils.errors import UserError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "data" / "AVDigits"
CLASS_NAMES = ("zero", "one", "two", "three", "four",
               "five", "six", "seven", "eight", "nine")
SPLIT_NAMES = ("train", "val", "test")
SAMPLE_RATE = 16000
CLIP_SAMPLES = SAMPLE_RATE          # every wav is exactly 1.0 s
MIX_PEAK = 0.9                      # mixtures are rescaled to this peak; SNR is unchanged
NATIVE_SIZE = 8                     # load_digits images are 8x8, intensities 0..16
JPEG_QUALITY = 95
FORMAT_VERSION = 1                  # bump when the written layout or rendering changes
MARKER_NAME = ".materialized.json"

# Defaults. Audio noise is white noise at an SNR drawn per sample from the range
# (relative to the spoken word's own power); visual noise is Gaussian on the native
# 8x8 grid in [0, 1] intensity units before upsampling, so difficulty does not depend
# on image_size; occlusion blanks a random square covering that fraction of the side.
# Chosen with benchmarks/avdigits_probe.py (4-layer CNN, 15 epochs, seed 0): audio
# alone ~94-96% test (100% clean, ~92% at -5..5 dB), vision alone ~77-81% (~89% at
# noise 0.5); occlusion 0.5 on top of noise 0.6 drops vision to ~55%, so it is off.
DEFAULT_SEED = 0
DEFAULT_AUDIO_SNR_DB = (0.0, 10.0)
DEFAULT_VISUAL_NOISE_STD = 0.6
DEFAULT_VISUAL_OCCLUSION = 0.0
DEFAULT_FRAMES_PER_CLIP = 3
DEFAULT_IMAGE_SIZE = 32
DEFAULT_SPLIT = (0.7, 0.15, 0.15)
# AVDigitsImbalanced (issue 18): clean audio, which every head fits within an epoch, and a
# visual digit placed anywhere on a 12x12 board, which takes many epochs to find; chosen
# by benchmarks/imbalance_search.py (docs/results/imbalance-selection.md).
IMBALANCED = dict(audio_snr_db=None, visual_noise_std=0.3, canvas=12, clutter=0, image_size=24)
NUM_IMAGES = 1797   # scikit-learn's digits
MIN_IMAGES = 100    # a stratified subset (images=N) keeps every class in every split

logger = logging.getLogger(__name__)


class AVDigitsError(UserError):
    """A problem the user can fix (bad argument, missing or corrupt asset, bad root)."""


def resolve_params(seed=DEFAULT_SEED, audio_snr_db=DEFAULT_AUDIO_SNR_DB,
                   visual_noise_std=DEFAULT_VISUAL_NOISE_STD,
                   visual_occlusion=DEFAULT_VISUAL_OCCLUSION,
                   frames_per_clip=DEFAULT_FRAMES_PER_CLIP,
                   image_size=DEFAULT_IMAGE_SIZE, split=DEFAULT_SPLIT, images=None,
                   canvas=None, clutter=None) -> dict:
    """Validate the knobs and return them as plain JSON types (audio_snr_db None = clean)."""
    def check(knob, value, wanted, predicate):
        try:
            ok = bool(predicate(value))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise AVDigitsError(f"AV-Digits knob {knob} must be {wanted}, got {value!r}.")

    check("seed", seed, "a non-negative integer", lambda v: int(v) == v and v >= 0)
    if audio_snr_db is not None:
        check("audio_snr_db", audio_snr_db, "None or a finite (low, high) pair in dB",
              lambda v: len(v) == 2 and np.all(np.isfinite(np.asarray(v, dtype=float)))
              and v[0] <= v[1])
        audio_snr_db = [float(audio_snr_db[0]), float(audio_snr_db[1])]
    check("visual_noise_std", visual_noise_std, ">= 0", lambda v: v >= 0)
    check("visual_occlusion", visual_occlusion, "in [0, 1)", lambda v: 0 <= v < 1)
    check("frames_per_clip", frames_per_clip, "an integer from 1 to 99999",
          lambda v: int(v) == v and 1 <= v <= 99999)
    check("image_size", image_size, f"an integer >= {NATIVE_SIZE}",
          lambda v: int(v) == v and v >= NATIVE_SIZE)
    check("split", split, "three positive fractions (train, val, test) summing to 1",
          lambda v: len(v) == 3 and min(v) > 0 and abs(sum(v) - 1) < 1e-6)
    params = {"seed": int(seed), "audio_snr_db": audio_snr_db,
              "visual_noise_std": float(visual_noise_std),
              "visual_occlusion": float(visual_occlusion),
              "frames_per_clip": int(frames_per_clip), "image_size": int(image_size),
              "split": [float(f) for f in split]}
    if images is not None:  # absent by default, so the full set's cache key stays as it was
        check("images", images, f"None or an integer from {MIN_IMAGES} to {NUM_IMAGES}",
              lambda v: int(v) == v and MIN_IMAGES <= v <= NUM_IMAGES)
        params["images"] = int(images)
    # The imbalanced setting's knobs, absent by default like images (the default key stays).
    if canvas is not None:
        check("canvas", canvas, f"an integer from {NATIVE_SIZE} to 64", lambda v: int(v) == v and NATIVE_SIZE <= v <= 64)
        params["canvas"] = int(canvas)
    if clutter is not None:
        check("clutter", clutter, "an integer from 0 to 64", lambda v: int(v) == v and 0 <= v <= 64)
        params["clutter"] = int(clutter)
    return params


def params_key(**params) -> str:
    """Short stable hash of the knobs, for keying a cache folder per setting."""
    canonical = json.dumps({"format_version": FORMAT_VERSION, **resolve_params(**params)},
                           sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def read_assets(assets_dir: Path):
    """Return (fingerprint, rows): the manifest rows with each clip's file bytes attached.

    The fingerprint hashes the manifest and every clip, so re-synthesized assets
    trigger a rebuild even when the knobs did not change.
    """
    manifest = assets_dir / "clips.csv"
    if not manifest.is_file():
        raise AVDigitsError(f"AV-Digits assets not found: {manifest} is missing "
                            "(restore data/AVDigits/ or run data/AVDigits/synthesize.py).")
    digest = hashlib.sha256(manifest.read_bytes())
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"file", "digit", "voice"} <= set(rows[0]):
        raise AVDigitsError(f"{manifest} is not an AV-Digits manifest "
                            "(it needs the columns file, digit, voice).")
    for row in rows:
        try:
            row["raw"] = (assets_dir / row["file"]).read_bytes()
        except OSError:
            row["raw"] = b""
        digest.update(row["file"].encode() + b"\0" + row["raw"])
    return digest.hexdigest()[:16], rows


def decode_clips(rows, assets_dir: Path):
    """Decode the manifest rows; unreadable or malformed clips are skipped and counted."""
    import soundfile as sf

    clips, skipped = [], []
    for row in rows:
        try:
            samples, rate = sf.read(io.BytesIO(row["raw"]), dtype="float32")
        except (RuntimeError, sf.LibsndfileError):
            skipped.append(row["file"])
            continue
        if rate != SAMPLE_RATE or samples.ndim != 1 or row["digit"] not in CLASS_NAMES:
            skipped.append(row["file"])
            continue
        clips.append({"digit": row["digit"], "voice": row["voice"],
                      "file": row["file"], "samples": samples})
    if skipped:
        logger.warning("AV-Digits: skipped %d unreadable or malformed clips under %s "
                       "(first: %s)", len(skipped), assets_dir, skipped[0])
    return clips, len(skipped)


def partition_voices(voices, split, seed: int) -> dict:
    """Seeded, disjoint voice groups per split: voice -> split name."""
    voices = sorted(set(voices))
    np.random.default_rng([seed, 1]).shuffle(voices)
    n_val = max(1, round(split[1] * len(voices)))
    n_test = max(1, round(split[2] * len(voices)))
    if len(voices) - n_val - n_test < 1:
        raise AVDigitsError(f"split {split} leaves no training voice among "
                            f"{len(voices)} voices in the assets.")
    groups = ["val"] * n_val + ["test"] * n_test
    groups += ["train"] * (len(voices) - len(groups))
    return dict(zip(voices, groups))


def subset_indices(labels, images: int | None, seed: int) -> np.ndarray:
    """Indices of the images to build: all of them, or a stratified, seeded subset of ``images``."""
    indices = np.arange(len(labels))
    if images is None or images >= len(labels):
        return indices
    from sklearn.model_selection import train_test_split

    kept, _ = train_test_split(indices, train_size=images, stratify=labels, random_state=seed)
    return np.sort(kept)


def assign_image_splits(labels, split, seed: int):
    """Stratified, seeded split of image indices: returns one split name per image."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    train_idx, held_idx = train_test_split(indices, test_size=split[1] + split[2],
                                           stratify=labels, random_state=seed)
    val_idx, test_idx = train_test_split(held_idx, test_size=split[2] / (split[1] + split[2]),
                                         stratify=labels[held_idx], random_state=seed)
    names = np.empty(len(labels), dtype=object)
    names[train_idx], names[val_idx], names[test_idx] = "train", "val", "test"
    return names


def render_audio(speech, rng, snr_db):
    """Place the word at a random offset of a 1 s buffer and add white noise at snr_db."""
    speech = speech[:CLIP_SAMPLES]
    buffer = np.zeros(CLIP_SAMPLES, dtype=np.float64)
    offset = int(rng.integers(0, CLIP_SAMPLES - len(speech) + 1))
    buffer[offset:offset + len(speech)] = speech
    if snr_db is not None:
        speech_power = float(np.mean(np.square(speech, dtype=np.float64)))
        noise_std = np.sqrt(speech_power / 10 ** (snr_db / 10))
        buffer += rng.standard_normal(CLIP_SAMPLES) * noise_std
    peak = np.max(np.abs(buffer))
    scale = MIX_PEAK / peak if peak > 0 else 1.0
    return (buffer * scale).astype(np.float32)


def place_on_canvas(base, rng, canvas: int, clutter: int, distractors) -> np.ndarray:
    """The 8x8 digit at a random place of a canvas x canvas board, over ``clutter`` random
    4x4 fragments of other digits (``distractors``: a pool of 8x8 images in [0, 1]). The
    fragments carry no label: the digit must be found, which makes vision slow to learn."""
    board = np.zeros((canvas, canvas), dtype=np.float32)
    for _ in range(clutter):
        other = distractors[int(rng.integers(len(distractors)))]
        y, x = rng.integers(0, NATIVE_SIZE - 4 + 1, size=2)
        top, left = rng.integers(0, canvas - 4 + 1, size=2)
        board[top:top + 4, left:left + 4] = np.maximum(board[top:top + 4, left:left + 4], other[y:y + 4, x:x + 4])
    top, left = rng.integers(0, canvas - NATIVE_SIZE + 1, size=2)
    board[top:top + NATIVE_SIZE, left:left + NATIVE_SIZE] = np.maximum(
        board[top:top + NATIVE_SIZE, left:left + NATIVE_SIZE], base)
    return board


def render_frames(image, rng, noise_std, occlusion, frames, size, canvas=None, clutter=0, distractors=None):
    """Independent noisy (and occluded) views of one 8x8 digit, as size x size BGR uint8; with
    ``canvas``, each view places the digit anew on a larger cluttered board."""
    import cv2

    digit = image.astype(np.float32) / 16.0
    side = int(round(occlusion * NATIVE_SIZE))
    views = []
    for _ in range(frames):
        base = digit if canvas is None else place_on_canvas(digit, rng, canvas, clutter, distractors)
        view = base + rng.normal(0.0, noise_std, base.shape).astype(np.float32)
        if side > 0:
            top, left = rng.integers(0, NATIVE_SIZE - side + 1, size=2)
            view[top:top + side, left:left + side] = 0.0
        view = cv2.resize(np.clip(view, 0, 1), (size, size), interpolation=cv2.INTER_LINEAR)
        gray = np.round(view * 255).astype(np.uint8)
        views.append(cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
    return views


def params_from_marker(marker: dict) -> dict:
    """``materialize`` keyword arguments that rebuild the copy a marker describes."""
    params = dict(marker.get("params", {}))
    if params.get("audio_snr_db") is not None:
        params["audio_snr_db"] = tuple(params["audio_snr_db"])
    params["split"] = tuple(params.get("split", DEFAULT_SPLIT))
    return params


def read_marker(root: Path):
    try:
        return json.loads((root / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def build_into(folder: Path, params: dict, clips: list, fingerprint: str, skipped: int):
    """Write the whole dataset into an empty folder (no atomicity here)."""
    import cv2
    from sklearn.datasets import load_digits
    from tqdm import tqdm

    digits = load_digits()
    images, labels = digits.images, digits.target
    distractors = images.astype(np.float32) / 16.0
    seed, snr_range = params["seed"], params["audio_snr_db"]
    kept = subset_indices(labels, params.get("images"), seed)
    image_splits = dict(zip(kept, assign_image_splits(labels[kept], params["split"], seed)))
    voice_split = partition_voices([c["voice"] for c in clips], params["split"], seed)
    pools = {}
    for clip in clips:
        pools.setdefault((voice_split[clip["voice"]], clip["digit"]), []).append(clip)
    for split_name in SPLIT_NAMES:
        for digit in CLASS_NAMES:
            if (split_name, digit) not in pools:
                raise AVDigitsError(f"the AV-Digits assets hold no '{digit}' clip for the "
                                    f"{split_name} voices; re-run data/AVDigits/synthesize.py.")

    (folder / "audio").mkdir()
    frames_root = folder / "Image-01-FPS"
    frames_root.mkdir()
    split_lines = {name: [] for name in SPLIT_NAMES}
    meta_rows = []
    for index in tqdm(kept, desc="materializing AV-Digits", unit="sample"):
        # One generator per sample keeps each sample independent of the others' order.
        rng = np.random.default_rng([seed, 2, index])
        label = CLASS_NAMES[labels[index]]
        split_name = image_splits[index]
        pool = pools[(split_name, label)]
        clip = pool[int(rng.integers(len(pool)))]
        snr_db = None if snr_range is None else float(rng.uniform(*snr_range))
        name = f"avd_{index:04d}"
        write_wav(folder / "audio" / f"{name}.wav", render_audio(clip["samples"], rng, snr_db), SAMPLE_RATE)
        clip_frames = frames_root / name
        clip_frames.mkdir()
        views = render_frames(images[index], rng, params["visual_noise_std"],
                              params["visual_occlusion"], params["frames_per_clip"],
                              params["image_size"], params.get("canvas"), params.get("clutter", 0),
                              distractors)
        for frame_index, view in enumerate(views):
            frame_path = clip_frames / f"{frame_index:05d}.jpg"
            if not cv2.imwrite(str(frame_path), view, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
                raise AVDigitsError(f"could not write {frame_path} (is the disk full?).")
        split_lines[split_name].append(f"{name},{label}\n")
        meta_rows.append([name, label, split_name, index, clip["voice"], clip["file"],
                          "" if snr_db is None else f"{snr_db:.3f}"])

    for split_name, lines in split_lines.items():
        (folder / f"{split_name}.csv").write_text("".join(lines))
    (folder / "classes.txt").write_text("".join(f"{c}\n" for c in CLASS_NAMES))
    with open(folder / "meta.csv", "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["clip", "label", "split", "image_index", "voice", "audio_file", "snr_db"])
        writer.writerows(meta_rows)
    marker = {"format_version": FORMAT_VERSION, "params": params,
              "assets_fingerprint": fingerprint, "skipped_clips": skipped,
              "samples": {name: len(lines) for name, lines in split_lines.items()}}
    (folder / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")


def is_current(marker, params: dict, fingerprint: str) -> bool:
    return (marker is not None and marker.get("format_version") == FORMAT_VERSION
            and marker.get("params") == params
            and marker.get("assets_fingerprint") == fingerprint)


def materialize(root, *, seed=DEFAULT_SEED, audio_snr_db=DEFAULT_AUDIO_SNR_DB,
                visual_noise_std=DEFAULT_VISUAL_NOISE_STD,
                visual_occlusion=DEFAULT_VISUAL_OCCLUSION,
                frames_per_clip=DEFAULT_FRAMES_PER_CLIP, image_size=DEFAULT_IMAGE_SIZE,
                split=DEFAULT_SPLIT, images=None, canvas=None, clutter=None, force=False,
                assets_dir=None) -> Path:
    """Build AV-Digits into `root` once; later calls with the same knobs return at once.

    audio_snr_db: (low, high) dB range of the per-sample SNR, or None for clean audio.
    visual_noise_std: Gaussian noise std on the 8x8 image in [0, 1] units, per frame.
    visual_occlusion: side of a random blanked square as a fraction of the image side.
    frames_per_clip, image_size: frames per sample and their side in pixels.
    split: (train, val, test) fractions for both the images and the voices.
    images: build a stratified, seeded subset of this many of the 1,797 images (None: all),
    for quick experiments and tests.
    canvas, clutter: place each view's digit at a random position of a canvas x canvas
    board (in 8x8-image pixels) over ``clutter`` fragments of random other digits (None: the
    plain 8x8 image); the imbalanced setting (AVDigitsImbalanced) uses them.
    Different knobs, changed assets or force=True rebuild: the new copy is built in a
    hidden sibling folder and swapped in by rename, so `root` is never half-written.
    A non-empty `root` not made by this function is refused.
    """
    params = resolve_params(seed, audio_snr_db, visual_noise_std, visual_occlusion,
                            frames_per_clip, image_size, split, images, canvas, clutter)
    root = Path(root).expanduser()
    assets_dir = ASSETS_DIR if assets_dir is None else Path(assets_dir)
    fingerprint, rows = read_assets(assets_dir)
    marker = read_marker(root)
    if not force and is_current(marker, params, fingerprint):
        return root
    if root.exists() and (not root.is_dir() or (marker is None and any(root.iterdir()))):
        raise AVDigitsError(f"refusing to replace {root}: it exists and was not written by "
                            f"AV-Digits (no {MARKER_NAME}); choose another folder.")
    clips, skipped = decode_clips(rows, assets_dir)
    return build_folder_atomically(
        root, lambda staging: build_into(staging, params, clips, fingerprint, skipped),
        lambda: is_current(read_marker(root), params, fingerprint))
