"""MMPareto in our loop equals the authors' released step (GeWu-Lab/MMPareto_ICML2024), re-stated
below in plain torch from ``code/MMPareto.py`` ``train_epoch`` and ``code/min_norm_solvers.py``:

- one forward gives the fusion, audio and visual logits; the losses are batch-mean CEs;
- each loss is backpropagated on its own (``retain_graph``), the encoder gradients it leaves
  are copied, then zeroed: ``both`` (fusion loss) on both encoders, ``audio`` on the audio
  encoder, ``visual`` on the visual one;
- per encoder, cosine of the flattened ``both`` and unimodal gradients; above 0: weights
  (0.5, 0.5); else ``MinNormSolver.find_min_norm_element``, which for two vectors is
  ``_min_norm_element_from2``: 0.999 if v1.v2 >= v1.v1, 0.001 if v1.v2 >= v2.v2, else
  -(v1.v2 - v2.v2) / (v1.v1 + v2.v2 - 2 v1.v2) for the ``both`` gradient;
- the summed loss is backpropagated; per encoder parameter, ``new = 2 k0 g_both + 2 k1 g_m``,
  ``diff = ||summed grad|| / ||new||``, the gradient becomes ``diff * new * 1.5`` when diff > 1,
  else ``new * 1.5``; heads keep the summed gradient;
- SGD(momentum 0.9, weight decay 1e-4) steps (``main``).
"""
import argparse
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

from config import resolve_config
from engines.engines_logits_com import DiagnosticMeans, train_step
from engines.methods import method_from_config
from engines.metrics import HeadMetrics
from engines.trainer import make_context
from tests.tiny import tiny_late_fusion

CLASSES, FEATURES, BATCH, STEPS = 4, 8, 8, 6
MODALITIES = ("audio", "visual")
LR = 0.05  # the authors' recipe with a larger lr, so that a few steps move the parameters visibly


def batches(seed=3):
    generator = torch.Generator().manual_seed(seed)
    while True:
        inputs = {m: torch.randn(BATCH, 6, generator=generator) for m in MODALITIES}
        yield inputs, torch.randint(0, CLASSES, (BATCH,), generator=generator)


def config(**flags):
    values = dict(dataset="CREMAD", method="mmpareto", recipe="authors", lr=LR)
    values.update(flags)
    return resolve_config(argparse.Namespace(**{k: v for k, v in values.items() if v is not None}))


def model(seed=0):
    return tiny_late_fusion("concat", CLASSES, FEATURES, seed)


# -- the released step, re-stated ---------------------------------------------------------------------
def min_norm_element_from2(v1v1, v1v2, v2v2):
    if v1v2 >= v1v1:
        return 0.999
    if v1v2 >= v2v2:
        return 0.001
    return -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))


def released_steps(net, steps=STEPS, gamma=1.5, lr=LR):
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    encoder = {m: list(net.encoders[m].named_parameters()) for m in MODALITIES}
    conflicts = []
    for inputs, label in itertools.islice(batches(), steps):
        optimizer.zero_grad()
        logits = net(inputs)
        loss_mm = F.cross_entropy(logits["fusion"], label)
        loss_a = F.cross_entropy(logits["audio"], label)
        loss_v = F.cross_entropy(logits["visual"], label)
        grads = {m: {} for m in MODALITIES}
        for loss, loss_type in ((loss_mm, "both"), (loss_a, "audio"), (loss_v, "visual")):
            loss.backward(retain_graph=True)
            for m in MODALITIES:
                if loss_type in ("both", m):
                    grads[m][loss_type] = {name: p.grad.clone() for name, p in encoder[m]}
            optimizer.zero_grad()
        k = {}
        for m in MODALITIES:
            g_both = torch.cat([g.flatten() for g in grads[m]["both"].values()])
            g_m = torch.cat([g.flatten() for g in grads[m][m].values()])
            if F.cosine_similarity(g_both, g_m, dim=0) > 0:
                k[m] = (0.5, 0.5)
            else:
                c = min_norm_element_from2(float(g_both @ g_both), float(g_both @ g_m), float(g_m @ g_m))
                k[m] = (c, 1 - c)
            conflicts.append(k[m] != (0.5, 0.5))
        (loss_mm + loss_a + loss_v).backward()
        for m in MODALITIES:
            for name, p in encoder[m]:
                three_norm = torch.norm(p.grad.clone())
                new_grad = 2 * k[m][0] * grads[m]["both"][name] + 2 * k[m][1] * grads[m][m][name]
                diff = three_norm / torch.norm(new_grad)
                p.grad = diff * new_grad * gamma if diff > 1 else new_grad * gamma
        optimizer.step()
    return conflicts


