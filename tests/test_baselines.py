"""Mechanics of the baselines in engines/baselines.py on a tiny LateFusionClassifier."""
import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from olmbalance.ogm_ge import OGMGE, ogm_coefficient
from engines.engines_logits_com import DiagnosticMeans, StepContext, head_losses, train_step
from olmbalance import build_method
from engines.metrics import HeadMetrics
from models.late_fusion import LateFusionClassifier
from utils.errors import UserError

CLASSES, FEATURES, BATCH = 4, 16, 32


def tiny_model(seed=0, fusion="concat"):
    torch.manual_seed(seed)
    encoders = {m: nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, FEATURES)) for m in ("audio", "visual")}
    return LateFusionClassifier(CLASSES, ("audio", "visual"), fusion, encoders=encoders, feature_dim=FEATURES)


def tiny_batch(seed=1):
    generator = torch.Generator().manual_seed(seed)
    inputs = {m: torch.randn(BATCH, 6, generator=generator) for m in ("audio", "visual")}
    return inputs, torch.randint(0, CLASSES, (BATCH,), generator=generator)


def backward_network_loss(model, method, inputs, labels):
    logits = model(inputs)
    losses = head_losses(method.scale(logits), labels, method.heads)
    method.network_loss(losses).backward()
    return logits


def grads(module):
    return {name: None if p.grad is None else p.grad.clone() for name, p in module.named_parameters()}


def one_training_step(model, method):
    coefficients = method.coefficient_parameters()
    context = StepContext(device=torch.device("cpu"), network_optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
                          coefficient_optimizer=torch.optim.Adam(coefficients, lr=1e-2) if coefficients else None,
                          progress=False)
    inputs, labels = tiny_batch()
    heldout = itertools.repeat(tiny_batch(seed=2) + (0,))
    train_step(model, method, (inputs, labels, 0), heldout, context, HeadMetrics(method.heads), DiagnosticMeans())


@pytest.mark.parametrize("modality, other", [("audio", "visual"), ("visual", "audio")])
def test_unimodal_baseline_trains_only_its_modality(modality, other):
    model = tiny_model()
    method = build_method(f"{modality}_only", model.heads)
    method.setup(model)
    assert method.selection_head() == modality and method.trained_heads() == (modality,)

    before = copy.deepcopy(model.state_dict())
    inputs, labels = tiny_batch()
    backward_network_loss(model, method, inputs, labels)
    assert all(p.grad is None for p in model.encoders[other].parameters())
    assert all(p.grad is None for p in model.fusion.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders[modality].parameters())

    model.zero_grad(set_to_none=True)
    one_training_step(model, method)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith((f"encoders.{modality}.", f"unimodal_heads.{modality}.")) for k in changed)


def test_unimodal_baseline_needs_its_head():
    with pytest.raises(UserError, match="visual_only"):
        build_method("visual_only", ("audio", "fusion"))


def test_fusion_only_encoders_learn_from_the_fusion_loss_alone():
    model = tiny_model()
    reference = copy.deepcopy(model)
    method = build_method("fusion_only", model.heads)
    method.setup(model)
    assert model.detach_unimodal_heads is True and method.selection_head() == "fusion"

    inputs, labels = tiny_batch()
    backward_network_loss(model, method, inputs, labels)

    # Manual: encoders and fusion from the fusion CE only; read-outs from their own CE on
    # features that carry no gradient back.
    logits = reference(inputs)
    F.cross_entropy(logits["fusion"], labels).backward()
    for m in ("audio", "visual"):
        for (name, p), q in zip(model.encoders[m].named_parameters(), reference.encoders[m].parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-6), f"{m} encoder {name}"
    for p, q in zip(model.fusion.parameters(), reference.fusion.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)

    for m in ("audio", "visual"):
        features = reference.encoders[m](inputs[m]).detach()
        head = reference.unimodal_heads[m]
        expected = torch.autograd.grad(F.cross_entropy(head(features), labels), list(head.parameters()))
        for p, g in zip(model.unimodal_heads[m].parameters(), expected):
            assert p.grad is not None and torch.allclose(p.grad, g, atol=1e-6)


def test_fusion_only_refuses_a_model_without_detachable_heads():
    method = build_method("fusion_only", ("audio", "visual", "fusion"))
    with pytest.raises(UserError, match="detachable"):
        method.setup(nn.Linear(2, 2))


