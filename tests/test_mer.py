"""OLM-Trans data and cross-validation: the MER-MULTI loader on a generated fixture in its
layout, padded batches, bad files, the fold split, one tiny two-fold run, the embedded features."""
import csv
import json
import logging
import subprocess
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import soundfile as sf
import torch

import datasets.mer as mer
import datasets.mer_labels as mer_labels
from config import Config
from datasets.mer import collate_padded, load_feature_data
from datasets.mer_avdigits import MARKER_NAME, convert
from engines.cross_validation import stratified_folds
from utils.errors import UserError

REPO = Path(__file__).resolve().parent.parent
DIMS = {"audio": 6, "visual": 5, "text": 4}
FOLDERS = {"audio": "hubert", "visual": "manet", "text": "macbert"}


def write_mer_fixture(root: Path, train_per_class=5, test_per_class=2, seed=0) -> dict:
    """Random (T, D) features with T in 2..7 and a label file in both forms; returns lengths."""
    rng = np.random.default_rng(seed)
    for folder in FOLDERS.values():
        (root / "features" / folder).mkdir(parents=True)
    rows, corpora, lengths = [], {"train_corpus": {}, "test1_corpus": {}}, {}
    for split, per_class in (("train", train_per_class), ("test1", test_per_class)):
        for emotion in mer.MER_CLASSES:
            for i in range(per_class):
                name = f"{split}_{emotion}_{i}"
                for modality, folder in FOLDERS.items():
                    steps = int(rng.integers(2, 8))
                    lengths[(name, modality)] = steps
                    np.save(root / "features" / folder / f"{name}.npy",
                            rng.normal(size=(steps, DIMS[modality])).astype(np.float32))
                valence = float(rng.uniform(-1, 1))
                rows.append([name, emotion, f"{valence:.3f}", split])
                corpora[f"{split}_corpus"][name] = {"emo": emotion, "val": valence}
    with (root / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["name", "emo", "val", "split"], *rows])
    np.savez(root / "label-6way.npz", **{k: np.array(v, dtype=object) for k, v in corpora.items()})
    return lengths


def config(root: Path, **overrides) -> Config:
    values = dict(dataset="MERMULTI", data_root=str(root), modalities="audio,visual,text",
                  audio_feature=FOLDERS["audio"], visual_feature=FOLDERS["visual"],
                  text_feature=FOLDERS["text"], max_missing=0.2)
    return Config(**{**values, **overrides})


@pytest.fixture
def mer_root(tmp_path):
    root = tmp_path / "MERMULTI"
    write_mer_fixture(root)
    return root


def test_loader_reads_pool_test_sets_and_widths(mer_root):
    data = load_feature_data(config(mer_root), mer_root)
    assert len(data.pool) == 30 and set(data.tests) == {"test1"} and len(data.tests["test1"]) == 12
    assert data.input_dims == DIMS
    assert data.class_names == list(mer.MER_CLASSES)
    assert Counter(data.pool.labels) == {i: 5 for i in range(6)}
    features, label = data.pool[0]
    valence = features.pop(mer.VALENCE_KEY)
    assert {m: f.shape[1] for m, f in features.items()} == DIMS
    assert valence.item() == pytest.approx(data.pool.samples[0].valence) and data.pool.has_valence
    assert data.pool.samples[0].name.split("_")[1] == mer.MER_CLASSES[label]


def test_two_modalities_load_only_their_folders(mer_root):
    data = load_feature_data(config(mer_root, modalities="visual,audio"), mer_root)
    assert data.modalities == ("visual", "audio")
    assert set(data.pool[3][0]) == {"visual", "audio", mer.VALENCE_KEY}


