"""Modality valuation in our trainer equals the authors' re-sampled training
(GeWu-Lab/Valuate-and-Enhance-Multimodal-Cooperation), re-stated below from their code:

- ``execute_modulation``: eval mode, no gradients; ``out`` with both encoders' features,
  ``exec_drop`` for ``out_v`` (audio features zeroed) and ``out_a`` (visual zeroed); per sample
  ``value_all = 2``, ``value_a = value_v = 1`` when that prediction is right (else 0),
  ``contrib_a = (value_a + value_all - value_v) / 2`` and ``contrib_v`` likewise;
- ``AV_KS_Dataset_sample_level``: per sample, ``drop=2`` copies (visual zeroed) for audio and
  ``drop=1`` copies for visual: 1 when ``0.4 < c < 1``, 2 when ``-0.1 < c < 0.4``, 3 when
  ``c < -0.1``;
- ``modality_level.py``: means over the part, ``gap = 1 - mean``, ``difference = |gap_a -
  gap_v| / 3 * 2 * alpha``; the drawn samples' copies zero the modality with the smaller gap;
- ``train_epoch``: ``AVClassifier.forward(audio, visual, drop)`` zeroes row i's audio
  features when ``drop[i] == 1`` and its visual ones when ``drop[i] == 2``, then ``fc_out`` on
  the concatenation, CE, backward, step (here SGD, momentum 0.9, weight decay 1e-4).

What the loop cannot reproduce is stated in the method's docstring and held fixed here: the
copies ride in their original's step (the released batch is re-stated as the step's rows plus
their copies, with the loss summed, ``--loss-reduction sum``: the released loss per instance
without the batch-size normalization that differs), the modality-level copy counts come from
the method's seeded draw (``drawn_copies``, as the batches come from the same loaders), and the
sample-level valuation is made in the step. Encoders without normalization or dropout, so a
copy's features are its original's, as they are for a re-encoded released copy.

The wiring tests pin the rest: the split, share and mode of the valuations, when re-sampling
starts, which encoder the copies train, the Shapley values and copy rules by hand, the rank
slicing of the draws, the settings, the recipe and the checkpointed state.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from engines.epoch_data import LoaderEpochData
from engines.trainer import fit, make_loaders
from olmbalance import build_method
from olmbalance.modality_valuation import (contributions, drawn_copies, modality_difference, sample_copies,
                                           shapley_matrix, subset_values)
from tests.equivalence_fixtures import (CLASSES, CPU, FEATURES, INPUTS, BatchList, assert_refused, batch,
                                        bn_late_fusion, one_step, ready_method, released_parameters,
                                        resolved_config, sgd_run_config)
from tests.scaling_fixtures import vector_data
from tests.tiny import tiny_late_fusion

# The cross-cutting tests (some call start_epoch(1) only): value and re-sample from the first epoch on.
STEP_SETTINGS = {"modulation_starts": 0}

BATCH, LR = 16, 2e-3


def plain_model(seed=0):
    """No normalization, no dropout: eval and train mode agree, a copy encodes like its original."""
    return tiny_late_fusion("concat", CLASSES, FEATURES, seed, inputs=INPUTS)


def ready(model=None, **settings):
    """The method on ``model``, by default one with BatchNorm: a valuation in the wrong mode shows."""
    return ready_method("modality_valuation", model if model is not None else bn_late_fusion(), settings, seed=0)


def run_config(epochs, **options):
    return sgd_run_config("modality_valuation", epochs, BATCH, LR, loss_reduction="sum", **options)


def data():
    return vector_data(train=64, val=8, test=8)  # 4 steps per epoch


def our_run(tmp_path, epochs, settings):
    cfg = run_config(epochs)
    model, method = ready(plain_model(), **settings)
    fit(cfg, model, method, make_loaders(cfg, data(), CPU, False), tmp_path, CPU)
    return model, method


# -- the released training, re-stated ---------------------------------------------------------------
def released_encode(model, inputs):
    return model.encoders["audio"](inputs["audio"]), model.encoders["visual"](inputs["visual"])


def released_fc(model, a, v):
    return model.fusion.classifier(torch.cat((a, v), 1))


def released_contributions(model, inputs, labels):
    """execute_modulation's loop for one batch: [(contrib_a, contrib_v)] per sample."""
    model.eval()
    with torch.no_grad():
        a, v = released_encode(model, inputs)
        out = released_fc(model, a, v)
        out_v = released_fc(model, torch.zeros_like(a), v)  # exec_drop(drop="audio")
        out_a = released_fc(model, a, torch.zeros_like(v))
    found = []
    for i, label in enumerate(labels.tolist()):
        value_all = 2.0 if int(out[i].argmax()) == label else 0.0
        value_v = 1.0 if int(out_v[i].argmax()) == label else 0.0
        value_a = 1.0 if int(out_a[i].argmax()) == label else 0.0
        found.append(((value_a + value_all - value_v) / 2.0, (value_v + value_all - value_a) / 2.0))
    return found


