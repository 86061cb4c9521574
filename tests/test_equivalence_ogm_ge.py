"""OGM-GE in our loop equals the authors' released step (GeWu-Lab/OGM-GE_CVPR2022), re-stated
below in plain torch from ``main.py`` ``train_epoch`` (``--modulation OGM_GE`` and ``OGM``,
``--fusion_method concat``):

- ``a, v, out = model(spec, image)``; ``out_a = a W[:, :D]^T + b/2``, ``out_v = v W[:, D:]^T + b/2``
  with the concat head's ``fc_out`` weight W and bias b;
- ``loss = CE(out, label)`` (batch mean), ``loss.backward()``;
- ``score_m = sum_i softmax(out_m)[i, label_i]``, ``ratio_v = score_v / score_a``;
  ``ratio_v > 1``: ``coeff_v = 1 - tanh(alpha relu(ratio_v))``, ``coeff_a = 1``; else
  ``coeff_a = 1 - tanh(alpha relu(1 / ratio_v))``, ``coeff_v = 1``;
- in epochs ``modulation_starts..modulation_ends`` (counted from 0), every 4-D gradient of an
  encoder becomes ``grad * coeff + N(0, grad.std() + 1e-8)`` (OGM_GE) or ``grad * coeff`` (OGM);
- SGD(lr 1e-3, momentum 0.9, weight decay 1e-4) steps; StepLR(70, 0.1) per epoch.

The encoders here are small convolution stacks with BatchNorm, so the 4-D weights the released
code selects exist. The GE noise is replayed from a generator seeded like ours (the run's seed,
the same parameters in the same order); everything else is exact.
"""
import argparse
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from config import resolve_config
from engines.engines_logits_com import DiagnosticMeans, train_step
from engines.methods import method_from_config
from engines.metrics import HeadMetrics
from engines.trainer import make_context
from models.late_fusion import LateFusionClassifier

CLASSES, FEATURES, BATCH = 4, 6, 8
MODALITIES = ("audio", "visual")
ALPHA, LR, SEED = 0.8, 0.05, 11  # CREMA-D's alpha; a larger lr so a few steps move the weights visibly
STEPS_PER_EPOCH = 2


def conv_model(seed=0):
    torch.manual_seed(seed)
    encoders = {m: nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, FEATURES, 3),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten()) for m in MODALITIES}
    return LateFusionClassifier(CLASSES, MODALITIES, "concat", encoders=encoders, feature_dim=FEATURES)


def batches(seed=2):
    generator = torch.Generator().manual_seed(seed)
    while True:
        inputs = {m: torch.randn(BATCH, 1, 7, 7, generator=generator) for m in MODALITIES}
        yield inputs, torch.randint(0, CLASSES, (BATCH,), generator=generator)


def config(**flags):
    values = dict(dataset="CREMAD", method="ogm_ge", recipe="authors", lr=LR, seed=SEED)
    values.update(flags)
    return resolve_config(argparse.Namespace(**{k: v for k, v in values.items() if v is not None}))


def released_parameters(model):
    return [*model.encoders.parameters(), *model.fusion.parameters()]


