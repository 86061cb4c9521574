"""UMT in our trainer equals UMT as BalanceBenchmark runs it (``balancemm/trainer/UMT_trainer.py``;
no authors' code was found), re-stated below from its facts, with its teachers trained as a
unimodal run would train them:

- each teacher: the model's encoder and unimodal head of one modality, trained on that
  modality's CE alone (the run's optimizer, no schedule), the best validation epoch kept
  (BalanceBenchmark loads its unimodal run's best checkpoint);
- ``training_step``: ``loss = CE(out, label)``, then per modality ``loss += scaling *
  MSELoss()(teacher(x_m), student_feature_m)`` under ``no_grad`` for the teacher; backward;
  the optimizer's step. The teachers run in eval mode (our default; BalanceBenchmark never
  calls ``eval()`` on them: ``teacher_norm="batch"``, tested below too).

The wiring tests pin what the equivalence cannot isolate: which split the teachers read,
that they stay frozen, loading them from run folders, the checkpointed state, the refusals.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engines.epoch_data import LoaderEpochData
from engines.trainer import fit, make_loaders
from olmbalance import build_method
from tests.equivalence_fixtures import (CLASSES, CPU, INPUTS, MODALITIES, BatchList, assert_refused, batch,
                                        bn_late_fusion, one_step, ready_method, released_epochs,
                                        released_parameters, resolved_config, sgd_run_config)
from tests.scaling_fixtures import vector_data
from tests.tiny import TinyModel, tiny_late_fusion
from utils.errors import UserError

BATCH, LR = 16, 0.05
# The cross-cutting step tests' two short epochs: one teacher epoch each.
STEP_SETTINGS = {"teacher_epochs": 1}

# tests/method_steps.py: a teachers value the settings tests may pass (read at the first epoch).
OTHER_SETTING_VALUES = {"teachers": ["audio=runs/audio_only-s0"]}


def data():
    return vector_data(train=48, val=16, test=16)


def run_config(epochs):
    return sgd_run_config("unimodal_teacher", epochs, BATCH, LR)


def ready(seed=0, epochs=None, **settings):
    return ready_method("unimodal_teacher", bn_late_fusion(seed), settings, epochs=epochs, optimizer="sgd", lr=LR,
                        momentum=0.9, weight_decay=1e-4)


# -- BalanceBenchmark's training, re-stated ---------------------------------------------------------
def released_teacher(model, modality, epoch_data, epochs):
    """A unimodal run of one modality: encoder + head, SGD like the run's, best validation epoch."""
    encoder, head = copy.deepcopy(model.encoders[modality]), copy.deepcopy(model.unimodal_heads[modality])
    optimizer = torch.optim.SGD([*encoder.parameters(), *head.parameters()], lr=LR, momentum=0.9, weight_decay=1e-4)
    best, kept = -1.0, None
    for _ in range(epochs):
        encoder.train(), head.train()
        for inputs, labels in epoch_data.train_batches():
            optimizer.zero_grad()
            F.cross_entropy(head(encoder(inputs[modality])), labels).backward()
            optimizer.step()
        encoder.eval(), head.eval()
        with torch.no_grad():
            right = sum(int((head(encoder(x[modality])).argmax(1) == y).sum()) for x, y in epoch_data.val_batches())
        accuracy = right / sum(len(y) for _, y in epoch_data.val_batches())
        if accuracy > best:
            best, kept = accuracy, copy.deepcopy(encoder)
    return kept.eval()


