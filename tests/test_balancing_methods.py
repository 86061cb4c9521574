"""The balancing methods (G-Blending, PMR, AGM, MMPareto, MLA): each one's defining computation
against values worked out by hand, their refusals, and one epoch of each through main.py."""
import math

import pytest
import torch
from torch import nn

from engines.agm import ScaleGradient, agm_coefficients, shapley_responses
from engines.engines_logits_com import DiagnosticMeans, StepContext, train_step
from engines.g_blending import blending_weights
from engines.methods import build_method
from engines.metrics import HeadMetrics
from engines.mla import entropy_weights, uncertainty_fusion, update_projector
from engines.mmpareto import combine, min_norm_weights, pareto_weights
from engines.pmr import prototype_distances, rebalance_weights
from tests.test_distributed import assert_identical
from tests.tiny import TinyModel, tiny_late_fusion
from utils.errors import UserError

CLASSES, FEATURES, BATCH = 4, 16, 32
NEW_METHODS = ("g_blending", "pmr", "agm", "mmpareto", "mla")


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


# -- G-Blending ---------------------------------------------------------------------------------
def test_g_blending_weights_follow_generalization_over_overfitting_squared():
    # heads audio, visual, fusion. dG = val_ref - val_now = 0.2, 0.1, 0.2;
    # O = val - train: ref 0.1, 0.1, 0.1, now 0.3, 0.2, 0.3, so dO = 0.2, 0.1, 0.2;
    # dG / dO^2 = 5, 10, 5 -> normalized to sum 3: 0.75, 1.5, 0.75.
    weights = blending_weights(torch.tensor([1.0, 1.2, 0.9]), torch.tensor([1.1, 1.3, 1.0]),
                               torch.tensor([0.6, 1.0, 0.5]), torch.tensor([0.9, 1.2, 0.8]), torch.ones(3))
    assert weights.tolist() == pytest.approx([0.75, 1.5, 0.75], rel=1e-4)
    # A head whose held-out loss rose gets no weight; if none improved the old weights stay.
    worse = blending_weights(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.5]),
                             torch.tensor([1.2, 0.9]), torch.ones(2))
    assert worse.tolist() == pytest.approx([0.0, 2.0])
    kept = torch.tensor([0.5, 1.5])
    assert blending_weights(torch.ones(2), torch.ones(2), torch.ones(2), torch.full((2,), 1.1), kept).tolist() == [0.5, 1.5]


def test_g_blending_refreshes_every_window_and_weights_the_loss():
    method = build_method("g_blending", ("audio", "visual", "fusion"), window=2)
    epoch = lambda train, val: ({h: {"loss": t} for h, t in zip(method.heads, train)},
                                {h: {"loss": v} for h, v in zip(method.heads, val)})
    method.end_epoch(1, *epoch([1.0, 1.2, 0.9], [1.1, 1.3, 1.0]))  # reference
    method.end_epoch(2, *epoch([0.8, 1.1, 0.7], [1.0, 1.25, 0.9]))  # inside the window: unchanged
    assert method.coefficients() == {"audio": 1.0, "visual": 1.0, "fusion": 1.0}
    method.end_epoch(3, *epoch([0.6, 1.0, 0.5], [0.9, 1.2, 0.8]))
    assert list(method.coefficients().values()) == pytest.approx([0.75, 1.5, 0.75], rel=1e-4)
    losses = {"audio": torch.tensor(1.0), "visual": torch.tensor(2.0), "fusion": torch.tensor(4.0)}
    assert float(method.network_loss(losses)) == pytest.approx(0.75 + 3.0 + 3.0, rel=1e-4)
    restored = build_method("g_blending", method.heads, window=2)
    restored.load_state_dict(method.state_dict())
    assert restored.coefficients() == method.coefficients() and int(restored.reference_epoch) == 3


# -- PMR ----------------------------------------------------------------------------------------
def test_pmr_distances_and_imbalance_weights():
    distances = prototype_distances(torch.tensor([[0.0, 0.0], [3.0, 4.0]]), torch.tensor([[0.0, 0.0], [0.0, 4.0]]))
    assert torch.allclose(distances, torch.tensor([[0.0, 4.0], [5.0, 3.0]]), atol=1e-5)
    # rho 2 (dominant) and 0.5 (slow): beta = alpha * max(1/rho - 1, 0), mu = mu0 * max(rho - 1, 0)
    beta, mu = rebalance_weights(torch.tensor([2.0, 0.5]), alpha=1.0, mu=0.01)
    assert beta.tolist() == pytest.approx([0.0, 1.0]) and mu.tolist() == pytest.approx([0.01, 0.0])


