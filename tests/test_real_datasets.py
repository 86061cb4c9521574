"""Loaders of CREMA-D, AVE, Kinetics-Sounds and VGGSound on tiny fixtures in each processed layout."""
import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from config import Config, get_dataset_spec
from datasets.av_base import IMAGENET_MEAN, IMAGENET_STD, collate_skipping_bad
from datasets.builders import build_data
from tests.media_fixtures import write_wav
from utils.errors import UserError

FRAME_LEVELS = (40, 120, 200)  # gray level of frame i, so a loaded frame tells its index
TINY = dict(image_size=16, sample_rate=8000, audio_seconds=0.5, n_fft=62, hop_length=125,
            spec_frames=16, val_fraction=0.25, batch_size=8, workers=0, fps=1)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OLM_CACHE", str(tmp_path / "cache"))


def write_clip(root: Path, audio_folder: str, clip: str) -> None:
    write_wav(root / audio_folder / f"{clip}.wav", seconds=0.25, sample_rate=8000)
    frames = root / "Image-01-FPS" / clip
    frames.mkdir(parents=True, exist_ok=True)
    for index, level in enumerate(FRAME_LEVELS):
        cv2.imwrite(str(frames / f"{index:05d}.jpg"), np.full((12, 12, 3), level, np.uint8))


def make_cremad(root: Path) -> dict:
    split_rows = {"train": [], "test": []}
    for emotion in ("NEU", "ANG", "HAP"):
        for actor in range(6):
            clip = f"10{actor:02d}_DFA_{emotion}_XX"
            split_rows["train" if actor < 4 else "test"].append(f"{clip},{emotion}")
            write_clip(root, "AudioWAV", clip)
    for split, lines in split_rows.items():
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return dict(classes=["ANG", "HAP", "NEU"], sizes=(9, 3, 6), audio="AudioWAV")


def make_ave(root: Path) -> dict:
    categories = ("Church bell", "Male speech, man speaking", "Dog")
    files = {"train": ["Category&VideoID&Quality&StartTime&EndTime"], "val": [], "test": []}
    for c, category in enumerate(categories):
        for n in range(5):
            clip = f"vid-{c}{n}_x"
            files["train" if n < 3 else "val" if n == 3 else "test"].append(f"{category}&{clip}&good&0&10")
            write_clip(root, "audio", clip)
    for split, lines in files.items():
        (root / f"{split}Set.txt").write_text("\n".join(lines) + "\n")
    return dict(classes=sorted(categories), sizes=(9, 3, 3), audio="audio")


def make_kinetics(root: Path) -> dict:
    files = {"train": [], "test": []}
    for label in (0, 2, 10):  # sorted as numbers, not as text
        for n in range(6):
            clip = f"yt{label}{n}_{n:06d}_{n + 10:06d}"
            files["train" if n < 4 else "test"].append(f"{clip},10,{label}")
            write_clip(root, "audio", clip)
    for split, lines in files.items():
        (root / f"my_{split}.txt").write_text("\n".join(lines) + "\n")
    return dict(classes=["0", "2", "10"], sizes=(9, 3, 6), audio="audio")


def make_vggsound(root: Path) -> dict:
    lines = ["# YouTube ID, start seconds, label, train/test split"]  # vggsound_with_head.csv style
    for c, label in enumerate(("dog barking", "people marching, stomping", "wind noise")):
        for n in range(7):
            ytid, start = f"Y{c}{n}-ab", 30 * n
            lines.append(f'{ytid},{start},"{label}",{"train" if n < 4 else "test"}')
            if n < 6:  # the seventh clip was never downloaded: absent on disk, not an error
                write_clip(root, "audio", f"{ytid}_{start:06d}")
    (root / "vggsound.csv").write_text("\n".join(lines) + "\n")
    return dict(classes=["dog barking", "people marching, stomping", "wind noise"],
                sizes=(9, 3, 6), audio="audio")


FIXTURES = {"CREMAD": make_cremad, "AVE": make_ave, "KineticSound": make_kinetics, "VGGSound": make_vggsound}


def tiny_config(dataset: str, root: Path, **overrides) -> Config:
    spec = get_dataset_spec(dataset)
    return Config(**{**spec.defaults, **TINY, "dataset": spec.name, "data_root": str(root), **overrides})


def build(dataset: str, root: Path, **overrides):
    cfg = tiny_config(dataset, root, **overrides)
    return build_data(cfg, get_dataset_spec(dataset))


def clip_names(dataset) -> set:
    return {clip.name for clip in dataset.clips}


@pytest.mark.parametrize("dataset", sorted(FIXTURES))
def test_loader_builds_disjoint_splits_with_sorted_classes(dataset, tmp_path):
    expected = FIXTURES[dataset](tmp_path)
    data = build(dataset, tmp_path)
    assert data.class_names == expected["classes"]
    assert (len(data.train), len(data.val), len(data.test)) == expected["sizes"]
    names = [clip_names(split) for split in (data.train, data.val, data.test)]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert sorted({c.label for c in data.val.clips}) == [0, 1, 2]  # stratified: every class in val
    inputs, label = data.train[0]
    assert inputs["audio"].shape == (1, 32, 16) and inputs["visual"].shape == (1, 3, 16, 16)
    clip = data.train.clips[0]
    assert clip.audio_path == tmp_path / expected["audio"] / f"{clip.name}.wav"
    assert label == clip.label and data.class_names[label] in expected["classes"]


