"""The balancing methods (G-Blending, PMR, AGM, MMPareto, MLA): each one's defining computation
against values worked out by hand, their refusals, and one epoch of each through main.py."""
import itertools
import math

import pytest
import torch
from torch import nn

from olmbalance.agm import ScaleGradient, agm_coefficients, shapley_responses
from engines.engines_logits_com import DiagnosticMeans, StepContext, train_step
from olmbalance import METHODS, build_method, method_entry
from engines.metrics import HeadMetrics
from olmbalance.mla import entropy_weights, uncertainty_fusion, update_projector
from olmbalance.mmpareto import combine, min_norm_weights, pareto_weights
from tests.test_distributed import assert_identical
from tests.method_steps import RankData, step_model, step_settings
from tests.tiny import TinyModel, tiny_late_fusion
from utils.errors import UserError

CLASSES, FEATURES, BATCH = 4, 16, 32
NEW_METHODS = ("g_blending", "pmr", "agm", "mmpareto", "mla")
method_entry("olm")  # the registry filled


def tiny_model(seed=0):
    return tiny_late_fusion("concat", CLASSES, FEATURES, seed)


def tiny_batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    inputs = {m: torch.randn(BATCH, 6, generator=generator) for m in ("audio", "visual")}
    return inputs, torch.randint(0, CLASSES, (BATCH,), generator=generator)


def step(model, method, seed=1):
    context = StepContext(device=torch.device("cpu"), network_optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                          progress=False)
    diagnostics = DiagnosticMeans()
    train_step(model, method, (*tiny_batch(seed), 0), None, context, HeadMetrics(method.heads), diagnostics)
    return diagnostics.means(method.heads)


# G-Blending: tests/test_equivalence_g_blending.py (its super-epoch estimate against BalanceBenchmark's).


# PMR: tests/test_equivalence_pmr.py (three epochs of fit against the released training).


# -- AGM ----------------------------------------------------------------------------------------
def test_agm_shapley_responses_by_hand():
    a, v = torch.tensor([[1.0]]), torch.tensor([[2.0]])
    linear = lambda f: 2 * f[0] + 3 * f[1] + 1  # f(a,v)=9, f(a,0)=3, f(0,v)=7, f(0,0)=1
    response_a, response_v = shapley_responses(linear, [a, v])
    # phi_a = ((9-7) + (3-1))/2 = 2, plus f(0,0)/2 -> 2.5; phi_v = ((9-3) + (7-1))/2 = 6 -> 6.5
    assert float(response_a) == pytest.approx(2.5) and float(response_v) == pytest.approx(6.5)
    product = lambda f: f[0] * f[1] + 1  # f(a,v)=3, every masked one 1
    assert [float(r) for r in shapley_responses(product, [a, v])] == pytest.approx([1.5, 1.5])


def test_agm_coefficients_by_hand_and_gradient_scaling():
    # scores (response CEs) 0.5 and 1.5: r = exp(2 * (1.0 - s)) = e, 1/e; running scores equal: rbar = 1;
    # k = exp(1 - e) = 0.179374 for the fitting-better audio, exp(1 - 1/e) = 1.881591 for visual.
    k = agm_coefficients(torch.tensor([0.5, 1.5]), torch.tensor([1.0, 1.0]), alpha=1.0)
    assert k.tolist() == pytest.approx([0.179374, 1.881591], rel=1e-5)
    capped = agm_coefficients(torch.tensor([1.0, 1.0]), torch.tensor([-10.0, 10.0]), alpha=0.5)
    assert float(capped[0]) == pytest.approx(math.exp(0.5 * 10.0))
    x = torch.ones(3, requires_grad=True)
    (ScaleGradient.apply(x, 0.25) * 2).sum().backward()
    assert x.grad.tolist() == [0.5, 0.5, 0.5]


def test_agm_step_keeps_fusion_value_and_modulates():
    model, method = tiny_model(), build_method("agm", ("audio", "visual", "fusion"))
    method.setup(model)
    inputs, labels = tiny_batch()
    logits = method.forward_train(model, inputs, labels)
    with torch.no_grad():
        plain = model(inputs)["fusion"]
    assert torch.allclose(logits["fusion"], plain, atol=1e-5)
    assert int(method.steps_seen) == 1 and set(step(model, method)) == {"discrepancy", "modulation", "clipped"}


# -- MMPareto -----------------------------------------------------------------------------------
def test_mmpareto_pareto_combination_by_hand():
    g_mm, g_m = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # conflicting: cos = -0.7071
    # min-norm: w_mm = ((g_m - g_mm) . g_m) / ||g_mm - g_m||^2 = 3 / 5
    assert min_norm_weights(g_mm, g_m) == pytest.approx((0.6, 0.4))
    w_mm, w_m, cosine = pareto_weights(g_mm, g_m)
    assert cosine == pytest.approx(-0.707107, rel=1e-5)
    # 2 (0.6 g_mm + 0.4 g_m) = (0.4, 0.8), norm 0.894427 < ||g_mm + g_m|| = 1: rescaled to
    # norm 1 = (0.447214, 0.894427), then times gamma 1.5.
    assert combine(g_mm, g_m, w_mm, w_m).tolist() == pytest.approx([0.670820, 1.341641], rel=1e-5)
    agreeing = torch.tensor([1.0, 1.0])
    assert pareto_weights(g_mm, agreeing)[:2] == (0.5, 0.5)
    assert combine(g_mm, agreeing, 0.5, 0.5).tolist() == pytest.approx([3.0, 1.5])


