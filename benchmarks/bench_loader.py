"""Loader throughput with and without the spectrogram cache, beside the model's training speed.

Writes a CREMA-D-like fixture (16 kHz wavs, 480x360 JPEG frames, as the preprocessing leaves
them) into a temporary folder, or reads a real dataset with --data-root, then reports
samples/s for: one epoch without the cache, the first epoch with it (cold: fills it), the
second (warm: reads it); and forward+backward+step of LateFusionClassifier on random inputs
of the same sizes on --device. The cache goes to a temporary folder, so "cold" is cold.

    python benchmarks/bench_loader.py                       # released 257x188 + 224x224
    python benchmarks/bench_loader.py --sizes released avdigits --workers 2
    python benchmarks/bench_loader.py --dataset CREMAD --data-root ~/datasets/CREMAD --max-samples 512
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import wave
from pathlib import Path

import numpy as np

# Input sizes copied from the registered datasets' defaults (config.py) at run time.
SIZE_SOURCES = {"released": "CREMAD", "avdigits": "AVDigits"}
SIZE_FIELDS = ("image_size", "sample_rate", "audio_seconds", "n_fft", "hop_length", "spec_frames", "fusion")
EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZE_SOURCES), default=["released"],
                        help="input sizes: released (257x188 spectrogram, 224x224 frames) and/or avdigits")
    parser.add_argument("--dataset", default="CREMAD", help="registered dataset read with --data-root")
    parser.add_argument("--data-root", help="a processed dataset to read instead of the generated fixture")
    parser.add_argument("--clips", type=int, default=96, help="clips in the generated fixture")
    parser.add_argument("--max-samples", type=int, default=256, help="training clips read per epoch")
    parser.add_argument("--batch-size", type=int, default=16, help="loader batch size")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--fps", type=int, default=1, help="frames per clip")
    parser.add_argument("--device", default="cpu", help="device of the model measurement (cpu, cuda)")
    parser.add_argument("--model-batch", type=int, default=8, help="batch size of the model measurement")
    parser.add_argument("--model-steps", type=int, default=3, help="timed training steps (after one warm-up)")
    parser.add_argument("--no-model", action="store_true", help="skip the model measurement")
    parser.add_argument("--report", type=Path, help="also write the table to this markdown file "
                        "(e.g. docs/results/bench-loader.md)")
    args = parser.parse_args(argv)
    for flag in ("clips", "max_samples", "batch_size", "fps", "model_batch", "model_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.workers < 0:
        parser.error("--workers must be 0 or more")
    return args


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


def config_for(args, sizes: str, root: Path, spec_cache: bool):
    from config import Config, get_dataset_spec

    target = get_dataset_spec(args.dataset)
    size_defaults = get_dataset_spec(SIZE_SOURCES[sizes]).defaults
    values = {**target.defaults, **{k: size_defaults[k] for k in SIZE_FIELDS}}
    return Config(**{**values, "dataset": target.name, "data_root": str(root), "fps": args.fps,
                     "spec_cache": spec_cache, "workers": args.workers, "augment": True})


def loader_rate(args, cfg, epochs: int) -> tuple[list[float], int]:
    """samples/s of each of ``epochs`` passes over the same training clips, and the class count."""
    from torch.utils.data import DataLoader, Subset

    from config import get_dataset_spec
    from datasets.builders import build_data

    data = build_data(cfg, get_dataset_spec(cfg.dataset))
    subset = Subset(data.train, range(min(len(data.train), args.max_samples)))
    # No shuffle and no persistent workers: each epoch reads the same clips from a fresh start.
    loader = DataLoader(subset, batch_size=args.batch_size, num_workers=args.workers,
                        collate_fn=data.collate_fn)
    if not cfg.spec_cache:
        subset[0]  # pay one-off costs (lazy imports, resampler set-up) outside the timed epoch
    rates = []
    for _ in range(epochs):
        began, seen = time.perf_counter(), 0
        for inputs, labels, skipped in loader:
            seen += 0 if labels is None else len(labels)
        rates.append(seen / (time.perf_counter() - began))
    return rates, len(data.class_names)


def model_rate(args, cfg, num_classes: int) -> float:
    """samples/s of LateFusionClassifier forward + backward + Adam step on random inputs."""
    import torch

    from datasets.builders import audio_recipe
    from models.late_fusion import LateFusionClassifier
    from utils.device import resolve_device

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = LateFusionClassifier(num_classes, fusion=cfg.fusion).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    bins, frames = audio_recipe(cfg).shape
    batch = args.model_batch
    inputs = {"audio": torch.randn(batch, 1, bins, frames, device=device),
              "visual": torch.randn(batch, cfg.fps, 3, cfg.image_size, cfg.image_size, device=device)}
    labels = torch.randint(num_classes, (batch,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = model(inputs)
        sum(torch.nn.functional.cross_entropy(z, labels) for z in logits.values()).backward()
        optimizer.step()

    step()  # warm-up: allocator, cuDNN autotuning
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    for _ in range(args.model_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch * args.model_steps / (time.perf_counter() - began)


def describe(cfg) -> str:
    from datasets.builders import audio_recipe

    bins, frames = audio_recipe(cfg).shape
    return f"{bins}x{frames} spec + {cfg.fps}x{cfg.image_size}x{cfg.image_size} frames"


def run(args) -> None:
    from tqdm import tqdm

    from utils.errors import UserError

    with tempfile.TemporaryDirectory(prefix="olm-bench-") as scratch:
        os.environ["OLM_CACHE"] = str(Path(scratch) / "cache")  # a cold cache, removed afterwards
        root = Path(args.data_root).expanduser() if args.data_root else Path(scratch) / "fixture"
        if not args.data_root:
            if args.dataset.lower() != "cremad":
                raise UserError("--dataset: the generated fixture is CREMA-D-like; pass --data-root "
                                "to benchmark another dataset")
            write_fixture(root, args.clips)
        rows = []
        for sizes in tqdm(args.sizes, desc="configurations", unit="config"):
            plain_cfg = config_for(args, sizes, root, spec_cache=False)
            (no_cache,), num_classes = loader_rate(args, plain_cfg, epochs=1)
            (cold, warm), _ = loader_rate(args, config_for(args, sizes, root, spec_cache=True), epochs=2)
            model = None if args.no_model else model_rate(args, plain_cfg, num_classes)
            rows.append((f"{sizes}: {describe(plain_cfg)}", no_cache, cold, warm, model))
    model_note = "" if args.no_model else (f"; model: batch {args.model_batch}, "
                                           f"{args.model_steps} steps on {args.device}")
    print(f"\nloader: batch {args.batch_size}, {args.workers} workers, up to {args.max_samples} "
          f"training clips of {root if args.data_root else 'a generated CREMA-D-like fixture'}{model_note}")
    print(f"{'configuration':52s} {'no cache':>9s} {'cold':>9s} {'warm':>9s} {'model':>9s}  (samples/s)")
    for name, no_cache, cold, warm, model in rows:
        model_text = "-" if model is None else f"{model:9.1f}"
        print(f"{name:52s} {no_cache:9.1f} {cold:9.1f} {warm:9.1f} {model_text:>9s}")
    if args.report:
        from utils.provenance import write_report

        table = [f"Loader: batch {args.batch_size}, {args.workers} workers, up to {args.max_samples} training "
                 f"clips of {'a real dataset' if args.data_root else 'a generated CREMA-D-like fixture'}"
                 f"{model_note}. Samples/s, one run.", "",
                 "| sizes | no cache | cold cache | warm cache | model |", "|---|---|---|---|---|"]
        table += [f"| {name} | {no_cache:.1f} | {cold:.1f} | {warm:.1f} | "
                  f"{'-' if model is None else f'{model:.2f}'} |" for name, no_cache, cold, warm, model in rows]
        print(f"wrote {write_report(args.report, chr(10).join(table))}")


def main(argv=None) -> None:
    # Run as a plain file: put the repository root on the import path.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from utils.cli import run_cli

    args = parse_args(argv)
    run_cli(lambda: run(args))


if __name__ == "__main__":
    main()
