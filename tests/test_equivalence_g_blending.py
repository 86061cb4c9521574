"""G-Blending in our loop equals BalanceBenchmark's ``GBlendingTrainer`` (GeWu-Lab/BalanceBenchmark,
``balancemm/trainer/GBlending_trainer.py``), re-stated below in plain torch from its
``super_epoch_origin`` and ``training_step``:

- at a super-epoch boundary, one temporary model and one temporary optimizer; for each modality
  and then ``output``, the temporary model is reloaded from the main model, the optimizer from
  its initial state, and trained ``super_epoch`` epochs on the fusion output's CE with the other
  modalities' inputs zeroed (``output``: none zeroed);
- after its first and last epoch: the running sum of the training batches' losses, and the sum
  of the validation batches' losses in eval mode; ``w = |g / o^2|``, normalized to sum 1;
- main steps: ``sum_m w_m CE_m`` over the heads, backward, optimizer step.

Also the wiring: which split the copies read (train and validation, never test), at which epochs
the estimate runs, what the checkpoint carries (a resumed run continues identically), and that
the trainer hands no test metric or test sample to any method hook.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from config import Config, resolve_config
from engines.engines_logits_com import DiagnosticMeans, StepContext, train_step
from engines.epoch_data import LoaderEpochData
from engines.methods import method_from_config
from engines.metrics import HeadMetrics
from olmbalance import Method, build_method
from olmbalance.base import EpochData
from olmbalance.errors import UserError
from olmbalance.g_blending import GradientBlending
from tests.scaling_fixtures import VectorModel, vector_data
from tests.tiny import TinyModel, tiny_late_fusion

CLASSES, FEATURES, BATCH = 4, 16, 16
MODALITIES = ("audio", "visual")
HEADS = (*MODALITIES, "fusion")
CPU = torch.device("cpu")


def tiny_model(seed=0):
    return tiny_late_fusion("concat", CLASSES, FEATURES, seed)


# tests/method_steps.py: an estimate within the cross-cutting tests' two epochs.
STEP_SETTINGS = {"super_epoch": 2}


def fixed_batches(count, seed):
    generator = torch.Generator().manual_seed(seed)
    return [({m: torch.randn(BATCH, 6, generator=generator) for m in MODALITIES},
             torch.randint(0, CLASSES, (BATCH,), generator=generator)) for _ in range(count)]


class ListEpochData(EpochData):
    """Fixed training and validation batches; records what the method asked for."""

    def __init__(self, train, val):
        self.train, self.val = train, val
        self.train_passes, self.val_passes = 0, 0

    def train_batches(self, share=1.0):
        self.train_passes += 1
        return iter(self.train[:max(1, round(share * len(self.train)))])

    def val_batches(self):
        self.val_passes += 1
        return iter(self.val)


def rank_epoch_data(rank):
    """Each DDP rank its own data (tests/test_balancing_methods.py ddp_part)."""
    return ListEpochData(fixed_batches(2, seed=100 + rank), fixed_batches(1, seed=200 + rank))


# -- BalanceBenchmark, re-stated ------------------------------------------------------------------
def zero_padding(inputs, padding):
    return {m: torch.zeros_like(x) if m in padding else x for m, x in inputs.items()}


def balancebenchmark_weights(model, train, val, super_epoch, make_optimizer, paper=False):
    """``super_epoch_origin``; ``paper=True``: each modality's own head on full inputs, mean losses."""
    temp_model = copy.deepcopy(model)
    temp_optimizer = make_optimizer(temp_model.parameters())
    temp_optimizer_origin = copy.deepcopy(temp_optimizer.state_dict())
    weights = {}
    for modality in (*MODALITIES, "output"):
        temp_model.load_state_dict(model.state_dict(), strict=True)
        temp_optimizer.load_state_dict(temp_optimizer_origin)
        padding = [] if paper else [m for m in MODALITIES if m != modality and modality != "output"]
        head = ("fusion" if modality == "output" else modality) if paper else "fusion"
        for epoch in range(super_epoch):
            temp_model.train()
            loss_sum = 0.0
            for inputs, labels in train:
                temp_optimizer.zero_grad()
                loss = F.cross_entropy(temp_model(zero_padding(inputs, padding))[head], labels)
                loss.backward()
                temp_optimizer.step()
                loss_sum += loss.item()
            if epoch == 0 or epoch == super_epoch - 1:
                temp_model.eval()
                with torch.no_grad():
                    val_sum = sum(F.cross_entropy(temp_model(zero_padding(x, padding))[head], y).item() for x, y in val)
                if paper:
                    loss_sum, val_sum = loss_sum / len(train), val_sum / len(val)
                if epoch == 0:
                    pre_train, pre_val = loss_sum, val_sum
                else:
                    now_train, now_val = loss_sum, val_sum
        g = now_val - pre_val
        o = (now_val - now_train) - (pre_val - pre_train)
        weights[modality] = abs(g / o ** 2)
    total = sum(weights.values())
    return [weights[m] / total for m in (*MODALITIES, "output")]