# -- the released step, re-stated ---------------------------------------------------------------------
def released_steps(model, epochs, generalization, window=(0, 50), alpha=ALPHA, lr=LR):
    optimizer = torch.optim.SGD(released_parameters(model), lr=lr, momentum=0.9, weight_decay=1e-4)
    noise = torch.Generator().manual_seed(SEED)
    data = batches()
    coefficients = []
    relu, tanh = nn.ReLU(), nn.Tanh()
    for epoch in range(epochs):
        model.train()
        for _ in range(STEPS_PER_EPOCH):
            inputs, label = next(data)
            optimizer.zero_grad()
            a, v = model.encoders["audio"](inputs["audio"]), model.encoders["visual"](inputs["visual"])
            fc_out = model.fusion.classifier
            out = fc_out(torch.cat((a, v), dim=1))
            weight_size = fc_out.weight.size(1)
            out_v = torch.mm(v, torch.transpose(fc_out.weight[:, weight_size // 2:], 0, 1)) + fc_out.bias / 2
            out_a = torch.mm(a, torch.transpose(fc_out.weight[:, :weight_size // 2], 0, 1)) + fc_out.bias / 2
            loss = F.cross_entropy(out, label)
            loss.backward()
            score_v = sum([torch.softmax(out_v, dim=1)[i][label[i]] for i in range(out_v.size(0))])
            score_a = sum([torch.softmax(out_a, dim=1)[i][label[i]] for i in range(out_a.size(0))])
            ratio_v = score_v / score_a
            ratio_a = 1 / ratio_v
            if ratio_v > 1:
                coeff_v, coeff_a = 1 - tanh(alpha * relu(ratio_v)), 1
            else:
                coeff_a, coeff_v = 1 - tanh(alpha * relu(ratio_a)), 1
            modulating = window[0] <= epoch <= window[1]
            if modulating:
                for m, coeff in (("audio", coeff_a), ("visual", coeff_v)):
                    for parms in model.encoders[m].parameters():
                        if len(parms.grad.size()) != 4:
                            continue
                        if generalization:
                            parms.grad = parms.grad * coeff + torch.zeros_like(parms.grad).normal_(
                                0, parms.grad.std().item() + 1e-8, generator=noise)
                        else:
                            parms.grad *= coeff
            optimizer.step()
            value = lambda c: float(c.detach()) if torch.is_tensor(c) else float(c)  # noqa: E731
            coefficients.append((value(coeff_a), value(coeff_v)) if modulating else (1.0, 1.0))
    return coefficients


def our_steps(model, cfg, epochs, data=None, method=None, optimizer_state=None):
    method = method or method_from_config(cfg, model.heads, train_size=STEPS_PER_EPOCH * cfg.batch_size)
    method.setup(model)
    ctx = make_context(cfg, model, method, torch.device("cpu"))
    if optimizer_state is not None:
        ctx.network_optimizer.load_state_dict(optimizer_state)
    ctx.progress = False
    data = data or batches()
    coefficients = []
    for _ in range(epochs * STEPS_PER_EPOCH):
        inputs, labels = next(data)
        diagnostics = DiagnosticMeans()
        train_step(model, method, (inputs, labels, 0), None, ctx, HeadMetrics(method.heads), diagnostics)
        k = diagnostics.means(method.heads)["modulation"]
        coefficients.append((k["audio"], k["visual"]))
    return method, ctx, coefficients


def assert_same_parameters(ours, released):
    named = [(n, p) for n, p in ours.named_parameters() if not n.startswith("unimodal_heads")]
    for (name, a), b in zip(named, released_parameters(released)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_authors_recipe_on_cremad():
    cfg = resolve_config(argparse.Namespace(dataset="CREMAD", method="ogm_ge", recipe="authors"))
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay) == ("sgd", 1e-3, 0.9, 1e-4)
    assert (cfg.lr_step, cfg.lr_gamma, cfg.loss_reduction) == (70, 0.1, "mean")
    assert (cfg.batch_size, cfg.epochs, cfg.method_settings["ogm_alpha"]) == (64, 100, 0.8)
    method = method_from_config(cfg, ("audio", "visual", "fusion"), train_size=640)
    assert (method.alpha, method.modulation_epochs, method.generalization) == (0.8, (0, 50), True)


def test_plain_ogm_steps_equal_the_released_steps_across_the_window():
    """Epoch 0 modulated, epoch 1 not (window 0..0), no noise: exact."""
    start = conv_model()
    released = copy.deepcopy(start)
    expected = released_steps(released, epochs=2, generalization=False, window=(0, 0))
    assert all(min(k) < 1 for k in expected[:STEPS_PER_EPOCH])
    assert expected[STEPS_PER_EPOCH:] == [(1.0, 1.0)] * STEPS_PER_EPOCH
    ours = conv_model()
    _, _, coefficients = our_steps(ours, config(ogm_generalization=False, ogm_modulation_ends=0), epochs=2)
    for got, want in zip(coefficients, expected):
        assert got == pytest.approx(want, rel=1e-5)
    assert_same_parameters(ours, released)


def test_ogm_ge_steps_equal_the_released_steps_with_the_noise_replayed():
    released = conv_model()
    released_steps(released, epochs=2, generalization=True)
    ours = conv_model()
    our_steps(ours, config(), epochs=2)
    assert_same_parameters(ours, released)
    # The noise matters: without it the same steps end elsewhere.
    plain = conv_model()
    our_steps(plain, config(ogm_generalization=False), epochs=2)
    assert not torch.allclose(plain.encoders["audio"][0].weight, ours.encoders["audio"][0].weight, atol=1e-4)


def test_checkpointed_state_continues_identically():
    """The step count (the epoch) and the noise generator travel in state_dict."""
    cfg = config(ogm_modulation_ends=0)
    whole = conv_model()
    our_steps(whole, cfg, epochs=2)

    data = batches()
    first = conv_model()
    method, ctx, _ = our_steps(first, cfg, epochs=1, data=data)
    saved = copy.deepcopy({"model": first.state_dict(), "method": method.state_dict(),
                           "optimizer": ctx.network_optimizer.state_dict()})
    resumed = conv_model(seed=3)
    resumed.load_state_dict(saved["model"])
    fresh = method_from_config(cfg, resumed.heads, train_size=STEPS_PER_EPOCH * cfg.batch_size)
    fresh.load_state_dict(saved["method"])
    _, _, coefficients = our_steps(resumed, cfg, epochs=1, data=data, method=fresh, optimizer_state=saved["optimizer"])
    assert coefficients == [(1.0, 1.0)] * STEPS_PER_EPOCH  # the restored step count closed the window
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_alpha_reaches_the_step():
    expected = released_steps(conv_model(), epochs=1, generalization=False, alpha=0.3)
    _, _, coefficients = our_steps(conv_model(), config(ogm_generalization=False, ogm_alpha=0.3), epochs=1)
    _, _, at_default = our_steps(conv_model(), config(ogm_generalization=False), epochs=1)
    assert coefficients[0] == pytest.approx(expected[0], rel=1e-5)
    assert min(coefficients[0]) > min(at_default[0])  # a weaker alpha slows the dominant encoder less
