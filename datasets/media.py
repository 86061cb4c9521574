"""Per-clip media work: keep a few frames per second as JPEGs, pull 16 kHz mono wav.

Both writers are atomic: output appears under its final name only once complete, so a
killed run leaves nothing that looks finished and a rerun simply redoes that clip.
"""
import os
import shutil
import subprocess
from pathlib import Path

AUDIO_SAMPLE_RATE = 16000
JPEG_QUALITY = 95  # OpenCV's default, which the released frames were written with
FRAME_METHODS = ("auto", "grab", "seek")
# A process pool already keeps every core busy; extra decoder threads per process only
# add contention (measured: one thread was never slower in the pool).
POOL_DECODER_THREADS = 1
SEEK_BACKOFF_FRAMES = 16
FFMPEG_TIMEOUT_S = 120.0  # a 10 s clip takes well under a second; only a hung call gets near


class MediaError(Exception):
    """One clip could not be processed; the message is the reason for the failure log."""


def frames_dir_name(fps):
    """`Image-01-FPS` for 1 frame per second: the folder name the released loaders read."""
    return f"Image-{int(fps):02d}-FPS"


def temp_sibling(path):
    """Hidden sibling name for in-progress output (loaders never list dot-files)."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def find_ffmpeg():
    """The pip-shipped ffmpeg (known to have every decoder we need), else one on PATH."""
    try:
        import imageio_ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        pass
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise MediaError("no ffmpeg found: pip install imageio-ffmpeg or put ffmpeg on PATH")
    return exe


def extract_audio(video_path, wav_path, sample_rate=AUDIO_SAMPLE_RATE, ffmpeg=None,
                  timeout=FFMPEG_TIMEOUT_S):
    """Write the first audio stream of `video_path` as mono PCM16 wav at `sample_rate`.

    ffmpeg gets `timeout` seconds: one hung file must cost its clip, not block a worker."""
    wav_path = Path(wav_path)
    partial = temp_sibling(wav_path)
    command = [
        ffmpeg or find_ffmpeg(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        "-i", str(video_path), "-map", "0:a:0", "-vn", "-ac", "1", "-ar", str(sample_rate),
        "-c:a", "pcm_s16le", "-f", "wav", str(partial),
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        partial.unlink(missing_ok=True)
        raise MediaError(f"ffmpeg timed out after {timeout:g} s (--timeout)") from None
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        message = result.stderr.strip()
        if "matches no streams" in message:
            raise MediaError("video has no audio stream")
        last_line = message.splitlines()[-1] if message else f"exit code {result.returncode}"
        raise MediaError(f"ffmpeg failed: {last_line}")
    os.replace(partial, wav_path)


def _quiet_opencv():
    """Corrupt files are expected and reported in the failure log; keep the decoders' own
    complaints from scribbling over the progress bar."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    import cv2
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def _open_capture(video_path, decoder_threads):
    _quiet_opencv()
    import cv2
    params = []
    if decoder_threads is not None and hasattr(cv2, "CAP_PROP_N_THREADS"):
        params = [cv2.CAP_PROP_N_THREADS, int(decoder_threads)]
    capture = cv2.VideoCapture(str(video_path), cv2.CAP_FFMPEG, params)
    if not capture.isOpened():
        capture.release()
        raise MediaError("cannot be opened as a video (corrupt or unsupported file)")
    return capture


def keyframe_indices(video_path):
    """Frame indices of keyframes, read from packet headers only (no decoding)."""
    import cv2
    if not hasattr(cv2, "CAP_PROP_LRF_HAS_KEY_FRAME"):
        return []
    capture = cv2.VideoCapture(str(video_path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_FORMAT, -1])
    keyframes, index = [], 0
    try:
        while capture.isOpened() and capture.grab():
            if capture.get(cv2.CAP_PROP_LRF_HAS_KEY_FRAME):
                keyframes.append(index)
            index += 1
    finally:
        capture.release()
    return keyframes


