"""OPM in our loop equals the authors' released step (GeWu-Lab/BML_TPAMI2024), re-stated below
in plain torch from ``code/main.py`` ``train`` (``--use_adam_drop``, ``--fusion_method concat``)
and ``code/models/Classifier.py`` (``Classifier.forward``, ``calcu_q``,
``Modality_drop.execute_drop``, ``custom_autograd``):

- ``out_1, out_2`` the encoders' features; with the concat head's weight W and bias b taken
  detached, ``t1 = out_1 W[:, :D]^T + b/2``, ``t2 = out_2 W[:, D:]^T + b/2``;
  ``performance_k = sum_i softmax(t_k)[i, label_i]``;
- after the warm-up (released: epochs 0..5; here ``WARMUP`` epochs): ``calcu_q``, then
  ``execute_drop``: with probability ``p_exe`` each sample's modality k is kept with
  probability ``1 - q_k`` (a [2, B, 1] mask), the stacked features are masked and divided by
  ``1 - theta`` (``theta = sum D q / sum D``), samples with no modality left are removed;
- ``loss = CE(fusion(out), label)`` (batch mean), backward, optimizer step.

Two substitutions, both the draws: ``np.random.rand(1)`` and ``Bernoulli(1 - q).sample`` are
replayed from a generator seeded like ours (the same uniform draw decides, a uniform below
``1 - q`` keeps); and ``custom_autograd.backward`` returns None for theta where the released
line returns theta (the defect the module docstring describes; the test below shows it moves
the encoders).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from olmbalance import build_method, method_entry
from olmbalance.errors import UserError
from olmbalance.opm import MASK_SEEDS, drop_probabilities
from tests.equivalence_fixtures import modulation_per_step
from tests.tiny import tiny_late_fusion

CLASSES, FEATURES, INPUTS, BATCH = 4, 8, 6, 12
STEPS, EPOCHS, WARMUP, SEED = 3, 3, 1, 5
LR, ALPHA, P_EXE, Q_BASE = 0.1, 0.5, 0.7, 0.5
# The cross-cutting step tests (tests/method_steps.py): every step of their short epochs drops.
STEP_SETTINGS = {"warmup_epochs": 0, "p_exe": 1.0}


def model(seed=0, fusion="concat"):
    return tiny_late_fusion(fusion, CLASSES, FEATURES, seed, inputs=INPUTS)


def batches(seed=3):
    generator = torch.Generator().manual_seed(seed)
    while True:
        inputs = {m: torch.randn(BATCH, INPUTS, generator=generator) for m in ("audio", "visual")}
        yield inputs, torch.randint(0, CLASSES, (BATCH,), generator=generator)


def released_parameters(net):
    return [*net.encoders.parameters(), *net.fusion.parameters()]


# -- the released step, re-stated ----------------------------------------------------------------
class Rescale(torch.autograd.Function):
    """``custom_autograd``: input / (1 - theta); ``theta_gradient`` returns theta as theta's
    gradient (the released line), else None."""

    @staticmethod
    def forward(ctx, input, theta, theta_gradient):
        ctx.save_for_backward(input, theta)
        ctx.theta_gradient = theta_gradient
        return input / (1 - theta.item())

    @staticmethod
    def backward(ctx, grad_output):
        _, theta = ctx.saved_tensors
        return 1 / (1 - theta.item()) * grad_output.clone(), theta if ctx.theta_gradient else None, None


def calcu_q(performance_1, performance_2, q_base, lam):
    q = torch.tensor([0.0, 0.0])
    relu = nn.ReLU(inplace=True)
    ratio_1 = torch.tanh(relu(performance_1 / performance_2 - 1))
    ratio_2 = torch.tanh(relu(performance_2 / performance_1 - 1))
    q[0] = q_base * (1 + lam * ratio_1) if ratio_1 > 0 else 0
    q[1] = q_base * (1 + lam * ratio_2) if ratio_2 > 0 else 0
    return torch.clip(q, 0.0, 1.0)


def released_steps(net, epochs=EPOCHS, warmup=WARMUP, p_exe=P_EXE, q_base=Q_BASE, lam=ALPHA, theta_gradient=False):
    """Returns per step: None (warm-up), False (no drop drawn) or the drop probabilities q."""
    optimizer = torch.optim.SGD(released_parameters(net), lr=LR, momentum=0.9, weight_decay=1e-4)
    draws, mask_draws = torch.Generator().manual_seed(SEED), torch.Generator()
    data, record = batches(), []
    encoder_1, encoder_2, fxy = net.encoders["audio"], net.encoders["visual"], net.fusion.classifier
    for epoch in range(epochs):
        for _ in range(STEPS):
            inputs, label = next(data)
            optimizer.zero_grad()
            out_1, out_2 = encoder_1(inputs["audio"]), encoder_2(inputs["visual"])
            B, D = out_1.shape
            w, b = fxy.weight.clone().detach(), fxy.bias.clone().detach()
            t1 = torch.mm(out_1, torch.transpose(w[:, :D], 0, 1)) + b / 2
            t2 = torch.mm(out_2, torch.transpose(w[:, D:], 0, 1)) + b / 2
            performance_1 = sum([torch.softmax(t1, dim=1)[i][int(label[i].item())] for i in range(B)])
            performance_2 = sum([torch.softmax(t2, dim=1)[i][int(label[i].item())] for i in range(B)])
            out = fxy(torch.cat([out_1, out_2], dim=1))
            record.append(None)
            if epoch >= warmup:  # warm_up == 0
                q = calcu_q(performance_1, performance_2, q_base, lam)
                record[-1] = False
                if float(torch.rand((), generator=draws)) >= 1 - p_exe:  # exe_drop
                    record[-1] = q.detach().clone()
                    dim_list = torch.tensor([D, D])
                    theta = sum(dim_list * q) / sum(dim_list)
                    seed = int(torch.randint(0, MASK_SEEDS, (), generator=draws))
                    mask_draws.manual_seed(seed)  # rank 0
                    keep = torch.rand((2, B), generator=mask_draws) < (1 - q.detach()).unsqueeze(1)
                    mask = keep.float().reshape(2, B, 1)
                    concat_list = torch.mul(torch.stack([out_1, out_2], dim=0), mask)
                    concat_list = Rescale.apply(concat_list, theta, theta_gradient)
                    update_flag = torch.transpose(mask, 0, 1).squeeze(-1).sum(dim=1) > 0
                    cleaned = torch.masked_select(concat_list, update_flag.unsqueeze(-1)).reshape(2, -1, D)
                    out = fxy(torch.cat([cleaned[0], cleaned[1]], dim=1))
                    label = label[update_flag]
            loss = F.cross_entropy(out, label)
            loss.backward()
            optimizer.step()
    return record


# -- ours -----------------------------------------------------------------------------------------
def our_steps(net, epochs=EPOCHS, method=None, data=None, first_epoch=1, optimizer=None, **settings):
    settings = {"warmup_epochs": WARMUP, **settings}
    method = method or build_method("opm", net.heads, settings, seed=SEED)
    method.setup(net)
    optimizer = optimizer or torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    return method, optimizer, modulation_per_step(net, method, optimizer, data or batches(), epochs, STEPS, first_epoch)


def assert_same_parameters(ours, released):
    for a, b in zip(released_parameters(ours), released_parameters(released)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_steps_equal_the_released_steps():
    released = model()
    expected = released_steps(released)
    ours = model()
    _, _, kept = our_steps(ours)
    # The run covers the warm-up, steps that draw no drop and steps that drop the dominant modality.
    assert all(q is None for q in expected[:STEPS]) and any(q is False for q in expected)
    dropped = [i for i, q in enumerate(expected) if torch.is_tensor(q)]
    assert len(dropped) >= 2
    for i, q in enumerate(expected):
        want = (1 - q).tolist() if torch.is_tensor(q) else [1.0, 1.0]
        assert [kept[i]["audio"], kept[i]["visual"]] == pytest.approx(want, abs=1e-5)
        if torch.is_tensor(q):
            assert sorted(q.tolist())[0] == 0.0 and max(q.tolist()) >= Q_BASE  # only the dominant one drops
    assert_same_parameters(ours, released)
    # The released theta "gradient" (theta returned as its own gradient) moves the encoders.
    with_defect = model()
    released_steps(with_defect, theta_gradient=True)
    assert not torch.allclose(with_defect.encoders["audio"][0].weight, ours.encoders["audio"][0].weight, atol=1e-6)


def test_settings_reach_the_step():
    released = model()
    expected = released_steps(released, epochs=2, warmup=0, p_exe=1.0, q_base=0.3, lam=1.0)
    ours = model()
    _, _, kept = our_steps(ours, epochs=2, warmup_epochs=0, p_exe=1.0, q_base=0.3, alpha=1.0)
    assert all(torch.is_tensor(q) for q in expected)
    assert [k[m] for k in kept for m in ("audio", "visual")] == pytest.approx(
        [v for q in expected for v in (1 - q).tolist()], abs=1e-5)
    assert_same_parameters(ours, released)


def test_drop_probabilities_by_hand():
    # rho 1.5: tanh(0.5) = 0.462117, q = 0.5 (1 + 0.5 * 0.462117) = 0.615529; rho <= 1: q = 0
    q = drop_probabilities(torch.tensor([1.5, 2 / 3, 1.0]), q_base=0.5, alpha=0.5)
    assert q.tolist() == pytest.approx([0.615529, 0.0, 0.0], abs=1e-6)
    assert float(drop_probabilities(torch.tensor([100.0]), q_base=0.9, alpha=1.0)) == 1.0  # clipped


def test_the_warmup_and_the_step_leave_the_model_forward_alone_and_drop_before_the_fusion_head():
    net = model()
    method = build_method("opm", net.heads, {"warmup_epochs": 1, "p_exe": 1.0, "q_base": 1.0}, seed=0)
    method.setup(net)
    inputs, labels = next(batches())
    method.start_epoch(1, net, None)
    with torch.no_grad():
        plain = net(inputs)
        warm = method.forward_train(net, inputs, labels)
        assert all(torch.equal(warm[h], plain[h]) for h in net.heads)
        method.start_epoch(2, net, None)  # q_base 1: the dominant modality is dropped from every sample
        dropped = method.forward_train(net, inputs, labels)
    keep = method.last["modulation"]
    dominant = "audio" if keep[0] == 0 else "visual"
    assert sorted(keep.tolist()) == [0.0, 1.0, 1.0]
    features = {m: net.encoders[m](inputs[m]) for m in net.modalities}
    # theta = D * 1 / (2 D) = 1/2: the weaker modality's features doubled, the dominant one's gone
    expected = net.fusion([torch.zeros_like(features[m]) if m == dominant else 2 * features[m] for m in net.modalities])
    torch.testing.assert_close(dropped["fusion"], expected)
    assert all(torch.equal(dropped[m], plain[m]) for m in net.modalities)  # read-outs see the intact features
    assert net.detach_unimodal_heads and net.last_features == {}


def test_the_draw_generator_is_saved_and_resumes_identically():
    whole = model()
    our_steps(whole, epochs=3)
    data, first = batches(), model()
    method, optimizer, _ = our_steps(first, epochs=2, data=data)
    state = method.state_dict()
    assert set(state) == {"_extra_state"} and "generator" in state["_extra_state"]
    saved = copy.deepcopy({"model": first.state_dict(), "method": state, "optimizer": optimizer.state_dict()})
    resumed = model(seed=7)
    resumed.load_state_dict(saved["model"])
    fresh = build_method("opm", resumed.heads, {"warmup_epochs": WARMUP}, seed=123)  # the seed comes from the state
    fresh.load_state_dict(saved["method"])
    optimizer = torch.optim.SGD(resumed.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    optimizer.load_state_dict(saved["optimizer"])
    our_steps(resumed, epochs=1, method=fresh, data=data, first_epoch=3, optimizer=optimizer)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_heads_without_shares_score_by_the_read_outs():
    net = model(fusion="bilinear")
    method = build_method("opm", net.heads, {"warmup_epochs": 0}, seed=0)
    method.setup(net)
    inputs, labels = next(batches())
    with torch.no_grad():
        logits = net(inputs)
        method.forward_train(net, inputs, labels)
    scores = torch.stack([torch.softmax(logits[m], 1).gather(1, labels.view(-1, 1)).sum() for m in ("audio", "visual")])
    assert method.last["discrepancy"][:2].tolist() == pytest.approx([float(scores[0] / scores[1]),
                                                                      float(scores[1] / scores[0])], rel=1e-5)


def test_refusals_and_recipe():
    heads = ("audio", "visual", "fusion")
    for bad in ({"p_exe": 1.5}, {"q_base": -0.1}, {"alpha": -1.0}, {"warmup_epochs": -1}):
        with pytest.raises(UserError):
            build_method("opm", heads, bad)
    with pytest.raises(UserError, match="--method opm needs at least two modality heads"):
        build_method("opm", ("audio", "fusion"))
    recipe = method_entry("opm").recipe("authors", "KineticSound")
    assert (recipe["optimizer"], recipe["lr"], recipe["lr_step"], recipe["batch_size"], recipe["epochs"]) == \
        ("adamw", 5e-5, 40, 32, 100)
    method = build_method("opm", heads)
    assert (method.alpha, method.p_exe, method.q_base, method.warmup_epochs) == (0.5, 0.7, 0.5, 6)