def dominant_audio_logits(labels):
    """Audio's read-out is confident on the true class, visual's is uniform: audio dominates."""
    audio = F.one_hot(labels, CLASSES).float() * 3.0
    return {"audio": audio, "visual": torch.zeros(len(labels), CLASSES), "fusion": torch.zeros(len(labels), CLASSES)}


def expected_audio_coefficient(labels, alpha):
    true_class_probability = math.exp(3.0) / (math.exp(3.0) + CLASSES - 1)
    score_audio = true_class_probability * len(labels)
    score_visual = len(labels) / CLASSES
    ratio = score_audio / score_visual
    return 1 - math.tanh(alpha * ratio), ratio


def ogm_after_backward(alpha=0.3, generalization=False, seed=None):
    """One OGM-GE modulation on a bilinear-fusion model: that head has no per-modality parts,
    so the read-out logits given here decide the scores."""
    model = tiny_model(fusion="bilinear")
    method = build_method("ogm_ge", model.heads, alpha=alpha, generalization=generalization,
                          seed=seed, target_scale="reference", reference_steps=5)
    method.setup(model)
    assert method.score_source == "read-out"
    inputs, labels = tiny_batch()
    backward_network_loss(model, method, inputs, labels)
    original = {m: grads(model.encoders[m]) for m in ("audio", "visual")}
    method.after_backward(model, dominant_audio_logits(labels), labels)
    return model, method, original, labels


def test_ogm_scales_only_the_dominant_encoders_weights():
    model, method, original, labels = ogm_after_backward(alpha=0.3)
    k, ratio = expected_audio_coefficient(labels, 0.3)
    assert ratio > 1 and 0 < k < 1
    for name, p in model.encoders["audio"].named_parameters():
        # Weights (the released code's convolution weights) are modulated; biases are not.
        scale = k if p.dim() >= 2 else 1.0
        assert torch.allclose(p.grad, scale * original["audio"][name], atol=1e-7), name
    for name, p in model.encoders["visual"].named_parameters():
        assert torch.equal(p.grad, original["visual"][name])
    assert method.diagnostics()["discrepancy"][0].item() == pytest.approx(ratio, rel=1e-5)
    coefficients = method.coefficients()
    assert coefficients["audio"] == pytest.approx(k, rel=1e-5) and coefficients["visual"] == 1.0
    assert coefficients["fusion"] == 1.0


def test_ogm_ge_noise_has_the_unmodulated_gradient_std_and_is_seeded():
    model, _, original, labels = ogm_after_backward(alpha=0.3, generalization=True, seed=7)
    again, _, _, _ = ogm_after_backward(alpha=0.3, generalization=True, seed=7)
    k, _ = expected_audio_coefficient(labels, 0.3)
    assert k < 0.5  # so the std before modulation and the one after differ clearly
    weight = "0.weight"  # 32 x 6: enough entries for a std estimate
    for m, scale in (("audio", k), ("visual", 1.0)):
        modulated = scale * original[m][weight]
        noise = dict(model.encoders[m].named_parameters())[weight].grad - modulated
        assert noise.abs().sum() > 0
        # As released: the noise's std is the gradient's before it was multiplied by k.
        assert noise.std().item() == pytest.approx(original[m][weight].std().item(), rel=0.35)
        bias = dict(model.encoders[m].named_parameters())["0.bias"].grad
        assert torch.equal(bias, original[m]["0.bias"])  # untouched, no noise
        assert torch.equal(dict(model.encoders[m].named_parameters())[weight].grad,
                           dict(again.encoders[m].named_parameters())[weight].grad)


def test_ogm_noise_stream_survives_a_checkpoint():
    _, method, _, _ = ogm_after_backward(generalization=True, seed=3)
    state = copy.deepcopy(method.state_dict())
    expected = method.gaussian_like(torch.zeros(5))
    restored = build_method("ogm_ge", ("audio", "visual", "fusion"), seed=99)
    restored.load_state_dict(state)
    assert torch.equal(restored.gaussian_like(torch.zeros(5)), expected)


