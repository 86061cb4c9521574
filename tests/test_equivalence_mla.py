"""MLA in our trainer equals MLA as its authors released it (Cecile-hi/Multimodal-Learning-with-
Alternating-Unimodal-Adaptation, ``main.py`` ``train_epoch``'s ``gs_flag`` branch and ``valid``;
``utils/utils.py`` ``GSPlugin.before_update``; BalanceBenchmark ``MLA_trainer.py``), re-stated
below from their facts:

- one forward of both encoders per batch (train mode), then for audio and then visual:
  ``out = fc_out(features)`` with the shared head as it is now, batch-mean CE, backward;
  from the run's second such sub-step on (``exp_count != 0``), with ``lamda = batch_step / len
  + 1``, ``alpha = 0.1 ** lamda``, ``r`` the batch mean of the features, ``k = P r^T``,
  ``P = P - k k^T / (alpha + torch.mm(k, r))``, ``P /= ||P||_F``, and the head's weight gradient
  ``G + G P^T`` (BalanceBenchmark); ``optimizer.step()``, ``zero_grad()``; SGD(momentum 0.9,
  weight decay 1e-4);
- test time: ``calculate_gating_weights`` (per sample in BalanceBenchmark, per batch with the
  softmax over the batch in the released ``--dynamic``), or the fixed ``0.55 a + 0.45 v``.

The wiring tests pin what the equivalence cannot isolate: one optimizer step per modality in
turn, the idle encoder's normalization statistics, what is logged, the evaluation fusion, the
settings and recipe, and that a resumed run continues identically.
"""
from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from config import Config
from engines.engines_logits_com import DiagnosticMeans, StepContext, train_step
from engines.metrics import HeadMetrics
from engines.trainer import fit, make_loaders
from olmbalance import build_method
from olmbalance.mla import update_projector
from tests.scaling_fixtures import vector_data
from utils.errors import UserError

CPU = torch.device("cpu")
CLASSES, FEATURES, BATCH, LR = 3, 8, 16, 0.05
STEPS_PER_EPOCH = 6  # vector_data's 96 training samples in batches of 16
UNTIED = "unimodal_heads.visual."  # the released model has one fc_out; ours ties visual's to audio's


def bn_model(seed=0):
    """A LateFusionClassifier whose encoders have BatchNorm, so normalization statistics show."""
    from models.late_fusion import LateFusionClassifier

    torch.manual_seed(seed)
    encoders = {m: nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, FEATURES))
                for m in ("audio", "visual")}
    return LateFusionClassifier(CLASSES, ("audio", "visual"), "concat", encoders=encoders, feature_dim=FEATURES)


def run_config(epochs, **options):
    return Config(method="mla", epochs=epochs, batch_size=BATCH, lr=LR, optimizer="sgd", momentum=0.9,
                  weight_decay=1e-4, loss_reduction="mean", progress=False, plots=False, device="cpu", seed=0,
                  **options)


def ready(settings=None, seed=0):
    model = bn_model(seed)
    method = build_method("mla", model.heads, settings, steps_per_epoch=STEPS_PER_EPOCH)
    method.setup(model)
    return model, method


def our_run(tmp_path, epochs, settings, resume=False):
    """``epochs`` epochs of engines.trainer.fit; returns the model and the method."""
    cfg = run_config(epochs, resume=str(tmp_path) if resume else None)
    model, method = ready(settings)
    fit(cfg, model, method, make_loaders(cfg, vector_data(), CPU, False), tmp_path, CPU)
    return model, method


# -- the released training, re-stated ---------------------------------------------------------------
def released_run(epochs, modification="add", denominator="outer", base=0.1):
    """main.py's gs_flag training with GSPlugin; returns the model and the projector."""
    cfg = run_config(epochs)
    loaders = make_loaders(cfg, vector_data(), CPU, False)
    model = bn_model()
    fc_out = model.unimodal_heads["audio"]
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    projector, exp_count, len_dataloader = torch.eye(FEATURES), 0, len(loaders.train)
    assert len_dataloader == STEPS_PER_EPOCH
    for _ in range(epochs):
        model.train()
        for batch_step, (inputs, labels, _) in enumerate(loaders.train):
            optimizer.zero_grad(set_to_none=True)
            a, v = model.encoders["audio"](inputs["audio"]), model.encoders["visual"](inputs["visual"])
            for features in (a, v):
                F.cross_entropy(fc_out(features), labels).backward()
                if exp_count != 0 and modification != "off":
                    alpha = 1.0 * base ** (batch_step / len_dataloader + 1)
                    r = features.detach().mean(0, keepdim=True)
                    k = projector @ r.t()
                    projector = projector - (k @ k.t()) / (alpha + (k @ r if denominator == "outer" else r @ k))
                    projector = projector / torch.norm(projector, p="fro")
                    grad = fc_out.weight.grad
                    fc_out.weight.grad = grad + grad @ projector.t() if modification == "add" else grad @ projector.t()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                exp_count += 1
    return model, projector


