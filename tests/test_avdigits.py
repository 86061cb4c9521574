"""AV-Digits materialization: layout, splits, voice-disjointness, idempotence, determinism."""

import csv
import logging
import shutil
import time

import numpy as np
import pytest
import soundfile as sf

from datasets import avdigits
from datasets.avdigits import AVDigitsError, materialize, params_key

NUM_IMAGES = 1797
SMALL = dict(image_size=16, frames_per_clip=2)      # knobs that show in the files
SUBSET = dict(images=120, **SMALL)                   # a build in well under a second


@pytest.fixture(scope="module")
def built(avdigits_default):
    """The session's default build (tests/conftest.py): every full build costs seconds."""
    return avdigits_default


def read_split_file(root, name):
    with open(root / f"{name}.csv", newline="") as handle:
        return [tuple(row) for row in csv.reader(handle)]


def read_meta(root):
    with open(root / "meta.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_layout_matches_the_real_audio_visual_datasets(built):
    classes = (built / "classes.txt").read_text().splitlines()
    assert classes == list(avdigits.CLASS_NAMES)
    rows = [row for name in avdigits.SPLIT_NAMES for row in read_split_file(built, name)]
    assert all(len(row) == 2 and row[1] in classes for row in rows)
    clip, _ = rows[0]
    samples, rate = sf.read(str(built / "audio" / f"{clip}.wav"), dtype="int16")
    assert rate == 16000 and samples.ndim == 1 and len(samples) == 16000
    assert sf.info(str(built / "audio" / f"{clip}.wav")).subtype == "PCM_16"
    frames = sorted(p.name for p in (built / "Image-01-FPS" / clip).iterdir())
    assert frames == ["00000.jpg", "00001.jpg", "00002.jpg"]
    import cv2
    image = cv2.imread(str(built / "Image-01-FPS" / clip / "00000.jpg"), cv2.IMREAD_UNCHANGED)
    assert image.shape == (32, 32, 3)
    assert len(list((built / "audio").iterdir())) == NUM_IMAGES


def test_splits_are_disjoint_cover_all_images_and_are_stratified(built):
    splits = {name: read_split_file(built, name) for name in avdigits.SPLIT_NAMES}
    clip_sets = {name: {clip for clip, _ in rows} for name, rows in splits.items()}
    assert sum(len(s) for s in clip_sets.values()) == NUM_IMAGES
    assert len(set.union(*clip_sets.values())) == NUM_IMAGES
    for name, rows in splits.items():
        assert {label for _, label in rows} == set(avdigits.CLASS_NAMES), name
    assert abs(len(splits["train"]) / NUM_IMAGES - 0.7) < 0.01
    image_indices = {int(row["image_index"]) for row in read_meta(built)}
    assert image_indices == set(range(NUM_IMAGES))


def test_val_and_test_audio_comes_from_voices_unheard_in_training(built):
    meta = read_meta(built)
    voices = {name: {r["voice"] for r in meta if r["split"] == name}
              for name in avdigits.SPLIT_NAMES}
    assert all(voices.values())
    assert not voices["train"] & voices["val"]
    assert not voices["train"] & voices["test"]
    assert not voices["val"] & voices["test"]
    recordings = {name: {r["audio_file"] for r in meta if r["split"] == name}
                  for name in avdigits.SPLIT_NAMES}
    assert not recordings["train"] & recordings["test"]
    for row in meta:     # the paired recording speaks the sample's own digit
        assert row["audio_file"].split("/")[-1].startswith(row["label"] + "_")
        low, high = avdigits.DEFAULT_AUDIO_SNR_DB
        assert low <= float(row["snr_db"]) <= high


def test_second_call_with_same_knobs_touches_nothing(built):
    watched = [built / "audio" / "avd_0000.wav", built / "train.csv",
               built / "Image-01-FPS" / "avd_0000" / "00000.jpg", built / ".materialized.json"]
    before = [p.stat().st_mtime_ns for p in watched]
    started = time.perf_counter()
    assert materialize(built) == built
    assert time.perf_counter() - started < 1.0
    assert [p.stat().st_mtime_ns for p in watched] == before


def files_of(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# Determinism, the images subset, rebuilding on changed knobs and skipping a corrupt clip, on
# 120-image subsets: a full build costs seconds, and the session's full build is checked above.
def test_same_seed_is_byte_identical_and_a_changed_knob_rebuilds_skipping_corrupt_clips(tmp_path, caplog):
    first = materialize(tmp_path / "first", **SUBSET)
    twin = materialize(tmp_path / "twin", **SUBSET)
    assert files_of(first) == files_of(twin)
    for name in files_of(first):  # every wav, frame, split file, meta.csv and the marker
        assert (first / name).read_bytes() == (twin / name).read_bytes(), name
    # The subset is stratified: every class in every split; knobs show in the files.
    assert len(list((first / "audio").iterdir())) == SUBSET["images"]
    for name in avdigits.SPLIT_NAMES:
        assert {label for _, label in read_split_file(first, name)} == set(avdigits.CLASS_NAMES), name
    import cv2
    some_clip = read_split_file(first, "train")[0][0]
    assert sorted(p.name for p in (first / "Image-01-FPS" / some_clip).iterdir()) == ["00000.jpg", "00001.jpg"]
    assert cv2.imread(str(first / "Image-01-FPS" / some_clip / "00001.jpg")).shape == (16, 16, 3)

    # Changed knobs (and changed assets: one clip no longer decodes) rebuild in place.
    assets = tmp_path / "assets"
    shutil.copytree(avdigits.ASSETS_DIR / "clips", assets / "clips")
    shutil.copy(avdigits.ASSETS_DIR / "clips.csv", assets / "clips.csv")
    victim = sorted((assets / "clips").iterdir())[0]
    victim.write_bytes(b"not a flac file")
    old_wav = (twin / "audio" / f"{some_clip}.wav").read_bytes()
    with caplog.at_level(logging.WARNING, logger="datasets.avdigits"):
        assert materialize(twin, **{**SUBSET, "audio_snr_db": (15.0, 20.0)}, assets_dir=assets) == twin
    assert (twin / "audio" / f"{some_clip}.wav").read_bytes() != old_wav
    assert all(15.0 <= float(row["snr_db"]) <= 20.0 for row in read_meta(twin))
    marker = avdigits.read_marker(twin)
    assert marker["params"]["audio_snr_db"] == [15.0, 20.0] and marker["params"]["images"] == SUBSET["images"]
    assert marker["skipped_clips"] == 1 and "skipped 1" in caplog.text
    assert victim.name not in (twin / "meta.csv").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["assets", "first", "twin"]   # no staging left over


def test_params_key_is_stable_and_tracks_every_knob():
    assert params_key() == params_key(seed=0)
    assert params_key(seed=1) != params_key()
    assert params_key(visual_noise_std=0.1) != params_key()
    assert params_key(split=(0.8, 0.1, 0.1)) != params_key()
    assert params_key(images=500) != params_key() == params_key(images=None)
    assert len(params_key()) == 10


@pytest.mark.parametrize("knobs, flag", [
    (dict(audio_snr_db=(5, -5)), "audio_snr_db"),
    (dict(visual_occlusion=1.0), "visual_occlusion"),
    (dict(frames_per_clip=0), "frames_per_clip"),
    (dict(split=(0.5, 0.5, 0.5)), "split"),
    (dict(images=50), "images"),
    (dict(images=2000), "images"),
])
def test_bad_knobs_fail_with_a_sentence_naming_them(knobs, flag, tmp_path):
    with pytest.raises(AVDigitsError, match=flag):
        materialize(tmp_path / "never", **knobs)
    assert not (tmp_path / "never").exists()


def test_missing_assets_is_one_clear_error(tmp_path):
    with pytest.raises(AVDigitsError, match="assets not found.*clips.csv"):
        materialize(tmp_path / "out", assets_dir=tmp_path / "no_such_assets")


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(AVDigitsError, match="refusing to replace"):
        materialize(foreign, **SMALL)
    assert (foreign / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("snr_db", [-10.0, 0.0, 10.0])
def test_rendered_audio_has_the_requested_snr(snr_db):
    speech = np.sin(np.linspace(0, 400 * np.pi, 8000)).astype(np.float32) * 0.5
    mixture = avdigits.render_audio(speech, np.random.default_rng(0), snr_db)
    assert mixture.shape == (16000,) and np.max(np.abs(mixture)) == pytest.approx(0.9, 1e-5)
    clean = avdigits.render_audio(speech, np.random.default_rng(0), None)
    scale = float(mixture @ clean) / float(clean @ clean)   # projection onto the placed word
    noise = mixture - scale * clean
    word = clean != 0
    measured = 10 * np.log10(np.mean((scale * clean[word]) ** 2) / np.mean(noise ** 2))
    assert measured == pytest.approx(snr_db, abs=0.5)


def test_occlusion_blanks_a_square_of_the_requested_side():
    image = np.full((8, 8), 16)
    (frame,) = avdigits.render_frames(image, np.random.default_rng(3), 0.0, 0.5, 1, 8)
    assert frame.shape == (8, 8, 3)
    assert int((frame[..., 0] == 0).sum()) == 16
    assert int((frame[..., 0] == 255).sum()) == 48


def test_the_imbalanced_setting_is_the_candidate_the_selection_log_chose():
    # datasets/avdigits.py IMBALANCED must be the knobs benchmarks/imbalance_search.py measured.
    from benchmarks.imbalance_search import CANDIDATES, CHOSEN
    from datasets.avdigits import IMBALANCED
    from datasets.registry import get_dataset_spec

    knobs, flags = CANDIDATES[CHOSEN]
    assert knobs == IMBALANCED
    defaults = get_dataset_spec("AVDigitsImbalanced").defaults
    assert defaults["image_size"] == IMBALANCED["image_size"] == int(flags[flags.index("--image-size") + 1])


def test_canvas_and_clutter_draw_the_digit_somewhere_on_a_larger_board(tmp_path):
    # The imbalanced setting's rendering: the 8x8 digit lands at a seeded place of the canvas.
    import numpy as np

    from datasets.avdigits import place_on_canvas

    digit = np.ones((8, 8), dtype=np.float32)
    places = set()
    for seed in range(6):
        board = place_on_canvas(digit, np.random.default_rng(seed), 12, 0, None)
        assert board.shape == (12, 12) and board.sum() == 64
        rows, cols = np.nonzero(board)
        places.add((rows.min(), cols.min()))
    assert len(places) > 1
    cluttered = place_on_canvas(digit * 0, np.random.default_rng(0), 12, 3, np.ones((5, 8, 8), np.float32))
    assert 0 < cluttered.sum() <= 3 * 16
