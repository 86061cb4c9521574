"""Start-up time of a real dataset's loader: from the split file to the ready datasets.

Writes a VGGSound-like catalogue of N clips in a temporary folder (``vggsound.csv`` rows
``ytid,start,label,train|test``; an empty wav and an empty frame folder per clip, in the
released layout: ``train-audios/train-set/``, ``train-videos/train-set-img/Image-01-FPS/
<clip>.mp4/``; 5% of the listed clips absent, as videos that left YouTube), then times
``build_data`` twice: the first start (which carves and writes the validation split) and a
later one (which reads it back). Only start-up is measured: no clip is decoded.

    python benchmarks/bench_startup.py                      # 10k, 100k and 200k clips
    python benchmarks/bench_startup.py --clips 10000 --report docs/results/bench-startup.md
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

LABELS = 309  # VGGSound's classes in the released method
TEST_SHARE = 0.07  # about 14k of 200k clips are test clips


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, nargs="+", default=[10_000, 100_000, 200_000],
                        help="catalogue sizes to time (default: 10000 100000 200000)")
    parser.add_argument("--missing", type=float, default=0.05,
                        help="share of listed clips absent on disk (default: 0.05)")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="folder the catalogues are written under (default: the system's temporary "
                             "folder); a memory-backed one (tmpfs) keeps 200k file writes from measuring "
                             "the disk instead of the loader")
    parser.add_argument("--report", type=Path, help="also write the table to this markdown file "
                        "(e.g. docs/results/bench-startup.md)")
    args = parser.parse_args(argv)
    if any(n < 100 for n in args.clips):
        parser.error("--clips must be at least 100")
    if not 0 <= args.missing < 1:
        parser.error("--missing must be in [0, 1)")
    if args.scratch is not None and not args.scratch.is_dir():
        parser.error(f"--scratch {args.scratch} is not a folder")
    return args


def write_catalogue(root: Path, clips: int, missing: float) -> None:
    """vggsound.csv plus the released layout's files; ``missing`` of the clips left out."""
    from tqdm import tqdm

    rows = []
    skip_every = round(1 / missing) if missing else 0
    folders = {}
    for split in ("train", "test"):
        folders[split] = (root / f"{split}-audios" / f"{split}-set",
                          root / f"{split}-videos" / f"{split}-set-img" / "Image-01-FPS")
        for folder in folders[split]:
            folder.mkdir(parents=True)
    for n in tqdm(range(clips), desc=f"writing {clips} clips", unit="clip", leave=False):
        ytid, start = f"{n:011d}", (n * 7) % 300
        split = "test" if n % round(1 / TEST_SHARE) == 0 else "train"
        rows.append(f"{ytid},{start},label {n % LABELS},{split}")
        if skip_every and n % skip_every == 1:
            continue
        clip = f"{ytid}_{start:06d}"
        audio, frames = folders[split]
        os.close(os.open(audio / f"{clip}.wav", os.O_CREAT | os.O_WRONLY))
        (frames / f"{clip}.mp4").mkdir()
    (root / "vggsound.csv").write_text("\n".join(rows) + "\n")


def time_start(root: Path) -> tuple[float, float, tuple[int, int, int]]:
    """(wall seconds, CPU seconds of this process, split sizes) of one build_data."""
    from config import Config, get_dataset_spec
    from datasets.builders import build_data

    spec = get_dataset_spec("VGGSound")
    cfg = Config(**{**spec.defaults, "dataset": spec.name, "data_root": str(root), "spec_cache": False})
    start, cpu = time.perf_counter(), time.process_time()
    data = build_data(cfg, spec)
    return (time.perf_counter() - start, time.process_time() - cpu,
            (len(data.train), len(data.val), len(data.test)))


def main(argv=None) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    from utils.provenance import machine_summary, write_report

    lines = ["| clips listed | on disk (train / val / test) | first start (carves val), wall / CPU | "
             "later start, wall / CPU |", "|---|---|---|---|"]
    print(machine_summary())
    for clips in args.clips:
        with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
            root = Path(scratch)
            write_catalogue(root, clips, args.missing)
            first, first_cpu, sizes = time_start(root)
            later, later_cpu, _ = time_start(root)
        line = (f"| {clips:,} | {sizes[0]:,} / {sizes[1]:,} / {sizes[2]:,} | {first:.2f} s / {first_cpu:.2f} s "
                f"| {later:.2f} s / {later_cpu:.2f} s |")
        print(line)
        lines.append(line)
    body = ("VGGSound-like catalogue in the released layout, one folder listing per folder "
            f"(`datasets/real_av.py`); {args.missing:.0%} of the listed clips absent on disk. Wall time "
            "and this process's CPU time (the CPU time is what the loader costs; on a shared machine the "
            "wall time also holds the waits for a core). Catalogues written under "
            f"{'--scratch ' + str(args.scratch) if args.scratch else 'the system temporary folder'}.\n\n"
            + "\n".join(lines))
    if args.report:
        print(f"wrote {write_report(args.report, body)}")


if __name__ == "__main__":
    main()
