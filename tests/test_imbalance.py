"""Imbalance diagnostics (engines/imbalance.py): the probe protocol never sees test data, the
reliance and Shapley measures on heads built by hand, the unimodal-ensemble row of the
comparison, and the diagnostics end to end through main.py and the command."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import main
from engines import imbalance
from engines.imbalance import SplitFeatures
from models.late_fusion import LateFusionClassifier
from tests.scaling_fixtures import TINY_FLAGS
from tests.test_plot import NORMS, assert_png, write_run
from tests.tiny import tiny_late_fusion
from utils import compare

CLASSES = 3


@pytest.fixture(autouse=True)
def one_thread():
    """The fits here are tiny: on a busy 2-core machine a second torch thread costs 30x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clustered(size, seed, dims=4):
    """Features around one centre per class (learnable by a linear probe) and their labels."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(size) % CLASSES
    centres = torch.randn(CLASSES, dims, generator=torch.Generator().manual_seed(99)) * 2
    return centres[labels] + torch.randn(size, dims, generator=generator), labels


def split_features(size, seed):
    audio, labels = clustered(size, seed)
    visual, _ = clustered(size, seed + 1)
    return SplitFeatures({"audio": audio, "visual": visual}, labels, {m: torch.zeros(4) for m in ("audio", "visual")})


# -- the probe protocol --------------------------------------------------------------------
def test_probe_never_sees_test_data(monkeypatch):
    splits = {"train": split_features(60, 0), "val": split_features(30, 1), "test": split_features(30, 2)}
    fitted = []
    original = imbalance.fit_logistic

    def spy(x, y, classes, l2, **options):
        fitted.append((x.clone(), y.clone()))
        return original(x, y, classes, l2, **options)

    monkeypatch.setattr(imbalance, "fit_logistic", spy)
    clean = imbalance.linear_probes(splits, CLASSES)
    # Every fit received the training split's (standardized) features and labels, nothing else.
    assert len(fitted) == 2 * len(imbalance.PROBE_L2_GRID)
    for x, y in fitted:
        assert len(x) == 60 and torch.equal(y, splits["train"].labels)
    assert clean["audio"]["test"]["acc"] > 0.8 and clean["visual"]["test"]["acc"] > 0.8

    # Poison the test split: other features and shuffled labels. What was fitted and selected
    # (l2, train and val scores) must not move; only the test score may.
    generator = torch.Generator().manual_seed(5)
    poisoned = dict(splits, test=SplitFeatures({m: 100 * torch.randn(30, 4, generator=generator)
                                                for m in ("audio", "visual")},
                                               splits["test"].labels[torch.randperm(30, generator=generator)],
                                               splits["test"].masked))
    dirty = imbalance.linear_probes(poisoned, CLASSES)
    for m in ("audio", "visual"):
        assert {k: dirty[m][k] for k in ("l2", "train", "val")} == {k: clean[m][k] for k in ("l2", "train", "val")}
        assert dirty[m]["test"] != clean[m]["test"]


def test_probe_through_the_whole_pipeline_ignores_test_labels():
    """diagnose() end to end on batches: changing every test label changes no probe's fit."""
    model = tiny_late_fusion("concat", CLASSES, features=8, inputs=4)

    def batches(test_labels_shift):
        pairs = []
        for split, size, seed in (("train", 60, 0), ("val", 30, 1), ("test", 30, 2)):
            audio, labels = clustered(size, seed)
            visual, _ = clustered(size, seed + 1)
            if split == "test":
                labels = (labels + test_labels_shift) % CLASSES
            for start in range(0, size, 16):
                part = slice(start, start + 16)
                pairs.append((split, ({"audio": audio[part], "visual": visual[part]}, labels[part], 0)))
        return pairs

    first, _ = imbalance.diagnose(model, batches(0), CLASSES, torch.device("cpu"))
    second, predictions = imbalance.diagnose(model, batches(1), CLASSES, torch.device("cpu"))
    for m in ("audio", "visual"):
        assert {k: first["probe"][m][k] for k in ("l2", "train", "val")} == \
            {k: second["probe"][m][k] for k in ("l2", "train", "val")}
    assert first["samples"] == {"train": 60, "val": 30, "test": 30}
    assert predictions["test_probs"].shape == (30, CLASSES)
    assert np.allclose(predictions["test_probs"].sum(axis=1), 1, atol=1e-5)


