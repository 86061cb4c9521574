"""AMCo in our loop equals BalanceBenchmark's training (the authors released no code), re-stated
below in plain torch from ``balancemm/trainer/AMCo_trainer.py`` (``train_loop``: per epoch the
flags cleared and ``l_t = 0``; per batch ``pt = sin(pi/2 min(eps, l_t)/eps)``, a mask of
``int(pt * size)`` zeros shuffled, ``l_t += current_epoch / 10``; ``training_step``: the fusion
CE backward, then each unimodal CE backward, then the dependence monitor) and
``balancemm/models/avclassify_model.py`` (``BaseClassifierAMCoModel``: concat shares
``a W[:, :D]^T + b/2``, the dependent share masked, ``linear_star`` of their sum).

- ``mask="logits"``: BalanceBenchmark now, with its one defect fixed: the class mask
  multiplies every sample's share (BalanceBenchmark ``expand(2, -1)``s it, which fails for a
  batch of 12);
- ``mask="features"`` (default): BalanceBenchmark's first implementation (``AVClassifierModel.
  forward`` before commit 2f2b8b5): the dependent modality's features times the unit mask, then
  times ``1 / (1 - pt)`` (10 once ``|pt - 1| <= 0.1``), the concat head and its shares on them;
  that implementation had no ``linear_star`` (``output_layer=false`` here).

The one substitution is the draw: ``np.random.shuffle`` of the padded mask is replayed as a
``torch.randperm`` from a generator seeded like ours (the same positions zeroed).
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from olmbalance import build_method, method_entry
from olmbalance.amco import mask_ratio
from olmbalance.errors import UserError
from tests.equivalence_fixtures import modulation_per_step
from tests.tiny import tiny_late_fusion

CLASSES, FEATURES, INPUTS, BATCH = 4, 8, 6, 12
STEPS, EPOCHS, SEED, LR = 3, 3, 4, 0.1
SIGMA, EPS = 0.5, 0.3
MODALITIES = ("audio", "visual")


def model(seed=0, fusion="concat"):
    return tiny_late_fusion(fusion, CLASSES, FEATURES, seed, inputs=INPUTS)


def batches(seed=3):
    generator = torch.Generator().manual_seed(seed)
    while True:
        inputs = {m: torch.randn(BATCH, INPUTS, generator=generator) for m in MODALITIES}
        yield inputs, torch.randint(0, CLASSES, (BATCH,), generator=generator)


def prepared(mask, output_layer, seed=0):
    """Our model and method after setup, and a copy of the model for the re-statement (so both
    start from the same weights, ``linear_star`` included)."""
    net = model(seed)
    method = build_method("amco", net.heads, {"mask": mask, "output_layer": output_layer}, seed=SEED)
    method.setup(net)
    return net, method, copy.deepcopy(net)


def released_parameters(net):
    return [*net.encoders.parameters(), *net.fusion.parameters()]


# -- BalanceBenchmark's training, re-stated ------------------------------------------------------------
def balancemm_steps(net, mask_kind, epochs=EPOCHS, sigma=SIGMA, eps=EPS):
    """Returns, per step, which modalities were masked and the mask ratio pt."""
    optimizer = torch.optim.SGD(released_parameters(net), lr=LR, momentum=0.9, weight_decay=1e-4)
    draws, data, record = torch.Generator().manual_seed(SEED), batches(), []
    fc_out = net.fusion.classifier
    linear_star = getattr(net.fusion, "output_layer", None)
    for epoch in range(epochs):
        dependent = {m: False for m in MODALITIES}
        l_t = 0
        for _ in range(STEPS):
            pt = np.sin(np.pi / 2 * (min(eps, l_t) / eps))
            if mask_kind == "logits":
                N = int(pt * CLASSES)
                mask_t = torch.ones(CLASSES)
                mask_t[torch.randperm(CLASSES, generator=draws)[:N]] = 0  # np.pad + np.random.shuffle
            else:
                unit_masks = {}
                for m in MODALITIES:  # U = the feature width
                    N = int(pt * FEATURES)
                    unit_masks[m] = torch.ones(FEATURES)
                    unit_masks[m][torch.randperm(FEATURES, generator=draws)[:N]] = 0
            l_t += epoch / 10
            record.append(([m for m in MODALITIES if dependent[m]], float(pt)))
            inputs, label = next(data)
            result = {m: net.encoders[m](inputs[m]) for m in MODALITIES}
            if mask_kind == "features":
                for m in MODALITIES:
                    if dependent[m]:
                        result[m] = torch.mul(result[m], unit_masks[m])
                        result[m] = result[m] * 1 / (1 - pt) if abs(pt - 1) > 0.1 else result[m] * 10
            unimodal, now_size = {}, 0
            for m in MODALITIES:
                unimodal[m] = (torch.mm(result[m], torch.transpose(fc_out.weight[:, now_size:now_size + FEATURES], 0, 1))
                               + fc_out.bias / len(MODALITIES))
                now_size += FEATURES
                if mask_kind == "logits" and dependent[m]:
                    unimodal[m] = torch.mul(unimodal[m], mask_t.unsqueeze(0))  # the fix: one mask for every sample
            if mask_kind == "logits":
                output = torch.zeros_like(unimodal["audio"])
                for m in MODALITIES:
                    output += unimodal[m]
            else:
                output = fc_out(torch.cat([result[m] for m in MODALITIES], dim=1))
            if linear_star is not None:
                output = linear_star(output)
            loss = F.cross_entropy(output, label)
            loss.backward(retain_graph=True)
            for m in MODALITIES:
                F.cross_entropy(unimodal[m], label).backward()
            sft_out = torch.softmax(torch.cat([unimodal[m] for m in MODALITIES], 1), dim=1)
            now_dim = 0
            for m in MODALITIES:
                if now_dim < sft_out.shape[1] - CLASSES:
                    sft_uni = torch.sum(sft_out[:, now_dim:now_dim + CLASSES]) / len(label)
                else:
                    sft_uni = torch.sum(sft_out[:, now_dim:]) / len(label)
                dependent[m] = bool(sft_uni > sigma)
                now_dim += CLASSES
            optimizer.step()
            optimizer.zero_grad()
    return record


# -- ours -----------------------------------------------------------------------------------------
def our_steps(net, method, epochs=EPOCHS, data=None, first_epoch=1, optimizer=None):
    optimizer = optimizer or torch.optim.SGD(net.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    return optimizer, modulation_per_step(net, method, optimizer, data or batches(), epochs, STEPS, first_epoch)


def assert_same_parameters(ours, released):
    for a, b in zip(released_parameters(ours), released_parameters(released)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mask, output_layer", [("logits", True), ("features", False)])
def test_steps_equal_balancebenchmark(mask, output_layer):
    ours, method, released = prepared(mask, output_layer)
    expected = balancemm_steps(released, mask)
    _, kept = our_steps(ours, method)
    size = CLASSES if mask == "logits" else FEATURES
    assert any(masked and int(pt * size) > 0 for masked, pt in expected)  # masks that zero something
    for (masked, pt), got in zip(expected, kept):
        want = {m: 1.0 - int(pt * size) / size if m in masked else 1.0 for m in MODALITIES}
        assert {m: got[m] for m in MODALITIES} == pytest.approx(want)
    assert_same_parameters(ours, released)
    assert all(p.grad is None for p in ours.unimodal_heads.parameters())  # the shares are the unimodal outputs


def test_mask_ratio_schedule_by_hand():
    assert mask_ratio(0.0, EPS) == 0.0
    assert mask_ratio(0.1, EPS) == pytest.approx(0.5)  # sin(pi/6)
    assert mask_ratio(0.2, EPS) == pytest.approx(np.sqrt(3) / 2)
    assert mask_ratio(0.4, EPS) == 1.0  # capped at eps


def test_outside_the_window_only_the_fusion_loss_trains_and_nothing_is_masked():
    net, method, _ = prepared("logits", True)
    method = build_method("amco", net.heads, {"mask": "logits", "modulation_starts": 5}, seed=SEED)
    method.setup(net)  # the layer already there is kept
    method.start_epoch(2, net, None)
    method.dependent.fill_(True)  # would mask, inside the window
    inputs, labels = next(batches())
    logits = method.forward_train(net, inputs, labels)
    with torch.no_grad():
        plain = net(inputs)
        shares = net.fusion.modality_logits([net.last_features[m] for m in net.modalities])
    torch.testing.assert_close(logits["fusion"], plain["fusion"])
    for m, share in zip(net.modalities, shares):
        torch.testing.assert_close(logits[m], share)
        assert not logits[m].requires_grad
    losses = {h: F.cross_entropy(logits[h], labels) for h in net.heads}
    assert method.network_loss(losses) is losses["fusion"]
    assert bool(method.dependent.all())  # the monitor does not run outside the window


def test_an_epoch_starts_unmasked_and_the_layer_belongs_to_the_model():
    net, method, _ = prepared("features", True)
    method.progress = 0.7
    method.dependent.fill_(True)
    method.start_epoch(3, net, None)
    assert method.progress == 0.0 and not bool(method.dependent.any()) and method.epoch == 2
    assert {"fusion.output_layer.weight", "fusion.output_layer.bias"} <= set(net.state_dict())
    inputs, _ = next(batches())
    net.eval()
    with torch.no_grad():
        logits = method.forward_eval(net, inputs)
        features = {m: net.encoders[m](inputs[m]) for m in net.modalities}
        fused = net.fusion.classifier(torch.cat([features[m] for m in net.modalities], dim=1))
        shares = net.fusion.modality_logits([features[m] for m in net.modalities])
    torch.testing.assert_close(logits["fusion"], net.fusion.output_layer(fused))  # evaluation through W*
    for m, share in zip(net.modalities, shares):
        torch.testing.assert_close(logits[m], share)


def test_state_is_saved_and_resumes_identically():
    whole, method, _ = prepared("logits", True)
    our_steps(whole, method)
    first, method, _ = prepared("logits", True)
    data = batches()
    optimizer, _ = our_steps(first, method, epochs=2, data=data)
    state = method.state_dict()
    assert set(state) == {"dependent", "_extra_state"} and set(state["_extra_state"]) == {"generator", "progress"}
    saved = copy.deepcopy({"model": first.state_dict(), "method": state, "optimizer": optimizer.state_dict()})
    resumed = model(seed=9)
    fresh = build_method("amco", resumed.heads, {"mask": "logits"}, seed=77)  # the draws come from the state
    fresh.setup(resumed)
    resumed.load_state_dict(saved["model"])
    fresh.load_state_dict(saved["method"])
    optimizer = torch.optim.SGD(resumed.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    optimizer.load_state_dict(saved["optimizer"])
    our_steps(resumed, fresh, epochs=1, data=data, first_epoch=3, optimizer=optimizer)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_heads_without_shares_mask_features_and_train_the_unimodal_heads():
    net = model(fusion="bilinear")
    with pytest.raises(UserError, match="--amco-mask logits"):
        build_method("amco", net.heads, {"mask": "logits"}).setup(net)
    method = build_method("amco", net.heads, seed=0)
    method.setup(net)
    _, kept = our_steps(net, method, epochs=2)
    assert all(p.grad is not None for p in net.unimodal_heads.parameters())
    assert min(k[m] for k in kept for m in MODALITIES) < 1.0  # something was masked in the second epoch


def test_refusals_and_recipe():
    heads = ("audio", "visual", "fusion")
    for bad in ({"sigma": 1.5}, {"eps": 0.0}, {"mask": "inputs"}, {"modulation_starts": 3, "modulation_ends": 2}):
        with pytest.raises(UserError):
            build_method("amco", heads, bad)
    recipe = method_entry("amco").recipe("authors", "CREMAD")
    assert (recipe["optimizer"], recipe["lr"], recipe["lr_step"], recipe["batch_size"], recipe["epochs"]) == \
        ("adamw", 1e-3, 10, 32, 30)
    method = build_method("amco", heads)
    assert (method.sigma, method.eps, method.mask, method.output_layer, method.modulation_epochs) == \
        (0.5, 0.3, "features", True, (0, 80))
