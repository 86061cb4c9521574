"""AGM in our loop equals the authors' released step (lihong2303/AGM_ICCV2023), re-stated below
in plain torch from ``run/CREMAD_main.py`` ``train`` and ``model/CREMAD_net.py`` ``GradMod``:

- a training-mode forward gives ``total_out``; the network in eval mode (gradients kept) gives
  ``pad_visual_out`` (visual input zeroed), ``pad_audio_out`` and ``zero_padding_out``;
- ``out_a = (total - pad_audio + pad_visual) / 2``, ``out_v = (total - pad_visual + pad_audio) / 2``,
  each passed through an identity whose backward hook multiplies its gradient by
  ``scale_a``/``scale_v``; the loss is the batch-mean CE of ``out_a + out_v``;
- scores: batch mean of ``-log softmax(out)[label]`` (floored at 1e-8); ``ratio_a =
  exp(s_v - s_a)``, ``optimal_ratio_a = exp(train_v - train_a)`` from the running scores
  before this step, ``coeff = exp(alpha min(optimal - ratio, 10))``; then the running scores
  take the step in (``iteration`` counted over every epoch);
- in the window ``modulation_starts <= epoch <= modulation_ends`` ``update_scale(coeffs)``;
- after ``loss.backward()``: if the fusion ``fc_out.weight`` gradient leaves [-1, 1], clip
  the norm of every model gradient to 1;
- SGD(momentum 0.9, weight decay 1e-4) steps (``tasks/CREMAD_task.py`` ``build_optimizer``).

Encoders with BatchNorm and biases make input masking (eval mode, zero inputs) differ from
feature masking, so the comparison sees which one runs.
"""
import argparse
import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from config import resolve_config
from engines.engines_logits_com import DiagnosticMeans, train_step
from engines.methods import method_from_config
from engines.metrics import HeadMetrics
from engines.trainer import make_context
from models.late_fusion import LateFusionClassifier

CLASSES, FEATURES, BATCH, INPUTS = 4, 8, 16, 6
MODALITIES = ("audio", "visual")
# (epoch, steps in it): the window below closes after epoch 1, so epoch 2 keeps epoch 1's last
# coefficients in force, as the released hooks do.
SCHEDULE = ((1, 4), (2, 2))
ALPHA = 1.5
LR = 0.05  # the authors' recipe but a larger lr, so that a few steps move the parameters visibly


def bn_model(seed=0):
    torch.manual_seed(seed)
    encoders = {m: nn.Sequential(nn.Linear(INPUTS, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, FEATURES))
                for m in MODALITIES}
    model = LateFusionClassifier(CLASSES, MODALITIES, "concat", encoders=encoders, feature_dim=FEATURES)
    with torch.no_grad():  # features large enough that the clipping fires on some steps only
        for encoder in model.encoders.values():
            encoder[3].weight.mul_(3.0)
    return model


def batches(seed=1):
    generator = torch.Generator().manual_seed(seed)
    while True:
        inputs = {m: 3 * torch.randn(BATCH, INPUTS, generator=generator) for m in MODALITIES}
        yield inputs, torch.randint(0, CLASSES, (BATCH,), generator=generator)


def config(**flags):
    values = dict(dataset="CREMAD", method="agm", recipe="authors", lr=LR, agm_alpha=ALPHA, agm_modulation_ends=1)
    values.update(flags)
    return resolve_config(argparse.Namespace(**{k: v for k, v in values.items() if v is not None}))


def released_parameters(model):
    """What the released model holds: encoders and fusion head (no read-out heads)."""
    return [*model.encoders.parameters(), *model.fusion.parameters()]


