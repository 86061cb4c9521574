"""The data/<DATASET>/ preprocessing scripts on tiny raw datasets built in tmp_path."""
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from tests.media_fixtures import (frame_index_of, read_wav_format, write_corrupt_video,
                                  write_video, write_video_with_audio, write_wav)
from datasets.media import MediaError, choose_method, extract_frames, temp_sibling
from datasets.preprocess import ave_clip, first_field, vggsound_clip

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = (64, 48)


def run_script(script, *args, cwd):
    """Run a data/ script as a user would: a plain file, here from outside the repository,
    so its own sys.path set-up is what makes `utils` importable."""
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def summary_line(result):
    return next(line for line in result.stdout.splitlines() if " done, " in line)


def frame_indices(folder):
    return [frame_index_of(cv2.imread(str(path))) for path in sorted(folder.glob("*.jpg"))]


def snapshot_mtimes(folder):
    return {path: path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def mp4_dataset(tmp_path_factory):
    """Raw *.mp4 folder: two clips with sound, one silent, one H.264, one corrupt."""
    videos = tmp_path_factory.mktemp("raw") / "videos"
    write_video_with_audio(videos / "loud_a.mp4", seconds=3, fps=25, size=SIZE)
    write_video_with_audio(videos / "nested" / "loud_b.mp4", seconds=2, fps=30, size=SIZE)
    write_video(videos / "silent.mp4", seconds=2, fps=25, size=SIZE)
    write_video(videos / "long_gop.mp4", seconds=3, fps=25, size=SIZE, codec="h264")
    write_corrupt_video(videos / "broken.mp4")
    return videos


def test_ave_frames_are_complete_ordered_logged_and_resumable(mp4_dataset, tmp_path):
    root = tmp_path / "AVE"
    first = run_script("data/AVE/video_preprocessing.py", "--video-dir", mp4_dataset,
                       "--workers", "2", "--root", root, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "4 done, 0 already there, 1 failed" in summary_line(first)

    frames = root / "Image-01-FPS"
    assert sorted(p.name for p in frames.iterdir()) == ["long_gop", "loud_a", "loud_b", "silent"]
    assert frame_indices(frames / "loud_a") == [0, 25, 50]  # first frame of each second
    assert frame_indices(frames / "loud_b") == [0, 30]
    assert frame_indices(frames / "long_gop") == [0, 25, 50]
    # Named after the source frame, as the released scripts named them.
    assert [p.name for p in sorted((frames / "silent").iterdir())] == ["00000.jpg", "00025.jpg"]

    log = root / "video_preprocessing_failures.log"
    assert str(log) in first.stdout
    log_text = log.read_text()
    assert "data/AVE/video_preprocessing.py" in log_text
    assert "broken\t" in log_text and "cannot be opened" in log_text

    before = snapshot_mtimes(frames)
    second = run_script("data/AVE/video_preprocessing.py", "--video-dir", mp4_dataset,
                        "--workers", "1", "--root", root, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "0 done, 4 already there, 1 failed" in summary_line(second)
    assert snapshot_mtimes(frames) == before


def test_ave_audio_is_16khz_mono_and_silent_videos_fail_with_reason(mp4_dataset, tmp_path):
    root = tmp_path / "AVE"
    first = run_script("data/AVE/mp4_to_wav.py", "--video-dir", mp4_dataset, "--workers", "1",
                       "--root", root, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "2 done, 0 already there, 3 failed" in summary_line(first)
    for clip, seconds in (("loud_a", 3), ("loud_b", 2)):
        rate, channels, sample_bytes, frames = read_wav_format(root / "audio" / f"{clip}.wav")
        assert (rate, channels, sample_bytes) == (16000, 1, 2)
        assert abs(frames / rate - seconds) < 0.1
    assert sorted(p.name for p in (root / "audio").iterdir()) == ["loud_a.wav", "loud_b.wav"]
    log_text = (root / "mp4_to_wav_failures.log").read_text()
    assert "silent\t" in log_text and "no audio stream" in log_text
    assert "broken\t" in log_text

    before = snapshot_mtimes(root / "audio")
    second = run_script("data/AVE/mp4_to_wav.py", "--video-dir", mp4_dataset, "--workers", "1",
                        "--root", root, cwd=tmp_path)
    assert "0 done, 2 already there, 3 failed" in summary_line(second)
    assert snapshot_mtimes(root / "audio") == before


def test_cremad_reads_videoflash_flv_and_names_folder_by_fps(tmp_path):
    root = tmp_path / "CREMA-D"
    clips = ["1001_DFA_ANG_XX", "1002_IEO_HAP_HI"]
    for clip in clips:
        write_video(root / "VideoFlash" / f"{clip}.flv", seconds=2.5, fps=30, size=SIZE,
                    codec="flv1")
        write_wav(root / "AudioWAV" / f"{clip}.wav", seconds=2.5)
    result = run_script("data/CREMAD/video_preprocessing.py", "--fps", "2", "--workers", "1",
                        "--root", root, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 done, 0 already there, 0 failed" in summary_line(result)
    for clip in clips:
        assert frame_indices(root / "Image-02-FPS" / clip) == [0, 15, 30, 45, 60]
    assert not (root / "video_preprocessing_failures.log").exists()
    assert sorted(p.name for p in (root / "AudioWAV").iterdir()) == [f"{c}.wav" for c in clips]


@pytest.mark.parametrize("dataset", ["KineticSound", "VGGSound"])
def test_other_dataset_scripts_honour_split_file(dataset, tmp_path):
    videos = tmp_path / "raw"
    if dataset == "VGGSound":
        clips = ["abcDEF-_123_000030", "xyz_000000"]
        split_lines = ['abcDEF-_123,30,"male speech, man speaking",train', "xyz,0,dog,test"]
    else:
        clips = ["abc_000058_000068", "xyz_000001_000011"]
        split_lines = [f"{clip},10,3" for clip in clips]
    for clip in clips:
        write_video_with_audio(videos / f"{clip}.mp4", seconds=2, fps=25, size=SIZE)
    write_video(videos / "not_in_split.mp4", seconds=2, fps=25, size=SIZE)
    split = tmp_path / "split.csv"
    split.write_text("\n".join(split_lines + [split_lines[0].replace(clips[0][:3], "gone")]))

    root = tmp_path / dataset
    for script in ("video_preprocessing.py", "mp4_to_wav.py"):
        result = run_script(f"data/{dataset}/{script}", "--video-dir", videos, "--split-file",
                            split, "--workers", "1", "--root", root, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "2 done, 0 already there, 1 failed" in summary_line(result)
        log = root / f"{script[:-3]}_failures.log"
        assert "listed in --split-file" in log.read_text()
    assert sorted(p.name for p in (root / "Image-01-FPS").iterdir()) == sorted(clips)
    assert sorted(p.stem for p in (root / "audio").iterdir()) == sorted(clips)


def test_missing_video_dir_is_one_sentence_and_nonzero(tmp_path):
    missing = tmp_path / "no_such_folder"
    result = run_script("data/VGGSound/mp4_to_wav.py", "--video-dir", missing,
                        "--root", tmp_path / "out", cwd=tmp_path)
    assert result.returncode != 0
    message = result.stderr.strip()
    assert "Traceback" not in message and len(message.splitlines()) == 1
    assert "--video-dir" in message and str(missing) in message

    crema = run_script("data/CREMAD/video_preprocessing.py", "--root", tmp_path / "empty",
                       cwd=tmp_path)
    assert crema.returncode != 0 and "VideoFlash" in crema.stderr
    assert "Traceback" not in crema.stderr


def test_nothing_processable_exits_nonzero(tmp_path):
    videos = tmp_path / "raw"
    write_corrupt_video(videos / "a.mp4", seed=1)
    write_corrupt_video(videos / "b.mp4", seed=2)
    result = run_script("data/KineticSound/video_preprocessing.py", "--video-dir", videos,
                        "--workers", "1", "--root", tmp_path / "out", cwd=tmp_path)
    assert result.returncode != 0
    assert "0 done, 0 already there, 2 failed" in summary_line(result)
    assert "Traceback" not in result.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_script("data/KineticSound/mp4_to_wav.py", "--video-dir", empty,
                        "--root", tmp_path / "out", cwd=tmp_path)
    assert result.returncode != 0 and "no *.mp4 videos" in result.stderr


@pytest.mark.parametrize("codec,suffix,expected_auto", [
    ("h264", ".mp4", "grab"), ("mjpg", ".avi", "seek"), ("mp4v", ".mp4", None),
])
def test_every_method_keeps_the_same_exact_frames(codec, suffix, expected_auto, tmp_path):
    video = write_video(tmp_path / f"clip{suffix}", seconds=4, fps=25, size=SIZE, codec=codec)
    if expected_auto:
        assert choose_method(video, 25, 1) == expected_auto
    for method in ("grab", "seek", "auto"):
        for fps in (1, 3):
            out = tmp_path / f"{method}_{fps}"
            count = extract_frames(video, out, fps=fps, method=method)
            assert count == 4 * fps
            # Released rounding: second s keeps s*25 + j*int(25/fps), j < fps.
            expected = [s * 25 + j * (25 // fps) for s in range(4) for j in range(fps)]
            assert frame_indices(out) == expected, (method, fps)


def test_failed_extraction_leaves_no_folder_and_stale_partial_is_replaced(tmp_path):
    broken = write_corrupt_video(tmp_path / "broken.mp4")
    with pytest.raises(MediaError):
        extract_frames(broken, tmp_path / "frames" / "broken")
    assert not (tmp_path / "frames" / "broken").exists()
    assert not temp_sibling(tmp_path / "frames" / "broken").exists()

    video = write_video(tmp_path / "ok.mp4", seconds=2, fps=25, size=SIZE)
    stale = temp_sibling(tmp_path / "frames" / "ok")
    stale.mkdir(parents=True)
    (stale / "99999.jpg").write_bytes(b"left by a killed run")
    extract_frames(video, tmp_path / "frames" / "ok", fps=1)
    assert sorted(os.listdir(tmp_path / "frames" / "ok")) == ["00000.jpg", "00025.jpg"]
    assert not stale.exists()


def test_split_line_parsers():
    assert first_field("1001_DFA_ANG_XX,ANG") == "1001_DFA_ANG_XX"
    assert ave_clip("Church bell&RUhOCu3LNXM&good&0&10") == "RUhOCu3LNXM"
    assert ave_clip("Category&VideoID&Quality&StartTime&EndTime") is None
    assert vggsound_clip('---g-f_I2yQ,1,"people marching, chanting",test') == "---g-f_I2yQ_000001"
    assert vggsound_clip("# YouTube ID,start seconds,label,split") is None


def test_non_integer_frame_rate_is_truncated_as_released():
    from datasets.media import kept_frame_index
    assert [kept_frame_index(k, 29.97, 1) for k in range(4)] == [0, 29, 58, 87]
    assert [kept_frame_index(k, 30.0, 2) for k in range(4)] == [0, 15, 30, 45]


def test_videos_are_found_under_root_without_video_dir(tmp_path):
    root = tmp_path / "AVE_Dataset"
    write_video(root / "AVE" / "clipA.mp4", seconds=2, fps=25, size=SIZE)
    result = run_script("data/AVE/video_preprocessing.py", "--workers", "1", "--root", root, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 done" in summary_line(result) and (root / "Image-01-FPS" / "clipA").is_dir()
    ks = tmp_path / "k31"  # no usual folder: the whole root is searched, its outputs are not
    write_video(ks / "somewhere" / "clipB.mp4", seconds=2, fps=25, size=SIZE)
    result = run_script("data/KineticSound/video_preprocessing.py", "--workers", "1", "--root", ks, cwd=tmp_path)
    assert "1 done" in summary_line(result) and (ks / "Image-01-FPS" / "clipB").is_dir()


def test_ffmpeg_timeout_is_logged_per_clip(tmp_path):
    videos = tmp_path / "raw"
    write_video_with_audio(videos / "slow.mp4", seconds=2, fps=25, size=SIZE)
    root = tmp_path / "out"
    result = run_script("data/AVE/mp4_to_wav.py", "--video-dir", videos, "--workers", "1",
                        "--timeout", "0.001", "--root", root, cwd=tmp_path)
    assert "0 done, 0 already there, 1 failed" in summary_line(result)
    assert "timed out after 0.001 s" in (root / "mp4_to_wav_failures.log").read_text()


def test_workers_default_follows_cpu_affinity(tmp_path):
    result = run_script("data/AVE/mp4_to_wav.py", "--help", cwd=tmp_path)
    assert f"here {len(os.sched_getaffinity(0))})" in " ".join(result.stdout.split())


def test_root_under_a_file_is_one_sentence(tmp_path):
    videos = tmp_path / "raw"
    write_video(videos / "a.mp4", seconds=1, fps=25, size=SIZE)
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    for root in (blocker, blocker / "sub"):
        result = run_script("data/AVE/video_preprocessing.py", "--video-dir", videos, "--root", root,
                            cwd=tmp_path)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "--root" in result.stderr
