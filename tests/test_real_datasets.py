"""Loaders of CREMA-D, AVE, Kinetics-Sounds and VGGSound on fixtures in the layouts users have.

The split files are built from real lines of the released and official files (kept below as
data); the wavs and frame folders are tiny stand-ins written where the released scripts
(or this project's) put them.
"""
import csv
import json
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from config import Config, get_dataset_spec
from datasets import av_base, splits as fmt
from datasets.audio import AudioRecipe, log_spectrogram
from datasets.av_base import IMAGENET_MEAN, IMAGENET_STD
from datasets.builders import build_data
from tests.media_fixtures import write_wav
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]

# ---- real lines (first lines of each file unless said otherwise) ----------------------------
# CREMA-D train.csv / test.csv (data/CREMAD/ of the OLM release and of OGM-GE).
CREMAD_TRAIN = """1088_IOM_NEU_XX,NEU
1017_IWW_HAP_XX,HAP
1033_ITS_HAP_XX,HAP
1054_ITS_ANG_XX,ANG
1069_IWW_SAD_XX,SAD
1068_IOM_NEU_XX,NEU
1054_TSI_FEA_XX,FEA
1088_IEO_DIS_MD,DIS
1059_IWL_ANG_XX,ANG
1048_TIE_SAD_XX,SAD
1080_ITS_DIS_XX,DIS
1009_IEO_HAP_HI,HAP""".splitlines()
CREMAD_TEST = """1041_TIE_NEU_XX,NEU
1071_MTI_SAD_XX,SAD
1028_WSI_DIS_XX,DIS
1016_IEO_HAP_LO,HAP
1087_IEO_FEA_LO,FEA
1082_ITH_HAP_XX,HAP""".splitlines()
# Kinetics-Sounds my_train.txt / my_test.txt (the test file names clips differently).
KS_TRAIN = """--4-0ihtnBU_000058_000068,10,4
--6q_33gNew_000132_000142,10,27
-00nar1nEPc_000033_000043,10,13
-1IlTIWPNs4_000027_000037,10,23
-239HZbaZ0M_000164_000174,10,25
-24HxQDHOAM_000001_000011,10,6
-2IdUKJVuMY_000004_000014,10,28
-2UWP3n_05A_000360_000370,10,25""".splitlines()
KS_TEST = """-3Mwkq-7TV4_2,10,23
-74csnCOiUs_0,10,14
-7aeB7vFtB4_37,10,16
-942XqJakUQ_0,10,26
-9nQwLUdlJo_0,10,5
-C52lVsuJvg_33,10,9
-E2dqOULQgY_60,10,11
-G8N5FxjZbw_1,10,8""".splitlines()
# vggsound.csv: its first three lines, then rows written here in the same format.
VGG_REAL = """---g-f_I2yQ,1,people marching,test
--0PQM4-hqg,30,waterfall burbling,train
--56QUhyDQM,185,playing tennis,train""".splitlines()
VGG_MADE = """Vm0aaaaaaa1,10,people marching,train
Vm0aaaaaaa2,0,people marching,train
Vm0aaaaaaa3,20,waterfall burbling,train
Vm0aaaaaaa4,5,waterfall burbling,test
Vm0aaaaaaa5,7,playing tennis,test
Vm0aaaaaaa6,30,"male speech, man speaking",train
Vm0aaaaaaa7,40,"male speech, man speaking",train
Vm0aaaaaaa8,50,"male speech, man speaking",test""".splitlines()
# AVE trainSet.txt / valSet.txt / testSet.txt (copies in github haoyi-duan/DG-SCT, data/AVE/):
# chosen lines of five classes, with every kind of repeated video ID the files hold.
AVE_TRAIN = """Banjo&5xOWesepO7U&good&0&10
Banjo&4m4aH1ZE9gI&good&0&10
Mandolin&7ZywE3aGJic&good&0&10
Mandolin&5EMLPHVw-Lo&good&0&10
Violin, fiddle&0AZfjBY9tHE&good&0&10
Violin, fiddle&06dCAQutFeI&good&0&10
Acoustic guitar&-DSwrKDGI7c&good&0&10
Acoustic guitar&-4oPjbOiSjI&good&0&10
Violin, fiddle&-GJvu5hr6w4&good&0&10
Violin, fiddle&-9_5_2i4igQ&good&0&10
Ukulele&0f_iTO5t3hU&good&0&10
Banjo&0f_iTO5t3hU&good&0&10
Banjo&1cmo1SGxJnc&good&0&10
Ukulele&2qVuxENcRvw&good&0&10""".splitlines()
AVE_VAL = """Banjo&7ObzaFIzTzI&good&0&10
Mandolin&4z5WBEcI_80&good&3&10
Violin, fiddle&-jX3sWAtiWE&good&0&10
Acoustic guitar&-EJOUazJf_s&good&0&10
Banjo&-GJvu5hr6w4&good&0&10
Banjo&3tsi7DKGrWQ&good&0&10
Mandolin&3tsi7DKGrWQ&good&0&10
Mandolin&2qVuxENcRvw&good&0&10""".splitlines()
AVE_TEST = """Banjo&2RC9m3ztmBg&good&0&10
Mandolin&1cmo1SGxJnc&good&0&10
Violin, fiddle&0Gd5jNxWRTM&good&0&10
Acoustic guitar&--sbZ5YMSm4&good&0&8
Acoustic guitar&-9_5_2i4igQ&good&0&10
Mandolin&0f_iTO5t3hU&good&0&10""".splitlines()

