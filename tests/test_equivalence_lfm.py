"""LFM in our loop equals its authors' released training (github njustkmg/NeurIPS24-LFM),
re-stated below in plain torch from ``Crema_epoch.py`` and ``Crema_epoch_learnable.py``:

- the model: an encoder and a linear head per modality; ``o_a``, ``o_v`` their logits;
- ``train_audio_video``: ``loss_alignment = Alignment(o_a, o_v)`` (softmaxes, their mean ``m``,
  ``0.5 (kl_div(p.log(), m) + kl_div(q.log(), m))``, batch means), ``loss_cls =
  CE(0.5 o_v + 0.5 o_a)``, ``loss = 2 (cls_k[0] loss_cls + cls_k[1] loss_alignment)``, SGD;
- ``getAlpha_Learnable_Fitted(epoch)``: the two released polynomials of the 0-based epoch;
- ``getAlpha_Learnable``: on the first half of a fixed 16-sample batch, ``L_total = alpha[0]
  loss_cls + alpha[1] loss_alignment``, ``theta_grads`` (create_graph), ``cls_grads``, the
  Hessian-vector product over the parameters, ``alpha_grad = hvp[0].mean()``; the lr halves
  when ``epoch % 20 == 0 and epoch != 0``; ``alpha[1] -= lr alpha_grad``, clipped to
  [0.05, 0.95], ``alpha[0] = 1 - alpha[1]``; ``cls_k`` starts at [0.05, 0.95].

The probe runs in eval mode (the module docstring says why); BalanceBenchmark's variant
(``--lfm-logits fusion``: the fusion head's CE, its per-modality parts aligned) is re-stated
from ``balancemm/trainer/LFM_trainer.py`` ``training_step`` and ``getAlpha_Learnable``.
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
from olmbalance.base import EpochData
from olmbalance.lfm import fitted_weights
from utils.errors import UserError

CPU = torch.device("cpu")
CLASSES, FEATURES, BATCH, INPUTS, LR = 4, 8, 16, 6, 0.1
LR_ALPHA = 1000.0  # the released 1e-4 moves the weight by ~1e-9 on these tiny models; this moves it visibly
# It also magnifies the float32 rounding of the Hessian-vector product: the weights agree to ~1e-6.
SCHEDULE = ((1, 2), (2, 2))  # (epoch, steps)
# The cross-cutting tests (DDP ranks, autocast, resume) exercise the learned weights.
STEP_SETTINGS = {"method": "learnable", "lr_alpha": LR_ALPHA, "initial_weight": 0.5}


def bn_model(seed=0, fusion="concat"):
    torch.manual_seed(seed)
    encoders = {m: nn.Sequential(nn.Linear(INPUTS, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, FEATURES))
                for m in ("audio", "visual")}
    return LateFusionClassifier(CLASSES, ("audio", "visual"), fusion, encoders=encoders, feature_dim=FEATURES)


def batches(seed=1):
    generator = torch.Generator().manual_seed(seed)
    while True:
        inputs = {m: 2 * torch.randn(BATCH, INPUTS, generator=generator) for m in ("audio", "visual")}
        yield inputs, torch.randint(0, CLASSES, (BATCH,), generator=generator)


VAL = next(batches(seed=7))  # the fixed validation batch (16 samples)


class Split(EpochData):
    """Validation batches (the fixed one first); records every read."""

    def __init__(self):
        self.reads = []

    def train_batches(self, share: float = 1.0):
        self.reads.append("train")
        return iter([next(batches(seed=9))])

    def val_batches(self):
        self.reads.append("val")
        return iter([VAL, next(batches(seed=8))])


def sgd(parameters):
    return torch.optim.SGD(parameters, lr=LR, momentum=0.9, weight_decay=1e-4)


# -- the released code, re-stated ----------------------------------------------------------------------
def Alignment(p, q):  # noqa: N802  the released name
    p = F.softmax(p, dim=-1)
    q = F.softmax(q, dim=-1)
    m = 0.5 * p + 0.5 * q
    return 0.5 * (F.kl_div(p.log(), m, reduction="batchmean") + F.kl_div(q.log(), m, reduction="batchmean"))


def getAlpha_Learnable_Fitted(epoch):  # noqa: N802
    coef_alpha1 = [2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11]
    coef_alpha2 = [7.95376296e-01, -3.35472727e-03, -1.22989557e-04, 2.92947416e-06, -2.23835486e-08, 5.39717505e-11]
    return [sum(c * (epoch ** i) for i, c in enumerate(coef_alpha1)),
            sum(c * (epoch ** i) for i, c in enumerate(coef_alpha2))]


def released_parameters(model, bench=False):
    """The released model: encoders and a head per modality (BalanceBenchmark's: encoders and
    the fusion layer)."""
    heads = [model.fusion] if bench else [model.unimodal_heads["audio"], model.unimodal_heads["visual"]]
    return [p for module in (model.encoders["audio"], model.encoders["visual"], *heads) for p in module.parameters()]


def released_outputs(model, inputs, bench=False):
    """(fused logits, o_a, o_v): the released model's, or BalanceBenchmark's concat model's."""
    a, v = model.encoders["audio"](inputs["audio"]), model.encoders["visual"](inputs["visual"])
    if not bench:
        o_a, o_v = model.unimodal_heads["audio"](a), model.unimodal_heads["visual"](v)
        return 0.5 * o_v + 0.5 * o_a, o_a, o_v
    layer = model.fusion.classifier
    w_a, w_v = layer.weight.split(FEATURES, dim=1)
    return layer(torch.cat([a, v], dim=1)), a @ w_a.t() + layer.bias / 2, v @ w_v.t() + layer.bias / 2


