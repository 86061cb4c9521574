"""What one DataLoader worker delivers at the released sizes, and how many workers a GPU step needs.

The training loader's samples/s at 257x188 spectrograms and 224x224 frames, measured as the
training run gets them: samples come out of a real DataLoader worker process, and a
DataLoader worker runs torch on one thread (``torch.set_num_threads(1)``), so the figure is
per worker and per core, free of thread oversubscription. Side by side in one run:

- this project's pipeline (``datasets/av_base.py``: OpenCV decode, crop and flip on the uint8
  image, then convert and normalize; the recipe's STFT) without the spectrogram cache (every
  epoch of ``--no-spec-cache``, and the first epoch, which fills the cache) and with a warm one
  (every later epoch);
- the released one (``datasets/cremad_dataset.py`` of the released code: PIL decode with
  per-sample torchvision transforms RandomResizedCrop(224), RandomHorizontalFlip, ToTensor,
  Normalize; librosa load at 22,050 Hz and STFT at every access; no cache).

For each it prints the workers needed to feed ``--step-rate`` samples/s (default: the OLM step
at the CREMA-D sizes on one H100, fp32, docs/results/bench-gpu.md), and where a sample's time
goes (audio, frame; milliseconds in one thread). The input is a generated CREMA-D-like
fixture (16 kHz wavs of 2.5 s, 480x360 JPEG frames, as preprocessing leaves them) or, with
--data-root, a prepared CREMA-D.

    python benchmarks/bench_loader.py --report docs/results/bench-loader.md
    python benchmarks/bench_loader.py --data-root ~/datasets/CREMAD --samples 512 --step-rate 2195
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
H100_FP32_STEP = 1549.3  # samples/s, docs/results/bench-gpu.md (OLM step, CREMA-D sizes, fp32)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-root", help="a prepared CREMA-D (AudioWAV/, Image-01-FPS/, train.csv) "
                        "to read instead of the generated fixture")
    parser.add_argument("--clips", type=int, default=48, help="clips in the generated fixture")
    parser.add_argument("--samples", type=int, default=480,
                        help="samples timed per pipeline and round (clips are revisited when fewer)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds; in each, every pipeline is timed in turn (the median is reported)")
    parser.add_argument("--batch-size", type=int, default=16, help="loader batch")
    parser.add_argument("--parts", type=int, default=64, help="samples timed per part (audio, frame)")
    parser.add_argument("--step-rate", type=float, default=H100_FP32_STEP,
                        help="samples/s the training step consumes; the workers needed to feed it are printed")
    parser.add_argument("--workers", type=int, default=0,
                        help="also time this project's loader (warm cache) with this many workers together")
    parser.add_argument("--report", type=Path, help="also write the tables to this markdown file "
                        "(e.g. docs/results/bench-loader.md)")
    args = parser.parse_args(argv)
    for flag in ("clips", "samples", "rounds", "batch_size", "parts"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.step_rate <= 0 or args.workers < 0:
        parser.error("--step-rate must be positive and --workers 0 or more")
    return args


# ---------------------------------------------------------------- input

def write_fixture(root: Path, clips: int) -> None:
    """CREMA-D layout: AudioWAV/<clip>.wav (16 kHz, 2.5 s), Image-01-FPS/<clip>/ 3 frames, splits."""
    import cv2

    rng = np.random.default_rng(0)
    (root / "AudioWAV").mkdir(parents=True)
    rows = []
    for n in range(clips):
        clip = f"{1001 + n // len(EMOTIONS)}_DFA_{EMOTIONS[n % len(EMOTIONS)]}_XX"
        samples = (rng.normal(0, 0.1, 40000) * 32767).clip(-32768, 32767).astype("<i2")
        with wave.open(str(root / "AudioWAV" / f"{clip}.wav"), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(16000)
            out.writeframes(samples.tobytes())
        frames = root / "Image-01-FPS" / clip
        frames.mkdir(parents=True)
        for index in range(3):
            # Smooth random images compress like video frames; white noise would not.
            small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            cv2.imwrite(str(frames / f"{30 * index:05d}.jpg"), cv2.resize(small, (480, 360)))
        rows.append(f"{clip},{EMOTIONS[n % len(EMOTIONS)]}")
    test_count = max(len(EMOTIONS), clips // 10)
    (root / "train.csv").write_text("\n".join(rows[test_count:]) + "\n")
    (root / "test.csv").write_text("\n".join(rows[:test_count]) + "\n")


def project_train_set(root: Path, spec_cache: bool):
    """CREMA-D's training set as main.py builds it (released recipe, augmentation on)."""
    from config import Config
    from datasets.builders import build_data
    from datasets.registry import get_dataset_spec

    spec = get_dataset_spec("CREMAD")
    cfg = Config(**{**spec.defaults, "dataset": spec.name, "data_root": str(root), "spec_cache": spec_cache})
    return build_data(cfg, spec).train


