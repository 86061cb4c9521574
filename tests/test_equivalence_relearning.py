"""Diagnosing & Re-learning in our trainer equals the authors' released training
(GeWu-Lab/Diagnosing_Relearning_ECCV2024, ``code/ours.py``), re-stated below from its facts:

- the model's initial ``state_dict`` is kept (``init_para.pkl``); every epoch trains
  ``CE(out, label)`` of the fusion output; after 0-based epoch ``epoch``, if ``epoch %
  reinit_epoch == 0 and epoch > 0`` and fewer than ``reinit_num`` re-initializations happened:
- ``get_feature``: the encoders' features ``a, v`` in eval mode without gradients, over the
  training and the validation loaders; ``reinit_score``: per split and modality
  ``MinMaxScaler((-1, 1))``, ``KMeans(n_clusters=n_classes, random_state=0).fit_predict``,
  ``purity_score``, then ``tanh(move_lambda * |purity_train - purity_val|)``;
- ``reinit``: every encoder parameter ``param.data = w * init + (1 - w) * param.data``.

scikit-learn's KMeans is used here, as released; the features are well separated, so its
clusters and ours are the same. The wiring tests pin the schedule, the splits read, the
seeded draw, the saved initial weights, what is logged, the settings and the recipe.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from engines.trainer import fit, make_loaders
from olmbalance import build_method
from olmbalance.base import EpochData
from olmbalance.relearning import kmeans, min_max_scale, purity
from tests.equivalence_fixtures import (CPU, MODALITIES, assert_refused, configured_method, ready_method,
                                        resolved_config, sgd_run_config)
from utils.errors import UserError

CLASSES, FEATURES, BATCH, LR = 3, 8, 16, 0.01
# The cross-cutting tests' two epochs: a re-initialization before the second one.
STEP_SETTINGS = {"reinit_epoch": 1, "reinit_offset": 0}


class ClusteredSet(Dataset):
    """Inputs at their class's center (far apart) plus a little noise; ``moved[m]`` samples per
    class have modality m's input at the next class's center, so that split's clusters are
    impure for m by a known share."""

    def __init__(self, per_class: int, seed: int, moved: dict | None = None):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(CLASSES).repeat_interleave(per_class)
        self.inputs = {}
        for i, m in enumerate(MODALITIES):
            centers = torch.randn(CLASSES, 4, generator=torch.Generator().manual_seed(50 + i)) * 10
            place = self.labels.clone()
            for c in range(CLASSES):
                place[c * per_class:c * per_class + (moved or {}).get(m, 0)] = (c + 1) % CLASSES
            self.inputs[m] = centers[place] + 0.05 * torch.randn(len(place), 4, generator=generator)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {m: self.inputs[m][i] for m in MODALITIES}, int(self.labels[i])


def clustered_data():
    from datasets.builders import DataBundle

    # validation purity: audio 9/10, visual 8/10 per cluster; training purity 1
    return DataBundle(ClusteredSet(16, 0), ClusteredSet(10, 1, {"audio": 1, "visual": 2}), ClusteredSet(5, 2),
                      ["a", "b", "c"])


def linear_model(seed=0):
    """A late-fusion model with linear encoders: the classes stay separated clusters."""
    from models.late_fusion import LateFusionClassifier

    torch.manual_seed(seed)
    encoders = {m: nn.Sequential(nn.Linear(4, FEATURES)) for m in MODALITIES}
    return LateFusionClassifier(CLASSES, MODALITIES, "concat", encoders=encoders, feature_dim=FEATURES)


def run_config(epochs, **options):
    return sgd_run_config("relearning", epochs, BATCH, LR, **options)


def ready(settings=None, seed=0):
    return ready_method("relearning", linear_model(seed), settings, seed=0)


# -- the released training, re-stated -------------------------------------------------------------------
def released_purity_score(y_true, y_pred):
    y_voted = np.zeros(y_true.shape)
    labels = np.unique(y_true)
    for k, label in enumerate(labels):
        y_true[y_true == label] = k
    bins = np.concatenate((np.unique(y_true), [np.max(y_true) + 1]), axis=0)
    for cluster in np.unique(y_pred):
        hist, _ = np.histogram(y_true[y_pred == cluster], bins=bins)
        y_voted[y_pred == cluster] = np.argmax(hist)
    return np.mean(y_true == y_voted)  # numpy float64, as accuracy_score


def released_run(epochs, reinit_epoch, reinit_num, move_lambda=3.0):
    """ours.py's main; returns the model and the re-initialization weights it used."""
    from sklearn import preprocessing
    from sklearn.cluster import KMeans

    cfg = run_config(epochs)
    loaders = make_loaders(cfg, clustered_data(), CPU, False)
    model = linear_model()
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}  # init_para.pkl
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)

    def get_feature(loader):
        model.eval()
        features, labels = {m: [] for m in MODALITIES}, []
        with torch.no_grad():
            for inputs, label, _ in loader:
                for m in MODALITIES:
                    features[m].append(model.encoders[m](inputs[m]))
                labels.append(label)
        return {m: torch.cat(f).numpy() for m, f in features.items()}, torch.cat(labels).numpy()

    flag_reinit, weights = 0, None
    for epoch in range(epochs):
        model.train()
        for inputs, label, _ in loaders.train:  # train_epoch
            optimizer.zero_grad()
            F.cross_entropy(model(inputs)["fusion"], label).backward()
            optimizer.step()
        if epoch % reinit_epoch == 0 and epoch > 0:
            flag_reinit += 1
            if flag_reinit <= reinit_num:
                # The released pass over the shuffled training loader also draws a permutation from
                # its random stream (later epochs then come in another order); a loader of its own
                # reads the same samples and leaves it, as EpochData does.
                train_once = DataLoader(loaders.train.dataset, batch_size=BATCH, collate_fn=loaders.train.collate_fn)
                splits = {"train": get_feature(train_once), "val": get_feature(loaders.val)}
                purities = {}
                for split, (features, labels) in splits.items():
                    for m in MODALITIES:
                        result = preprocessing.MinMaxScaler(feature_range=(-1, 1)).fit_transform(features[m])
                        y_pred = KMeans(n_clusters=CLASSES, random_state=0).fit_predict(result)
                        purities[split, m] = released_purity_score(labels.copy(), y_pred)
                weights = {m: torch.tanh(torch.tensor(move_lambda * np.abs(purities["train", m] - purities["val", m])))
                           for m in MODALITIES}
                for name, param in model.named_parameters():  # reinit
                    for m in MODALITIES:
                        if name.startswith(f"encoders.{m}."):
                            param.data = weights[m] * checkpoint[name] + (1 - weights[m]) * param.data
    return model, weights