def getAlpha_Learnable(epoch, valbatch, model, alpha, lr_alpha, bench=False):  # noqa: N802
    inputs, y = valbatch
    size = y.size(0) // 4 if bench else y.size(0) // 2
    inputs, y = {m: x[:size] for m, x in inputs.items()}, y[:size]
    model.eval()  # our documented choice: every probe in eval mode
    out, o_a, o_v = released_outputs(model, inputs, bench)
    loss_alignment = Alignment(o_a, o_v)
    loss_cls = nn.CrossEntropyLoss(reduction="none")(out, y).mean()
    L_total = alpha[0] * loss_cls + alpha[1] * loss_alignment  # noqa: N806
    parameters = released_parameters(model, bench)
    theta_grads = torch.autograd.grad(L_total, parameters, create_graph=True)
    cls_grads = torch.autograd.grad(loss_cls, parameters, retain_graph=True, create_graph=True)
    hessian_vector_prod = torch.autograd.grad(outputs=theta_grads, inputs=parameters, grad_outputs=cls_grads,
                                              retain_graph=True)
    with torch.no_grad():
        alpha_grad = hessian_vector_prod[0].mean().item()
        if epoch % 20 == 0 and epoch != 0:
            lr_alpha = lr_alpha / 2
        alpha[1] -= lr_alpha * alpha_grad
        alpha[1] = max(0.05, min(0.95, alpha[1]))
        alpha[0] = 1.0 - alpha[1]
    return alpha, lr_alpha


def released_epoch(model, optimizer, data, steps, cls_k, bench=False):
    model.train()
    for inputs, y in itertools.islice(data, steps):
        optimizer.zero_grad()
        out, o_a, o_v = released_outputs(model, inputs, bench)
        loss = 2 * (cls_k[0] * F.cross_entropy(out, y) + cls_k[1] * Alignment(o_a, o_v))
        loss.backward()
        optimizer.step()


def released_run(model, method, bench=False, schedule=SCHEDULE):
    optimizer = sgd(released_parameters(model, bench))
    data, used = batches(), []
    cls_k, lr_alpha = ([0.95, 0.05] if bench else [0.05, 0.95]), LR_ALPHA
    for epoch, steps in schedule:
        if method == "learnable":
            cls_k, lr_alpha = getAlpha_Learnable(epoch - 1, VAL, model, cls_k, lr_alpha, bench)
        else:
            cls_k = getAlpha_Learnable_Fitted(epoch - 1)
        used.append(tuple(cls_k))
        released_epoch(model, optimizer, data, steps, cls_k, bench)
    return used


# -- ours ----------------------------------------------------------------------------------------------
def ours(model, **settings):
    method = build_method("lfm", model.heads, settings, seed=0)
    method.setup(model)
    ctx = StepContext(device=CPU, network_optimizer=sgd(model.parameters()), progress=False)
    return method, ctx


def our_run(model, schedule=SCHEDULE, **settings):
    method, ctx = ours(model, **settings)
    data, used = batches(), []
    for epoch, steps in schedule:
        method.start_epoch(epoch, model, Split())
        model.train()
        used.append(method.in_force)
        for inputs, labels in itertools.islice(data, steps):
            train_step(model, method, (inputs, labels, 0), None, ctx, HeadMetrics(method.heads), DiagnosticMeans())
    return method, used


def flat(pairs):
    return [w for pair in pairs for w in pair]


def assert_same(ours_model, released_model, bench=False):
    for a, b in zip(released_parameters(ours_model, bench), released_parameters(released_model, bench)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["learning-fitted", "learnable"])