def released_sample_count(contrib):
    if 0.4 < contrib < 1:
        return 1
    if -0.1 < contrib < 0.4:
        return 2
    if contrib < -0.1:
        return 3
    return 0


def released_step(model, optimizer, inputs, labels, drop):
    """train_epoch's step on a batch whose rows carry drop flags; the loss summed over rows."""
    model.train()
    optimizer.zero_grad()
    a, v = released_encode(model, inputs)
    a, v = a.clone(), v.clone()
    for i in range(len(drop)):
        if drop[i] == 1:
            a[i, :] = 0.0
        elif drop[i] == 2:
            v[i, :] = 0.0
    F.cross_entropy(released_fc(model, a, v), labels, reduction="sum").backward()
    optimizer.step()


def with_copies(inputs, labels, copies):
    """The step's rows followed by their copies: ``copies`` is a list of (row, drop) pairs."""
    rows = torch.tensor([row for row, _ in copies], dtype=torch.long)
    inputs = {m: torch.cat([x, x[rows]]) for m, x in inputs.items()}
    drop = [0] * len(labels) + [d for _, d in copies]
    return inputs, torch.cat([labels, labels[rows]]), drop


def released_run(epochs, level, starts=1, part=0.2, alpha=1.0):
    """Per epoch: plain until ``starts``, then the valuation and the re-sampled steps."""
    cfg = run_config(epochs)
    loaders = make_loaders(cfg, data(), CPU, False)
    model = plain_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    estimates, total_copies = [], 0
    for epoch in range(1, epochs + 1):
        difference, drop_flag = 0.0, 0
        if epoch > starts and level == "modality":
            epoch_data = LoaderEpochData(loaders.train, loaders.val, CPU, cfg.seed, epoch, lambda x: x)
            values = [c for inputs, labels in epoch_data.train_batches(part)
                      for c in released_contributions(model, inputs, labels)]
            part_cona = sum(c[0] for c in values) / len(values)
            part_conv = sum(c[1] for c in values) / len(values)
            gap_a, gap_v = 1.0 - part_cona, 1.0 - part_conv
            difference = abs(gap_a - gap_v) / 3 * 2 * alpha
            drop_flag = 2 if gap_a > gap_v else 1  # keep the modality with the larger gap
            estimates.append((part_cona, part_conv, difference))
        for step, (inputs, labels, _) in enumerate(loaders.train):
            copies = []
            if epoch > starts and level == "sample":
                for row, (ca, cv) in enumerate(released_contributions(model, inputs, labels)):
                    copies += [(row, 2)] * released_sample_count(ca) + [(row, 1)] * released_sample_count(cv)
            elif epoch > starts and difference > 0:
                counts = drawn_copies(difference, len(labels), 0, epoch, step)
                copies = [(row, drop_flag) for row, k in enumerate(counts.long().tolist()) for _ in range(k)]
            total_copies += len(copies)
            released_step(model, optimizer, *with_copies(inputs, labels, copies))
    return model, estimates, total_copies


@pytest.mark.parametrize("level", ["modality", "sample"])
def test_two_epochs_of_our_trainer_equal_the_released_resampled_training(tmp_path, level):
    """Both epochs re-sample (no warm-up): the second from a valuation of the trained model."""
    settings = {"level": level, "alpha": 2.0, "modulation_starts": 0}
    ours, method = our_run(tmp_path, 2, settings)
    theirs, estimates, total_copies = released_run(2, level, starts=0, alpha=2.0)
    torch.testing.assert_close(released_parameters(ours), released_parameters(theirs), atol=1e-6, rtol=1e-5)
    assert total_copies > 10  # the copies did train (not a plain run on both sides)
    if level == "modality":
        part_cona, part_conv, difference = estimates[-1]
        assert method.mean_contribution == pytest.approx([part_cona, part_conv], abs=1e-12)
        assert method.difference == pytest.approx(difference, abs=1e-12) and difference > 0
    saved = torch.load(tmp_path / "last.pt", weights_only=False)["method"]["_extra_state"]
    assert saved == method.get_extra_state() and saved["epoch"] == 2 and saved["step"] == 4


