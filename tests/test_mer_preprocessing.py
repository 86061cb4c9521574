"""data/MERMULTI/: audio extraction, face images per frame and the label conversion, on
generated clips (a face from scikit-image's bundled astronaut photograph, and clips without one)."""
import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from datasets.media import extract_faces, temp_sibling
from datasets.preprocess import mer_clip
from tests.media_fixtures import read_wav_format, write_video, write_video_with_audio
from tests.test_preprocessing import run_script, snapshot_mtimes, summary_line

FACE_FRAMES = 8


def write_face_video(path, frames=FACE_FRAMES, fps=8, side=256):
    """A clip whose every frame shows the astronaut's face (about 50 px), drifting a little."""
    from skimage.data import astronaut

    photo = cv2.resize(cv2.cvtColor(astronaut(), cv2.COLOR_RGB2BGR), (side, side), interpolation=cv2.INTER_AREA)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "MJPG" if path.suffix == ".avi" else "mp4v"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (side, side))
    for k in range(frames):
        writer.write(np.roll(photo, 2 * k, axis=1))
    writer.release()
    return path


@pytest.fixture(scope="module")
def mer_raw(tmp_path_factory):
    """MER 2023-like raw folder: two face clips (.avi and .mp4), a clip with no face, a corrupt one;
    labels.csv names three of them."""
    root = tmp_path_factory.mktemp("mer") / "MER2023"
    write_face_video(root / "video" / "sample_00000001.avi")
    write_face_video(root / "video" / "sample_00000002.mp4")
    write_video(root / "video" / "sample_00000003.mp4", seconds=1, fps=8, size=(64, 48))
    (root / "video" / "sample_00000004.mp4").write_bytes(b"not a video")
    (root / "labels.csv").write_text("name,emo,val,split\nsample_00000001,happy,1.5,train\n"
                                     "sample_00000002,sad,-1.0,train\nsample_00000003,neutral,0.0,test1\n")
    return root


def test_faces_per_frame_are_saved_resumably_and_clips_without_a_face_are_logged(mer_raw, tmp_path):
    root = tmp_path / "MER2023"
    args = ["--video-dir", mer_raw / "video", "--workers", "2", "--root", root]
    first = run_script("data/MERMULTI/face_preprocessing.py", *args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "2 done, 0 already there, 2 failed" in summary_line(first)
    faces = root / "openface_face"
    assert sorted(p.name for p in faces.iterdir()) == ["sample_00000001", "sample_00000002"]
    for sample in ("sample_00000001", "sample_00000002"):
        files = sorted(p.name for p in (faces / sample).iterdir())
        assert len(files) >= FACE_FRAMES - 1 and files[0] == "00000.jpg"  # one face per frame, named by frame
        assert cv2.imread(str(faces / sample / files[0])).shape == (112, 112, 3)
    log = (root / "face_preprocessing_failures.log").read_text()
    assert "data/MERMULTI/face_preprocessing.py" in log
    assert "sample_00000003\t" in log and "no face found" in log and "sample_00000004\t" in log

    before = snapshot_mtimes(faces)
    again = run_script("data/MERMULTI/face_preprocessing.py", *args, cwd=tmp_path)
    assert "0 done, 2 already there, 2 failed" in summary_line(again)
    assert snapshot_mtimes(faces) == before


def test_face_extraction_keeps_chosen_frames_and_leaves_nothing_on_failure(mer_raw, tmp_path):
    out = tmp_path / "faces" / "one"
    count = extract_faces(mer_raw / "video" / "sample_00000001.avi", out, fps=2, face_size=64)
    assert count == 2 and sorted(p.name for p in out.iterdir()) == ["00000.jpg", "00004.jpg"]
    assert cv2.imread(str(out / "00000.jpg")).shape == (64, 64, 3)
    with pytest.raises(Exception, match="no face found"):
        extract_faces(mer_raw / "video" / "sample_00000003.mp4", tmp_path / "faces" / "none")
    assert not (tmp_path / "faces" / "none").exists() and not temp_sibling(tmp_path / "faces" / "none").exists()


def test_audio_is_16khz_mono_for_the_samples_labels_csv_names(tmp_path):
    videos = tmp_path / "video"
    for name in ("sample_00000001", "sample_00000002"):
        write_video_with_audio(videos / f"{name}.mp4", seconds=2, fps=25, size=(64, 48))
    labels = tmp_path / "labels.csv"
    labels.write_text("name,emo,val,split\nsample_00000001,happy,1.5,train\nsample_00000009,sad,,test3\n")
    root = tmp_path / "MER2023"
    result = run_script("data/MERMULTI/mp4_to_wav.py", "--video-dir", videos, "--split-file", labels,
                        "--workers", "1", "--root", root, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "1 done, 0 already there, 1 failed" in summary_line(result)  # sample_00000009 has no video
    assert sorted(p.name for p in (root / "audio").iterdir()) == ["sample_00000001.wav"]
    assert read_wav_format(root / "audio" / "sample_00000001.wav")[:3] == (16000, 1, 2)
    assert mer_clip("name,emo,val,split") is None and mer_clip("sample_1,happy,1,train") == "sample_1"


def test_released_label_file_becomes_labels_csv(tmp_path, capsys):
    # In this process (the script's main), so the test pays no interpreter start-up.
    import importlib.util

    from datasets.mer_labels import read_label_csv

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("labels_to_csv", repo / "data" / "MERMULTI" / "labels_to_csv.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    corpus = {"train_corpus": {"s1": {"emo": "happy", "val": 1.5}, "s2": {"emo": "sad", "val": -2.0}},
              "test3_corpus": {"s3": {"emo": "worried", "val": None}, "s4": {"emo": "", "val": 0.0}}}
    npz = tmp_path / "label-6way.npz"
    np.savez(npz, **{key: np.array(value, dtype=object) for key, value in corpus.items()})
    out = tmp_path / "MER2023" / "labels.csv"
    script.main(["--label-file", str(npz), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "3 labelled samples" in printed and "1 without an emotion" in printed
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["name", "emo", "val", "split"]
    samples, _ = read_label_csv(out)
    assert {(s.name, s.emotion, s.valence, s.split) for s in samples} == {
        ("s1", "happy", 1.5, "train"), ("s2", "sad", -2.0, "train"), ("s3", "worried", None, "test3")}
    with pytest.raises(SystemExit) as stopped:
        script.main(["--label-file", str(tmp_path / "none.npz"), "--out", str(out)])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in error and "none.npz" in error