def test_ogm_scores_come_from_the_concat_fusion_parts():
    """With concat fusion the scores are each modality's share of the fusion logits (its block
    of the weight plus half the bias), whatever the read-out heads say."""
    model = tiny_model(fusion="concat")
    method = build_method("ogm_ge", model.heads, alpha=0.3, generalization=False)
    method.setup(model)
    assert method.score_source == "fusion"
    inputs, labels = tiny_batch()
    backward_network_loss(model, method, inputs, labels)
    method.after_backward(model, dominant_audio_logits(labels), labels)
    weight, bias = model.fusion.classifier.weight, model.fusion.classifier.bias
    with torch.no_grad():
        scores = [torch.softmax(model.encoders[m](inputs[m]) @ w.t() + bias / 2, 1).gather(1, labels.view(-1, 1)).sum()
                  for m, w in zip(("audio", "visual"), weight.split(FEATURES, dim=1))]
    expected = (scores[0] / scores[1]).item()
    read_out_ratio = expected_audio_coefficient(labels, 0.3)[1]
    assert method.diagnostics()["discrepancy"][0].item() == pytest.approx(expected, rel=1e-5)
    assert abs(expected - read_out_ratio) > 0.5


def test_ogm_modulates_only_in_its_epochs():
    model = tiny_model(fusion="bilinear")
    method = build_method("ogm_ge", model.heads, alpha=0.3, generalization=True, seed=1,
                          modulation_starts=1, modulation_ends=1, steps_per_epoch=2)
    method.setup(model)
    inputs, labels = tiny_batch()
    changed = []
    for _ in range(6):  # epochs 0, 0, 1, 1, 2, 2
        model.zero_grad(set_to_none=True)
        backward_network_loss(model, method, inputs, labels)
        before = grads(model.encoders["audio"])
        method.after_backward(model, dominant_audio_logits(labels), labels)
        after = grads(model.encoders["audio"])
        changed.append(any(not torch.equal(before[n], after[n]) for n in before))
    assert changed == [False, False, True, True, False, False]
    state = copy.deepcopy(method.state_dict())
    restored = build_method("ogm_ge", model.heads, modulation_starts=1, modulation_ends=1, steps_per_epoch=2)
    restored.load_state_dict(state)
    assert restored.steps == 6 and not restored.modulating()


def test_ogm_coefficient_follows_the_paper():
    ratios = torch.tensor([0.5, 1.0, 2.0])
    assert torch.allclose(ogm_coefficient(ratios, 0.1), torch.tensor([1.0, 1.0, 1 - math.tanh(0.2)]))


def test_ogm_generalises_to_three_modalities():
    method = OGMGE(("audio", "visual", "text", "fusion"))
    labels = torch.zeros(2, dtype=torch.long)
    logits = {"audio": torch.tensor([[5.0, 0.0]] * 2), "visual": torch.zeros(2, 2), "text": torch.zeros(2, 2)}
    ratios = method.discrepancy_ratios(logits, labels)
    score = torch.softmax(torch.tensor([5.0, 0.0]), 0)[0].item() * 2
    assert ratios.tolist() == pytest.approx([score / 1.0, 1.0 / ((score + 1.0) / 2), 1.0 / ((score + 1.0) / 2)])
    with pytest.raises(UserError, match="two modality heads"):
        OGMGE(("audio", "fusion"))


def test_olm_mean_ratios_average_one():
    heads = ("audio", "visual", "fusion")
    method = build_method("olm_mean", heads, target_scale="reference", reference_steps=1)
    assert method.name == "olm_mean" and method.modulator.target_scale == "mean" and method.needs_heldout
    logits = {h: torch.randn(8, CLASSES) for h in heads}
    reference = {h: torch.tensor(2.0) for h in heads}
    method.coefficient_loss(logits, reference, reference)  # the reference step
    # G = (0.5, 0.05, 0.1), C = (0.5, 0.05, 0.4): G / C = (1, 1, 0.25), so ratios are not uniform.
    train = {"audio": torch.tensor(1.0), "visual": torch.tensor(1.9), "fusion": torch.tensor(1.5)}
    heldout = {"audio": torch.tensor(1.5), "visual": torch.tensor(1.95), "fusion": torch.tensor(1.9)}
    method.coefficient_loss(logits, train, heldout)
    ratios = method.diagnostics()["ratios"]
    assert ratios.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert not torch.allclose(ratios, torch.ones(3))


@pytest.mark.parametrize("name", ["audio_only", "visual_only", "fusion_only", "ogm_ge", "olm_mean"])
def test_every_baseline_runs_a_step_of_the_shared_loop(name):
    model = tiny_model(fusion="bilinear")
    method = build_method(name, model.heads, target_scale="reference", reference_steps=1)
    method.setup(model)
    before = copy.deepcopy(model.state_dict())
    one_training_step(model, method)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
