"""How much faster is frame extraction than decoding every frame? Measures it here.

Generates its own clips in a temporary folder (long-GOP H.264 via the imageio-ffmpeg
binary, OpenCV mp4v, OpenCV MJPEG), then times per clip type:
  (a) the naive way: decode every frame, keep the first of each second;
  (b) utils.media.extract_frames at --fps 1 with one worker, for each skip method;
and over --clips clips of each type:
  (c) the process pool at --workers vs one worker, and vs (a) run serially.
Pool timings include starting the worker processes (about a second, paid once per run).
Usage: python benchmarks/bench_frame_extraction.py [--clips 24] [--size 320x240]
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


def make_clips(folder, seconds, source_fps, size):
    """One clip per codec: {name: path}."""
    import cv2
    from utils.media import find_ffmpeg
    clips = {}
    for name, suffix, fourcc in (("mp4v", ".mp4", "mp4v"), ("mjpeg", ".avi", "MJPG")):
        path = folder / f"{name}{suffix}"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), source_fps, size)
        for frame in textured_frames(int(seconds * source_fps), *size):
            writer.write(frame)
        writer.release()
        clips[name] = path
    # OpenCV here cannot encode H.264 (no avc1/H264 writer), so ffmpeg's libx264 does,
    # with one keyframe per 250 frames: the long-GOP case typical of web video.
    path = folder / "h264_gop250.mp4"
    subprocess.run([find_ffmpeg(), "-nostdin", "-loglevel", "error", "-y", "-i",
                    str(clips["mjpeg"]), "-c:v", "libx264", "-g", "250", "-pix_fmt", "yuv420p",
                    str(path)], check=True)
    return {"h264_gop250": path, **clips}


def naive_extract(video, out_dir, fps):
    """The released approach: read() every frame, write the first frame of each second."""
    import cv2
    out_dir.mkdir(parents=True, exist_ok=True)
    capture = cv2.VideoCapture(str(video))
    step = capture.get(cv2.CAP_PROP_FPS) / fps
    index = kept = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        if index == int(kept * step + 1e-6):
            cv2.imwrite(str(out_dir / f"{kept:05d}.jpg"), frame)
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips", type=int, default=24, help="clips per type for the pool test")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length (default 10)")
    parser.add_argument("--source-fps", type=int, default=25, help="clip frame rate (default 25)")
    parser.add_argument("--size", type=parse_size, default=(320, 240), help="WxH (default 320x240)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="pool size for (c) (default: all cores)")
    parser.add_argument("--repeats", type=int, default=5, help="best of N timings (default 5)")
    args = parser.parse_args(argv)
    if args.clips < 1 or args.workers < 1 or args.repeats < 1 or args.seconds <= 0:
        raise SystemExit("--clips, --workers, --repeats and --seconds must be positive.")

    import cv2
    from utils.media import choose_method, extract_frames
    from utils.media import POOL_DECODER_THREADS
    from utils.preprocess import _frames_job, _init_worker
    print(f"OpenCV {cv2.__version__}, {os.cpu_count()} cores (load average "
          f"{os.getloadavg()[0]:.1f}); clips {args.seconds:g} s at "
          f"{args.source_fps} fps, {args.size[0]}x{args.size[1]}; keeping 1 frame per second")
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        clips = make_clips(scratch, args.seconds, args.source_fps, args.size)
        for name, video in clips.items():
            out = scratch / "out" / name
            naive, expected = best_time(lambda: naive_extract(video, out / "naive", 1),
                                        args.repeats)
            line = f"{name:12s} (a) decode all {naive * 1000:7.1f} ms/clip"
            for method in ("grab", "seek", "auto"):
                target = out / method

                def extract():
                    shutil.rmtree(target, ignore_errors=True)
                    return extract_frames(video, target, fps=1, method=method)
                seconds, count = best_time(extract, args.repeats)
                assert count == expected, f"{method} kept {count} frames, naive {expected}"
                line += f" | (b) {method} {seconds * 1000:6.1f} ms x{naive / seconds:4.2f}"
            print(line + f"  [auto picks {choose_method(video, args.source_fps, 1)}]")

        print(f"(c) pool over {args.clips} clips of each type, --fps 1, method auto "
              "(worker start-up timed apart: it is paid once per run, not per clip):")
        context = multiprocessing.get_context("spawn")
        start = time.perf_counter()
        with context.Pool(args.workers, _init_worker) as pool:
            pool.map(_init_worker_ready, range(args.workers))
            print(f"  starting {args.workers} workers took {time.perf_counter() - start:.2f} s")
            for name, video in clips.items():
                copies = [scratch / "pool" / f"{name}_{i}{video.suffix}" for i in range(args.clips)]
                for copy in copies:
                    copy.parent.mkdir(exist_ok=True)
                    shutil.copyfile(video, copy)
                timings = {}
                for workers in (1, args.workers):
                    threads = POOL_DECODER_THREADS if workers > 1 else None
                    jobs = [(c.stem, str(c), str(scratch / "frames" / c.stem), 1, "auto", threads)
                            for c in copies]

                    def run_all():
                        shutil.rmtree(scratch / "frames", ignore_errors=True)
                        if workers == 1:
                            return [_frames_job(job) for job in jobs]
                        return pool.map(_frames_job, jobs, chunksize=1)
                    timings[workers], results = best_time(run_all, args.repeats)
                    assert all(reason is None for _, reason in results), results
                serial_naive, _ = best_time(
                    lambda: [naive_extract(c, scratch / "naive" / c.stem, 1) for c in copies], 1)
                print(f"  {name:12s} 1 worker {timings[1]:5.2f} s | {args.workers} workers "
                      f"{timings[args.workers]:5.2f} s: "
                      f"pool x{timings[1] / timings[args.workers]:4.2f}"
                      f" | naive serial {serial_naive:5.2f} s: defaults vs naive "
                      f"x{serial_naive / timings[args.workers]:4.2f}")


def _init_worker_ready(_):
    return True

if __name__ == "__main__":
    main()