# -- wiring ---------------------------------------------------------------------------------------
def encoder_grads(model):
    return {m: torch.cat([p.grad.reshape(-1) for p in model.encoders[m].parameters()]) for m in ("audio", "visual")}


def test_modality_level_values_the_training_part_in_eval_mode():
    model, method = ready(part_ratio=0.3)
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    data = BatchList([batch(1), batch(2)], [batch(3)])
    method.start_epoch(1, model, data)  # a warm-up epoch: nothing read
    assert data.reads == [] and modes == []
    method.start_epoch(2, model, data)
    assert data.reads == [("train", 0.3)] and modes == [False, False]
    values = released_contributions(model, *batch(1)) + released_contributions(model, *batch(2))
    expected = [sum(c[i] for c in values) / len(values) for i in range(2)]
    assert method.mean_contribution == pytest.approx(expected, abs=1e-12)
    assert method.difference == pytest.approx(abs(expected[0] - expected[1]) / 3 * 2, abs=1e-12)


def test_sample_level_values_the_step_batch_in_eval_mode_and_leaves_running_stats():
    model, method = ready(level="sample")
    reference, plain = ready(bn_late_fusion(), level="sample")
    method.start_epoch(2, model, BatchList([]))
    plain.start_epoch(1, reference, BatchList([]))  # a warm-up step: the training forward alone
    inputs, labels = batch(4)
    values = released_contributions(copy.deepcopy(model), inputs, labels)  # eval mode, the step's weights
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    diagnostics = one_step(model, method, inputs, labels)
    one_step(reference, plain, inputs, labels)
    assert modes == [False, True]  # the valuation forward, then the training one
    for name, value in reference.state_dict().items():
        if "running" in name or "num_batches" in name:
            assert torch.equal(model.state_dict()[name], value), name
    copies = [sum(released_sample_count(c[i]) for c in values) / len(values) for i in range(2)]
    assert diagnostics["valuation_copies"] == pytest.approx({"audio": copies[0], "visual": copies[1], "fusion": 0.0})
    assert diagnostics["valuation_contribution"]["audio"] == pytest.approx(sum(c[0] for c in values) / len(values))


@pytest.mark.parametrize("level", ["modality", "sample"])
def test_no_copies_before_modulation_starts(level):
    grads = {}
    for name, settings in (("plain", None), ("valued", {"level": level, "modulation_starts": 2})):
        grads[name] = []
        for epoch in (1, 2, 3):
            model = plain_model()
            method = build_method("fusion_only", model.heads) if settings is None else \
                build_method("modality_valuation", model.heads, settings, seed=0)
            method.setup(model)
            method.start_epoch(epoch, model, BatchList([batch(1)]))
            one_step(model, method, *batch(5))
            grads[name].append((encoder_grads(model), model.fusion.classifier.weight.grad.clone()))
    for epoch, (plain, valued) in enumerate(zip(grads["plain"], grads["valued"]), start=1):
        same = torch.equal(plain[1], valued[1]) and all(torch.equal(plain[0][m], valued[0][m]) for m in plain[0])
        assert same == (epoch <= 2), epoch


def test_modality_copies_train_the_kept_modality_only():
    """Copies keep the weak modality's features alone: the other encoder's gradient is the
    plain step's, the weak one's is not."""
    grads = {}
    for name in ("plain", "valued"):
        model, method = ready(plain_model())
        method.start_epoch(2, model, BatchList([]))
        method.weak, method.difference = 1, (1.0 if name == "valued" else 0.0)  # copy visual, 1 per row on average
        diagnostics = one_step(model, method, *batch(6))
        grads[name] = encoder_grads(model)
    assert diagnostics["valuation_copies"]["audio"] == 0.0 and diagnostics["valuation_copies"]["visual"] > 0.5
    assert torch.equal(grads["plain"]["audio"], grads["valued"]["audio"])
    assert not torch.allclose(grads["plain"]["visual"], grads["valued"]["visual"])


