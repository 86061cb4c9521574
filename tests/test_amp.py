"""Speed switches that must not change what is learned: fp16 loss scaling with two optimizers,
--amp on a CPU, channels-last memory format, and every method's whole training step under
autocast (fp16 and bf16, run here with CPU autocast and a GradScaler)."""
from __future__ import annotations

import copy
import itertools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from config import Config
from engines.engines_logits_com import DiagnosticMeans, StepContext, cycle, train_step
from engines.methods import method_from_config
from olmbalance import METHODS, build_method, method_entry
from engines.metrics import HeadMetrics
from olmbalance.olm import LogitModulator
from engines.trainer import fp16_scaler, make_context, make_loaders
from tests.method_steps import RankData, fp16_backoffs, step_model, step_settings
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


def registered_methods() -> list[str]:
    method_entry("olm")  # imports every module that registers methods
    return sorted(METHODS)


def autocast_model(seed=0):
    """A late-fusion model with BatchNorm in its encoders, small enough for every method."""
    from models.late_fusion import LateFusionClassifier

    torch.manual_seed(seed)
    encoders = {m: nn.Sequential(nn.Linear(6, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 16))
                for m in ("audio", "visual")}
    return LateFusionClassifier(4, ("audio", "visual"), "concat", encoders=encoders, feature_dim=16)


def autocast_batch(seed):
    generator = torch.Generator().manual_seed(seed)
    inputs = {m: torch.randn(16, 6, generator=generator) * 3 for m in ("audio", "visual")}
    return inputs, torch.randint(0, 4, (16,), generator=generator), 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", registered_methods())
def test_every_method_trains_under_autocast_with_loss_scaling(name, dtype):
    model = step_model(name, autocast_model)
    cfg = Config(method=name, batch_size=16, lr=1e-2, coef_lr=1e-2, progress=False, device="cpu",
                 method_settings={f"{method_entry(name).prefix}_{k}": v for k, v in step_settings(name).items()})
    method = method_from_config(cfg, model.heads, train_size=64)
    method.setup(model)
    ctx = make_context(cfg, model, method, torch.device("cpu"))
    # What --amp gives on CUDA, on the CPU: autocast around the forwards, GradScaler's scaling.
    ctx.amp_dtype, ctx.scaler = dtype, fp16_scaler(cfg, "cpu")
    with torch.autocast("cpu", dtype=dtype):  # what start_epoch computes (prototypes, copies) too
        method.start_epoch(1, model, RankData(0, scale=3.0))
    model.train()
    scale = ctx.scaler.get_scale()
    before = copy.deepcopy(model.state_dict())
    w_before = [p.detach().clone() for p in method.coefficient_parameters()]
    heldout = itertools.repeat(autocast_batch(99))
    backoffs = fp16_backoffs(name) if dtype == torch.float16 else 0
    for step in range(3 + backoffs):  # a skipped step (scale halved) changes nothing: 3 taken
        metrics = HeadMetrics(method.heads)
        train_step(model, method, autocast_batch(step), heldout, ctx, metrics, DiagnosticMeans())
    # No step skipped for overflow, but for the back-offs the method's test module allows.
    assert scale / 2 ** backoffs <= ctx.scaler.get_scale() <= scale
    state = model.state_dict()
    assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], v) for k, v in state.items())
    for w, start in zip(method.coefficient_parameters(), w_before):
        assert bool(torch.isfinite(w).all()) and not torch.equal(w.detach(), start)
    assert all(m["loss"] == m["loss"] for m in metrics.compute().values())  # logged, not NaN


def test_modulated_logits_and_w_gradient_stay_float32_under_fp16():
    """fp16 logits of norm ~100, a summed CE and a loss scale of 4096: a w * z product in fp16
    would give w's scaled gradient (about 1e8) in fp16, i.e. inf; it must be finite and equal
    the float32 computation."""
    modulator = LogitModulator(("audio", "visual", "fusion"))
    generator = torch.Generator().manual_seed(0)
    z = {h: (torch.randn(64, 6, generator=generator) * 40).half() for h in modulator.heads}
    labels = torch.randint(0, 6, (64,), generator=generator)
    with torch.autocast("cpu", dtype=torch.float16):
        scaled = modulator.scale(z)
        assert all(v.dtype == torch.float32 for v in scaled.values())
        loss = sum(F.cross_entropy(v, labels, reduction="sum") for v in scaled.values())
    (loss * 4096.0).backward()
    assert bool(torch.isfinite(modulator.coefficients.grad).all())
    w = torch.ones(3, requires_grad=True)
    reference = sum(F.cross_entropy(w[k] * z[h].float(), labels, reduction="sum") for k, h in enumerate(modulator.heads))
    (reference * 4096.0).backward()
    assert torch.allclose(modulator.coefficients.grad, w.grad, rtol=1e-5)


def test_norm_loss_is_float32_under_bf16_autocast():
    modulator = LogitModulator(("audio", "fusion"), target="loss_ratio")
    z = {h: torch.randn(8, 3).bfloat16() * 30 for h in modulator.heads}
    losses = {h: torch.tensor(1.0) for h in modulator.heads}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = modulator.norm_loss(z, losses)
    assert loss.dtype == torch.float32
    loss.backward()
    w = torch.ones(2, requires_grad=True)
    norms = torch.stack([z[h].float().norm(dim=1) for h in modulator.heads], dim=1) * w
    (norms - norms.detach().mean(1, keepdim=True)).abs().sum(1).mean().backward()
    assert torch.allclose(modulator.coefficients.grad, w.grad, rtol=1e-6)
