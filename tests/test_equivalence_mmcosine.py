"""MMCosine in our trainer equals MMCosine as its authors released it (GeWu-Lab/MMCosine_ICASSP23,
``main_CD.py`` ``train_epoch`` with ``--mmcosine True`` and ``valid``), re-stated below from
that script's facts:

- per batch, train mode: the encoders' features ``a``, ``v``; ``out_a = mm(normalize(a, dim=1),
  normalize(W[:, :D]^T, dim=0)) * scaling``, ``out_v`` likewise with ``W[:, D:]`` (``W`` the
  concat fusion layer's weight); ``out = out_a + out_v``; ``CrossEntropyLoss()(out, label)``,
  backward, SGD(momentum 0.9, weight decay 1e-4) step; the bias is never read;
- ``valid``: the modalities' predictions from ``out_a``/``out_v``; the fused one from the
  plain layer's ``out`` (``main_CD.py``) or from ``out_a + out_v`` (``main_vox2.py``,
  BalanceBenchmark).

The wiring tests pin what the equivalence cannot isolate: the evaluation logits, the weight
blocks of the ``sum`` head, that the bias gets no gradient, the read-outs, the refusals.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engines.trainer import fit, make_loaders
from olmbalance import build_method
from tests.equivalence_fixtures import (CPU, FEATURES, NOT_RELEASED, assert_refused, batch, bn_late_fusion,
                                        one_step, ready_method, released_epochs, released_parameters,
                                        resolved_config, sgd_run_config)
from tests.scaling_fixtures import vector_data
from utils.errors import UserError

BATCH, LR = 16, 0.05

# tests/method_steps.py: at the autocast test's small feature norms (about 0.7) the cosine
# logits' gradient, scaled by s/||f||, overflows fp16 at the initial loss scale 4096 in the
# encoders' activations; GradScaler halves the scale twice (skipping those steps), then trains.
FP16_BACKOFFS = 2


def run_config(epochs):
    return sgd_run_config("mmcosine", epochs, BATCH, LR)


def ready(fusion="concat", **settings):
    return ready_method("mmcosine", bn_late_fusion(fusion=fusion), settings)


# -- the released training, re-stated ---------------------------------------------------------------
def released_logits(model, inputs, scaling):
    """train_epoch's mmcosine branch: (out_a, out_v, out) with out = out_a + out_v."""
    a, v = model.encoders["audio"](inputs["audio"]), model.encoders["visual"](inputs["visual"])
    weight = model.fusion.classifier.weight
    out_a = torch.mm(F.normalize(a, dim=1), F.normalize(torch.transpose(weight[:, :FEATURES], 0, 1), dim=0))
    out_v = torch.mm(F.normalize(v, dim=1), F.normalize(torch.transpose(weight[:, FEATURES:], 0, 1), dim=0))
    out_a, out_v = out_a * scaling, out_v * scaling
    return out_a, out_v, out_a + out_v


def released_run(epochs, scaling):
    loaders = make_loaders(run_config(epochs), vector_data(), CPU, False)

    def loss(model, inputs, labels, _):
        _, _, out = released_logits(model, inputs, scaling)
        return nn.CrossEntropyLoss()(out, labels)

    return released_epochs(bn_late_fusion(), loaders.train, epochs, LR, loss)


@pytest.mark.parametrize("settings, scaling", [({}, 10.0), ({"scaling": 15.0}, 15.0)])
def test_two_epochs_of_our_trainer_equal_the_released_training(tmp_path, settings, scaling):
    cfg = run_config(2)
    model, method = ready(**settings)
    start_bias = model.fusion.classifier.bias.detach().clone()
    fit(cfg, model, method, make_loaders(cfg, vector_data(), CPU, False), tmp_path, CPU)
    theirs = released_run(2, scaling)
    torch.testing.assert_close(released_parameters(model), released_parameters(theirs), atol=1e-6, rtol=1e-5)
    assert torch.equal(model.fusion.classifier.bias, start_bias)  # never read, never moved


