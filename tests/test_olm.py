"""LogitModulator maths against values worked out by hand (OLM_SPEC.md §1 and §3)."""
import math

import pytest
import torch

from olmbalance.olm import LogitModulator

HEADS = ("audio", "visual", "fusion")
# Per-sample logit norms: audio 5 and 10, visual 1.5 and 2, fusion 3 and 5.
LOGITS = {"audio": torch.tensor([[3.0, 4.0], [6.0, 8.0]]),
          "visual": torch.tensor([[0.0, 1.5], [0.0, 2.0]]),
          "fusion": torch.tensor([[0.0, 3.0], [4.0, 3.0]])}
NORMS = torch.tensor([[5.0, 1.5, 3.0], [10.0, 2.0, 5.0]])


def losses(*values):
    return {h: torch.tensor(v) for h, v in zip(HEADS, values)}


def hand_loss(norms, ratios):
    """mean_b sum_k |n_bk - mean_j(n_bj) r_k|, written out with plain Python loops."""
    total = 0.0
    for row in norms.tolist():
        mean = sum(row) / len(row)
        total += sum(abs(n - mean * r) for n, r in zip(row, ratios))
    return total / len(norms)


def test_first_call_is_uniform_and_sets_reference():
    mod = LogitModulator(HEADS, target="rate", reference_steps=1)
    loss = mod.norm_loss(LOGITS, losses(2.0, 2.0, 2.0), losses(2.1, 2.2, 2.3))
    assert torch.allclose(mod.last["ratios"], torch.full((3,), 1 / 3))
    # sample 1: mean 9.5/3, target 9.5/9; sample 2: mean 17/3, target 17/9
    expected = ((5 - 9.5 / 9) + (1.5 - 9.5 / 9) + (3 - 9.5 / 9)
                + (10 - 17 / 9) + (2 - 17 / 9) + (5 - 17 / 9)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert mod.reference_train.tolist() == pytest.approx([2.0, 2.0, 2.0])
    assert mod.reference_heldout.tolist() == pytest.approx([2.1, 2.2, 2.3])
    assert int(mod.reference_count) == 1


def rate_ratios_by_hand():
    # After reference train (2, 2, 2) and held-out (2.1, 2.2, 2.3):
    # train (1.0, 1.5, 0.5), held-out (1.8, 2.1, 2.4)
    # G = (0.3, 0.1, -0.1); C = (1.0, 0.5, 1.5) - G = (0.7, 0.4, 1.6)
    # clamp(G) / clamp(C) = (3/7, 1/4, 1e-6/1.6)
    logits = [3 / 7, 0.25, 1e-6 / 1.6]
    exps = [math.exp(v) for v in logits]
    return [e / sum(exps) for e in exps]


@pytest.mark.parametrize("scale", ["reference", "mean"])
def test_rate_target_after_reference(scale):
    mod = LogitModulator(HEADS, target="rate", target_scale=scale, reference_steps=1)
    mod.norm_loss(LOGITS, losses(2.0, 2.0, 2.0), losses(2.1, 2.2, 2.3))
    loss = mod.norm_loss(LOGITS, losses(1.0, 1.5, 0.5), losses(1.8, 2.1, 2.4))
    ratios = rate_ratios_by_hand()
    assert ratios == pytest.approx([0.40194, 0.33621, 0.26184], abs=1e-5)
    if scale == "mean":
        ratios = [3 * r for r in ratios]
    assert mod.last["ratios"].tolist() == pytest.approx(ratios, rel=1e-5)
    assert mod.last["G"].tolist() == pytest.approx([0.3, 0.1, -0.1], abs=1e-6)
    assert mod.last["C"].tolist() == pytest.approx([0.7, 0.4, 1.6], abs=1e-6)
    assert loss.item() == pytest.approx(hand_loss(NORMS, ratios), rel=1e-5)
    assert sum(mod.last["ratios"].tolist()) == pytest.approx(1.0 if scale == "reference" else 3.0)


def test_loss_ratio_target():
    mod = LogitModulator(HEADS, target="loss_ratio", reference_steps=1)
    mod.norm_loss(LOGITS, losses(2.0, 2.0, 2.0))
    loss = mod.norm_loss(LOGITS, losses(1.0, 1.5, 0.5))
    # q = (0.5, 0.75, 0.25), mean 0.5 -> r = (1, 1.5, 0.5)
    assert mod.last["ratios"].tolist() == pytest.approx([1.0, 1.5, 0.5])
    assert loss.item() == pytest.approx(hand_loss(NORMS, [1.0, 1.5, 0.5]), rel=1e-6)


def test_reference_is_mean_over_reference_steps():
    mod = LogitModulator(HEADS, target="rate", reference_steps=2)
    mod.norm_loss(LOGITS, losses(2.0, 3.0, 4.0), losses(2.0, 2.0, 2.0))
    assert mod.collecting_reference
    mod.norm_loss(LOGITS, losses(1.0, 1.0, 2.0), losses(3.0, 2.0, 1.0))
    assert torch.allclose(mod.last["ratios"], torch.full((3,), 1 / 3))  # still uniform
    assert not mod.collecting_reference
    assert mod.reference_train.tolist() == pytest.approx([1.5, 2.0, 3.0])
    assert mod.reference_heldout.tolist() == pytest.approx([2.5, 2.0, 1.5])
    mod.norm_loss(LOGITS, losses(1.0, 1.0, 1.0), losses(2.0, 2.0, 2.0))
    # G = (0.5, 0, -0.5); C = (0.5, 1, 2) - G = (0, 1, 2.5)
    assert mod.last["G"].tolist() == pytest.approx([0.5, 0.0, -0.5])
    assert mod.last["C"].tolist() == pytest.approx([0.0, 1.0, 2.5])


def test_saturation_when_heldout_improves_as_fast_as_train():
    mod = LogitModulator(HEADS, target="rate")
    mod.norm_loss(LOGITS, losses(2.0, 2.0, 2.0), losses(2.0, 2.0, 2.0))
    mod.norm_loss(LOGITS, losses(1.0, 1.9, 1.9), losses(1.0, 1.95, 1.95))
    # audio: G = 1, C = 0 -> G / C = 1 / 1e-6: the softmax is one-hot on audio
    assert mod.last["ratios"][0].item() == pytest.approx(1.0)
    assert mod.last["saturated"].item() == 1.0


def test_gradient_reaches_coefficients_only():
    mod = LogitModulator(HEADS, target="loss_ratio")
    logits = {h: v.clone().requires_grad_(True) for h, v in LOGITS.items()}
    mod.norm_loss(logits, losses(2.0, 2.0, 2.0)).backward()
    assert all(v.grad is None for v in logits.values())
    # While collecting, r = 1: targets are the sample means 9.5/3 and 17/3, so audio sits
    # above them and visual, fusion below. d/dw_k = mean_b sign(n_bk - t_bk) n_bk.
    assert mod.coefficients.grad.tolist() == pytest.approx([(5 + 10) / 2, -(1.5 + 2) / 2, -(3 + 5) / 2])


def test_scale_multiplies_and_keeps_autograd():
    mod = LogitModulator(HEADS)
    with torch.no_grad():
        mod.coefficients.copy_(torch.tensor([2.0, 0.5, -1.0]))
    logits = {h: v.clone().requires_grad_(True) for h, v in LOGITS.items()}
    scaled = mod.scale(logits)
    assert torch.equal(scaled["audio"], 2.0 * LOGITS["audio"])
    assert torch.equal(scaled["fusion"], -LOGITS["fusion"])
    sum(s.sum() for s in scaled.values()).backward()
    assert logits["visual"].grad is not None and mod.coefficients.grad is not None


def test_state_dict_round_trip_continues_identically():
    first = LogitModulator(HEADS, target="rate", reference_steps=2)
    first.norm_loss(LOGITS, losses(2.0, 3.0, 4.0), losses(2.0, 2.0, 2.0))
    first.norm_loss(LOGITS, losses(1.0, 1.0, 2.0), losses(3.0, 2.0, 1.0))
    with torch.no_grad():
        first.coefficients.mul_(torch.tensor([0.9, 1.2, 0.7]))
    state = first.state_dict()
    assert set(state) == {"coefficients", "reference_train", "reference_heldout", "reference_count"}
    second = LogitModulator(HEADS, target="rate", reference_steps=2)
    second.load_state_dict(state)
    step = (losses(1.0, 1.0, 1.0), losses(2.0, 2.0, 2.0))
    assert second.norm_loss(LOGITS, *step).item() == first.norm_loss(LOGITS, *step).item()
    assert torch.equal(second.last["ratios"], first.last["ratios"])


def test_any_number_of_heads_and_free_names():
    mod = LogitModulator(("a", "b"), target="loss_ratio")
    z = {"a": torch.randn(4, 3), "b": torch.randn(4, 3)}
    assert mod.norm_loss(z, {"a": torch.tensor(1.0), "b": torch.tensor(2.0)}).dim() == 0
    mod4 = LogitModulator(("audio", "visual", "text", "fusion"), target="rate")
    z4 = {h: torch.randn(4, 3) for h in mod4.heads}
    one = {h: torch.tensor(1.0) for h in mod4.heads}
    mod4.norm_loss(z4, one, one)
    assert mod4.last["ratios"].shape == (4,)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        LogitModulator(("only",))
    with pytest.raises(ValueError):
        LogitModulator(HEADS, target="nope")
    with pytest.raises(ValueError):
        LogitModulator(HEADS, target_scale="nope")
    with pytest.raises(ValueError, match="heldout"):
        LogitModulator(HEADS, target="rate").norm_loss(LOGITS, losses(1.0, 1.0, 1.0))


def test_reference_tail_averages_only_the_windows_last_calls():
    # Window of 4 calls, tail 2: only calls 3 and 4 make the reference.
    mod = LogitModulator(HEADS, target="rate", reference_steps=4, reference_tail=2)
    for value in (9.0, 7.0, 2.0, 1.0):
        mod.norm_loss(LOGITS, losses(value, value, value), losses(value + 1, value + 1, value + 1))
        assert mod.last["ratios"].tolist() == pytest.approx([1 / 3] * 3)  # uniform while collecting
    assert not mod.collecting_reference
    assert mod.reference_train.tolist() == pytest.approx([1.5, 1.5, 1.5])
    assert mod.reference_heldout.tolist() == pytest.approx([2.5, 2.5, 2.5])


def test_reference_tail_of_one_is_the_released_last_batch():
    mod = LogitModulator(HEADS, target="rate", reference_steps=3, reference_tail=1)
    for value in (5.0, 4.0, 3.0):
        mod.norm_loss(LOGITS, losses(value, 2 * value, 1.0), losses(1.0, 1.0, value))
    assert mod.reference_train.tolist() == pytest.approx([3.0, 6.0, 1.0])
    assert mod.reference_heldout.tolist() == pytest.approx([1.0, 1.0, 3.0])
    # A tail longer than the window is the whole window.
    assert LogitModulator(HEADS, reference_steps=3, reference_tail=10).reference_tail == 3
    with pytest.raises(ValueError, match="reference_tail"):
        LogitModulator(HEADS, reference_steps=3, reference_tail=0)


def test_saturated_head_names_the_head_that_took_the_mass():
    mod = LogitModulator(HEADS, target="rate")
    mod.norm_loss(LOGITS, losses(2.0, 2.0, 2.0), losses(2.0, 2.0, 2.0))
    # Head 1 (visual here): held-out improves as fast as train, C <= 0 -> clamped -> one-hot.
    mod.norm_loss(LOGITS, losses(1.9, 1.0, 1.9), losses(1.95, 1.0, 1.95))
    assert float(mod.last["saturated"]) == 1.0
    assert mod.last["saturated_head"].tolist() == [0.0, 1.0, 0.0]
    mod.norm_loss(LOGITS, losses(1.8, 1.8, 1.8), losses(1.9, 1.9, 1.9))  # equal gains: uniform
    assert float(mod.last["saturated"]) == 0.0 and mod.last["saturated_head"].tolist() == [0.0, 0.0, 0.0]


def test_heldout_forward_rejects_an_unknown_norm():
    from olmbalance.olm import heldout_forward

    with pytest.raises(ValueError, match="norm"):
        with heldout_forward(torch.nn.Linear(2, 2), "nope"):
            pass


def test_config_reference_tail_is_a_share_of_the_first_epoch():
    import dataclasses

    from config import Config
    from engines.methods import method_from_config

    cfg = Config(method="olm", batch_size=16, reference_steps=0, reference_tail=0.25)
    modulator = method_from_config(cfg, HEADS, train_size=1257).modulator
    assert (modulator.reference_steps, modulator.reference_tail) == (79, 20)  # ceil(1257/16), ceil(79/4)
    whole = method_from_config(dataclasses.replace(cfg, reference_tail=1.0), HEADS, 1257).modulator
    assert whole.reference_tail == whole.reference_steps == 79


def test_config_rejects_a_reference_tail_outside_zero_one():
    from config import Config, validate
    from utils.errors import UserError

    for bad in (0.0, 1.5):
        with pytest.raises(UserError, match="--reference-tail"):
            validate(Config(reference_tail=bad))


@pytest.mark.parametrize("scale", ["reference", "mean"])
def test_saturation_flags_read_the_softmax_before_the_target_scale(scale):
    # The flags describe the softmax (mass over 0.99 on one head), whatever the scale: with
    # ratios (0.40, 0.34, 0.26) nothing is saturated, also at target_scale="mean" where the
    # scaled ratios (1.21, 1.01, 0.79) exceed 0.99; one-hot on audio is saturated at both.
    mod = LogitModulator(HEADS, target="rate", target_scale=scale, reference_steps=1)
    mod.norm_loss(LOGITS, losses(2.0, 2.0, 2.0), losses(2.1, 2.2, 2.3))
    mod.norm_loss(LOGITS, losses(1.0, 1.5, 0.5), losses(1.8, 2.1, 2.4))
    assert mod.last["saturated"].item() == 0.0
    assert mod.last["saturated_head"].tolist() == [0.0, 0.0, 0.0]
    saturated = LogitModulator(HEADS, target="rate", target_scale=scale, reference_steps=1)
    saturated.norm_loss(LOGITS, losses(2.0, 2.0, 2.0), losses(2.0, 2.0, 2.0))
    saturated.norm_loss(LOGITS, losses(1.0, 1.9, 1.9), losses(1.0, 1.95, 1.95))
    assert saturated.last["saturated"].item() == 1.0
    assert saturated.last["saturated_head"].tolist() == [1.0, 0.0, 0.0]