# -- reliance ------------------------------------------------------------------------------
def identity_model(fusion, dims=CLASSES, modalities=("audio", "visual")):
    return LateFusionClassifier(CLASSES, modalities, fusion, encoders={m: nn.Identity() for m in modalities},
                                feature_dim=dims)


def fuse_with(model):
    return lambda features: imbalance.head_logits(model, features)["fusion"]


def test_derangement_moves_every_sample():
    for count in (2, 3, 17):
        source = imbalance.derangement(count, torch.Generator().manual_seed(count))
        assert sorted(source.tolist()) == list(range(count))
        assert all(source[i] != i for i in range(count))


def test_reliance_is_zero_for_an_ignored_modality_and_large_for_the_only_one_read():
    size = 90
    labels = torch.arange(size) % CLASSES
    audio = 5 * nn.functional.one_hot(labels, CLASSES).float()  # names the class
    visual = torch.randn(size, CLASSES, generator=torch.Generator().manual_seed(0))
    model = identity_model("concat")
    with torch.no_grad():  # the fusion head reads audio only: its visual block is zero
        model.fusion.classifier.weight.copy_(torch.cat([torch.eye(CLASSES), torch.zeros(CLASSES, CLASSES)], dim=1))
        model.fusion.classifier.bias.zero_()
    split = SplitFeatures({"audio": audio, "visual": visual}, labels,
                          {m: torch.zeros(CLASSES) for m in ("audio", "visual")})
    result = imbalance.reliance(fuse_with(model), split, seed=0)
    assert result["intact"] == 1.0
    assert result["visual"]["drop"] == 0.0 and result["visual"]["acc"] == 1.0
    # Shuffled audio keeps the right class only where the donor shares it (about 1/3 of samples).
    assert result["audio"]["drop"] > 0.5
    assert result["audio"]["acc"] == pytest.approx(1 / 3, abs=0.15)
    assert imbalance.reliance(fuse_with(model), split, seed=0) == result  # seeded


def test_heads_of_a_compiled_model_run_eagerly_on_features():
    model = tiny_late_fusion("concat", CLASSES, features=8, inputs=4)
    features = {"audio": torch.randn(5, 8), "visual": torch.randn(5, 8)}
    eager = imbalance.head_logits(model, features)["fusion"]
    model.compile(backend="eager")
    compiled = model._compiled_call_impl
    assert torch.equal(imbalance.head_logits(model, features)["fusion"], eager)
    assert model._compiled_call_impl is compiled and isinstance(model.encoders["audio"], nn.Sequential)


# -- Shapley -------------------------------------------------------------------------------
def test_shapley_matches_a_hand_computation():
    """Sum fusion with identity classifiers on 2-d features: logits = audio + visual; an absent
    modality's feature is zero (its encoder's response to a zero input)."""
    labels = torch.tensor([0, 1, 0, 1])
    audio = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])  # right on 0, 1, 2
    visual = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.5], [0.0, 3.0]])  # right on 1, 3
    model = LateFusionClassifier(2, ("audio", "visual"), "sum",
                                 encoders={m: nn.Identity() for m in ("audio", "visual")}, feature_dim=2)
    with torch.no_grad():
        for classifier in model.fusion.classifiers:
            classifier.weight.copy_(torch.eye(2))
            classifier.bias.zero_()
    split = SplitFeatures({"audio": audio, "visual": visual}, labels, {m: torch.zeros(2) for m in ("audio", "visual")})
    result = imbalance.shapley(fuse_with(model), split)
    # By hand: v(none) = 0.5 (all-zero logits pick class 0); v(audio) = 0.75; v(visual) = 0.5;
    # v(both) = 1.0 (sample 2: [2, 1.5] -> 0; sample 3: [2, 3] -> 1).
    assert result["subsets"] == {"none": 0.5, "audio": 0.75, "visual": 0.5, "audio+visual": 1.0}
    assert result["values"]["audio"] == pytest.approx(((0.75 - 0.5) + (1.0 - 0.5)) / 2)
    assert result["values"]["visual"] == pytest.approx(((0.5 - 0.5) + (1.0 - 0.75)) / 2)


