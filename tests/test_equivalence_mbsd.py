"""MBSD in our trainer equals MBSD as BalanceBenchmark runs it (``balancemm/trainer/MBSD_trainer.py``
``training_step``, two modalities; no authors' code was found), re-stated below from its facts:

- ``unimodal_result[m] = f_m W_m^T + b / 2`` (``unimodality_calculate``, concat head) and the
  fusion output ``out``; ``prediction[m] = softmax(unimodal_result[m])``;
- inside ``modulation_starts <= epoch <= modulation_ends``: per sample ``i`` (a Python loop),
  ``w[i] = max - min`` of the two true-class probabilities when either modality's argmax is
  the label, ``ps[i]``/``pw[i]`` the max/min; ``loss_RS = 1/C sum_c (z_a - z_v)^2``;
  ``loss_KL = F.kl_div(ps, pw, reduction='none')``; ``total = CE(out) + CE(z_a) + CE(z_v) +
  mm(w, RS)/B + mm(w, KL)/B``, nothing detached; outside the window ``CE(out)``.

The wiring tests pin what the equivalence cannot isolate: the terms by hand, more than two
modalities, that the gradient flows through the weights, the read-outs, the refusals.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engines.trainer import fit, make_loaders
from olmbalance import build_method
from olmbalance.mbsd import distillation_terms
from tests.equivalence_fixtures import (CPU, FEATURES, NOT_RELEASED, assert_refused, batch, bn_late_fusion,
                                        one_step, ready_method, released_epochs, released_parameters,
                                        resolved_config, sgd_run_config)
from tests.scaling_fixtures import vector_data
from utils.errors import UserError

BATCH, LR = 16, 0.05


def run_config(epochs):
    return sgd_run_config("mbsd", epochs, BATCH, LR)


def ready(fusion="concat", **settings):
    return ready_method("mbsd", bn_late_fusion(fusion=fusion), settings)


# -- BalanceBenchmark's training step, re-stated ------------------------------------------------------
def released_loss(model, inputs, labels, modulating):
    a, v = model.encoders["audio"](inputs["audio"]), model.encoders["visual"](inputs["visual"])
    out = model.fusion([a, v])
    layer = model.fusion.classifier
    z = {"audio": torch.mm(a, torch.transpose(layer.weight[:, :FEATURES], 0, 1)) + layer.bias / 2,
         "visual": torch.mm(v, torch.transpose(layer.weight[:, FEATURES:], 0, 1)) + layer.bias / 2}
    criterion = nn.CrossEntropyLoss()
    if not modulating:
        return criterion(out, labels)
    prediction = {m: nn.Softmax(dim=1)(z[m]) for m in z}
    y_pred = {m: prediction[m].argmax(dim=-1) for m in z}
    rs = 1 / z["audio"].shape[1] * torch.sum((z["audio"] - z["visual"]) ** 2, dim=1)
    size = len(out)
    # The released loop writes w[i], ps[i], pw[i] into zero tensors one by one; stacking the
    # same per-sample values gives the same values and graph, without a copy per sample.
    w, ps, pw = [torch.zeros(())] * size, [None] * size, [None] * size
    for i in range(size):
        pa, pv = prediction["audio"][i][labels[i]], prediction["visual"][i][labels[i]]
        if y_pred["audio"][i] == labels[i] or y_pred["visual"][i] == labels[i]:
            w[i] = max(pa, pv) - min(pa, pv)
        ps[i], pw[i] = max(pa, pv), min(pa, pv)
    w, ps, pw = torch.stack(w), torch.stack(ps), torch.stack(pw)
    kl = F.kl_div(ps, pw, reduction="none")
    w = w.reshape(1, -1)
    loss_kl = torch.mm(w, kl.reshape(-1, 1)) / size
    loss_rs = torch.mm(w, rs.reshape(-1, 1)) / size
    return (criterion(out, labels) + criterion(z["audio"], labels) + criterion(z["visual"], labels)
            + loss_rs.squeeze() + loss_kl.squeeze())


def data():
    return vector_data(train=48, val=16, test=16)  # the per-sample loop below is slow: a short split


def released_run(epochs, window):
    loaders = make_loaders(run_config(epochs), data(), CPU, False)

    def loss(model, inputs, labels, epoch):
        return released_loss(model, inputs, labels, window[0] <= epoch <= window[1])

    return released_epochs(bn_late_fusion(), loaders.train, epochs, LR, loss)


@pytest.mark.parametrize("settings, window", [
    ({}, (0, 80)),  # BalanceBenchmark's configured window
    ({"modulation_starts": 1, "modulation_ends": 1}, (1, 1)),  # plain, then MBSD
])
def test_two_epochs_of_our_trainer_equal_balancebenchmarks_training(tmp_path, settings, window):
    cfg = run_config(2)
    model, method = ready(**settings)
    fit(cfg, model, method, make_loaders(cfg, data(), CPU, False), tmp_path, CPU)
    theirs = released_run(2, window)
    torch.testing.assert_close(released_parameters(model), released_parameters(theirs), atol=1e-6, rtol=1e-5)


# -- wiring ---------------------------------------------------------------------------------------
def test_terms_by_hand():
    # z_a = (2, 0), z_v = (0, 0), label 0: p_a = e^2/(e^2+1) = 0.880797 (right), p_v = 0.5;
    # w = 0.380797; RS = (2^2 + 0)/2 = 2; KL = 0.5 (ln 0.5 - 0.880797) = -0.786972.
    terms = distillation_terms({"audio": torch.tensor([[2.0, 0.0]]), "visual": torch.zeros(1, 2)},
                               torch.tensor([0]))
    assert float(terms["weight"]) == pytest.approx(0.380797, rel=1e-5)
    assert float(terms["rs"]) == pytest.approx(0.380797 * 2, rel=1e-5)
    assert float(terms["kl"]) == pytest.approx(0.380797 * -0.786972, rel=1e-5)
    wrong = distillation_terms({"audio": torch.tensor([[2.0, 0.0]]), "visual": torch.zeros(1, 2)},
                               torch.tensor([1]))  # neither modality predicts class 1: w = 0
    assert float(wrong["rs"]) == 0.0 and float(wrong["kl"]) == 0.0


def test_three_modalities_average_the_pairs():
    generator = torch.Generator().manual_seed(0)
    logits = {m: torch.randn(10, 4, generator=generator) * 3 for m in ("a", "b", "c")}
    labels = torch.randint(0, 4, (10,), generator=generator)
    three = distillation_terms(logits, labels)
    pairs = [distillation_terms({x: logits[x], y: logits[y]}, labels) for x, y in (("a", "b"), ("a", "c"), ("b", "c"))]
    for key in ("rs", "kl", "weight"):
        assert float(three[key]) == pytest.approx(sum(float(p[key]) for p in pairs) / 3, rel=1e-6)


def test_the_gradient_flows_through_the_sample_weights():
    """As in BalanceBenchmark, w is not detached: detaching it would change the gradient."""
    generator = torch.Generator().manual_seed(1)
    base = {m: torch.randn(8, 3, generator=generator) * 2 for m in ("audio", "visual")}
    labels = torch.arange(8) % 3
    grads = []
    for detach in (False, True):
        logits = {m: z.clone().requires_grad_() for m, z in base.items()}
        terms = distillation_terms(logits, labels)
        if detach:  # the same terms with w held constant
            probs = {m: torch.softmax(z, 1).gather(1, labels.view(-1, 1)).squeeze(1) for m, z in logits.items()}
            right = (torch.softmax(logits["audio"], 1).argmax(1) == labels) | \
                    (torch.softmax(logits["visual"], 1).argmax(1) == labels)
            strong, weak = torch.maximum(*probs.values()), torch.minimum(*probs.values())
            w = torch.where(right, strong - weak, torch.zeros_like(strong)).detach()
            rs = (logits["audio"] - logits["visual"]).pow(2).sum(1) / 3
            total = (w * rs).sum() / 8 + (w * F.kl_div(strong, weak, reduction="none")).sum() / 8
            torch.testing.assert_close(total, terms["rs"] + terms["kl"])  # same value...
        else:
            total = terms["rs"] + terms["kl"]
        total.backward()
        grads.append(logits["audio"].grad)
    assert not torch.allclose(grads[0], grads[1])  # ...another gradient


def test_the_step_trains_the_fusion_shares_and_the_readouts_stay_detached():
    model, method = ready()
    twin = bn_late_fusion()
    inputs, labels = batch(2, size=12)
    diagnostics = one_step(model, method, inputs, labels)
    assert set(diagnostics) == {"mbsd_rs", "mbsd_kl", "mbsd_weight"}
    twin.train()
    released_loss(twin, inputs, labels, True).backward()
    for (name, ours), theirs in zip(model.named_parameters(), twin.parameters()):
        if not name.startswith(NOT_RELEASED):
            torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_the_window_counts_epochs_from_zero():
    model, method = ready(modulation_starts=1, modulation_ends=2)
    for epoch, active in ((1, False), (2, True), (3, True), (4, False)):
        method.start_epoch(epoch, model, None)
        assert bool(one_step(model, method, *batch(epoch, size=12))) == active, epoch


def test_sum_head_shares_are_each_modality_classifier():
    model, method = ready("sum")
    inputs, labels = batch(3, size=12)
    model.train()
    method.forward_train(model, inputs, labels)
    features = {m: model.encoders[m](inputs[m]) for m in ("audio", "visual")}
    expected = distillation_terms({m: model.fusion.classifiers[i](features[m]) for i, m in enumerate(features)}, labels)
    torch.testing.assert_close(method.last["mbsd_rs"], expected["rs"].detach())


@pytest.mark.parametrize("fusion", ["bilinear", "film"])
def test_heads_without_modality_shares_are_refused_in_one_sentence(fusion):
    model = bn_late_fusion(fusion=fusion)
    with pytest.raises(UserError, match="--method mbsd.*--fusion concat or sum"):
        build_method("mbsd", model.heads).setup(model)


def test_bad_settings_and_the_recipe():
    assert_refused("mbsd", None, "5..2", modulation_starts=5, modulation_ends=2)
    assert_refused("mbsd", None, "two modality heads", heads=("audio", "fusion"))
    cfg = resolved_config("CREMAD", "mbsd", recipe="authors")
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.lr_step, cfg.lr_gamma, cfg.batch_size, cfg.epochs,
            cfg.loss_reduction) == ("adamw", 1e-3, 0.01, 10, 0.1, 32, 30, "mean")