# -- the released step, re-stated ---------------------------------------------------------------------
def released_steps(model, schedule=SCHEDULE, alpha=ALPHA, window=(0, 1), lr=LR):
    optimizer = torch.optim.SGD(released_parameters(model), lr=lr, momentum=0.9, weight_decay=1e-4)
    scale = {"a": 1.0, "v": 1.0}
    train_score_a = train_score_v = 0.0
    record = {"coefficients": [], "clipped": []}
    data = batches()
    total_batch = max(steps for _, steps in schedule)

    def net(audio, visual):
        return model.fusion([model.encoders["audio"](audio), model.encoders["visual"](visual)])

    for epoch, steps in schedule:
        for step in range(steps):
            inputs, label = next(data)
            audio, visual = inputs["audio"], inputs["visual"]
            iteration = (epoch - 1) * total_batch + step + 1
            model.train()
            total_out = net(audio, visual)
            model.eval()
            pad_visual_out = net(audio, torch.zeros_like(visual))
            pad_audio_out = net(torch.zeros_like(audio), visual)
            model.train()
            out_a = 0.5 * (total_out - pad_audio_out + pad_visual_out)
            out_v = 0.5 * (total_out - pad_visual_out + pad_audio_out)
            out_a.register_hook(lambda g: g * scale["a"])  # the hook reads the scale at backward time
            out_v.register_hook(lambda g: g * scale["v"])
            loss = F.cross_entropy(out_a + out_v, label)
            optimizer.zero_grad()
            score_a = score_v = 0.0
            for k in range(BATCH):
                p_a = torch.softmax(out_a, dim=1)[k][label[k]].item()
                p_v = torch.softmax(out_v, dim=1)[k][label[k]].item()
                score_a += -math.log(max(p_a, 1e-8))
                score_v += -math.log(max(p_v, 1e-8))
            score_a, score_v = score_a / BATCH, score_v / BATCH
            ratio_a, ratio_v = math.exp(score_v - score_a), math.exp(score_a - score_v)
            optimal_ratio_a = math.exp(train_score_v - train_score_a)
            optimal_ratio_v = math.exp(train_score_a - train_score_v)
            coeff_a = math.exp(alpha * min(optimal_ratio_a - ratio_a, 10))
            coeff_v = math.exp(alpha * min(optimal_ratio_v - ratio_v, 10))
            train_score_a = train_score_a * (iteration - 1) / iteration + score_a / iteration
            train_score_v = train_score_v * (iteration - 1) / iteration + score_v / iteration
            if window[0] <= epoch <= window[1]:
                scale["a"], scale["v"] = coeff_a, coeff_v
            loss.backward()
            weight_grad = model.fusion.classifier.weight.grad
            clipped = bool(weight_grad.max() > 1 or weight_grad.min() < -1)
            if clipped:
                nn.utils.clip_grad_norm_(released_parameters(model), max_norm=1.0)
            optimizer.step()
            record["coefficients"].append((scale["a"], scale["v"]))
            record["clipped"].append(clipped)
    record["running"] = (train_score_a, train_score_v)
    return record


# -- ours ---------------------------------------------------------------------------------------------
class Ours:
    """Our loop under ``cfg``: method_from_config, make_context, train_step, start_epoch."""

    def __init__(self, cfg, model):
        self.model, self.cfg = model, cfg
        self.method = method_from_config(cfg, model.heads, train_size=4 * cfg.batch_size)
        self.method.setup(model)
        self.ctx = make_context(cfg, model, self.method, torch.device("cpu"))
        self.ctx.progress = False
        self.record = {"coefficients": [], "clipped": []}

    def run(self, schedule, data):
        for epoch, steps in schedule:
            self.method.start_epoch(epoch, self.model, None)
            for inputs, labels in itertools.islice(data, steps):
                diagnostics = DiagnosticMeans()
                train_step(self.model, self.method, (inputs, labels, 0), None, self.ctx, HeadMetrics(self.method.heads),
                           diagnostics)
                means = diagnostics.means(self.method.heads)
                self.record["coefficients"].append((means["modulation"]["audio"], means["modulation"]["visual"]))
                self.record["clipped"].append(bool(means["clipped"]))
        return self


