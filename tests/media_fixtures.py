"""Tiny media files for tests: videos (OpenCV, or ffmpeg for H.264 / audio tracks) and wavs.

Every video frame shows its own frame index as 8 black/white blocks (one per bit, see
`frame_image`), coarse enough to survive lossy codecs, so a test can read any extracted
frame back to the index it came from (`frame_index_of`) and check that sampling picked
the right frames in the right order.
"""
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

OPENCV_CODECS = {"mp4v": "mp4v", "mjpg": "MJPG", "flv1": "FLV1"}
INDEX_BITS, BLOCK_COLUMNS = 8, 4
DARK, BRIGHT = 20, 235


def ffmpeg_exe():
    import imageio_ffmpeg
    return imageio_ffmpeg.get_ffmpeg_exe()


def frame_image(index, width, height):
    """BGR frame whose blocks spell `index` in binary (2 rows x 4 columns, lowest bit first)."""
    image = np.full((height, width, 3), DARK, dtype=np.uint8)
    rows = INDEX_BITS // BLOCK_COLUMNS
    for bit in range(INDEX_BITS):
        if (index >> bit) & 1:
            row, column = divmod(bit, BLOCK_COLUMNS)
            image[row * height // rows:(row + 1) * height // rows,
                  column * width // BLOCK_COLUMNS:(column + 1) * width // BLOCK_COLUMNS] = BRIGHT
    return image


def frame_index_of(image):
    """Frame index (modulo 256) a decoded frame was written with, read from its blocks."""
    height, width = image.shape[:2]
    rows = INDEX_BITS // BLOCK_COLUMNS
    index = 0
    for bit in range(INDEX_BITS):
        row, column = divmod(bit, BLOCK_COLUMNS)
        # The block centre only: codecs smear the edges between blocks.
        block = image[row * height // rows:(row + 1) * height // rows,
                      column * width // BLOCK_COLUMNS:(column + 1) * width // BLOCK_COLUMNS]
        h, w = block.shape[:2]
        if block[h // 4:3 * h // 4, w // 4:3 * w // 4].mean() > (DARK + BRIGHT) / 2:
            index |= 1 << bit
    return index


def write_video(path, seconds=2.0, fps=25, size=(64, 48), codec="mp4v", gop=None):
    """Write a silent video of `seconds` at `fps`, `size` = (width, height); return its path.

    codec: "mp4v", "mjpg" or "flv1" are written by OpenCV (use .mp4, .avi, .flv); "h264"
    is encoded by the imageio-ffmpeg binary with keyframes every `gop` frames (default 250,
    the long-GOP case where seeking is slow).
    """
    import cv2
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if codec == "h264":
        with tempfile.TemporaryDirectory() as scratch:
            source = write_video(Path(scratch) / "source.avi", seconds, fps, size, "mjpg")
            _run_ffmpeg(["-i", str(source), "-c:v", "libx264", "-g", str(gop or 250),
                         "-pix_fmt", "yuv420p", str(path)])
        return path
    if codec not in OPENCV_CODECS:
        raise ValueError(f"codec must be h264 or one of {sorted(OPENCV_CODECS)}, got {codec!r}")
    width, height = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*OPENCV_CODECS[codec]),
                             fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {codec} into {path}")
    for index in range(int(round(seconds * fps))):
        writer.write(frame_image(index, width, height))
    writer.release()
    return path


def write_wav(path, seconds=2.0, sample_rate=16000, frequency=440.0, channels=1):
    """Write a 16-bit PCM sine wav; return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    time = np.arange(int(round(seconds * sample_rate))) / sample_rate
    tone = (0.3 * 32767 * np.sin(2 * np.pi * frequency * time)).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(np.repeat(tone[:, None], channels, axis=1).tobytes())
    return path


def write_video_with_audio(path, seconds=2.0, fps=25, size=(64, 48), codec="mp4v",
                           sample_rate=44100, channels=2):
    """A video as write_video plus an AAC sine track (stereo 44.1 kHz by default, so audio
    extraction has to resample and downmix); return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        video = write_video(Path(scratch) / f"video{path.suffix}", seconds, fps, size, codec)
        tone = write_wav(Path(scratch) / "tone.wav", seconds, sample_rate, channels=channels)
        _run_ffmpeg(["-i", str(video), "-i", str(tone), "-map", "0:v:0", "-map", "1:a:0",
                     "-c:v", "copy", "-c:a", "aac", "-shortest", str(path)])
    return path


def write_corrupt_video(path, size_bytes=4096, seed=0):
    """Random bytes under a video name: what a truncated or garbled download looks like."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).bytes(size_bytes))
    return path


def read_wav_format(path):
    """(sample_rate, channels, bytes_per_sample, frames) of a PCM wav."""
    with wave.open(str(path), "rb") as wav:
        return wav.getframerate(), wav.getnchannels(), wav.getsampwidth(), wav.getnframes()


def _run_ffmpeg(arguments):
    result = subprocess.run([ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", *arguments],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ffmpeg {' '.join(arguments)} failed: {result.stderr.strip()}")