class ReleasedPipeline:
    """The released loader's per-sample work, written from its recipe (RELEASED.md): librosa
    load at 22,050 Hz, tiled to 3 s, clipped to [-1, 1], STFT (n_fft 512, hop 353),
    log(|S| + 1e-7); one frame opened with PIL and put through torchvision's
    RandomResizedCrop(224), RandomHorizontalFlip, ToTensor and ImageNet Normalize."""

    def __init__(self, clips):
        from torchvision import transforms

        self.clips = [(str(c.audio_path), str(c.frame_dir), c.label) for c in clips]
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def __len__(self):
        return len(self.clips)

    @staticmethod
    def audio(path: str) -> np.ndarray:
        import librosa

        samples, _ = librosa.load(path, sr=22050)
        samples = np.clip(np.tile(samples, 3)[:22050 * 3], -1.0, 1.0)
        return np.log(np.abs(librosa.stft(samples, n_fft=512, hop_length=353)) + 1e-7)

    def frame(self, folder: str):
        import random

        from PIL import Image

        name = random.choice(sorted(os.listdir(folder)))
        with Image.open(os.path.join(folder, name)) as image:
            return self.transform(image.convert("RGB"))

    def __getitem__(self, index):
        audio, folder, label = self.clips[index]
        return self.audio(audio), self.frame(folder).unsqueeze(0), label


class Revisit:
    """``count`` samples of ``dataset``, revisiting its items when it has fewer."""

    def __init__(self, dataset, count: int):
        self.dataset, self.count = dataset, count

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        return self.dataset[index % len(self.dataset)]


# ---------------------------------------------------------------- measurements

def worker_rate(dataset, args, collate_fn=None) -> float:
    """Samples/s out of one DataLoader worker process (torch on one thread, as in every worker).
    The clock starts when the first batch arrives: the worker's start-up and first imports are
    paid once per run, not per sample. Both pipelines' batches hold the labels second to last
    or last: (inputs, labels, skipped) here, (spectrograms, frames, labels) released."""
    from torch.utils.data import DataLoader

    loader = DataLoader(Revisit(dataset, args.samples + args.batch_size), batch_size=args.batch_size,
                        num_workers=1, collate_fn=collate_fn)
    batches = iter(loader)
    next(batches)
    began, seen = time.perf_counter(), 0
    for batch in batches:
        seen += len(batch[1] if collate_fn is not None else batch[-1])
    return seen / (time.perf_counter() - began)


def fill_cache(dataset) -> None:
    """Every clip's spectrogram into the cache: later reads are warm."""
    for clip in dataset.clips:
        dataset.spectrogram_fn(clip.audio_path, dataset.audio)


def loader_rate(dataset, args, workers: int, collate_fn) -> float:
    """Samples/s of the project's loader with ``workers`` processes together."""
    from torch.utils.data import DataLoader

    loader = DataLoader(Revisit(dataset, (args.samples + args.batch_size) * workers),
                        batch_size=args.batch_size, num_workers=workers, collate_fn=collate_fn)
    batches = iter(loader)
    for _ in range(workers):
        next(batches)  # every worker has started
    began, seen = time.perf_counter(), 0
    for _, labels, _ in batches:
        seen += len(labels)
    return seen / (time.perf_counter() - began)


def part_ms(function, items, count: int) -> float:
    """Median milliseconds of ``function(item)`` over ``count`` calls, after one untimed call."""
    function(items[0])
    times = []
    for n in range(count):
        began = time.perf_counter()
        function(items[n % len(items)])
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


def parts(project, released, cached, args) -> list[tuple[str, float, float]]:
    """(part, project ms, released ms) per sample in one thread: where a sample's time goes."""
    from datasets.av_base import list_frames, read_frame

    from datasets.audio import wav_to_spectrogram

    clips = project.clips
    audio_no_cache = part_ms(lambda c: wav_to_spectrogram(c.audio_path, project.audio), clips, args.parts)
    audio_warm = part_ms(lambda c: cached.spectrogram_fn(c.audio_path, cached.audio), clips, args.parts)
    frames = [(str(c.audio_path), str(c.frame_dir), c.label) for c in clips]
    return [
        ("audio: wav to 257x188 log-spectrogram", audio_no_cache,
         part_ms(lambda c: released.audio(c[0]), frames, args.parts)),
        ("audio: read from the warm spectrogram cache", audio_warm, math.nan),
        ("frame: decode 480x360 JPEG", part_ms(lambda c: read_frame(list_frames(c.frame_dir)[0]), clips, args.parts),
         part_ms(lambda c: pil_decode(c[1]), frames, args.parts)),
        ("frame: decode, crop 224, flip, normalize", part_ms(project.load_frames, clips, args.parts),
         part_ms(lambda c: released.frame(c[1]), frames, args.parts)),
    ]


