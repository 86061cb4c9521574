"""Contract tests for the mid-fusion transformers (EMT, MBT, UMT, CA)."""

import pytest
import torch
from torch import nn

from models.transformers.blocks import (
    CrossAttentionLayer,
    InputEmbedding,
    SelfAttentionLayer,
    build_token_mask,
    masked_mean,
)
from models.transformers.build import TRANSFORMER_TYPES, build_transformer

MODEL_TYPES = sorted(TRANSFORMER_TYPES)
MODALITY_SETS = {
    2: (("audio", "visual"), {"audio": 16, "visual": 12}),
    3: (("audio", "visual", "text"), {"audio": 16, "visual": 12, "text": 8}),
}
STEPS = {"audio": 7, "visual": 5, "text": 4}
NUM_CLASSES = 5
BATCH = 3


def small_model(model_type, num_modalities, dropout=0.1):
    modalities, dims = MODALITY_SETS[num_modalities]
    torch.manual_seed(0)
    return build_transformer(model_type, modalities, dims, NUM_CLASSES, d_model=32,
                             num_layers=2, num_heads=4, num_bottleneck=3, dropout=dropout)


def random_batch(model, seed=1):
    """Inputs with ragged real lengths per sample, masks True on real steps."""
    generator = torch.Generator().manual_seed(seed)
    batch = {"masks": {}}
    for name in model.modalities:
        steps = STEPS[name]
        batch[name] = torch.randn(BATCH, steps, model.input_dims[name], generator=generator)
        lengths = torch.tensor([steps, max(1, steps - 2), 1])
        batch["masks"][name] = torch.arange(steps)[None, :] < lengths[:, None]
    return batch


def with_extra_padding(batch, model, extra, scale):
    generator = torch.Generator().manual_seed(7)
    padded = {"masks": {}}
    for name in model.modalities:
        junk = scale * torch.randn(BATCH, extra, batch[name].shape[-1], generator=generator)
        padded[name] = torch.cat([batch[name], junk], dim=1)
        padded["masks"][name] = torch.cat(
            [batch["masks"][name], torch.zeros(BATCH, extra, dtype=torch.bool)], dim=1)
    return padded


PARAMS = [(t, n) for t in MODEL_TYPES for n in MODALITY_SETS]


@pytest.mark.parametrize("model_type,num_modalities", PARAMS)
def test_every_head_returns_batch_by_classes(model_type, num_modalities):
    model = small_model(model_type, num_modalities)
    logits = model(random_batch(model))
    assert model.heads == model.modalities + ("fusion",)
    assert set(logits) == set(model.heads)
    for head in model.heads:
        assert logits[head].shape == (BATCH, NUM_CLASSES)
        assert torch.isfinite(logits[head]).all()


