"""Late-fusion models: every fusion head, any input size, a dict of logits per head."""
import pytest
import torch

from models.fusion import FUSIONS, build_fusion, modality_parts
from models.late_fusion import LateFusionClassifier


@pytest.mark.parametrize("fusion", FUSIONS)
def test_each_fusion_returns_all_heads(fusion):
    model = LateFusionClassifier(num_classes=7, fusion=fusion)
    inputs = {"audio": torch.randn(3, 1, 20, 24), "visual": torch.randn(3, 2, 3, 16, 16)}
    logits = model(inputs)
    assert model.heads == ("audio", "visual", "fusion")
    assert {h: tuple(v.shape) for h, v in logits.items()} == {h: (3, 7) for h in model.heads}
    sum(v.sum() for v in logits.values()).backward()
    assert all(p.grad is not None for p in model.fusion.parameters())


@pytest.mark.parametrize("size", [(16, 16, 8), (64, 48, 32)])
def test_encoders_work_at_any_input_size(size):
    freq, time, image = size
    model = LateFusionClassifier(num_classes=4, fusion="concat").eval()
    logits = model({"audio": torch.randn(2, 1, freq, time), "visual": torch.randn(2, 3, 3, image, image)})
    assert logits["fusion"].shape == (2, 4)


def test_visual_encoder_pools_over_time():
    model = LateFusionClassifier(num_classes=4, fusion="sum").eval()
    frame = torch.randn(2, 1, 3, 16, 16)
    with torch.no_grad():
        once = model.encoders["visual"](frame)
        repeated = model.encoders["visual"](frame.repeat(1, 3, 1, 1, 1))
    assert torch.allclose(once, repeated, atol=1e-5)  # the mean over identical frames


def test_detached_unimodal_heads_do_not_train_encoders():
    model = LateFusionClassifier(num_classes=4, fusion="concat")
    model.detach_unimodal_heads = True
    logits = model({"audio": torch.randn(2, 1, 16, 16), "visual": torch.randn(2, 1, 3, 16, 16)})
    logits["audio"].sum().backward()
    assert all(p.grad is None for p in model.encoders["audio"].parameters())
    assert model.unimodal_heads["audio"].weight.grad is not None


def test_bilinear_needs_two_modalities_and_unknown_fusion_fails():
    with pytest.raises(ValueError, match="unknown fusion"):
        LateFusionClassifier(num_classes=4, fusion="nope")


def parameters(module):
    return sum(p.numel() for p in module.parameters())


def test_bilinear_is_the_released_head():
    """Two Linear(512, 512) projections, their elementwise product, Linear(512, classes)."""
    for classes in (6, 309):
        head = build_fusion("bilinear", [512, 512], classes)
        assert parameters(head) == 2 * (512 * 512 + 512) + 512 * classes + classes
    head = build_fusion("bilinear", [8, 8], 3)
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    first, second = head.projections
    expected = head.classifier(first(x) * second(y))
    assert torch.allclose(head([x, y]), expected)
    # The full bilinear form is another, much larger head, kept under its own name.
    assert parameters(build_fusion("bilinear_full", [512, 512], 309)) == 512 * 512 * 309 + 309
    with pytest.raises(ValueError, match="two modalities"):
        build_fusion("bilinear", [8, 8, 8], 3)


@pytest.mark.parametrize("fusion", ["sum", "concat"])
def test_modality_parts_add_up_to_the_fusion_logits(fusion):
    head = build_fusion(fusion, [5, 7], 3)
    features = [torch.randn(4, 5), torch.randn(4, 7)]
    parts = modality_parts(head, features)
    assert len(parts) == 2 and torch.allclose(parts[0] + parts[1], head(features), atol=1e-6)
    if fusion == "concat":  # the first modality's block of the weight plus half the bias
        weight, bias = head.classifier.weight, head.classifier.bias
        assert torch.allclose(parts[0], features[0] @ weight[:, :5].t() + bias / 2, atol=1e-6)


@pytest.mark.parametrize("fusion", ["film", "gated", "attention", "bilinear", "bilinear_full"])
def test_heads_that_mix_modalities_have_no_parts(fusion):
    assert modality_parts(build_fusion(fusion, [8, 8], 3), [torch.randn(2, 8), torch.randn(2, 8)]) is None