def balancebenchmark_steps(model, weights, batches, optimizer):
    """``training_step`` and the optimizer step of ``train_loop``."""
    for inputs, labels in batches:
        logits = model(inputs)
        loss = sum(w * F.cross_entropy(logits[h], labels) for w, h in zip(weights, HEADS))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def adam(lr):
    return lambda parameters: torch.optim.Adam(parameters, lr=lr)


# -- our loop -------------------------------------------------------------------------------------
def our_steps(model, method, batches, optimizer):
    ctx = StepContext(device=CPU, network_optimizer=optimizer, progress=False)
    for inputs, labels in batches:
        train_step(model, method, (inputs, labels, 0), None, ctx, HeadMetrics(method.heads), DiagnosticMeans())


@pytest.mark.parametrize("paper", [False, True], ids=["released", "paper"])
def test_estimate_and_steps_equal_balancebenchmark(paper):
    lr, super_epoch = 1e-2, 3
    train, val, steps = fixed_batches(3, seed=1), fixed_batches(2, seed=2), fixed_batches(3, seed=3)
    options = dict(copy_target="head", loss_total="mean") if paper else {}
    model = tiny_model()
    method = build_method("g_blending", HEADS, super_epoch=super_epoch, optimizer="adam", lr=lr,
                          loss_reduction="mean", **options)
    data = ListEpochData(train, val)
    method.start_epoch(1, model, data)
    assert data.train_passes == 3 * super_epoch and data.val_passes == 3 * 2  # 3 copies, first and last epoch
    our_steps(model, method, steps, torch.optim.Adam(model.parameters(), lr=lr))

    reference = tiny_model()
    weights = balancebenchmark_weights(reference, train, val, super_epoch, adam(lr), paper=paper)
    balancebenchmark_steps(reference, weights, steps, torch.optim.Adam(reference.parameters(), lr=lr))

    torch.testing.assert_close(method.weights, torch.tensor(weights, dtype=torch.float32), atol=1e-6, rtol=0)
    assert abs(sum(method.coefficients().values()) - 1) < 1e-6 and max(weights) - min(weights) > 0.05
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0, msg=name)
    # The estimate trained copies only: before the steps, the main model was untouched.
    untouched = tiny_model()
    method.start_epoch(11, untouched, data)
    for ours, fresh in zip(untouched.state_dict().values(), tiny_model().state_dict().values()):
        torch.testing.assert_close(ours, fresh, atol=0, rtol=0)


def test_the_other_reading_gives_other_weights():
    train, val = fixed_batches(3, seed=1), fixed_batches(2, seed=2)
    weights = {}
    for target in ("padded", "head"):
        method = build_method("g_blending", HEADS, super_epoch=2, lr=1e-2, copy_target=target)
        method.start_epoch(1, tiny_model(), ListEpochData(train, val))
        weights[target] = method.weights
    assert (weights["padded"] - weights["head"]).abs().max() > 1e-3


def test_copies_use_the_runs_optimizer_recipe_and_loss_reduction():
    train, val = fixed_batches(3, seed=1), fixed_batches(2, seed=2)
    sgd = dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-3)
    method = build_method("g_blending", HEADS, super_epoch=2, **sgd)
    method.start_epoch(1, tiny_model(), ListEpochData(train, val))
    recipe = {k: v for k, v in sgd.items() if k != "optimizer"}
    expected = balancebenchmark_weights(tiny_model(), train, val, 2, lambda p: torch.optim.SGD(p, **recipe))
    torch.testing.assert_close(method.weights, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)
    summed = build_method("g_blending", HEADS, super_epoch=2, loss_reduction="sum", **sgd)
    summed.start_epoch(1, tiny_model(), ListEpochData(train, val))
    assert (summed.weights - method.weights).abs().max() > 1e-3  # batch sums step 16x further