@pytest.mark.parametrize("eval_logits", ["cosine", "linear"])
def test_evaluation_scores_the_released_logits(eval_logits):
    model, method = ready(eval_logits=eval_logits)
    model.eval()
    inputs, _ = batch(3, size=12)
    with torch.no_grad():
        ours = method.forward_eval(model, inputs)
        _, _, cosine = released_logits(model, inputs, 10.0)
        plain = model(inputs)["fusion"]  # main_CD.py valid's softmax(out)
    torch.testing.assert_close(ours["fusion"], cosine if eval_logits == "cosine" else plain)
    assert not torch.allclose(cosine, plain)  # the two choices differ


def test_the_step_trains_the_cosine_logits_with_the_released_gradients():
    """The encoders and the fusion weight get the gradient of CE(out_a + out_v); the bias none;
    the read-outs train only themselves; the logged true-class logits are the released ones."""
    model, method = ready()
    twin = bn_late_fusion()
    inputs, labels = batch(5, size=12)
    diagnostics = one_step(model, method, inputs, labels)
    twin.train()
    out_a, out_v, out = released_logits(twin, inputs, 10.0)
    F.cross_entropy(out, labels).backward()
    for (name, ours), theirs in zip(model.named_parameters(), twin.parameters()):
        if name == "fusion.classifier.bias":
            assert ours.grad is None
        elif not name.startswith(NOT_RELEASED):
            torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-5, msg=name)
        else:
            assert ours.grad is not None and theirs.grad is None  # the read-outs' own CE
    expected = [float(z.detach().gather(1, labels.view(-1, 1)).mean()) for z in (out_a, out_v, out)]
    assert list(diagnostics["mmcosine_true_logit"].values()) == pytest.approx(expected, rel=1e-5)


def test_sum_head_normalizes_each_modality_classifier_and_features_scale_out():
    model, method = ready("sum")
    model.eval()
    inputs, _ = batch(4, size=12)
    with torch.no_grad():
        ours = method.forward_eval(model, inputs)["fusion"]
        expected = sum(10.0 * F.normalize(model.encoders[m](inputs[m]), dim=1)
                       @ F.normalize(model.fusion.classifiers[i].weight, dim=1).t()
                       for i, m in enumerate(("audio", "visual")))
        torch.testing.assert_close(ours, expected)
        model.encoders["audio"][-1].weight.mul_(7.0)  # a larger audio feature norm...
        model.encoders["audio"][-1].bias.mul_(7.0)
        torch.testing.assert_close(method.forward_eval(model, inputs)["fusion"], ours)  # ...changes no logit


@pytest.mark.parametrize("fusion", ["bilinear", "film", "gated"])
def test_heads_without_weight_blocks_are_refused_in_one_sentence(fusion):
    model = bn_late_fusion(fusion=fusion)
    method = build_method("mmcosine", model.heads)
    with pytest.raises(UserError, match="--method mmcosine.*--fusion concat or sum"):
        method.setup(model)


@pytest.mark.parametrize("settings, fragment", [
    ({"scaling": 0.0}, "--mmcosine-scaling"), ({"scaling": float("inf")}, "--mmcosine-scaling"),
    ({"eval_logits": "raw"}, "--mmcosine-eval-logits")])
def test_bad_settings_are_one_sentence(settings, fragment):
    assert_refused("mmcosine", settings, fragment)
    assert_refused("mmcosine", None, "two modality heads", heads=("audio", "fusion"))


def test_authors_recipe_is_the_released_run():
    cfg = resolved_config("CREMAD", "mmcosine", recipe="authors")
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_step, cfg.lr_gamma, cfg.batch_size,
            cfg.epochs, cfg.loss_reduction) == ("sgd", 1e-3, 0.9, 1e-4, 100, 0.1, 32, 200, "mean")