def released_parameters(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith(UNTIED)}


@pytest.mark.parametrize("settings, released", [
    ({}, {}),  # the defaults: add, outer denominator, alpha 0.1
    ({"gradient_modification": "replace", "denominator": "scalar", "alpha": 0.2},
     {"modification": "replace", "denominator": "scalar", "base": 0.2}),
    ({"gradient_modification": "off"}, {"modification": "off"}),  # the authors' main.py as released
])
def test_two_epochs_of_our_trainer_equal_the_released_training(tmp_path, settings, released):
    ours, method = our_run(tmp_path, 2, settings)
    theirs, projector = released_run(2, **released)
    torch.testing.assert_close(released_parameters(ours), released_parameters(theirs), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(method.projector, projector, atol=1e-6, rtol=1e-5)
    assert method.updates == 2 * 2 * STEPS_PER_EPOCH
    if settings.get("gradient_modification") != "off":
        assert not torch.allclose(projector, torch.eye(FEATURES) / FEATURES ** 0.5, atol=1e-3)


def test_a_resumed_run_continues_like_an_uninterrupted_one(tmp_path):
    whole_model, whole = our_run(tmp_path / "whole", 2, {})
    our_run(tmp_path / "split", 1, {})
    saved = torch.load(tmp_path / "split" / "last.pt", weights_only=False)["method"]
    assert saved["_extra_state"] == {"substep": 2 * STEPS_PER_EPOCH, "updates": 2 * STEPS_PER_EPOCH}
    assert saved["projector"].shape == (FEATURES, FEATURES)
    resumed_model, resumed = our_run(tmp_path / "split", 2, {}, resume=True)
    for key, value in whole_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[key], value), key
    assert torch.equal(resumed.projector, whole.projector) and resumed.updates == whole.updates


# -- wiring ---------------------------------------------------------------------------------------
def batch(seed, size=24):
    generator = torch.Generator().manual_seed(seed)
    inputs = {m: torch.randn(size, 4, generator=generator) for m in ("audio", "visual")}
    return inputs, torch.arange(size) % CLASSES


def one_step(model, method, inputs, labels, optimizer):
    model.train()
    ctx = StepContext(device=CPU, network_optimizer=optimizer, progress=False)
    metrics = HeadMetrics(method.heads)
    train_step(model, method, (inputs, labels, 0), None, ctx, metrics, DiagnosticMeans())
    return metrics


def test_each_batch_steps_once_per_modality_in_turn_and_logs_the_batch_once():
    model, method = ready()
    assert model.unimodal_heads["audio"] is model.unimodal_heads["visual"]
    inputs, labels = batch(1)
    with torch.no_grad():
        before = model(inputs)  # no dropout, and BatchNorm in train mode: the step's first forward
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    moved, step = [], optimizer.step

    def recording_step(*args, **kwargs):
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        step(*args, **kwargs)
        moved.append({n.rsplit(".", 2)[0] if n.startswith("encoders") else n.rsplit(".", 1)[0]
                      for n, p in model.named_parameters() if not torch.equal(p, start[n])})

    optimizer.step = recording_step
    metrics = one_step(model, method, inputs, labels, optimizer)
    # audio then visual, each with the shared head; the idle encoder and the fusion head stay
    assert moved == [{"encoders.audio", "unimodal_heads.audio"}, {"encoders.visual", "unimodal_heads.audio"}]
    assert metrics.count == len(labels)  # logged once per batch, as the batch met the model
    logged = metrics.compute()
    for m in ("audio", "visual"):
        assert logged[m]["loss"] == pytest.approx(F.cross_entropy(before[m], labels).item(), rel=1e-5)
    assert method.active == "audio" and method.substep == 2
    method.start_epoch(2, model, None)
    assert method.substep == 0 and method.updates == 2