def released_run(epochs, scaling, teacher_epochs, teacher_train_mode=False):
    cfg = run_config(epochs)
    loaders = make_loaders(cfg, data(), CPU, False)
    model = bn_late_fusion()
    epoch_data = LoaderEpochData(loaders.train, loaders.val, CPU, cfg.seed, 1, lambda x: x)  # what start_epoch(1) reads
    teachers = {m: released_teacher(model, m, epoch_data, teacher_epochs) for m in MODALITIES}
    mse = nn.MSELoss()

    def loss(model, inputs, labels, _):
        features = {m: model.encoders[m](inputs[m]) for m in MODALITIES}
        total = F.cross_entropy(model.fusion([features[m] for m in MODALITIES]), labels)
        for m in MODALITIES:
            with torch.no_grad():
                teachers[m].train(teacher_train_mode)
                target = teachers[m](inputs[m])
            total = total + scaling * mse(target, features[m])
        return total

    return released_epochs(model, loaders.train, epochs, LR, loss), teachers


@pytest.mark.parametrize("settings, released", [
    ({"teacher_epochs": 3}, dict(scaling=10.0, teacher_epochs=3)),
    ({"teacher_epochs": 2, "scaling": 3.0, "teacher_norm": "batch"},
     dict(scaling=3.0, teacher_epochs=2, teacher_train_mode=True)),  # BalanceBenchmark's train-mode teachers
])
def test_two_epochs_of_our_trainer_equal_balancebenchmarks_training(tmp_path, settings, released):
    cfg = run_config(2)
    model, method = ready(epochs=2, **settings)
    fit(cfg, model, method, make_loaders(cfg, data(), CPU, False), tmp_path, CPU)
    theirs, teachers = released_run(2, **released)
    torch.testing.assert_close(released_parameters(model), released_parameters(theirs), atol=1e-6, rtol=1e-5)
    for m in MODALITIES:  # the weights (BalanceBenchmark's train mode also moves running statistics)
        ours = {k: v for k, v in method.teachers[m].state_dict().items() if "running" not in k and "tracked" not in k}
        expected = {k: v for k, v in teachers[m].state_dict().items() if k in ours}
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    assert method.teacher_ready.tolist() == [1, 1] and all(1 <= e <= settings["teacher_epochs"]
                                                           for e in method.teacher_epoch.tolist())


# -- wiring ---------------------------------------------------------------------------------------
def test_teachers_train_on_the_whole_training_split_and_select_on_validation_before_epoch_one():
    model, method = ready(teacher_epochs=2)
    data = BatchList([batch(1), batch(2)], [batch(3)])
    method.start_epoch(1, model, data)
    # per modality and teacher epoch: one training pass, one validation pass; never test data
    assert data.reads == [("train", 1.0), ("val", None)] * 4
    assert method.teacher_ready.tolist() == [1, 1] and min(method.teacher_accuracy.tolist()) >= 0
    method.start_epoch(2, model, data)  # trained once
    assert len(data.reads) == 8


def test_teachers_stay_frozen_and_the_mse_reaches_the_encoders_only():
    model, method = ready(teacher_epochs=1)
    method.start_epoch(1, model, BatchList([batch(1)], [batch(2)]))
    teachers = copy.deepcopy(method.teachers.state_dict())
    grads = {}
    for scaling in (0.0, 10.0):
        method.scaling = scaling
        diagnostics = one_step(model, method, *batch(5), lr=0.1)
        grads[scaling] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.load_state_dict(bn_late_fusion().state_dict())  # the same student for both
    for key, value in method.teachers.state_dict().items():
        assert torch.equal(value, teachers[key]), key  # no step moves a teacher (eval mode: nor its statistics)
    assert all(p.grad is None and not p.requires_grad for p in method.teachers.parameters())
    assert diagnostics["umt_mse"]["fusion"] == 0.0 and diagnostics["umt_mse"]["audio"] > 0
    for name in grads[0.0]:
        same = torch.equal(grads[0.0][name], grads[10.0][name])
        assert same == (not name.startswith("encoders.")), name