def test_pmr_rebalance_loss_by_hand():
    method = build_method("pmr", ("audio", "visual", "fusion"))
    method.prototypes = {"audio": torch.tensor([[0.0], [2.0]]), "visual": torch.tensor([[0.0], [2.0]])}
    labels = torch.tensor([0, 1])
    # audio sits on its prototypes: p(true) = 1/(1+e^-2) = 0.880797 per sample, s_a = 1.761594;
    # visual sits halfway: p = 0.5, s_v = 1. rho_a = 1.761594, rho_v = 0.567668.
    # visual's PCE = ln 2 with beta_v = 1/rho_v - 1 = 0.761594;
    # audio's entropy H = -(0.880797 ln 0.880797 + 0.119203 ln 0.119203) = 0.365334,
    # with mu_a = 0.01 * 0.761594. Loss = 0.761594 * 0.693147 - 0.00761594 * 0.365334.
    loss = method.rebalance_loss({"audio": torch.tensor([[0.0], [2.0]]), "visual": torch.tensor([[1.0], [1.0]])}, labels)
    assert float(loss) == pytest.approx(0.761594 * 0.693147 - 0.00761594 * 0.365334, rel=1e-4)
    assert method.last["pmr_ratio"].tolist()[:2] == pytest.approx([1.761594, 0.567668], rel=1e-5)


def test_pmr_builds_prototypes_from_training_features_then_rebalances():
    model, method = tiny_model(), build_method("pmr", ("audio", "visual", "fusion"))
    method.setup(model)
    assert step(model, method) == {}  # epoch 1: no prototypes yet, plain fusion_only
    method.end_epoch(1, {}, {})
    inputs, labels = tiny_batch()
    with torch.no_grad():
        model(inputs)
        expected = model.last_features["audio"][labels == labels[0]].mean(dim=0)
    assert torch.allclose(method.prototypes["audio"][labels[0]], expected, atol=1e-5)
    assert set(step(model, method)) == {"pmr_ratio", "pmr_beta"}
    restored = build_method("pmr", method.heads)
    restored.load_state_dict(method.state_dict())
    assert torch.equal(restored.prototypes["visual"], method.prototypes["visual"].cpu())


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
    assert int(method.steps_seen) == 1 and set(step(model, method)) == {"discrepancy", "modulation"}


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


def test_mla_alternates_modalities_through_one_shared_head():
    model, method = tiny_model(), build_method("mla", ("audio", "visual", "fusion"), steps_per_epoch=4)
    method.setup(model)
    assert model.unimodal_heads["audio"] is model.unimodal_heads["visual"]
    for trained, idle in (("audio", "visual"), ("visual", "audio")):
        model.zero_grad(set_to_none=True)
        step(model, method)
        assert all(p.grad is not None for p in model.encoders[trained].parameters())
        assert all(p.grad is None for p in model.encoders[idle].parameters())
        assert all(p.grad is None for p in model.fusion.parameters())
    assert not torch.equal(method.projector, torch.eye(FEATURES))  # updated at the second step


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
def ddp_part(rank: int, world: int, out_dir) -> None:
    """This file's share of the two-rank session (tests/ddp_session.py)."""
    from utils.distributed_setup import wrap_model

    for name in NEW_METHODS:
        model = tiny_model()
        method = build_method(name, model.heads, steps_per_epoch=2, window=1)
        method.setup(model)
        ctx = StepContext(device=torch.device("cpu"), network_optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                          progress=False)
        wrapped = wrap_model(model, torch.device("cpu"), method)
        for i in range(4):  # each rank its own batches: decisions must come from reduced values
            train_step(wrapped, method, (*tiny_batch(seed=10 * i + rank), 0), None, ctx,
                       HeadMetrics(method.heads), DiagnosticMeans())
            if i % 2 == 1:  # an "epoch" end, with metrics as the trainer hands them (reduced)
                metrics = {h: {"loss": 1.0 / (i + j + 1)} for j, h in enumerate(method.heads)}
                method.end_epoch(i // 2 + 1, metrics, {h: {"loss": 1.5 * v["loss"]} for h, v in metrics.items()})
        torch.save({"model": model.state_dict(), "method": method.state_dict()}, f"{out_dir}/{name}-{rank}.pt")


def test_two_ddp_ranks_stay_identical(ddp_session):
    tmp_path = ddp_session / "balancing"
    for name in NEW_METHODS:
        ranks = [torch.load(tmp_path / f"{name}-{r}.pt", weights_only=False) for r in range(2)]
        assert_identical(ranks[0], ranks[1], (name,))
    pmr_state = torch.load(tmp_path / "pmr-0.pt", weights_only=False)["method"]
    assert set(pmr_state["_extra_state"]["prototypes"]) == {"audio", "visual"}