def test_mmpareto_replaces_encoder_gradients_with_the_combination():
    model, method = tiny_model(), build_method("mmpareto", ("audio", "visual", "fusion"))
    method.setup(model)
    inputs, labels = tiny_batch()
    logits = model(inputs)
    ce = nn.functional.cross_entropy
    params = list(model.encoders["audio"].parameters())
    g_mm = torch.autograd.grad(ce(logits["fusion"], labels), params, retain_graph=True)
    g_m = torch.autograd.grad(ce(logits["audio"], labels), params, retain_graph=True)
    losses = {h: ce(logits[h], labels) for h in method.heads}
    method.backward(model, sum(losses.values()), losses, lambda t: t)
    flat_mm, flat_m = torch.cat([g.flatten() for g in g_mm]), torch.cat([g.flatten() for g in g_m])
    w_mm, w_m, _ = pareto_weights(flat_mm, flat_m)
    for p, a, b in zip(params, g_mm, g_m):
        assert torch.allclose(p.grad, combine(a, b, w_mm, w_m), atol=1e-6)
    # heads keep their ordinary gradients
    expected = torch.autograd.grad(losses["fusion"], model.fusion.classifier.weight, retain_graph=True)[0]
    assert torch.allclose(model.fusion.classifier.weight.grad, expected, atol=1e-6)


# -- MLA ----------------------------------------------------------------------------------------
def test_mla_uncertainty_fusion_by_hand():
    logits = {"audio": torch.tensor([[0.0, 0.0]]), "visual": torch.tensor([[math.log(3.0), 0.0]])}
    # H_audio = ln 2 = 0.693147; visual p = (0.75, 0.25), H = 0.562335; exp(0.130812) = 1.139747
    weights = entropy_weights(logits)
    assert float(weights["audio"]) == pytest.approx(1 / 2.139747, rel=1e-5)
    assert float(weights["visual"]) == pytest.approx(1.139747 / 2.139747, rel=1e-5)
    assert torch.allclose(uncertainty_fusion(logits), torch.tensor([[1.139747 / 2.139747 * math.log(3.0), 0.0]]), atol=1e-5)


def test_mla_projector_update_by_hand():
    # P = I, r = (1, 0), a = 0.1: P - k k^T / (a + r k) = diag(1 - 1/1.1, 1) = diag(0.090909, 1),
    # Frobenius norm 1.004124 -> diag(0.090536, 0.995893)
    projector = update_projector(torch.eye(2), torch.tensor([[1.0, 0.0]]), 0.1)
    assert torch.allclose(projector, torch.tensor([[0.090536, 0.0], [0.0, 0.995893]]), atol=1e-5)


# MLA's steps (one optimizer step per modality on every batch), its shared head, projector and
# evaluation fusion against its authors' code: tests/test_equivalence_mla.py.


# -- refusals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pmr", "agm", "mla"])
def test_methods_needing_features_refuse_other_models(name):
    method = build_method(name, ("audio", "visual", "fusion"))
    with pytest.raises(UserError, match=f"--method {name}"):
        method.setup(TinyModel())


@pytest.mark.parametrize("name", ["agm", "mmpareto", "mla"])
def test_methods_refuse_models_without_the_heads_they_need(name):
    with pytest.raises(UserError, match=name):
        build_method(name, ("audio", "fusion"))


# End to end: tests/test_main.py runs every registered method, these five included, through
# main.py and checks its results against the metrics rows.


# -- two DDP ranks take identical decisions -----------------------------------------------------------
def ddp_methods() -> list[str]:
    """Every registered method but those test_distributed trains through ``fit`` on two ranks."""
    from tests.test_distributed import METHODS as FIT_METHODS

    return sorted(set(METHODS) - set(FIT_METHODS))


def ddp_part(rank: int, world: int, out_dir) -> None:
    """This file's share of the two-rank session (tests/ddp_session.py)."""
    from utils.distributed_setup import wrap_model

    for name in ddp_methods():
        model = step_model(name, tiny_model)
        method = build_method(name, model.heads, steps_per_epoch=2, **step_settings(name))
        method.setup(model)
        ctx = StepContext(device=torch.device("cpu"), network_optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                          progress=False)
        wrapped = wrap_model(model, torch.device("cpu"), method)
        heldout = itertools.repeat((*tiny_batch(seed=300 + rank), 0))  # OLM's held-out losses
        for i in range(4):  # each rank its own batches: decisions must come from reduced values
            if i % 2 == 0:  # each rank its own data too (PMR's prototypes, G-Blending's copies)
                method.start_epoch(i // 2 + 1, model, RankData(rank))
                model.train()
            train_step(wrapped, method, (*tiny_batch(seed=10 * i + rank), 0), heldout, ctx,
                       HeadMetrics(method.heads), DiagnosticMeans())
            if i % 2 == 1:  # an "epoch" end, with metrics as the trainer hands them (reduced)
                metrics = {h: {"loss": 1.0 / (i + j + 1)} for j, h in enumerate(method.heads)}
                method.end_epoch(i // 2 + 1, metrics, {h: {"loss": 1.5 * v["loss"]} for h, v in metrics.items()})
        torch.save({"model": model.state_dict(), "method": method.state_dict()}, f"{out_dir}/{name}-{rank}.pt")


def test_two_ddp_ranks_stay_identical(ddp_session):
    tmp_path = ddp_session / "balancing"
    assert set(NEW_METHODS) <= set(ddp_methods())
    for name in ddp_methods():
        ranks = [torch.load(tmp_path / f"{name}-{r}.pt", weights_only=False) for r in range(2)]
        assert_identical(ranks[0], ranks[1], (name,))
    pmr_state = torch.load(tmp_path / "pmr-0.pt", weights_only=False)["method"]
    assert set(pmr_state["_extra_state"]["prototypes"]) == {"audio", "visual"}
