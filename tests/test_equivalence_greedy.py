"""Greedy in our trainer equals Greedy as its authors released it (nyukat/greedy_multimodal_learning:
``src/balanced_mmtm.py`` ``MMTM_mitigate.forward``, ``src/model.py`` ``MMTM_MVCNN.forward``,
``src/callbacks.py`` ``Bias_Mitigation_Strong``, ``src/framework.py`` ``Model_.train_loop``,
``train.py`` ``blend_loss``), re-stated below from their facts:

- per epoch (counted from 1) ``on_epoch_begin`` unlocks re-balancing from ``starting_epoch``;
- per batch: ``zero_grad``; the forward in the mode decided by the previous step: both
  branches stage by stage, after each of the last stages an MMTM (squeeze: per-channel means,
  ``relu(fc_squeeze(cat))``, per modality ``sigmoid(fc_m(.))``; every forward folds each scale's
  batch mean into ``(mean + avg * step) / (step + 1)``; in a re-balancing step the caring
  modality's scale is that running mean); loss ``CE(x_0) + CE(x_1)``; backward;
  ``on_backward_end``: ``compute_BDR`` (``|g|^2/|w|^2`` of the ``mmtm`` parameters, the
  modality's own and the shared ones, and of the branch's parameters, accumulated; ``log10``
  ratios; their difference) and the window rule; ``optimizer.step()``; the prediction is
  ``(x_0 + x_1) / 2``.

The reference fixes what the module docstring of olmbalance/greedy.py lists (each modality's
own running mean; no update outside training steps). The wiring tests pin what the equivalence
cannot isolate: the window rule on given speeds, the small CNN's and ResNet18's stages (clips
folded, bit-for-bit the plain encoder when the scales are 1), plain evaluation, what is saved,
the refusals, the settings and the recipe.
"""
from __future__ import annotations

import argparse
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from config import Config
from engines.engines_logits_com import DiagnosticMeans, StepContext, train_step
from engines.metrics import HeadMetrics
from engines.trainer import fit, make_loaders
from models.mmtm import Stages
from olmbalance import build_method
from tests.scaling_fixtures import vector_data
from tests.tiny import TinyModel, tiny_late_fusion
from utils.errors import UserError

CPU = torch.device("cpu")
MODALITIES = ("audio", "visual")
LR = 0.1
# Within the cross-cutting tests' two short epochs: re-balancing from the first step on, a
# window that crosses their epoch boundary (3 steps), any imbalance enough to start one.
STEP_SETTINGS = {"starting_epoch": 1, "alpha": 0.0, "window_size": 3}


class StagedMLP(nn.Module):
    """A vector encoder in stages (Linear-ReLU each), exposing them for MMTM blocks. No
    BatchNorm: the two-rank test wants bit-identical buffers, and DDP leaves each rank's last
    normalization statistics its own."""

    def __init__(self, inputs: int, widths=(8, 8, 8)):
        super().__init__()
        sizes = (inputs, *widths)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.ReLU()) for a, b in zip(sizes, sizes[1:]))
        self.widths = tuple(widths)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x

    def stages(self) -> Stages:
        return Stages(nn.Identity(), tuple(self.blocks), self.widths, nn.Identity())


def step_model(seed, inputs=6, classes=4):
    """The cross-cutting tests' model: the tiny late-fusion model with encoders in stages."""
    from models.late_fusion import LateFusionClassifier

    torch.manual_seed(seed)
    encoders = {m: StagedMLP(inputs) for m in MODALITIES}
    return LateFusionClassifier(classes, MODALITIES, "concat", encoders=encoders, feature_dim=8)


def ready(settings=None, seed=0, inputs=4, classes=3, steps_per_epoch=6):
    model = step_model(seed, inputs, classes)
    method = build_method("greedy", model.heads, settings, steps_per_epoch=steps_per_epoch)
    method.setup(model)
    return model, method


