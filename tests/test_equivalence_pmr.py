"""PMR in our trainer equals PMR as its authors released it (fanyunfeng-bit/Modal-Imbalance-PMR,
``main_Prototype_grad.py``), re-stated below from that script's facts:

- ``calculate_prototype``: eval mode, no gradients, per-class mean of each encoder's features
  over a tenth of the training set; blended ``(1 - m) * new + m * previous`` only when the
  epoch it is given is > 0; ``main`` calls it with epoch 0 before training and with the
  epoch's index after every epoch;
- ``train_epoch``: train mode; inside ``modulation_starts <= epoch <= modulation_ends`` each
  modality's distances to its prototypes, its score (summed softmax probability of the true
  class), the ratio s_a / s_v, and ``alpha * CE(-distances)`` added to the fusion CE for the
  modality with the lower score only; SGD(momentum 0.9, weight decay 1e-4) steps that loss.

The wiring tests pin what the equivalence cannot isolate: which data the prototypes read,
in which mode, that the prototype CE sends gradient to the slow encoder only, that the
entropy option stops after its epochs, and that a resumed run continues identically.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engines.epoch_data import LoaderEpochData
from engines.trainer import fit, make_loaders
from olmbalance import build_method
from olmbalance.pmr import prototype_distances, rebalance_weights
from tests.equivalence_fixtures import (CLASSES, CPU, FEATURES, BatchList, assert_refused, batch, bn_late_fusion,
                                        one_step, ready_method, released_parameters, resolved_config,
                                        sgd_run_config)
from tests.scaling_fixtures import vector_data

BATCH, LR = 16, 0.05
# The models (bn_late_fusion) have BatchNorm in their encoders: eval and train mode give
# different features, so prototypes taken in the wrong mode show.


def run_config(epochs, **options):
    return sgd_run_config("pmr", epochs, BATCH, LR, **options)


def ready(seed=0, **settings):
    return ready_method("pmr", bn_late_fusion(seed), settings)


def our_run(tmp_path, epochs, settings, resume=False):
    """``epochs`` epochs of engines.trainer.fit; returns the model and the method."""
    cfg = run_config(epochs, resume=str(tmp_path) if resume else None)
    model, method = ready_method("pmr", bn_late_fusion(), settings)
    fit(cfg, model, method, make_loaders(cfg, vector_data(), CPU, False), tmp_path, CPU)
    return model, method


# -- the released training, re-stated ---------------------------------------------------------------
def released_forward(model, inputs):
    a, v = model.encoders["audio"](inputs["audio"]), model.encoders["visual"](inputs["visual"])
    return a, v, model.fusion([a, v])


def released_prototypes(model, batches, epoch, previous, momentum):
    model.eval()
    sums = {m: torch.zeros(CLASSES, FEATURES) for m in ("audio", "visual")}
    counts = torch.zeros(CLASSES)
    with torch.no_grad():
        for inputs, labels in batches:
            a, v, _ = released_forward(model, inputs)
            for c, label in enumerate(labels):
                counts[label] += 1
                sums["audio"][label] += a[c]
                sums["visual"][label] += v[c]
    new = {m: sums[m] / counts.unsqueeze(1) for m in sums}
    if epoch <= 0:
        return new
    return {m: (1 - momentum) * new[m] + momentum * previous[m] for m in new}


def released_distances(x, prototypes):
    """EU_dist: d[i, j] = sqrt((x_i - c_j) . (x_i - c_j)), all pairs at once."""
    difference = x.unsqueeze(1) - prototypes.unsqueeze(0)
    return torch.sqrt((difference * difference).sum(dim=-1))


def released_train_epoch(model, optimizer, loader, epoch, prototypes, alpha, window):
    model.train()
    for inputs, labels, _ in loader:
        optimizer.zero_grad()
        a, v, out = released_forward(model, inputs)
        loss = F.cross_entropy(out, labels)
        if window[0] <= epoch <= window[1]:
            audio_sim = -released_distances(a, prototypes["audio"])
            visual_sim = -released_distances(v, prototypes["visual"])
            score_a = sum(torch.softmax(audio_sim, dim=1)[i][labels[i]] for i in range(len(labels)))
            score_v = sum(torch.softmax(visual_sim, dim=1)[i][labels[i]] for i in range(len(labels)))
            ratio = score_a / score_v
            beta, lam = (0.0, alpha) if ratio > 1 else (alpha, 0.0) if ratio < 1 else (0.0, 0.0)
            loss = loss + beta * F.cross_entropy(audio_sim, labels) + lam * F.cross_entropy(visual_sim, labels)
        loss.backward()
        optimizer.step()


def released_run(epochs, alpha=1.0, momentum=0.2, window=(0, 100)):
    """The released main(): prototypes, then per epoch a training pass and new prototypes.
    Returns the model and the prototypes each epoch trained with."""
    cfg = run_config(epochs)
    loaders = make_loaders(cfg, vector_data(), CPU, False)
    model = bn_late_fusion()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)

    def tenth(epoch):  # the same samples our trainer hands start_epoch(epoch)
        return LoaderEpochData(loaders.train, loaders.val, CPU, cfg.seed, epoch, lambda x: x).train_batches(0.1)

    prototypes = released_prototypes(model, tenth(1), 0, None, momentum)
    used = []
    for epoch in range(epochs):
        used.append(prototypes)
        released_train_epoch(model, optimizer, loaders.train, epoch, prototypes, alpha, window)
        prototypes = released_prototypes(model, tenth(epoch + 2), epoch, prototypes, momentum)
    return model, used


@pytest.mark.parametrize("settings, released", [
    ({}, {}),  # the defaults: alpha 1, momentum 0.2, epochs 0..100
    ({"alpha": 2.0, "momentum": 0.5, "modulation_starts": 1, "modulation_ends": 1},
     {"alpha": 2.0, "momentum": 0.5, "window": (1, 1)}),
])
def test_three_epochs_of_our_trainer_equal_the_released_training(tmp_path, settings, released):
    ours, method = our_run(tmp_path, 3, settings)
    theirs, used = released_run(3, **released)
    torch.testing.assert_close(released_parameters(ours), released_parameters(theirs), atol=1e-6, rtol=1e-5)
    # Ours are those of the last epoch in the window (no pass after it): with the defaults,
    # the third epoch's, the first blended ones.
    last = min(2, settings.get("modulation_ends", 2))
    for m in ("audio", "visual"):
        torch.testing.assert_close(method.prototypes[m], used[last][m], atol=1e-6, rtol=1e-5)


def test_a_resumed_run_continues_like_an_uninterrupted_one(tmp_path):
    whole_model, whole = our_run(tmp_path / "whole", 3, {})
    our_run(tmp_path / "split", 2, {})
    saved = torch.load(tmp_path / "split" / "last.pt", weights_only=False)["method"]["_extra_state"]
    assert set(saved["prototypes"]) == {"audio", "visual"}
    resumed_model, resumed = our_run(tmp_path / "split", 3, {}, resume=True)
    for key, value in whole_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    for m in ("audio", "visual"):
        assert torch.equal(resumed.prototypes[m], whole.prototypes[m])


# -- wiring ---------------------------------------------------------------------------------------
def test_prototypes_read_a_tenth_of_the_training_split_in_eval_mode():
    model, method = ready()
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    data = BatchList([batch(1)], [batch(2)])
    method.start_epoch(1, model, data)
    assert data.reads == [("train", 0.1)] and modes == [False]
    inputs, labels = batch(1)
    model.eval()
    with torch.no_grad():
        model(inputs)
        expected = model.last_features["visual"][labels == 2].mean(dim=0)
    torch.testing.assert_close(method.prototypes["visual"][2], expected)
    _, on_val = ready(prototype_data="val")
    data = BatchList([batch(1)], [batch(2)])
    on_val.start_epoch(1, model, data)
    assert data.reads == [("val", None)]


def test_prototypes_blend_from_the_third_pass_and_keep_absent_classes():
    model, method = ready(momentum=0.25)

    def alone(seed):  # what one pass over batch(seed) gives by itself
        _, single = ready()
        single.start_epoch(1, model, BatchList([batch(seed)]))
        return single.prototypes

    method.start_epoch(1, model, BatchList([batch(1)]))
    method.start_epoch(2, model, BatchList([batch(2)]))
    second = dict(method.prototypes)
    method.start_epoch(3, model, BatchList([batch(3)]))
    for m in ("audio", "visual"):
        assert torch.equal(second[m], alone(2)[m])  # pass 2 replaces pass 1, unblended
        torch.testing.assert_close(method.prototypes[m], 0.75 * alone(3)[m] + 0.25 * second[m])
    inputs, labels = batch(4, classes=2)  # no sample of class 2
    before = method.prototypes["audio"][2].clone()
    method.start_epoch(4, model, BatchList([(inputs, labels)]))
    assert torch.equal(method.prototypes["audio"][2], before)


def test_prototype_ce_reaches_the_slow_encoder_only():
    """The prototype CE is alpha * CE on the lower-scoring modality, with its graph: against
    alpha 0 the slow encoder's gradient changes and the other's does not."""
    grads = {}
    for alpha in (0.0, 1.0):
        model, method = ready(alpha=alpha)
        method.start_epoch(1, model, BatchList([batch(1)]))
        diagnostics = one_step(model, method, *batch(5))
        grads[alpha] = {m: torch.cat([p.grad.reshape(-1) for p in model.encoders[m].parameters()])
                        for m in ("audio", "visual")}
    slow = min(("audio", "visual"), key=lambda m: diagnostics["pmr_ratio"][m])
    fast = "visual" if slow == "audio" else "audio"
    assert diagnostics["pmr_ratio"][slow] < 1 < diagnostics["pmr_ratio"][fast]
    assert diagnostics["pmr_beta"] == {slow: 1.0, fast: 0.0, "fusion": 0.0}
    assert torch.equal(grads[0.0][fast], grads[1.0][fast])
    assert not torch.allclose(grads[0.0][slow], grads[1.0][slow])


def test_no_rebalancing_outside_the_modulation_epochs_or_before_prototypes():
    model, method = ready(modulation_starts=1, modulation_ends=1)
    assert one_step(model, method, *batch(5)) == {}  # no prototypes yet
    for epoch, active in ((1, False), (2, True), (3, False)):
        method.start_epoch(epoch, model, BatchList([batch(epoch)]))
        assert bool(one_step(model, method, *batch(5))) == active, epoch


def test_weights_released_switch_and_paper_rule():
    distances = prototype_distances(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [0.0, 4.0]]))
    assert torch.allclose(distances, torch.tensor([[0.0, 4.0], [5.0, 3.0]]), atol=1e-5)
    ratios = torch.tensor([2.0, 0.5])
    beta, mu = rebalance_weights(ratios, alpha=1.5, mu=0.01)
    assert beta.tolist() == [0.0, 1.5] and mu.tolist() == pytest.approx([0.01, 0.0])
    assert [w.tolist() for w in rebalance_weights(torch.ones(2), 1.5, 0.01)] == [[0.0, 0.0], [0.0, 0.0]]
    beta, mu = rebalance_weights(ratios, alpha=1.0, mu=0.01, weighting="paper")
    assert beta.tolist() == pytest.approx([0.0, 1.0]) and mu.tolist() == pytest.approx([0.01, 0.0])
    beta, mu = rebalance_weights(torch.tensor([4.0, 0.25, 1.25]), alpha=2.0, mu=0.01, weighting="paper")
    assert beta.tolist() == pytest.approx([0.0, 2.0, 0.0]) and mu.tolist() == pytest.approx([0.01, 0.0, 0.0025])


def loss_by_hand(method, epoch):
    method.prototypes = {"audio": torch.tensor([[0.0], [2.0]]), "visual": torch.tensor([[0.0], [2.0]])}
    method.epoch = epoch
    features = {"audio": torch.tensor([[0.0], [2.0]]), "visual": torch.tensor([[1.0], [1.0]])}
    return float(method.rebalance_loss(features, torch.tensor([0, 1])))


def test_paper_weighting_and_entropy_by_hand_and_the_entropy_window_closes():
    # audio sits on its prototypes: p(true) = 1/(1+e^-2) = 0.880797 per sample, s_a = 1.761594;
    # visual sits halfway: p = 0.5, s_v = 1. rho_a = 1.761594, rho_v = 0.567668.
    # visual's PCE = ln 2 with beta_v = 1/rho_v - 1 = 0.761594;
    # audio's entropy H = -(0.880797 ln 0.880797 + 0.119203 ln 0.119203) = 0.365334,
    # with mu_a = 0.01 * 0.761594. Loss = 0.761594 * 0.693147 - 0.00761594 * 0.365334.
    method = build_method("pmr", ("audio", "visual", "fusion"), weighting="paper", entropy_weight=0.01,
                          entropy_epochs=2)
    assert loss_by_hand(method, 2) == pytest.approx(0.761594 * 0.693147 - 0.00761594 * 0.365334, rel=1e-4)
    assert method.last["pmr_ratio"].tolist()[:2] == pytest.approx([1.761594, 0.567668], rel=1e-5)
    assert loss_by_hand(method, 3) == pytest.approx(0.761594 * 0.693147, rel=1e-5)  # window closed
    assert method.last["pmr_mu"].tolist() == [0.0, 0.0, 0.0]
    released = build_method("pmr", ("audio", "visual", "fusion"), alpha=2.0)
    assert loss_by_hand(released, 1) == pytest.approx(2.0 * 0.693147, rel=1e-5)


@pytest.mark.parametrize("settings, fragment", [
    ({"alpha": -1.0}, "--pmr-alpha"), ({"momentum": 1.0}, "--pmr-momentum"),
    ({"prototype_share": 0.0}, "--pmr-prototype-share"), ({"modulation_starts": 5, "modulation_ends": 2}, "5..2"),
    ({"weighting": "scaled"}, "--pmr-weighting"), ({"entropy_weight": float("nan")}, "--pmr-entropy-weight"),
])
def test_bad_settings_are_one_sentence(settings, fragment):
    assert_refused("pmr", settings, fragment)
    assert_refused("pmr", None, "two modality heads", heads=("audio", "fusion"))


def test_authors_recipe_is_the_released_run():
    cfg = resolved_config("AVE", "pmr", recipe="authors")
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_step, cfg.lr_gamma, cfg.batch_size,
            cfg.epochs, cfg.loss_reduction) == ("sgd", 1e-3, 0.9, 1e-4, 70, 0.1, 64, 130, "mean")
    assert cfg.method_settings == {"pmr_alpha": 2.0, "pmr_momentum": 0.0, "pmr_modulation_ends": 70,
                                   "pmr_prototype_data": "val"}
    plain = resolved_config("AVE", "pmr")
    assert plain.method_settings == {} and plain.optimizer != "sgd"