def test_shapley_values_add_up_to_full_minus_empty_accuracy():
    torch.manual_seed(0)
    modalities = ("audio", "visual", "text")
    model = identity_model("gated", dims=6, modalities=modalities)
    size = 200
    labels = torch.randint(0, CLASSES, (size,))
    split = SplitFeatures({m: torch.randn(size, 6) + labels[:, None] * (i + 1) * 0.3 for i, m in enumerate(modalities)},
                          labels, {m: torch.randn(6) for m in modalities})
    result = imbalance.shapley(fuse_with(model), split)
    assert len(result["subsets"]) == 8
    assert sum(result["values"].values()) == pytest.approx(result["subsets"]["audio+visual+text"]
                                                          - result["subsets"]["none"])


def test_absent_modalities_get_the_encoders_response_to_zero_input():
    model = tiny_late_fusion("concat", CLASSES, features=8, inputs=4)
    batch = ({"audio": torch.randn(5, 4), "visual": torch.randn(5, 4)}, torch.arange(5) % CLASSES, 0)
    splits = imbalance.extract_features(model, [("val", batch)], torch.device("cpu"))
    with torch.no_grad():
        for m in ("audio", "visual"):
            assert torch.allclose(splits["val"].masked[m], model.encoders[m](torch.zeros(1, 4))[0])
            assert torch.allclose(splits["val"].features[m], model.encoders[m](batch[0][m]))


# -- the unimodal ensemble in the comparison -----------------------------------------------
def save_predictions(folder, probs, labels):
    np.savez(folder / imbalance.PREDICTIONS_FILE, head=np.array("x"), test_probs=np.array(probs),
             test_labels=np.array(labels))


def test_compare_ensemble_row_equals_a_hand_computation(tmp_path):
    root = tmp_path / "compare-AVDigits"
    labels = [0, 1, 2, 1]
    audio_probs = [[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]]
    visual_probs = [[0.1, 0.8, 0.1], [0.1, 0.8, 0.1], [0.3, 0.4, 0.3], [0.2, 0.7, 0.1]]
    # Mean: [.35 .55 .1] -> 1 (wrong); [.3 .6 .1] -> 1 (right); [.25 .35 .4] -> 2 (right);
    # [.15 .4 .45] -> 2 (wrong): 2 of 4.
    audio = write_run(root / "audio_only-s0", "audio_only", 0, {"audio": 0.5, "visual": 0.1, "fusion": 0.1}, NORMS, 2,
                      "audio")
    visual = write_run(root / "visual_only-s0", "visual_only", 0, {"audio": 0.1, "visual": 0.75, "fusion": 0.1},
                       NORMS, 2, "visual")
    joint = write_run(root / "joint-s0", "joint", 0, {"audio": 0.5, "visual": 0.7, "fusion": 0.75}, NORMS, 2)
    save_predictions(audio, audio_probs, labels)
    save_predictions(visual, visual_probs, labels)
    audio_results = json.loads((audio / "results.json").read_text())
    audio_results["imbalance"] = {"probe": {"audio": {"test": {"acc": 0.55}}, "visual": {"test": {"acc": 0.2}}},
                                  "reliance": None, "shapley": None}
    (audio / "results.json").write_text(json.dumps(audio_results))
    results = json.loads((joint / "results.json").read_text())
    results["imbalance"] = {"probe": {"audio": {"test": {"acc": 0.6}}, "visual": {"test": {"acc": 0.4}}},
                            "reliance": {"test": {"intact": 0.75, "audio": {"acc": 0.5, "drop": 0.25},
                                                  "visual": {"acc": 0.7, "drop": 0.05}}},
                            "shapley": {"test": {"values": {"audio": 0.3, "visual": 0.1}}}}
    (joint / "results.json").write_text(json.dumps(results))

    summary = compare.summarize(root)
    ensemble = summary["ensemble"]
    assert ensemble["methods"] == ["audio_only", "visual_only"] and ensemble["seeds"] == [0]
    assert ensemble["acc_values"] == [0.5]
    # macro-F1 by hand: class 0 (1 true, 0 predicted) 0; class 1: TP 1, support 2, predicted 2 -> 0.5;
    # class 2: TP 1, support 1, predicted 2 -> 2/3.
    assert ensemble["f1_values"][0] == pytest.approx((0 + 0.5 + 2 / 3) / 3)
    joint_entry = summary["methods"]["joint"]
    assert joint_entry["ensemble_gap_values"] == [pytest.approx(0.25)]
    assert joint_entry["imbalance"]["reliance"] == {"audio": [0.25], "visual": [0.05]}
    # audio_only's visual encoder never trained: only its audio probe is reported.
    assert summary["methods"]["audio_only"]["imbalance"] == {"probe": {"audio": [0.55]}, "reliance": {}, "shapley": {}}

    markdown = compare.render_markdown(summary)
    assert "| ensemble (audio_only + visual_only) | 1 | — | — | — | 50.0 ± 0.0 |" in markdown
    assert "## Imbalance diagnostics" in markdown
    # probes 60, 40; reliance 25, 5; Shapley 30, 10; fusion 75 against the ensemble's 50.
    row = "| joint | 1 | " + " | ".join(f"{v:.1f} ± 0.0" for v in (60, 40, 25, 5, 30, 10)) + " | +25.0 ± 0.0 |"
    assert row in markdown
    assert_png(compare.render_figure(summary, tmp_path / "compare.png"))

    # A seed whose runs saw different test samples gets no ensemble, and says so.
    save_predictions(visual, visual_probs, [0, 1, 2, 2])
    skipped = compare.summarize(root)["ensemble"]
    assert skipped["seeds"] == [] and "differ" in skipped["skipped"][0]
    assert "No ensemble for seed(s) 0" in compare.render_markdown(compare.summarize(root))