def run_config(epochs, **options):
    return Config(method="greedy", epochs=epochs, batch_size=16, lr=LR, optimizer="sgd", momentum=0.0,
                  weight_decay=0.0, loss_reduction="mean", progress=False, plots=False, device="cpu", seed=0,
                  **options)


# -- the released training, re-stated ---------------------------------------------------------------
def released_mmtm(maps, layer, state, curation_mode, caring_modality):
    """MMTM_mitigate.forward on two (B, C) or (B, C, H, W) maps, with the weights of ``layer``
    (squeeze, excite[0], excite[1]); ``state`` holds the running means and the step."""
    squeeze_array = [t.view(t.shape[:2] + (-1,)).mean(dim=-1) for t in maps]
    excitation = torch.relu(F.linear(torch.cat(squeeze_array, 1), layer.squeeze.weight, layer.squeeze.bias))
    outs = [torch.sigmoid(F.linear(excitation, e.weight, e.bias)) for e in layer.excite]
    for i in range(2):  # each modality its own (the released second one reads vis_out)
        state["avg"][i] = (outs[i].mean(0) + state["avg"][i] * state["step"]).detach() / (state["step"] + 1)
    state["step"] += 1
    scaled = []
    for i, (t, out) in enumerate(zip(maps, outs)):
        if curation_mode and caring_modality == i:
            out = torch.stack(out.shape[0] * [state["avg"][i]])
        scaled.append(t * out.view(out.shape + (1,) * (t.dim() - out.dim())))
    return scaled


class Released:
    """The released callback and training loop around a copy of the model's weights."""

    def __init__(self, model, epsilon, windowsize, starting_epoch):
        self.model = copy.deepcopy(model)
        self.epsilon, self.windowsize, self.starting_epoch = epsilon, windowsize, starting_epoch
        self.M_bypass, self.M_main = [0.0, 0.0], [0.0, 0.0]
        self.curation_mode, self.caring_modality, self.unlock = False, None, False
        self.states = [{"avg": [torch.zeros(c) for c in block.channels], "step": 0} for block in self.model.mmtm.blocks]
        self.modes = []  # per step: the re-balanced modality or None

    def forward(self, inputs):
        net = self.model
        maps = [inputs[m] for m in MODALITIES]
        blocks = [list(net.encoders[m].blocks) for m in MODALITIES]
        for i, layer in enumerate(net.mmtm.blocks):
            maps = [block[i](x) for block, x in zip(blocks, maps)]
            maps = released_mmtm(maps, layer, self.states[i], self.curation_mode, self.caring_modality)
        return [net.unimodal_heads[m](x) for m, x in zip(MODALITIES, maps)]

    def compute_bdr(self):
        wn_main, wn_bypass, gn_main, gn_bypass = [0.0] * 2, [0.0] * 2, [0.0] * 2, [0.0] * 2
        for name, parameter in self.model.named_parameters():
            grad = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
            wn, gn = (parameter ** 2).sum().item(), (grad ** 2).sum().item()
            if "mmtm" in name:
                own = [i for i in range(2) if f"excite.{i}." in name]
                for i in own or range(2):  # an excitation layer is its modality's, the squeeze both
                    wn_bypass[i] += wn
                    gn_bypass[i] += gn
            else:
                for i, m in enumerate(MODALITIES):  # the branch: its encoder and its head
                    if name.startswith((f"encoders.{m}.", f"unimodal_heads.{m}.")):
                        wn_main[i] += wn
                        gn_main[i] += gn
        for i in range(2):
            self.M_bypass[i] += gn_bypass[i] / wn_bypass[i]
            self.M_main[i] += gn_main[i] / wn_main[i]
        return math.log10(self.M_bypass[0] / self.M_main[0]) - math.log10(self.M_bypass[1] / self.M_main[1])

    def on_backward_end(self):
        if self.unlock:
            if not self.curation_mode:
                d = self.compute_bdr()
                if abs(d) > self.epsilon:
                    self.curation_mode, self.curation_step = True, 0
                    self.caring_modality = 1 if d < 0 else 0
                else:
                    self.curation_mode, self.caring_modality = False, 0
            else:
                self.curation_step += 1
                if self.curation_step == self.windowsize:
                    self.curation_mode = False
        else:
            self.compute_bdr()
            self.curation_mode, self.caring_modality = False, 0

    def train(self, loaders, epochs):
        optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, weight_decay=0.0, momentum=0)
        for epoch in range(1, epochs + 1):
            self.unlock = self.unlock or epoch >= self.starting_epoch
            self.model.train()
            for inputs, labels, _ in loaders.train:
                optimizer.zero_grad(set_to_none=True)
                self.modes.append(self.caring_modality if self.curation_mode else None)
                sum(F.cross_entropy(x, labels) for x in self.forward(inputs)).backward()
                self.on_backward_end()
                optimizer.step()