def pil_decode(folder: str):
    from PIL import Image

    with Image.open(os.path.join(folder, sorted(os.listdir(folder))[0])) as image:
        return image.convert("RGB")


def versions() -> str:
    import cv2
    import librosa
    import PIL
    import torch
    import torchvision

    return (f"torch {torch.__version__}, torchvision {torchvision.__version__}, numpy {np.__version__}, "
            f"librosa {librosa.__version__}, OpenCV {cv2.__version__}, Pillow {PIL.__version__}")


# ---------------------------------------------------------------- the run

def run(args) -> None:
    import torch

    from datasets.av_base import collate_skipping_bad
    from utils.errors import UserError
    from utils.provenance import cpu_model

    torch.set_num_threads(1)  # the parts are timed here as a worker would run them
    with tempfile.TemporaryDirectory(prefix="olm-bench-") as scratch:
        os.environ["OLM_CACHE"] = str(Path(scratch) / "cache")  # a cold cache, removed afterwards
        root = Path(args.data_root).expanduser() if args.data_root else Path(scratch) / "fixture"
        if not args.data_root:
            write_fixture(root, args.clips)
        elif not root.is_dir():
            raise UserError(f"--data-root {root} is not a folder")
        plain, cached = project_train_set(root, spec_cache=False), project_train_set(root, spec_cache=True)
        released = ReleasedPipeline(plain.clips)
        print(f"{len(plain)} training clips; timing {args.samples} samples per pipeline in one worker, "
              f"{args.rounds} rounds", flush=True)
        fill_cache(cached)
        pipelines = {"this project, no spectrogram cache": (plain, collate_skipping_bad),
                     "this project, warm spectrogram cache": (cached, collate_skipping_bad),
                     "released (PIL + torchvision transforms, librosa)": (released, None)}
        rates = {name: [] for name in pipelines}
        for round_number in range(1, args.rounds + 1):
            for name, (dataset, collate_fn) in pipelines.items():
                rates[name].append(worker_rate(dataset, args, collate_fn))
            print(f"  round {round_number}: " + ", ".join(f"{r[-1]:.0f}" for r in rates.values())
                  + " samples/s", flush=True)
        rows = [(name, statistics.median(values), min(values), max(values)) for name, values in rates.items()]
        breakdown = parts(plain, released, cached, args)
        together = loader_rate(cached, args, args.workers, collate_skipping_bad) if args.workers else None
    source = "a prepared CREMA-D" if args.data_root else (
        f"a generated CREMA-D-like fixture ({args.clips} clips: 16 kHz wavs of 2.5 s, 480x360 JPEG frames)")
    lines = [
        f"CPU: {cpu_model()}; {versions()}.", "",
        f"One DataLoader worker process (torch on one thread, as in every worker), batch {args.batch_size}, "
        f"{args.samples} training samples of {source} at the released sizes (257x188 spectrogram, one "
        f"224x224 frame, training augmentation), timed from the first batch on; median (range) of "
        f"{args.rounds} rounds, the pipelines in turn in each. Workers needed: to feed "
        f"{args.step_rate:,.0f} samples/s (`--step-rate`), one core each, at the median rate. The first "
        "epoch, which fills the cache, runs at the no-cache rate.", "",
        "| pipeline | samples/s per worker | ms per sample | workers needed |", "|---|---|---|---|"]
    lines += [f"| {name} | {rate:.0f} ({low:.0f}-{high:.0f}) | {1000 / rate:.1f} | {math.ceil(args.step_rate / rate)} |"
              for name, rate, low, high in rows]
    lines += ["", "Where a sample's time goes, median ms in one thread:", "",
              "| part | this project | released |", "|---|---|---|"]
    lines += [f"| {name} | {ours:.2f} | {'-' if math.isnan(theirs) else f'{theirs:.2f}'} |"
              for name, ours, theirs in breakdown]
    if together is not None:
        lines += ["", f"This project's loader with {args.workers} workers together (warm cache): "
                      f"{together:.1f} samples/s on this machine's {os.cpu_count()} cores."]
    body = "\n".join(lines)
    print("\n" + body)
    if args.report:
        from utils.provenance import write_report

        print(f"wrote {write_report(args.report, body)}")


def main(argv=None) -> None:
    # Run as a plain file: put the repository root on the import path.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from utils.cli import run_cli

    args = parse_args(argv)
    run_cli(lambda: run(args))


if __name__ == "__main__":
    main()
