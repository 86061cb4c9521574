"""How much faster is frame extraction with the defaults than the released approach? Measures it.

Generates its own clips in a temporary folder, by default CREMA-D-like ones (Sorenson FLV1
in .flv, 480x360, 30 fps, 10 s, written by OpenCV; --codecs adds long-GOP H.264 via the
imageio-ffmpeg binary, OpenCV mp4v and MJPEG), then times per clip type:
  (a) the released approach: decode every frame, keep the first of each second;
  (b) datasets.media.extract_frames at --fps 1 in one process, for each skip method;
and over --clips copies of each type, side by side in one run:
  (c) the defaults of data/<DATASET>/video_preprocessing.py (a process pool over the cores
      this process may use, method auto) against (a) run serially as the released script did.
Pool timings are given with and without starting the workers (paid once per run).
Usage: python benchmarks/bench_frame_extraction.py [--clips 48] [--report docs/results/bench-frame-extraction.md]
"""
import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CODECS = ("flv1", "h264_gop250", "mp4v", "mjpeg")


def parse_size(text):
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like 320x240, got {text}")
    return width, height


def textured_frames(count, width, height):
    """A blurred noise texture panning with a frame counter: motion that codecs must code."""
    import cv2
    import numpy as np
    noise = np.random.default_rng(0).integers(0, 256, (height * 2, width * 2, 3), np.uint8)
    texture = cv2.GaussianBlur(noise, (0, 0), 3)
    for index in range(count):
        x, y = (index * 3) % width, (index * 2) % height
        frame = texture[y:y + height, x:x + width].copy()
        cv2.putText(frame, str(index), (10, height // 2), cv2.FONT_HERSHEY_SIMPLEX, 2,
                    (255, 255, 255), 3)
        yield frame


def make_clips(folder, seconds, source_fps, size, codecs):
    """One clip per codec: {name: path}."""
    import cv2
    from datasets.media import find_ffmpeg
    clips = {}
    writers = {"flv1": (".flv", "FLV1"), "mp4v": (".mp4", "mp4v"), "mjpeg": (".avi", "MJPG")}
    for name in [c for c in codecs if c in writers] + (["mjpeg"] if "h264_gop250" in codecs else []):
        suffix, fourcc = writers[name]
        path = folder / f"{name}{suffix}"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), source_fps, size)
        for frame in textured_frames(int(seconds * source_fps), *size):
            writer.write(frame)
        writer.release()
        clips[name] = path
    if "h264_gop250" in codecs:
        # OpenCV here cannot encode H.264 (no avc1/H264 writer), so ffmpeg's libx264 does,
        # with one keyframe per 250 frames: the long-GOP case typical of web video.
        path = folder / "h264_gop250.mp4"
        subprocess.run([find_ffmpeg(), "-nostdin", "-loglevel", "error", "-y", "-i",
                        str(clips["mjpeg"]), "-c:v", "libx264", "-g", "250", "-pix_fmt", "yuv420p",
                        str(path)], check=True)
        clips["h264_gop250"] = path
    return {name: clips[name] for name in codecs}


def naive_extract(video, out_dir, fps):
    """The released approach: read() every frame; keep, per second of int(frame rate) frames,
    those at multiples of int(rate / fps); name them after the source frame."""
    import cv2
    out_dir.mkdir(parents=True, exist_ok=True)
    capture = cv2.VideoCapture(str(video))
    whole = int(capture.get(cv2.CAP_PROP_FPS))
    interval = int(whole / fps)
    index = kept = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        within = index % whole
        if within < interval * fps and within % interval == 0:
            cv2.imencode(".jpg", frame)[1].tofile(str(out_dir / f"{index:05d}.jpg"))
            kept += 1
        index += 1
    capture.release()
    return kept


