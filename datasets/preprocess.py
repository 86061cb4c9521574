"""The one implementation behind data/<DATASET>/video_preprocessing.py, mp4_to_wav.py and
data/MERMULTI/face_preprocessing.py.

Finds the raw videos, skips clips whose output already exists (so a killed run resumes),
fans the rest out over a process pool, and ends with a one-line summary plus a log of
every failure and its reason in the dataset root.
"""
import argparse
import csv
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from tqdm import tqdm

from datasets.media import (AUDIO_SAMPLE_RATE, FACE_SIZE, FFMPEG_TIMEOUT_S, FRAME_METHODS, POOL_DECODER_THREADS,
                            MediaError, extract_audio, extract_faces, extract_frames, frames_dir_name, find_ffmpeg)

SCRIPTS = {"frames": "video_preprocessing", "audio": "mp4_to_wav", "faces": "face_preprocessing"}
FACES_DIR = "openface_face"  # where MER2023's tools (and the released OLM config) look for face images


def first_field(line):
    """`clip,label,...` split lines (CREMA-D, Kinetics-Sounds) name the clip first."""
    return line.split(",", 1)[0].strip() or None


def ave_clip(line):
    """AVE lines are `Category&VideoID&Quality&Start&End`; the header says `VideoID`."""
    fields = line.split("&")
    if len(fields) < 2 or fields[1].strip() in ("", "VideoID"):
        return None
    return fields[1].strip()


def mer_clip(line):
    """MER-MULTI's labels.csv rows `name,emo,val,split` (header `name,...` optional)."""
    clip = first_field(line)
    return None if clip is None or clip.lower() == "name" else clip


def vggsound_clip(line):
    """VGGSound rows `ytid,start,label,split` name the file `<ytid>_<start:06d>.mp4`."""
    fields = next(csv.reader([line]))
    if len(fields) < 2 or not fields[1].strip().isdigit():
        return None  # header row
    return f"{fields[0].strip()}_{int(fields[1]):06d}"


@dataclass(frozen=True)
class DatasetLayout:
    name: str
    video_suffix: str | tuple[str, ...]  # one suffix, or several a dataset's videos come in
    clip_from_split_line: Callable[[str], Optional[str]]
    # Where the raw videos usually sit inside --root when --video-dir is not given (the
    # datasets' own downloads and the released scripts' folders); else all of --root is searched.
    video_subdirs: tuple[str, ...] = ()

    @property
    def suffixes(self) -> tuple[str, ...]:
        return (self.video_suffix,) if isinstance(self.video_suffix, str) else tuple(self.video_suffix)

    @property
    def pattern(self) -> str:
        """`*.mp4`, or `*.avi / *.mp4`, for messages."""
        return " / ".join(f"*{suffix}" for suffix in self.suffixes)


LAYOUTS = {
    "CREMAD": DatasetLayout("CREMA-D", ".flv", first_field, video_subdirs=("VideoFlash",)),
    "AVE": DatasetLayout("AVE", ".mp4", ave_clip, video_subdirs=("AVE",)),
    "KineticSound": DatasetLayout("Kinetics-Sounds", ".mp4", first_field,
                                  video_subdirs=("video_train", "video_test")),
    "VGGSound": DatasetLayout("VGGSound", ".mp4", vggsound_clip, video_subdirs=("video",)),
    # MER 2023's raw videos (the released OLM config reads them from dataset-process/video/).
    "MERMULTI": DatasetLayout("MER-MULTI", (".avi", ".mp4"), mer_clip, video_subdirs=("video",)),
}
DESCRIPTIONS = {
    "frames": "keep --fps frames per second of every video as JPEGs in <root>/Image-NN-FPS/<clip>/",
    "audio": "extract every video's audio as <root>/audio/<clip>.wav (16 kHz mono)",
    "faces": f"save the largest face of every frame as <root>/{FACES_DIR}/<clip>/<frame>.jpg "
             f"({FACE_SIZE}x{FACE_SIZE}, scikit-image's frontal-face cascade)",
}