def assert_same_parameters(ours, released):
    for (name, a), b in zip([(n, p) for n, p in ours.named_parameters() if not n.startswith("unimodal_heads")],
                            released_parameters(released)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_recipe_is_the_released_one():
    cfg = config(lr=None)
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay) == ("sgd", 1e-4, 0.9, 1e-4)
    assert (cfg.lr_step, cfg.lr_gamma, cfg.loss_reduction, cfg.batch_size, cfg.epochs) == (70, 0.1, "mean", 64, 100)
    default = resolve_config(argparse.Namespace(dataset="CREMAD", method="agm"))
    assert default.optimizer == "adam" and default.method_settings == {}  # the dataset's recipe by default
    method = method_from_config(default, ("audio", "visual", "fusion"), 640)
    assert (method.alpha, method.modulation_epochs, method.grad_clip, method.mask) == (1.0, (0, 20), 1.0, "input")


def test_steps_equal_the_released_steps():
    start = bn_model()
    released = copy.deepcopy(start)
    expected = released_steps(released)
    ours = Ours(config(), copy.deepcopy(start)).run(SCHEDULE, batches())
    # The comparison is not vacuous: coefficients moved away from 1 and differ between
    # modalities, the window froze them in epoch 2, and the clipping fired on some steps only.
    first_epoch = expected["coefficients"][:SCHEDULE[0][1]]
    assert all(abs(a - 1) > 1e-3 and abs(a - v) > 1e-3 for a, v in first_epoch[1:])
    assert expected["coefficients"][SCHEDULE[0][1]:] == [first_epoch[-1]] * SCHEDULE[1][1]
    assert any(expected["clipped"]) and not all(expected["clipped"])

    assert ours.record["clipped"] == expected["clipped"]
    for got, want in zip(ours.record["coefficients"], expected["coefficients"]):
        assert got == pytest.approx(want, rel=1e-5)
    assert ours.method.running_scores.tolist() == pytest.approx(expected["running"], rel=1e-6)
    assert int(ours.method.steps_seen) == sum(steps for _, steps in SCHEDULE)
    assert_same_parameters(ours.model, released)


def test_feature_masking_is_not_the_released_step():
    """The documented cheaper switch: zeroed features with the fusion head in training mode."""
    start = bn_model()
    released = copy.deepcopy(start)
    released_steps(released, schedule=((1, 2),))
    ours = Ours(config(agm_mask="feature"), copy.deepcopy(start)).run(((1, 2),), batches())
    encoder = ours.model.encoders["audio"][0].weight
    assert not torch.allclose(encoder, released.encoders["audio"][0].weight, atol=1e-6)


def test_masked_forwards_leave_training_flags_and_running_statistics():
    cfg = config()
    ours = Ours(cfg, bn_model())
    norm = ours.model.encoders["audio"][1]
    ours.run(((1, 1),), batches())
    assert ours.model.training and norm.training and int(norm.num_batches_tracked) == 1


def test_checkpointed_state_continues_identically():
    """Running scores, step count and the coefficients in force travel in state_dict: a run
    restored after epoch 1 continues exactly like the uninterrupted one, window closed."""
    cfg = config()
    whole = Ours(cfg, bn_model()).run(SCHEDULE, batches())

    data = batches()
    first = Ours(cfg, bn_model()).run(SCHEDULE[:1], data)
    saved = copy.deepcopy({"model": first.model.state_dict(), "method": first.method.state_dict(),
                           "optimizer": first.ctx.network_optimizer.state_dict()})
    assert set(saved["method"]) >= {"running_scores", "steps_seen", "applied"}
    resumed = Ours(cfg, bn_model(seed=5))
    resumed.model.load_state_dict(saved["model"])
    resumed.method.load_state_dict(saved["method"])
    resumed.ctx.network_optimizer.load_state_dict(saved["optimizer"])
    resumed.run(SCHEDULE[1:], data)
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert resumed.record["coefficients"] == whole.record["coefficients"][SCHEDULE[0][1]:]