FRAME_LEVELS = (40, 120, 200)  # gray level of the i-th kept frame, so a loaded frame tells its index
TINY = dict(image_size=16, sample_rate=8000, audio_seconds=0.5, n_fft=62, hop_length=125,
            spec_frames=16, val_fraction=0.25, batch_size=8, workers=0, fps=1, max_missing=0.0)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OLM_CACHE", str(tmp_path / "cache"))


def write_clip(wav: Path, frames: Path) -> None:
    write_wav(wav, seconds=0.25, sample_rate=8000)
    frames.mkdir(parents=True, exist_ok=True)
    for k, level in enumerate(FRAME_LEVELS):  # named after the source frame (30 fps, 1 kept per second)
        cv2.imwrite(str(frames / f"{30 * k:05d}.jpg"), np.full((12, 12, 3), level, np.uint8))


def write_lines(path: Path, lines, bom=False, crlf=False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ("\r\n" if crlf else "\n").join(lines) + "\n"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


def csv_row(line):
    return next(csv.reader([line]))


def make_cremad(root: Path, layout="released") -> dict:
    for line in CREMAD_TRAIN + CREMAD_TEST:
        clip = line.split(",")[0]
        write_clip(root / "AudioWAV" / f"{clip}.wav", root / "Image-01-FPS" / clip)
    write_lines(root / "train.csv", CREMAD_TRAIN, bom=True, crlf=True)  # as some copies are
    write_lines(root / "test.csv", CREMAD_TEST)
    return dict(classes=["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"], total=(12, 6), audio="AudioWAV",
                frames="Image-01-FPS", suffix="")


def make_kinetics(root: Path, layout="released") -> dict:
    for source, lines in (("train", KS_TRAIN), ("test", KS_TEST)):
        for line in lines:
            clip = line.split(",")[0]
            audio = f"audio_{source}" if layout == "released" else "audio"
            write_clip(root / audio / f"{clip}.wav", root / "Image-01-FPS" / clip)
        write_lines(root / f"my_{source}.txt", lines, crlf=True)
    return dict(classes=[str(i) for i in range(29)], total=(8, 8), frames="Image-01-FPS", suffix="",
                audio={"train": "audio_train", "test": "audio_test"} if layout == "released" else "audio")


def make_vggsound(root: Path, layout="released") -> dict:
    lines = VGG_REAL + VGG_MADE
    for line in lines:
        ytid, start, _, source = csv_row(line)
        clip = f"{ytid}_{int(start):06d}"
        if layout == "released":
            write_clip(root / f"{source}-audios" / f"{source}-set" / f"{clip}.wav",
                       root / f"{source}-videos" / f"{source}-set-img" / "Image-01-FPS" / f"{clip}.mp4")
        else:
            write_clip(root / "audio" / f"{clip}.wav", root / "Image-01-FPS" / clip)
    write_lines(root / "vggsound.csv", lines)
    return dict(classes=["waterfall burbling", "playing tennis", "people marching", "male speech, man speaking"],
                total=(7, 4), suffix=".mp4" if layout == "released" else "",
                audio={"train": "train-audios/train-set", "test": "test-audios/test-set"}
                if layout == "released" else "audio",
                frames={"train": "train-videos/train-set-img/Image-01-FPS",
                        "test": "test-videos/test-set-img/Image-01-FPS"}
                if layout == "released" else "Image-01-FPS")


def make_ave(root: Path, layout="released") -> dict:
    frames = "visual" if layout == "released" else "Image-01-FPS"
    for line in AVE_TRAIN + AVE_VAL + AVE_TEST:
        clip = line.split("&")[1]
        write_clip(root / "audio" / f"{clip}.wav", root / frames / clip)
    for name, lines in (("trainSet", AVE_TRAIN), ("valSet", AVE_VAL), ("testSet", AVE_TEST)):
        write_lines(root / f"{name}.txt", lines)
    return dict(classes=["Acoustic_guitar", "Banjo", "Mandolin", "Ukulele", "Violin-fiddle"],
                total=None, audio="audio", frames=frames, suffix="")


FIXTURES = {"CREMAD": make_cremad, "AVE": make_ave, "KineticSound": make_kinetics, "VGGSound": make_vggsound}


def tiny_config(dataset: str, root: Path, **overrides) -> Config:
    spec = get_dataset_spec(dataset)
    return Config(**{**spec.defaults, **TINY, "dataset": spec.name, "data_root": str(root), **overrides})


def build(dataset: str, root: Path, **overrides):
    return build_data(tiny_config(dataset, root, **overrides), get_dataset_spec(dataset))


def clip_names(dataset) -> set:
    return {clip.name for clip in dataset.clips}


def folder_of(expected, key, split):
    value = expected[key]
    return value[split] if isinstance(value, dict) else value


# ---- layouts ------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["released", "project"])
@pytest.mark.parametrize("dataset", sorted(FIXTURES))
def test_each_layout_loads_as_is(dataset, layout, tmp_path):
    expected = FIXTURES[dataset](tmp_path, layout)
    data = build(dataset, tmp_path)
    assert data.class_names == expected["classes"]
    names = [clip_names(split) for split in (data.train, data.val, data.test)]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert names[1], "a validation split exists"
    if expected["total"]:
        assert (len(data.train) + len(data.val), len(data.test)) == expected["total"]
    inputs, label = data.train[0]
    assert inputs["audio"].shape == (1, 32, 16) and inputs["visual"].shape == (1, 3, 16, 16)
    for split, dataset_split in (("train", data.train), ("test", data.test)):
        clip = dataset_split.clips[0]
        assert clip.audio_path == tmp_path / folder_of(expected, "audio", split) / f"{clip.name}.wav"
        assert clip.frame_dir == tmp_path / folder_of(expected, "frames", split) / f"{clip.name}{expected['suffix']}"


def test_cremad_classes_in_released_order_and_bom_line_kept(tmp_path):
    make_cremad(tmp_path)
    data = build("CREMAD", tmp_path)
    label_of = {c.name: c.label for split in (data.train, data.val, data.test) for c in split.clips}
    assert "1088_IOM_NEU_XX" in label_of  # first line, after the byte-order mark
    assert [label_of[clip] for clip in ("1088_IOM_NEU_XX", "1017_IWW_HAP_XX", "1069_IWW_SAD_XX",
                                         "1054_TSI_FEA_XX", "1088_IEO_DIS_MD", "1054_ITS_ANG_XX")] == [0, 1, 2, 3, 4, 5]


def test_kinetics_class_index_is_the_label_index(tmp_path):
    make_kinetics(tmp_path)
    data = build("KineticSound", tmp_path)
    label_of = {c.name: c.label for c in data.test.clips}
    assert label_of["-3Mwkq-7TV4_2"] == 23 and label_of["-9nQwLUdlJo_0"] == 5


def test_audio_frames_and_splits_under_separate_roots(tmp_path):
    """AVE as the released scripts leave it: wavs under one root, frames under another."""
    make_ave(tmp_path / "AVE_Dataset", "project")
    (tmp_path / "AVE_proessed" / "AVE").mkdir(parents=True)
    (tmp_path / "AVE_Dataset" / "audio").rename(tmp_path / "AVE_proessed" / "AVE" / "audio")
    splits = tmp_path / "lists"
    splits.mkdir()
    for name in ("trainSet", "valSet", "testSet"):
        (tmp_path / "AVE_Dataset" / f"{name}.txt").rename(splits / f"{name}.txt")
    root = tmp_path / "AVE_proessed" / "AVE"
    with pytest.raises(UserError, match="trainSet.txt does not exist.*AVE-ECCV18.*--splits-dir"):
        build("AVE", root)
    data = build("AVE", root, splits_dir=str(splits), frames_root=str(tmp_path / "AVE_Dataset"))
    clip = data.test.clips[0]
    assert clip.audio_path.parent == root / "audio"
    assert clip.frame_dir.parent == tmp_path / "AVE_Dataset" / "Image-01-FPS"
    with pytest.raises(UserError, match="--audio-root .*nowhere is not a folder"):
        build("AVE", root, splits_dir=str(splits), audio_root=str(tmp_path / "nowhere"))


def test_flags_are_in_help():
    from config import build_parser

    text = build_parser("t").format_help()
    assert "--splits-dir" in text and "--audio-root" in text and "--frames-root" in text


# ---- AVE's repeated video IDs ------------------------------------------------------------

def test_ave_never_trains_on_a_val_or_test_video(tmp_path, caplog):
    make_ave(tmp_path)
    with caplog.at_level(logging.WARNING):
        data = build("AVE", tmp_path)
    train, val, test = (clip_names(s) for s in (data.train, data.val, data.test))
    assert not train & (val | test)
    # -GJvu5hr6w4 and 2qVuxENcRvw are also in val; -9_5_2i4igQ, 0f_iTO5t3hU, 1cmo1SGxJnc in test.
    assert {"-GJvu5hr6w4", "2qVuxENcRvw", "-9_5_2i4igQ", "0f_iTO5t3hU", "1cmo1SGxJnc"} <= val | test
    assert len(test) == 6 and len(val) == 7 and len(train) == 8
    counts = data.extras["ave_duplicates"]
    assert counts["train&val"] == 2 and counts["train&test"] == 3 and counts["val&test"] == 0
    assert counts["repeated in train"] == 1 and counts["repeated in val"] == 1
    label = {c.name: data.class_names[c.label] for c in data.val.clips}
    assert label["3tsi7DKGrWQ"] == "Mandolin"  # the later line wins, as in the released loader
    assert "2 in train and val" in caplog.text and "3 in train and test" in caplog.text


def test_ave_released_lists_load_with_the_same_classes(tmp_path):
    make_ave(tmp_path)
    for name in ("trainSet", "valSet", "testSet"):
        (tmp_path / f"{name}.txt").unlink()
    released = lambda line: ",".join([fmt.ave_class_name(line.split("&")[0])] + line.split("&")[1:])
    write_lines(tmp_path / "my_train.txt", [released(line) for line in AVE_TRAIN + AVE_VAL])
    write_lines(tmp_path / "my_test.txt", [released(line) for line in AVE_TEST])
    data = build("AVE", tmp_path)
    assert data.class_names == ["Acoustic_guitar", "Banjo", "Mandolin", "Ukulele", "Violin-fiddle"]
    assert not clip_names(data.train) & clip_names(data.test) and len(data.test) == 6


def test_ave_class_names_match_the_released_stat_file():
    assert [fmt.ave_class_name(name) for name in ("Violin, fiddle", "Female speech, woman speaking",
                                                  "Frying (food)", "Rodents, rats, mice", "Violin-fiddle")] == [
        "Violin-fiddle", "Female_speech-woman_speaking", "Frying_(food)", "Rodents-rats-mice", "Violin-fiddle"]


# ---- split files ---------------------------------------------------------------------------

def test_shipped_split_files_parse_with_the_released_counts():
    train, test = (fmt.read_cremad(REPO / "data" / "CREMAD" / f"{s}.csv") for s in ("train", "test"))
    assert (len(train), len(test)) == (6698, 744) and not {c for c, _ in train} & {c for c, _ in test}
    train, test = (fmt.read_kinetics(REPO / "data" / "KineticSound" / f"my_{s}.txt") for s in ("train", "test"))
    assert (len(train), len(test)) == (14799, 2597)
    assert {label for _, label in train} == {str(i) for i in range(31)}


def test_repository_split_files_are_used_when_the_root_has_none(tmp_path):
    make_kinetics(tmp_path)
    (tmp_path / "my_train.txt").unlink()
    with pytest.raises(UserError, match="skipped .* of [0-9]+ clips.*audio.*--max-missing"):
        build("KineticSound", tmp_path)  # data/KineticSound/my_train.txt, nearly nothing on disk


@pytest.mark.parametrize("dataset, split_file, header", [
    ("CREMAD", "test.csv", "clip,label"), ("VGGSound", "vggsound.csv", "# YouTube ID, start seconds, label, split"),
    ("AVE", "testSet.txt", "Category&VideoID&Quality&StartTime&EndTime"), ("KineticSound", "my_test.txt", "clip,n,label")])
def test_header_row_is_skipped(dataset, split_file, header, tmp_path):
    expected = FIXTURES[dataset](tmp_path)
    path = tmp_path / split_file
    path.write_text(header + "\n" + path.read_text())
    data = build(dataset, tmp_path)
    assert data.class_names == expected["classes"]
    assert not any("label" in name.lower() for name in clip_names(data.test))


@pytest.mark.parametrize("dataset, split_file, bad_line, line_number", [
    ("CREMAD", "train.csv", "1091_WSI_SAD_XX", 13),           # one field
    ("CREMAD", "test.csv", "1091_WSI_SAD_XX,SADNESS", 7),     # not a released class
    ("KineticSound", "my_test.txt", "just-a-clip-name", 9),
    ("VGGSound", "vggsound.csv", "Yzz,30,dog barking,validation", 12),
    ("AVE", "testSet.txt", "no ampersand here", 7)])
def test_malformed_split_line_names_file_and_line(dataset, split_file, bad_line, line_number, tmp_path):
    FIXTURES[dataset](tmp_path)
    with (tmp_path / split_file).open("a", newline="") as out:
        out.write(bad_line + "\n")
    with pytest.raises(UserError, match=f"{split_file} line {line_number} is not"):
        build(dataset, tmp_path)


@pytest.mark.parametrize("dataset, split_file", [("CREMAD", "test.csv"), ("AVE", "valSet.txt"),
                                                 ("KineticSound", "my_train.txt"), ("VGGSound", "vggsound.csv")])
def test_empty_split_file_names_the_file(dataset, split_file, tmp_path):
    FIXTURES[dataset](tmp_path)
    (tmp_path / split_file).write_text("\n")
    with pytest.raises(UserError, match="empty") as error:
        build(dataset, tmp_path)
    assert str(tmp_path / split_file) in str(error.value)


def test_missing_vggsound_csv_says_where_to_get_it(tmp_path):
    make_vggsound(tmp_path)
    (tmp_path / "vggsound.csv").unlink()
    with pytest.raises(UserError, match="vggsound.csv does not exist.*robots.ox.ac.uk"):
        build("VGGSound", tmp_path)


def test_clip_in_two_splits_is_refused_outside_ave(tmp_path):
    make_cremad(tmp_path)
    with (tmp_path / "test.csv").open("a") as out:
        out.write("1088_IOM_NEU_XX,NEU\n")
    with pytest.raises(UserError, match="1088_IOM_NEU_XX.*one split"):
        build("CREMAD", tmp_path)


# ---- validation carving ----------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["CREMAD", "KineticSound", "VGGSound"])
def test_carved_validation_is_written_and_reused(dataset, tmp_path, caplog):
    FIXTURES[dataset](tmp_path)
    first = build(dataset, tmp_path)
    val_file = tmp_path / "splits" / "val_split.csv"
    assert clip_names(first.val) <= {line.split(",")[0] for line in val_file.read_text().splitlines()}
    second = build(dataset, tmp_path)
    assert clip_names(second.val) == clip_names(first.val)
    if dataset == "CREMAD":  # the real lines of the others have too few clips per class to change
        with caplog.at_level(logging.WARNING):
            build(dataset, tmp_path, val_fraction=0.5)
        assert "carving the validation split again" in caplog.text


def test_vggsound_validation_does_not_move_while_extraction_progresses(tmp_path):
    make_vggsound(tmp_path, "project")
    full = build("VGGSound", tmp_path)
    stored = (tmp_path / "splits" / "val_split.csv").read_text()
    for clip in list(clip_names(full.train))[:2]:  # not extracted yet
        (tmp_path / "audio" / f"{clip}.wav").unlink()
        for frame in (tmp_path / "Image-01-FPS" / clip).iterdir():
            frame.unlink()
        (tmp_path / "Image-01-FPS" / clip).rmdir()
    partial = build("VGGSound", tmp_path)
    assert clip_names(partial.val) == clip_names(full.val)
    assert (tmp_path / "splits" / "val_split.csv").read_text() == stored


# ---- frames ----------------------------------------------------------------------------------

def picked_indices(frames: torch.Tensor) -> list[int]:
    red = frames[:, 0].mean(dim=(1, 2)) * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    return [min(range(3), key=lambda i: abs(FRAME_LEVELS[i] - value * 255)) for value in red.tolist()]


def test_evaluation_frames_are_segment_centres_and_training_frames_random(tmp_path):
    make_cremad(tmp_path)
    torch.manual_seed(0)
    train = build("CREMAD", tmp_path, fps=2).train
    seen = set()
    for _ in range(12):
        picks = picked_indices(train.load_frames(train.clips[0]))
        assert picks == sorted(set(picks)) and len(picks) == 2
        seen.add(tuple(picks))
    assert len(seen) > 1
    for fps, expected in ((1, [1]), (2, [0, 2]), (3, [0, 1, 2])):
        test = build("CREMAD", tmp_path, fps=fps).test
        assert [picked_indices(test.load_frames(test.clips[0])) for _ in range(3)] == [expected] * 3


def test_presence_is_read_with_one_listing_per_folder(tmp_path, monkeypatch):
    """No stat per clip: start-up on 200,000 clips must cost a few folder listings."""
    make_vggsound(tmp_path, "released")
    clips = [f"{f[0]}_{int(f[1]):06d}" for f in map(csv_row, VGG_REAL + VGG_MADE)]
    listed, probed = [], []
    real_scandir = os.scandir
    monkeypatch.setattr(av_base.os, "scandir", lambda path: listed.append(str(path)) or real_scandir(path))
    for name in ("is_file", "is_dir", "exists", "stat"):
        real = getattr(Path, name)
        monkeypatch.setattr(Path, name, lambda self, *a, _real=real, **k: probed.append(str(self)) or _real(self, *a, **k))
    build("VGGSound", tmp_path)
    assert len(set(listed)) <= 5  # two wav folders, two frame folders, the root (Image-NN-FPS?)
    assert not [path for path in probed if any(clip in path for clip in clips)]


def test_missing_wav_and_corrupt_frames_are_skipped_and_counted(tmp_path, caplog):
    from torch.utils.data import DataLoader
    from datasets.av_base import collate_skipping_bad

    make_cremad(tmp_path)
    (tmp_path / "AudioWAV" / "1088_IOM_NEU_XX.wav").unlink()
    for frame in (tmp_path / "Image-01-FPS" / "1041_TIE_NEU_XX").iterdir():  # a test clip
        frame.write_bytes(b"not a jpeg at all")
    with caplog.at_level(logging.WARNING):
        data = build("CREMAD", tmp_path, max_missing=0.2)
    assert "skipped 1 of" in caplog.text and "1088_IOM_NEU_XX" in caplog.text
    assert len(data.train) + len(data.val) == 11
    batches = list(DataLoader(data.test, batch_size=4, collate_fn=collate_skipping_bad))
    assert sum(skipped for _, _, skipped in batches) == 1


# ---- errors a user can cause -----------------------------------------------------------------

@pytest.mark.parametrize("dataset", sorted(FIXTURES))
def test_missing_root_names_the_path_and_flag(dataset, tmp_path):
    with pytest.raises(UserError, match="--data-root") as error:
        build(dataset, tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)


def test_too_many_missing_clips_name_the_root_and_flags(tmp_path):
    make_kinetics(tmp_path)
    (tmp_path / "audio_test" / "-3Mwkq-7TV4_2.wav").unlink()
    with pytest.raises(UserError, match="skipped 1 of 8.*--max-missing") as error:
        build("KineticSound", tmp_path)
    assert "--data-root" in str(error.value) and str(tmp_path) in str(error.value)
    assert len(build("KineticSound", tmp_path, max_missing=0.2).test) == 7


def test_missing_test_clips_name_the_split_file_they_came_from(tmp_path):
    """Kinetics-Sounds' my_test.txt names clips <ytid>_<N>, unlike the train clips'
    ytid_start_end: test files named the train way are all missing, and the error says which
    file the expected names came from."""
    make_kinetics(tmp_path)
    for line in KS_TEST:
        clip = line.split(",")[0]
        (tmp_path / "audio_test" / f"{clip}.wav").rename(tmp_path / "audio_test" / f"{clip}_000000_000010.wav")
    with pytest.raises(UserError, match="test split") as error:
        build("KineticSound", tmp_path)
    assert f"clip names from {tmp_path / 'my_test.txt'}" in str(error.value)
    assert "-3Mwkq-7TV4_2.wav" in str(error.value)


def test_vggsound_with_nothing_on_disk_names_the_root(tmp_path):
    make_vggsound(tmp_path, "project")
    for folder in ("audio", "Image-01-FPS"):
        (tmp_path / folder).rename(tmp_path / f"moved-{folder}")
    with pytest.raises(UserError, match="--data-root") as error:
        build("VGGSound", tmp_path)
    assert str(tmp_path / "audio") in str(error.value)


def test_registered_defaults_are_the_released_recipe():
    from config import build_parser, resolve_config

    for name in ("cremad", "AVE", "kineticsound", "VGGSound"):
        cfg = resolve_config(build_parser("t").parse_args(["--dataset", name]))
        assert (cfg.image_size, cfg.n_fft, cfg.hop_length, cfg.spec_frames) == (224, 512, 353, 188)
        assert (cfg.batch_size, cfg.lr, cfg.fusion, cfg.sample_rate) == (64, 1e-4, "bilinear", 22050)
        # OLM's held-out signal as released: a fresh batch of the training batch's size every step
        assert (cfg.heldout_every, cfg.heldout_batch_size) == (1, 64)


# ---- numerics as released ----------------------------------------------------------------------

def released_log_spectrogram(samples: np.ndarray, pad_mode="reflect", n_fft=512, hop=353) -> np.ndarray:
    """librosa 0.8's stft written out: pad n_fft/2 each side (reflect, its default), periodic
    Hann window, one real FFT per hop; then log(|S| + 1e-7)."""
    padded = np.pad(samples.astype(np.float64), n_fft // 2, mode=pad_mode)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    count = 1 + (len(padded) - n_fft) // hop
    frames = np.stack([padded[i * hop:i * hop + n_fft] * window for i in range(count)], axis=1)
    return np.log(np.abs(np.fft.rfft(frames, axis=0)) + 1e-7)


def test_spectrogram_matches_the_released_computation():
    rate = 22050
    t = np.arange(3 * rate) / rate
    rng = np.random.default_rng(0)
    samples = (0.5 * np.sin(2 * np.pi * (200 + 300 * t) * t) * np.exp(-t)
               + 0.05 * rng.standard_normal(t.size)).astype(np.float32)
    ours = log_spectrogram(samples, AudioRecipe())
    expected = released_log_spectrogram(samples)
    assert ours.shape == expected.shape == (257, 188)
    np.testing.assert_allclose(ours, expected, atol=2e-3)
    # Zero padding (librosa >= 0.10's default) moves the edge frames: the pin above could fail.
    zeros = released_log_spectrogram(samples, pad_mode="constant")
    assert np.abs(zeros[:, [0, -1]] - expected[:, [0, -1]]).max() > 0.5
    np.testing.assert_allclose(zeros[:, 2:-2], expected[:, 2:-2], atol=1e-9)


def test_main_trains_one_epoch_on_a_released_cremad_layout(tmp_path):
    import main

    make_cremad(tmp_path / "cremad")
    out = tmp_path / "run"
    cfg = tiny_config("CREMAD", tmp_path / "cremad", epochs=1, device="cpu", out=str(out),
                      progress=False, plots=False, method="olm", batch_size=5)
    results = main.run(cfg)
    stored = json.loads((out / "results.json").read_text())
    assert stored["classes"] == ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"] == results["classes"]
    assert stored["best_epoch"] == 1 and set(stored["test"]) == {"audio", "visual", "fusion"}