def test_two_epochs_of_our_trainer_equal_the_released_training(tmp_path):
    # seed 9: a window for modality 0, steps below the threshold, a decision at the epoch's last
    # step for the next epoch's first two, windows for modality 1 (found by running the reference)
    settings, seed = {"alpha": 0.1, "window_size": 2, "starting_epoch": 1}, 9
    cfg = run_config(2)
    ours, method = ready(settings, seed)
    fit(cfg, ours, method, make_loaders(cfg, vector_data(), CPU, False), tmp_path, CPU)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    released = Released(ready(settings, seed)[0], 0.1, 2, 1)
    released.train(make_loaders(cfg, vector_data(), CPU, False), 2)
    theirs = released.model.state_dict()
    for i, state in enumerate(released.states):  # their running means, where ours keep them
        theirs[f"mmtm.blocks.{i}.running_scale"] = torch.cat(state["avg"])
        theirs[f"mmtm.blocks.{i}.updates"] = torch.tensor(state["step"])
    torch.testing.assert_close(ours.state_dict(), theirs, atol=1e-6, rtol=1e-5)
    assert int(ours.mmtm.blocks[0].updates) == 12  # the training steps only: evaluation moves nothing
    assert method.bypass_speed == pytest.approx(released.M_bypass, rel=1e-9)
    assert method.main_speed == pytest.approx(released.M_main, rel=1e-9)
    assert (method.curating, method.caring) == (released.curation_mode, released.caring_modality)
    modes = released.modes
    assert modes == [None, 0, 0, None, None, None, 1, 1, None, 1, 1, None]
    for epoch, row in enumerate(rows):  # the logged share of re-balancing steps per modality
        shares = [sum(mode == i for mode in modes[6 * epoch:6 * epoch + 6]) / 6 for i in range(2)]
        assert [row["olm"]["rebalanced"][m] for m in MODALITIES] == pytest.approx(shares)
        assert row["olm"]["rebalanced"]["fusion"] == 0.0
    saved = torch.load(tmp_path / "last.pt", weights_only=False)["method"]["_extra_state"]
    assert saved == method.get_extra_state() and saved["epoch"] == 2


# -- the model: stages and MMTM blocks ---------------------------------------------------------------
def unit_scales(model):
    """Excitations saturated at exactly 1.0: the MMTM blocks then change nothing."""
    with torch.no_grad():
        for block in model.mmtm.blocks:
            for excite in block.excite:
                excite.weight.zero_()
                excite.bias.fill_(100.0)