def kept_frame_index(k, source_fps, fps):
    """Source frame index of the k-th kept frame, rounded as the released scripts did: the
    frame rate is truncated to an integer (29.97 -> 29) and second s keeps frames
    s*29 + j*int(29/fps), j < fps. So 1 frame per second of a 30 fps clip keeps 0, 30, 60, ..."""
    whole = max(1, int(source_fps))
    second, j = divmod(k, fps)
    return second * whole + j * max(1, whole // fps)


def choose_method(video_path, source_fps, fps):
    """Seek only where keyframes sit closer together than half the gap between kept frames.

    Measured on 10 s clips: seeking wins on intra/short-GOP streams (MJPEG, mp4v, FLV1)
    but costs 2.5-5x on long-GOP H.264, because every seek re-decodes from the previous
    keyframe (OpenCV even backs off 16 frames first). grab() without retrieve() is never
    slower than decoding everything, so it is the safe choice when unsure.
    """
    step = source_fps / fps
    keyframes = keyframe_indices(video_path)
    if len(keyframes) < 2 or step < 8:
        return "grab"
    gaps = sorted(b - a for a, b in zip(keyframes, keyframes[1:]))
    return "seek" if gaps[len(gaps) // 2] <= step / 2 else "grab"


def _frames_by_grab(capture, source_fps, fps):
    """(source index, frame) of the kept frames; grab() skips the colour conversion of the rest."""
    k, wanted, index = 0, 0, 0
    while capture.grab():
        if index == wanted:
            ok, frame = capture.retrieve()
            if not ok or frame is None:
                break
            yield index, frame
            k += 1
            wanted = kept_frame_index(k, source_fps, fps)
        index += 1


def _frames_by_seek(capture, source_fps, fps):
    import cv2
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    k, position = 0, 0
    while (wanted := kept_frame_index(k, source_fps, fps)) < total:
        # OpenCV's seek re-decodes from a keyframe at least 16 frames back, so walking
        # forward is never slower for shorter gaps.
        if wanted - position > SEEK_BACKOFF_FRAMES:
            capture.set(cv2.CAP_PROP_POS_FRAMES, wanted)
        else:
            while position < wanted and capture.grab():
                position += 1
        ok, frame = capture.read()
        if not ok or frame is None:
            break
        yield wanted, frame
        position = wanted + 1
        k += 1


def source_rate(capture, fps):
    """The video's frame rate, checked usable for keeping ``fps`` frames per second."""
    import cv2
    source_fps = capture.get(cv2.CAP_PROP_FPS)
    if not source_fps or source_fps != source_fps or source_fps > 1000:
        raise MediaError(f"video reports no usable frame rate ({source_fps})")
    if fps > max(1, int(source_fps)):
        raise MediaError(f"--fps {fps} exceeds the video's frame rate ({source_fps:g})")
    return source_fps


def write_clip_folder(video_path, out_dir, decoder_threads, write):
    """Open the video and run ``write(capture, folder) -> count`` into a hidden sibling of
    ``out_dir``, renamed to ``out_dir`` when it returns: ``out_dir`` existing means the clip is
    complete, and a failure (``write`` raising) leaves nothing behind. Returns the count."""
    out_dir = Path(out_dir)
    partial = temp_sibling(out_dir)
    shutil.rmtree(partial, ignore_errors=True)  # left over from a killed run
    capture = _open_capture(video_path, decoder_threads)
    try:
        partial.mkdir(parents=True)
        count = write(capture, partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        capture.release()
    os.replace(partial, out_dir)
    return count


def write_jpeg(folder, index, image, jpeg_quality=JPEG_QUALITY):
    """``folder/<index:05d>.jpg``, named after the source frame so name order is time order."""
    import cv2
    target = Path(folder) / f"{index:05d}.jpg"
    if not cv2.imwrite(str(target), image, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]):
        raise MediaError(f"could not write {target}")


def extract_frames(video_path, out_dir, fps=1, method="auto", decoder_threads=None,
                   jpeg_quality=JPEG_QUALITY):
    """Keep `fps` frames per second of video as `out_dir/00000.jpg`, `00030.jpg`, ... (named
    after the source frame, as the released scripts did, so name order is time order);
    return the count. Written atomically (``write_clip_folder``)."""
    if method not in FRAME_METHODS:
        raise ValueError(f"method must be one of {FRAME_METHODS}, got {method!r}")

    def write(capture, folder):
        source_fps = source_rate(capture, fps)
        chosen = method if method != "auto" else choose_method(video_path, source_fps, fps)
        count = 0
        for count, (index, frame) in enumerate(
                (_frames_by_seek if chosen == "seek" else _frames_by_grab)(capture, source_fps, fps), start=1):
            write_jpeg(folder, index, frame, jpeg_quality)
        if count == 0:
            raise MediaError("no frame could be decoded")
        return count

    return write_clip_folder(video_path, out_dir, decoder_threads, write)



# ---------------------------------------------------------------- faces (MER-MULTI)

FACE_SIZE = 112          # side of the saved face crops, as OpenFace's aligned faces in MER2023's tools
FACE_MARGIN = 0.2        # the detected box grown by this share on every side (forehead, chin)
DETECTION_SIDE = 320     # frames are searched at most this large (the longer side), then cropped in full size
_FACE_DETECTOR = None


def face_detector():
    """scikit-image's bundled LBP frontal-face cascade (no download; OpenCV 5 no longer ships its
    Haar cascades), loaded once per process."""
    global _FACE_DETECTOR
    if _FACE_DETECTOR is None:
        from skimage.data import lbp_frontal_face_cascade_filename
        from skimage.feature import Cascade

        _FACE_DETECTOR = Cascade(lbp_frontal_face_cascade_filename())
    return _FACE_DETECTOR


def largest_face(frame):
    """(top, left, height, width) in ``frame``'s pixels of the largest detected face, or None."""
    import cv2
    height, width = frame.shape[:2]
    scale = min(1.0, DETECTION_SIDE / max(height, width))
    small = cv2.resize(frame, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    gray = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY)).astype("float32") / 255.0
    side = min(gray.shape)
    found = face_detector().detect_multi_scale(img=gray, scale_factor=1.2, step_ratio=1,
                                               min_size=(max(24, side // 8),) * 2, max_size=(side, side))
    if not found:
        return None
    best = max(found, key=lambda box: box["width"] * box["height"])
    return tuple(round(best[key] / scale) for key in ("r", "c", "height", "width"))


def face_crop(frame, box, size=FACE_SIZE, margin=FACE_MARGIN):
    """The square around ``box`` grown by ``margin``, clamped to the frame, resized to ``size``."""
    import cv2
    top, left, height, width = box
    side = round(max(height, width) * (1 + 2 * margin))
    centre_y, centre_x = top + height / 2, left + width / 2
    y0 = int(max(0, min(frame.shape[0] - side, centre_y - side / 2)))
    x0 = int(max(0, min(frame.shape[1] - side, centre_x - side / 2)))
    crop = frame[y0:y0 + side, x0:x0 + side]
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def _every_frame(capture):
    index = 0
    while True:
        ok, frame = capture.read()
        if not ok or frame is None:
            return
        yield index, frame
        index += 1


def extract_faces(video_path, out_dir, fps=0, face_size=FACE_SIZE, decoder_threads=None,
                  jpeg_quality=JPEG_QUALITY):
    """Save the largest face of every frame (``fps`` 0; else ``fps`` frames per second, chosen as
    the frame extraction chooses them) as ``out_dir/<frame>.jpg``, a ``face_size`` square, named
    after the source frame; frames without a face are left out, as OpenFace leaves out frames it
    cannot align. Written atomically (``write_clip_folder``); returns the number of faces saved."""
    def write(capture, folder):
        chosen = _frames_by_grab(capture, source_rate(capture, fps), fps) if fps else _every_frame(capture)
        frames = saved = 0
        for frames, (index, frame) in enumerate(chosen, start=1):
            box = largest_face(frame)
            if box is not None:
                write_jpeg(folder, index, face_crop(frame, box, face_size), jpeg_quality)
                saved += 1
        if saved == 0:
            raise MediaError("no frame could be decoded" if frames == 0 else f"no face found in {frames} frames")
        return saved

    return write_clip_folder(video_path, out_dir, decoder_threads, write)