def test_kinetics_sounds_label_index_sorts_numerically(tmp_path):
    make_kinetics(tmp_path)
    data = build("KineticSound", tmp_path)
    label_of = {c.name: data.class_names[c.label] for c in data.test.clips}
    assert label_of["yt104_000004_000014"] == "10" and label_of["yt24_000004_000014"] == "2"


@pytest.mark.parametrize("dataset", ["CREMAD", "KineticSound", "VGGSound"])
def test_carved_validation_is_written_and_reused(dataset, tmp_path, caplog):
    FIXTURES[dataset](tmp_path)
    first = build(dataset, tmp_path)
    val_file, train_file = tmp_path / "splits" / "val_split.csv", tmp_path / "splits" / "train_split.csv"
    assert val_file.is_file() and train_file.is_file()
    assert {line.split(",")[0] for line in val_file.read_text().splitlines()} == clip_names(first.val)
    # Swap one clip between the stored train and val lists (same class): a second build must
    # read the stored split rather than carve its own.
    val_rows = val_file.read_text().splitlines()
    train_rows = train_file.read_text().splitlines()
    moved_out = val_rows[0]
    moved_in = next(r for r in train_rows if r.rsplit(",", 1)[1] == moved_out.rsplit(",", 1)[1])
    val_file.write_text("\n".join([moved_in] + val_rows[1:]) + "\n")
    train_file.write_text("\n".join([r for r in train_rows if r != moved_in] + [moved_out]) + "\n")
    second = build(dataset, tmp_path)
    assert moved_in.split(",")[0] in clip_names(second.val)
    assert moved_out.split(",")[0] in clip_names(second.train)
    # A different --val-fraction no longer fits the stored split: carved again, with a warning.
    with caplog.at_level(logging.WARNING):
        third = build(dataset, tmp_path, val_fraction=0.5)
    assert "carving the validation split again" in caplog.text
    assert len(third.val) == 6 and len(val_file.read_text().splitlines()) == 6


def test_ave_uses_its_official_validation_split(tmp_path):
    make_ave(tmp_path)
    data = build("AVE", tmp_path)
    assert clip_names(data.val) == {"vid-03_x", "vid-13_x", "vid-23_x"}
    assert not (tmp_path / "splits").exists()


def test_frames_kept_at_another_rate_are_found(tmp_path):
    make_kinetics(tmp_path)
    (tmp_path / "Image-01-FPS").rename(tmp_path / "Image-02-FPS")
    data = build("KineticSound", tmp_path)
    assert data.train.clips[0].frame_dir.parent == tmp_path / "Image-02-FPS"
    assert len(data.train) == 9


def picked_indices(frames: torch.Tensor) -> list[int]:
    """Frame indices of a (K, 3, S, S) stack of the fixture's uniform gray frames."""
    red = frames[:, 0].mean(dim=(1, 2)) * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    return [min(range(3), key=lambda i: abs(FRAME_LEVELS[i] - value * 255)) for value in red.tolist()]


def test_frames_are_distinct_and_in_time_order(tmp_path):
    make_cremad(tmp_path)
    torch.manual_seed(0)
    train = build("CREMAD", tmp_path, fps=2).train
    seen = set()
    for _ in range(12):
        picks = picked_indices(train.load_frames(train.clips[0]))
        assert picks == sorted(set(picks)) and len(picks) == 2
        seen.add(tuple(picks))
    assert len(seen) > 1  # training picks are random
    test = build("CREMAD", tmp_path, fps=2).test
    assert picked_indices(test.load_frames(test.clips[0])) == [0, 2]  # evenly spaced
    test = build("CREMAD", tmp_path, fps=3).test
    assert picked_indices(test.load_frames(test.clips[0])) == [0, 1, 2]


def test_missing_wav_and_corrupt_frames_are_skipped_and_counted(tmp_path, caplog):
    make_cremad(tmp_path)
    (tmp_path / "AudioWAV" / "1000_DFA_NEU_XX.wav").unlink()  # a train clip
    for frame in (tmp_path / "Image-01-FPS" / "1005_DFA_ANG_XX").iterdir():  # a test clip
        frame.write_bytes(b"not a jpeg at all")
    with caplog.at_level(logging.WARNING):
        data = build("CREMAD", tmp_path, max_missing=0.2)
    assert "skipped 1 of" in caplog.text and "1000_DFA_NEU_XX" in caplog.text
    assert len(data.train) + len(data.val) == 11
    loader = DataLoader(data.test, batch_size=4, collate_fn=collate_skipping_bad)
    batches = list(loader)
    assert sum(skipped for _, _, skipped in batches) == 1
    assert sum(len(labels) for _, labels, _ in batches if labels is not None) == len(data.test) - 1