def our_steps(net, cfg, steps=STEPS, data=None):
    method = method_from_config(cfg, net.heads, train_size=4 * cfg.batch_size)
    method.setup(net)
    ctx = make_context(cfg, net, method, torch.device("cpu"))
    ctx.progress = False
    conflicts = []
    for inputs, labels in itertools.islice(data or batches(), steps):
        diagnostics = DiagnosticMeans()
        train_step(net, method, (inputs, labels, 0), None, ctx, HeadMetrics(method.heads), diagnostics)
        conflict = diagnostics.means(method.heads)["conflict"]
        conflicts += [bool(conflict[m]) for m in MODALITIES]
    return method, ctx, conflicts


def test_recipe_is_the_released_one():
    cfg = config(lr=None)
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay) == ("sgd", 2e-3, 0.9, 1e-4)
    assert (cfg.lr_step, cfg.lr_gamma, cfg.loss_reduction, cfg.batch_size, cfg.epochs) == (30, 0.1, "mean", 64, 50)
    default = resolve_config(argparse.Namespace(dataset="CREMAD", method="mmpareto"))
    assert default.optimizer == "adam" and default.epochs == 10  # the dataset's recipe by default
    assert method_from_config(default, ("audio", "visual", "fusion"), 640).gamma == 1.5


def test_steps_equal_the_released_steps():
    released = model()
    expected_conflicts = released_steps(released)
    assert any(expected_conflicts) and not all(expected_conflicts)  # both rules were exercised
    ours = model()
    _, _, conflicts = our_steps(ours, config())
    assert conflicts == expected_conflicts
    for (name, a), b in zip(ours.named_parameters(), released.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("gamma", [0.5])
def test_gamma_reaches_the_step(gamma):
    released = model()
    released_steps(released, steps=2, gamma=gamma)
    ours = model()
    our_steps(ours, config(mmpareto_gamma=gamma), steps=2)
    for a, b in zip(ours.parameters(), released.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_under_adam_a_constant_gamma_cancels():
    """What the docstring says of the default (dataset) recipe: Adam divides gamma away (up to
    its epsilon, and without weight decay, which is not scaled by gamma); SGD does not."""
    def largest_difference(**flags):
        runs = []
        for gamma in (1.0, 4.0):
            net = model()
            our_steps(net, config(weight_decay=0.0, mmpareto_gamma=gamma, **flags), steps=3)
            runs.append(net)
        with torch.no_grad():
            return max(float((a - b).abs().max()) for a, b in zip(*(r.encoders.parameters() for r in runs)))

    adam = largest_difference(recipe="dataset", lr=1e-3)
    sgd = largest_difference(lr=1e-3)
    assert adam < 1e-4 < sgd
    assert adam < 0.02 * sgd


def test_method_has_no_state_to_checkpoint():
    """MMPareto decides from the current step only: a resumed run needs the model and the
    optimizer alone, and continues exactly."""
    cfg = config()
    whole = model()
    our_steps(whole, cfg, steps=4)

    data = batches()
    first = model()
    method, ctx, _ = our_steps(first, cfg, steps=2, data=data)
    assert not method.state_dict()
    saved = copy.deepcopy({"model": first.state_dict(), "optimizer": ctx.network_optimizer.state_dict()})
    resumed = model(seed=7)
    resumed.load_state_dict(saved["model"])
    method = method_from_config(cfg, resumed.heads, train_size=4 * cfg.batch_size)
    method.setup(resumed)
    ctx = make_context(cfg, resumed, method, torch.device("cpu"))
    ctx.network_optimizer.load_state_dict(saved["optimizer"])
    for inputs, labels in itertools.islice(data, 2):
        train_step(resumed, method, (inputs, labels, 0), None, ctx, HeadMetrics(method.heads), DiagnosticMeans())
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("g_mm, g_m", [([0.0, 0.0], [1.0, 2.0]), ([1.0, -2.0], [0.0, 0.0]), ([1.0, 0.0], [-1.0, 1.0]),
                                       ([3.0, 1.0], [-1.0, 0.5])])
def test_min_norm_weights_are_the_released_solvers(g_mm, g_m):
    """Ends included: a zero gradient gets 0.999/0.001, never exactly 1/0, as released."""
    from olmbalance.mmpareto import min_norm_weights

    g_mm, g_m = torch.tensor(g_mm), torch.tensor(g_m)
    c = min_norm_element_from2(float(g_mm @ g_mm), float(g_mm @ g_m), float(g_m @ g_m))
    assert min_norm_weights(g_mm, g_m) == pytest.approx((c, 1 - c))