def test_copies_draw_dropout_from_their_own_seeded_stream():
    # TinyModel has dropout: the estimate depends on the run's seed and the epoch only, and the
    # run's global random stream is left where it was.
    def batches(count, seed):
        generator = torch.Generator().manual_seed(seed)
        return [({m: torch.randn(8, 4, generator=generator) for m in MODALITIES} | {"index": torch.arange(8)},
                 torch.randint(0, 3, (8,), generator=generator)) for _ in range(count)]

    data = ListEpochData(batches(2, 1), batches(1, 2))
    weights = []
    for global_seed, run_seed in ((0, 5), (1, 5), (0, 6)):
        torch.manual_seed(0)
        model = TinyModel()
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        method = build_method("g_blending", HEADS, super_epoch=2, lr=1e-2, seed=run_seed)
        method.start_epoch(1, model, data)
        assert torch.equal(torch.get_rng_state(), before)
        weights.append(method.weights)
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_settings_and_context_come_from_the_run_config():
    cfg = resolve_config(argparse.Namespace(dataset="CREMAD", method="g_blending", optimizer="sgd", lr=0.02,
                                            momentum=0.8, weight_decay=3e-4, loss_reduction="mean", epochs=7,
                                            method_settings={"gb_super_epoch": 3, "gb_copy_epochs": 2}))
    method = method_from_config(cfg, HEADS, train_size=64)
    context = method.context
    assert (context.optimizer, context.lr, context.momentum, context.weight_decay) == ("sgd", 0.02, 0.8, 3e-4)
    assert (context.loss_reduction, context.epochs) == ("mean", 7)
    assert (method.super_epoch, method.copy_epochs) == (3, 2)
    offline = build_method("g_blending", HEADS, mode="offline", epochs=7)
    assert (offline.super_epoch, offline.copy_epochs) == (7, 7)
    counting = CountingBlending(HEADS, offline.context, mode="offline", copy_epochs=2)
    data = ListEpochData(fixed_batches(2, seed=1), fixed_batches(1, seed=2))
    for epoch in range(1, 20):  # a resumed run may add epochs: offline still estimates once
        counting.start_epoch(epoch, tiny_model(), data)
    assert counting.estimates == [1]
    for bad in (dict(super_epoch=0), dict(copy_epochs=1), dict(super_epoch=1), dict(copy_share=0.0),
                dict(mode="offline")):
        with pytest.raises(UserError, match="G-Blending"):
            build_method("g_blending", HEADS, **bad)
    with pytest.raises(UserError, match="fusion"):
        build_method("g_blending", MODALITIES)


# -- through fit: schedule, splits, checkpoint --------------------------------------------------------
def fit_run(run_dir, epochs, resume=False, method=None, **settings):
    from engines.trainer import fit, make_loaders

    # BalanceBenchmark's batch-mean CE, Adam without weight decay (the SGD test above covers decay).
    cfg = Config(method="g_blending", epochs=epochs, batch_size=32, lr=1e-2, weight_decay=0.0, loss_reduction="mean",
                 progress=False, plots=False, device="cpu", seed=3, resume=str(run_dir) if resume else None)
    torch.manual_seed(0)
    model = VectorModel()
    if method is None:
        method = method_from_config(dataclasses.replace(cfg, method_settings=settings), model.heads, 96)
    loaders = make_loaders(cfg, vector_data(), CPU, False)
    results = fit(cfg, model, method, loaders, run_dir, CPU)
    return model, method, loaders, cfg, results


class CountingBlending(GradientBlending):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.estimates = []

    def measure(self, model, data, epoch):
        self.estimates.append(epoch)
        return super().measure(model, data, epoch)


def test_estimates_run_at_super_epoch_boundaries_only(tmp_path):
    method = CountingBlending(HEADS, build_method("g_blending", HEADS, lr=1e-2).context, super_epoch=2)
    _, method, _, _, results = fit_run(tmp_path, 5, method=method)
    assert method.estimates == [1, 3, 5]
    assert int(method.estimated_at) == 5 and int(method.next_estimate) == 7
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # The weights an epoch trained with are logged with it; they change only after an estimate.
    assert rows[0]["coefficients"] == rows[1]["coefficients"] != rows[2]["coefficients"]
    assert rows[2]["coefficients"] == rows[3]["coefficients"] != rows[4]["coefficients"]