def test_our_trainer_equals_the_released_relearning(tmp_path):
    settings = {"reinit_epoch": 1, "reinit_num": 1}  # the released check fires after 0-based epoch 1
    cfg = run_config(3)
    ours, method = ready(settings)
    fit(cfg, ours, method, make_loaders(cfg, clustered_data(), CPU, False), tmp_path, CPU)
    theirs, weights = released_run(3, 1, 1)
    assert [d["epoch"] for d in method.diagnoses] == [3]
    diagnosis = method.diagnoses[0]
    assert diagnosis["train"] == {"audio": 1.0, "visual": 1.0}
    assert diagnosis["val"] == {"audio": pytest.approx(0.9), "visual": pytest.approx(0.8)}
    assert diagnosis["weight"] == {m: pytest.approx(float(weights[m]), abs=1e-12) for m in MODALITIES}
    compared = lambda model: {k: v for k, v in model.state_dict().items() if not k.startswith("unimodal_heads")}
    torch.testing.assert_close(compared(ours), compared(theirs), atol=1e-6, rtol=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "relearning_weight" not in rows[1]["olm"]  # logged in the epoch after a re-initialization
    assert rows[2]["olm"]["relearning_weight"] == {"audio": pytest.approx(float(weights["audio"])),
                                                   "visual": pytest.approx(float(weights["visual"])), "fusion": 0.0}


# -- wiring ---------------------------------------------------------------------------------------------
def released_reinit_epochs(epochs, reinit_epoch, reinit_num):
    """1-based run epochs before which the released loop has re-initialized."""
    flag, due = 0, []
    for epoch in range(epochs):
        if epoch % reinit_epoch == 0 and epoch > 0:
            flag += 1
            if flag <= reinit_num:
                due.append(epoch + 2)
    return [e for e in due if e <= epochs]


@pytest.mark.parametrize("reinit_epoch, reinit_num", [(15, 2), (20, 3), (1, 2), (4, 0)])
def test_the_schedule_is_the_released_check(reinit_epoch, reinit_num):
    method = build_method("relearning", ("audio", "visual", "fusion"),
                          {"reinit_epoch": reinit_epoch, "reinit_num": reinit_num})
    assert [e for e in range(1, 91) if method.reinit_due(e)] == released_reinit_epochs(90, reinit_epoch, reinit_num)
    shifted = build_method("relearning", ("audio", "visual", "fusion"), STEP_SETTINGS)
    assert [e for e in range(1, 10) if shifted.reinit_due(e)] == [2, 3]  # after 1 and 2 completed epochs


def test_scaling_clustering_and_purity_agree_with_the_released_tools():
    from sklearn import preprocessing
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    generator = torch.Generator().manual_seed(3)
    raw = torch.randn(120, 6, generator=generator) * torch.tensor([1.0, 5.0, 0.1, 2.0, 3.0, 0.0])
    torch.testing.assert_close(min_max_scale(raw), torch.from_numpy(
        preprocessing.MinMaxScaler(feature_range=(-1, 1)).fit_transform(raw.numpy())), atol=1e-6, rtol=1e-6)
    centers = torch.randn(5, 6, generator=generator) * 10
    labels = torch.randint(5, (120,), generator=generator)
    features = min_max_scale(centers[labels] + 0.1 * torch.randn(120, 6, generator=generator))
    ours = kmeans(features, 5, torch.Generator().manual_seed(0))
    released = KMeans(n_clusters=5, random_state=0).fit_predict(features.numpy())
    assert adjusted_rand_score(released, ours.numpy()) == 1.0
    noisy = torch.randint(5, (120,), generator=generator)
    assert purity(ours, noisy) == pytest.approx(released_purity_score(noisy.numpy(), ours.numpy()))


class RecordingData(EpochData):
    """Training and validation batches of ClusteredSet; records what was asked for."""

    def __init__(self):
        self.calls = []
        self.train, self.val = ClusteredSet(4, 0), ClusteredSet(3, 1, {"visual": 1})

    @staticmethod
    def batches(dataset):
        return iter([({m: dataset.inputs[m] for m in MODALITIES}, dataset.labels)])

    def train_batches(self, share: float = 1.0):
        self.calls.append(("train", share))
        return self.batches(self.train)

    def val_batches(self):
        self.calls.append(("val", None))
        return self.batches(self.val)


def test_a_diagnosis_reads_the_whole_training_and_validation_splits_with_its_own_seeded_draws():
    results = []
    for _ in range(2):
        model, method = ready(STEP_SETTINGS)
        data = RecordingData()
        method.start_epoch(1, model, data)  # not due: nothing read
        assert data.calls == []
        before = torch.get_rng_state()
        method.start_epoch(2, model, data)
        assert torch.equal(torch.get_rng_state(), before)  # the run's random stream is untouched
        assert data.calls == [("train", 1.0), ("val", None)] and not model.training
        results.append((method.diagnoses[-1], {k: v.clone() for k, v in model.state_dict().items()}))
    assert results[0][0] == results[1][0] and results[0][0]["val"]["visual"] == pytest.approx(2 / 3)
    torch.testing.assert_close(results[0][1], results[1][1], atol=0, rtol=0)
    assert set(method.diagnostics()) == {"relearning_purity_train", "relearning_purity_val", "relearning_weight"}
    assert method.diagnostics() == {}  # once, in the epoch after the re-initialization


def test_the_clustered_rows_are_the_encoder_features_in_eval_mode(monkeypatch):
    import olmbalance.relearning as relearning
    from models.late_fusion import LateFusionClassifier

    torch.manual_seed(0)
    encoders = {m: nn.Sequential(nn.Linear(4, FEATURES), nn.BatchNorm1d(FEATURES)) for m in MODALITIES}
    model = LateFusionClassifier(CLASSES, MODALITIES, "concat", encoders=encoders, feature_dim=FEATURES)
    data = RecordingData()
    with torch.no_grad():
        model(data.batches(data.train).__next__()[0])  # running statistics that differ from batch ones
    method = build_method("relearning", model.heads, STEP_SETTINGS, seed=0)
    method.setup(model)
    clustered = []
    real = relearning.split_purity
    monkeypatch.setattr(relearning, "split_purity", lambda features, *rest: clustered.append(features) or real(features, *rest))
    model.eval()
    with torch.no_grad():  # before the re-initialization moves the encoders
        expected = [model.encoders[m](dataset.inputs[m]) for dataset in (data.train, data.val) for m in MODALITIES]
    model.train()
    method.start_epoch(2, model, data)
    assert method.diagnoses[-1]["weight"]["visual"] > 0  # the encoders did move afterwards
    # the released order: the training split's modalities, then the validation split's
    for rows, want in zip(clustered, expected):
        torch.testing.assert_close(rows, want)
    assert len(clustered) == 4 and not model.keep_features and model.last_features == {}


def test_the_initial_weights_are_saved_and_blended_with():
    model, method = ready()
    state = method.state_dict()
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("encoders.")}
    assert {k for k in state if k.startswith("initial_")} == {"initial_audio_0", "initial_audio_1",
                                                              "initial_visual_0", "initial_visual_1"}
    torch.testing.assert_close(state["initial_audio_0"], initial["encoders.audio.0.weight"])
    other_model, restored = ready(seed=1)  # a resumed run: setup on a new model, then the checkpoint
    restored.load_state_dict(state)
    with torch.no_grad():
        for p in other_model.parameters():
            p.add_(1.0)
    moved = {n: p.detach().clone() for n, p in other_model.named_parameters()}
    restored.reinit(other_model, {"audio": 1.0, "visual": 0.25})
    after = dict(other_model.named_parameters())
    for name, value in initial.items():
        expected = value if ".audio." in name else 0.25 * value + 0.75 * moved[name]
        torch.testing.assert_close(after[name].detach(), expected)
    for name in ("fusion.classifier.weight", "unimodal_heads.audio.weight"):  # heads are not re-initialized
        assert torch.equal(after[name].detach(), moved[name])
    assert other_model.detach_unimodal_heads  # fusion_only's step: read-outs on detached features