def test_teachers_from_run_folders(tmp_path):
    source = bn_late_fusion(seed=7)
    folder = tmp_path / "audio-run"
    folder.mkdir()
    torch.save({"model": source.state_dict(), "config": {"method": "audio_only"}}, folder / "best.pt")
    model, method = ready(teachers=f"audio={folder}", teacher_epochs=1)
    assert method.teacher_ready.tolist() == [1, 0]
    for key, value in source.encoders["audio"].state_dict().items():
        assert torch.equal(method.teachers["audio"].state_dict()[key], value), key
    data = BatchList([batch(1)], [batch(2)])
    method.start_epoch(1, model, data)
    assert data.reads == [("train", 1.0), ("val", None)]  # the visual teacher alone is trained
    assert method.teacher_ready.tolist() == [1, 1]
    assert torch.equal(method.teachers["audio"].state_dict()["0.weight"], source.encoders["audio"][0].weight)


def test_the_teachers_are_checkpointed_and_a_resumed_run_does_not_retrain_them():
    model, method = ready(teacher_epochs=1)
    method.start_epoch(1, model, BatchList([batch(1)], [batch(2)]))
    state = method.state_dict()
    assert {k.split(".")[0] for k in state} == {"teacher_ready", "teacher_accuracy", "teacher_epoch", "teachers"}
    resumed_model, resumed = ready(teacher_epochs=1)
    resumed.load_state_dict(state)
    data = BatchList([batch(1)], [batch(2)])
    resumed.start_epoch(2, resumed_model, data)
    assert data.reads == []
    for key, value in state.items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_the_window_counts_epochs_from_zero_and_teachers_start_from_the_initial_weights():
    model, method = ready(teacher_epochs=1, modulation_starts=1, modulation_ends=1)
    twin, twin_method = ready(teacher_epochs=1)
    data = BatchList([batch(1)], [batch(2)])
    method.start_epoch(1, model, data)  # trained before epoch 1 although the terms start at epoch 2
    twin_method.start_epoch(1, twin, BatchList([batch(1)], [batch(2)]))
    assert all(torch.equal(a, b) for a, b in zip(method.state_dict().values(), twin_method.state_dict().values()))
    for epoch, active in ((1, False), (2, True), (3, False)):
        method.start_epoch(epoch, model, data)
        assert bool(one_step(model, method, *batch(epoch))) == active, epoch


@pytest.mark.parametrize("settings, fragment", [
    ({"teachers": "audio"}, "modality=run-folder"), ({"teachers": "text=x"}, "modality=run-folder"),
    ({"teacher_norm": "frozen"}, "--unimodal-teacher-teacher-norm"), ({"scaling": -1.0}, "--unimodal-teacher-scaling"),
    ({"modulation_starts": 3, "modulation_ends": 1}, "3..1"), ({"teacher_epochs": -1}, "teacher-epochs"),
])
def test_bad_settings_are_one_sentence(settings, fragment):
    assert_refused("unimodal_teacher", settings, fragment, epochs=2)


def test_unusable_teachers_and_models_are_refused_in_one_sentence(tmp_path):
    with pytest.raises(UserError, match="no checkpoint at"):
        ready(teachers=f"audio={tmp_path / 'missing'}", teacher_epochs=1)
    torch.save({"model": tiny_late_fusion("concat", CLASSES, 5, 0, inputs=INPUTS).state_dict()}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="does not fit this model"):
        ready(teachers=f"visual={tmp_path / 'other.pt'}", teacher_epochs=1)
    with pytest.raises(UserError, match="--method unimodal_teacher"):
        build_method("unimodal_teacher", ("audio", "visual", "fusion"), teacher_epochs=1).setup(TinyModel())
    with pytest.raises(UserError, match="run's epochs"):
        build_method("unimodal_teacher", ("audio", "visual", "fusion"))  # no teacher length at all


def test_the_recipe():
    cfg = resolved_config("CREMAD", "unimodal_teacher", recipe="authors")
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.lr_step, cfg.lr_gamma, cfg.batch_size, cfg.epochs,
            cfg.loss_reduction) == ("adamw", 1e-3, 0.01, 10, 0.1, 32, 30, "mean")