def test_estimate_reads_the_current_model_and_the_train_and_val_splits(tmp_path):
    # The estimate before epoch 3 equals the re-statement run on the model saved after epoch 2,
    # with that epoch's training batches and the validation split.
    _, _, loaders, cfg, _ = fit_run(tmp_path, 2, gb_super_epoch=2)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)
    torch.manual_seed(0)
    model = VectorModel()
    model.load_state_dict(saved["model"])
    data = LoaderEpochData(loaders.train, loaders.val, CPU, cfg.seed, 3, lambda inputs: inputs)
    train = list(data.train_batches())
    val = list(data.val_batches())
    assert sum(len(y) for _, y in train) == 96 and sum(len(y) for _, y in val) == 30
    expected = balancebenchmark_weights(model, train, val, 2, adam(cfg.lr))
    _, method, _, _, _ = fit_run(tmp_path, 3, resume=True, gb_super_epoch=2)
    torch.testing.assert_close(method.weights, torch.tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


def test_resumed_run_continues_identically(tmp_path):
    # Estimates before epochs 1 and 4; the resumed run must take epochs 2-3's weights and the
    # next estimate's epoch from the checkpoint.
    settings = dict(gb_super_epoch=3, gb_copy_epochs=2)
    whole_model, whole, _, _, _ = fit_run(tmp_path / "whole", 4, **settings)
    fit_run(tmp_path / "parts", 2, **settings)
    state = torch.load(tmp_path / "parts" / "last.pt", weights_only=True)["method"]
    assert {"weights", "estimate", "estimated_at", "next_estimate"} <= set(state)
    assert int(state["next_estimate"]) == 4
    model, method, _, _, _ = fit_run(tmp_path / "parts", 4, resume=True, **settings)
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(method.state_dict()[key], value, atol=0, rtol=0, msg=key)
    for key, value in whole_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=0, rtol=0, msg=key)
    rows = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("whole", "parts")]
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "seconds"}
    assert [strip(r) for r in rows[0]] == [strip(r) for r in rows[1]]


# -- the trainer never hands a method test metrics or test samples --------------------------------------
class RecordingMethod(Method):
    """Joint training that records what every hook receives."""

    def __init__(self, heads):
        super().__init__(heads)
        self.ended, self.read = [], []

    def start_epoch(self, epoch, model, data):
        samples = {"train": [], "val": []}
        for split, batches in (("train", data.train_batches()), ("val", data.val_batches())):
            for inputs, labels in batches:
                samples[split] += [tuple(x.tolist()) for x in inputs["audio"]]
        self.read.append(samples)

    def end_epoch(self, epoch, train, val):
        self.ended.append((epoch, copy.deepcopy(dict(train)), copy.deepcopy(dict(val))))


def split_rows(dataset):
    return {tuple(x.tolist()) for x in dataset.audio}


def test_fit_hands_methods_validation_never_test(tmp_path):
    from engines.trainer import fit, make_loaders

    cfg = Config(method="joint", epochs=2, batch_size=32, lr=1e-2, progress=False, plots=False, device="cpu")
    torch.manual_seed(0)
    model, data = VectorModel(), vector_data()
    method = RecordingMethod(model.heads)
    fit(cfg, model, method, make_loaders(cfg, data, CPU, False), tmp_path, CPU)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [epoch for epoch, _, _ in method.ended] == [1, 2]
    for (epoch, train, val), row in zip(method.ended, rows):
        assert json.loads(json.dumps(val)) == row["val"] and json.loads(json.dumps(train)) == row["train"]
        assert row["val"] != row["test"]
        for head in model.heads:
            assert val[head]["loss"] != row["test"][head]["loss"]
    splits = {split: split_rows(getattr(data, split)) for split in ("train", "val", "test")}
    assert not splits["test"] & (splits["train"] | splits["val"])
    assert len(method.read) == 2
    for read in method.read:
        assert set(read["train"]) == splits["train"] and set(read["val"]) == splits["val"]
        assert not (set(read["train"]) | set(read["val"])) & splits["test"]


def test_two_ddp_ranks_estimate_the_same_weights(ddp_session):
    ranks = [torch.load(ddp_session / "balancing" / f"g_blending-{r}.pt", weights_only=False)["method"]
             for r in range(2)]
    assert int(ranks[0]["estimated_at"]) == 1
    torch.testing.assert_close(ranks[0]["weights"], ranks[1]["weights"], atol=0, rtol=0)
    assert not torch.allclose(ranks[0]["weights"], torch.full((3,), 1 / 3))
