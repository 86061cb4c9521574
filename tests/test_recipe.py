"""The default recipe is the released one: steps of our loop under a dataset's defaults equal
steps of the released formulation, written here from its facts (not from its code):

- every head's CE on w_k * z_k, summed over the batch, summed over the heads;
- network Adam(lr 1e-4, weight_decay 2e-4) on that sum; coefficients Adam([w]) with
  lr 1e-3 and no weight decay (late fusion) or lr 1e-4 and weight decay 2e-4 (transformers);
- coefficient loss: the sum over batch and heads of |w_k ||z_bk|| - mean_j(w_j ||z_bj||) r_k|,
  with r uniform during the first epoch (its reference losses are the current ones: G = C = 0).

OGM-GE's rows bring the authors' recipe (SGD, momentum, weight decay, StepLR) unless flags say
otherwise.
"""
import argparse
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from config import Config, resolve_config
from engines.engines_logits_com import DiagnosticMeans, train_step
from engines.methods import method_from_config
from engines.metrics import HeadMetrics
from engines.trainer import make_context
from tests.tiny import tiny_late_fusion

CLASSES, FEATURES, BATCH, STEPS = 5, 16, 24, 3
# (dataset whose defaults we use, released coefficient optimizer: lr, weight decay)
RECIPES = [("CREMAD", 1e-3, 0.0), ("VGGSound", 1e-3, 0.0), ("MERMULTI", 1e-4, 2e-4)]


def tiny_model(seed=0):
    return tiny_late_fusion("bilinear", CLASSES, FEATURES, seed)


def batches(seed=1):
    generator = torch.Generator().manual_seed(seed)
    while True:
        inputs = {m: torch.randn(BATCH, 6, generator=generator) for m in ("audio", "visual")}
        yield inputs, torch.randint(0, CLASSES, (BATCH,), generator=generator), 0


def config(dataset, method="olm", **flags):
    return resolve_config(argparse.Namespace(dataset=dataset, method=method, **flags))


def our_steps(cfg):
    """STEPS steps of our loop under ``cfg``; returns the model and the coefficients."""
    model = tiny_model()
    # A long first epoch: every step below is inside OLM's reference window (uniform ratios).
    method = method_from_config(cfg, model.heads, train_size=100 * cfg.batch_size)
    method.setup(model)
    ctx = make_context(cfg, model, method, torch.device("cpu"))
    heldout = batches(seed=2)
    for batch in itertools.islice(batches(), STEPS):
        train_step(model, method, batch, heldout, ctx, HeadMetrics(method.heads), DiagnosticMeans())
    return model, method.modulator.coefficients.detach()


def released_steps(coef_lr, coef_weight_decay):
    """The released formulation, from the facts above."""
    model = tiny_model()
    heads = ("visual", "audio", "fusion")  # the released coefficient order
    w = nn.Parameter(torch.ones(3))
    network = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=2e-4)
    coefficients = torch.optim.Adam([w], lr=coef_lr, weight_decay=coef_weight_decay)
    for inputs, labels, _ in itertools.islice(batches(), STEPS):
        logits = model(inputs)
        loss = sum(F.cross_entropy(w[k] * logits[h], labels, reduction="sum") for k, h in enumerate(heads))
        network.zero_grad()
        coefficients.zero_grad()
        loss.backward()
        norms = torch.stack([w[k] * logits[h].detach().norm(dim=-1) for k, h in enumerate(heads)], dim=-1)
        ratios = torch.softmax(torch.full((3,), 1e-6) / 1e-6, dim=0)  # G = C = 0, clamped: uniform
        targets = (norms.mean(-1, keepdim=True) * ratios).detach()
        (norms - targets).abs().sum().backward()
        network.step()
        coefficients.step()
    return model, w.detach()[[1, 0, 2]]  # back to our order: audio, visual, fusion


def relative_update_error(ours, released, start):
    """Largest |our update - released update| / |released update| over the parameters that moved."""
    worst = 0.0
    for a, b, s in zip(ours.parameters(), released.parameters(), start.parameters()):
        step_ours, step_released = (a - s).detach(), (b - s).detach()
        moved = step_released.abs() > 1e-9
        worst = max(worst, float(((step_ours - step_released).abs()[moved] / step_released.abs()[moved]).max()))
    return worst