@pytest.mark.parametrize("settings, fragment", [
    ({"move_lambda": -1.0}, "--relearning-move-lambda"), ({"reinit_epoch": 0}, "--relearning-reinit-epoch"),
    ({"kmeans_inits": 0}, "--relearning-kmeans-inits"), ({"lambda": 1}, "no setting"),
])
def test_bad_settings_are_one_sentence(settings, fragment):
    assert_refused("relearning", settings, fragment)


def test_models_without_encoder_features_are_refused():
    from tests.tiny import TinyModel

    with pytest.raises(UserError, match="--method relearning"):
        build_method("relearning", ("audio", "visual", "fusion")).setup(TinyModel())


def test_settings_and_the_authors_recipe_come_from_the_run_config():
    cfg = resolved_config("CREMAD", "relearning", recipe="authors")
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_step, cfg.batch_size, cfg.epochs,
            cfg.loss_reduction) == ("sgd", 0.002, 0.9, 1e-4, 0, 64, 90, "mean")
    method = configured_method(cfg)
    assert (method.reinit_epoch, method.reinit_num, method.move_lambda) == (20, 3, 3.0)
    method = configured_method(resolved_config("CREMAD", "relearning", relearning_move_lambda=2.0,
                                               relearning_reinit_offset=0, relearning_kmeans_inits=10))
    assert (method.move_lambda, method.reinit_epoch, method.reinit_num, method.reinit_offset,
            method.kmeans_inits) == (2.0, 15, 2, 0, 10)