def test_collate_pads_per_batch_and_masks_real_steps(mer_root):
    lengths = write_mer_fixture(mer_root.parent / "again", seed=0)
    data = load_feature_data(config(mer_root), mer_root)
    batch = [data.pool[i] for i in range(4)] + [None]
    inputs, labels, skipped = collate_padded(batch)
    assert skipped == 1 and labels.tolist() == [data.pool[i][1] for i in range(4)]
    assert inputs[mer.VALENCE_KEY].tolist() == pytest.approx([data.pool.samples[i].valence for i in range(4)], abs=1e-6)
    for modality in DIMS:
        real = [lengths[(data.pool.samples[i].name, modality)] for i in range(4)]
        assert inputs[modality].shape == (4, max(real), DIMS[modality])
        assert inputs["masks"][modality].dtype == torch.bool
        assert inputs["masks"][modality].sum(dim=1).tolist() == real
        for row, steps in enumerate(real):
            assert torch.equal(inputs[modality][row, :steps], data.pool[row][0][modality])
            assert not inputs[modality][row, steps:].any()
    assert collate_padded([None, None]) == (None, None, 2)


def test_wrong_width_file_is_skipped_and_counted(mer_root, caplog):
    np.save(mer_root / "features" / "hubert" / "train_sad_1.npy", np.zeros((3, DIMS["audio"] + 1), np.float32))
    (mer_root / "features" / "macbert" / "train_happy_0.npy").write_bytes(b"not an array")
    with caplog.at_level(logging.WARNING):
        data = load_feature_data(config(mer_root), mer_root)
    assert len(data.pool) == 28 and data.skipped == {"train": 2, "test1": 0}
    assert "train_sad_1" not in {s.name for s in data.pool.samples}
    warnings = [r.getMessage() for r in caplog.records if "skipped 2 of 30" in r.getMessage()]
    assert len(warnings) == 1
    with pytest.raises(UserError, match="--max-missing"):
        load_feature_data(config(mer_root, max_missing=0.05), mer_root)


def test_file_broken_after_the_scan_costs_one_sample(mer_root):
    data = load_feature_data(config(mer_root), mer_root)
    np.save(data.pool.samples[2].paths["visual"], np.full((4, DIMS["visual"]), np.nan, np.float32))
    assert data.pool[2] is None
    inputs, labels, skipped = collate_padded([data.pool[i] for i in range(4)])
    assert skipped == 1 and len(labels) == 3 and inputs["audio"].shape[0] == 3


def test_missing_feature_folder_is_one_sentence_naming_it(mer_root):
    with pytest.raises(UserError, match=r"feature folder .*wav2vec does not exist"):
        load_feature_data(config(mer_root, audio_feature="wav2vec"), mer_root)


def test_npz_labels_are_read_only_when_named(mer_root, monkeypatch):
    from_csv = load_feature_data(config(mer_root), mer_root)
    from_npz = load_feature_data(config(mer_root, label_file=str(mer_root / "label-6way.npz")), mer_root)
    assert [(s.name, s.label) for s in from_npz.pool.samples] == [(s.name, s.label) for s in from_csv.pool.samples]
    assert len(from_npz.tests["test1"]) == 12

    def refuse(path):
        raise AssertionError(f"pickle file {path} read without being named")

    monkeypatch.setattr(mer_labels, "read_label_npz", refuse)
    assert len(load_feature_data(config(mer_root), mer_root).pool) == 30  # npz beside it, untouched
    (mer_root / "labels.csv").unlink()
    with pytest.raises(UserError, match="label-6way.npz exists but needs pickle.*--label-file"):
        load_feature_data(config(mer_root), mer_root)


def test_folds_are_disjoint_stratified_and_seeded():
    labels = [0] * 23 + [1] * 11 + [2] * 16
    folds = stratified_folds(labels, 5, seed=3)
    flat = np.concatenate(folds)
    assert sorted(flat.tolist()) == list(range(len(labels)))  # disjoint, covering the pool
    for fold in folds:
        counts = Counter(labels[i] for i in fold)
        for label, total in Counter(labels).items():
            assert abs(counts[label] - total / 5) < 1
    again = stratified_folds(labels, 5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again))
    other = stratified_folds(labels, 5, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(folds, other))
    with pytest.raises(UserError, match="class 1 has only 11"):
        stratified_folds(labels, 12, seed=0)