def test_the_small_cnn_in_stages_is_its_forward_bit_for_bit():
    """With unit scales the staged run (clips folded) is the plain forward bit for bit; the
    default model has no MMTM (its state dict is what it was)."""
    from models.encoders import build_encoders
    from models.late_fusion import LateFusionClassifier

    torch.manual_seed(0)
    encoders, width = build_encoders("small_cnn", MODALITIES)
    model = LateFusionClassifier(3, MODALITIES, "concat", encoders=encoders, feature_dim=width).eval()
    assert model.mmtm is None and not any("mmtm" in k for k in model.state_dict())
    inputs = {"audio": torch.randn(2, 1, 32, 16), "visual": torch.randn(2, 2, 3, 16, 16)}
    with torch.no_grad():
        plain = model(inputs)
        exchange = model.add_mmtm(3)
        unit_scales(model)
        staged = model(inputs)
    # audio's blocks 2-4 beside visual's blocks 1-3
    assert [block.channels for block in exchange.blocks] == [(64, 64), (128, 128), (128, 128)]
    for head in plain:
        assert torch.equal(plain[head], staged[head]), head


class Tag(nn.Sequential):
    """Stands in for a ResNet module: records its call and adds its number (no convolution);
    as a stage it keeps a ``bn2`` for the width (a BasicBlock's last one)."""

    def __init__(self, name, number, calls, width=None):
        super().__init__()
        self.name, self.number, self.calls = name, number, calls
        if width is not None:
            self.append(nn.Module())
            self[-1].bn2 = nn.BatchNorm2d(width)

    def forward(self, x):
        self.calls.append(self.name)
        return x.mean(dim=(2, 3), keepdim=True) if self.name == "avgpool" else x + self.number


def test_resnet18_in_stages_is_its_forward_op_for_op():
    """torchvision's ResNet18 forward and resnet18_stages run the same modules in the same
    order (each replaced by a cheap tagged op, so that the check runs no convolution)."""
    from models.resnet import resnet18_stages, resnet18_trunk

    with torch.device("meta"):
        trunk = resnet18_trunk(1)
    assert resnet18_stages(trunk, clips=False).channels == (64, 128, 256, 512)
    calls = []
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
    for number, name in enumerate(names):
        setattr(trunk, name, Tag(name, number, calls, 8 if name.startswith("layer") else None))
    x = torch.randn(2, 8, 4, 4)
    plain = trunk(x)
    plain_calls, calls[:] = list(calls), []
    stages = resnet18_stages(trunk, clips=False)
    h = stages.stem(x)
    for block in stages.blocks:
        h = block(h)
    assert torch.equal(stages.pool(h), plain) and calls == plain_calls == list(names)