def best_time(function, repeats):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from datasets.preprocess import available_cpus
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=48, help="copies per type for (c) (default 48)")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length (default 10)")
    parser.add_argument("--source-fps", type=int, default=30, help="clip frame rate (default 30)")
    parser.add_argument("--size", type=parse_size, default=(480, 360), help="WxH (default 480x360)")
    parser.add_argument("--codecs", nargs="+", choices=CODECS, default=["flv1"],
                        help="clip types (default: flv1, CREMA-D's)")
    parser.add_argument("--workers", type=int, default=available_cpus(),
                        help="pool size for (c) (default: the preprocessing default, the usable cores)")
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings (default 3)")
    parser.add_argument("--report", type=Path, help="also write the results to this markdown file "
                        "(e.g. docs/results/bench-frame-extraction.md)")
    args = parser.parse_args(argv)
    if args.clips < 1 or args.workers < 1 or args.repeats < 1 or args.seconds <= 0:
        raise SystemExit("--clips, --workers, --repeats and --seconds must be positive.")

    import cv2
    from datasets.media import choose_method, extract_frames
    from datasets.media import POOL_DECODER_THREADS
    from datasets.preprocess import _frames_job, _init_worker
    from utils.provenance import machine_summary, write_report
    out = []

    def say(line=""):
        print(line)
        out.append(line)

    say(f"OpenCV {cv2.__version__}; {machine_summary()}; clips {args.seconds:g} s at "
        f"{args.source_fps} fps, {args.size[0]}x{args.size[1]}; keeping 1 frame per second")
    say()
    say("| clip | (a) released, ms/clip | " + " | ".join(f"(b) {m}, ms/clip" for m in ("grab", "seek", "auto"))
        + " | auto picks |")
    say("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        clips = make_clips(scratch, args.seconds, args.source_fps, args.size, args.codecs)
        for name, video in clips.items():
            target_root = scratch / "out" / name
            naive, expected = best_time(lambda: naive_extract(video, target_root / "naive", 1), args.repeats)
            cells = [f"{naive * 1000:.0f}"]
            for method in ("grab", "seek", "auto"):
                target = target_root / method

                def extract():
                    shutil.rmtree(target, ignore_errors=True)
                    return extract_frames(video, target, fps=1, method=method)
                seconds, count = best_time(extract, args.repeats)
                assert count == expected, f"{method} kept {count} frames, released {expected}"
                assert sorted(os.listdir(target)) == sorted(os.listdir(target_root / "naive"))
                cells.append(f"{seconds * 1000:.0f} (x{naive / seconds:.2f})")
            say(f"| {name} | " + " | ".join(cells) + f" | {choose_method(video, args.source_fps, 1)} |")

        say()
        say(f"(c) {args.clips} clips of each type: the defaults ({args.workers} worker processes, "
            "method auto) against the released approach run serially, side by side:")
        say()
        say("| clip | released, serial | defaults incl. worker start | defaults, workers running | speed-up (incl. start) |")
        say("|---|---|---|---|---|")
        context = multiprocessing.get_context("spawn")
        for name, video in clips.items():
            copies = [scratch / "pool" / f"{name}_{i}{video.suffix}" for i in range(args.clips)]
            for copy in copies:
                copy.parent.mkdir(exist_ok=True)
                shutil.copyfile(video, copy)
            threads = POOL_DECODER_THREADS if args.workers > 1 else None
            jobs = [(c.stem, str(c), str(scratch / "frames" / c.stem), 1, "auto", threads) for c in copies]
            best = {"released": float("inf"), "cold": float("inf"), "warm": float("inf")}
            for _ in range(args.repeats):  # interleaved, so both see the same machine load
                shutil.rmtree(scratch / "naive", ignore_errors=True)
                start = time.perf_counter()
                for c in copies:
                    naive_extract(c, scratch / "naive" / c.stem, 1)
                best["released"] = min(best["released"], time.perf_counter() - start)
                shutil.rmtree(scratch / "frames", ignore_errors=True)
                start = time.perf_counter()
                with context.Pool(args.workers, _init_worker) as pool:
                    pool.map(_ready, range(args.workers))
                    ready = time.perf_counter()
                    results = pool.map(_frames_job, jobs, chunksize=1)
                    done = time.perf_counter()
                assert all(reason is None for _, reason in results), results
                best["cold"] = min(best["cold"], done - start)
                best["warm"] = min(best["warm"], done - ready)
            say(f"| {name} | {best['released']:.2f} s | {best['cold']:.2f} s | {best['warm']:.2f} s | "
                f"x{best['released'] / best['cold']:.2f} (x{best['released'] / best['warm']:.2f} without start) |")
    if args.report:
        command = "python " + " ".join(["benchmarks/bench_frame_extraction.py", *(argv or sys.argv[1:])])
        print(f"wrote {write_report(args.report, chr(10).join(out), command=command)}")


def _ready(_):
    return True


if __name__ == "__main__":
    main()