def test_two_fold_run_writes_fold_and_cv_results(mer_root, tmp_path, capsys):
    from main_trans import main

    out = tmp_path / "cv"
    args = ["--dataset", "MERMULTI", "--data-root", str(mer_root), "--modalities", "audio,visual,text",
            "--audio-feature", "hubert", "--visual-feature", "manet", "--text-feature", "macbert",
            "--feature-dim", "0", "--model-type", "emt", "--d-model", "16", "--num-layers", "1", "--num-heads", "2",
            "--num-bottleneck", "2", "--epochs", "1", "--folds", "2", "--batch-size", "8",
            "--method", "olm", "--device", "cpu", "--out", str(out), "--no-progress", "--no-plots"]
    main(args)
    heads = ["audio", "visual", "text", "fusion"]
    folds_file = json.loads((out / "folds.json").read_text())
    assert folds_file["fold_seed"] == 0 and sorted(Counter(folds_file["fold_of"].values())) == [1, 2]
    for k in (1, 2):
        results = json.loads((out / f"fold{k}" / "results.json").read_text())
        assert results["fold"] == k and (out / f"fold{k}" / "best.pt").is_file()
        assert set(results["scores"]) == {"val", "test1"}
        for split in ("val", "test1"):
            assert list(results["scores"][split]) == heads
            assert 0.0 <= results["scores"][split]["fusion"]["f1_weighted"] <= 1.0
    cv = json.loads((out / "cv_results.json").read_text())
    assert cv["heads"] == heads and cv["folds_run"] == 2 and cv["test_sets"] == ["test1"]
    accs = [f["scores"]["test1"]["audio"]["acc"] for f in cv["per_fold"]]
    assert cv["summary"]["test1"]["audio"]["acc"]["mean"] == pytest.approx(np.mean(accs))
    assert cv["summary"]["val"]["text"]["f1_weighted"]["std"] == pytest.approx(
        np.std(cv["summary"]["val"]["text"]["f1_weighted"]["per_fold"]))
    assert "test1 wF1" in capsys.readouterr().out

    best = (out / "fold1" / "best.pt").stat().st_mtime_ns
    with pytest.raises(UserError, match="already holds a cross-validation run"):
        main(args)
    main(args[:-4] + ["--resume", str(out), "--no-progress", "--no-plots"])  # both folds done: reused
    assert (out / "fold1" / "best.pt").stat().st_mtime_ns == best


def test_wrong_dataset_kind_and_bad_flags_are_user_errors(mer_root):
    from main_trans import main

    with pytest.raises(UserError, match="run main.py"):
        main(["--dataset", "AVDigits", "--device", "cpu"])
    with pytest.raises(UserError, match="--modalities"):
        main(["--dataset", "MERMULTI", "--data-root", str(mer_root), "--modalities", "audio", "--device", "cpu"])
    with pytest.raises(UserError, match="--d-model 30 must be divisible by --num-heads 4"):
        main(["--dataset", "MERMULTI", "--d-model", "30", "--num-heads", "4", "--device", "cpu"])
    script = subprocess.run(["bash", str(REPO / "scripts" / "run_trans_logits_com.sh"), "cpu", "vit"],
                            capture_output=True, text=True)
    assert script.returncode == 2 and "emt, mbt, umt or ca" in script.stderr