def test_mmtm_on_the_small_cnn_with_clips_equals_the_released_mmtm():
    """The embedded set's encoders, a re-balancing step for visual: the logits and every
    gradient against the released MMTM with BalanceBenchmark's clip handling, by hand."""
    from models.encoders import build_encoders
    from models.late_fusion import LateFusionClassifier

    torch.manual_seed(1)
    encoders, width = build_encoders("small_cnn", MODALITIES)
    model = LateFusionClassifier(3, MODALITIES, "concat", encoders=encoders, feature_dim=width)
    method = build_method("greedy", model.heads, {"starting_epoch": 1})
    method.setup(model)
    with torch.no_grad():  # a running mean to re-balance with
        for mmtm in model.mmtm.blocks:
            mmtm.running_scale.uniform_(0.2, 0.8)
            mmtm.updates.fill_(3)
    reference = copy.deepcopy(model)
    inputs = {"audio": torch.randn(4, 1, 16, 16), "visual": torch.randn(4, 2, 3, 8, 8)}
    labels = torch.tensor([0, 1, 2, 1])
    method.curating, method.caring = True, 1
    logits = method.forward_train(model, inputs, labels)
    (F.cross_entropy(logits["audio"], labels) + F.cross_entropy(logits["visual"], labels)).backward()

    audio, visual = reference.encoders["audio"].trunk, reference.encoders["visual"].trunk
    batch, frames = 4, 2
    a = audio[0:3](inputs["audio"])  # block 1 alone: the MMTMs sit after the last three
    v = inputs["visual"].flatten(0, 1)
    for i, mmtm in enumerate(reference.mmtm.blocks):
        a, v = audio[3 * i + 3:3 * i + 6](a), visual[3 * i:3 * i + 3](v)
        (_, c, h, w) = v.size()
        clip = v.view(batch, -1, c, h, w).permute(0, 2, 1, 3, 4)  # BalanceBenchmark's clip view
        squeeze = torch.cat([a.reshape(batch, a.shape[1], -1).mean(-1), clip.reshape(batch, c, -1).mean(-1)], 1)
        hidden = torch.relu(mmtm.squeeze(squeeze))
        out_a, out_v = (torch.sigmoid(e(hidden)) for e in mmtm.excite)
        steps = int(mmtm.updates)
        avg_a, avg_v = (mmtm.running_scale.split(mmtm.channels)[k] for k in range(2))
        avg_a = (out_a.mean(0) + avg_a * steps).detach() / (steps + 1)
        avg_v = (out_v.mean(0) + avg_v * steps).detach() / (steps + 1)
        out_v = torch.stack(batch * [avg_v])  # caring modality 1: its running mean
        a = a * out_a.view(batch, -1, 1, 1)
        v = (clip * out_v.view(batch, c, 1, 1, 1)).permute(0, 2, 1, 3, 4).reshape(-1, c, h, w)
        ours = model.mmtm.blocks[i]
        torch.testing.assert_close(ours.running_scale, torch.cat([avg_a, avg_v]))
        assert int(ours.updates) == steps + 1
    a = audio[-2:](a)
    v = visual[-2:](v).view(batch, frames, -1).mean(1)
    za, zv = reference.unimodal_heads["audio"](a), reference.unimodal_heads["visual"](v)
    (F.cross_entropy(za, labels) + F.cross_entropy(zv, labels)).backward()
    torch.testing.assert_close(logits["audio"], za)
    torch.testing.assert_close(logits["visual"], zv)
    torch.testing.assert_close(logits["fusion"], (za + zv) / 2)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if q.grad is None:  # the fusion head, and visual's excitation layers while re-balanced
            assert p.grad is None and (name.startswith("fusion.") or ".excite.1." in name), name
        else:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert model.mmtm.frozen is None and model.mmtm.track is False  # only around the training forward


# -- wiring --------------------------------------------------------------------------------------------
def batch(seed, size=16, inputs=4):
    generator = torch.Generator().manual_seed(seed)
    return {m: torch.randn(size, inputs, generator=generator) for m in MODALITIES}, torch.arange(size) % 3


def test_the_window_rule_on_given_speeds():
    """on_backward_end on speeds given by hand: warm-up, a window per sign, a balanced step, an
    unusable step, and no speeds taken inside a window."""
    method = build_method("greedy", ("audio", "visual", "fusion"), {"alpha": 0.1, "window_size": 2})
    given = iter([([1.0, 1.0], [1.0, 1.0]),    # epoch 1, warm-up: accumulated only
                  ([10.0, 1.0], [1.0, 1.0]),   # d = log10(11/2) - log10(2/2) > 0.1: modality 0, 2 steps
                  ([1.0, 10.0], [1.0, 1.0]),   # d = log10(12/3) - log10(12/3) = 0: plain
                  ([1.0, 70.0], [1.0, 1.0]),   # d = log10(13/4) - log10(82/4) < -0.1: modality 1
                  None,                        # not finite: nothing accumulated, nothing decided
                  ([0.0, 0.0], [0.0, 0.0])])   # d as before: modality 1 again
    method.speeds = lambda: next(given)
    frozen = []
    for epoch, steps in ((1, 1), (2, 9)):
        method.start_epoch(epoch, None, None)
        for _ in range(steps):
            frozen.append(method.caring if method.curating else None)
            method.after_backward(None, None, None)
    assert frozen == [None, None, 0, 0, None, None, 1, 1, None, None]
    assert (method.curating, method.caring, method.curation_step) == (True, 1, 0)
    assert method.bypass_speed == [13.0, 82.0] and method.main_speed == [4.0, 4.0]
    assert method.d_bdr == pytest.approx(math.log10(13 / 4) - math.log10(82 / 4))