@pytest.mark.parametrize("model_type,num_modalities", PARAMS)
@pytest.mark.parametrize("scale", [1.0, 1e30])
def test_extra_padding_leaves_outputs_unchanged(model_type, num_modalities, scale):
    model = small_model(model_type, num_modalities).eval()
    batch = random_batch(model)
    with torch.no_grad():
        reference = model(batch)
        padded = model(with_extra_padding(batch, model, extra=4, scale=scale))
    for head in model.heads:
        torch.testing.assert_close(padded[head], reference[head], atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_padding_changes_nothing_with_grad_enabled_too(model_type):
    model = small_model(model_type, 2).eval()
    batch = random_batch(model)
    reference = model(batch)
    padded = model(with_extra_padding(batch, model, extra=3, scale=100.0))
    for head in model.heads:
        torch.testing.assert_close(padded[head], reference[head], atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_real_steps_do_change_outputs(model_type):
    # Guards the invariance test against a model that ignores its inputs.
    model = small_model(model_type, 2).eval()
    batch = random_batch(model)
    changed = {key: value for key, value in batch.items()}
    changed["audio"] = batch["audio"].clone()
    changed["audio"][:, 0] += 5.0
    with torch.no_grad():
        before, after = model(batch), model(changed)
    assert not torch.allclose(before["audio"], after["audio"])
    assert not torch.allclose(before["fusion"], after["fusion"])


def test_token_mask_puts_true_at_class_position_then_the_step_mask():
    step_mask = torch.tensor([[True, True, False], [True, False, False]])
    token_mask = build_token_mask(step_mask)
    assert token_mask.shape == (2, 4)
    assert token_mask[:, 0].all()
    assert torch.equal(token_mask[:, 1:], step_mask)


def test_embedding_mask_lines_up_with_tokens_and_zeroes_padding():
    embedding = InputEmbedding(input_dim=6, d_model=8, dropout=0.0)
    steps = torch.randn(2, 4, 6)
    step_mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    tokens, token_mask = embedding(steps, step_mask)
    assert tokens.shape == (2, 5, 8)
    assert torch.equal(token_mask, build_token_mask(step_mask))
    assert (tokens[~token_mask] == 0).all()
    assert (tokens[token_mask].abs().sum(dim=-1) > 0).all()


def test_masked_mean_ignores_padding():
    tokens = torch.tensor([[[1.0], [3.0], [1e9]]])
    mask = torch.tensor([[True, True, False]])
    assert masked_mean(tokens, mask).item() == pytest.approx(2.0)


@pytest.mark.parametrize("model_type,num_modalities", PARAMS)
def test_single_real_step_and_no_masks_give_finite_outputs(model_type, num_modalities):
    model = small_model(model_type, num_modalities).eval()
    batch = random_batch(model)
    for name in model.modalities:
        batch["masks"][name][:] = False
        batch["masks"][name][:, 0] = True
    with torch.no_grad():
        single = model(batch)
        unmasked = model({name: batch[name] for name in model.modalities})
    for head in model.heads:
        assert torch.isfinite(single[head]).all()
        assert torch.isfinite(unmasked[head]).all()


@pytest.mark.parametrize("model_type,num_modalities", PARAMS)
def test_gradients_reach_every_parameter(model_type, num_modalities):
    model = small_model(model_type, num_modalities).train()
    logits = model(random_batch(model))
    sum(head_logits.sum() for head_logits in logits.values()).backward()
    without_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert without_grad == []
    all_zero = [name for name, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert all_zero == []


@pytest.mark.parametrize("model_type,num_modalities", PARAMS)
def test_every_layer_and_linear_runs_exactly_once(model_type, num_modalities):
    model = small_model(model_type, num_modalities)
    watched = (SelfAttentionLayer, CrossAttentionLayer, InputEmbedding, nn.Linear)
    calls = {}

    def count(module, args, output):
        calls[id(module)] = calls.get(id(module), 0) + 1

    names = {}
    for name, module in model.named_modules():
        if isinstance(module, watched):
            names[id(module)] = name
            module.register_forward_hook(count)
    model(random_batch(model))
    counts = {names[key]: calls.get(key, 0) for key in names}
    assert any(isinstance(m, (SelfAttentionLayer, CrossAttentionLayer))
               for m in model.modules())
    assert counts and all(value == 1 for value in counts.values()), counts


def test_layer_count_follows_num_layers():
    layer_types = (SelfAttentionLayer, CrossAttentionLayer)
    counts = []
    for num_layers in (1, 3):
        model = build_transformer("mbt", ("audio", "visual"), 8, 2, d_model=16,
                                  num_layers=num_layers, num_heads=2)
        counts.append(sum(isinstance(m, layer_types) for m in model.modules()))
    assert counts == [2, 6]


def test_unknown_model_type_names_the_choices():
    with pytest.raises(ValueError, match="emt.*mbt.*umt.*ca|choose one of"):
        build_transformer("lstm", ("audio", "visual"), 8, 2)


def test_bad_inputs_raise_clear_errors():
    model = small_model("mbt", 2)
    batch = random_batch(model)
    with pytest.raises(ValueError, match="visual"):
        model({"audio": batch["audio"]})
    with pytest.raises(ValueError, match="audio"):
        model({"audio": batch["audio"][..., :3], "visual": batch["visual"]})
    with pytest.raises(ValueError, match="at least 2"):
        build_transformer("ca", ("audio",), 8, 2)


def test_defaults_follow_the_released_setup():
    model = build_transformer("umt", ("audio", "visual", "text"), 1024, 6)
    assert model.d_model == 768 and model.num_layers == 3 and model.num_heads == 8
    assert model.num_pivots == 12 and model.dropout == 0.1
    assert model.input_dims == {"audio": 1024, "visual": 1024, "text": 1024}


def test_mbt_overfits_a_tiny_batch():
    model = small_model("mbt", 2, dropout=0.0).train()
    batch = random_batch(model)
    labels = torch.tensor([0, 1, 2])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        logits = model(batch)
        loss = sum(nn.functional.cross_entropy(z, labels) for z in logits.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


# --- what each head reads, released sizes, valence ---------------------------------------

from olmbalance import build_method  # noqa: E402
from models.transformers.head_dependence import (  # noqa: E402
    input_gradient_norms, own_over_other, random_inputs)
from models.transformers.released import (  # noqa: E402
    RELEASED_FEEDFORWARD, RELEASED_PARAMETERS, RELEASED_SETUP)
from utils.errors import UserError  # noqa: E402


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_emt_heads_read_only_their_own_modality(num_layers, num_modalities):
    modalities, dims = MODALITY_SETS[num_modalities]
    torch.manual_seed(num_layers)
    model = build_transformer("emt", modalities, dims, NUM_CLASSES, d_model=32,
                              num_layers=num_layers, num_heads=4, num_bottleneck=3)
    norms = input_gradient_norms(model, random_inputs(model, seed=num_layers))
    for head, by_input in norms.items():
        assert by_input[head] > 0
        assert all(value == 0.0 for m, value in by_input.items() if m != head), (head, by_input)


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ca_heads_depend_on_their_own_modality_most(num_layers, num_modalities, seed):
    # Before the fix a CA stream attended only to the others: with one layer the audio head
    # had zero gradient from the audio input.
    modalities, dims = MODALITY_SETS[num_modalities]
    torch.manual_seed(seed)
    model = build_transformer("ca", modalities, dims, NUM_CLASSES, d_model=32,
                              num_layers=num_layers, num_heads=4)
    ratios = own_over_other(input_gradient_norms(model, random_inputs(model, seed=seed)))
    assert all(ratio > 1.0 for ratio in ratios.values()), ratios


def test_only_emt_declares_unimodal_heads_and_unimodal_baselines_follow():
    heads = ("audio", "visual", "fusion")
    for model_type in MODEL_TYPES:
        model = build_transformer(model_type, ("audio", "visual"), 8, 2, d_model=16, num_layers=1,
                                  num_heads=2, num_bottleneck=2)
        assert model.UNIMODAL_HEADS == (model_type == "emt")
        for method in ("audio_only", "visual_only"):
            if model_type == "emt":
                build_method(method, heads).setup(model)
            else:
                with pytest.raises(UserError, match="--model-type emt") as caught:
                    build_method(method, heads).setup(model)
                assert str(caught.value).count(". ") == 0  # one sentence


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_released_sizes_give_the_released_parameter_count(model_type):
    setup = RELEASED_SETUP
    model = build_transformer(model_type, setup["modalities"], setup["input_dim"], setup["num_classes"],
                              d_model=setup["d_model"], num_layers=setup["num_layers"],
                              num_heads=setup["num_heads"], num_bottleneck=setup["num_bottleneck"])
    assert model.dim_feedforward == RELEASED_FEEDFORWARD[model_type]
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - RELEASED_PARAMETERS[model_type]) < 0.002 * RELEASED_PARAMETERS[model_type]


def test_dim_feedforward_overrides_the_released_width():
    wide = build_transformer("mbt", ("audio", "visual"), 8, 2, d_model=16, num_heads=2, dim_feedforward=40)
    assert wide.dim_feedforward == 40
    assert {m.expand.out_features for m in wide.modules() if type(m).__name__ == "FeedForward"} == {40}
    assert build_transformer("emt", ("audio", "visual"), 8, 2, d_model=48, num_heads=2).dim_feedforward == 64


def test_valence_regressor_trains_on_known_targets_only():
    torch.manual_seed(0)
    model = build_transformer("ca", ("audio", "visual"), {"audio": 16, "visual": 12}, NUM_CLASSES,
                              d_model=32, num_layers=1, num_heads=4, predict_valence=True).eval()
    batch = random_batch(model)
    batch["valence"] = torch.tensor([0.5, float("nan"), -1.0])
    outputs = model(batch)
    assert outputs["valence"].shape == (BATCH,)
    known = torch.tensor([True, False, True])
    expected = ((outputs["valence"][known] - batch["valence"][known]) ** 2).mean()
    torch.testing.assert_close(outputs["auxiliary_loss"], expected)
    outputs["auxiliary_loss"].backward()
    assert model.valence_head.linear.weight.grad.abs().sum() > 0
    assert "valence" not in build_transformer("ca", ("audio", "visual"), 8, 2, d_model=16, num_heads=2)(
        {"audio": torch.randn(2, 3, 8), "visual": torch.randn(2, 3, 8)})


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_method_sets_up_on_a_transformer_or_refuses_in_one_sentence(model_type):
    """Mid fusion has no separate encoders: a method that needs them says so, naming its flag."""
    from olmbalance import METHODS, method_entry

    method_entry("olm")  # the registry filled
    model = build_transformer(model_type, ("audio", "visual"), 8, 2, d_model=16, num_layers=1, num_heads=2,
                              num_bottleneck=2)
    for name in METHODS:
        method = build_method(name, ("audio", "visual", "fusion"), steps_per_epoch=2, seed=0, epochs=2)
        try:
            method.setup(model)
        except UserError as refusal:
            message = str(refusal)
            assert f"--method {name}" in message or "--model-type" in message, (name, message)
            assert message.count(". ") == 0, (name, message)  # one sentence
