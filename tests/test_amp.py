"""Speed switches that must not change what is learned: fp16 loss scaling with two optimizers,
--amp on a CPU, and channels-last memory format."""
from __future__ import annotations

import copy
import logging

import torch

from config import Config
from engines.engines_logits_com import DiagnosticMeans, StepContext, cycle, train_step
from engines.methods import build_method
from engines.metrics import HeadMetrics
from engines.trainer import make_context, make_loaders
from tests.scaling_fixtures import VectorModel, vector_data


def olm_steps(scaler, steps=4, model=None, method=None):
    """A few OLM steps on the toy model; returns (model, method, context)."""
    torch.manual_seed(0)
    model = model or VectorModel()
    method = method or build_method("olm", model.heads, reference_steps=2)
    cfg = Config(batch_size=16, lr=1e-2, coef_lr=5e-2, progress=False, device="cpu")
    ctx = make_context(cfg, model, method, torch.device("cpu"))
    ctx.scaler = scaler
    loaders = make_loaders(cfg, vector_data(), torch.device("cpu"), True)
    heldout, batches = cycle(loaders.heldout), iter(loaders.train)
    for _ in range(steps):
        train_step(model, method, next(batches), heldout, ctx, HeadMetrics(method.heads), DiagnosticMeans())
    return model, method, ctx


def test_fp16_loss_scaling_learns_what_float32_learns():
    plain_model, plain_method, _ = olm_steps(None)
    scaled_model, scaled_method, ctx = olm_steps(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    assert ctx.scaler.get_scale() == 2.0 ** 12  # no overflow, no skipped step
    # w's gradient mixes the scaled network loss and the unscaled norm loss: were the first not
    # unscaled, it would outweigh the second 4096 times and w would move elsewhere.
    assert torch.allclose(scaled_method.modulator.coefficients, plain_method.modulator.coefficients, atol=1e-5)
    assert not torch.allclose(plain_method.modulator.coefficients, torch.ones(3))
    for (name, a), b in zip(plain_model.state_dict().items(), scaled_model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name


def test_an_overflowing_step_is_skipped_by_both_optimizers():
    model, method, ctx = olm_steps(None, steps=1)
    before_model = copy.deepcopy(model.state_dict())
    before_w = method.modulator.coefficients.detach().clone()
    # What fp16 overflow looks like to the scaler: an infinite gradient somewhere.
    hook = model.fusion.weight.register_hook(lambda grad: grad * float("inf"))
    _, _, ctx = olm_steps(torch.amp.GradScaler("cpu", init_scale=2.0 ** 12), steps=1, model=model, method=method)
    hook.remove()
    assert ctx.scaler.get_scale() == 2.0 ** 11  # the scaler saw the overflow and backed off
    assert torch.equal(method.modulator.coefficients.detach(), before_w)
    for name, value in model.state_dict().items():
        if value.is_floating_point() and "running" not in name:  # BatchNorm stats move in forward
            assert torch.equal(value, before_model[name]), name


def test_amp_on_cpu_trains_in_float32_with_a_note(caplog):
    model = VectorModel()
    method = build_method("olm", model.heads)
    with caplog.at_level(logging.WARNING):
        ctx = make_context(Config(amp="bf16"), model, method, torch.device("cpu"))
    assert ctx.amp_dtype is None and ctx.scaler is None
    assert any("--amp bf16 applies to CUDA devices only" in r.getMessage() for r in caplog.records)


def test_channels_last_changes_layout_not_results():
    from models.late_fusion import LateFusionClassifier

    torch.manual_seed(0)
    inputs = {"audio": torch.randn(4, 1, 32, 16), "visual": torch.randn(4, 1, 3, 16, 16)}
    labels = torch.tensor([0, 1, 2, 1])
    results = []
    for channels_last in (False, True):
        torch.manual_seed(1)
        model = LateFusionClassifier(3, fusion="concat")
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        method = build_method("joint", model.heads)
        ctx = StepContext(device=torch.device("cpu"), channels_last=channels_last, progress=False,
                          network_optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        metrics = HeadMetrics(model.heads)
        train_step(model, method, (inputs, labels, 0), None, ctx, metrics, DiagnosticMeans())
        results.append((metrics.loss_sums["fusion"], model.fusion.state_dict()))
    assert abs(results[0][0] - results[1][0]) < 1e-4
    for key, value in results[0][1].items():
        assert torch.allclose(value, results[1][1][key], atol=1e-4), key
