"""CML in our loop equals BalanceBenchmark's late-fusion CML step
(``balancemm/trainer/CML_trainer.py`` ``training_step`` and ``conf_loss``) with the authors'
regularizer (github QingyangZhang/CML, ``cpm/CPM_Nets.py`` ``rank_loss``) one setting away,
re-stated below in plain torch from those facts:

- one forward; for a concat head BalanceBenchmark's per-modality results are
  ``f_m W_m^T + b / M`` and the output their sum;
- for i = 0..M-2: remove the next modality, ``out_p = out_s - unimodal[removed] + b / M``;
  confidences and predictions of ``softmax(out_s)`` and ``softmax(out_p)``; ``loss`` starts at
  ``CE(out_s)`` and adds ``CE(out_p)``; the confidence loss adds ``max(0, sum(conf_p - conf_s))``
  (BalanceBenchmark) or, per sample, ``relu((conf_p - conf_s) * sign)`` summed, with
  ``sign = ~((pred_p == y) & (pred_s != y))`` (CPM-Nets' "trick 1"); then ``out_s = out_p``;
- ``loss / M + lam * confidence loss``; outside ``modulation_starts <= epoch <= ends``
  (0-based) ``CE(output)`` alone; SGD steps.

The removal orders are the method's own draws (read back after each of our steps); what they
are (per sample and step, or one per epoch), and that they leave the global random stream
alone, is pinned by the wiring tests.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engines.engines_logits_com import DiagnosticMeans, StepContext, train_step
from engines.metrics import HeadMetrics
from models.late_fusion import LateFusionClassifier
from olmbalance import build_method
from tests.tiny import TinyModel
from utils.errors import UserError

CPU = torch.device("cpu")
CLASSES, FEATURES, BATCH, INPUTS, LR, LAM = 4, 8, 16, 6, 0.2, 1.0
NOT_RELEASED = "unimodal_heads."  # fusion_only's detached read-outs: not part of the released model
# (epoch, steps): the window below closes after epoch 1 (0-based epoch 0), so epoch 2 trains the plain CE.
SCHEDULE = ((1, 3), (2, 2))
# The cross-cutting tests (DDP ranks, autocast, resume): BalanceBenchmark's batch-sum hinge,
# whose gate is reduced over ranks, and the per-epoch order, re-derived on resume.
STEP_SETTINGS = {"penalty": "balancemm", "order": "epoch"}


def bn_model(modalities=("audio", "visual"), seed=0, opposed=False):
    """With ``opposed``, audio is a copy of visual whose fusion block cancels half of visual's
    logits: removing audio raises the confidence of every sample (the hinges then act)."""
    torch.manual_seed(seed)
    encoders = {m: nn.Sequential(nn.Linear(INPUTS, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, FEATURES))
                for m in modalities}
    model = LateFusionClassifier(CLASSES, modalities, "concat", encoders=encoders, feature_dim=FEATURES)
    with torch.no_grad():  # confident predictions, so that removing a modality moves them visibly
        model.fusion.classifier.weight.mul_(4.0)
        if opposed:
            model.encoders["audio"].load_state_dict(model.encoders["visual"].state_dict())
            audio, visual = model.fusion.classifier.weight.split(FEATURES, dim=1)
            audio.copy_(-0.5 * visual)
    return model


def batches(modalities, seed=1, opposed=False):
    generator = torch.Generator().manual_seed(seed)
    while True:
        inputs = {m: 2 * torch.randn(BATCH, INPUTS, generator=generator) for m in modalities}
        if opposed:
            inputs["audio"] = inputs["visual"].clone()
        yield inputs, torch.randint(0, CLASSES, (BATCH,), generator=generator)


def sgd(parameters):
    return torch.optim.SGD(parameters, lr=LR, momentum=0.9, weight_decay=1e-4)


# -- BalanceBenchmark's step, re-stated -------------------------------------------------------------
def released_step(model, optimizer, inputs, label, removal, penalty, modulating, lam=LAM):
    """``removal``: (B, M-1) modality indices, removed in that order (one row per sample)."""
    modalities = model.modalities
    count = len(modalities)
    features = [model.encoders[m](inputs[m]) for m in modalities]
    layer = model.fusion.classifier
    output = layer(torch.cat(features, dim=1))
    if not modulating:
        loss = F.cross_entropy(output, label)
    else:
        blocks = layer.weight.split(FEATURES, dim=1)
        unimodal = torch.stack([f @ w.t() + layer.bias / count for f, w in zip(features, blocks)])  # (M, B, C)
        rows = torch.arange(label.shape[0])
        out_s, confidence_loss = output, 0
        for i in range(count - 1):
            out_p = out_s - unimodal[removal[:, i], rows] + layer.bias / count
            conf_s, pred_s = torch.max(torch.softmax(out_s, dim=1), dim=1)
            conf_p, pred_p = torch.max(torch.softmax(out_p, dim=1), dim=1)
            if i == 0:
                loss = F.cross_entropy(out_s, label)
            loss = loss + F.cross_entropy(out_p, label)
            if penalty == "balancemm":
                confidence_loss = confidence_loss + max(0, torch.sub(conf_p, conf_s).sum())
            else:
                sign = (~((pred_p == label) & (pred_s != label))).long()
                confidence_loss = confidence_loss + torch.relu(torch.sub(conf_p, conf_s) * sign - 0.0).sum()
            out_s = out_p
        loss = loss / count + lam * confidence_loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def released_parameters(model):
    return [p for n, p in model.named_parameters() if not n.startswith(NOT_RELEASED)]


# -- ours --------------------------------------------------------------------------------------------
def ours(model, **settings):
    method = build_method("cml", model.heads, {"lam": LAM, **settings}, seed=0)
    method.setup(model)
    ctx = StepContext(device=CPU, network_optimizer=sgd(model.parameters()), progress=False)
    return method, ctx


def our_step(model, method, ctx, inputs, labels, loss_reduction="mean"):
    ctx.loss_reduction = loss_reduction
    diagnostics = DiagnosticMeans()
    train_step(model, method, (inputs, labels, 0), None, ctx, HeadMetrics(method.heads), diagnostics)
    return diagnostics.means(method.heads)


@pytest.mark.parametrize("penalty, order, modalities, opposed", [
    ("released", "sample", ("audio", "visual"), False),
    ("balancemm", "epoch", ("audio", "visual"), True),  # the run's seed removes audio first in epoch 1
    ("released", "epoch", ("audio", "visual", "text"), False),
])
def test_steps_equal_balancebenchmarks_step(penalty, order, modalities, opposed):
    start = bn_model(modalities, opposed=opposed)
    model, released = copy.deepcopy(start), copy.deepcopy(start)
    method, ctx = ours(model, penalty=penalty, order=order, modulation_ends=0)
    optimizer = sgd(released_parameters(released))
    data, penalties, orders = batches(modalities, opposed=opposed), [], []
    for epoch, steps in SCHEDULE:
        method.start_epoch(epoch, model, None)
        model.train()
        for inputs, labels in itertools.islice(data, steps):
            method.last_order = None
            means = our_step(model, method, ctx, inputs, labels)
            modulating = epoch == 1
            assert (method.last_order is not None) == modulating
            removal = method.last_order[:, :-1] if modulating else None
            released.train()
            released_step(released, optimizer, inputs, labels, removal, penalty, modulating)
            if modulating:
                penalties.append(means["cml_penalty"])
                orders.append(method.last_order)
    for (name, a), b in zip([(n, p) for n, p in model.named_parameters() if not n.startswith(NOT_RELEASED)],
                            released_parameters(released)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    # Not vacuous: the regularizer was active, and each encoder ran once per step (features
    # masked, encoders not run again).
    assert any(p > 0 for p in penalties)
    steps = sum(s for _, s in SCHEDULE)
    assert all(int(model.encoders[m][1].num_batches_tracked) == steps for m in modalities)
    if order == "sample":
        assert any(len({tuple(row) for row in o.tolist()}) > 1 for o in orders)


def test_the_authors_penalty_is_not_balancebenchmarks():
    start = bn_model()
    model, released = copy.deepcopy(start), copy.deepcopy(start)
    method, ctx = ours(model, penalty="released", order="epoch")
    optimizer = sgd(released_parameters(released))
    for inputs, labels in itertools.islice(batches(model.modalities), 3):
        our_step(model, method, ctx, inputs, labels)
        released_step(released, optimizer, inputs, labels, method.last_order[:, :-1], "balancemm", True)
    assert not torch.allclose(model.encoders["audio"][0].weight, released.encoders["audio"][0].weight, atol=1e-6)


# -- wiring -------------------------------------------------------------------------------------------
def test_orders_per_sample_and_step_or_per_epoch_leave_the_global_stream_alone():
    modalities = ("audio", "visual", "text")
    seen = {}
    for order in ("sample", "epoch"):
        model = bn_model(modalities)
        method, ctx = ours(model, order=order)
        data, drawn = batches(modalities), []
        for epoch in (1, 2):
            method.start_epoch(epoch, model, None)
            for inputs, labels in itertools.islice(data, 2):
                state = torch.random.get_rng_state()
                our_step(model, method, ctx, inputs, labels)
                assert torch.equal(torch.random.get_rng_state(), state)
                drawn.append(method.last_order)
        for o in drawn:
            assert sorted(o[0].tolist()) == [0, 1, 2] and o.shape == (BATCH, 3)
        seen[order] = drawn
    sample, epoch = seen["sample"], seen["epoch"]
    assert len({tuple(row) for row in sample[0].tolist()}) > 1 and not torch.equal(sample[0], sample[1])
    for o in epoch:
        assert torch.equal(o, o[:1].expand_as(o))  # one order for every sample
    assert torch.equal(epoch[0], epoch[1]) and torch.equal(epoch[2], epoch[3])
    assert not torch.equal(epoch[0][0], epoch[2][0])  # drawn afresh per epoch (with this seed)


def test_a_restored_method_continues_like_the_uninterrupted_one():
    """The step count (the order generator's position) and the epoch travel in state_dict."""
    start = bn_model()
    data = list(itertools.islice(batches(start.modalities), 4))
    whole_model = copy.deepcopy(start)
    whole, whole_ctx = ours(whole_model)
    orders = []
    for inputs, labels in data:
        our_step(whole_model, whole, whole_ctx, inputs, labels)
        orders.append(whole.last_order)
    model = copy.deepcopy(start)
    first, ctx = ours(model)
    for inputs, labels in data[:2]:
        our_step(model, first, ctx, inputs, labels)
    saved = copy.deepcopy(first.state_dict())
    assert saved["_extra_state"] == {"steps": 2, "epoch": 1}
    resumed = build_method("cml", model.heads, {"lam": LAM}, seed=0)
    resumed.setup(model)
    resumed.load_state_dict(saved)
    for (inputs, labels), expected in zip(data[2:], orders[2:]):
        our_step(model, resumed, ctx, inputs, labels)
        assert torch.equal(resumed.last_order, expected)
    for a, b in zip(model.parameters(), whole_model.parameters()):
        assert torch.equal(a, b)


def test_summed_loss_scales_every_term_alike():
    """--loss-reduction sum multiplies the whole loss by the batch size, the penalty (already a
    sum) included, so the references' balance between the terms holds."""
    grads = {}
    for reduction in ("mean", "sum"):
        model = bn_model()
        method, ctx = ours(model)
        ctx.network_optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        inputs, labels = next(batches(model.modalities))
        our_step(model, method, ctx, inputs, labels, loss_reduction=reduction)
        grads[reduction] = model.encoders["audio"][0].weight.grad.clone()
    torch.testing.assert_close(grads["sum"], BATCH * grads["mean"], rtol=1e-5, atol=1e-6)


def test_refuses_models_without_features_and_settings_out_of_range():
    with pytest.raises(UserError, match="--method cml"):
        build_method("cml", ("audio", "visual", "fusion")).setup(TinyModel())
    with pytest.raises(UserError, match="cml"):
        build_method("cml", ("audio", "fusion"))
    with pytest.raises(UserError, match="--cml-lam"):
        build_method("cml", ("audio", "visual", "fusion"), {"lam": -1.0})