def test_shapley_values_of_the_size_utility_by_hand():
    # Two modalities, columns {}, {a}, {v}, {a,v}: the released (v_a + v_all - v_v) / 2.
    for a, v, both in ((1, 1, 1), (1, 0, 1), (0, 1, 1), (0, 0, 1), (1, 1, 0), (0, 1, 0), (0, 0, 0)):
        correct = torch.tensor([[False, bool(a), bool(v), bool(both)]])
        phi = subset_values(correct) @ shapley_matrix(2)
        assert phi[0].tolist() == pytest.approx([(a + 2 * both - v) / 2, (v + 2 * both - a) / 2])
    # Three: every set holding a right, the others wrong: phi = (2, 1/2, 1/2), adding up to |M| = 3.
    correct = torch.tensor([[bool(s & 1) for s in range(8)]])
    assert (subset_values(correct) @ shapley_matrix(3))[0].tolist() == pytest.approx([2.0, 0.5, 0.5])
    # Through a model: the fusion head with features zeroed, per sample, as execute_modulation.
    model = plain_model()
    inputs, labels = batch(7)
    model.eval()
    with torch.no_grad():
        a, v = released_encode(model, inputs)
    phi = contributions(model, {"audio": a, "visual": v}, labels, ("audio", "visual"))
    assert phi.tolist() == [list(c) for c in released_contributions(model, inputs, labels)]


def test_copy_rules_by_hand():
    phi = torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.5, -0.1, 0.4, 0.9])
    assert sample_copies(phi).tolist() == [3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert modality_difference(torch.tensor([0.8, 0.2]), 1.0) == (pytest.approx(0.4), 1)
    assert modality_difference(torch.tensor([0.2, 0.8]), 0.5) == (pytest.approx(0.2), 0)
    # Three: gaps (0, 0.5, 1): pairs 0.5 + 1 + 0.5 over M - 1 = 2, times 2/3.
    assert modality_difference(torch.tensor([1.0, 0.5, 0.0]), 1.0) == (pytest.approx(2 / 3), 2)


def test_two_ranks_draw_what_one_process_draws_for_the_global_batch():
    single = drawn_copies(0.7, 8, 3, 2, 5)
    ranks = [drawn_copies(0.35 * 2, 4, 3, 2, 5, world=2, rank=r) for r in range(2)]
    assert torch.equal(torch.cat(ranks), single)
    assert not torch.equal(drawn_copies(0.7, 8, 3, 2, 6), single)  # a fresh draw per step
    assert float(drawn_copies(0.7, 20000, 0, 1, 0).mean()) == pytest.approx(0.7, abs=0.03)


@pytest.mark.parametrize("settings, fragment", [
    ({"level": "batch"}, "--modality-valuation-level"), ({"alpha": -1.0}, "--modality-valuation-alpha"),
    ({"modulation_starts": -1}, "--modality-valuation-modulation-starts"),
    ({"part_ratio": 0.0}, "--modality-valuation-part-ratio"),
])
def test_bad_settings_are_one_sentence(settings, fragment):
    assert_refused("modality_valuation", settings, fragment)
    assert_refused("modality_valuation", None, "two modality heads", heads=("audio", "fusion"))


def test_authors_recipe_and_state_round_trip():
    cfg = resolved_config("KineticSound", "modality_valuation", recipe="authors")
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.lr_step, cfg.lr_gamma, cfg.batch_size, cfg.epochs,
            cfg.loss_reduction) == ("adam", 5e-5, 1e-4, 30, 0.1, 64, 60, "mean")
    assert cfg.method_settings == {"modality_valuation_modulation_starts": 5}
    _, method = ready(plain_model())
    method.epoch, method.step, method.mean_contribution, method.difference, method.weak = 4, 7, [0.9, 0.3], 0.4, 1
    _, fresh = ready(plain_model())
    fresh.load_state_dict(method.state_dict())
    assert fresh.get_extra_state() == {"epoch": 4, "step": 7, "mean_contribution": [0.9, 0.3], "difference": 0.4,
                                       "weak": 1}