@pytest.mark.parametrize("dataset", sorted(FIXTURES))
def test_missing_root_names_the_path_and_flag(dataset, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match="--data-root") as error:
        build(dataset, missing)
    assert str(missing) in str(error.value)


@pytest.mark.parametrize("dataset, split_file", [("CREMAD", "test.csv"), ("AVE", "valSet.txt"),
                                                 ("KineticSound", "my_train.txt"), ("VGGSound", "vggsound.csv")])
def test_empty_split_file_names_the_file(dataset, split_file, tmp_path):
    FIXTURES[dataset](tmp_path)
    (tmp_path / split_file).write_text("\n")
    with pytest.raises(UserError, match="empty") as error:
        build(dataset, tmp_path)
    assert str(tmp_path / split_file) in str(error.value)


def test_missing_split_file_names_it_and_the_flag(tmp_path):
    make_ave(tmp_path)
    (tmp_path / "testSet.txt").unlink()
    with pytest.raises(UserError, match="--data-root") as error:
        build("AVE", tmp_path)
    assert f"split file {tmp_path / 'testSet.txt'} does not exist" in str(error.value)


def test_too_many_missing_clips_name_the_root_and_flags(tmp_path):
    make_ave(tmp_path)
    (tmp_path / "audio" / "vid-00_x.wav").unlink()  # 2 of 9 training clips: over 5%
    (tmp_path / "audio" / "vid-10_x.wav").unlink()
    with pytest.raises(UserError, match="skipped 2 of 9.*--max-missing") as error:
        build("AVE", tmp_path)
    assert "--data-root" in str(error.value) and str(tmp_path) in str(error.value)
    assert len(build("AVE", tmp_path, max_missing=0.25).train) == 7


def test_split_with_no_clip_on_disk_names_the_root(tmp_path):
    make_ave(tmp_path)
    for wav in (tmp_path / "audio").glob("vid-*[012]_x.wav"):
        wav.unlink()  # all training audio
    with pytest.raises(UserError, match="train split has no usable clips") as error:
        build("AVE", tmp_path)
    assert str(tmp_path) in str(error.value) and "--data-root" in str(error.value)


def test_vggsound_with_nothing_on_disk_names_the_root(tmp_path):
    make_vggsound(tmp_path)
    for folder in ("audio", "Image-01-FPS"):
        for path in (tmp_path / folder).iterdir():
            path.rename(tmp_path / f"moved-{path.name}")
    with pytest.raises(UserError, match="--data-root") as error:
        build("VGGSound", tmp_path)
    assert str(tmp_path / "audio") in str(error.value)


def test_clip_in_two_splits_is_refused(tmp_path):
    make_cremad(tmp_path)
    with (tmp_path / "test.csv").open("a") as out:
        out.write("1000_DFA_NEU_XX,NEU\n")
    with pytest.raises(UserError, match="1000_DFA_NEU_XX.*one split"):
        build("CREMAD", tmp_path)


@pytest.mark.parametrize("dataset, split_file, bad_line, line_number", [
    ("KineticSound", "my_test.txt", "just-a-clip-name", 7),
    ("VGGSound", "vggsound.csv", "Yzz,30,dog barking,validation", 23),
    ("AVE", "testSet.txt", "no ampersand here", 4)])
def test_malformed_split_line_names_file_and_line(dataset, split_file, bad_line, line_number, tmp_path):
    FIXTURES[dataset](tmp_path)
    with (tmp_path / split_file).open("a") as out:
        out.write(bad_line + "\n")
    with pytest.raises(UserError, match=f"{split_file} line {line_number} is not"):
        build(dataset, tmp_path)


def test_registered_defaults_are_the_released_recipe():
    from config import build_parser, resolve_config

    for name in ("cremad", "AVE", "kineticsound", "VGGSound"):
        cfg = resolve_config(build_parser("t").parse_args(["--dataset", name]))
        assert (cfg.image_size, cfg.n_fft, cfg.hop_length, cfg.spec_frames) == (224, 512, 353, 188)
        assert (cfg.batch_size, cfg.lr, cfg.fusion, cfg.sample_rate) == (64, 1e-4, "bilinear", 22050)


def test_main_trains_one_epoch_on_a_cremad_fixture(tmp_path):
    import main

    make_cremad(tmp_path / "cremad")
    out = tmp_path / "run"
    cfg = tiny_config("CREMAD", tmp_path / "cremad", epochs=1, device="cpu", out=str(out),
                      progress=False, plots=False, method="olm", batch_size=5)
    results = main.run(cfg)
    stored = json.loads((out / "results.json").read_text())
    assert stored["classes"] == ["ANG", "HAP", "NEU"] == results["classes"]
    assert stored["best_epoch"] == 1 and stored["dataset"] == "CREMAD"
    assert set(stored["test"]) == {"audio", "visual", "fusion"}
    assert any((tmp_path / "cache" / "spectrograms").rglob("*.npz"))  # the cache was used