@pytest.mark.parametrize("dataset, coef_lr, coef_weight_decay", RECIPES)
def test_default_recipe_steps_like_the_released_formulation(dataset, coef_lr, coef_weight_decay):
    cfg = config(dataset)
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.loss_reduction) == ("adam", 1e-4, 2e-4, "sum")
    assert (cfg.coef_lr, cfg.coef_weight_decay) == (coef_lr, coef_weight_decay)
    start = tiny_model()
    released, released_w = released_steps(coef_lr, coef_weight_decay)
    ours, ours_w = our_steps(cfg)
    assert relative_update_error(ours, released, start) < 1e-3
    assert torch.allclose(ours_w, released_w, rtol=0, atol=1e-6)
    assert not torch.allclose(ours_w, torch.ones(3))

    # The check can fail: batch means with the same weight decay (the old default) make the
    # decay 24 times stronger here, and the updates move away from the released ones.
    mean_model, _ = our_steps(config(dataset, loss_reduction="mean"))
    assert relative_update_error(mean_model, released, start) > 1e-2


def test_ogm_ge_brings_the_authors_recipe_and_flags_beat_it():
    for dataset, alpha in (("CREMAD", 0.8), ("VGGSound", 0.1), ("AVE", 0.1), ("KineticSound", 0.1)):
        cfg = config(dataset, "ogm_ge")
        assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay) == ("sgd", 1e-3, 0.9, 1e-4)
        assert (cfg.lr_step, cfg.lr_gamma, cfg.loss_reduction) == (70, 0.1, "mean")
        assert cfg.method_settings.get("ogm_alpha", 0.1) == alpha and (cfg.epochs, cfg.batch_size) == (10, 64)
    model = tiny_model()
    cfg = config("CREMAD", "ogm_ge")
    method = method_from_config(cfg, model.heads, train_size=640)
    optimizer = make_context(cfg, model, method, torch.device("cpu")).network_optimizer
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (1e-3, 0.9, 1e-4)
    assert method.alpha == 0.8 and method.modulation_epochs == (0, 50) and method.steps_per_epoch == 10

    # The embedded set's deliberate difference: a larger lr, the rest of the recipe kept.
    demo = config("AVDigits", "ogm_ge")
    assert (demo.optimizer, demo.lr, demo.momentum, demo.loss_reduction) == ("sgd", 1e-2, 0.9, "mean")
    flagged = config("CREMAD", "ogm_ge", optimizer="adam", lr=3e-4, ogm_alpha=0.5)
    assert (flagged.optimizer, flagged.lr, flagged.method_settings["ogm_alpha"], flagged.momentum) == ("adam", 3e-4, 0.5, 0.9)
    # Other methods keep the dataset's recipe.
    assert config("CREMAD", "joint").optimizer == "adam"



def test_training_loss_is_logged_raw_with_the_modulated_one_beside_it():
    """train.<head>.loss is the CE of the raw logits, as for val/test; loss_modulated is the CE
    of w_k z_k the method trained on."""
    cfg = config("CREMAD")
    model = tiny_model()
    method = method_from_config(cfg, model.heads, train_size=100 * cfg.batch_size)
    method.modulator.coefficients.data = torch.tensor([2.0, 0.5, 1.5])
    ctx = make_context(cfg, model, method, torch.device("cpu"))
    batch = next(batches())
    inputs, labels, _ = batch
    with torch.no_grad():
        logits = model(inputs)  # no dropout or BatchNorm: the step's forward gives the same
    metrics = HeadMetrics(method.heads)
    train_step(model, method, batch, batches(seed=2), ctx, metrics, DiagnosticMeans())
    logged = metrics.compute()
    for k, head in enumerate(method.heads):
        w = (2.0, 0.5, 1.5)[k]
        assert logged[head]["loss"] == pytest.approx(F.cross_entropy(logits[head], labels).item(), rel=1e-5)
        assert logged[head]["loss_modulated"] == pytest.approx(
            F.cross_entropy(w * logits[head], labels).item(), rel=1e-5)


def test_adamw_is_balancebenchmarks_optimizer_with_decoupled_decay():
    from engines.trainer import network_optimizer
    from olmbalance import method_entry
    from olmbalance.recipes import BALANCEBENCHMARK_RUN

    model = torch.nn.Linear(3, 2)
    optimizer = network_optimizer(Config(optimizer="adamw", lr=1e-3, weight_decay=0.01), model)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["weight_decay"] == 0.01
    # Decoupled: with a zero gradient AdamW still shrinks the weights by lr * wd; Adam's coupled
    # decay goes through the normalized update instead (a step of lr, not lr * wd).
    before = model.weight.detach().clone()
    model.weight.grad, model.bias.grad = torch.zeros_like(model.weight), torch.zeros_like(model.bias)
    optimizer.step()
    assert torch.allclose(model.weight, before * (1 - 1e-3 * 0.01))
    for name in ("g_blending", "amco", "cml", "mbsd", "unimodal_teacher"):  # BalanceBenchmark's run
        assert method_entry(name).recipe("authors", "CREMAD") == BALANCEBENCHMARK_RUN, name
    assert BALANCEBENCHMARK_RUN["optimizer"] == "adamw" and BALANCEBENCHMARK_RUN["weight_decay"] == 0.01