def test_each_encoder_records_its_normalization_statistics_once_per_batch():
    model, method = ready()
    reference = bn_model()
    inputs, labels = batch(2)
    reference.train()
    with torch.no_grad():
        reference(inputs)  # one train-mode forward: what the released batch records
    one_step(model, method, inputs, labels, torch.optim.SGD(model.parameters(), lr=0.1))
    for m in ("audio", "visual"):
        ours, theirs = model.encoders[m][1], reference.encoders[m][1]
        assert int(ours.num_batches_tracked) == 1
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)


def released_gating(outputs, dim):
    """calculate_gating_weights: dim 1 per sample (BalanceBenchmark), dim 0 the released one."""
    entropies = []
    for out in outputs:
        p = F.softmax(out, dim=dim)
        entropies.append(-torch.sum(p * torch.log(p), dim=1, keepdim=True) if dim == 1 else -torch.sum(p * torch.log(p)))
    most = torch.max(*entropies)
    weights = [torch.exp(most - h) for h in entropies]
    return [w / sum(weights) for w in weights]


@pytest.mark.parametrize("fusion", ["sample", "batch", "fixed"])
def test_evaluation_fuses_the_unimodal_predictions_like_the_references(fusion):
    model, method = ready({"fusion": fusion})
    inputs, _ = batch(3)
    with torch.no_grad():
        model.unimodal_heads["audio"].weight.mul_(torch.linspace(0.5, 3.0, FEATURES))  # entropies that differ
        model.eval()
        logits = method.forward_eval(model, inputs)
        a, v = (model.unimodal_heads["audio"](model.encoders[m](inputs[m])) for m in ("audio", "visual"))
    if fusion == "fixed":
        expected = 0.55 * a + 0.45 * v
    else:
        w_a, w_v = released_gating((a, v), 1 if fusion == "sample" else 0)
        expected = w_a * a + w_v * v
    torch.testing.assert_close(logits["fusion"], expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(logits["fusion"], (a + v) / 2, atol=1e-3)  # not a plain mean
    torch.testing.assert_close(logits["audio"], a)


def test_the_released_denominator_is_an_outer_product():
    # P = I, r = (1, 1), a = 0.1: k = (1, 1)^T and k k^T is all ones. Outer: a + k r is 1.1
    # everywhere, P - ones / 1.1; scalar (paper): a + r k = 2.1, P - ones / 2.1; then / ||P||_F.
    outer = update_projector(torch.eye(2), torch.ones(1, 2), 0.1, "outer")
    scalar = update_projector(torch.eye(2), torch.ones(1, 2), 0.1, "scalar")
    for result, d in ((outer, 1.1), (scalar, 2.1)):
        expected = torch.eye(2) - torch.ones(2, 2) / d
        torch.testing.assert_close(result, expected / expected.norm())


@pytest.mark.parametrize("settings, fragment", [
    ({"alpha": 0.0}, "--mla-alpha"), ({"fusion": "mean"}, "--mla-fusion"),
    ({"gradient_modification": "project"}, "--mla-gradient-modification"),
    ({"fusion": "fixed", "fixed_weight": 1.5}, "--mla-fixed-weight"), ({"projector": 1}, "no setting"),
])
def test_bad_settings_are_one_sentence(settings, fragment):
    with pytest.raises(UserError, match=fragment):
        build_method("mla", ("audio", "visual", "fusion"), settings)


def test_settings_and_the_authors_recipe_come_from_the_run_config():
    from config import resolve_config
    from engines.methods import method_from_config

    cfg = resolve_config(argparse.Namespace(dataset="CREMAD", method="mla", recipe="authors"))
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_step, cfg.lr_gamma, cfg.batch_size,
            cfg.epochs, cfg.loss_reduction) == ("sgd", 1e-3, 0.9, 1e-4, 70, 0.1, 64, 100, "mean")
    assert resolve_config(argparse.Namespace(dataset="CREMAD", method="mla")).optimizer == "adam"
    cfg = resolve_config(argparse.Namespace(dataset="CREMAD", method="mla", mla_fusion="fixed", mla_fixed_weight=0.7,
                                            mla_alpha=0.3, mla_gradient_modification="replace",
                                            mla_denominator="scalar"))
    method = method_from_config(cfg, ("audio", "visual", "fusion"), train_size=640)
    assert (method.fusion, method.fixed_weight, method.alpha, method.gradient_modification, method.denominator,
            method.steps_per_epoch, method.substeps()) == ("fixed", 0.7, 0.3, "replace", "scalar", 10, 2)