# -- end to end ----------------------------------------------------------------------------
def test_main_writes_the_diagnostics_and_the_command_recomputes_them(tiny_avdigits, tmp_path, capsys):
    # AMCo adds an output layer to the fusion head at setup, so the command must rebuild the
    # run's method before loading best.pt (a bare model refuses its keys).
    out = tmp_path / "amco"
    main.main([*TINY_FLAGS, "--data-root", tiny_avdigits, "--method", "amco", "--epochs", "1",
               "--keep-checkpoints", "best", "--out", out])
    printed = capsys.readouterr().out
    assert "probe audio" in printed and "probe visual" in printed and "reliance" in printed
    results = json.loads((out / "results.json").read_text())
    diagnostics = results["imbalance"]
    assert diagnostics["samples"] == {"train": 32, "val": 16, "test": 16}
    assert diagnostics["checkpoint_epoch"] == results["best_epoch"]
    assert set(diagnostics["probe"]) == {"audio", "visual"}
    assert diagnostics["probe"]["audio"]["l2"] in imbalance.PROBE_L2_GRID
    # The fusion accuracy the diagnostics start from is the run's own at its best epoch.
    assert diagnostics["intact"]["test"]["acc"] == pytest.approx(results["test"]["fusion"]["acc"])
    assert diagnostics["reliance"]["test"]["intact"] == pytest.approx(results["test"]["fusion"]["acc"])
    for split in ("val", "test"):
        shapley = diagnostics["shapley"][split]
        assert sum(shapley["values"].values()) == pytest.approx(shapley["subsets"]["audio+visual"]
                                                                - shapley["subsets"]["none"])
    saved = imbalance.read_predictions(out)
    assert saved["test_probs"].shape == (16, 10) and str(saved["head"]) == "fusion"

    imbalance.main([str(out), "--device", "cpu"])
    again = json.loads((out / "results.json").read_text())["imbalance"]
    for key in ("probe", "reliance", "shapley", "intact", "samples"):
        assert again[key] == diagnostics[key]


def test_no_imbalance_flag_skips_them(tiny_avdigits, tmp_path):
    out = tmp_path / "audio_only"
    main.main([*TINY_FLAGS, "--data-root", tiny_avdigits, "--method", "audio_only", "--epochs", "1",
               "--no-imbalance", "--out", out])
    assert "imbalance" not in json.loads((out / "results.json").read_text())
    assert not (out / imbalance.PREDICTIONS_FILE).exists()