def test_evaluation_runs_plainly_and_leaves_the_running_means():
    model, method = ready(STEP_SETTINGS)
    inputs, labels = batch(3)
    method.start_epoch(1, model, None)
    ctx = StepContext(device=CPU, network_optimizer=torch.optim.SGD(model.parameters(), lr=LR), progress=False)
    train_step(model, method, (inputs, labels, 0), None, ctx, HeadMetrics(method.heads), DiagnosticMeans())
    assert method.curating  # the next training step would re-balance
    saved = copy.deepcopy(model.state_dict())
    model.eval()
    with torch.no_grad():
        logits = method.forward_eval(model, inputs)
        model.mmtm.frozen = method.caring  # what a re-balancing forward would give instead
        rebalanced = model(inputs)
        model.mmtm.frozen = None
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key  # no running mean, no step count moved
    caring = MODALITIES[method.caring]
    torch.testing.assert_close(logits["fusion"], (logits["audio"] + logits["visual"]) / 2)
    assert not torch.allclose(logits[caring], rebalanced[caring])


def test_the_loss_is_the_unimodal_heads_and_the_fusion_head_stays():
    model, method = ready()
    inputs, labels = batch(4)
    fusion = copy.deepcopy(model.fusion.state_dict())
    ctx = StepContext(device=CPU, network_optimizer=torch.optim.SGD(model.parameters(), lr=LR), progress=False)
    metrics = HeadMetrics(method.heads)
    method.start_epoch(1, model, None)
    train_step(model, method, (inputs, labels, 0), None, ctx, metrics, DiagnosticMeans())
    assert method.trained_heads() == MODALITIES
    assert all(torch.equal(v, fusion[k]) for k, v in model.fusion.state_dict().items())
    assert all(p.grad is not None for p in model.mmtm.parameters())  # no window in epoch 1: all trained
    assert int(model.mmtm.blocks[0].updates) == 1


def test_refusals_are_one_sentence():
    with pytest.raises(UserError, match="--method greedy takes exactly two modalities"):
        build_method("greedy", ("audio", "visual", "text", "fusion"))
    with pytest.raises(UserError, match="--method greedy needs a late-fusion model"):
        build_method("greedy", ("audio", "visual", "fusion")).setup(TinyModel())
    with pytest.raises(UserError, match="--method greedy cannot put .* audio encoder .*does not expose stages"):
        build_method("greedy", ("audio", "visual", "fusion")).setup(tiny_late_fusion("concat", 3, 8))
    with pytest.raises(UserError, match="fewer than the 4 asked for"):
        model = step_model(0)
        build_method("greedy", model.heads, {"stages": 4}).setup(model)
    for settings, flag in (({"alpha": -1.0}, "--greedy-alpha"), ({"window_size": 0}, "--greedy-window-size"),
                           ({"starting_epoch": 0}, "--greedy-starting-epoch"), ({"ratio": 0.0}, "--greedy-ratio")):
        with pytest.raises(UserError, match=flag):
            build_method("greedy", ("audio", "visual", "fusion"), settings)


def test_settings_and_the_authors_recipe_come_from_the_run_config():
    from config import resolve_config
    from engines.methods import method_from_config

    cfg = resolve_config(argparse.Namespace(dataset="CREMAD", method="greedy", recipe="authors"))
    assert (cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.lr_step, cfg.batch_size, cfg.epochs) == \
        ("sgd", 0.1, 0.0, 0.0, 0, 8, 300)
    cfg.method_settings = {"greedy_alpha": 0.001, "greedy_stages": 4, "greedy_starting_epoch": 1}
    method = method_from_config(cfg, ("audio", "visual", "fusion"), 64)
    assert (method.alpha, method.stages, method.starting_epoch, method.window_size, method.ratio) == (0.001, 4, 1, 5, 4.0)