def write_avdigits_source(root: Path) -> None:
    """A three-clip-per-split stand-in in the AV-Digits layout (wav + frame folders + splits)."""
    rng = np.random.default_rng(0)
    classes = ["zero", "one"]
    (root / "audio").mkdir(parents=True)
    (root / "classes.txt").write_text("zero\none\n")
    for split in ("train", "val", "test"):
        lines = []
        for i in range(3):
            name, label = f"{split}{i}", classes[i % 2]
            tone = np.sin(np.linspace(0, 400 * (i + 1), 16000)) * np.hanning(16000)
            sf.write(root / "audio" / f"{name}.wav", (tone + 0.01 * rng.normal(size=16000)).astype(np.float32), 16000)
            frames = root / "Image-01-FPS" / name
            frames.mkdir(parents=True)
            for f in range(2):
                cv2.imwrite(str(frames / f"{f:05d}.jpg"), rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
            lines.append(f"{name},{label}\n")
        (root / f"{split}.csv").write_text("".join(lines))
    (root / ".materialized.json").write_text(json.dumps({"format_version": 1, "params": {"seed": 0}}))


def test_embedded_features_build_is_idempotent_and_loadable(tmp_path):
    source, root = tmp_path / "AVDigits", tmp_path / "cache" / "AVDigitsFeatures"
    write_avdigits_source(source)
    assert convert(source, root) == root
    with (root / "labels.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert Counter(r["split"] for r in rows) == {"train": 6, "test1": 3}
    files = sorted((root / "features").rglob("*.npy"))
    assert len(files) == 27
    stamps = {p: p.stat().st_mtime_ns for p in [*files, root / MARKER_NAME]}
    assert convert(source, root) == root  # second call: nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert sorted(p.name for p in root.parent.iterdir()) == ["AVDigitsFeatures"]  # no staging left
    data = load_feature_data(Config(modalities="audio,visual,text", audio_feature="logmel-40",
                                    visual_feature="rows-8", text_feature="noisy-tokens"), root)
    assert data.class_names == ["zero", "one"] and len(data.pool) == 6
    assert data.input_dims == {"audio": 40, "visual": 8, "text": 12}
    (source / ".materialized.json").write_text(json.dumps({"format_version": 1, "params": {"seed": 1}}))
    convert(source, root)  # the source changed: rebuilt
    assert (root / MARKER_NAME).stat().st_mtime_ns != stamps[root / MARKER_NAME]


# --- MER2023 metrics, per-split test folders, cross-validation resume ----------------------

def add_test_split_in_its_own_folder(root: Path, split: str, with_valence: bool, seed=1) -> list[str]:
    """A test set kept where the released config keeps it: <root>/features_<split>/<name>/."""
    rng = np.random.default_rng(seed)
    names, rows = [], []
    for emotion in mer.MER_CLASSES:
        name = f"{split}_{emotion}"
        for modality, folder in FOLDERS.items():
            (root / f"features_{split}" / folder).mkdir(parents=True, exist_ok=True)
            np.save(root / f"features_{split}" / folder / f"{name}.npy",
                    rng.normal(size=(3, DIMS[modality])).astype(np.float32))
        rows.append([name, emotion, f"{rng.uniform(-1, 1):.3f}" if with_valence else "", split])
        names.append(name)
    with (root / "labels.csv").open("a", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return names


def test_test_sets_in_features_split_folders_are_found(mer_root):
    names = add_test_split_in_its_own_folder(mer_root, "test2", with_valence=True)
    add_test_split_in_its_own_folder(mer_root, "test3", with_valence=False, seed=2)
    data = load_feature_data(config(mer_root), mer_root)
    assert set(data.tests) == {"test1", "test2", "test3"}
    assert [s.name for s in data.tests["test2"].samples] == names
    assert data.tests["test2"].samples[0].paths["audio"].parent == mer_root / "features_test2" / "hubert"
    assert data.tests["test1"].samples[0].paths["audio"].parent == mer_root / "features" / "hubert"
    assert data.tests["test2"].has_valence and not data.tests["test3"].has_valence


def test_mer2023_metrics_and_fold_ensemble_match_scikit_learn():
    from sklearn.metrics import f1_score, mean_squared_error

    from engines.mer_scoring import Predictions, ensemble, mer2023_scores

    labels = np.array([0, 0, 1, 1, 2, 2, 2, 1])
    folds = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        folds.append(Predictions(names=[f"s{i}" for i in range(8)], labels=labels,
                                 probabilities={"fusion": rng.dirichlet(np.ones(3), size=8),
                                                "audio": rng.dirichlet(np.ones(3), size=8)},
                                 valence_true=np.linspace(-1, 1, 8), valence_pred=rng.normal(size=8)))
    one = mer2023_scores(folds[0], "test1")
    pred = folds[0].probabilities["fusion"].argmax(axis=1)
    wf1 = f1_score(labels, pred, average="weighted")
    mse = mean_squared_error(folds[0].valence_true, folds[0].valence_pred)
    assert wf1 != pytest.approx(f1_score(labels, pred, average="macro"))  # the fixture tells them apart
    assert one["fusion"]["f1_weighted"] == pytest.approx(wf1)
    assert one["fusion"]["valence_mse"] == pytest.approx(mse)
    assert one["fusion"]["combined"] == pytest.approx(wf1 - 0.25 * mse)
    assert one["fusion"]["mer2023"] == pytest.approx(wf1 - 0.25 * mse)
    assert "valence_mse" not in one["audio"]
    test3 = mer2023_scores(folds[0], "test3")  # MER2023 ranks test3 by weighted F1 alone
    assert "combined" not in test3["fusion"] and test3["fusion"]["mer2023"] == pytest.approx(wf1)

    shuffled = Predictions(names=folds[2].names[::-1], labels=labels[::-1],
                           probabilities={h: p[::-1] for h, p in folds[2].probabilities.items()},
                           valence_true=folds[2].valence_true[::-1], valence_pred=folds[2].valence_pred[::-1])
    merged = ensemble([folds[0], folds[1], shuffled])  # aligned by sample name, not by row
    mean_probs = np.mean([f.probabilities["fusion"] for f in folds], axis=0)
    mean_valence = np.mean([f.valence_pred for f in folds], axis=0)
    scores = mer2023_scores(merged, "test2")
    expected_f1 = f1_score(labels, mean_probs.argmax(axis=1), average="weighted")
    assert scores["fusion"]["f1_weighted"] == pytest.approx(expected_f1)
    assert scores["fusion"]["valence_mse"] == pytest.approx(mean_squared_error(folds[0].valence_true, mean_valence))


TINY_RUN = ["--dataset", "MERMULTI", "--modalities", "audio,visual", "--audio-feature", "hubert",
            "--visual-feature", "manet", "--feature-dim", "0", "--model-type", "mbt", "--d-model", "8",
            "--num-layers", "1", "--num-heads", "2", "--num-bottleneck", "2", "--dim-feedforward", "8",
            "--epochs", "4", "--folds", "2", "--batch-size", "4", "--method", "olm", "--device", "cpu",
            "--cpu-threads", "1", "--no-progress", "--no-plots"]


def comparable(cv: dict) -> dict:
    """cv_results.json without wall times and folder names."""
    drop = {"seconds", "run_dir"}
    if isinstance(cv, dict):
        return {k: comparable(v) for k, v in cv.items() if k not in drop}
    if isinstance(cv, list):
        return [comparable(v) for v in cv]
    return cv


def test_killed_cross_validation_resumes_to_the_uninterrupted_result(mer_root, tmp_path):
    import os
    import signal
    import sys
    import threading
    import time

    from main_trans import main

    add_test_split_in_its_own_folder(mer_root, "test2", with_valence=True)
    run = TINY_RUN + ["--data-root", str(mer_root)]
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, str(REPO / "main_trans.py"), *run, "--out", str(killed)],
                             cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = killed / "fold1" / "last.pt"
    killed_in_fold_one = []

    def kill_after_first_checkpoint():
        deadline = time.time() + 120
        while not checkpoint.is_file() and child.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if child.poll() is None:  # still inside fold 1
            child.send_signal(signal.SIGKILL)
            killed_in_fold_one.append(True)

    # The uninterrupted run trains in this process while the child starts and trains beside it.
    watcher = threading.Thread(target=kill_after_first_checkpoint)
    watcher.start()
    main(run + ["--out", str(tmp_path / "whole")])
    watcher.join()
    child.wait()
    assert killed_in_fold_one, child.stderr.read().decode()[-2000:]
    child.stderr.close()
    whole = json.loads((tmp_path / "whole" / "cv_results.json").read_text())
    assert set(whole["ensemble"]) == {"test1", "test2"}
    assert "combined" in whole["ensemble"]["test2"]["fusion"] and "valence_mse" in whole["summary"]["test1"]["fusion"]

    assert not (killed / "fold1" / "results.json").exists() and not (killed / "cv_results.json").exists()
    first_epoch = (killed / "fold1" / "metrics.jsonl").read_text().splitlines()[0]

    # Resuming names the folder only: the saved options (MBT, tiny widths, 4 epochs) come back.
    with pytest.raises(UserError, match=r"--model-type 'emt' \(saved: 'mbt'\)"):
        main(["--resume", str(killed), "--model-type", "emt"])
    main(["--resume", str(killed), "--no-progress", "--no-plots"])
    resumed = json.loads((killed / "cv_results.json").read_text())
    assert resumed["model_type"] == "mbt"
    # Continued from last.pt, not retrained: epoch 1's row (with its wall time) is the killed run's.
    assert (killed / "fold1" / "metrics.jsonl").read_text().splitlines()[0] == first_epoch
    assert comparable(resumed) == comparable(whole)


def test_mer_multi_defaults_are_the_released_recipe_and_live_in_the_registry():
    from config import get_dataset_spec
    from main_trans import parse_config

    cfg = parse_config(["--dataset", "MERMULTI"])
    assert (cfg.batch_size, cfg.heldout_batch_size, cfg.epochs, cfg.folds) == (2, 2, 10, 5)
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.num_bottleneck, cfg.dim_feedforward) == (768, 3, 8, 12, 0)
    assert (cfg.lr, cfg.weight_decay, cfg.coef_lr, cfg.coef_weight_decay) == (1e-4, 2e-4, 1e-4, 2e-4)
    assert cfg.modalities == "audio,visual" and cfg.selection_metric == "f1_weighted"
    for name in ("MERMULTI", "AVDigitsFeatures"):  # where --help reads them from
        defaults = get_dataset_spec(name).defaults
        assert {"batch_size", "d_model", "dim_feedforward", "selection_metric", "modalities"} <= set(defaults)


def test_predict_stores_softmax_probabilities_so_the_fold_ensemble_averages_probabilities(mer_root):
    # predict() is what cross-validation calls: if it kept raw logits, ensemble() would average
    # logits. Its rows must be each head's softmax of the model's logits.
    from engines.mer_scoring import ensemble, predict

    data = load_feature_data(config(mer_root, modalities="audio,visual"), mer_root)
    heads = ("audio", "visual", "fusion")
    scale = {"audio": 3.0, "visual": -2.0, "fusion": 5.0}

    class Logits(torch.nn.Module):  # logits far from probabilities: large, negative, unnormalized
        heads = ("audio", "visual", "fusion")

        def forward(self, inputs):
            pooled = {m: inputs[m].sum(dim=(1, 2)) for m in ("audio", "visual")}
            base = torch.stack([pooled["audio"] + k * pooled["visual"] for k in range(6)], dim=1)
            return {h: scale[h] * base for h in self.heads}

    model = Logits()
    test = next(iter(data.tests.values()))
    first = predict(model, test, 4, torch.device("cpu"), collate_padded)
    assert len(first.names) == len(test)
    for head in heads:
        probabilities = first.probabilities[head]
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5) and (probabilities >= 0).all()
    inputs, _, _ = collate_padded([test[i] for i in range(len(test))])
    expected = torch.softmax(model(inputs)["fusion"], dim=1).numpy()
    assert np.allclose(first.probabilities["fusion"], expected, atol=1e-5)
    # Two folds whose logits differ by a scale: the ensemble is the mean of probabilities.
    scale["fusion"] = 0.5
    second = predict(model, test, 4, torch.device("cpu"), collate_padded)
    mean = ensemble([first, second]).probabilities["fusion"]
    assert np.allclose(mean, (first.probabilities["fusion"] + second.probabilities["fusion"]) / 2, atol=1e-6)