def test_epochs_equal_the_released_training(method):
    start = bn_model()
    model, released = copy.deepcopy(start), copy.deepcopy(start)
    expected = released_run(released, method)
    ours_method, used = our_run(model, method=method, lr_alpha=LR_ALPHA)
    assert flat(used) == pytest.approx(flat(expected), rel=1e-5, abs=1e-6)
    assert_same(model, released)
    # The released model has no fusion layer: ours is left untouched; the heads' mean predicts.
    for a, b in zip(model.fusion.parameters(), start.fusion.parameters()):
        assert torch.equal(a, b)
    if method == "learnable":  # not vacuous: the weight moved each epoch, inside its clip
        assert all(0.05 < w < 0.95 for _, w in used) and used[0][1] != used[1][1]
        assert ours_method.weights.tolist() == pytest.approx(list(expected[-1]), rel=1e-5, abs=1e-6)


def test_the_learnable_lr_halves_every_twenty_epochs():
    """Epoch 21 (0-based 20) takes the released halved step; epoch 1 the whole one."""
    start = bn_model()
    expected, _ = getAlpha_Learnable(20, VAL, copy.deepcopy(start), [0.05, 0.95], LR_ALPHA)
    moved = {}
    for epoch in (1, 21):
        model = copy.deepcopy(start)
        method, _ = ours(model, method="learnable", lr_alpha=LR_ALPHA)
        method.start_epoch(epoch, model, Split())
        moved[epoch] = 0.95 - method.in_force[1]
    assert list(method.in_force) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert moved[1] == pytest.approx(2 * moved[21], rel=1e-5) and moved[21] > 0


def test_balancebenchmarks_variant_equals_its_trainer():
    """--lfm-logits fusion with BalanceBenchmark's starting weight and its quarter-batch probe."""
    start = bn_model()
    model, released = copy.deepcopy(start), copy.deepcopy(start)
    expected = released_run(released, "learnable", bench=True)
    method, used = our_run(model, method="learnable", lr_alpha=LR_ALPHA, logits="fusion", initial_weight=0.95,
                           probe_size=BATCH // 4)
    assert flat(used) == pytest.approx(flat(expected), rel=1e-5, abs=1e-6)
    assert_same(model, released, bench=True)


# -- wiring ------------------------------------------------------------------------------------------
def test_probe_reads_the_first_validation_batch_once_in_eval_mode():
    model = bn_model()
    method, _ = ours(model, method="learnable", lr_alpha=LR_ALPHA)
    norm = model.encoders["audio"][1]
    before = copy.deepcopy(norm.state_dict())
    split = Split()
    model.train()
    method.start_epoch(1, model, split)
    method.start_epoch(2, model, split)
    assert split.reads == ["val"]  # the probe is kept: the same samples every epoch, never training data
    assert torch.equal(method.probe[1], VAL[1][:8])
    assert model.training and norm.training
    for key, value in norm.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_evaluation_predicts_with_the_heads_mean():
    model = bn_model(fusion="bilinear")  # the fusion head plays no part in the released model
    method, _ = ours(model)
    assert method.leaves_parameters_unused
    model.eval()
    inputs = VAL[0]
    logits = method.forward_eval(model, inputs)
    torch.testing.assert_close(logits["fusion"], 0.5 * (logits["audio"] + logits["visual"]))


def test_weights_are_checkpointed_and_restored():
    model = bn_model()
    method, _ = ours(model, method="learnable", lr_alpha=LR_ALPHA)
    method.start_epoch(1, model, Split())
    saved = copy.deepcopy(method.state_dict())
    restored, _ = ours(copy.deepcopy(model), method="learnable", lr_alpha=LR_ALPHA)
    restored.load_state_dict(saved)
    assert restored.in_force == method.in_force != (0.05, 0.95)
    method.start_epoch(2, model, Split())
    restored.start_epoch(2, model, Split())
    assert restored.in_force == method.in_force


def test_fitted_weights_hold_after_the_fitted_epochs():
    assert fitted_weights(0) == pytest.approx((0.204623704, 0.795376296))
    assert fitted_weights(250) == fitted_weights(199) == pytest.approx(getAlpha_Learnable_Fitted(199))


def test_refusals():
    with pytest.raises(UserError, match="--method lfm"):
        build_method("lfm", ("audio", "fusion"))
    with pytest.raises(UserError, match="--lfm-logits fusion"):
        ours(bn_model(fusion="bilinear"), logits="fusion")
    with pytest.raises(UserError, match="--lfm-initial-weight"):
        build_method("lfm", ("audio", "visual", "fusion"), {"initial_weight": 1.5})