def available_cpus():
    """Cores this process may run on (CPU affinity, as set by taskset or a batch scheduler)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser(layout, task):
    video_help = (f"folder searched recursively for raw {layout.pattern} videos (default: "
                  + " and ".join(f"<root>/{d}" for d in layout.video_subdirs)
                  + " where they exist, else all of --root)")
    parser = argparse.ArgumentParser(
        description=f"{layout.name}: {DESCRIPTIONS[task]}. Finished clips are skipped, so rerunning resumes.")
    parser.add_argument("--root", required=True, type=Path,
                        help="dataset root; outputs and the failure log are written here")
    parser.add_argument("--video-dir", type=Path, default=None, help=video_help)
    parser.add_argument("--split-file", type=Path, nargs="+", default=None,
                        help="only process the clips named in these split files")
    parser.add_argument("--workers", type=_positive_int, default=available_cpus(),
                        help="processes working in parallel (default: the cores this process "
                             f"may use, here {available_cpus()})")
    if task == "frames":
        parser.add_argument("--fps", type=_positive_int, default=1,
                            help="frames kept per second of video (default: 1)")
        parser.add_argument("--method", choices=FRAME_METHODS, default="auto",
                            help="how skipped frames are passed over: seek, grab, or auto "
                                 "(picks per clip from its keyframe spacing; default)")
    elif task == "faces":
        parser.add_argument("--fps", type=int, default=0,
                            help="frames searched per second of video (default: 0, every frame, as "
                                 "OpenFace does)")
        parser.add_argument("--face-size", type=_positive_int, default=FACE_SIZE,
                            help=f"side of the saved square face images in pixels (default: {FACE_SIZE})")
    else:
        parser.add_argument("--sample-rate", type=_positive_int, default=AUDIO_SAMPLE_RATE,
                            help=f"output sample rate in Hz (default: {AUDIO_SAMPLE_RATE})")
        parser.add_argument("--timeout", type=_positive_float, default=FFMPEG_TIMEOUT_S,
                            help="seconds one ffmpeg call may take before its clip is logged as "
                                 f"failed (default: {FFMPEG_TIMEOUT_S:g})")
    return parser


def find_videos(video_dirs, suffix):
    """clip name -> path; a clip name found twice is returned separately as a failure.
    ``suffix``: one file suffix or a tuple of them."""
    suffixes = (suffix,) if isinstance(suffix, str) else tuple(suffix)
    videos, duplicates = {}, []
    paths = []
    for video_dir in video_dirs:
        for folder, subfolders, names in os.walk(video_dir):
            # Outputs of earlier runs (frame folders, wavs) hold no videos: do not walk them.
            subfolders[:] = [d for d in subfolders if not (d.startswith((".", "Image-")) or d in ("audio", FACES_DIR))]
            paths += [Path(folder) / name for name in names if name.lower().endswith(suffixes)]
    for path in sorted(paths):
        if path.suffix.lower() not in suffixes or path.name.startswith(".") or not path.is_file():
            continue
        if path.stem in videos:
            duplicates.append((path.stem, str(path), f"duplicate clip name, already taken "
                                                     f"by {videos[path.stem]}"))
        else:
            videos[path.stem] = path
    return videos, duplicates


def read_split_clips(split_files, layout):
    clips = []
    for split_file in split_files:
        if not split_file.is_file():
            raise SystemExit(f"--split-file {split_file} does not exist.")
        try:
            text = split_file.read_text(encoding="utf-8-sig", errors="replace")
        except OSError as error:
            raise SystemExit(f"--split-file {split_file} cannot be read ({error.strerror}).")
        for line in text.splitlines():
            clip = layout.clip_from_split_line(line) if line.strip() else None
            if clip:
                clips.append(clip)
    return list(dict.fromkeys(clips))


def _run_clip_job(clip, work, *args, **kwargs):
    """(clip, None) on success, (clip, reason) on failure: one bad file never stops the run."""
    try:
        work(*args, **kwargs)
        return clip, None
    except MediaError as error:
        return clip, str(error)
    except Exception as error:  # a decoder crash on one odd file must not stop the run
        return clip, f"{type(error).__name__}: {error}"


def _frames_job(job):
    clip, video, out_dir, fps, method, decoder_threads = job
    return _run_clip_job(clip, extract_frames, video, out_dir, fps=fps, method=method,
                         decoder_threads=decoder_threads)


def _faces_job(job):
    clip, video, out_dir, fps, face_size, decoder_threads = job
    return _run_clip_job(clip, extract_faces, video, out_dir, fps=fps, face_size=face_size,
                         decoder_threads=decoder_threads)


def _audio_job(job):
    clip, video, wav_path, sample_rate, ffmpeg, timeout = job
    return _run_clip_job(clip, extract_audio, video, wav_path, sample_rate=sample_rate, ffmpeg=ffmpeg,
                         timeout=timeout)


def _init_worker():
    import cv2
    cv2.setNumThreads(1)  # the pool is the parallelism; nested threads only contend


def run_jobs(worker, jobs, workers, description, quiet=False):
    """Yield (clip, failure reason or None) for every job, in completion order."""
    bar = tqdm(total=len(jobs), desc=description, unit="clip", dynamic_ncols=True,
               disable=quiet)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield worker(job)
                bar.update()
            return
        workers = min(workers, len(jobs))
        chunk = max(1, min(16, len(jobs) // (workers * 8)))
        # Not fork: a child forked from a parent that already used OpenCV (tests, the
        # benchmark) can inherit a held decoder lock and hang forever.
        with multiprocessing.get_context("spawn").Pool(workers, _init_worker) as pool:
            for result in pool.imap_unordered(worker, jobs, chunksize=chunk):
                yield result
                bar.update()
    finally:
        bar.close()


def _write_failure_log(log_path, script, failures):
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"# {script} on {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                  f"{len(failures)} failed clip(s); columns: clip, video, reason\n")
        for clip, video, reason in sorted(failures):
            log.write(f"{clip}\t{video}\t{reason}\n")


def run(layout, task, argv=None):
    """Run one preprocessing task (`frames` or `audio`); return the process exit code."""
    script = SCRIPTS[task]
    args = build_parser(layout, task).parse_args(argv)
    if task == "faces" and args.fps < 0:
        raise SystemExit("--fps must be 0 (every frame) or more.")
    root = args.root
    if root.exists() and not root.is_dir():
        raise SystemExit(f"--root {root} is a file, not a folder.")
    video_dirs = video_folders(args.video_dir, root, layout)
    video_dir = video_dirs[0] if len(video_dirs) == 1 else root

    videos, failures = find_videos(video_dirs, layout.suffixes)
    clips = sorted(videos)
    if args.split_file:
        clips = read_split_clips(args.split_file, layout)
        failures += [(clip, "-", f"listed in --split-file but no {clip} video ({layout.pattern}) "
                                 f"under {video_dir}") for clip in clips if clip not in videos]
        clips = [clip for clip in clips if clip in videos]
    if not clips:
        flag = "--video-dir" if args.video_dir else "--root (no --video-dir given)"
        raise SystemExit(f"{flag}: no {layout.pattern} videos to process under "
                         f"{video_dir}" + (" for the given --split-file." if args.split_file
                                           else "."))

    decoder_threads = POOL_DECODER_THREADS if args.workers > 1 else None
    if task == "frames":
        out_dir = root / frames_dir_name(args.fps)
        outputs = {clip: out_dir / clip for clip in clips}
        make_job = lambda clip: (clip, str(videos[clip]), str(outputs[clip]), args.fps,
                                 args.method, decoder_threads)
        worker = _frames_job
    elif task == "faces":
        out_dir = root / FACES_DIR
        outputs = {clip: out_dir / clip for clip in clips}
        make_job = lambda clip: (clip, str(videos[clip]), str(outputs[clip]), args.fps, args.face_size,
                                 decoder_threads)
        worker = _faces_job
    else:
        out_dir = root / "audio"
        outputs = {clip: out_dir / f"{clip}.wav" for clip in clips}
        try:
            ffmpeg = find_ffmpeg()
        except MediaError as error:
            raise SystemExit(f"{error}.")
        make_job = lambda clip: (clip, str(videos[clip]), str(outputs[clip]),
                                 args.sample_rate, ffmpeg, args.timeout)
        worker = _audio_job
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"--root: cannot create {out_dir} ({error.strerror}).")

    todo = [clip for clip in clips if not outputs[clip].exists()]
    already = len(clips) - len(todo)
    done = 0
    try:
        for clip, reason in run_jobs(worker, [make_job(c) for c in todo], args.workers,
                                     f"{layout.name} {script}"):
            if reason is None:
                done += 1
            else:
                failures.append((clip, str(videos[clip]), reason))
    except KeyboardInterrupt:
        raise SystemExit(f"Interrupted after {done} new clip(s); finished clips are kept, "
                         "rerun the same command to resume.")

    log_path = root / f"{script}_failures.log"
    print(f"{layout.name} {script}: {done} done, {already} already there, "
          f"{len(failures)} failed; output in {out_dir}")
    if failures:
        _write_failure_log(log_path, f"data/{layout_key(layout)}/{script}.py", failures)
        print(f"Failure reasons: {log_path}")
    elif log_path.exists():
        log_path.unlink()  # the log describes the latest run only
    if done == 0 and already == 0:
        print("Nothing could be processed.")
        return 1
    return 0


def video_folders(video_dir, root, layout):
    """--video-dir, else the layout's usual folders under --root that exist, else --root."""
    if video_dir is not None:
        if not video_dir.is_dir():
            raise SystemExit(f"--video-dir: video folder {video_dir} does not exist.")
        return [video_dir]
    if not root.is_dir():
        usual = " or ".join(f"<root>/{d}" for d in layout.video_subdirs)
        raise SystemExit(f"--root: {root} does not exist, so there are no videos to find in "
                         f"{usual}; pass --video-dir or an existing --root.")
    found = [root / d for d in layout.video_subdirs if (root / d).is_dir()]
    return found or [root]


def layout_key(layout):
    return next(key for key, value in LAYOUTS.items() if value is layout)


def main(dataset, task, argv=None):
    """Entry point for the thin data/<dataset>/*.py scripts."""
    raise SystemExit(run(LAYOUTS[dataset], task, argv))
